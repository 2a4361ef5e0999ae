"""Find the outputs of earlier runs: ``checkpoint=latest`` resolves through the manifest."""

from __future__ import annotations

from pathlib import Path

from latentdyn.tracking.manifest import iter_records
from latentdyn.tracking.results import select_runs, summarize_runs


def latest_run_dir(manifest: Path, experiment: str) -> Path:
    """Directory of the newest completed run of ``experiment``; a clear error if there is none."""
    runs = select_runs(summarize_runs(iter_records(manifest)), experiment, latest=True)
    if not runs:
        raise FileNotFoundError(
            f"no completed {experiment} run in {manifest}; run `latentdyn experiment={experiment}` first "
            "or pass checkpoint=PATH"
        )
    return Path(runs[0].run_dir)


def resolve_checkpoint(value: str, manifest: Path, experiment: str, pattern: str) -> Path:
    """A checkpoint path from ``value``: a file path, ``latest`` (newest completed run of ``experiment``) or
    ``latest:EXPERIMENT``; in a run directory the file matching ``checkpoints/<pattern>`` is taken.
    """
    if value == "latest" or value.startswith("latest:"):
        source = value.split(":", 1)[1] if ":" in value else experiment
        run_dir = latest_run_dir(manifest, source)
        matches = sorted((run_dir / "checkpoints").glob(pattern))
        if len(matches) != 1:
            found = [p.name for p in (run_dir / "checkpoints").glob("*.ckpt")]
            raise FileNotFoundError(
                f"expected one checkpoint matching {pattern!r} in {run_dir / 'checkpoints'}, found {found}"
            )
        return matches[0]
    path = Path(value).expanduser()
    if path.is_dir():
        return resolve_checkpoint_in_dir(path, pattern)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (pass a .ckpt file, a run directory or `latest`)"
        )
    return path


def resolve_checkpoint_in_dir(run_dir: Path, pattern: str) -> Path:
    matches = sorted((run_dir / "checkpoints").glob(pattern)) or sorted(run_dir.glob(pattern))
    if len(matches) != 1:
        raise FileNotFoundError(
            f"expected one checkpoint matching {pattern!r} under {run_dir}, found {matches}"
        )
    return matches[0]
