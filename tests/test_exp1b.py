"""Exp 1B (rollout fine-tuning) under debug=smoke: the unrolled loss against one-step and rollout oracles,
the scheduled-sampling ramp, gradients through fed-back predictions, and the pipeline's outputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from latentdyn.data.windows import WindowDataset, WindowSpec, window_anchors
from latentdyn.diagnostics.injection import InjectionConfig, run_injection
from latentdyn.experiments import exp1_vmf, exp1b_vmf_rollout
from latentdyn.experiments.common import build_datamodule
from latentdyn.experiments.composite import run_sub_experiment
from latentdyn.experiments.exp2_injection import injection_diagnostic, store_of_checkpoint
from latentdyn.models.dynamics import DynamicsModel, load_dynamics
from latentdyn.models.net import DynamicsNet
from latentdyn.models.rollout import (
    RolloutFinetuneModule,
    feed_probability,
    rollout_grid,
    rollout_spec,
    unrolled_nll,
)
from tests.conftest import compose_at

SMOKE = ["debug=smoke"]
MODES = ("A_teacher", "B_periodic", "C_one_shot", "D_rollout")
# Fine-tuning in the pipeline test: R steps, optimiser steps (the ramp runs over all of them).
STEPS, MAX_STEPS = 3, 10
BACKBONE = {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 32, "layers": 2}
HEAD = {"_target_": "latentdyn.models.heads.VMFLogNormalHead"}
OPTIMIZER = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0}


def _compose(root: Path, name: str, *overrides: str, logger: str = "none") -> DictConfig:
    return compose_at(root, [f"experiment={name}", *SMOKE, f"logger={logger}", *overrides], root / name)


@pytest.fixture(scope="module")
def exp1_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Exp 1 model (k = 1) trained as a tracked run, so the manifest knows it: (root, checkpoint)."""
    root = tmp_path_factory.mktemp("exp1b")
    cfg = _compose(root, "exp1_vmf", "horizons=[1]")
    sub_cfg, _ = run_sub_experiment(cfg, "exp1_vmf", exp1_vmf.run, base=cfg)
    return root, Path(sub_cfg.run_dir) / "checkpoints" / "vmf_k1_final.ckpt"


@pytest.fixture(scope="module")
def exp1b_run(exp1_run: tuple[Path, Path]) -> tuple[DictConfig, dict[str, float]]:
    """Exp 1B fine-tuning of the newest Exp 1 run (``checkpoint=latest``), with a CSV training log."""
    root, _ = exp1_run
    cfg = _compose(
        root,
        "exp1b_vmf_rollout",
        "checkpoint=latest",
        f"rollout.steps={STEPS}",
        f"trainer.max_steps={MAX_STEPS}",
        "rollout.warmup_steps=0",
        logger="csv",
    )
    return cfg, exp1b_vmf_rollout.run(cfg)


def _tiny_net(dim: int = 8, context: int = 3, seed: int = 0) -> DynamicsNet:
    torch.manual_seed(seed)
    return DynamicsNet(dim, context, 1, BACKBONE, HEAD, context_stride=1)


def _train_windows(cfg: DictConfig, model: DynamicsModel, steps: int, n: int) -> tuple[WindowDataset, dict]:
    """The first ``n`` train segments of ``steps`` rollout steps for ``model``, and their batch."""
    store = store_of_checkpoint(cfg, model.run_config)
    spec = rollout_spec(model.context, model.horizon, steps)
    windows = WindowDataset(store, window_anchors(store, "train", spec)[:n], spec)
    return windows, windows.get_batch(np.arange(n))


def test_one_step_unroll_equals_the_exp1_loss_on_the_same_windows(exp1_run) -> None:
    root, ckpt = exp1_run
    model = load_dynamics(ckpt)
    cfg = _compose(root, "exp1b_vmf_rollout", "rollout.steps=1")
    module = exp1b_vmf_rollout.build_finetune_module(cfg, model, ckpt).eval()  # no dropout noise
    store = store_of_checkpoint(cfg, model.run_config)
    exp1_batch = build_datamodule(cfg, store, model).dataset("train").get_batch(np.arange(64))
    dm = exp1b_vmf_rollout.rollout_datamodule(cfg, store, module)
    batch = dm.dataset("train").get_batch(np.arange(64))
    assert torch.equal(batch["anchor"], exp1_batch["anchor"])
    with torch.no_grad():
        one_step = model.nll_per_dim(exp1_batch)
        for p in (0.0, 1.0):
            out = module.unroll(batch, p, step=0)
            assert out.per_step.shape == (1,)
            assert out.loss.item() == pytest.approx(one_step.item(), rel=1e-6, abs=1e-7)


def test_teacher_forced_unroll_scores_each_step_like_exp1_windows(exp1_run) -> None:
    _, ckpt = exp1_run
    model = load_dynamics(ckpt)
    cfg = _compose(exp1_run[0], "exp1b_vmf_rollout")
    steps, n = 4, 48
    windows, batch = _train_windows(cfg, model, steps, n)
    spec = WindowSpec(model.context, model.horizon, model.context_stride)
    with torch.no_grad():
        out = unrolled_nll(model.net, rollout_grid(batch), feed_prob=0.0)
        for r in range(steps):
            # Step r's context ends (R - 1 - r) k frames before the segment's last context frame.
            shifted = WindowDataset(windows.store, windows.anchors - (steps - 1 - r) * model.horizon, spec)
            expected = model.nll_per_dim(shifted.get_batch(np.arange(n)))
            assert out.per_step[r].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.fed_fraction == 0.0


def test_free_running_unroll_matches_the_injection_rollout(exp1_run) -> None:
    """At p = 1 with mean feedback the unroll is the injection diagnostic's D_rollout on the same segments."""
    _, ckpt = exp1_run
    model = load_dynamics(ckpt)
    steps, n = 5, 32
    _, batch = _train_windows(_compose(exp1_run[0], "exp1b_vmf_rollout"), model, steps, n)
    grid = rollout_grid(batch)
    inj = InjectionConfig(modes=["D_rollout"], horizon=steps, n_starts=n, bank_size=0)
    with torch.no_grad():
        out = unrolled_nll(model.net, grid, feed_prob=1.0, feed="mean")
        reference = run_injection(model.net, grid, inj, bank=None).per_start["nll"][0].mean(axis=0)
    assert out.fed_fraction == 1.0
    np.testing.assert_allclose(out.per_step.double().numpy(), reference, rtol=1e-5)
    assert out.per_step[-1] > out.per_step[0], "free-running should score the GT worse than teacher forcing"


def test_feed_probability_follows_the_linear_ramp() -> None:
    assert [feed_probability(s, 100) for s in (0, 25, 50, 99, 100, 250)] == [0.0, 0.25, 0.5, 0.99, 1.0, 1.0]
    assert feed_probability(0, 0) == 1.0
    with pytest.raises(ValueError):
        feed_probability(-1, 10)
    net, rows, p = _tiny_net(), 4000, 0.3
    grid = torch.randn(rows, net.context + 3, net.dim)
    with torch.no_grad():
        out = unrolled_nll(net, grid, p, generator=torch.Generator().manual_seed(1))
    # Binomial over rows x 2 feedback steps: 5 standard deviations.
    assert abs(out.fed_fraction - p) < 5 * math.sqrt(p * (1 - p) / (2 * rows))
    module = RolloutFinetuneModule(net.dim, net.context, 1, BACKBONE, HEAD, OPTIMIZER, 1, ramp_steps=10)
    assert module.feed_prob() == 0.0  # no trainer: step 0


def test_gradients_flow_through_fed_back_means_unless_detached() -> None:
    net = _tiny_net()
    grid = torch.randn(16, net.context + 2, net.dim)

    def grads(p: float, detach: bool, feed: str = "mean") -> list[torch.Tensor]:
        net.zero_grad()
        out = unrolled_nll(net, grid, p, feed, detach, torch.Generator().manual_seed(0))
        out.loss.backward()
        return [q.grad.clone() for q in net.parameters()]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.allclose(x, y, rtol=1e-6, atol=1e-8) for x, y in zip(a, b, strict=True))

    assert not same(grads(1.0, False), grads(1.0, True)), "BPTT through the fed-back mean"
    assert same(grads(0.0, False), grads(0.0, True)), "nothing is fed back at p = 0"
    assert all(torch.isfinite(g).all() for g in grads(1.0, False, "sample"))
    with pytest.raises(ValueError, match="feed"):
        unrolled_nll(net, grid, 0.5, feed="argmax")


def test_a_finetuning_step_changes_the_parameters(exp1_run) -> None:
    root, ckpt = exp1_run
    source = load_dynamics(ckpt)
    cfg = _compose(root, "exp1b_vmf_rollout", "rollout.steps=2")
    module = exp1b_vmf_rollout.build_finetune_module(cfg, source, ckpt)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    assert all(torch.equal(v, source.net.state_dict()[k]) for k, v in before.items()), "warm start"
    _, batch = _train_windows(cfg, source, 2, 32)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-2)
    loss = module.unroll(batch, 0.5, step=0).loss
    loss.backward()
    optimizer.step()
    after = module.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, source.net.state_dict()[k]) for k, v in before.items()), "source untouched"


def test_rollouts_need_context_stride_equal_to_horizon() -> None:
    with pytest.raises(ValueError, match="context_stride == horizon"):
        RolloutFinetuneModule(8, 3, 2, BACKBONE, HEAD, OPTIMIZER, context_stride=1)


def test_pipeline_writes_a_loadable_checkpoint_and_before_after_summaries(exp1_run, exp1b_run) -> None:
    _, source_ckpt = exp1_run
    cfg, metrics = exp1b_run
    run_dir = Path(cfg.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["source_checkpoint"] == str(source_ckpt), "checkpoint=latest is the newest exp1_vmf run"

    ckpt = run_dir / "checkpoints" / "vmf_rollout_final.ckpt"
    tuned, source = load_dynamics(ckpt), load_dynamics(source_ckpt)
    assert type(tuned) is DynamicsModel
    assert tuned.run_config["name"] == "exp1b_vmf_rollout"
    for key in ("data", "representation", "model"):
        assert tuned.run_config[key] == source.run_config[key], key
    store = store_of_checkpoint(cfg, tuned.run_config)
    assert store.root == store_of_checkpoint(cfg, source.run_config).root
    source_state = source.net.state_dict()
    assert any(not torch.equal(v, source_state[k]) for k, v in tuned.net.state_dict().items())
    # The ramp defaults to trainer.max_steps: the last training step logs p = (max_steps - 1) / max_steps.
    assert summary["fit"]["train/feed_prob"] == pytest.approx((MAX_STEPS - 1) / MAX_STEPS)
    with (run_dir / "logs" / "metrics.csv").open() as fh:
        logged = [
            (int(r["step"]), float(r["train/feed_prob"])) for r in csv.DictReader(fh) if r["train/feed_prob"]
        ]
    assert len(logged) >= 2
    assert all(p == pytest.approx(step / MAX_STEPS) for step, p in logged)

    # Before and after are Exp 2's diagnostics of each checkpoint, i.e. on identical start points.
    before = injection_diagnostic(source.net, store, cfg.diagnostic).to_dict()["summaries"]
    after = injection_diagnostic(tuned.net, store, cfg.diagnostic).to_dict()["summaries"]
    diag = json.loads((run_dir / "injection_diag.json").read_text())
    assert set(diag["summaries"]) == set(MODES)
    assert summary["start_points"]["n_starts"] == cfg.diagnostic.n_starts
    for mode in MODES:
        for name, value in before[mode].items():
            assert summary["before"][mode][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (mode, name)
            assert summary["after"][mode][name] == pytest.approx(after[mode][name], rel=1e-9, abs=1e-12)
            assert diag["summaries"][mode][name] == pytest.approx(after[mode][name], rel=1e-9, abs=1e-12)
            assert summary["delta"][mode][name] == pytest.approx(after[mode][name] - value, abs=1e-9)
    for tag, values in (("before", before), ("after", after)):
        for mode in exp1b_vmf_rollout.KEY_MODES:
            for name in exp1b_vmf_rollout.KEY_SUMMARIES:
                assert metrics[f"{tag}/{mode}/{name}"] == pytest.approx(values[mode][name])
    assert metrics["horizon_k"] == 1.0


def test_checkpoint_latest_without_an_exp1_run_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "exp1b_vmf_rollout", "checkpoint=latest")
    with pytest.raises(FileNotFoundError, match="exp1_vmf"):
        exp1b_vmf_rollout.run(cfg)
