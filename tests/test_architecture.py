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


#: Top-level modules every layer may import: they import no latentdyn subpackage (``statistics``: numpy only).
TOP_LEVEL_HELPERS = ("latentdyn.config", "latentdyn.errors", "latentdyn.jsonio", "latentdyn.statistics")


def _latentdyn_imports(path: Path) -> set[str]:
    return {m for m in _imported_modules(path) if m == "latentdyn" or m.startswith("latentdyn.")}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_tracking_imports_only_itself_and_the_top_level_helpers() -> None:
    """``tracking`` (run records, results tables, sweep summaries) sits below the science packages: no
    diagnostics, models, pipeline, data or representations (the sweep summary's statistics are top level)."""
    allowed = ("latentdyn.tracking", *TOP_LEVEL_HELPERS)
    offenders = {
        path.name: sorted(m for m in _latentdyn_imports(path) if not _under(m, allowed))
        for path in sorted((PACKAGE / "tracking").glob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_top_level_helpers_import_no_latentdyn_package() -> None:
    for module in TOP_LEVEL_HELPERS:
        path = PACKAGE / f"{module.removeprefix('latentdyn.')}.py"
        bad = sorted(m for m in _latentdyn_imports(path) if not _under(m, TOP_LEVEL_HELPERS))
        assert not bad, f"{path.name} imports {bad}"
    assert not (PACKAGE / "diagnostics" / "statistics.py").exists(), "moved to latentdyn/statistics.py"


# Modules that write only inside an artifact's temporary build directory (made visible whole by the
# artifact's rename, latentdyn.artifacts) or into a `.tmp` name they rename themselves.
WRITES_INSIDE_AN_ARTIFACT_BUILD = {
    "artifacts.py",
    "data/audio_cache.py",
    "data/corpus.py",
    "data/download.py",
    "data/latent_store.py",
    "data/synthetic.py",
    "representations/extract.py",
    "representations/pca.py",
}


def _direct_writes(path: Path) -> list[str]:
    """Calls that write a file directly: ``.write_text/.write_bytes``, ``open(..., "w")``, ``savefig``,
    ``soundfile.write``, ``np.save`` (with their line numbers); rendering into an in-memory ``buf`` first
    is how the atomic writers are fed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
        modes += [
            k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)
        ]
        into_memory = bool(node.args) and isinstance(node.args[0], ast.Name) and node.args[0].id == "buf"
        writes = name in ("write_text", "write_bytes") or (name == "savefig" and not into_memory)
        writes |= name in ("save", "savez") and owner == "np"
        writes |= name == "write" and owner in ("sf", "soundfile") and not into_memory
        writes |= name == "open" and any(isinstance(m, str) and ("w" in m or "a" in m) for m in modes)
        if writes:
            found.append(f"{name} at line {node.lineno}")
    return found


def test_run_outputs_are_written_through_the_atomic_helpers() -> None:
    """Every file a run writes goes through latentdyn.jsonio's atomic writers (a reader never sees half)."""
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in WRITES_INSIDE_AN_ARTIFACT_BUILD or rel == "jsonio.py":
            continue
        if writes := _direct_writes(path):
            offenders[rel] = writes
    assert offenders == {}
