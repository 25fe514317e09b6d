"""deploy/ kept honest: every path, port, command and variable it names exists in the gateway.

The files are parsed (YAML, the Dockerfile's instructions, the systemd unit's keys) and checked
against each other and against the gateway's own config model and CLI; the configs they ship
go through ``gateway check``; and the commands they run are run for real on free loopback
ports: the systemd unit's ExecStart/ExecReload, the compose services (gateway with two workers
on a real Redis, sandbox, site) with their health checks, and the Kubernetes ConfigMap's
config behind its probe paths. Docker and a cluster are not needed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from gateway.cli import build_parser
from gateway.config import Config, load_config, load_config_text
from gateway.sandbox.settings import load_sandbox_settings
from tests.redis_server import running_redis
from tests.support.ports import free_ports
from tests.support.process import run_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "compose" / "gateway.yaml"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd" / "cec-gateway.service"
UNIT_CONFIG = DEPLOY / "systemd" / "gateway.yaml"

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
ALNUM = string.ascii_letters + string.digits
# What the repo's pre-stop hook refuses outside tests/: a real-looking CEC secret literal.
SECRET_LITERAL = re.compile(r"""(secret_key|secretKey)\s*[:=]\s*["'][A-Za-z0-9]{43}["']""")


# ---------------------------------------------------------------- helpers: values and files


def dummy_secret(name: str) -> str:
    """A valid value for a secret variable: the CEC's 43-character shape, else 64 hex."""
    if name == "CEC_SECRET_KEY":
        return "".join(secrets.choice(ALNUM) for _ in range(43))
    return secrets.token_hex(32)


def env_refs(text: str, *, required_only: bool = False) -> set[str]:
    """The ``${NAME}`` names a config reads (``required_only``: those without a default)."""
    return {m.group(1) for m in ENV_REF.finditer(text)
            if not (required_only and m.group(2) is not None)}


def gateway_env_names() -> set[str]:
    """Environment variables the gateway's code itself reads (os.environ.get("NAME"...))."""
    names: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        names.update(re.findall(r"""os\.environ\.get\(\s*["']([A-Z0-9_]+)["']""", text))
        for const in re.findall(r"""os\.environ\.get\(\s*([A-Z_]+)\s*[,)]""", text):
            m = re.search(rf"""^{const}\s*=\s*["']([A-Z0-9_]+)["']""", text, re.M)
            if m:
                names.add(m.group(1))
    return names


def secret_field_names() -> set[str]:
    """Names of the config's secret fields (typed SecretStr), found by walking the model."""
    from pydantic import BaseModel, SecretStr

    names: set[str] = set()
    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            for kind in _types_in(field.annotation):
                if kind is SecretStr:
                    names.add(name)
                elif isinstance(kind, type) and issubclass(kind, BaseModel):
                    walk(kind)

    walk(Config)
    return names


def _types_in(annotation: Any) -> Iterator[Any]:
    args = getattr(annotation, "__args__", None)
    if args:
        for arg in args:
            yield from _types_in(arg)
    else:
        yield annotation


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment: no ambient variable can stand in for one a file forgot."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env



def run_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "-c", str(config), env=env)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_http(url: str, timeout: float = 15.0) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(url, timeout=2.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def argv_of(command: list[str]) -> Any:
    """Parse a command line (without the program name) with the gateway's own parser."""
    return build_parser().parse_args(command)


class Proc:
    """A subprocess in its own process group, its merged output collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.p = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.argv}: no matching line in {timeout}s:\n"
                                     f"{self.output}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.p.wait(5)
                raise AssertionError(f"{self.argv} exited with {self.p.returncode}:\n"
                                     f"{self.output}")
            if pred(line):
                return line

    def stop(self, timeout: float = 40.0) -> int:
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str]) -> Iterator[Proc]:
    proc = Proc(argv, env)
    try:
        yield proc
    finally:
        proc.kill()


def log_message(line: str) -> str:
    """The message of a log line, JSON (``--log-format json``) or text."""
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        if isinstance(record, dict):
            return str(record.get("message", ""))
    return line


def listening(line: str) -> bool:
    return "listening on" in log_message(line)


def admin_url_of(line: str) -> str:
    m = re.search(r"admin on (http://\S+)", log_message(line))
    assert m, f"the listening line names no admin listener: {line}"
    return m.group(1).rstrip(",")


def gateway_program() -> list[str]:
    """The installed console script `gateway`, else the same entry point via -m."""
    script = Path(sys.executable).parent / "gateway"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gateway"]


# ---------------------------------------------------------------- helpers: the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def docker_cmd(args: str) -> list[str]:
    """Exec form (JSON) or shell form of CMD / ENTRYPOINT / HEALTHCHECK CMD."""
    args = args.strip()
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return ["/bin/sh", "-c", args]


def dockerfile(word: str) -> list[str]:
    return [a for w, a in dockerfile_instructions() if w == word]


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage."""
    return docker_cmd(dockerfile("ENTRYPOINT")[-1]) + docker_cmd(dockerfile("CMD")[-1])


def healthcheck_command() -> list[str]:
    (args,) = dockerfile("HEALTHCHECK")
    m = re.search(r"\bCMD\s+(.*)$", args)
    assert m, args
    return docker_cmd(m.group(1))


def url_in(command: list[str]) -> URL:
    m = re.search(r"https?://[^'\"\s]+", " ".join(command))
    assert m, f"no URL in {command}"
    return URL(m.group(0))


def with_port(command: list[str], old: int, new: int) -> list[str]:
    return [c.replace(f":{old}/", f":{new}/").replace(f"port={old}", f"port={new}")
            for c in command]


# ---------------------------------------------------------------- helpers: compose


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def compose_config() -> Config:
    env = {name: dummy_secret(name) for name in env_refs(COMPOSE_CONFIG.read_text())}
    return load_config(COMPOSE_CONFIG, env=env)


def compose_env_names(service: dict[str, Any]) -> set[str]:
    env = service.get("environment", {})
    return set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}


# ---------------------------------------------------------------- helpers: Kubernetes


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(yaml_docs(path))
    return docs


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in manifests() if m["kind"] == kind
             and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_deployment() -> dict[str, Any]:
    return manifest("Deployment", "cec-gateway")


def gateway_container() -> dict[str, Any]:
    containers = gateway_deployment()["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "gateway"]
    assert isinstance(container, dict)
    return container


def configmap_text() -> str:
    return str(manifest("ConfigMap")["data"]["gateway.yaml"])


def deployment_env() -> dict[str, str]:
    """The container's environment with every secretKeyRef filled by a valid dummy value."""
    env: dict[str, str] = {}
    for item in gateway_container()["env"]:
        env[item["name"]] = (item["value"] if "value" in item else dummy_secret(item["name"]))
    return env


def configmap_config() -> Config:
    return load_config_text(configmap_text(), env=deployment_env())


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A port as a probe or Service names it (number or container port name)."""
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


# ---------------------------------------------------------------- helpers: systemd


def unit() -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value)], keys may repeat; backslash continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"a key outside any section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def service_values(key: str) -> list[str]:
    return [v for k, v in unit()["Service"] if k == key]


def service_value(key: str) -> str:
    values = service_values(key)
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def unit_seconds(value: str) -> float:
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)?", value):
        total += float(number) * {"ms": 0.001, "min": 60, "m": 60, "h": 3600}.get(suffix, 1)
    return total


def credentials(tmp: Path) -> Path:
    """A $CREDENTIALS_DIRECTORY holding a dummy file for every LoadCredential= of the unit."""
    directory = tmp / "credentials"
    directory.mkdir()
    for item in service_values("LoadCredential"):
        name = item.split(":", 1)[0]
        value = dummy_secret("CEC_SECRET_KEY" if "cec" in name else name)
        (directory / name).write_text(value + "\n")
    return directory


# ================================================================ no secrets in deploy/


def test_no_real_looking_secret_anywhere_in_deploy() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not SECRET_LITERAL.search(text), path
        # Nor a bare 43-character run of letters and digits (a pasted secretKey).
        assert not re.search(r"(?<![A-Za-z0-9])[A-Za-z0-9]{43}(?![A-Za-z0-9])", text), path


# ================================================================ Dockerfile


def test_dockerfile_slim_base_non_root_and_installs_the_repo() -> None:
    froms = dockerfile("FROM")
    assert froms and all(f.split()[0].startswith("python:3.11-slim") for f in froms)
    (user,) = dockerfile("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (runAsNonRoot checks it)"
    assert any(f"--uid {uid}" in r for r in dockerfile("RUN")), "the user is created"
    installs = [r for r in dockerfile("RUN") if "pip install" in r]
    # The dependencies from the lock (which includes the speed extra, uvloop: see
    # tests/test_deploy_lock.py), then the repository's package without resolving again.
    assert any("--require-hashes -r requirements.lock" in r for r in installs)
    assert any(r.rstrip().endswith("pip install --no-deps .") for r in installs)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "speed" in extras
    assert re.search(r"^uvloop==", (DEPLOY / "requirements.lock").read_text(), re.M)


def test_dockerfile_copies_exist_and_make_a_working_wheel(tmp_path: Path) -> None:
    """The build stage's COPY set is enough: build the wheel from exactly those files."""
    src = tmp_path / "src"
    src.mkdir()
    copies = [a for a in dockerfile("COPY") if not a.startswith("--from")]
    assert copies
    for args in copies:
        *sources, dest = args.split()
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            target = src / (source if dest.endswith("/") or dest == "./" else dest)
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    # Offline (no build isolation): setuptools needs `wheel` for bdist_wheel before 70.1.
    import importlib.metadata
    import importlib.util

    major_minor = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    assert importlib.util.find_spec("wheel") or major_minor >= (70, 1), (
        "building the wheel offline needs the `wheel` package (a test dependency)")
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert re.search(r"^gateway\s*=\s*gateway\.cli:main", zf.read(entry).decode(), re.M)
    data = [p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*")
            if p.suffix in (".js", ".html", ".css", ".yaml")]
    assert data and set(data) <= names, "package data (sandbox static files) in the image"
    # Pure Python: one wheel for every platform, no compiler in the build stage.
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))], names


def test_dockerfile_command_is_gateway_run_on_the_mounted_config() -> None:
    command = image_command()
    assert command[0] == "gateway"
    args = argv_of(command[1:])
    assert args.command == "run"
    assert args.config == "/etc/gateway/gateway.yaml"
    gateway_service = compose()["services"]["gateway"]
    mounts = [v.split(":") for v in gateway_service["volumes"]]
    assert [args.config, "ro"] in [m[1:] for m in mounts]
    assert dockerfile("STOPSIGNAL") in ([], ["SIGTERM"])


def test_dockerfile_exposes_the_listen_and_admin_ports() -> None:
    cfg = compose_config()
    assert cfg.admin is not None
    exposed = {int(p.split("/")[0]) for e in dockerfile("EXPOSE") for p in e.split()}
    assert exposed == {cfg.listen.port, cfg.admin.port}


def test_healthcheck_is_gateway_health_on_the_image_config() -> None:
    command = healthcheck_command()
    assert command[:2] == ["gateway", "health"], "the image's own program, no curl needed"
    args = argv_of(command[1:])
    assert args.command == "health"
    # The same file CMD serves, so the check follows its admin: section (or its absence).
    assert args.config == argv_of(image_command()[1:]).config == "/etc/gateway/gateway.yaml"


def health_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [a if a != "/etc/gateway/gateway.yaml" else str(config)
               for a in healthcheck_command()]
    return subprocess.run([*gateway_program(), *command[1:]], env=env, capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.parametrize("admin_on", [True, False], ids=["admin", "no-admin"])
def test_healthcheck_command_passes_on_a_live_gateway_and_fails_without_one(
        tmp_path: Path, admin_on: bool) -> None:
    """With the compose config (admin on) and with the admin listener off (the default)."""
    port, admin = free_ports(2)
    tree = yaml.safe_load(COMPOSE_CONFIG.read_text())
    tree["listen"].update(host="127.0.0.1", port=port, workers=1)
    tree["admin"].update(host="127.0.0.1", port=admin)
    if not admin_on:
        del tree["admin"]
    tree["token"]["store"] = "memory"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = base_env(**{n: dummy_secret(n) for n in compose_env_names(
        compose()["services"]["gateway"])})
    with started([*gateway_program(), "run", "-c", str(path)], env) as gw:
        gw.wait_for(listening)
        ok = health_check(path, env)
        assert ok.returncode == 0, ok.stderr
        assert (f"127.0.0.1:{admin}/healthz answered 200" if admin_on
                else f"127.0.0.1:{port} accepts connections") in ok.stdout
        assert gw.stop() == 0, gw.output
    down = health_check(path, env)
    assert down.returncode == 1, down.stderr
    assert down.stderr.startswith("unhealthy: ")


# ================================================================ compose


def test_compose_gateway_config_passes_gateway_check() -> None:
    names = compose_env_names(compose()["services"]["gateway"])
    result = run_check(COMPOSE_CONFIG, base_env(**{n: dummy_secret(n) for n in names}))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_compose_env_matches_the_config() -> None:
    text = COMPOSE_CONFIG.read_text()
    services = compose()["services"]
    gw = compose_env_names(services["gateway"])
    assert env_refs(text, required_only=True) <= gw
    assert gw <= env_refs(text) | gateway_env_names()
    # The sandbox reads its own section: the names used there.
    sandbox_text = yaml.safe_dump(yaml.safe_load(text)["sandbox"])
    assert env_refs(sandbox_text, required_only=True) <= compose_env_names(services["sandbox"])
    # Secrets are passed through, never written in compose.yaml.
    for service in services.values():
        env = service.get("environment", {})
        for name, value in (env.items() if isinstance(env, dict) else []):
            assert str(value).startswith("${" + name), f"{name} must come from the environment"


def test_compose_wiring_matches_the_config() -> None:
    data = compose()
    services = data["services"]
    assert {"gateway", "redis", "sandbox", "site"} <= set(services)
    cfg = compose_config()
    assert cfg.admin is not None and cfg.token is not None and cfg.sandbox is not None
    gw = services["gateway"]
    # The image is built from the repository with this Dockerfile.
    build = gw["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # The mounted config is this file, read-only, where the command reads it.
    for name in ("gateway", "sandbox"):
        volumes = [v.split(":") for v in services[name]["volumes"]]
        assert [["./compose/gateway.yaml", "/etc/gateway/gateway.yaml", "ro"]] == volumes
    assert (DEPLOY / "compose" / "gateway.yaml").is_file()
    args = argv_of(gw["command"])
    assert (args.command, args.config) == ("run", "/etc/gateway/gateway.yaml")
    args = argv_of(services["sandbox"]["command"])
    assert (args.command, args.config) == ("sandbox", "/etc/gateway/gateway.yaml")
    # Published container ports are the config's.
    published = {int(str(p).rsplit(":", 1)[-1]) for p in gw["ports"]}
    assert published == {cfg.listen.port, cfg.admin.port}
    assert any(str(p).startswith("127.0.0.1:") and str(p).endswith(f":{cfg.admin.port}")
               for p in gw["ports"]), "the admin port is published on loopback only"
    # Every upstream and the store are compose services on the ports they listen on.
    sandbox = load_sandbox_settings(COMPOSE_CONFIG, env={"CEC_SECRET_KEY": dummy_secret(
        "CEC_SECRET_KEY")})
    site_port_m = re.search(r"port=(\d+)", " ".join(services["site"]["entrypoint"]))
    assert site_port_m, "the site's command names its port"
    site_port = int(site_port_m[1])
    listening_on = {("sandbox", sandbox.port), ("site", site_port), ("redis", 6379),
                    ("gateway", cfg.listen.port)}
    for route in cfg.routes:
        assert (route.url.host, route.url.port) in listening_on, route.upstream
    store = URL(cfg.token.store)
    assert (store.host, store.port) in listening_on
    assert sandbox.host == "0.0.0.0"
    # The sandbox calls the gateway's validation callback from the one allowed address.
    validate = URL(sandbox.validate_url or "")
    assert (validate.host, validate.port) in listening_on
    assert validate.path == cfg.token.validate_path
    address = ipaddress.ip_address(services["sandbox"]["networks"]["demo"]["ipv4_address"])
    assert any(address in net for net in cfg.token.validate_allow_from)
    subnet = ipaddress.ip_network(data["networks"]["demo"]["ipam"]["config"][0]["subnet"])
    assert address in subnet
    assert not any(ipaddress.ip_address("172.30.0.1") in net
                   for net in cfg.token.validate_allow_from), "not the whole bridge"
    # Docker waits longer than the gateway drains.
    grace = unit_seconds(gw["stop_grace_period"])
    assert grace > cfg.timeouts.shutdown_delay + cfg.timeouts.shutdown_grace + 5


def test_compose_demo_runs_for_real(tmp_path: Path) -> None:
    """gateway (2 workers, real Redis), sandbox and site as compose runs them, on loopback."""
    services = compose()["services"]
    cfg = compose_config()
    assert cfg.admin is not None and cfg.sandbox is not None
    with running_redis() as redis:
        admin, *picked = free_ports(4, pair_first=True)
        ports = dict(zip(("gateway", "sandbox", "site"), picked, strict=True))
        hosts = {("gateway", cfg.listen.port): ports["gateway"],
                 ("sandbox", cfg.sandbox.port): ports["sandbox"],
                 ("site", 3000): ports["site"], ("redis", 6379): redis.port}
        text = COMPOSE_CONFIG.read_text()
        for (host, port), new in hosts.items():
            text = text.replace(f"://{host}:{port}/", f"://127.0.0.1:{new}/")
        tree = yaml.safe_load(text)
        assert "redis://127.0.0.1" in tree["token"]["store"]
        tree["listen"].update(host="127.0.0.1", port=ports["gateway"])
        tree["admin"].update(host="127.0.0.1", port=admin)
        tree["sandbox"].update(host="127.0.0.1", port=ports["sandbox"])
        tree["token"]["validate_allow_from"] = ["127.0.0.1/32"]
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump(tree))

        def env_for(name: str) -> dict[str, str]:
            return base_env(**{n: dummy_secret(n) for n in compose_env_names(services[name])})

        site_cmd = with_port(services["site"]["entrypoint"], 3000, ports["site"])
        site_cmd = [c.replace("host='0.0.0.0'", "host='127.0.0.1'") for c in site_cmd]
        assert site_cmd[0] == "python"
        secret = {"CEC_SECRET_KEY": dummy_secret("CEC_SECRET_KEY")}
        gw_args = [a if a != "/etc/gateway/gateway.yaml" else str(config)
                   for a in services["gateway"]["command"]]
        sb_args = [a if a != "/etc/gateway/gateway.yaml" else str(config)
                   for a in services["sandbox"]["command"]]
        with started([sys.executable, *site_cmd[1:]], base_env()) as site, \
                started([*gateway_program(), *sb_args], base_env(**secret)) as sandbox:
            wait_http(f"http://127.0.0.1:{ports['site']}/api/status")
            sandbox.wait_for(lambda line: "CEC sandbox" in line)
            for name, old in (("site", 3000), ("sandbox", cfg.sandbox.port)):
                check = with_port(services[name]["healthcheck"]["test"][1:], old, ports[name])
                assert check[0] == "python"
                done = subprocess.run([sys.executable, *check[1:]], capture_output=True,
                                      timeout=30, check=False)
                assert done.returncode == 0, (name, done.stderr)
            gw_env = env_for("gateway")
            gw_env["CEC_SECRET_KEY"] = secret["CEC_SECRET_KEY"]
            with started([*gateway_program(), *gw_args], gw_env) as gw:
                gw.wait_for(listening)
                # The supervisor answers admin.port for both workers.
                assert wait_http(f"http://127.0.0.1:{admin}/healthz")[0] == 200
                base = f"http://127.0.0.1:{ports['gateway']}"
                assert http_get(f"{base}/api/status")[0] == 200
                assert http_get(f"{base}/service-cloud/health")[0] == 200
                checked = health_check(config, gw_env)
                assert checked.returncode == 0, checked.stderr
                status, body = http_get(f"http://127.0.0.1:{admin}/readyz")
                assert status == 200, body  # listening and not draining
                assert gw.stop() == 0, gw.output
            assert sandbox.stop() == 0, sandbox.output
            assert site.stop() == 0, site.output


# ================================================================ Kubernetes


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = manifests()
    assert {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler",
            "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    for doc in docs:
        assert "namespace" not in doc["metadata"], "namespace-less manifests"
        kv.validate(doc, kv.latest_version(), strict=True)


def test_kustomization_lists_every_manifest_but_the_secret() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - {"secret.yaml"}
    kubectl = shutil.which("kubectl")
    if kubectl:
        built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True,
                               text=True, timeout=60, check=False)
        assert built.returncode == 0, built.stderr
        kinds = {d["kind"] for d in yaml.safe_load_all(built.stdout) if d}
        assert "Deployment" in kinds and "Secret" not in kinds


def test_configmap_config_passes_gateway_check(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(configmap_text())
    result = run_check(path, base_env(**deployment_env()))
    assert result.returncode == 0, result.stderr
    assert "redis:6379/0" in result.stdout, "replicas share Redis"


def test_configmap_is_fit_for_several_replicas() -> None:
    cfg = configmap_config()
    assert cfg.token is not None and cfg.cec is not None
    assert cfg.token.store.startswith("redis://"), "replicas share tokens and lock-outs"
    assert cfg.listen.workers == 1, "one process per pod; the HPA scales pods"
    assert cfg.listen.host == "0.0.0.0"
    assert cfg.trusted_proxies, "the cluster's load balancer"
    assert cfg.public_url and cfg.public_url.startswith("https://")


def test_secret_holds_placeholders_the_gateway_refuses(tmp_path: Path) -> None:
    secret = manifest("Secret")
    values = secret["stringData"]
    assert values and all("REPLACE_ME" in v for v in values.values())
    path = tmp_path / "gateway.yaml"
    path.write_text(configmap_text())
    env = base_env(**{**deployment_env(), **values})
    result = run_check(path, env)
    assert result.returncode == 2
    assert "cec.auth.secret_key" in result.stderr
    for value in values.values():
        assert value not in result.stderr + result.stdout, "never echoed"


def test_deployment_env_matches_the_config_and_the_secret() -> None:
    text = configmap_text()
    container = gateway_container()
    names = {e["name"] for e in container["env"]}
    assert env_refs(text, required_only=True) <= names
    assert names <= env_refs(text) | gateway_env_names()
    secret = manifest("Secret")
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
    assert refs
    assert {r["name"] for r in refs} == {secret["metadata"]["name"]}
    assert {r["key"] for r in refs} == set(secret["stringData"])
    # The secrets the config reads come from the Secret, never from a plain value.
    secret_vars = {e["name"] for e in container["env"] if "valueFrom" in e}
    tree = yaml.safe_load(text)

    def walk(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                yield from walk(v, key)
        elif isinstance(node, str):
            yield key, node

    for key, value in walk(tree):
        if key in secret_field_names():
            assert env_refs(value) and env_refs(value) <= secret_vars, key


def test_deployment_probes_hit_the_admin_listener() -> None:
    cfg = configmap_config()
    assert cfg.admin is not None
    assert cfg.admin.host == "0.0.0.0", "the kubelet reaches the pod IP"
    container = gateway_container()
    probes = {name: container[name]["httpGet"] for name in
              ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert container_port(container, probe["port"]) == cfg.admin.port
    annotations = gateway_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == cfg.admin.port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_targets_the_listen_port() -> None:
    cfg = configmap_config()
    service = manifest("Service", "cec-gateway")
    pod_labels = gateway_deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert container_port(gateway_container(), port["targetPort"]) == cfg.listen.port
    assert cfg.admin is not None
    assert all(container_port(gateway_container(), p["targetPort"]) != cfg.admin.port
               for p in service["spec"]["ports"]), "metrics stay off the Service"


def test_deployment_runs_the_image_command_hardened() -> None:
    cfg = configmap_config()
    deployment = gateway_deployment()
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = gateway_container()
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
        "labels"].items()
    # The image's entrypoint with these args is `gateway run -c <the mounted ConfigMap>`.
    assert docker_cmd(dockerfile("ENTRYPOINT")[-1]) == ["gateway"]
    args = argv_of(container["args"])
    assert args.command == "run"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert mount["readOnly"] is True
    assert volume["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]
    (item,) = volume["configMap"]["items"]
    assert item["key"] == "gateway.yaml"
    assert args.config == f"{mount['mountPath']}/{item['path']}"
    # Non-root as the image's user, read-only root filesystem, no privileges.
    uid = int(dockerfile("USER")[0].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert cfg.admin is not None
    assert ports == {cfg.listen.port, cfg.admin.port}
    # Kubernetes waits longer than the gateway needs to drain.
    assert pod["terminationGracePeriodSeconds"] > (cfg.timeouts.shutdown_delay
                                                   + cfg.timeouts.shutdown_grace)


def test_hpa_and_pdb_target_the_gateway_pods() -> None:
    deployment = gateway_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = manifest("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert ref["apiVersion"] == deployment["apiVersion"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in gateway_container()["resources"]["requests"], "utilization needs a request"
    pdb = manifest("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "drains can proceed"


def test_redis_service_is_the_configured_store() -> None:
    cfg = configmap_config()
    assert cfg.token is not None
    store = URL(cfg.token.store)
    service = manifest("Service", store.host)
    (port,) = service["spec"]["ports"]
    assert port["port"] == store.port
    redis = manifest("Deployment", store.host)
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container_port(container, port["targetPort"]) == 6379
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"][
        "labels"].items()


def test_network_policies_select_real_pods_and_ports() -> None:
    policies = [m for m in manifests() if m["kind"] == "NetworkPolicy"]
    assert policies
    deployments = [m for m in manifests() if m["kind"] == "Deployment"]
    for policy in policies:
        selector = policy["spec"]["podSelector"]["matchLabels"]
        (target,) = [d for d in deployments
                     if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        for rule in policy["spec"]["ingress"]:
            for port in rule.get("ports", []):
                container_port(container, port["port"])  # a name that exists
            for source in rule.get("from", []):
                if "podSelector" in source:
                    wanted = source["podSelector"]["matchLabels"]
                    assert any(wanted.items() <= d["spec"]["template"]["metadata"][
                        "labels"].items() for d in deployments)


def test_configmap_config_serves_the_probe_paths(tmp_path: Path) -> None:
    """The ConfigMap's config, run for real: the probes' paths answer on the admin port."""
    container = gateway_container()
    with running_redis() as redis:
        port, admin = free_ports(2)
        tree = yaml.safe_load(configmap_text())
        tree["listen"].update(host="127.0.0.1", port=port)
        tree["admin"].update(host="127.0.0.1", port=admin)
        tree["token"]["store"] = redis.url
        tree["timeouts"]["shutdown_delay"] = "0s"
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(tree))
        args = [a if a != "/etc/gateway/gateway.yaml" else str(path) for a in container["args"]]
        with started([*gateway_program(), *args], base_env(**deployment_env())) as gw:
            line = gw.wait_for(listening)
            assert json.loads(line)["log.level"] == "info", "--log-format json"
            assert URL(admin_url_of(line)).port == admin
            for name in ("livenessProbe", "readinessProbe", "startupProbe"):
                path_ = container[name]["httpGet"]["path"]
                status, body = http_get(f"http://127.0.0.1:{admin}{path_}")
                # /readyz too: the example upstreams (cec.example.com) are not reachable, and
                # that is /status's business, not readiness's.
                assert status == 200, (path_, body)
            status, body = http_get(f"http://127.0.0.1:{admin}/status")
            report = json.loads(body)
            assert status == 200 and report["ready"] is True, report
            assert report["routes"] and report["store"]["up"] is True, report
            status, body = http_get(f"http://127.0.0.1:{admin}/metrics")
            assert status == 200 and b"gateway_" in body
            assert gw.stop() == 0, gw.output


# ================================================================ systemd


def test_unit_has_the_hardening_options() -> None:
    service = dict(unit()["Service"])
    for key, value in {"DynamicUser": "yes", "NoNewPrivileges": "yes",
                       "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "CapabilityBoundingSet": "", "KillSignal": "SIGTERM"}.items():
        assert service.get(key) == value, key
    families = set(service_value("RestrictAddressFamilies").split())
    assert {"AF_INET", "AF_INET6"} <= families <= {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit()["Install"] == [("WantedBy", "multi-user.target")]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    program = gateway_program()
    if len(program) != 1:
        pytest.skip("no gateway console script to stand in for /opt/cec-gateway/bin/gateway")
    text = UNIT.read_text().replace("/opt/cec-gateway/bin/gateway", program[0])
    path = tmp_path / UNIT.name
    path.write_text(text)
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if UNIT.name in line]
    assert not complaints, complaints


def test_unit_commands_are_gateway_commands_on_its_config() -> None:
    start = shlex.split(service_value("ExecStart"))
    assert Path(start[0]).name == "gateway" and Path(start[0]).is_absolute()
    args = argv_of(start[1:])
    assert (args.command, args.config) == ("run", "/etc/cec-gateway/gateway.yaml")
    assert args.log_format == "json"
    for pre in service_values("ExecStartPre"):
        words = shlex.split(pre.lstrip("-"))
        assert words[0] == start[0]
        pre_args = argv_of(words[1:])
        assert (pre_args.command, pre_args.config) == ("check", args.config)
    # Reload is SIGHUP to the main process; the gateway re-reads config and secrets on it.
    reload = shlex.split(service_value("ExecReload"))
    assert reload[0] in ("/bin/kill", "/usr/bin/kill") and reload[1:] == ["-HUP", "$MAINPID"]
    # 2 is what `gateway run` returns for an invalid config: no restart loop on it.
    assert service_value("RestartPreventExitStatus") == "2"
    for item in service_values("Environment"):
        for name in re.findall(r"([A-Z_][A-Z0-9_]*)=", item):
            assert name in gateway_env_names(), name


def test_unit_stop_timeout_exceeds_the_drain(tmp_path: Path) -> None:
    cfg = load_config(UNIT_CONFIG, env={"CREDENTIALS_DIRECTORY": str(credentials(tmp_path))})
    delay, grace = cfg.timeouts.shutdown_delay, cfg.timeouts.shutdown_grace
    # + 5 s: the workers' master waits that much beyond the grace before SIGKILL.
    assert unit_seconds(service_value("TimeoutStopSec")) > delay + grace + 5
    assert service_value("KillMode") == "mixed"


def test_unit_credentials_are_the_config_secret_files(tmp_path: Path) -> None:
    # Parsed and dumped again: what the comments suggest (TLS files) does not count.
    text = yaml.safe_dump(yaml.safe_load(UNIT_CONFIG.read_text()))
    loaded = {v.split(":", 1)[0]: v.split(":", 1)[1] for v in service_values("LoadCredential")}
    assert loaded
    assert all(src.startswith("/etc/cec-gateway/") for src in loaded.values())
    named = set(re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([A-Za-z0-9_.-]+)", text))
    assert named == set(loaded)
    # Each is read through a *_file key the gateway knows.
    keys = re.findall(r"^\s*([a-z_]+_file):\s*'?\$\{CREDENTIALS_DIRECTORY\}", text, re.M)
    assert keys and all(k.removesuffix("_file") in secret_field_names() for k in keys)
    result = run_check(UNIT_CONFIG, base_env(CREDENTIALS_DIRECTORY=str(credentials(tmp_path))))
    assert result.returncode == 0, result.stderr
    # Without the credentials the gateway refuses to start, naming the file key.
    missing = run_check(UNIT_CONFIG, base_env(CREDENTIALS_DIRECTORY=str(tmp_path / "none")))
    assert missing.returncode == 2 and "secret_key_file" in missing.stderr


def test_unit_execstart_runs_reloads_and_stops_cleanly(tmp_path: Path) -> None:
    """ExecStart for real (config path swapped for a copy on free ports), then ExecReload,
    then SIGTERM as systemd sends it: exit 0."""
    tree = yaml.safe_load(UNIT_CONFIG.read_text())
    port, admin = free_ports(2)
    tree["listen"].update(host="127.0.0.1", port=port)
    tree["admin"].update(port=admin)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(tree))
    start = shlex.split(service_value("ExecStart"))
    argv = [*gateway_program(), *(str(config) if a == "/etc/cec-gateway/gateway.yaml" else a
                                  for a in start[1:])]
    env = base_env(CREDENTIALS_DIRECTORY=str(credentials(tmp_path)))
    for item in service_values("Environment"):
        env.update(dict(pair.split("=", 1) for pair in shlex.split(item)))
    with started(argv, env) as gw:
        line = gw.wait_for(listening)
        assert f":{port}" in log_message(line)
        assert http_get(f"http://127.0.0.1:{admin}/healthz")[0] == 200
        # ExecReload, $MAINPID being the process systemd started.
        reload = [w.replace("$MAINPID", str(gw.p.pid))
                  for w in shlex.split(service_value("ExecReload"))]
        assert subprocess.run(reload, timeout=10, check=False).returncode == 0
        gw.wait_for(lambda ln: "reloaded" in log_message(ln), timeout=15)
        assert gw.p.poll() is None, "SIGHUP reloads, it does not stop the service"
        assert http_get(f"http://127.0.0.1:{admin}/healthz")[0] == 200
        assert gw.stop(timeout=unit_seconds(service_value("TimeoutStopSec"))) == 0, gw.output
