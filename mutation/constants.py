"""The supplement to mutation/run.py: mutants of the module-level tables mutmut leaves alone.

mutmut mutates function bodies only, so a table such as ``HOP_BY_HOP`` can lose a member
without any mutant noticing. For each table below, each member in turn is removed from the
source (a copy of the project in a scratch directory) and the module's unit tests are run
in a fresh pytest; the removal must make them fail. ``./dev mutate`` runs this first.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, TARGETS, pytest_cmd

# module (a key of run.TARGETS) -> the tables whose every member a test must need.
TABLES: dict[str, tuple[str, ...]] = {
    "headers": ("HOP_BY_HOP", "_REPLACED_UP", "_TRACE_CONTEXT"),
    "boundary": ("ORIGIN_WIDE", "RESPONSE_HEADERS", "_SINGLE_DOTS", "_DOUBLE_DOTS",
                 "_DEFAULT_PORTS"),
    "policy": ("_REASONS", "_VARY_ORIGIN"),
    "signing": ("DEFAULT_SIGNED_HEADERS", "DEFAULT_PAYLOAD_FIELDS", "_UNRESERVED"),
    "inject": ("MANAGED_FIELDS", "_INVISIBLE", "_SEPARATOR_CATEGORIES"),
}


def members(source: str, table: str) -> Iterator[tuple[str, str]]:
    """(description, source with that member removed) for each member of ``table``."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def at(lineno: int, col: int) -> int:
        # ast columns count UTF-8 bytes
        return offsets[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == table for t in targets):
            continue
        for container in ast.walk(value):
            if isinstance(container, ast.Set | ast.Tuple | ast.List):
                for element in container.elts:
                    start = at(element.lineno, element.col_offset)
                    end = at(element.end_lineno or element.lineno, element.end_col_offset or 0)
                    rest = source[end:]
                    cut = end + (len(rest) - len(rest.lstrip(" ,")) if rest.lstrip().startswith(",")
                                 else 0)
                    yield ast.unparse(element), source[:start] + source[cut:]
            elif isinstance(container, ast.Dict):
                for key, value in zip(container.keys, container.values, strict=True):
                    assert key is not None
                    start = at(key.lineno, key.col_offset)
                    end = at(value.end_lineno or value.lineno, value.end_col_offset or 0)
                    rest = source[end:]
                    cut = end + len(rest) - len(rest.lstrip(" ,"))
                    yield ast.unparse(key), source[:start] + source[cut:]
            elif (isinstance(container, ast.Call) and isinstance(container.func, ast.Name)
                  and container.func.id == "frozenset" and container.args
                  and isinstance(container.args[0], ast.Constant)
                  and isinstance(container.args[0].value, str | bytes)):
                # frozenset("...") : a set of characters, each one a member
                literal = container.args[0]
                text = literal.value
                assert isinstance(text, str | bytes)
                start = at(literal.lineno, literal.col_offset)
                end = at(literal.end_lineno or literal.lineno, literal.end_col_offset or 0)
                for i in range(len(text)):
                    shorter = repr(text[:i]) + " + " + repr(text[i + 1:])
                    yield repr(text[i:i + 1]), f"{source[:start]}({shorter}){source[end:]}"
        return
    raise SystemExit(f"no table {table} at the top level")


def check(module: str) -> list[str]:
    target = TARGETS[module]
    survivors: list[str] = []
    cmd = pytest_cmd(target)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("MUTANT_UNDER_TEST", None)
    with tempfile.TemporaryDirectory(prefix=f"tables-{module}-") as tmp:
        work = Path(tmp)
        for part in ("gateway", "tests"):
            shutil.copytree(ROOT / part, work / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", ".hypothesis"))
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        path = work / target.path
        original = path.read_text("utf-8")
        killed = total = 0
        for table in TABLES.get(module, ()):
            for member, mutated in members(original, table):
                path.write_text(mutated, "utf-8")
                proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL,  # noqa: S603
                                      stderr=subprocess.DEVNULL, timeout=600)
                total += 1
                if proc.returncode == 0:
                    survivors.append(f"{table} without {member}")
                else:
                    killed += 1
        path.write_text(original, "utf-8")
    print(f"{module} tables: {total} members removed, killed {killed}, "
          f"survived {len(survivors)}", flush=True)
    for s in survivors:
        print(f"  SURVIVED {s}")
    return survivors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mutation/constants.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="(accepted, unused)")
    parser.add_argument("--only", action="append", default=[], help="(accepted, unused)")
    args = parser.parse_args(argv)
    modules = [m for m in (args.modules or list(TARGETS)) if m in TABLES]
    failed = [s for m in modules for s in check(m)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
