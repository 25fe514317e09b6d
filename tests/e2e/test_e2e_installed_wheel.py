"""The gateway as a platform team gets it: the built wheel, installed into a fresh virtualenv
outside the repository, then ``gateway --version``, ``init``, ``check`` and ``demo`` run there,
and a chat goes through that demo in Chromium.

Nothing of the repository is on the path of those processes: their working directory is a
temporary directory and the package is imported from the new virtualenv (checked). The
dependencies come through pip as an operator's would, from a wheelhouse kept between runs
(filled from the package index when it lacks one), so that a run takes seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_e2e_chat import assert_quiet, exchange, open_widget

expect = pytest.importorskip("playwright.async_api").expect

ROOT = Path(__file__).resolve().parents[2]
# What the Dockerfile's build stage copies: enough to build the wheel.
SOURCES = ("pyproject.toml", "README.md", "gateway")
SECRET_NAMES = ("CEC_SECRET_KEY", "GATEWAY_TOKEN_KEY", "GATEWAY_API_KEY")
STARTUP_TIMEOUT = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of an operator's shell: none of the demo's variables, no repo path."""
    env = {k: v for k, v in os.environ.items()
           if k not in SECRET_NAMES and not k.startswith(("GATEWAY_", "CEC_", "SITE_"))
           and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(argv: list[str], cwd: Path, env: dict[str, str],
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (outside the repository) with the built wheel installed; its bin."""
    base = tmp_path_factory.mktemp("installed")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    wheels = base / "wheels"
    env = clean_env()
    build = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-q", "-w", str(wheels), str(src)], base, env)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("cec_gateway-*.whl")
    venv = base / "venv"
    # No pip inside: this interpreter's pip installs into it (--python), which saves copying
    # pip into every fresh virtualenv.
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, env)
    assert made.returncode == 0, made.stderr
    install_offline_first(venv / "bin" / "python", wheel, base, env)
    return venv / "bin"


def install_offline_first(python: Path, wheel: Path, cwd: Path, env: dict[str, str]) -> None:
    """Install ``wheel`` and its dependencies from a wheelhouse kept between runs; fill the
    wheelhouse from the package index first when it lacks something (the first run, or a
    dependency was added): one resolution against the index per change, not per run."""
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    wheelhouse = cache / "cec-gateway-tests" / "wheelhouse"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    offline = [*pip, "--python", str(python), "install", "-q", "--no-index",
               "--find-links", str(wheelhouse), str(wheel)]
    if wheelhouse.is_dir() and run(offline, cwd, env).returncode == 0:
        return
    download = run([*pip, "download", "-q", "--dest", str(wheelhouse), str(wheel)], cwd, env)
    assert download.returncode == 0, download.stderr
    again = run(offline, cwd, env)
    assert again.returncode == 0, again.stderr


async def read_until_console(proc: asyncio.subprocess.Process) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while not lines or not lines[-1].startswith("Agent console: "):
            line = await proc.stdout.readline()
            assert line, f"the demo exited early: {lines}"
            lines.append(line.decode().rstrip("\n"))
    return lines


async def test_the_wheel_installed_elsewhere_inits_checks_and_runs_a_demo_to_chat_through(
        installed: Path, tmp_path: Path, open_page: Any) -> None:
    work = tmp_path / "operator"
    work.mkdir()
    env = clean_env()
    gateway = str(installed / "gateway")
    python = str(installed / "python")

    where = run([python, "-c", "import gateway; print(gateway.__file__)"], work, env)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(installed.parent)), where.stdout  # not the repository

    from gateway import __version__

    version = run([gateway, "--version"], work, env)
    assert version.returncode == 0 and version.stdout.strip().endswith(__version__)

    init = run([gateway, "init"], work, env)
    assert init.returncode == 0, init.stderr
    assert (work / "gateway.yaml").read_text(encoding="utf-8").startswith(
        "# The CEC chat gateway: a configuration to start from.")

    unset = run([gateway, "check"], work, env)  # the secrets are the operator's to give
    assert unset.returncode == 2
    assert all(f"{name} is not set" in unset.stderr for name in SECRET_NAMES)
    secrets_env = clean_env(CEC_SECRET_KEY="aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f",
                            GATEWAY_TOKEN_KEY="1" * 64, GATEWAY_API_KEY="2" * 64)
    check = run([gateway, "check", "--log-format", "json"], work, secrets_env)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("gateway.yaml: OK")
    assert "aB3dE5fG7hJ9" not in check.stdout + check.stderr

    proc = await asyncio.create_subprocess_exec(
        gateway, "demo", cwd=work, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        lines = await read_until_console(proc)
        text = "\n".join(lines)
        assert lines[0] == "CEC chat gateway demo, configuration: gateway.yaml"
        assert "Generated throw-away secrets for this run" in text
        for name in ("gateway", "sample site", "CEC sandbox", "admin"):
            assert re.search(rf"^  {name} +http://127\.0\.0\.1:\d+/", text, re.M), text
        site = lines[-2].removeprefix("Site: ")
        console = lines[-1].removeprefix("Agent console: ")

        agent_ctx, agent, agent_watch = await open_page()
        await agent.goto(console)
        await agent.fill("#agent-id", "agent1")
        await agent.fill("#agent-password", "agent1")
        await agent.click("#agent-login-submit")
        go_idle = agent.locator("#agent-status-idle")
        await expect(go_idle).to_have_text("Go idle")  # what the README tells people to click
        await go_idle.click()
        await expect(agent.locator("#agent-status")).to_have_attribute("data-status", "idle")

        ctx, visitor, watch = await open_page()
        await visitor.goto(site)
        await open_widget(visitor)
        await exchange(visitor, agent, "Hello from an installed wheel",
                       "Hello! The demo works outside the repository.")
        assert_quiet(watch, agent_watch)
        for c in (ctx, agent_ctx):
            await c.close()

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    errors = (await proc.stderr.read()).decode(errors="replace")
    assert "Traceback" not in errors, errors
