"""The gateway beside what users would pick instead: nginx, HAProxy, Caddy, textbook aiohttp.

Every proxy runs one worker (one thread; Caddy with GOMAXPROCS=1) in front of the same origin
(nginx, static ``/1k.bin`` and ``POST /post`` answered ``ok``), with upstream keep-alive on,
in two instances: access log as shipped, and off.

* nginx: its default access log (``combined`` to a file, unbuffered).
* HAProxy: ``option httplog`` to ``log stdout`` (Debian's config sends it to syslog's
  ``/dev/log``; stdout is HAProxy's own way without a syslog daemon), one thread.
* Caddy: the ``log`` directive (JSON to stderr). Caddy writes no access log unless told; the
  ``on`` instance is Caddy as users turn it on. ``admin off``, no automatic HTTPS.
* gateway: ``access_log: true`` at the default level INFO and the default text format (the
  ``json`` shape is a third instance, ``gateway-json``).
* textbook: aiohttp's default access logger to stderr.

Loads (wrk ``-t1``): ``GET /1k.bin`` at 64, 1,000 and 5,000 connections, and a 4 KiB
``POST /post`` at 64. For each load, round and proxy, the instances run back to back in
alternating order (on first in even rounds), so that on/off compare within seconds; at 64
connections the GET's and the POST's legs are made of one-second slices, alternating
between the instances and the two loads, so that on/off and POST/GET compare within a
second or two. CPU per request is the user+system time of every process of the proxy
(``/proc/PID/stat``, all threads) over the requests wrk completed; ratios are taken within
each round, then the median over rounds.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nginx
from common import (
    BENCH_DIR,
    PROJECT_DIR,
    Procs,
    cpu_seconds,
    fd_count,
    free_port,
    gateway_argv,
    gateway_config_yaml,
    hwm_kib,
    process_tree,
    reset_hwm,
    rss_kib,
    venv_python,
    wait_port,
)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
PROXIES = ("nginx", "haproxy", "caddy", "gateway", "textbook")
LOADS = (("get64", 64), ("get1000", 1000), ("get5000", 5000), ("post4k", 64))
LOAD_NAMES = tuple(name for name, _ in LOADS)
POST_LUA = 'wrk.method = "POST"\nwrk.body = string.rep("x", 4096)\n' \
           'wrk.headers["Content-Type"] = "application/octet-stream"\n'


@dataclass
class Peer:
    name: str  # e.g. "caddy"
    log: str  # "on", "off" (or "json" for the gateway's ECS shape)
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def key(self) -> str:
        return f"{self.name}/{self.log}"


@dataclass
class PeerRun:
    rounds: int
    seconds: int
    loads: list[tuple[str, int]]
    # load -> "proxy/log" -> per-round values
    rps: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    cpu_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # crowd_memory's readings
    crowd_factor: int = 1  # legs of the 1,000+ connection loads are this many times longer

    def median(self, table: dict[str, dict[str, list[float]]], load: str, key: str
               ) -> float | None:
        values = table.get(load, {}).get(key)
        return statistics.median(values) if values else None

    def ratio(self, table: dict[str, dict[str, list[float]]], load: str, a: str, b: str,
              load_b: str | None = None) -> float | None:
        """Median over rounds of a/b taken within each round (b under ``load_b``, when
        given, rather than ``load``)."""
        xs = table.get(load, {}).get(a) or []
        ys = table.get(load_b or load, {}).get(b) or []
        if not xs or len(xs) != len(ys) or not all(ys):
            return None
        return statistics.median(x / y for x, y in zip(xs, ys, strict=True))


def haproxy_cfg(port: int, origin_port: int, log: bool) -> str:
    logging = ("    log stdout format raw local0\n", "    log global\n    option httplog\n"
               ) if log else ("", "")
    # HAProxy wants two descriptors per connection up front, and refuses to start without.
    maxconn = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) // 2
    return f"""global
    nbthread 1
    maxconn {maxconn}
{logging[0]}defaults
    mode http
{logging[1]}    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    default_backend origin
backend origin
    server o1 127.0.0.1:{origin_port}
"""


def caddyfile(port: int, origin_port: int, log: bool) -> str:
    logging = "    log {\n        output stderr\n    }\n" if log else ""
    return f"""{{
    admin off
    auto_https off
}}
http://127.0.0.1:{port} {{
{logging}    reverse_proxy 127.0.0.1:{origin_port} {{
        transport http {{
            keepalive 5m
            keepalive_idle_conns_per_host 1024
        }}
    }}
}}
"""


def _start(procs: Procs, name: str, port: int, argv: list[str],
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = procs.start(name, argv, env=env, cwd=PROJECT_DIR)
    if not wait_port(port, timeout=30, proc=proc):
        raise RuntimeError(f"{name} did not start listening on {port}:\n" + procs.log_tail(name))
    return proc


def start_peers(procs: Procs, tmp: Path, origin_port: int, sink_port: int,
                names: tuple[str, ...] = PROXIES) -> list[Peer]:
    py = venv_python()
    peers: list[Peer] = []

    for mode in ("on", "off", "json"):
        on = mode != "off"
        if mode != "json":
            if "nginx" in names:
                port = free_port()
                prefix = tmp / f"peer-nginx-{mode}"
                argv = nginx.prepare(prefix, nginx.recipe_conf(prefix, port, origin_port,
                                                               sink_port, access_log=on))
                peers.append(Peer("nginx", mode, port,
                                  _start(procs, f"nginx-{mode}", port, argv)))
            if "haproxy" in names:
                port = free_port()
                cfg = tmp / f"haproxy-{mode}.cfg"
                cfg.write_text(haproxy_cfg(port, origin_port, on))
                peers.append(Peer("haproxy", mode, port, _start(
                    procs, f"haproxy-{mode}", port, [HAPROXY, "-db", "-f", str(cfg)])))
            if "caddy" in names:
                port = free_port()
                cfg = tmp / f"Caddyfile-{mode}"
                cfg.write_text(caddyfile(port, origin_port, on))
                home = tmp / f"caddy-{mode}"
                home.mkdir(exist_ok=True)
                env = dict(os.environ, GOMAXPROCS="1", HOME=str(home),
                           XDG_DATA_HOME=str(home), XDG_CONFIG_HOME=str(home))
                peers.append(Peer("caddy", mode, port, _start(
                    procs, f"caddy-{mode}", port,
                    [CADDY, "run", "--config", str(cfg), "--adapter", "caddyfile"], env=env)))
            if "textbook" in names:
                port = free_port()
                peers.append(Peer("textbook", mode, port, _start(
                    procs, f"textbook-{mode}", port, [
                        py, str(BENCH_DIR / "textbook_proxy.py"), "--port", str(port),
                        "--route", f"/=http://127.0.0.1:{origin_port}/",
                        *(["--access-log"] if on else [])])))
        if "gateway" in names:
            port = free_port()
            cfg = tmp / f"gateway-{mode}.yaml"
            cfg.write_text(gateway_config_yaml(
                port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"}],
                access_log=on))
            peers.append(Peer("gateway", mode, port, _start(
                procs, f"gateway-{mode}", port, gateway_argv(
                    cfg, log_level="INFO", log_format="json" if mode == "json" else "text"))))
    return peers


def nofile_plan(loads: list[tuple[str, int]], note: Callable[[str], None]
                ) -> list[tuple[str, int]]:
    """Each process holds a connection per client (and the proxy one upstream too): cap the
    connection counts to what the open-file limit allows, and say so."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = (soft - 200) // 2
    out = []
    for name, conns in loads:
        if conns > room:
            note(f"{name}: {conns} connections capped to {room} by the open-file limit "
                 f"({soft}; raise the hard limit to run it)")
            conns = room
        out.append((name, conns))
    return out


def run(procs: Procs, tmp: Path, origin_port: int, sink_port: int, *, rounds: int,
        seconds: int, wrk: Callable[..., dict[str, Any]], log: Callable[[str], None],
        names: tuple[str, ...] = PROXIES, loads: tuple[str, ...] = LOAD_NAMES,
        crowd_factor: int = 1) -> PeerRun:
    """Every load through every proxy. ``crowd_factor``: the legs with 1,000 connections or
    more last that many times ``seconds``, so that they measure keep-alive connections at
    work rather than the connections being set up (at 5,000 connections a 5 s leg is about
    four requests per connection)."""
    res = PeerRun(rounds, seconds, [], crowd_factor=crowd_factor)
    res.loads = nofile_plan([x for x in LOADS if x[0] in loads], res.notes.append)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    res.notes.append(f"open-file limit {soft} for every process (raised to the hard limit)")
    res.versions = versions()
    log("peers: starting nginx, HAProxy, Caddy, textbook and gateway, logs on and off")
    peers = start_peers(procs, tmp, origin_port, sink_port, names)
    lua = tmp / "post4k.lua"
    lua.write_text(POST_LUA)
    for peer in peers:  # warm up: pools, caches, JIT-less but lazy imports
        wrk(f"http://127.0.0.1:{peer.port}/1k.bin", conns=64, seconds=1, threads=1)
    by_name: dict[str, list[Peer]] = {}
    for peer in peers:
        by_name.setdefault(peer.name, []).append(peer)
    # The loads below 1,000 connections run together, their slices alternating (see _legs);
    # each crowd on its own.
    small = [x for x in res.loads if x[1] < 1000]
    groups = [[x] for x in res.loads if x[1] >= 1000]
    if small:
        groups.insert(0, small)
    for r in range(rounds):
        for group in groups:
            order = [n for n in PROXIES if n in names]
            order = order[r % len(order):] + order[:r % len(order)]
            for name in order:
                pair = by_name[name] if r % 2 == 0 else list(reversed(by_name[name]))
                legs = [(peer, load, conns) for load, conns in group for peer in pair]
                for peer, load, out, used in _legs(legs, seconds, crowd_factor, lua, wrk):
                    if out["errors"] or out["non2xx"]:
                        res.notes.append(f"round {r + 1} {load} {peer.key}: {out['errors']} "
                                         f"socket errors {out.get('error_kinds', {})}, "
                                         f"{out['non2xx']} non-2xx of "
                                         f"{out['requests']} requests")
                    if out.get("rps") is None or not out.get("requests"):
                        res.notes.append(f"round {r + 1} {load} {peer.key}: no result "
                                         f"{out.get('raw', '')!r}")
                        continue
                    res.rps.setdefault(load, {}).setdefault(peer.key, []).append(out["rps"])
                    res.cpu_us.setdefault(load, {}).setdefault(peer.key, []).append(
                        used / out["requests"] * 1e6)
            log(f"peers: round {r + 1}/{rounds} {'+'.join(load for load, _ in group)} done")
    for peer in peers:
        procs.stop(peer.proc)
    crowd = dict(res.loads).get("get5000")
    if "gateway" in names and crowd is not None:
        res.memory = crowd_memory(procs, tmp, origin_port, crowd, seconds=seconds, wrk=wrk,
                                  log=log)
    return res


def _legs(legs: list[tuple[Peer, str, int]], seconds: int, crowd_factor: int, lua: Path,
          wrk: Callable[..., dict[str, Any]]
          ) -> list[tuple[Peer, str, dict[str, Any], float]]:
    """The legs of one proxy's instances (log on, off...) under one or more loads (``legs``:
    instance, load, connections): wrk's result and the CPU seconds the instance's processes
    used, per leg. Below 1,000 connections each leg is ``seconds`` one-second slices, the
    legs' slices alternating (GET on, GET off, POST on, POST off, GET on...), so that a
    change in this machine's speed over a few seconds falls on every side of a ratio alike;
    the slices of a leg add up (req/s: its requests over the slices' time). A crowd's leg
    (1,000 connections and more) runs whole, ``crowd_factor`` times longer: its
    connections take seconds to settle."""
    crowd = any(conns >= 1000 for _, _, conns in legs)
    slices = 1 if crowd else seconds
    length = seconds * crowd_factor if crowd else 1
    totals: list[dict[str, Any]] = [
        {"requests": 0, "time": 0.0, "errors": 0, "non2xx": 0, "cpu": 0.0, "error_kinds": {}}
        for _ in legs]
    for _ in range(slices):
        for (peer, load, conns), total in zip(legs, totals, strict=True):
            path = "/post" if load == "post4k" else "/1k.bin"
            pids = process_tree(peer.proc.pid)
            before = cpu_seconds(pids)
            out = wrk(f"http://127.0.0.1:{peer.port}{path}", conns=conns, seconds=length,
                      threads=1, script=lua if path == "/post" else None)
            total["cpu"] += cpu_seconds(pids) - before
            total["errors"] += out.get("errors") or 0
            total["non2xx"] += out.get("non2xx") or 0
            for kind, n in (out.get("error_kinds") or {}).items():
                total["error_kinds"][kind] = total["error_kinds"].get(kind, 0) + n
            if out.get("rps") and out.get("requests"):
                total["requests"] += out["requests"]
                total["time"] += out["requests"] / out["rps"]
            else:
                total["raw"] = out.get("raw", "")
    results = []
    for (peer, load, _), total in zip(legs, totals, strict=True):
        ok = total["requests"] and "raw" not in total
        out = {"rps": total["requests"] / total["time"] if ok else None,
               "requests": total["requests"], "errors": total["errors"],
               "non2xx": total["non2xx"], "error_kinds": total["error_kinds"],
               "raw": total.get("raw", "")}
        results.append((peer, load, out, total["cpu"]))
    return results


# RSS after a 5,000-connection crowd is back within this of its level before (issue 18).
CROWD_TARGET_MIB = 20.0


def _settle(until: Callable[[], bool], limit: float) -> float:
    """Wait (at most ``limit`` seconds) until ``until()``; the seconds waited."""
    start = time.monotonic()
    while not until() and time.monotonic() - start < limit:
        time.sleep(0.1)
    return time.monotonic() - start


def _lowest_rss(pid: int, seconds: float) -> int:
    """The lowest RSS over ``seconds``: the gateway gives memory back about a second after
    the connections go (gateway/memory.py), so one early reading would miss it."""
    low = rss_kib(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.2)
        low = min(low, rss_kib(pid))
    return low


def crowd_memory(procs: Procs, tmp: Path, origin_port: int, conns: int, *, seconds: int,
                 wrk: Callable[..., dict[str, Any]], log: Callable[[str], None]
                 ) -> dict[str, Any]:
    """A fresh one-worker gateway's RSS before a ``conns``-connection ``GET /1k.bin`` load,
    at its peak (VmHWM), once the clients have closed, and once the upstream connections
    the crowd left idle in the pool have expired (up to 45 s; skipped when the pool
    already let them go). Readings in KiB."""
    port = free_port()
    cfg = tmp / "gateway-crowd.yaml"
    cfg.write_text(gateway_config_yaml(
        port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"}]))
    proc = _start(procs, "gateway-crowd", port, gateway_argv(cfg))
    pid = proc.pid
    url = f"http://127.0.0.1:{port}/1k.bin"
    try:
        wrk(url, conns=64, seconds=1, threads=1)  # lazy imports, the pool's first connections
        time.sleep(0.5)
        base_fds = fd_count(pid)
        out: dict[str, Any] = {"connections": conns, "before_kib": rss_kib(pid)}
        reset_hwm(pid)
        log(f"memory: {conns} connections through a fresh gateway")
        result = wrk(url, conns=conns, seconds=seconds, threads=1)
        out["requests"] = result.get("requests", 0)
        out["errors"] = result.get("errors", 0)
        out["peak_kib"] = max(hwm_kib(pid), rss_kib(pid))
        # wrk has exited: its connections close as the gateway reads their ends.
        _settle(lambda: fd_count(pid) <= base_fds + conns // 20, 10.0)
        out["clients_closed_kib"] = _lowest_rss(pid, 5.0)
        out["upstream_fds_after_clients"] = max(0, fd_count(pid) - base_fds)
        if out["upstream_fds_after_clients"] > 64:
            waited = _settle(lambda: fd_count(pid) <= base_fds + 64, 45.0)
            out["idle_expired_after_s"] = round(waited, 1)
            out["idle_expired_kib"] = _lowest_rss(pid, 5.0)
    finally:
        procs.stop(proc)
    return out


def memory_lines(mem: dict[str, Any]) -> list[str]:
    if not mem:
        return []
    before = mem["before_kib"]

    def row(label: str, key: str) -> str:
        kib = mem[key]
        grew = (kib - before) / 1024
        judged = ""
        if key not in ("peak_kib", "before_kib"):
            judged = " met" if grew <= CROWD_TARGET_MIB else " MISSED"
        return f"| {label} | {kib / 1024:,.1f} | {grew:+,.1f}{judged} |"

    lines = [f"gateway RSS around a {mem['connections']:,}-connection crowd (one worker, "
             f"{mem['requests']:,} requests; target: back within {CROWD_TARGET_MIB:.0f} MiB "
             "of before):",
             "| when | RSS MiB | vs before MiB |", "|---|---:|---:|",
             row("before", "before_kib"), row("peak", "peak_kib"),
             row("clients closed", "clients_closed_kib")]
    if "idle_expired_kib" in mem:
        lines.append(row(f"pool idle expired ({mem['idle_expired_after_s']} s later)",
                         "idle_expired_kib"))
    else:
        lines.append(f"(upstream pool: {mem['upstream_fds_after_clients']} connections left "
                     "idle after the crowd, nothing to wait for)")
    return lines


def versions() -> dict[str, str]:
    out = {}
    for name, argv in (("haproxy", [HAPROXY, "-v"]), ("caddy", [CADDY, "version"])):
        try:
            text = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            text = "missing"
        out[name] = (text.split() or ["?"])[2 if name == "haproxy" else 0]
    return out


def _f(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def table(res: PeerRun) -> str:
    keys = [f"{p}/{m}" for m in ("on", "off") for p in PROXIES] + ["gateway/json"]
    crowd = (f" ({res.seconds * res.crowd_factor} s at 1,000 connections and more)"
             if res.crowd_factor > 1 else "")
    lines = [f"peers: {res.rounds} round(s) of {res.seconds} s per leg{crowd}, wrk -t1, "
             "one worker each",
             "| load | " + " | ".join(keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for load, conns in res.loads:
        label = f"{load} ({conns} conns)"
        lines.append(f"| {label} req/s | " + " | ".join(
            _f(res.median(res.rps, load, k)) for k in keys) + " |")
        lines.append(f"| {label} CPU µs/req | " + " | ".join(
            _f(res.median(res.cpu_us, load, k), 1) for k in keys) + " |")
    lines.append("")
    lines.append("ratios within each round (median over rounds):")
    lines.append("| load | gateway on/off req/s | gateway-json/off req/s | nginx on/off req/s "
                 "| gateway/nginx req/s (off) | gateway/caddy req/s (off) "
                 "| gateway/caddy req/s (on) | gateway CPU/req ÷ its get64 (off) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for load, _ in res.loads:
        growth = res.ratio(res.cpu_us, load, "gateway/off", "gateway/off", "get64")
        lines.append("| " + " | ".join([
            load,
            _f(res.ratio(res.rps, load, "gateway/on", "gateway/off"), 2),
            _f(res.ratio(res.rps, load, "gateway/json", "gateway/off"), 2),
            _f(res.ratio(res.rps, load, "nginx/on", "nginx/off"), 2),
            _f(res.ratio(res.rps, load, "gateway/off", "nginx/off"), 2),
            _f(res.ratio(res.rps, load, "gateway/off", "caddy/off"), 2),
            _f(res.ratio(res.rps, load, "gateway/on", "caddy/on"), 2),
            _f(growth, 2),
        ]) + " |")
    if res.memory:
        lines.append("")
        lines += memory_lines(res.memory)
    if res.notes:
        lines.append("")
        lines += [f"note: {n}" for n in dict.fromkeys(res.notes)]
    return "\n".join(lines)


def to_json(res: PeerRun) -> dict[str, Any]:
    return {"rounds": res.rounds, "seconds": res.seconds, "crowd_factor": res.crowd_factor,
            "loads": res.loads,
            "rps": res.rps, "cpu_us_per_request": res.cpu_us, "notes": res.notes,
            "versions": res.versions, "memory": res.memory}
