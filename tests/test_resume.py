"""Resumable training: a fit killed mid-way and continued with ``resume=true`` ends exactly where an
uninterrupted fit ends (weights, optimiser state, best-validation state, battery), and a horizon whose final
checkpoint exists is not trained again."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from latentdyn.data.windows import WindowSpec, window_anchors
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.pipeline.train import model_battery, train_horizon
from tests.conftest import compose_at, run_cli

MAX_STEPS, VAL_EVERY, CKPT_EVERY, EPOCH_BATCHES = 20, 10, 5, 15
# A tiny model with dropout (so the global RNG matters), a short warm-up (so the schedule matters).
TINY = [
    "experiment=exp1_vmf",
    "debug=smoke",
    "logger=none",
    "horizons=[1]",
    "model.backbone.hidden=32",
    "model.backbone.dropout=0.2",
    "model.optimizer.warmup_steps=5",
    f"trainer.max_steps={MAX_STEPS}",
    f"trainer.val_check_interval={VAL_EVERY}",
    f"checkpointing.every_n_steps={CKPT_EVERY}",
]


class Killed(RuntimeError):
    """Stands for the process being killed."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[str]]:
    """A root with the smoke latent store, the store and the overrides of the tiny config: a batch size that
    gives epochs of EPOCH_BATCHES batches, so checkpoints fall mid-epoch (10) and at an epoch's end (15)."""
    root = tmp_path_factory.mktemp("resume")
    cfg = compose_at(root, TINY, root / "probe")
    store = prepare_latent_store(cfg)
    n = len(window_anchors(store, "train", WindowSpec(int(cfg.model.context), 1)))
    batch_size = math.ceil(n / EPOCH_BATCHES)
    assert math.ceil(n / batch_size) == EPOCH_BATCHES, n
    return root, store, [*TINY, f"datamodule.batch_size={batch_size}"]


class Probe:
    """Wraps ``build_trainer`` to record the optimiser steps each fit runs (``fits``) and the steps it
    validates (``vals``), and to raise :class:`Killed` when a fit is about to run step ``kill_at + 1``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from lightning.pytorch.callbacks import Callback

        import latentdyn.models.training as training

        self.kill_at: int | None = None
        self.fits: list[list[int]] = []
        self.vals: list[list[int]] = []
        build = training.build_trainer
        probe = self

        class Watch(Callback):
            def on_train_batch_start(self, trainer, *args: Any) -> None:
                if probe.kill_at is not None and trainer.global_step == probe.kill_at:
                    raise Killed(f"killed before step {trainer.global_step + 1}")

            def on_train_batch_end(self, trainer, *args: Any) -> None:
                probe.fits[-1].append(trainer.global_step)

            def on_validation_end(self, trainer, *args: Any) -> None:
                if not trainer.sanity_checking:
                    probe.vals[-1].append(trainer.global_step)

        def build_trainer(cfg, logger, callbacks=(), **kwargs):
            probe.fits.append([])
            probe.vals.append([])
            return build(cfg, logger, [*callbacks, Watch()], **kwargs)

        monkeypatch.setattr(training, "build_trainer", build_trainer)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[Probe]:
    yield Probe(monkeypatch)


def _cfg(setup: tuple[Path, Any, list[str]], run: str, *overrides: str) -> DictConfig:
    root, _, tiny = setup
    return compose_at(root, [*tiny, *overrides], root / run)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers equal to 1e-6."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=where)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=0, abs=1e-6) or (math.isnan(a) and math.isnan(b)), where
    else:
        assert a == b, where


def _run(cfg: DictConfig, store: Any) -> tuple[Any, Path, dict[str, float]]:
    return train_horizon(cfg, store, 1, None)


def test_a_killed_and_resumed_fit_ends_like_an_uninterrupted_one(setup, probe: Probe) -> None:
    """Killed after step 12 (resumes from 10, a validated step mid-epoch), killed again after step 17
    (resumes from 15, an unvalidated step at an epoch's end), then run to the end."""
    _, store, _ = setup
    ref_model, ref_final, ref_fit = _run(_cfg(setup, "uninterrupted"), store)
    assert probe.fits[-1] == list(range(1, MAX_STEPS + 1))
    assert probe.vals[-1] == [VAL_EVERY, 2 * VAL_EVERY]

    cfg = _cfg(setup, "killed")
    last = Path(cfg.run_dir) / "checkpoints" / "vmf_k1_last.ckpt"
    final = Path(cfg.run_dir) / "checkpoints" / "vmf_k1_final.ckpt"
    probe.kill_at = 12
    with pytest.raises(Killed):
        _run(cfg, store)
    assert _load(last)["global_step"] == 10 and not final.exists()
    assert not list(last.parent.glob("*.tmp"))

    resumed = _cfg(setup, "killed", "resume=true")
    probe.kill_at = 17
    with pytest.raises(Killed):
        _run(resumed, store)
    assert probe.fits[-1] == list(range(11, 18))
    assert probe.vals[-1] == []  # step 10 was validated before its checkpoint: not again
    state = _load(last)
    assert state["global_step"] == 15
    assert state["callbacks"]["RestoreBestValidation"]["best_step"] == VAL_EVERY

    probe.kill_at = None
    model, path, fit = _run(resumed, store)
    assert probe.fits[-1] == list(range(16, MAX_STEPS + 1))
    assert probe.vals[-1] == [2 * VAL_EVERY]
    assert path == final and final.is_file() and not last.exists()

    _assert_same(dict(model.state_dict()), dict(ref_model.state_dict()), "weights")
    _assert_same(fit, ref_fit, "fit")
    assert set(fit) == {"k1/train/nll", "k1/val/nll"}
    ref_ckpt, ckpt = _load(ref_final), _load(final)
    for key in ("optimizer_states", "lr_schedulers", "callbacks", "global_step"):
        _assert_same(ckpt[key], ref_ckpt[key], key)
    assert ckpt["callbacks"]["RestoreBestValidation"]["best_step"] in (VAL_EVERY, 2 * VAL_EVERY)
    _assert_same(model_battery(resumed, model, store), model_battery(resumed, ref_model, store), "battery")


def test_killed_after_its_last_step_and_after_its_final_checkpoint(
    setup, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the last periodic checkpoint (at max_steps) and the final one, the resumed fit trains
    no step and reports what the uninterrupted fit logged; resumed once more, the horizon is not trained
    again: its final checkpoint is loaded."""
    import latentdyn.models.training as training

    _, store, _ = setup
    ref_model, _, ref_fit = _run(_cfg(setup, "finished-ref", "trainer.max_steps=10"), store)
    save_final = training.save_final_checkpoint

    def killed(*args: Any) -> None:
        raise Killed("killed before the final checkpoint")

    monkeypatch.setattr(training, "save_final_checkpoint", killed)
    with pytest.raises(Killed):
        _run(_cfg(setup, "finished", "trainer.max_steps=10"), store)
    monkeypatch.setattr(training, "save_final_checkpoint", save_final)
    resumed = _cfg(setup, "finished", "trainer.max_steps=10", "resume=true")
    model, final, fit = _run(resumed, store)
    assert probe.fits[-1] == [] and fit == ref_fit and set(fit) == {"k1/train/nll", "k1/val/nll"}
    _assert_same(dict(model.state_dict()), dict(ref_model.state_dict()), "weights")
    fits = len(probe.fits)
    again, path, again_fit = _run(resumed, store)
    assert len(probe.fits) == fits  # no trainer at all
    assert path == final and again_fit == fit and again.metric_prefix == "k1/" and not again.training
    _assert_same(dict(again.state_dict()), dict(model.state_dict()), "weights")


def test_resume_without_a_checkpoint_trains_from_the_start(setup, probe: Probe) -> None:
    _, store, _ = setup
    probe.kill_at = 3  # before the first periodic checkpoint
    with pytest.raises(Killed):
        _run(_cfg(setup, "early", "trainer.max_steps=6"), store)
    probe.kill_at = None
    _run(_cfg(setup, "early", "trainer.max_steps=6", "resume=true"), store)
    assert probe.fits[-1] == list(range(1, 7))


def test_periodic_checkpoints_load_weights_only_and_are_replaced_atomically(
    setup, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that dies half-way leaves the previous ``last`` intact (and no temporary file)."""
    import lightning.pytorch as pl

    _, store, _ = setup
    cfg = _cfg(setup, "atomic", "trainer.max_steps=10")
    last = Path(cfg.run_dir) / "checkpoints" / "vmf_k1_last.ckpt"
    save = pl.Trainer.save_checkpoint

    def dying_save(self, filepath, *args, **kwargs):
        if self.global_step == 10 and Path(filepath).name.startswith("vmf_k1_last"):
            Path(filepath).write_bytes(b"half a checkpoint")
            raise Killed("killed while writing")
        return save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", dying_save)
    with pytest.raises(Killed):
        _run(cfg, store)
    state = _load(last)
    assert state["global_step"] == 5
    assert set(state["callbacks"]) >= {"RestoreBestValidation", "LastLoggedMetrics", "GlobalRngState"}
    assert list(last.parent.iterdir()) == [last]


def test_best_validation_state_goes_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    """A fit resumed after its best validation restores the weights of that validation at its end."""
    from types import SimpleNamespace

    from latentdyn.models.training import RestoreBestValidation

    best = torch.nn.Linear(3, 2)
    saved = RestoreBestValidation("val/nll")
    trainer = SimpleNamespace(
        sanity_checking=False, callback_metrics={"val/nll": torch.tensor(0.5)}, global_step=7
    )
    saved.on_validation_end(trainer, best)
    torch.save(saved.state_dict(), tmp_path / "state.pt")
    restored = RestoreBestValidation("val/nll")
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (restored.best, restored.best_step) == (0.5, 7)
    trainer.callback_metrics = {"val/nll": torch.tensor(0.9)}  # worse: not kept
    later = torch.nn.Linear(3, 2)
    restored.on_validation_end(trainer, later)
    restored.on_fit_end(trainer, later)
    _assert_same(dict(later.state_dict()), dict(best.state_dict()), "weights")
    with pytest.raises(ValueError, match="monitors"):
        RestoreBestValidation("val/rollout_nll").load_state_dict(saved.state_dict())


def test_checkpoint_interval_must_be_a_positive_integer(setup) -> None:
    from latentdyn.models.training import PeriodicCheckpoint

    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            PeriodicCheckpoint("x.ckpt", bad)


def _metrics_without_paths(run_dir: Path) -> dict[str, Any]:
    """metrics.json without the entries that name the run's own directory (checkpoint paths)."""
    details = json.loads((run_dir / "metrics.json").read_text())
    for horizon in details["horizons"].values():
        horizon.pop("checkpoint")
    return details


@pytest.mark.slow
def test_cli_exp1_killed_during_its_second_horizon_resumes_with_the_same_metrics(tmp_path: Path) -> None:
    """``latentdyn experiment=exp1_vmf`` killed (SIGKILL) while training k=2, rerun with ``resume=true``:
    k=1 is not trained again, k=2 continues from its last checkpoint, and metrics.json equals an
    uninterrupted run's."""
    common = [
        "experiment=exp1_vmf",
        "debug=smoke",
        "horizons=[1,2]",
        "model.backbone.hidden=32",
        "trainer.max_steps=200",
        "checkpointing.every_n_steps=10",
    ]
    run_cli([*common, "run_id=whole"], tmp_path)
    env = {**os.environ, "LATENTDYN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "outputs" / "tier1" / "exp1_vmf" / "killed"
    last_k2 = run_dir / "checkpoints" / "vmf_k2_last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentdyn", *common, "run_id=killed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not last_k2.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert last_k2.exists() and not (run_dir / "checkpoints" / "vmf_k2_final.ckpt").exists()
    k1_final = run_dir / "checkpoints" / "vmf_k1_final.ckpt"
    k1_written = k1_final.stat().st_mtime_ns

    run_cli([*common, "run_id=killed", "resume=true"], tmp_path)
    log_text = (run_dir / "run.log").read_text()
    assert "k=1 is already trained" in log_text and "resuming the fit from" in log_text
    assert k1_final.stat().st_mtime_ns == k1_written
    assert _metrics_without_paths(run_dir) == _metrics_without_paths(run_dir.parent / "whole")
