"""wandb dashboards (``logger=wandb``): one offline wandb run per tracked run, with its outputs published.

An offline run keeps its records in ``<run_dir>/wandb/offline-run-*/run-<id>.wandb`` (a log of protobuf
records, read by :func:`read_offline_run`) and its media under ``files/media/``.
"""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from latentdyn.tracking import dashboard
from latentdyn.tracking.run import TrackedRun, tracked_run
from tests.conftest import run_cli

WANDB_LOGGER = {
    "_target_": "lightning.pytorch.loggers.WandbLogger",
    "project": "latentdyn-test",
    "entity": None,
    "name": None,
    "mode": "offline",
    "group": None,
    "job_type": None,
    "tags": [],
}


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_CONFIG_DIR": str(tmp_path / ".wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / ".wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / ".wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)


# -- reading an offline run ------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB holding chunks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            yield pending + chunk
            pending = b""


def _items(items: Any) -> dict[str, Any]:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """The one offline wandb run under ``run_dir``: its dir, id, group, job_type, tags, config, history rows
    and summary."""
    from wandb.proto import wandb_internal_pb2 as pb

    found = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(found) == 1, f"expected one offline run in {run_dir}: {found}"
    (store,) = found[0].glob("run-*.wandb")
    out: dict[str, Any] = {"dir": found[0], "config": {}, "history": [], "summary": {}, "exit_code": None}
    for raw in _records(store):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, group=run.run_group, job_type=run.job_type, tags=list(run.tags))
            out["config"].update(_items(run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def history_keys(run: dict[str, Any]) -> set[str]:
    """Every key logged to the run's history, media keys included (their fields are ``<key>/_type``, ...)."""
    return {key.split("/_type")[0] for row in run["history"] for key in row if key.endswith("/_type")} | {
        key for row in run["history"] for key in row
    }


# -- fixtures: a run directory with outputs ------------------------------------------------------------


def _write_outputs(run_dir: Path) -> None:
    import soundfile as sf
    from PIL import Image

    run_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(run_dir / "curves.png")
    (run_dir / "listen").mkdir()
    sf.write(run_dir / "listen" / "utt0.wav", np.zeros(1600, dtype=np.float32), 16000)
    with (run_dir / "summary.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["variant", "nll", "note"], ["a", "1.5", "x"], ["b", "nan", "3"]])
    with (run_dir / "per_step.csv").open("w", newline="") as fh:
        rows = [["mode", "step", "metric", "mean", "lo", "hi"]]
        rows += [
            [mode, s, metric, s * 0.1, 0, 1]
            for mode in ("A", "B")
            for s in (1, 2, 3)
            for metric in ("nll", "cos")
        ]
        csv.writer(fh).writerows(rows)
    # Not published: Lightning's CSV log, and a sub-run's directory (its own wandb run publishes it).
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "metrics.csv").write_text("step,loss\n0,1.0\n")
    (run_dir / "sub").mkdir()
    (run_dir / "sub" / "run_info.json").write_text("{}")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(run_dir / "sub" / "inner.png")


def _run(tmp_path: Path, run_id: str = "R", **kwargs: Any) -> TrackedRun:
    config = {"run_id": run_id, "seed": 0, "logger": dict(WANDB_LOGGER), **kwargs.pop("config", {})}
    return TrackedRun(
        run_dir=kwargs.pop("run_dir", tmp_path / "run"),
        manifest_path=tmp_path / "manifest.jsonl",
        run_id=run_id,
        experiment=kwargs.pop("experiment", "exp_demo"),
        tier="tier1",
        config=config,
        **kwargs,
    )


# -- tests -------------------------------------------------------------------------------------------------


def test_completed_run_publishes_plots_audio_tables_curves_and_metrics(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run.start()
    assert dashboard.active_wandb_run() is not None
    _write_outputs(run.run_dir)
    run.complete({"score": 1.5, "bad": float("nan")})
    assert dashboard.active_wandb_run() is None

    wb = read_offline_run(run.run_dir)
    media = wb["dir"] / "files" / "media"

    def logged(kind: str, pattern: str) -> list[str]:
        return sorted(
            p.relative_to(media / kind).as_posix().split("_0_")[0] for p in (media / kind).rglob(pattern)
        )

    assert logged("images", "*.png") == ["plots/curves"]
    assert logged("audio", "*.wav") == ["audio/listen/utt0"]
    # summary and per_step as tables; each per-step chart (one per metric, a line per mode) has its own.
    assert logged("table", "*.table.json") == [
        "Custom Chart Tables/per_step/cos_table",
        "Custom Chart Tables/per_step/nll_table",
        "tables/per_step",
        "tables/summary",
    ]
    summary_table = json.loads(next((media / "table" / "tables").glob("summary_*.table.json")).read_text())
    assert summary_table["columns"] == ["variant", "nll", "note"]
    assert summary_table["data"] == [["a", 1.5, "x"], ["b", None, "3"]]
    chart = json.loads(next((media / "table").rglob("nll_table_*.table.json")).read_text())
    assert len(chart["data"]) == 6 and {row[1] for row in chart["data"]} == {"A", "B"}

    keys = history_keys(wb)
    assert {"plots/curves", "audio/listen/utt0", "tables/summary", "tables/per_step"} <= keys
    assert {"_wandb/visualize/per_step/nll", "_wandb/visualize/per_step/cos"} <= set(wb["config"])
    assert wb["summary"]["score"] == 1.5 and wb["summary"]["bad"] is None
    assert wb["group"] == "R" and wb["job_type"] == "exp_demo" and wb["exit_code"] == 0
    assert wb["config"]["seed"] == 0
    info = json.loads((run.run_dir / "run_info.json").read_text())
    assert info["status"] == "completed"


def test_failed_run_finishes_its_wandb_run_with_exit_code_1(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        tracked_run(
            run_dir=tmp_path / "run",
            manifest_path=tmp_path / "manifest.jsonl",
            run_id="F",
            experiment="exp_demo",
            config={"run_id": "F", "logger": dict(WANDB_LOGGER)},
        ),
    ):
        raise RuntimeError("boom")
    wb = read_offline_run(tmp_path / "run")
    assert wb["exit_code"] == 1
    assert dashboard.active_wandb_run() is None


def test_no_wandb_run_for_other_loggers_or_other_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_run = _run(tmp_path, config={"logger": {"_target_": "lightning.pytorch.loggers.CSVLogger"}})
    csv_run.start()
    assert csv_run._dashboard is None
    csv_run.complete({})
    monkeypatch.setenv("RANK", "1")
    other_rank = _run(tmp_path, run_id="R1", run_dir=tmp_path / "r1")
    other_rank.start()
    assert other_rank._dashboard is None
    other_rank.complete({})
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "r1" / "wandb").exists()


def test_sub_runs_join_the_composite_group_with_its_grid(tmp_path: Path) -> None:
    parent = _run(tmp_path, run_id="T", experiment="tier1")
    parent.start()
    parent._dashboard.grid = {"seed": 3}  # as for a composite run as a sweep job
    sub = _run(
        tmp_path,
        run_id="T/exp1_vmf",
        experiment="exp1_vmf",
        run_dir=parent.run_dir / "exp1_vmf",
        parent_run_id="T",
    )
    sub.start()
    assert dashboard.active_wandb_run() is sub._dashboard.run
    sub.complete({"k1/dnll": 0.5})
    assert dashboard.active_wandb_run() is parent._dashboard.run
    parent.complete({"exp1/k1/dnll": 0.5})

    wb_sub, wb_parent = read_offline_run(sub.run_dir), read_offline_run(parent.run_dir)
    assert wb_parent["group"] == wb_sub["group"] == "T"
    assert (wb_parent["job_type"], wb_sub["job_type"]) == ("tier1", "exp1_vmf")
    assert wb_sub["id"] != wb_parent["id"] and "/" not in wb_sub["id"]
    assert wb_sub["config"]["grid/seed"] == 3 and "seed=3" in wb_sub["tags"]
    assert wb_sub["summary"]["k1/dnll"] == 0.5 and wb_parent["summary"]["exp1/k1/dnll"] == 0.5


def test_sweep_job_is_grouped_by_the_sweep_and_tagged_with_its_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    sweep_dir = tmp_path / "multirun" / "exp_demo" / "S"
    sweep_dir.mkdir(parents=True)
    # The sweep's command line, as Hydra records it: lr and model.width vary, experiment and logger do not.
    multirun = {
        "hydra": {
            "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": {}},
            "overrides": {"task": ["experiment=exp_demo", "logger=wandb", "lr=0.1,0.01", "model.width=8,16"]},
        }
    }
    (sweep_dir / "multirun.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(multirun)))
    job = OmegaConf.create(
        {
            "hydra": {
                "mode": RunMode.MULTIRUN,
                "sweep": {"dir": str(sweep_dir)},
                "overrides": {"task": ["experiment=exp_demo", "logger=wandb", "lr=0.01", "model.width=16"]},
            }
        }
    )
    monkeypatch.setattr(HydraConfig.instance(), "cfg", job)
    run = _run(tmp_path, run_id="S-3", run_dir=sweep_dir / "3", config={"run_id": "S"})
    run.start()
    run.complete({"score": 2.0})
    wb = read_offline_run(run.run_dir)
    assert wb["group"] == "S" and wb["job_type"] == "exp_demo"
    assert {k: v for k, v in wb["config"].items() if k.startswith("grid/")} == {
        "grid/lr": 0.01,
        "grid/model.width": 16,
    }
    assert set(wb["tags"]) == {"lr=0.01", "model.width=16"}


def test_the_wandb_id_is_stable_across_attempts(tmp_path: Path) -> None:
    first = _run(tmp_path, run_id="A")
    first.start()
    first.fail(RuntimeError("interrupted"))
    first_id = read_offline_run(first.run_dir)["id"]
    assert first_id == dashboard.stable_id("A", "|A|tier1|exp_demo|A")
    assert first_id != dashboard.stable_id("A", "|A|tier1|exp_other|A")


def test_audio_is_capped_listening_files_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import soundfile as sf

    for rel in ("listen/24000Hz/a.wav", "listen/b.wav", "listen/c.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / rel, np.zeros(240, dtype=np.float32), 24000 if "Hz" in rel else 16000)
    monkeypatch.setattr(dashboard, "MAX_AUDIO", 2)
    logged = dashboard._audio(tmp_path, sorted(tmp_path.rglob("*.wav")))
    assert list(logged) == ["audio/listen/b", "audio/listen/c"]
    assert logged["audio/listen/b"]._sample_rate == 16000


def test_per_step_curves_of_both_layouts() -> None:
    tidy = dashboard.per_step_curves(
        ["mode", "step", "metric", "mean"],
        [["A", 1, "nll", 1.0], ["A", 2, "nll", None], ["B", 1, "nll", 3.0], ["A", 1, "cos", 0.5]],
    )
    assert tidy["nll"] == ([[1, 2], [1]], [[1.0, None], [3.0]], ["A", "B"])
    assert tidy["cos"] == ([[1]], [[0.5]], ["A"])
    wide = dashboard.per_step_curves(
        ["strategy", "step", "n", "state_err"], [["ar", 1, 4, 0.1], ["ar", 2, 4, 0.2], ["fix", 1, 4, 0.05]]
    )
    assert wide["state_err"] == ([[1, 2], [1]], [[0.1, 0.2], [0.05]], ["ar", "fix"])
    assert dashboard.per_step_curves(["a", "b"], [[1, 2]]) == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_runs_log_training_curves_plots_tables_and_injection_curves(tmp_path: Path) -> None:
    run_cli(["experiment=exp1_vmf", "debug=smoke", "horizons=[1]", "logger=wandb", "run_id=W"], tmp_path)
    wb = read_offline_run(tmp_path / "outputs" / "tier1" / "exp1_vmf" / "W")
    keys = history_keys(wb)
    # Training curves (Lightning's WandbLogger, attached to the run), the battery table and the key metrics.
    assert any(k.startswith("k1/") and "/val/" in k for k in keys), sorted(keys)
    assert "tables/tables" in keys and "k1/dnll" in wb["summary"]
    assert wb["group"] == "W" and wb["job_type"] == "exp1_vmf" and wb["exit_code"] == 0
    # The job's resolved config, with the fits' hyperparameters beside it rather than over it.
    assert wb["config"]["name"] == "exp1_vmf" and wb["config"]["hparams/horizon"] == 1

    # Exp 2 (no training) on that checkpoint: its plots and its injection per-step curves.
    run_cli(
        ["experiment=exp2_injection", "debug=smoke", "checkpoint=latest", "logger=wandb", "run_id=I"],
        tmp_path,
    )
    run_dir = tmp_path / "outputs" / "tier1" / "exp2_injection" / "I"
    wb = read_offline_run(run_dir)
    keys = history_keys(wb)
    pngs = [p for p in run_dir.rglob("*.png") if "wandb" not in p.relative_to(run_dir).parts]
    assert pngs and {f"plots/{p.stem}" for p in pngs} <= keys
    assert len(list((wb["dir"] / "files" / "media" / "images").rglob("*.png"))) == len(pngs)
    # One chart per metric (a line per mode), and per_step.csv as a table.
    assert {"tables/per_step", "Custom Chart Tables/per_step/nll_table"} <= keys
    assert {"_wandb/visualize/per_step/nll", "_wandb/visualize/per_step/state_err"} <= set(wb["config"])
    assert wb["job_type"] == "exp2_injection" and wb["exit_code"] == 0


@pytest.mark.slow
def test_cli_sweep_jobs_share_the_sweep_group(tmp_path: Path) -> None:
    run_cli(
        [
            "-m",
            "pipeline=tests.pipelines.ok",
            "name=dummy",
            "tier=test",
            "logger=wandb",
            "seed=0,1",
            "run_id=SW",
        ],
        tmp_path,
    )
    for num in (0, 1):
        wb = read_offline_run(tmp_path / "multirun" / "dummy" / "SW" / str(num))
        assert wb["group"] == "SW" and wb["job_type"] == "dummy"
        assert wb["tags"] == [f"seed={num}"] and wb["config"]["grid/seed"] == num
        assert wb["summary"]["score"] == num + 0.5
