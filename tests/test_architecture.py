"""The package's layering and size rules (docs/ARCHITECTURE.md), checked on the source.

Imports go one way: a module imports only from its own layer's package or a lower
layer, never from a higher one, not even lazily inside a function. `model` and `data`
share a layer and do not import each other. Production functions stay short enough to
read (about 80 lines)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_longalign"
NAME = "megatron_longalign"

# Lowest first. A module in layer i may import from layers <= i, and within layer i only
# from its own top-level package (siblings are independent).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("version", "utils", "megatron_compat"),
    ("config",),
    ("parallel",),
    ("model", "data"),
    ("training",),
    ("planning", "convert", "devdata", "scoring"),
    ("train", "gateau", "eval", "datagen"),
)
# Layer 0 is a set of leaf modules that may use each other (utils is what everyone uses).
_SHARED_LAYERS = {0}
MAX_FUNCTION_LINES = 80


def _top_package(module: str) -> str:
    """`megatron_longalign.data.indexed` -> `data`; the package itself -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer_of(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(top)


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the package in `path`, at any depth
    (function-level imports count: a lazy import is still a dependency)."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == NAME]


def _package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_module_has_a_layer():
    tops = {_top_package(_module_name(p)) for p in _package_modules()} - {""}
    unassigned = [t for t in sorted(tops) if not any(t in names for names in LAYERS)]
    assert not unassigned, f"add these to LAYERS (and docs/ARCHITECTURE.md): {unassigned}"


def import_violations() -> list[str]:
    problems = []
    for path in _package_modules():
        source_top = _top_package(_module_name(path))
        if not source_top:
            continue  # megatron_longalign/__init__.py: the package's own front
        source_layer = _layer_of(source_top)
        for line, target in _imported_modules(path):
            target_top = _top_package(target)
            if not target_top or target_top == source_top:
                continue
            target_layer = _layer_of(target_top)
            upward = target_layer > source_layer
            sibling = target_layer == source_layer and source_layer not in _SHARED_LAYERS
            if upward or sibling:
                where = path.relative_to(PACKAGE.parent)
                kind = "a higher layer" if upward else "a sibling package of its layer"
                problems.append(f"{where}:{line} imports {target} ({kind})")
    return problems


def test_imports_go_one_way():
    problems = import_violations()
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check above is not vacuous: a config module importing data is reported."""
    fake = tmp_path / NAME
    (fake / "config").mkdir(parents=True)
    (fake / "data").mkdir()
    (fake / "config" / "bad.py").write_text(
        "def f():\n    from megatron_longalign.data.packing import pack\n"
    )
    (fake / "data" / "ok.py").write_text("from megatron_longalign.config import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert import_violations() == [
        f"{NAME}/config/bad.py:2 imports megatron_longalign.data.packing (a higher layer)"
    ]


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    where = path.relative_to(PACKAGE.parent)
                    found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_production_function_is_longer_than_the_limit():
    found = long_functions()
    assert not found, f"split these (limit {MAX_FUNCTION_LINES} lines):\n" + "\n".join(found)


@pytest.mark.parametrize("limit", [5])
def test_the_length_check_reports_long_functions(limit):
    assert long_functions(limit), "a 5-line limit must find functions in the package"
