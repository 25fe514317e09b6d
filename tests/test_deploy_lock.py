"""The image's inputs: the lock file it installs from is current, and .dockerignore keeps the
build context to what the Dockerfile copies.

A dependency added to (or removed from, or re-bounded in) pyproject.toml without regenerating
``deploy/requirements.lock`` fails here with the command that regenerates it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "deploy" / "requirements.lock"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_EXTRAS = ("speed",)  # the Dockerfile's build installs these extras
PROJECT_VIA = "cec-gateway (pyproject.toml)"


def regenerate_hint() -> str:
    m = re.search(r"^#\s+(pip-compile .*)$", LOCK.read_text(encoding="utf-8"), re.M)
    command = m.group(1) if m else "pip-compile --generate-hashes ... pyproject.toml"
    return f"deploy/requirements.lock is not current; regenerate it: pip install pip-tools && " \
           f"{command}"


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in IMAGE_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def parse_lock() -> tuple[dict[str, str], dict[str, set[str]], dict[str, int]]:
    """{name: version}, {name: the packages it is there for}, {name: number of hashes}."""
    pins: dict[str, str] = {}
    via: dict[str, set[str]] = {}
    hashes: dict[str, int] = {}
    current = ""
    in_via = False
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if pin:
            current = canonicalize_name(pin.group(1))
            pins[current] = pin.group(2)
            via[current] = set()
            hashes[current] = 0
            in_via = False
            continue
        stripped = line.strip()
        if stripped.startswith("--hash=sha256:") and current:
            hashes[current] += 1
        elif stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                via[current].add(rest)
        elif in_via and stripped.startswith("#   "):
            via[current].add(stripped.removeprefix("#").strip())
        else:
            in_via = False
    return pins, via, hashes


def test_every_dependency_is_pinned_within_its_bounds() -> None:
    pins, _, _ = parse_lock()
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in the lock. {regenerate_hint()}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req}: the lock pins {pins[name]}. {regenerate_hint()}")


def test_the_lock_names_exactly_the_projects_dependencies_as_its_own() -> None:
    """pip-compile marks what pyproject.toml asked for; a removed dependency shows here."""
    pins, via, _ = parse_lock()
    wanted = {canonicalize_name(r.name) for r in direct_requirements()}
    claimed = {name for name, reasons in via.items() if PROJECT_VIA in reasons}
    assert claimed == wanted, regenerate_hint()
    # Every other pin is there for another pinned package (the lock is closed).
    for name, reasons in via.items():
        for reason in reasons - {PROJECT_VIA}:
            assert canonicalize_name(reason) in pins, (name, reason)


def test_every_pin_has_hashes_and_the_image_requires_them() -> None:
    pins, _, hashes = parse_lock()
    assert pins
    assert all(hashes[name] > 0 for name in pins), [n for n in pins if not hashes[n]]
    text = LOCK.read_text(encoding="utf-8")
    assert "--find-links" not in text and "--index-url" not in text, "no machine's sources"
    docker = DOCKERFILE.read_text(encoding="utf-8")
    assert "COPY deploy/requirements.lock" in docker
    assert "pip install --require-hashes -r requirements.lock" in docker
    assert "pip install --no-deps ." in docker, "the package itself resolves nothing again"


# ---------------------------------------------------------------- .dockerignore


def _pattern(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Docker's rule: the last matching line wins; a pattern matching a directory covers
    everything below it."""
    rules = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = _pattern(rule.removeprefix("!").strip("/"))
        if any(pattern.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def dockerfile_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    return sources


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_heavy() -> None:
    sources = dockerfile_sources()
    assert {"pyproject.toml", "gateway", "deploy/requirements.lock"} <= set(sources)
    for source in sources:
        assert not ignored(source.rstrip("/")), source
    for kept in ("gateway/cli.py", "gateway/sandbox/static/widget.js",
                 "gateway/demo/gateway.yaml", "gateway/chat/inject.py"):
        assert (ROOT / kept).exists() and not ignored(kept), kept
    for left_out in (".venv", ".venv/lib/python3.11/site-packages/aiohttp/web.py", ".git/HEAD",
                     "tests/test_cli.py", "bench/run.py", "docs/PROTOCOL.md", "deploy/k8s",
                     "gateway/chat/stale.cpython-311-x86_64-linux-gnu.so",
                     "gateway/__pycache__/cli.cpython-311.pyc", "cec_gateway.egg-info/PKG-INFO",
                     "build/lib/gateway/cli.py", "gateway.yaml"):
        assert ignored(left_out), left_out
