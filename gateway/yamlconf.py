"""YAML configuration plumbing shared by the gateway's config and the sandbox's settings.

nginx-style sizes and durations, ``${NAME}`` interpolation, ``*_key_file`` secrets, and
pydantic errors rewritten as Problems that name the YAML key path, the value (secrets
redacted) and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, SecretStr, ValidationError

from gateway.errors import ConfigError, Problem

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_BARE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$")
# One part of a compound duration: ``1h`` of ``1h30m``; ms before m so "500ms" is not "500m s".
_DURATION_PART_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
# Largest first: a compound duration names each unit once, in this order (as nginx does).
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_KEYS = frozenset({"secret_key", "signing_key", "api_key", "cookie_key", "password"})
# A key whose value is never shown in an error, whatever its spelling ("secretKey",
# "apikey", "db_password", "auth_token"...), nor anything under it.
_SECRET_LIKE = re.compile(r"secret|passw|pwd|credential|private|key|token|auth", re.I)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s]*@")
_SHOWN_MAX = 80
CEC_SECRET_RE = re.compile(r"^[A-Za-z0-9]{43}$")


def check_cec_secret(value: SecretStr | None) -> SecretStr | None:
    """The CEC's own rule for a channel secretKey; the message never shows the value."""
    if value is not None and not CEC_SECRET_RE.match(value.get_secret_value()):
        raise ValueError(
            "the CEC secretKey must be exactly 43 characters of [A-Za-z0-9]; "
            "fix: copy it again from the CEC channel configuration page"
        )
    return value


def parse_size(value: object) -> int:
    """nginx size syntax: ``1024``, ``8k``, ``1m``, ``2g``; ``0`` means no limit."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError("not a size; write bytes or a number with k, m or g, e.g. 1m")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(value: object) -> float:
    """nginx time syntax: ``500ms``, ``10s``, ``5m``, ``1h``, ``1h30m``, ``1m 30s``; a bare
    number is seconds. A compound names each unit once, largest first."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = str(value)
    bare = _DURATION_BARE_RE.match(text)
    if bare:
        return float(bare.group(1))
    units = list(_DURATION_UNITS)
    total, pos, last = 0.0, 0, -1
    while pos < len(text) and not text[pos:].isspace():
        part = _DURATION_PART_RE.match(text, pos)
        if part is None or units.index(part.group(2)) <= last:
            raise ValueError("not a duration; write e.g. 500ms, 10s, 5m, 1h or 1h30m "
                             "(each unit once, largest first)")
        last = units.index(part.group(2))
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        pos = part.end()
    if last < 0:
        raise ValueError("not a duration; write e.g. 500ms, 10s, 5m, 1h or 1h30m")
    return total


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]



def read_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML into a mapping, or raise a ConfigError that says where it broke."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise ConfigError([Problem("", "", f"{source} is not valid YAML at {where}: "
                                   f"{getattr(exc, 'problem', exc)}",
                                   "fix the YAML syntax (indentation, quotes, colons)")]) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError([Problem("", type(tree).__name__, "the config must be a mapping",
                                   "start with keys such as listen:, routes:")])
    return tree


def path_str(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _is_secret_path(loc: tuple[str | int, ...]) -> bool:
    return any(isinstance(p, str) and _SECRET_LIKE.search(p) for p in loc)


def scrub(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://<redacted>@host`` anywhere in ``text``."""
    return _USERINFO.sub(r"\1<redacted>@", text) if "@" in text else text


def shown_value(loc: tuple[str | int, ...], found: bool, value: Any, kind: str) -> str:
    """What an error may show of the value it is about.

    Only a scalar at a known key that is not secret-like: never the value of an unknown key
    (a misspelt secret), of a mapping or list (it may hold secrets), of the root (the whole
    config), or of anything under a key such as ``secret_key``, ``apikey``, ``password``.
    """
    if not found or not loc or kind == "extra_forbidden":
        return ""
    if _is_secret_path(loc):
        return "<redacted>"
    if not isinstance(value, str | int | float | bool) and value is not None:
        return f"<a {'mapping' if isinstance(value, dict) else 'list'}>" if isinstance(
            value, dict | list) else ""
    shown = scrub(repr(value))
    if len(shown) > _SHOWN_MAX:
        shown = shown[:_SHOWN_MAX - 3] + "..."
    return shown


def interpolate(node: Any, loc: tuple[str | int, ...], env: Mapping[str, str],
                 problems: list[Problem]) -> Any:
    if isinstance(node, dict):
        return {k: interpolate(v, (*loc, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(Problem(path_str(loc), f"${{{name}}}",
                                f"environment variable {name} is not set",
                                f"export {name}=... or write ${{{name}:-default}}"))
        return ""

    return _ENV_RE.sub(repl, node)


def read_secret_files(node: Any, loc: tuple[str | int, ...], base: Path,
                       problems: list[Problem]) -> Any:
    """``secret_key_file: path`` becomes ``secret_key: <contents>`` (same for any *_key_file)."""
    if isinstance(node, list):
        return [read_secret_files(v, (*loc, i), base, problems) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        key = str(key)
        if key.endswith("_file") and key[: -len("_file")] in _SECRET_KEYS:
            target = key[: -len("_file")]
            if target in node:
                problems.append(Problem(path_str((*loc, key)), "",
                                        f"both {target} and {key} are set",
                                        f"keep only one of {target} and {key}"))
                continue
            path = (base / str(value)).expanduser()
            try:
                out[target] = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(Problem(path_str((*loc, key)), repr(str(value)),
                                        f"cannot read the secret file: {exc.strerror}",
                                        "point it at a readable file holding only the secret"))
            continue
        out[key] = read_secret_files(value, (*loc, key), base, problems)
    return out


_FIXES = {
    "missing": "add this key",
    "extra_forbidden": "remove it, or check its spelling against the README's config reference",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "literal_error": "",
    "ip_v4_network": "write a CIDR such as 10.0.0.0/8 or 2001:db8::/32",
    "ip_v6_network": "write a CIDR such as 10.0.0.0/8 or 2001:db8::/32",
    "ip_any_network": "write a CIDR such as 10.0.0.0/8 or 2001:db8::/32",
    "too_short": "add at least one entry",
    "less_than_equal": "use a smaller value",
    "greater_than_equal": "use a larger value",
    "string_type": "write a string (quote it)",
    "list_type": "write a YAML list, e.g. [a, b]",
    "model_type": "write a mapping of keys",
    "dict_type": "write a mapping of keys",
    "float_parsing": "write a number",
}


def _lookup(tree: Any, loc: tuple[str | int, ...]) -> tuple[bool, Any]:
    node = tree
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, node


def _known_key(name: str) -> str | None:
    """The config key ``name`` is a misspelling of (``secretKey`` -> ``secret_key``)."""
    from gateway.config import Config

    want = name.replace("_", "").replace("-", "").lower()
    seen: set[type] = set()
    todo: list[Any] = [Config]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field_name, info in model.model_fields.items():
            if field_name.replace("_", "").lower() == want and field_name != name:
                return str(field_name)
            for arg in _model_types(info.annotation):
                todo.append(arg)
    return None


def _model_types(annotation: Any) -> list[Any]:
    from typing import get_args

    from pydantic import BaseModel

    out = []
    stack = [annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            out.append(item)
        stack.extend(get_args(item))
    return out


def problems_from(exc: ValidationError, tree: Any) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        # pydantic reports union members as extra loc parts (e.g. 'IPv4Network'); drop them
        loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
        found, value = _lookup(tree, loc)
        shown = shown_value(loc, found, value, str(err["type"]))
        msg = str(err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        fix = _FIXES.get(str(err["type"]), "")
        if err["type"] in ("ip_v4_network", "ip_v6_network"):
            # The IPv4 | IPv6 union fails once per member; the user made one mistake.
            msg = "not an IPv4 or IPv6 network"
        if "; fix: " in msg:
            msg, fix = msg.split("; fix: ", 1)
        if err["type"] == "extra_forbidden" and loc:
            known = _known_key(str(loc[-1]))
            if known:
                fix = f"did you mean {known}? (keys are snake_case); else remove it"
        problem = Problem(path_str(loc), shown, scrub(msg), scrub(fix))
        if problem not in problems:
            problems.append(problem)
    return problems


