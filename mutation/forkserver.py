"""Run mutants, each in a forked child that imports the project afresh.

Started by mutation/run.py inside its scratch copy: ``forkserver.py NAMES_FILE TIMEOUT --
PYTEST_ARGS...``. The parent imports pytest, its plugins and every third-party library the
project uses (the slow part of a pytest start), then drops the project's own modules
(``gateway.*``, ``tests.*``, the test modules) from ``sys.modules``. Each child sets
``MUTANT_UNDER_TEST`` and runs pytest, so every module-level object, route table, compiled
policy and ``lru_cache`` is built under the mutant, as in a fresh process. Prints one
``name status`` line per mutant.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import time
from pathlib import Path

_TESTS = ("tests", "conftest", "test_")
_PROJECT = ("gateway", *_TESTS)


def own(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") or
               (p.endswith("_") and module.startswith(p)) for p in prefixes)


def warm(pytest_args: list[str], fresh_project: bool) -> None:
    import pytest

    # Collecting imports the plugins, the conftests, the tests and the project.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = pytest.main([*pytest_args, "--collect-only", "-q"])
    if code != 0:
        sys.exit(f"collection failed ({code})")
    importlib.import_module("mutmut.mutation.trampoline")
    prefixes = _PROJECT if fresh_project else _TESTS
    for name in [m for m in sys.modules if own(m, prefixes)]:
        del sys.modules[name]


def run_child(name: str, pytest_args: list[str]) -> None:
    import pytest

    os.environ["MUTANT_UNDER_TEST"] = name
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        code = pytest.main(pytest_args)
    except BaseException:  # whatever the mutant raised, pytest did not catch: a kill
        code = 3
    os._exit(int(code))


def wait(pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            # 1: a test failed; 2: the mutant broke collection (an import-time call); 4, 5:
            # the selection itself is wrong, which the driver reports rather than scores.
            return "survived" if code == 0 else ("error" if code in (4, 5) else "killed")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def main() -> None:
    names_file, timeout = sys.argv[1], float(sys.argv[2])
    fresh_project = "--fresh-project" in sys.argv[:sys.argv.index("--")]
    pytest_args = sys.argv[sys.argv.index("--") + 1:]
    names = Path(names_file).read_text("utf-8").split()
    sys.path.insert(0, os.getcwd())  # the scratch copy, as `python -m pytest` would
    warm(pytest_args, fresh_project)
    for name in names:
        pid = os.fork()
        if pid == 0:
            run_child(name, pytest_args)
        print(name, wait(pid, timeout), flush=True)


if __name__ == "__main__":
    main()
