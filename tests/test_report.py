"""What the terminal shows: a step-based training bar with short names, a compact end-of-run summary."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from latentdyn.tracking.report import compact_runs, end_of_run, format_value, metric_lines
from tests.conftest import run_cli


def test_values_are_short() -> None:
    values = (1234.5678, -0.000123456, 3, 15860.0, 2.5e12, None, float("nan"), "lag")
    assert [format_value(v) for v in values] == [
        "1235",
        "-0.0001235",
        "3",
        "15860",
        "2.5e+12",
        "-",
        "-",
        "lag",
    ]


def test_end_of_run_is_compact_and_says_what_next() -> None:
    metrics = {f"k{k}/{m}": 123.456789 * k for k in (1, 2, 4, 8) for m in ("nll", "dnll", "cos", "mag_ratio")}
    text = end_of_run(
        "exp1_vmf", "r1", "/out/r1", metrics, "latentdyn experiment=exp2_injection checkpoint=latest"
    )
    lines = text.splitlines()
    assert lines[0] == "exp1_vmf · run r1 completed"
    assert "(+4 more in run_info.json and metrics.json)" in text
    assert lines[-1] == "next:    latentdyn experiment=exp2_injection checkpoint=latest"
    assert max(len(line) for line in lines) <= 100
    assert len(metric_lines(metrics, limit=3)) == 4


def test_compact_runs_cut_at_width() -> None:
    runs = [
        SimpleNamespace(
            experiment="exp2_injection", metrics={f"mode{i}/dnll_long_name": i * 1.5 for i in range(9)}
        )
    ]
    (line,) = compact_runs(runs, per_run=9, width=60).splitlines()
    assert len(line) == 60 and line.endswith("…")


def test_cli_run_ends_with_its_metrics_and_next_command(tmp_path: Path) -> None:
    args = ["pipeline=tests.pipelines.ok", "name=dummy", "tier=test", "run_id=r", "next=latentdyn-results"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    tail = proc.stdout.strip().splitlines()[-5:]  # nothing after the next command
    assert tail[0] == "dummy · run r completed"
    assert [line.split() for line in tail[1:3]] == [["score", "0.5"], ["n", "3"]]
    assert tail[-1] == "next:    latentdyn-results"


@pytest.mark.parametrize(
    ("name", "short"),
    [("k1/train/nll", "nll"), ("k1/val/nll", "val_nll"), ("train/rollout_nll", "rollout_nll"), ("lr", "lr")],
)
def test_short_metric_names(name: str, short: str) -> None:
    from latentdyn.models.progress import short_metric_name

    assert short_metric_name(name, "k1/") == short


def test_training_bar_counts_steps_with_short_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl
    import torch

    from latentdyn.models.progress import StepProgressBar

    class Tiny(pl.LightningModule):
        metric_prefix = "k1/"

        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"name": "vmf"})
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.w(batch[0]).pow(2).mean()
            self.log("k1/train/nll", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("k1/val/nll", self.w(batch[0]).pow(2).mean(), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(16, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    trainer = pl.Trainer(
        max_steps=10,
        max_epochs=-1,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[StepProgressBar(refresh_steps=1)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Tiny(), loader, loader)
    out = stderr.getvalue()
    assert "train vmf k1" in out and "10/10" in out and "step" in out
    assert "nll=" in out and "val_nll=" in out
    assert "Epoch" not in out and "k1/train" not in out


def test_lightning_prints_each_message_once_and_not_its_inventory(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import latentdyn.models.training  # noqa: F401  (routes Lightning's logging through the root)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        assert logging.getLogger(name).handlers == [], f"{name} prints on its own as well as via the root"
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("`Trainer.fit` stopped: `max_steps=20` reached.")
        rank_zero.info("a message a user can act on")
    assert [r.getMessage() for r in caplog.records] == ["a message a user can act on"]


def test_resumed_run_keeps_the_interrupted_attempts_csv_log(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from latentdyn.models.training import keep_earlier_csv_log

    logger = CSVLogger(save_dir=tmp_path, name="logs", version="")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("step,k1/train/nll\n10,1.5\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = keep_earlier_csv_log(logger)
        logger.log_metrics({"k1/train/nll": 1.2}, step=20)
        logger.save()  # Lightning's writer deletes an existing metrics.csv: the earlier attempt is safe
    assert [str(w.message) for w in caught] == []  # and no warning about it that a user cannot act on
    assert kept == tmp_path / "logs" / "metrics.attempt1.csv" and kept.read_text().startswith("step,")
    assert kept.is_file() and (tmp_path / "logs" / "metrics.csv").is_file()
    assert keep_earlier_csv_log(logger).name == "metrics.attempt2.csv"
