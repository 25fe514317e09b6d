"""Where does the gateway spend its time? py-spy on one worker under a wrk load.

Starts an origin nginx and a 1-worker gateway, runs wrk against a path for a few seconds
while ``py-spy record`` samples the worker, and prints the functions with the most samples
(self time, and inclusive time). Needs py-spy (``pip install py-spy`` into the venv) and
permission to trace the gateway (root, or ptrace allowed for your user).

    .venv/bin/python bench/profile.py                      # 1 KiB GET at 64 connections
    .venv/bin/python bench/profile.py --path /100k.bin --seconds 10 --flame /tmp/gw.svg
    .venv/bin/python bench/profile.py --signing       # POST newThirdPartyClient.js, injected
    .venv/bin/python bench/profile.py --signing --first-visit   # ... with no guest cookie
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nginx
from common import (
    PROJECT_DIR,
    Procs,
    free_port,
    gateway_argv,
    gateway_config_yaml,
    leaf_processes,
    venv_python,
    wait_port,
)


def py_spy() -> str | None:
    here = Path(venv_python()).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _function(frame: str) -> str:
    """``name (file.py:123)`` -> ``name (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(raw: Path, top: int) -> str:
    """Top frames by self samples and by inclusive samples from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    own_fn: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        own_fn[_function(frames[-1])] += count
        for frame in set(frames):
            incl[frame] += count
    lines = [f"{total} samples", "", "self time by function (a C call such as a socket send "
             "counts against the line that makes it):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own_fn.most_common(top)]
    lines += ["", "self time by line:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/1k.bin", help="/1k.bin or /100k.bin")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--access-log", choices=("text", "json"),
                        help="with the access log on, in this format (default: off)")
    parser.add_argument("--flame", type=Path, help="also write a flame graph SVG here")
    parser.add_argument("--signing", action="store_true",
                        help="configure cec: and POST the chat script JSON (the injection path)")
    parser.add_argument("--plain", action="store_true",
                        help="with --signing: the same POST to a path without injection")
    parser.add_argument("--first-visit", action="store_true",
                        help="with --signing: send no guest cookie (a new guest per request)")
    args = parser.parse_args()
    spy = py_spy()
    if spy is None:
        sys.stderr.write("py-spy is not installed (pip install py-spy into the venv)\n")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gwprof-"))
    tmp.chmod(0o755)
    procs = Procs(tmp)
    try:
        www = tmp / "www"
        www.mkdir(mode=0o755)
        (www / "1k.bin").write_bytes(os.urandom(1024))
        (www / "100k.bin").write_bytes(os.urandom(100 * 1024))
        for f in www.iterdir():
            f.chmod(0o644)
        origin_port, port = free_port(), free_port()
        origin = procs.start("origin", nginx.prepare(
            tmp / "origin", nginx.origin_conf(tmp / "origin", origin_port, www)))
        if not wait_port(origin_port, proc=origin):
            raise RuntimeError(procs.log_tail("origin"))
        config = tmp / "gateway.yaml"
        extra, env, wrk_extra = "", None, []
        if args.signing:
            from run import CEC_CHANNEL, CEC_TENANT, CHAT_BODY, CHAT_PATH, cec_secret

            extra = (f"cec:\n  tenant_space_id: \"{CEC_TENANT}\"\n"
                     f"  channel_config_id: \"{CEC_CHANNEL}\"\n"
                     "  auth:\n    mode: authorization\n"
                     "    secret_key: ${CEC_SECRET_KEY}\n")
            env = dict(os.environ, CEC_SECRET_KEY=cec_secret())
            script = tmp / "post.lua"
            script.write_text('wrk.method = "POST"\n'
                              f"wrk.body = [[{CHAT_BODY}]]\n"
                              'wrk.headers["Content-Type"] = "application/json;charset=UTF-8"\n')
            wrk_extra = ["-s", str(script)]
            args.path = CHAT_PATH + "?&t=1764000000000"
            if args.plain:
                # The same POST to a path that is proxied without injection, for comparison.
                args.path = args.path.replace("newThirdPartyClient.js", "plain.js")
        config.write_text(gateway_config_yaml(
            port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{origin_port}/"}],
            extra=extra, access_log=args.access_log is not None))
        argv = (gateway_argv(config, log_level="INFO", log_format=args.access_log)
                if args.access_log else gateway_argv(config))
        gw = procs.start("gateway", argv, env=env, cwd=PROJECT_DIR)
        if not wait_port(port, proc=gw):
            raise RuntimeError(procs.log_tail("gateway"))
        if args.signing and not args.first_visit:
            # A returning visitor: the guest cookie from a first POST goes with every request.
            from run import post_probe

            cookie = post_probe(port, args.path, CHAT_BODY)[3]
            with script.open("a") as lua:
                lua.write(f'wrk.headers["Cookie"] = "{cookie}"\n')
        url = f"http://127.0.0.1:{port}{args.path}"
        subprocess.run(["wrk", "-t2", f"-c{args.connections}", "-d1s", *wrk_extra, url],
                       capture_output=True, timeout=60)
        worker = leaf_processes(gw.pid)[0]
        raw = tmp / "stacks.txt"
        spy_proc = subprocess.Popen([spy, "record", "--pid", str(worker), "--rate", "500",
                                     "--duration", str(args.seconds), "--format", "raw",
                                     "--output", str(raw), "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        load = subprocess.run(["wrk", "-t2", f"-c{args.connections}",
                               f"-d{args.seconds}s", *wrk_extra, url],
                              capture_output=True, text=True, timeout=args.seconds + 60)
        _, err = spy_proc.communicate(timeout=args.seconds + 60)
        rps = [ln for ln in load.stdout.splitlines() if "Requests/sec" in ln]
        sys.stdout.write(f"{url}: {rps[0].strip() if rps else load.stdout[-300:]}"
                         " (while being sampled)\n")
        if not raw.exists():
            sys.stderr.write(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}\n")
            return 1
        sys.stdout.write(summarize(raw, args.top) + "\n")
        if args.flame is not None:
            subprocess.run([spy, "record", "--pid", str(worker), "--duration", "1",
                            "--output", str(args.flame), "--nonblocking"],
                           capture_output=True, timeout=60)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
