"""Mutation testing of the security-critical modules (``./dev mutate [MODULE...]``).

mutmut 3 writes the mutants (every function of the module, trampolined); this driver runs
each mutant in a *fresh* pytest process against the module's own fast unit tests. A fresh
process per mutant is the isolation: objects built at import time (route tables, trusted
proxy sets, compiled policies) and warm caches (``lru_cache`` memos) are rebuilt under the
mutant instead of being inherited from a process that ran the clean code. mutmut's own
fork runner attributes an import-time call to whichever test happened to run first and
reuses warmed caches, so it reports survivors that a fresh run kills.

Per module it prints killed, survived, equivalent (listed in mutation/EQUIVALENT.md) and
the score over the non-equivalent mutants, then each survivor with its one-line diff.
``mutation/constants.py`` covers what mutmut does not mutate (module-level tables).
Not in CI: a full run takes several minutes per module.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "mutation" / "EQUIVALENT.md"


@dataclass(frozen=True)
class Target:
    path: str  # module file, relative to the repository
    tests: tuple[str, ...]  # pytest selection: files or node ids
    select: str = ""  # optional ``-k`` expression (the unit parts of a mixed file)


# Each module against the fast unit tests that cover it (no sockets, no servers).
TARGETS: dict[str, Target] = {
    # test_boundary_tables.py calls upstream_request_head with each route policy.
    "headers": Target("gateway/headers.py", ("tests/test_headers.py",
                                             "tests/test_headers_tables.py",
                                             "tests/test_boundary_tables.py")),
    "routing": Target("gateway/routing.py", ("tests/test_routing.py",
                                             "tests/test_routing_traversal.py")),
    # The unit parts of test_boundary.py (the rest starts gateways on sockets). Not
    # test_boundary_redirects.py: its 1,500-example property takes a minute per mutant; the
    # redirect tables in test_boundary_tables.py stand in for it here.
    "boundary": Target("gateway/boundary.py", (
        "tests/test_boundary_tables.py", "tests/test_boundary_compile_tables.py",
        "tests/test_boundary.py::test_upstream_cookie", "tests/test_boundary.py::test_set_cookie",
        "tests/test_boundary.py::test_upstream_referer",
        "tests/test_boundary.py::test_client_scripts", "tests/test_boundary.py::test_valid_host")),
    "cors": Target("gateway/cors.py", ("tests/test_cors.py", "tests/test_cors_tables.py")),
    # The clock-driven unit file first (it kills most mutants in milliseconds); the other
    # runs the same guard on a real redis-server, which is what reaches RedisCounters.
    # test_tokens_guard_redis_tables.py pins RedisCounters' answers and the Redis auth.
    "guard": Target("gateway/tokens/guard.py", ("tests/tokens/test_tokens_guard_units.py",
                                                "tests/tokens/test_tokens_guard.py",
                                                "tests/tokens/test_tokens_guard_redis_tables.py")),
    # The request policy: its pure unit files (tests/test_request_paths.py pins the same
    # answers on sockets, seconds per run, so it is left out here).
    "policy": Target("gateway/policy.py", ("tests/test_policy.py",
                                           "tests/test_policy_tables.py")),
    "signing": Target("gateway/signing.py", ("tests/test_signing.py",
                                             "tests/test_signing_tables.py")),
    "inject": Target("gateway/chat/inject.py", ("tests/chat/test_chat_inject_tables.py",
                                                "tests/chat/test_chat_inject_results_tables.py",
                                                "tests/chat/test_chat_inject.py")),
}

_MEMO_RE = re.compile(r"^[ \t]*@(?:functools\.)?(?:lru_cache|cache)\b.*\n", re.M)
_NAME_RE = re.compile(r"^mutants_(\S+?)__mutmut\['(\S+__mutmut_\d+)'\]", re.M)


@dataclass
class Outcome:
    name: str
    status: str  # killed | survived | timeout | equivalent
    diff: str = ""


@dataclass
class Report:
    module: str
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


def equivalents() -> dict[str, str]:
    """``- `gateway.headers.x_f__mutmut_3`: why`` lines of mutation/EQUIVALENT.md."""
    found: dict[str, str] = {}
    if EQUIVALENT.exists():
        for m in re.finditer(r"^- `([^`]+)`:?\s*(.*)$", EQUIVALENT.read_text("utf-8"), re.M):
            found[m.group(1)] = m.group(2)
    return found


def existing(tests: Sequence[str]) -> list[str]:
    return [t for t in tests if (ROOT / t.split("::")[0]).exists()]


def prepare(work: Path, target: Target) -> list[str]:
    """Copy the project into ``work`` and replace the module by its mutmut-trampolined form."""
    for part in ("gateway", "tests"):
        shutil.copytree(ROOT / part, work / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", ".hypothesis"))
    config = (ROOT / "pyproject.toml").read_text("utf-8")
    config = config.split("\n[tool.mutmut]")[0]
    config += (f'\n[tool.mutmut]\nsource_paths = ["gateway"]\nonly_mutate = ["{target.path}"]\n')
    (work / "pyproject.toml").write_text(config, "utf-8")
    # mutmut leaves decorated functions alone; a memo changes nothing in a fresh process
    # (it only saves time), so it is removed here and the memoised functions are mutated too.
    module = work / target.path
    module.write_text(_MEMO_RE.sub("", module.read_text("utf-8")), "utf-8")
    out = work / "mutants" / target.path  # where mutmut keeps its notes (the .meta file)
    out.parent.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; "
            "from mutmut.__main__ import create_mutants_for_file as c; "
            "r = c(Path(sys.argv[1]), Path(sys.argv[2])); "
            "sys.exit(1 if r.error else 0)")
    subprocess.run([sys.executable, "-c", code, target.path, str(out)], cwd=work, check=True,  # noqa: S603
                   stdout=subprocess.DEVNULL)
    text = out.read_text("utf-8")
    shutil.move(out, work / target.path)
    dotted = target.path.removesuffix(".py").replace("/", ".")
    return [f"{dotted}.{key}" for _, key in _NAME_RE.findall(text)]


def function_sources(module_file: Path) -> dict[str, str]:
    text = module_file.read_text("utf-8")
    lines = text.splitlines()
    found: dict[str, str] = {}
    for node in ast.parse(text).body:
        for fn in [node, *(node.body if isinstance(node, ast.ClassDef) else [])]:
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in fn.name:
                # By line numbers: ast.get_source_segment rescans the file on every call.
                found[fn.name] = "\n".join(lines[fn.lineno - 1:fn.end_lineno])
    return found


def one_line_diff(sources: dict[str, str], key: str) -> str:
    orig = key.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    a = sources.get(orig, "").replace(orig, "f").splitlines()
    b = sources.get(key, "").replace(key, "f").splitlines()
    lines = [d for d in difflib.unified_diff(a, b, lineterm="", n=0)
             if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    return " | ".join(line[0] + " " + line[1:].strip() for line in lines)[:300]


def pytest_cmd(target: Target) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", "-o", "addopts=", *existing(target.tests)]
    if target.select:
        cmd += ["-k", target.select]
    return cmd


def run_one(work: Path, cmd: list[str], name: str, timeout: float) -> str:
    """One fresh pytest process (the clean run, which also times the selection)."""
    env = dict(os.environ, MUTANT_UNDER_TEST=name, PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL,  # noqa: S603
                              stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if proc.returncode == 0 else "killed"


def calls_itself_at_import(module_file: Path) -> bool:
    """Whether module-level code calls a function the module defines (a table built at
    load): then a mutant of that function must see the module imported afresh."""
    tree = ast.parse(module_file.read_text("utf-8"))
    own = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and (
                    sub.func.id in own):
                return True
    return False


def run_many(work: Path, args: list[str], names: list[str], timeout: float,
             jobs: int, fresh_project: bool) -> dict[str, str]:
    """``names`` spread over ``jobs`` fork servers (mutation/forkserver.py)."""
    server = Path(__file__).resolve().parent / "forkserver.py"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("MUTANT_UNDER_TEST", None)
    procs = []
    for j in range(jobs):
        chunk = names[j::jobs]
        if not chunk:
            continue
        listing = work / f"names-{j}.txt"
        listing.write_text("\n".join(chunk), "utf-8")
        procs.append(subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [sys.executable, str(server), str(listing), str(timeout),
             *(["--fresh-project"] if fresh_project else []), "--", *args],
            cwd=work, env=env, stdout=subprocess.PIPE, text=True))
    results: dict[str, str] = {}
    total = len(names)
    for proc in procs:
        assert proc.stdout is not None
        for line in proc.stdout:
            name, status = line.split()
            results[name] = status
            if len(results) % 50 == 0:
                print(f"  {len(results)}/{total}", flush=True)
        if proc.wait() != 0:
            sys.exit(f"the fork server failed in {work}")
    return results


def mutate(module: str, jobs: int, only: Sequence[str] = ()) -> Report:
    target = TARGETS[module]
    report = Report(module)
    equivalent = equivalents()
    with tempfile.TemporaryDirectory(prefix=f"mutate-{module}-") as tmp:
        work = Path(tmp)
        names = prepare(work, target)
        if only:
            names = [n for n in names if any(n == o or ("__mutmut_" not in o and o in n)
                                             for o in only)]
        sources = function_sources(work / target.path)
        cmd = pytest_cmd(target)
        start = time.monotonic()
        clean = run_one(work, cmd, "", timeout=600)
        took = time.monotonic() - start
        if clean != "survived":
            sys.exit(f"{module}: the unit tests fail on the unmutated code; fix that first")
        timeout = 5 * took + 10
        print(f"{module}: {len(names)} mutants, clean run {took:.1f}s, {jobs} job(s)",
              flush=True)
        # mutmut's trampoline fails every mutated function under the name "fail": proof
        # that the tests reach the trampolined module at all.
        fresh = calls_itself_at_import(ROOT / target.path)
        results = run_many(work, cmd[3:], ["fail", *names], timeout, jobs, fresh)
        sanity = results.pop("fail")
        if sanity not in ("killed", "error"):
            # Reported, not fatal: the mutants' results are still worth reading.
            print(f"{module}: WARNING the forced failure was {sanity}, not killed: check that "
                  "the selected tests call the mutated module", flush=True)
        for name in names:
            status = results[name]
            if status == "error":
                # The clean run proved the selection; under this mutant a test module failed
                # to import (it calls the mutated code at import time), so pytest found none
                # of the selected node ids: the mutant broke the tests, it is killed.
                status = "killed"
            if status == "survived" and name in equivalent:
                status = "equivalent"
            key = name.rsplit(".", 1)[1]
            report.outcomes.append(Outcome(name, status, one_line_diff(sources, key)))
    return report


def summary(report: Report) -> str:
    killed = report.count("killed") + report.count("timeout")
    survived = report.count("survived")
    equivalent = report.count("equivalent")
    scored = killed + survived
    score = 100.0 * killed / scored if scored else 100.0
    lines = [f"{report.module}: {len(report.outcomes)} mutants, killed {killed}, "
             f"survived {survived}, equivalent {equivalent}, score {score:.1f} %"]
    for o in report.outcomes:
        if o.status == "survived":
            lines.append(f"  SURVIVED {o.name}: {o.diff}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev mutate", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"any of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="mutants run in parallel (default 1)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this mutant, or those whose name contains this "
                             "(repeatable)")
    parser.add_argument("--survivors-of", type=Path, metavar="OUTPUT",
                        help="run only the mutants listed as SURVIVED in an earlier output")
    args = parser.parse_args(argv)
    if args.survivors_of:
        args.only += re.findall(r"SURVIVED (\S+?):", args.survivors_of.read_text("utf-8"))
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}: choose from {', '.join(TARGETS)}")
    reports = [mutate(m, args.jobs, args.only) for m in args.modules or list(TARGETS)]
    print()
    for report in reports:
        print(summary(report))
    return 1 if any(r.count("survived") for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
