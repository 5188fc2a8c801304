"""The layers run one way: align.core at the bottom, align.train above it, align.pipeline above that, the CLIs on
top; merge and eval build on align.core only. Read from the imports themselves (ast), function-local ones
included, so a lazy import cannot hide an upward arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which first-party packages each layer may import (besides itself and the layers below it named here).
ALLOWED: dict[str, set[str]] = {
    "align.core": {"align.core"},
    "align.train": {"align.core", "align.train"},
    "merge": {"align.core", "merge"},
    "eval": {"align.core", "eval"},
    "align.export": {"align.core", "align.export"},
    "align.pipeline": {"align.core", "align.train", "align.pipeline", "align.export", "merge", "eval"},
}
FIRST_PARTY = ("align", "merge", "eval")


def layer_of(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every first-party module a file imports, anywhere in it, resolved to its dotted name."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            # `from align.core import models` imports align.core.models
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in FIRST_PARTY]


def package_files() -> list[Path]:
    files = []
    for top in FIRST_PARTY:
        files += [p for p in (ROOT / top).rglob("*.py") if "metrics" not in p.relative_to(ROOT).parts]
    return sorted(files)


def upward_imports(path: Path) -> list[str]:
    layer = layer_of(module_name(path))
    if layer is None:  # the top: align/cli.py and the other command modules may import anything
        return []
    bad = []
    for line, name in imported_modules(path):
        target = layer_of(name)
        if target is not None and target not in ALLOWED[layer]:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({layer} may not import {target})")
        if target is None and name.split(".")[0] == "align" and name not in ("align", "align.__version__"):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports the top layer {name}")
    return bad


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    assert upward_imports(path) == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    core = ROOT / "align" / "core"
    probe = core / "_layer_probe_tmp.py"
    probe.write_text("def f():\n    from align.train.sft import run_sft\n    from eval.run import run_eval\n")
    try:
        assert len(upward_imports(probe)) == 2
    finally:
        probe.unlink()


def test_every_package_file_belongs_to_a_layer_or_the_top() -> None:
    top = {"align", "align.cli", "align.estimate_cli"}
    for path in package_files():
        name = module_name(path)
        assert layer_of(name) is not None or name in top, f"{name} is in no layer"


def module_imports() -> dict[str, set[str]]:
    """Each first-party module and the first-party modules it imports (a `from pkg.mod import name` counts as
    importing pkg.mod)."""
    modules = {module_name(path): path for path in package_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in imported_modules(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_two_modules_import_each_other() -> None:
    """A pair that imports each other (config.py and flat_config.py did, for one helper) hides which one is below."""
    graph = module_imports()
    cycles = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert cycles == []
