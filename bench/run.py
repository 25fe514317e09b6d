"""The benchmark: nginx (the guide's recipe), the textbook aiohttp proxy and the gateway.

One command starts everything on 127.0.0.1 (origin nginx with static files, an upload sink,
the three proxies), drives each in turn with wrk and curl, several rounds alternated, and
prints medians and ratios; the same numbers go to a JSON file with the date and the machine.

    .venv/bin/python bench/run.py                 # full run, ~10 minutes
    .venv/bin/python bench/run.py --quick         # smoke test, under 2 minutes
    .venv/bin/python bench/run.py --rounds 3 --out bench/results/mine.json

Everything started is stopped at exit (each child runs in its own process group).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nginx
import peers
from common import (
    BENCH_DIR,
    PROJECT_DIR,
    Procs,
    cpu_seconds,
    free_port,
    gateway_argv,
    gateway_config_yaml,
    gateway_supports_workers,
    hwm_kib,
    leaf_processes,
    raise_nofile,
    reset_hwm,
    venv_python,
    wait_port,
)

T = TypeVar("T")
WRK = shutil.which("wrk") or "/usr/bin/wrk"
CURL = shutil.which("curl")
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB
NAMES = ("nginx", "textbook", "gateway")
CHAT_PATH = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
# The chat POST may cost this much more gateway CPU than a plain POST of the same body: it is
# sent once per chat session, so this is a bound on waste, not a speed race.
CHAT_CPU_BUDGET_US = 50.0
CEC_TENANT = "202007159031"
CEC_CHANNEL = "202011230001"
CHAT_BODY = json.dumps({
    "thirdUserName": "Tom", "thirdUserId": "bench-user-1", "tenantSpaceId": CEC_TENANT,
    "channelConfigId": CEC_CHANNEL, "locale": "zh", "mapService": "tencent",
    "timestamp": "2026-11-24T08:30:15.123Z",
}, separators=(",", ":"))


@dataclass(frozen=True)
class Plan:
    rounds: int
    wrk_seconds: int
    lat_seconds: int
    big_size: int
    ws_connections: int
    connections: int = 64
    only_signing: bool = False  # --only signing: the chat POST legs alone, for quick iteration
    only_peers: bool = False  # --only peers: the comparison with HAProxy, Caddy... (peers.py)


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Bench:
    plan: Plan
    tmp: Path
    procs: Procs
    targets: dict[str, Target] = field(default_factory=dict)
    extra: dict[str, Target] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    na: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, scenario: str, target: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(scenario, {}).setdefault(target, []).append(value)

    def median(self, scenario: str, target: str) -> float | None:
        values = self.samples.get(scenario, {}).get(target)
        return statistics.median(values) if values else None

    def paired(self, scenario: str, a: str, b: str) -> float | None:
        """The median of the per-round ratios a/b.

        The legs of one round run within seconds of each other; across a run this machine
        drifts by up to 2x (CPU per request and req/s of every leg alike), which a ratio of
        medians taken over different rounds mixes into the comparison.
        """
        xs = self.samples.get(scenario, {}).get(a) or []
        ys = self.samples.get(scenario, {}).get(b) or []
        if not xs or len(xs) != len(ys) or not all(ys):
            return None
        return statistics.median(x / y for x, y in zip(xs, ys, strict=True))

    def paired_difference(self, scenario: str, a: str, b: str) -> float | None:
        """The median of the per-round differences a - b (see ``paired``)."""
        diffs = self.round_differences(scenario, a, b)
        return statistics.median(diffs) if diffs else None

    def round_differences(self, scenario: str, a: str, b: str) -> list[float]:
        """a - b round by round (empty unless both legs ran every round)."""
        xs = self.samples.get(scenario, {}).get(a) or []
        ys = self.samples.get(scenario, {}).get(b) or []
        if len(xs) != len(ys):
            return []
        return [x - y for x, y in zip(xs, ys, strict=True)]


# ------------------------------------------------------------------ load generators

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk(url: str, *, conns: int, seconds: int, threads: int = 2, latency: bool = False,
        script: Path | None = None) -> dict[str, Any]:
    threads = min(threads, conns)
    argv = [WRK, f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s"]
    if latency:
        argv.append("--latency")
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    result: dict[str, Any] = {"rps": None, "errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        result["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        result["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        result["errors"] = sum(int(g) for g in m.groups())
        result["error_kinds"] = dict(zip(("connect", "read", "write", "timeout"),
                                         (int(g) for g in m.groups()), strict=True))
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out,
                                       flags=re.M):
        result[f"p{pct}_ms"] = float(value) * _UNIT_MS[unit]
    if result["rps"] is None:
        result["raw"] = (out + done.stderr)[-500:]
    return result


def curl_transfer(url: str, *, upload: Path | None, expect_size: int, tmp: Path
                  ) -> dict[str, Any]:
    """Download ``url`` (or POST the file ``upload`` to it) with curl; MB/s from curl's clock."""
    assert CURL is not None
    body = tmp / "curl-body"
    argv = [CURL, "-sS", "--max-time", "300", "-o", str(body)]
    if upload is not None:
        argv += ["-X", "POST", "-T", str(upload), "-H", "Expect:",
                 "-H", "Content-Type: application/octet-stream",
                 "-w", "%{http_code} %{size_upload} %{speed_upload}"]
    else:
        argv += ["-w", "%{http_code} %{size_download} %{speed_download}"]
    argv.append(url)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=330)
    try:
        code, size, speed = proc.stdout.split()
    except ValueError:
        return {"ok": False, "error": (proc.stderr or proc.stdout).strip()[:200]}
    ok = code == "200" and int(size) == expect_size
    if upload is not None and ok:
        # the sink answers with the number of body bytes it received
        ok = body.read_text().strip() == str(expect_size)
    body.unlink(missing_ok=True)
    return {"ok": ok, "status": int(code), "bytes": int(size),
            "mb_s": float(speed) / 1e6, "error": "" if ok else proc.stderr.strip()[:200]}


def post_probe(port: int, path: str, body: str) -> tuple[int, str, str, str]:
    """One POST; returns (status, the origin's X-Seen-Length, first bytes of the answer,
    the ``name=value`` of a cookie the gateway set, or "")."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body.encode(),
                     headers={"Content-Type": "application/json;charset=UTF-8"})
        resp = conn.getresponse()
        data = resp.read(300)
        cookie = (resp.getheader("Set-Cookie") or "").split(";", 1)[0]
        return (resp.status, resp.getheader("X-Seen-Length") or "",
                data.decode("utf-8", "replace"), cookie)
    except OSError as exc:
        return 0, "", str(exc), ""
    finally:
        conn.close()


# ------------------------------------------------------------------ setting up


def make_files(tmp: Path, big: int) -> Path:
    www = tmp / "www"
    www.mkdir()
    (www / "1k.bin").write_bytes(os.urandom(1 * KIB))
    (www / "100k.bin").write_bytes(os.urandom(100 * KIB))
    with open(www / "big.bin", "wb") as f:
        f.truncate(big)  # sparse: reads as zeros, costs no disk
    for path in (tmp, www, *www.iterdir()):
        path.chmod(0o755)
    return www


def start_target(bench: Bench, name: str, port: int, argv: list[str],
                 env: dict[str, str] | None = None) -> Target:
    proc = bench.procs.start(name, argv, env=env, cwd=PROJECT_DIR)
    if not wait_port(port, timeout=30, proc=proc):
        raise RuntimeError(f"{name} did not start listening on {port}:\n"
                           + bench.procs.log_tail(name))
    return Target(name, port, proc)


def cec_secret() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(43))


def start_origins(bench: Bench) -> tuple[int, int]:
    """The origin (nginx) and the upload sink: (origin port, sink port)."""
    tmp, plan = bench.tmp, bench.plan
    www = make_files(tmp, plan.big_size)
    sink_port, origin_port = free_port(), free_port()
    sink = start_target(bench, "sink", sink_port,
                        [venv_python(), str(BENCH_DIR / "sink.py"), "--port", str(sink_port)])
    origin = start_target(bench, "origin", origin_port, nginx.prepare(
        tmp / "origin", nginx.origin_conf(tmp / "origin", origin_port, www)))
    bench.extra["sink"], bench.extra["origin"] = sink, origin
    return origin_port, sink_port


def start_all(bench: Bench) -> None:
    tmp = bench.tmp
    py = venv_python()
    origin_port, sink_port = start_origins(bench)

    port = free_port()
    bench.targets["nginx"] = start_target(bench, "nginx", port, nginx.prepare(
        tmp / "recipe", nginx.recipe_conf(tmp / "recipe", port, origin_port, sink_port)))

    port = free_port()
    bench.targets["textbook"] = start_target(bench, "textbook", port, [
        py, str(BENCH_DIR / "textbook_proxy.py"), "--port", str(port),
        "--route", f"/upload=http://127.0.0.1:{sink_port}/upload",
        "--route", f"/=http://127.0.0.1:{origin_port}/",
    ])

    routes: list[dict[str, object]] = [
        {"prefix": "/upload", "upstream": f"http://127.0.0.1:{sink_port}/upload"},
        {"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"},
    ]
    port = free_port()
    config = tmp / "gateway.yaml"
    config.write_text(gateway_config_yaml(port, routes))
    bench.targets["gateway"] = start_target(bench, "gateway", port, gateway_argv(config))

    if gateway_supports_workers():
        port = free_port()
        config = tmp / "gateway-2w.yaml"
        config.write_text(gateway_config_yaml(port, routes, workers=2))
        bench.extra["gateway-2w"] = start_target(bench, "gateway-2w", port,
                                                 gateway_argv(config, workers=2))
    else:
        bench.na["workers"] = "`gateway run --help` has no --workers yet"

    start_cec_gateway(bench, origin_port)


def start_cec_gateway(bench: Bench, origin_port: int) -> None:
    """A gateway with a ``cec:`` section: the chat script POST is signed and injected.

    ``/plain/...`` maps to the same upstream path without injection, so both legs of the
    comparison run in the same process, to the same origin, with the same body.
    """
    routes: list[dict[str, object]] = [
        {"prefix": "/plain/", "upstream": f"http://127.0.0.1:{origin_port}/service-cloud/"},
        {"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"},
    ]
    port = free_port()
    cec = (
        "cec:\n"
        f"  tenant_space_id: \"{CEC_TENANT}\"\n"
        f"  channel_config_id: \"{CEC_CHANNEL}\"\n"
        "  auth:\n"
        "    mode: authorization\n"
        "    secret_key: ${CEC_SECRET_KEY}\n"
    )
    config = bench.tmp / "gateway-cec.yaml"
    config.write_text(gateway_config_yaml(port, routes, extra=cec))
    env = dict(os.environ, CEC_SECRET_KEY=cec_secret())
    check = subprocess.run([venv_python(), "-m", "gateway", "check", "-c", str(config)],
                           capture_output=True, text=True, env=env, cwd=PROJECT_DIR, timeout=60)
    if check.returncode != 0:
        reason = (check.stderr or check.stdout).strip().splitlines()
        bench.na["signing"] = "the gateway does not accept the cec: config yet: " + (
            " / ".join(reason[:3]) if reason else f"exit {check.returncode}")
        return
    try:
        bench.extra["gateway-cec"] = start_target(bench, "gateway-cec", port,
                                                  gateway_argv(config), env=env)
    except RuntimeError as exc:
        bench.na["signing"] = f"the gateway with cec: did not start: {exc}"
        return
    query = "?&t=1764000000000"
    inject = post_probe(port, CHAT_PATH + query, CHAT_BODY)
    plain = post_probe(port, "/plain" + CHAT_PATH[len("/service-cloud"):] + query, CHAT_BODY)
    sent = str(len(CHAT_BODY.encode()))
    bench.info["signing_probe"] = {
        "sent_length": int(sent),
        "inject": {"status": inject[0], "origin_saw_length": inject[1]},
        "plain": {"status": plain[0], "origin_saw_length": plain[1]},
    }
    if not 200 <= inject[0] < 300 or not 200 <= plain[0] < 300:
        bench.na["signing"] = (f"probe failed: inject path answered {inject[0]} "
                               f"({inject[2][:80]!r}), plain path {plain[0]}")
        return
    injected = inject[1] != sent
    bench.info["signing_injected"] = injected
    # A browser sends back the guest cookie it got on its first visit; the steady-state legs
    # do the same (both of them, so that the requests differ only in their path).
    bench.info["signing_guest_cookie"] = bool(inject[3])
    post_lua = ('wrk.method = "POST"\n'
                f"wrk.body = [[{CHAT_BODY}]]\n"
                'wrk.headers["Content-Type"] = "application/json;charset=UTF-8"\n')
    (bench.tmp / "post-first.lua").write_text(post_lua)
    if inject[3]:
        post_lua += f'wrk.headers["Cookie"] = "{inject[3]}"\n'
    (bench.tmp / "post.lua").write_text(post_lua)
    if not injected:
        bench.notes.append("signing: the body reached the origin unchanged (no rewriter wired "
                           "for the chat script yet); the inject leg measures the plain path")


# ------------------------------------------------------------------ scenarios


def rotated(names: list[T], r: int) -> list[T]:
    k = r % len(names)
    return names[k:] + names[:k]


def _record_wrk(bench: Bench, scenario: str, name: str, res: dict[str, Any], key: str = "rps"
                ) -> None:
    if res.get("errors") or res.get("non2xx"):
        bench.notes.append(f"{scenario}/{name}: {res['errors']} socket errors, "
                           f"{res['non2xx']} non-2xx of {res['requests']} requests")
    if res.get("rps") is None:
        bench.notes.append(f"{scenario}/{name}: wrk gave no result: {res.get('raw', '')!r}")
    bench.add(scenario, name, res.get(key))


def warm_up(bench: Bench) -> None:
    for target in (*bench.targets.values(), *bench.extra.values()):
        if target.name in ("sink", "origin"):
            continue
        wrk(target.base + "/1k.bin", conns=bench.plan.connections, seconds=1)
        wrk(target.base + "/100k.bin", conns=16, seconds=1)


def one_round(bench: Bench, r: int) -> None:
    plan = bench.plan
    if not plan.only_signing:
        other_scenarios(bench, r)
    signing_round(bench, r)


def other_scenarios(bench: Bench, r: int) -> None:
    plan = bench.plan
    order = rotated(list(NAMES), r)
    log(f"round {r + 1}/{plan.rounds}: 1 KiB GET at {plan.connections} connections")
    for name in order:
        t = bench.targets[name]
        _record_wrk(bench, "get_1k_c64_rps", name,
                    wrk(t.base + "/1k.bin", conns=plan.connections, seconds=plan.wrk_seconds))
        if name == "gateway" and "gateway-2w" in bench.extra:
            res = wrk(bench.extra["gateway-2w"].base + "/1k.bin", conns=plan.connections,
                      seconds=plan.wrk_seconds)
            _record_wrk(bench, "workers_1k_c64_rps", "gateway-2w", res)
            bench.add("workers_1k_c64_rps", "gateway-1w", bench.samples["get_1k_c64_rps"]
                      .get("gateway", [None])[-1])

    log(f"round {r + 1}/{plan.rounds}: 1 KiB GET latency at 1 connection")
    for name in order:
        res = wrk(bench.targets[name].base + "/1k.bin", conns=1, threads=1,
                  seconds=plan.lat_seconds, latency=True)
        _record_wrk(bench, "get_1k_c1_p50_ms", name, res, "p50_ms")
        bench.add("get_1k_c1_p99_ms", name, res.get("p99_ms"))
        bench.add("get_1k_c1_rps", name, res.get("rps"))

    log(f"round {r + 1}/{plan.rounds}: 100 KiB GET at {plan.connections} connections")
    for name in order:
        res = wrk(bench.targets[name].base + "/100k.bin", conns=plan.connections,
                  seconds=plan.wrk_seconds)
        rps = res.get("rps")
        res["mb_s"] = rps * 100 * KIB / 1e6 if rps is not None else None
        _record_wrk(bench, "get_100k_c64_mb_s", name, res, "mb_s")

    if CURL is None:
        bench.na["streaming"] = "curl is not installed"
    else:
        size = plan.big_size
        log(f"round {r + 1}/{plan.rounds}: {size // MIB} MiB download and upload")
        for name in order:
            t = bench.targets[name]
            for leg, url, upload in (
                ("download", t.base + "/big.bin", None),
                ("upload", t.base + "/upload", bench.tmp / "www" / "big.bin"),
            ):
                pids = leaf_processes(t.proc.pid)
                reset = all(reset_hwm(p) for p in pids)
                res = curl_transfer(url, upload=upload, expect_size=size, tmp=bench.tmp)
                peak = max(hwm_kib(p) for p in pids) / KIB
                if not res["ok"]:
                    bench.notes.append(f"{leg}/{name}: transfer failed: {res}")
                    continue
                bench.add(f"{leg}_mb_s", name, res["mb_s"])
                bench.add(f"{leg}_peak_rss_mib", name, peak)
                if not reset:
                    bench.info["rss_note"] = "VmHWM could not be reset: peak since start"


def signing_round(bench: Bench, r: int) -> None:
    plan = bench.plan
    cec = bench.extra.get("gateway-cec")
    if cec is not None and "signing" not in bench.na:
        log(f"round {r + 1}/{plan.rounds}: signing path (POST newThirdPartyClient.js)")
        query = "?&t=1764000000000"
        steady, first = bench.tmp / "post.lua", bench.tmp / "post-first.lua"
        legs = [("inject", CHAT_PATH + query, steady),
                ("plain", "/plain" + CHAT_PATH[len("/service-cloud"):] + query, steady),
                ("inject-first-visit", CHAT_PATH + query, first)]
        pids = leaf_processes(cec.proc.pid)
        for leg, path, script in rotated(legs, r):
            before = cpu_seconds(pids)
            res = wrk(cec.base + path, conns=plan.connections, seconds=plan.wrk_seconds,
                      script=script)
            _record_wrk(bench, "signing_post_rps", leg, res)
            # The gateway's own CPU time per request: unlike req/s, it does not depend on how
            # the scheduler shares the two cores with wrk and the origin.
            if res.get("requests"):
                bench.add("signing_post_cpu_us", leg,
                          (cpu_seconds(pids) - before) / res["requests"] * 1e6)


def _ws_idle(bench: Bench, workers: int) -> dict[str, Any] | None:
    proc = subprocess.run([venv_python(), str(BENCH_DIR / "ws_idle.py"),
                           "-n", str(bench.plan.ws_connections), "--workers", str(workers)],
                          capture_output=True, text=True, timeout=600, cwd=PROJECT_DIR)
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        bench.na["websocket"] = "ws_idle.py failed: " + proc.stderr.strip()[-300:]
        return None
    return result


def run_ws(bench: Bench) -> None:
    log(f"idle WebSockets: {bench.plan.ws_connections} through the gateway")
    result = _ws_idle(bench, 1)
    if result is None:
        return
    bench.info["websocket"] = result
    if result.get("per_connection_kib") is not None:
        bench.add("ws_idle_kib_per_conn", "gateway", result["per_connection_kib"])
    if not result.get("capped_by_nofile"):
        return
    bench.notes.append(
        f"websocket: {result['connections']} connections instead of {result['requested']} "
        f"through 1 worker: the RLIMIT_NOFILE hard limit ({result['nofile_limit']}) allows 2 "
        "sockets per proxied connection only up to that many in one process; the 2-worker "
        "row holds them all")
    # The full count through two workers, which share it and the file limit.
    log(f"idle WebSockets: {bench.plan.ws_connections} through 2 gateway workers")
    two = _ws_idle(bench, 2)
    if two is not None:
        bench.info["websocket_2w"] = two
        if two.get("per_connection_kib") is not None:
            bench.add("ws_idle_kib_per_conn", "gateway-2w", two["per_connection_kib"])


# ------------------------------------------------------------------ reporting


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = subprocess.run(
        [venv_python(), "-c",
         "import sys, aiohttp, json\n"
         "try:\n import uvloop; u = uvloop.__version__\n"
         "except ImportError:\n u = None\n"
         "print(json.dumps({'python': sys.version.split()[0], 'aiohttp': aiohttp.__version__,"
         " 'uvloop': u}))"],
        capture_output=True, text=True, timeout=60)
    try:
        info: dict[str, Any] = json.loads(versions.stdout)
    except json.JSONDecodeError:
        info = {}
    wrk_v = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=10)
    info.update({
        "nginx": nginx.version(),
        "wrk": (wrk_v.stdout + wrk_v.stderr).split()[1] if wrk_v.stdout + wrk_v.stderr else "",
        "curl": subprocess.run([CURL, "--version"], capture_output=True, text=True, timeout=10
                               ).stdout.split()[1] if CURL else None,
    })
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "versions": info,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets_check(bench: Bench) -> list[dict[str, Any]]:
    m = bench.median
    out = []

    def add(goal: str, ok: bool | None, detail: str) -> None:
        out.append({"goal": goal, "met": ok, "measured": detail})

    gw, tb, ng = (m("get_1k_c64_rps", n) for n in ("gateway", "textbook", "nginx"))
    r_tb, r_ng = ratio(gw, tb), ratio(gw, ng)
    add("1 KiB c64: gateway >= 2.5x textbook", None if r_tb is None else r_tb >= 2.5,
        f"{r_tb:.2f}x" if r_tb is not None else "n/a")
    add("1 KiB c64: gateway >= 0.25x nginx", None if r_ng is None else r_ng >= 0.25,
        f"{r_ng:.2f}x" if r_ng is not None else "n/a")
    p_gw, p_ng = m("get_1k_c1_p99_ms", "gateway"), m("get_1k_c1_p99_ms", "nginx")
    if p_gw is not None and p_ng is not None:
        add("1 KiB c1: gateway p99 <= nginx p99 + 1 ms", p_gw <= p_ng + 1.0,
            f"{p_gw:.3f} ms vs {p_ng:.3f} ms ({p_gw - p_ng:+.3f})")
    for leg in ("download", "upload"):
        g, n = m(f"{leg}_mb_s", "gateway"), m(f"{leg}_mb_s", "nginx")
        rr = ratio(g, n)
        add(f"{leg}: gateway >= 0.5x nginx MB/s", None if rr is None else rr >= 0.5,
            f"{rr:.2f}x" if rr is not None else "n/a")
        rss = m(f"{leg}_peak_rss_mib", "gateway")
        add(f"{leg}: gateway peak RSS < 64 MiB", None if rss is None else rss < 64,
            f"{rss:.1f} MiB" if rss is not None else "n/a")
    ws = m("ws_idle_kib_per_conn", "gateway")
    add("idle WebSocket < 20 KiB per connection", None if ws is None else ws < 20,
        f"{ws:.1f} KiB" if ws is not None else bench.na.get("websocket", "n/a"))
    extra = bench.paired_difference("signing_post_cpu_us", "inject", "plain")
    goal = f"chat POST: gateway CPU per request <= plain POST + {CHAT_CPU_BUDGET_US:.0f} us"
    if extra is not None:
        rounds = ", ".join(f"{d:+.0f}" for d in
                           bench.round_differences("signing_post_cpu_us", "inject", "plain"))
        add(goal, extra <= CHAT_CPU_BUDGET_US,
            f"{extra:+.1f} us (median of per-round differences {rounds}; plain "
            f"{fmt(m('signing_post_cpu_us', 'plain'), 1)} us)")
    else:
        add(goal, None, bench.na.get("signing", "n/a"))
    return out


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def table(bench: Bench) -> str:
    m = bench.median
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row3(label: str, scenario: str, digits: int, ratios: bool = True) -> None:
        ng, tb, gw = (m(scenario, n) for n in NAMES)
        rows.append((label, fmt(ng, digits), fmt(tb, digits), fmt(gw, digits),
                     fmt(ratio(gw, tb), 2) + "x" if ratios and ratio(gw, tb) else "",
                     fmt(ratio(gw, ng), 2) + "x" if ratios and ratio(gw, ng) else ""))

    size = bench.plan.big_size
    big = f"{size // GIB} GiB" if size >= GIB else f"{size // MIB} MiB"
    row3(f"1 KiB GET, {bench.plan.connections} conns (req/s)", "get_1k_c64_rps", 0)
    row3("1 KiB GET, 1 conn p50 (ms)", "get_1k_c1_p50_ms", 3, ratios=False)
    row3("1 KiB GET, 1 conn p99 (ms)", "get_1k_c1_p99_ms", 3, ratios=False)
    row3(f"100 KiB GET, {bench.plan.connections} conns (MB/s)", "get_100k_c64_mb_s", 0)
    row3(f"{big} download (MB/s)", "download_mb_s", 0)
    row3(f"{big} download peak RSS (MiB)", "download_peak_rss_mib", 1, ratios=False)
    row3(f"{big} upload (MB/s)", "upload_mb_s", 0)
    row3(f"{big} upload peak RSS (MiB)", "upload_peak_rss_mib", 1, ratios=False)
    ws = bench.info.get("websocket", {})
    label = f"idle WebSockets x{ws.get('connections', bench.plan.ws_connections)} (KiB/conn)"
    rows.append((label, "", "", fmt(m("ws_idle_kib_per_conn", "gateway"), 1), "", ""))
    ws2 = bench.info.get("websocket_2w")
    if ws2:
        rows.append((f"idle WebSockets x{ws2.get('connections')}, 2 workers (KiB/conn)", "", "",
                     fmt(m("ws_idle_kib_per_conn", "gateway-2w"), 1), "", ""))
    inj, pl = m("signing_post_rps", "inject"), m("signing_post_rps", "plain")
    if inj is not None:
        rows.append(("signing POST: plain path (req/s)", "", "", fmt(pl), "", ""))
        rows.append(("signing POST: injection (req/s)", "", "", fmt(inj),
                     f"{fmt(ratio(inj, pl), 2)}x of plain", ""))
        rows.append(("signing POST: injection / plain, median of rounds", "", "",
                     fmt(bench.paired("signing_post_rps", "inject", "plain"), 2), "", ""))
        first = m("signing_post_rps", "inject-first-visit")
        rows.append(("signing POST: injection, first visit (req/s)", "", "", fmt(first),
                     f"{fmt(ratio(first, pl), 2)}x of plain", ""))
        cpu = {leg: m("signing_post_cpu_us", leg)
               for leg in ("plain", "inject", "inject-first-visit")}
        if cpu["plain"] is not None:
            rows.append(("signing POST: gateway CPU per request, plain (us)", "", "",
                         fmt(cpu["plain"], 1), "", ""))
            for leg, label in (("inject", "injection"), ("inject-first-visit", "first visit")):
                extra = bench.paired_difference("signing_post_cpu_us", leg, "plain")
                rows.append((f"signing POST: gateway CPU per request, {label} (us)", "", "",
                             fmt(cpu[leg], 1),
                             f"{extra:+.1f} us vs plain, paired" if extra is not None else "",
                             f"budget +{CHAT_CPU_BUDGET_US:.0f} us" if leg == "inject" else ""))
    else:
        rows.append(("signing POST (req/s)", "", "", "n/a", "", ""))
    w1, w2 = m("workers_1k_c64_rps", "gateway-1w"), m("workers_1k_c64_rps", "gateway-2w")
    if w2 is not None:
        rows.append(("gateway 1 KiB, 2 workers (req/s)", "", "", fmt(w2),
                     f"{fmt(ratio(w2, w1), 2)}x of 1 worker", ""))
    else:
        rows.append(("gateway 1 KiB, 2 workers (req/s)", "", "", "n/a", "", ""))

    header = ("scenario (median of rounds)", "nginx", "textbook", "gateway", "gw/textbook",
              "gw/nginx")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                       for i, c in enumerate(r)) for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    checks = targets_check(bench)
    lines.append("")
    lines.append("targets:")
    for c in checks:
        mark = {True: "met", False: "MISSED", None: "n/a"}[c["met"]]
        lines.append(f"  [{mark:>6}] {c['goal']}: {c['measured']}")
    for key, why in bench.na.items():
        lines.append(f"  n/a {key}: {why}")
    if bench.notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(f"  - {n}" for n in dict.fromkeys(bench.notes))
    return "\n".join(lines)


def to_json(bench: Bench, started: float, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario, per_target in bench.samples.items():
        # "best" (the least disturbed round) helps reading a run on a shared machine
        lower_is_better = scenario.endswith(("_ms", "_mib", "_kib_per_conn"))
        results[scenario] = {t: {"median": statistics.median(v),
                                 "best": min(v) if lower_is_better else max(v), "samples": v}
                             for t, v in per_target.items()}
    m = bench.median
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "duration_s": round(time.monotonic() - started, 1),
        "machine": bench.info.get("machine", {}),
        "plan": {"rounds": bench.plan.rounds, "wrk_seconds": bench.plan.wrk_seconds,
                 "latency_seconds": bench.plan.lat_seconds, "big_bytes": bench.plan.big_size,
                 "connections": bench.plan.connections,
                 "websockets_requested": bench.plan.ws_connections,
                 "nginx_workers": 1, "gateway_workers": 1},
        "results": results,
        "ratios": {
            "get_1k_c64_gateway_over_textbook": ratio(m("get_1k_c64_rps", "gateway"),
                                                      m("get_1k_c64_rps", "textbook")),
            "get_1k_c64_gateway_over_nginx": ratio(m("get_1k_c64_rps", "gateway"),
                                                   m("get_1k_c64_rps", "nginx")),
            "signing_inject_over_plain": ratio(m("signing_post_rps", "inject"),
                                               m("signing_post_rps", "plain")),
            "signing_inject_over_plain_paired": bench.paired("signing_post_rps", "inject",
                                                             "plain"),
            "signing_first_visit_over_plain_paired": bench.paired(
                "signing_post_rps", "inject-first-visit", "plain"),
            "signing_first_visit_over_plain": ratio(m("signing_post_rps", "inject-first-visit"),
                                                    m("signing_post_rps", "plain")),
            "signing_cpu_plain_over_inject": ratio(m("signing_post_cpu_us", "plain"),
                                                   m("signing_post_cpu_us", "inject")),
            "gateway_2w_over_1w": ratio(m("workers_1k_c64_rps", "gateway-2w"),
                                        m("workers_1k_c64_rps", "gateway-1w")),
        },
        "differences": {
            "signing_cpu_inject_minus_plain_us": bench.paired_difference(
                "signing_post_cpu_us", "inject", "plain"),
            "signing_cpu_first_visit_minus_plain_us": bench.paired_difference(
                "signing_post_cpu_us", "inject-first-visit", "plain"),
            "signing_cpu_budget_us": CHAT_CPU_BUDGET_US,
        },
        "targets": targets_check(bench),
        "not_available": bench.na,
        "info": {k: v for k, v in bench.info.items() if k != "machine"},
        "notes": list(dict.fromkeys(bench.notes)),
        "table": table(bench).splitlines(),
    }


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 round, 2 s loads, 64 MiB transfers, 1,000 WebSockets")
    parser.add_argument("--rounds", type=int, help="rounds of every scenario (default 5; 1 quick)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/<date>.json,"
                                                 " or bench/results/quick.json with --quick)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    parser.add_argument("--only", choices=("signing", "peers"),
                        help="signing: only the chat POST legs (plain, injection, first visit); "
                             "peers: only the comparison with HAProxy, Caddy, nginx and the "
                             "textbook proxy, access logs on and off (bench/peers.py)")
    parser.add_argument("--peers", default=",".join(peers.PROXIES),
                        help="with the peers comparison: which proxies (comma-separated)")
    parser.add_argument("--loads", default=",".join(peers.LOAD_NAMES),
                        help="with the peers comparison: which loads (comma-separated)")
    parser.add_argument("--crowd-factor", type=int, default=3,
                        help="peers: legs at 1,000 connections and more last this many times "
                             "longer, to measure kept-alive connections rather than their "
                             "setup (default 3; 1: the same length as the others)")
    parser.add_argument("--seconds", type=int,
                        help="seconds per wrk leg (default 5; 2 with --quick)")
    args = parser.parse_args()
    if not Path(WRK).exists():
        sys.stderr.write("wrk is required (/usr/bin/wrk)\n")
        return 2
    if args.quick:
        plan = Plan(rounds=args.rounds or 1, wrk_seconds=2, lat_seconds=2, big_size=64 * MIB,
                    ws_connections=1000)
    else:
        plan = Plan(rounds=args.rounds or 5, wrk_seconds=5, lat_seconds=5, big_size=GIB,
                    ws_connections=10_000)
    if args.seconds:
        plan = dataclasses.replace(plan, wrk_seconds=args.seconds, lat_seconds=args.seconds)
    if args.only:
        plan = dataclasses.replace(plan, only_signing=args.only == "signing",
                                   only_peers=args.only == "peers")
    out = args.out or BENCH_DIR / "results" / (
        "quick.json" if args.quick or args.only else f"{dt.date.today().isoformat()}.json")
    signal.signal(signal.SIGTERM, _terminate)
    nofile = raise_nofile()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    bench = Bench(plan, tmp, Procs(tmp))
    try:
        bench.info["machine"] = machine_info()
        bench.info["loadavg_at_start"] = os.getloadavg()
        if os.getloadavg()[0] > 0.7:
            bench.notes.append(f"the machine was busy at the start (load average "
                               f"{os.getloadavg()[0]:.2f}): numbers are noisier than usual")
        bench.info["nofile"] = nofile
        if plan.only_peers:
            origin_port, sink_port = start_origins(bench)
        else:
            log(f"starting origin, sink, nginx, textbook proxy and gateway in {tmp}")
            start_all(bench)
            origin_port, sink_port = bench.extra["origin"].port, bench.extra["sink"].port
            if not plan.only_signing:
                warm_up(bench)
            for r in range(plan.rounds):
                one_round(bench, r)
            if not plan.only_signing:
                run_ws(bench)
            # The main proxies stay idle while the peers run.
        if not plan.only_signing:
            peer_run = peers.run(bench.procs, tmp, origin_port, sink_port, rounds=plan.rounds,
                                 seconds=plan.wrk_seconds, wrk=wrk, log=log,
                                 names=tuple(args.peers.split(",")),
                                 loads=tuple(args.loads.split(",")),
                                 crowd_factor=args.crowd_factor)
            bench.info["peers"] = peers.to_json(peer_run)
            bench.info["peers_table"] = peers.table(peer_run).splitlines()
    finally:
        bench.info["loadavg_at_end"] = os.getloadavg()
        bench.procs.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report = to_json(bench, started, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not plan.only_peers:
        sys.stdout.write(table(bench) + "\n")
    if "peers_table" in bench.info:
        sys.stdout.write("\n".join(bench.info["peers_table"]) + "\n")
    log(f"wrote {out} in {report['duration_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
