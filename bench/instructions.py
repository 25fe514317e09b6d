"""CPU work per request, in instructions: a figure that does not move with machine noise.

wrk's requests/s on a 2-core machine depend on how the scheduler shares the cores between
wrk, the origin and the proxy, and move by ±10 % from run to run. This script runs each
proxy under valgrind's callgrind, sends the same requests one at a time over one keep-alive
connection, and counts the instructions the proxy's process executed for them (user space:
syscalls count as one instruction each, so the kernel's share of the work is not in these
figures). Same binary, same inputs: the same count on every run, whatever else the machine
is doing.

    .venv/bin/python bench/instructions.py                 # 2,000 requests per scenario
    .venv/bin/python bench/instructions.py -n 500          # quicker

Scenarios: 1 KiB GET through the textbook aiohttp proxy and through the gateway (also with
every request traced: OpenTelemetry at ratio 1.0, spans exported to a local sink; and with
the access log on, text and ECS JSON, written to a file); the chat script POST through the
gateway, plain and with injection (with the guest cookie a browser sends back after its
first visit); a 4 KiB POST through the gateway, as bench/peers.py's ``post4k`` sends it
(``--only lean``: just it and the gateway's 1 KiB GET). What a connection costs: the 1 KiB
GET on a new client connection each time (textbook and gateway), and through a gateway route
that keeps no upstream connection idle (``max_idle: 0``, so a new upstream connection each
time); minus the keep-alive GET, the work of one connection (``--connections-only``: just
these).
Needs valgrind (Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nginx
from common import PROJECT_DIR, Procs, free_port, gateway_config_yaml, venv_python, wait_port
from run import CEC_CHANNEL, CEC_TENANT, CHAT_BODY, CHAT_PATH, cec_secret, make_files, post_probe

BENCH_DIR = Path(__file__).resolve().parent
PLAIN_PATH = CHAT_PATH.replace("newThirdPartyClient.js", "plain.js")  # not injected


def _total(dump: Path) -> int:
    """The instruction total of one callgrind dump file."""
    text = dump.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if m is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(m.group(1))


def _dumps(out: Path) -> list[Path]:
    # callgrind numbers the dumps it was asked for: out.1, out.2, ...
    return sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:]))


def measure(name: str, argv: list[str], port: int, env: dict[str, str], tmp: Path,
            send: Callable[[http.client.HTTPConnection], None], n: int,
            stderr: Path | None = None) -> float:
    """Instructions per request of ``send``, between two dumps taken around ``n`` calls;
    the process's stderr goes to the file ``stderr`` when given (its log), else nowhere."""
    out = tmp / f"callgrind.{name}"
    log = (os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
           if stderr is not None else subprocess.DEVNULL)
    try:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
            env=env, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=log)
    finally:
        if stderr is not None:
            os.close(log)
    try:
        if not wait_port(port, timeout=300, proc=proc):
            raise RuntimeError(f"{name} did not start under valgrind")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(200):  # warm: pooled upstream connections, caches, lazy imports
            send(conn)
        marks = []
        for _ in range(2):
            before = len(_dumps(out))
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                           capture_output=True, timeout=120)
            deadline = time.monotonic() + 60
            while len(_dumps(out)) == before and time.monotonic() < deadline:
                time.sleep(0.2)
            marks.append(_dumps(out)[-1])
            if len(marks) == 1:
                for _ in range(n):
                    send(conn)
        conn.close()
        # Each dump holds the counts since the previous one.
        return _total(marks[1]) / n
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def access_log(py: str, origin_port: int, extra: str, env: dict[str, str], tmp: Path,
               n: int) -> dict[str, float]:
    """The 1 KiB GET with the access log on, as shipped (level INFO) and as in bench/peers.py:
    text, then ECS JSON, to stderr redirected to a regular file. Less the log-off figure, the
    instructions one access line costs."""
    results: dict[str, float] = {}
    for fmt in ("text", "json"):
        port = free_port()
        config = tmp / f"gateway-log-{fmt}.yaml"
        config.write_text(gateway_config_yaml(
            port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"}],
            extra=extra, access_log=True))
        log = tmp / f"gateway-log-{fmt}.log"
        results[f"gateway: 1 KiB GET, access log {fmt}"] = measure(
            f"gateway-log-{fmt}", [py, "-m", "gateway", "--log-level", "INFO", "--log-format",
                                   fmt, "run", "-c", str(config), "--workers", "1"],
            port, env, tmp, get("/1k.bin"), n, stderr=log)
        lines = sum(1 for line in log.read_text(errors="replace").splitlines()
                    if "gateway.access" in line)
        if lines < n:  # the log must really have been written, or the figure means nothing
            raise RuntimeError(f"{log}: {lines} access lines for at least {n} requests")
    return results


def get(path: str) -> Callable[[http.client.HTTPConnection], None]:
    def send(conn: http.client.HTTPConnection) -> None:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status}")
    return send


def get_new_connection(path: str, port: int) -> Callable[[http.client.HTTPConnection], None]:
    """A GET on a connection of its own: connect, request, read, close (the keep-alive
    connection ``measure`` hands over is left alone)."""
    send = get(path)

    def send_fresh(_conn: http.client.HTTPConnection) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            send(conn)
        finally:
            conn.close()
    return send_fresh


def connection_scenarios(results: dict[str, float], argv: list[str], port: int, tmp: Path,
                         env: dict[str, str], origin_port: int, extra: str, n: int) -> None:
    """What a connection costs: the 1 KiB GET on a new client connection each time, and
    with a new upstream connection each time (a route that keeps none idle). Minus the
    keep-alive GET's figure, the work of one connection (accept or connect, its protocol
    objects and timers, its close)."""
    results["gateway: 1 KiB GET, new client connection each"] = measure(
        "gateway-newclient", argv, port, env, tmp, get_new_connection("/1k.bin", port), n)
    config = tmp / "gateway-noidle.yaml"
    config.write_text(gateway_config_yaml(
        port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/", "max_idle": 0}],
        extra=extra))
    at = argv.index("-c") + 1
    results["gateway: 1 KiB GET, new upstream connection each (max_idle 0)"] = measure(
        "gateway-newupstream", [*argv[:at], str(config), *argv[at + 1:]], port, env, tmp,
        get("/1k.bin"), n)


def post(path: str, cookie: str) -> Callable[[http.client.HTTPConnection], None]:
    headers = {"Content-Type": "application/json;charset=UTF-8", "Cookie": cookie}
    body = CHAT_BODY.encode()

    def send(conn: http.client.HTTPConnection) -> None:
        conn.request("POST", path + "?&t=1764000000000", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: {resp.status}")
    return send


def post_4k(path: str) -> Callable[[http.client.HTTPConnection], None]:
    """A 4 KiB body POSTed as wrk sends bench/peers.py's ``post4k``: head and body in one
    write (http.client would send them in two, so the body would arrive on its own)."""
    body = b"x" * 4096
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: application/octet-stream\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def send(conn: http.client.HTTPConnection) -> None:
        if conn.sock is None:
            conn.connect()
        assert conn.sock is not None
        conn.sock.sendall(request)
        resp = http.client.HTTPResponse(conn.sock, method="POST")
        resp.begin()
        resp.read()
        if resp.status != 200 or resp.will_close:
            raise RuntimeError(f"POST {path}: {resp.status}")
    return send


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="requests measured per scenario")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--connections-only", action="store_true",
                        help="only the keep-alive GET and what a new connection costs")
    parser.add_argument("--only", choices=("get", "post", "lean"),
                        help="only the GET scenarios (with the 4 KiB POST), only the chat "
                             "POST ones, or only the gateway's keep-alive GET and 4 KiB POST")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.stderr.write("valgrind is not installed (apt-get install valgrind)\n")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gwinstr-"))
    procs = Procs(tmp)
    py = venv_python()
    # Same hash seed in every process: dict layouts, and so the counts, repeat exactly.
    env = dict(os.environ, PYTHONHASHSEED="0", CEC_SECRET_KEY=cec_secret())
    try:
        www = make_files(tmp, 1024)
        origin_port = free_port()
        origin = procs.start("origin", nginx.prepare(
            tmp / "origin", nginx.origin_conf(tmp / "origin", origin_port, www)))
        if not wait_port(origin_port, proc=origin):
            raise RuntimeError(procs.log_tail("origin"))
        results: dict[str, float] = {}

        port = free_port()
        if args.only not in ("post", "lean"):
            textbook = [py, str(BENCH_DIR / "textbook_proxy.py"), "--port", str(port),
                        "--route", f"/=http://127.0.0.1:{origin_port}/"]
            results["textbook: 1 KiB GET"] = measure("textbook", textbook, port, env, tmp,
                                                     get("/1k.bin"), args.n)
            results["textbook: 1 KiB GET, new client connection each"] = measure(
                "textbook-newclient", textbook, port, env, tmp,
                get_new_connection("/1k.bin", port), args.n)

        cec = (f"cec:\n  tenant_space_id: \"{CEC_TENANT}\"\n"
               f"  channel_config_id: \"{CEC_CHANNEL}\"\n"
               "  auth:\n    mode: authorization\n    secret_key: ${CEC_SECRET_KEY}\n")
        port = free_port()
        config = tmp / "gateway.yaml"
        config.write_text(gateway_config_yaml(
            port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"}], extra=cec))
        argv = [py, "-m", "gateway", "--log-level", "WARNING", "run", "-c", str(config),
                "--workers", "1"]
        if args.only != "post":
            results["gateway: 1 KiB GET"] = measure("gateway-get", argv, port, env, tmp,
                                                    get("/1k.bin"), args.n)
            results["gateway: 4 KiB POST"] = measure("gateway-post4k", argv, port, env, tmp,
                                                     post_4k("/post"), args.n)
            if args.only == "lean":
                return report(results, args.n, args.json)
            connection_scenarios(results, argv, port, tmp, env, origin_port, cec, args.n)
            if args.connections_only:
                return report(results, args.n, args.json)
            # The same with every request traced (ratio 1.0), spans exported over OTLP/HTTP
            # to a sink that reads and acknowledges them, with the SDK's default batching;
            # the exporting thread's work counts.
            sink_port = free_port()
            sink = procs.start("otlp-sink", [py, str(BENCH_DIR / "sink.py"), "--port",
                                             str(sink_port)], env=env, cwd=PROJECT_DIR)
            if not wait_port(sink_port, proc=sink):
                raise RuntimeError(procs.log_tail("otlp-sink"))
            traced = tmp / "gateway-traced.yaml"
            traced.write_text(gateway_config_yaml(
                port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"}],
                extra=cec + f"tracing: {{endpoint: 'http://127.0.0.1:{sink_port}',"
                            " sampler_ratio: 1.0}\n"))
            results["gateway: 1 KiB GET, traced (ratio 1.0)"] = measure(
                "gateway-traced", [*argv[:argv.index(str(config))], str(traced),
                                   *argv[argv.index(str(config)) + 1:]],
                port, env, tmp, get("/1k.bin"), args.n)
            procs.stop(sink)
            results.update(access_log(py, origin_port, cec, env, tmp, args.n))
        if args.only == "get":
            return report(results, args.n, args.json)

        # The guest cookie comes from a gateway started for that purpose: same key (it is
        # derived from the secret), so every gateway below accepts it.
        probe = procs.start("probe", [py, "-m", "gateway", "--log-level", "WARNING", "run",
                                      "-c", str(config), "--workers", "1"], env=env,
                            cwd=PROJECT_DIR)
        if not wait_port(port, proc=probe):
            raise RuntimeError(procs.log_tail("probe"))
        cookie = post_probe(port, CHAT_PATH, CHAT_BODY)[3]
        procs.stop(probe)
        for label, path in (("plain", PLAIN_PATH), ("injection", CHAT_PATH)):
            results[f"gateway: chat POST, {label}"] = measure(
                f"gateway-{label}", argv, port, env, tmp, post(path, cookie), args.n)
    finally:
        procs.stop_all()
    return report(results, args.n, args.json)


def report(results: dict[str, float], n: int, json_path: Path | None) -> int:
    width = max(len(k) for k in results)
    print(f"\ninstructions per request (user space, callgrind, {n} requests each)")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value:>10,.0f}")
    ratios: dict[str, float] = {}
    tb, gw = results.get("textbook: 1 KiB GET"), results.get("gateway: 1 KiB GET")
    post4k = results.get("gateway: 4 KiB POST")
    if gw and post4k:
        ratios["post4k_over_gateway_get"] = post4k / gw
        print(f"  gateway, 4 KiB POST / 1 KiB GET: {post4k / gw:.2f}x the work")
    if tb and gw:
        ratios["textbook_over_gateway_get"] = tb / gw
        print(f"  textbook / gateway, 1 KiB GET: {tb / gw:.2f}x the work")
    for fmt in ("text", "json"):
        logged = results.get(f"gateway: 1 KiB GET, access log {fmt}")
        if gw and logged:
            ratios[f"access_log_{fmt}_over_gateway_get"] = logged / gw
            print(f"  access log {fmt}: {logged - gw:,.0f} instructions a line "
                  f"({logged / gw:.2f}x the work)")
    traced = results.get("gateway: 1 KiB GET, traced (ratio 1.0)")
    if gw and traced:
        ratios["traced_over_gateway_get"] = traced / gw
        print(f"  traced / untraced, 1 KiB GET: {traced / gw:.2f}x the work")
    for what, base, key in (
            ("gateway, one client connection", gw,
             "gateway: 1 KiB GET, new client connection each"),
            ("gateway, one upstream connection", gw,
             "gateway: 1 KiB GET, new upstream connection each (max_idle 0)"),
            ("textbook, one client connection", tb,
             "textbook: 1 KiB GET, new client connection each")):
        fresh = results.get(key)
        if base and fresh:
            ratios[what.replace(",", "").replace(" ", "_") + "_instructions"] = fresh - base
            print(f"  {what}: {fresh - base:,.0f} instructions")
    plain = results.get("gateway: chat POST, plain")
    inj = results.get("gateway: chat POST, injection")
    if plain and inj:
        ratios["plain_over_injection"] = plain / inj
        print(f"  plain / injection, chat POST: {plain / inj:.2f} (the injection path does "
              f"{inj / plain - 1:.0%} more)")
    if json_path is not None:
        json_path.write_text(json.dumps({"n": n, "instructions_per_request": results,
                                         **ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
