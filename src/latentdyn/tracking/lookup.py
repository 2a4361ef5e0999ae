"""Find the outputs of earlier runs: ``checkpoint=latest`` resolves through the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from latentdyn.tracking.manifest import iter_records
from latentdyn.tracking.results import select_runs, summarize_runs


def latest_run_dir(manifest: Path, experiment: str, key: str = "checkpoint") -> Path:
    """Directory of the newest completed run of ``experiment``; a clear error if there is none.

    ``EXPERIMENT/NAME`` names a sub-run: the newest completed run of ``EXPERIMENT`` whose run id ends in
    ``/NAME`` (an Exp 5 variant, ``exp5_betavae/betavae_smooth``); when ``EXPERIMENT`` has no such sub-runs, the
    folder ``NAME`` of its newest completed run (an Exp 3 representation, ``exp3_rep_compare/mimi``; of a run
    over several seeds, the first seed's: :func:`sub_folder`). ``key`` is
    the config key the reference came from, for the message when there is no such run.
    """
    name, _, sub = experiment.partition("/")
    all_runs = select_runs(summarize_runs(iter_records(manifest)), name, latest=False)
    runs = [r for r in all_runs if r.run_id.endswith(f"/{sub}")] if sub else all_runs
    if sub and not runs and all_runs:
        folder = sub_folder(Path(max(all_runs, key=lambda r: r.end_time or "").run_dir), sub)
        if folder is not None:
            return folder
    if not runs:
        what = f"{name} run with a sub-run {sub!r}" if sub else f"{name} run"
        raise FileNotFoundError(
            f"no completed {what} in {manifest}; run `latentdyn experiment={name}` first or pass {key}=PATH"
        )
    return Path(max(runs, key=lambda r: r.end_time or "").run_dir)


def sub_folder(run_dir: Path, name: str) -> Path | None:
    """``run_dir/name``, or for a run over several seeds the first seed's (``run_dir/seed<s>/name``, lowest
    ``s``); None when neither exists."""
    if (run_dir / name).is_dir():
        return run_dir / name
    seeded = [p for p in run_dir.glob(f"seed*/{name}") if p.is_dir() and p.parent.name[4:].isdigit()]
    return min(seeded, key=lambda p: int(p.parent.name[4:])) if seeded else None


def resolve_checkpoint(
    value: str, manifest: Path, experiment: str, patterns: str | Sequence[str], key: str = "checkpoint"
) -> Path:
    """A checkpoint path from ``value``: a file path, a run directory, ``latest`` (newest completed run of
    ``experiment``), ``latest:EXPERIMENT`` or ``latest:EXPERIMENT/SUB_RUN`` (see :func:`latest_run_dir`). In a
    run directory, the first of ``patterns`` that matches exactly one file under ``checkpoints/`` names the
    checkpoint. ``key``: the config key ``value`` came from (for messages).
    """
    if value == "latest" or value.startswith("latest:"):
        source = value.split(":", 1)[1] if ":" in value else experiment
        return resolve_checkpoint_in_dir(latest_run_dir(manifest, source, key), patterns)
    path = Path(value).expanduser()
    if path.is_dir():
        return resolve_checkpoint_in_dir(path, patterns)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (pass a .ckpt file, a run directory or `latest`)"
        )
    return path


def resolve_checkpoint_in_dir(run_dir: Path, patterns: str | Sequence[str]) -> Path:
    """The single checkpoint under ``run_dir/checkpoints``, ``run_dir/phase1/checkpoints`` (the Phase 1 models of
    an Exp 5 variant) or ``run_dir`` matching the first pattern that matches."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for folder in (run_dir / "checkpoints", run_dir / "phase1" / "checkpoints", run_dir):
        for pattern in patterns:
            matches = sorted(folder.glob(pattern))
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise FileNotFoundError(
                    f"several checkpoints match {pattern!r} in {folder}: {[p.name for p in matches]}"
                )
    found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    raise FileNotFoundError(f"no checkpoint matching {patterns} under {run_dir}; found {found}")
