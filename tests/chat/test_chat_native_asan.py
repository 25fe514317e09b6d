"""The native rewrite parses bytes the page controls: built with AddressSanitizer and
UndefinedBehaviorSanitizer, and fuzzed, it must not read or write out of bounds.

Needs gcc with its sanitizer runtimes (Debian's gcc brings libasan and libubsan) and
OpenSSL's headers; skipped without them unless ``GATEWAY_REQUIRE_NATIVE=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "gateway" / "chat" / "_native.c"


def _missing(why: str) -> None:
    if os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1":
        pytest.fail(f"the sanitizer build of the native rewrite cannot run: {why}")
    pytest.skip(why)


def test_fuzzed_parser_is_memory_safe(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/openssl/sha.h").exists():
        _missing("needs gcc and OpenSSL's headers (libssl-dev)")
    so = tmp_path / "_native.so"
    build = subprocess.run(
        [gcc, "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
         "-fno-sanitize-recover=undefined", "-Wno-deprecated-declarations", "-fPIC", "-shared",
         f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-lcrypto", "-o", str(so)],
        capture_output=True, text=True, timeout=120, check=False)
    assert build.returncode == 0, build.stderr
    libasan = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if not Path(libasan).exists():
        _missing("gcc has no libasan runtime")
    env = dict(os.environ, LD_PRELOAD=libasan, PYTHONMALLOC="malloc",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("native_fuzz.py")),
                          str(so), "8"], capture_output=True, text=True, timeout=180,
                         env=env, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    # The fuzzer reached both outcomes: bodies rewritten natively and bodies declined.
    assert stats["runs"] > 10_000
    assert 0 < stats["rewritten"] < stats["runs"]
