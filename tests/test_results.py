"""`latentdyn-results`: table contents, filters, failed/crashed sections, no torch import."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from latentdyn.tracking.manifest import append_record
from latentdyn.tracking.results import main


def _run(manifest: Path, run_id: str, experiment: str, t: int, status: str | None, metrics=None, error=None):
    base = {"run_id": run_id, "experiment": experiment, "tier": "tier1", "run_dir": f"/runs/{run_id}"}
    append_record(manifest, {**base, "status": "started", "time": f"2026-01-01T00:00:{t:02d}"})
    if status:
        line = {**base, "status": status, "time": f"2026-01-01T00:00:{t + 1:02d}", "metrics": metrics or {}}
        line["weights"] = {"mel": {"source": "none"}}
        line["data"] = {"corpus": "synthetic", "split": "stratified", "label": "synthetic/stratified"}
        if error:
            line["error"] = error
        append_record(manifest, line)


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    manifest = out / "manifest.jsonl"
    _run(manifest, "a1", "exp1_vmf", 1, "completed", {"nll": 1.5, "cos": 0.25})
    _run(manifest, "b1", "exp2_injection", 3, "completed", {"auc": 7.0})
    _run(manifest, "a2", "exp1_vmf", 5, "completed", {"nll": 1.25, "cos": 0.5})
    _run(manifest, "f1", "exp1_vmf", 7, "failed", error={"type": "ValueError", "message": "bad k"})
    _run(manifest, "c1", "exp2_injection", 9, None)
    return out


def _csv_rows(outputs: Path) -> list[dict[str, str]]:
    with (outputs / "results_table.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_table_has_one_row_per_completed_run_with_metrics(outputs: Path, capsys) -> None:
    assert main(["--outputs", str(outputs)]) == 0
    rows = _csv_rows(outputs)
    assert [r["run_id"] for r in rows] == ["a1", "b1", "a2"]
    assert rows[0]["nll"] == "1.5" and rows[0]["cos"] == "0.25" and rows[0]["auc"] == ""
    assert rows[1]["auc"] == "7.0"
    assert rows[0]["weights"] == "mel:none" and rows[0]["data"] == "synthetic/stratified"
    md = (outputs / "results_table.md").read_text()
    assert "## exp1_vmf" in md and "## exp2_injection" in md
    failed = md.split("## Failed runs")[1].split("##")[0]
    assert "`f1`" in failed and "ValueError: bad k" in failed
    crashed = md.split("## Crashed")[1]
    assert "`c1`" in crashed and "`a1`" not in crashed
    assert "| a2 |" in capsys.readouterr().out


def test_latest_keeps_newest_per_experiment(outputs: Path) -> None:
    main(["--outputs", str(outputs), "--latest"])
    assert [r["run_id"] for r in _csv_rows(outputs)] == ["b1", "a2"]


def test_experiment_filter(outputs: Path) -> None:
    main(["--outputs", str(outputs), "--experiment", "exp1_vmf"])
    rows = _csv_rows(outputs)
    assert [r["run_id"] for r in rows] == ["a1", "a2"]
    assert "auc" not in rows[0]
    md = (outputs / "results_table.md").read_text()
    assert "c1" not in md and "`f1`" in md


def test_no_save_writes_nothing(outputs: Path) -> None:
    main(["--outputs", str(outputs), "--no-save"])
    assert not (outputs / "results_table.csv").exists()
    assert not (outputs / "results_table.md").exists()


def test_missing_manifest_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["--outputs", str(tmp_path)]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_results_command_does_not_import_torch(outputs: Path) -> None:
    code = (
        "import sys; from latentdyn.tracking.results import main; "
        f"main(['--outputs', {str(outputs)!r}, '--no-save']); "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_metrics_with_ci_bounds_show_as_mean_and_interval(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    manifest = out / "manifest.jsonl"
    seeds = {"k1_dnll": -1.5, "k1_dnll_ci_low": -2.0, "k1_dnll_ci_high": -1.25, "n_seeds": 3, "cos": 0.5}
    _run(manifest, "s1", "exp4_linear_readout", 1, "completed", seeds)
    _run(manifest, "s0", "exp4_linear_readout", 3, "completed", {"k1_dnll": -1.0, "cos": 0.25})
    assert main(["--outputs", str(out)]) == 0
    rows = {r["run_id"]: r for r in _csv_rows(out)}
    # The CSV keeps separate numeric columns.
    assert rows["s1"]["k1_dnll"] == "-1.5" and rows["s1"]["k1_dnll_ci_low"] == "-2.0"
    assert rows["s1"]["k1_dnll_ci_high"] == "-1.25" and rows["s1"]["n_seeds"] == "3"
    assert rows["s0"]["k1_dnll_ci_low"] == ""
    # The markdown merges them into one cell; a run without bounds shows its value alone.
    md = (out / "results_table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run_id"))
    assert "k1_dnll_ci_low" not in header and "| k1_dnll |" in header and "n_seeds" in header
    assert "| -1.5 [-2, -1.25] |" in md
    assert "| -1 |" in md
