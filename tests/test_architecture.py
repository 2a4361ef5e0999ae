"""The layering of DESIGN §2: experiments -> pipeline -> the science packages; no experiment imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import latentdyn

PACKAGE = Path(latentdyn.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_experiment_module_imports_another_experiment() -> None:
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.startswith("latentdyn.experiments"))
        for path in sorted((PACKAGE / "experiments").glob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_lower_layers_never_import_experiments_or_pipeline() -> None:
    for layer in ("pipeline", "diagnostics", "models", "representations", "data", "tracking"):
        for path in sorted((PACKAGE / layer).glob("*.py")):
            upward = {"latentdyn.experiments"} | ({"latentdyn.pipeline"} if layer != "pipeline" else set())
            bad = sorted(m for m in _imported_modules(path) if m.startswith(tuple(upward)))
            assert not bad, f"{layer}/{path.name} imports {bad}"
