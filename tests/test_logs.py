"""Log lines in ECS JSON: every line from the first, full tracebacks as fields."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.logs import EcsFormatter
from tests.support.ports import busy_port
from tests.support.process import PROJECT, PYTHON, flat, run_cli


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed as JSON (a line that is not fails the test), flattened."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(flat(json.loads(line)))
        except json.JSONDecodeError:
            raise AssertionError(f"a line is not JSON: {line!r}\n{text}") from None
    return out


def assert_ecs(record: dict[str, Any]) -> None:
    assert {"@timestamp", "log.level", "message", "ecs.version", "log.logger"} <= set(record)


def test_bad_config_start_is_json_from_the_first_line(tmp_path: Path) -> None:
    conf = tmp_path / "gateway.yaml"
    conf.write_text("listen: {port: 99999}\nroutes: []\nunknown_key: 1\n")
    out = run_cli("--log-format", "json", "run", "-c", str(conf))
    assert out.returncode == 2
    lines = json_lines(out.stderr)
    assert len(lines) == 1, lines
    for line in lines:
        assert_ecs(line)
    problems = lines[0]["gateway.config.problems"]
    assert len(problems) == 3 and lines[0]["log.level"] == "error"
    assert any("listen.port" in p for p in problems) and any("routes" in p for p in problems)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_busy_port_is_json_too(tmp_path: Path, workers: str) -> None:
    with busy_port() as port:
        conf = tmp_path / "gateway.yaml"
        conf.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                        "routes:\n  - {prefix: /, upstream: 'http://127.0.0.1:1/'}\n")
        out = run_cli("--log-format", "json", "run", "-c", str(conf), "--workers", workers)
    assert out.returncode != 0
    lines = json_lines(out.stderr)
    assert lines and any(str(port) in line["message"] for line in lines)
    for line in lines:
        assert_ecs(line)


def test_usage_error_is_json() -> None:
    out = run_cli("--log-format", "json", "run", "--no-such-option")
    assert out.returncode == 2
    lines = json_lines(out.stderr)
    assert len(lines) == 1 and "--no-such-option" in lines[0]["message"]
    assert_ecs(lines[0])


def test_uncaught_exception_is_one_json_line_with_the_whole_traceback(tmp_path: Path) -> None:
    script = """
from gateway.logs import setup_logging
import warnings
setup_logging("json")
warnings.warn("a python warning")
def inner():
    raise ValueError("boom")
def outer():
    inner()
outer()
"""
    (tmp_path / "crash.py").write_text(script)
    out = subprocess.run([PYTHON, str(tmp_path / "crash.py")], capture_output=True, text=True,
                         timeout=30, cwd=str(PROJECT), check=False,
                         env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert out.returncode == 1
    lines = json_lines(out.stderr)
    assert len(lines) == 2, out.stderr
    warning, crash = lines
    assert "a python warning" in warning["message"] and warning["log.level"] == "warning"
    assert crash["log.level"] == "critical"
    assert crash["error.type"] == "ValueError" and crash["error.message"] == "boom"
    trace = crash["error.stack_trace"]
    assert "in outer" in trace and "in inner" in trace and 'raise ValueError("boom")' in trace


def test_logged_exception_keeps_every_frame() -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise KeyError("missing")
        deep(n - 1)

    try:
        deep(3)
    except KeyError:
        record = logging.getLogger("gateway.test").makeRecord(
            "gateway.test", logging.ERROR, __file__, 1, "it failed", (), sys.exc_info())
    line = flat(json.loads(EcsFormatter().format(record)))
    assert_ecs(line)
    assert line["message"] == "it failed" and line["error.type"] == "KeyError"
    assert line["error.stack_trace"].count("in deep") == 4
    assert "log.original" not in line


def test_busy_admin_port_with_workers_says_which_port(tmp_path: Path) -> None:
    with busy_port() as admin:
        conf = tmp_path / "gateway.yaml"
        conf.write_text(f"listen: {{host: 127.0.0.1, port: 0}}\n"
                        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
                        "routes:\n  - {prefix: /, upstream: 'http://127.0.0.1:1/'}\n")
        out = run_cli("--log-format", "json", "run", "-c", str(conf), "--workers", "2")
    assert out.returncode == 1
    lines = json_lines(out.stderr)
    assert [line["log.level"] for line in lines] == ["error"], lines
    assert f"127.0.0.1:{admin} for admin" in lines[0]["message"]
    assert "admin.port" in lines[0]["message"]
