"""Exp 1B (rollout fine-tuning) under debug=smoke: the reference's unrolled loss against one-step and injection
oracles, no lag slip, the scheduled-sampling ramp, gradients, and the pipeline's outputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from latentdyn.data.windows import WindowDataset, window_anchors
from latentdyn.diagnostics.injection import InjectionConfig, run_injection
from latentdyn.experiments import exp1_vmf, exp1b_vmf_rollout
from latentdyn.models.baselines import DiagonalGaussianBaseline
from latentdyn.models.dynamics import DynamicsModel, load_dynamics
from latentdyn.models.geometry import rollout_geometry
from latentdyn.models.net import DynamicsNet
from latentdyn.models.rollout import (
    RolloutFinetuneModule,
    clip_l2,
    rollout_segments,
    teacher_probability,
    unrolled_nll,
)
from latentdyn.pipeline.common import build_datamodule
from latentdyn.pipeline.composite import run_sub_experiment
from latentdyn.pipeline.injection import injection_diagnostic, store_of_checkpoint
from tests.conftest import compose_at

SMOKE = ["debug=smoke"]
MODES = ("A_teacher", "B_periodic", "C_one_shot", "D_rollout")
# Fine-tuning in the pipeline test: K steps, optimiser steps, scheduled-sampling ramp.
K_STEPS, MAX_STEPS, RAMP = 3, 10, 8
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
        f"rollout.k_steps={K_STEPS}",
        f"rollout.teacher_prob.ramp_steps={RAMP}",
        f"trainer.max_steps={MAX_STEPS}",
        "rollout.warmup_steps=0",
        logger="csv",
    )
    return cfg, exp1b_vmf_rollout.run(cfg)


def _tiny_net(dim: int = 8, context: int = 3, horizon: int = 1, seed: int = 0) -> DynamicsNet:
    torch.manual_seed(seed)
    return DynamicsNet(dim, context, horizon, BACKBONE, HEAD, horizon_mode="lag")


def _train_segments(
    cfg: DictConfig, model: DynamicsModel, k_steps: int, n: int
) -> tuple[WindowDataset, dict]:
    """The first ``n`` train segments of ``k_steps`` rollout steps for ``model``, and their batch."""
    store = store_of_checkpoint(cfg, model.run_config)
    spec = rollout_geometry(model.net).segment_spec(k_steps)
    windows = WindowDataset(store, window_anchors(store, "train", spec)[:n], spec, model.standardized)
    return windows, windows.get_batch(np.arange(n))


class RecordingModel(torch.nn.Module):
    """A lag model whose predictive is N(0, I) and which records every context it is called with."""

    def __init__(self, dim: int, context: int, horizon: int) -> None:
        super().__init__()
        self.dim, self.context, self.horizon, self.context_stride = dim, context, horizon, 1
        self.horizon_mode, self.standardized = "lag", False
        self.contexts: list[torch.Tensor] = []

    def predictive(self, context: torch.Tensor):
        from latentdyn.models.heads import MDNPredictive

        self.contexts.append(context.detach().clone())
        b = context.shape[0]
        return MDNPredictive(torch.zeros(b, 1), torch.zeros(b, 1, self.dim), torch.ones(b, 1, self.dim))


def test_step_targets_follow_their_context_without_a_lag_slip() -> None:
    """Step s scores x[t] - x[t-1] from the W frames ending at t - k. The reference paired the context ending at
    x[t0+W-1] with x[t0+W+1] - x[t0+W] (lag 2 for k = 1); a quadratic trajectory tells the frames apart."""
    w, k, k_steps, dim = 3, 1, 4, 2
    model = RecordingModel(dim, w, k)
    geometry = rollout_geometry(model)
    frames = torch.arange(geometry.segment_length(k_steps), dtype=torch.float32) ** 2
    segments = frames[None, :, None].expand(1, -1, dim).contiguous()
    out = unrolled_nll(model, segments, geometry, k_steps, p_teacher=1.0)
    rollout_contexts = model.contexts[0::2]  # each step calls the rollout context, then the teacher context
    for s, context in enumerate(rollout_contexts):
        t = geometry.origin + s
        assert context[0, :, 0].tolist() == frames[t - k - w + 1 : t - k + 1].tolist()
        # The scored delta is the one right after the context's last frame (lag k = 1): x[t] - x[t-1].
        expected_nll = 0.5 * dim * math.log(2 * math.pi) + 0.5 * dim * float(frames[t] - frames[t - 1]) ** 2
        assert out.rollout[s].item() == pytest.approx(expected_nll, rel=1e-6)
    # The reference's pairing would score x[t+1] - x[t] instead, a different number on this trajectory.
    slipped = (
        0.5 * dim * math.log(2 * math.pi)
        + 0.5 * dim * float(frames[geometry.origin + 1] - frames[geometry.origin]) ** 2
    )
    assert out.rollout[0].item() != pytest.approx(slipped, rel=1e-3)


@pytest.mark.slow
def test_one_step_loss_with_gt_fed_is_1_1_times_the_exp1_loss(exp1_run) -> None:
    root, ckpt = exp1_run
    model = load_dynamics(ckpt)
    cfg = _compose(root, "exp1b_vmf_rollout", "rollout.k_steps=1")
    module = exp1b_vmf_rollout.build_finetune_module(cfg, model, ckpt).eval()  # no dropout noise
    store = store_of_checkpoint(cfg, model.run_config)
    exp1_batch = build_datamodule(cfg, store, model).dataset("train").get_batch(np.arange(64))
    batch = exp1b_vmf_rollout.rollout_datamodule(cfg, store, module).dataset("train").get_batch(np.arange(64))
    with torch.no_grad():
        one_step = model.nll(exp1_batch)
        # Same windows: the K = 1 segment is the Exp 1 window (context + target frame).
        assert torch.allclose(rollout_segments(batch)[:, :-1], exp1_batch["context"])
        for p in (1.0, 0.0):
            out = module.unroll(batch, p, step=0)
            assert out.rollout.shape == out.teacher.shape == (1,)
            assert out.loss(module.teacher_weight).item() == pytest.approx(1.1 * one_step.item(), rel=1e-6)


@pytest.mark.slow
def test_teacher_forced_steps_are_exp1_windows(exp1_run) -> None:
    _, ckpt = exp1_run
    model = load_dynamics(ckpt)
    cfg = _compose(exp1_run[0], "exp1b_vmf_rollout")
    k_steps, n = 4, 48
    windows, batch = _train_segments(cfg, model, k_steps, n)
    geometry = rollout_geometry(model.net)
    length = geometry.segment_length(k_steps)
    with torch.no_grad():
        out = unrolled_nll(model.net, rollout_segments(batch), geometry, k_steps, p_teacher=1.0)
        for s in range(k_steps):
            # A segment's anchor is its frame L - 2; step s's Exp 1 window ends at its frame origin + s - k.
            anchors = windows.anchors - (length - 2) + (geometry.origin + s - model.horizon)
            shifted = WindowDataset(windows.store, anchors, model.net.spec, model.standardized)
            expected = model.nll(shifted.get_batch(np.arange(n)))
            assert out.rollout[s].item() == pytest.approx(expected.item(), rel=1e-5)
            assert out.teacher[s].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.gt_fraction == 1.0


@pytest.mark.slow
def test_free_running_unroll_matches_the_injection_rollout(exp1_run) -> None:
    """At p_teacher = 0 the unroll is the injection diagnostic's D_rollout on the same segments."""
    _, ckpt = exp1_run
    model = load_dynamics(ckpt)
    k_steps, n = 5, 32
    _, batch = _train_segments(_compose(exp1_run[0], "exp1b_vmf_rollout"), model, k_steps, n)
    segments = rollout_segments(batch)
    inj = InjectionConfig(modes=["D_rollout"], k_steps=k_steps, inject_after_periodic=[2, 4], bank_size=0)
    baseline = DiagonalGaussianBaseline(torch.zeros(model.dim), torch.ones(model.dim))
    with torch.no_grad():
        out = unrolled_nll(model.net, segments, rollout_geometry(model.net), k_steps, p_teacher=0.0)
        reference = run_injection(model.net, segments, inj, baseline).per_start["nll"][0].mean(axis=0)
    assert out.gt_fraction == 0.0
    np.testing.assert_allclose(out.rollout.double().numpy(), reference, rtol=1e-5)
    assert out.rollout[-1] > out.rollout[0], "free-running should score the GT worse than teacher forcing"


def test_teacher_probability_follows_the_linear_ramp() -> None:
    values = [teacher_probability(s, 0.2, 0.0, 100) for s in (0, 25, 50, 100, 250)]
    assert values == pytest.approx([0.2, 0.15, 0.1, 0.0, 0.0])
    assert teacher_probability(0, 0.2, 0.0, 0) == 0.0
    with pytest.raises(ValueError):
        teacher_probability(-1, 0.2, 0.0, 10)
    with pytest.raises(ValueError):
        teacher_probability(0, 1.5, 0.0, 10)
    net, rows, p = _tiny_net(), 4000, 0.3
    geometry = rollout_geometry(net)
    segments = torch.randn(rows, geometry.segment_length(2), net.dim)
    with torch.no_grad():
        out = unrolled_nll(net, segments, geometry, 2, p, generator=torch.Generator().manual_seed(1))
    # Binomial over rows x 2 steps: 5 standard deviations.
    assert abs(out.gt_fraction - p) < 5 * math.sqrt(p * (1 - p) / (2 * rows))
    module = RolloutFinetuneModule(
        net.dim, net.context, 1, BACKBONE, HEAD, OPTIMIZER, 1, horizon_mode="lag", standardized=False
    )
    assert module.p_teacher() == 0.2  # no trainer: step 0


def test_gradients_flow_through_fed_back_states_only_with_bptt() -> None:
    net = _tiny_net()
    geometry = rollout_geometry(net)
    segments = torch.randn(16, geometry.segment_length(3), net.dim)

    def grads(bptt: bool, p: float = 0.0, feed: str = "median") -> list[torch.Tensor]:
        net.zero_grad()
        out = unrolled_nll(net, segments, geometry, 3, p, feed, bptt, None, torch.Generator().manual_seed(0))
        out.loss(0.1).backward()
        return [q.grad.clone() for q in net.parameters()]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.allclose(x, y, rtol=1e-6, atol=1e-8) for x, y in zip(a, b, strict=True))

    assert not same(grads(False), grads(True)), "BPTT through the fed-back median"
    assert same(grads(False, p=1.0), grads(True, p=1.0)), "nothing of the model is fed back at p_teacher = 1"
    assert all(torch.isfinite(g).all() for g in grads(True, feed="sample"))
    with pytest.raises(ValueError, match="feed"):
        unrolled_nll(net, segments, geometry, 3, 0.5, feed="argmax")


def test_clip_l2_bounds_the_fed_back_delta() -> None:
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_l2(delta, 1.0)
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert clip_l2(delta, None) is delta


@pytest.mark.slow
def test_a_finetuning_step_changes_the_parameters(exp1_run) -> None:
    root, ckpt = exp1_run
    source = load_dynamics(ckpt)
    cfg = _compose(root, "exp1b_vmf_rollout", "rollout.k_steps=2")
    module = exp1b_vmf_rollout.build_finetune_module(cfg, source, ckpt)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    assert all(torch.equal(v, source.net.state_dict()[k]) for k, v in before.items()), "warm start"
    _, batch = _train_segments(cfg, source, 2, 32)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-2)
    loss = module.unroll(batch, 0.5, step=0).loss(module.teacher_weight)
    loss.backward()
    optimizer.step()
    after = module.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, source.net.state_dict()[k]) for k, v in before.items()), "source untouched"


def test_stride_models_need_context_stride_equal_to_horizon() -> None:
    with pytest.raises(ValueError, match="context_stride == horizon"):
        RolloutFinetuneModule(8, 3, 2, BACKBONE, HEAD, OPTIMIZER, context_stride=1, horizon_mode="stride")


@pytest.mark.slow
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
    assert (tuned.horizon_mode, tuned.standardized) == (source.horizon_mode, source.standardized)
    for key in ("data", "representation", "model"):
        assert tuned.run_config[key] == source.run_config[key], key
    store = store_of_checkpoint(cfg, tuned.run_config)
    assert store.root == store_of_checkpoint(cfg, source.run_config).root
    source_state = source.net.state_dict()
    assert any(not torch.equal(v, source_state[k]) for k, v in tuned.net.state_dict().items())
    # The ramp: p_teacher = 0.2 (1 - step / RAMP) until RAMP, then 0.
    with (run_dir / "logs" / "metrics.csv").open() as fh:
        logged = [
            (int(r["step"]), float(r["train/p_teacher"])) for r in csv.DictReader(fh) if r["train/p_teacher"]
        ]
    assert len(logged) >= 2
    assert all(p == pytest.approx(max(0.0, 0.2 * (1 - step / RAMP))) for step, p in logged)

    # Before and after are Exp 2's diagnostics of each checkpoint, i.e. on identical start points.
    before = injection_diagnostic(source.net, store, cfg.diagnostic)
    after = injection_diagnostic(tuned.net, store, cfg.diagnostic)
    diag = json.loads((run_dir / "injection_diag.json").read_text())
    assert set(diag["modes"]) == set(MODES) and diag["k_steps"] == cfg.diagnostic.k_steps
    assert summary["start_points"]["n_starts"] == after.per_start["nll"].shape[1]
    for mode in MODES:
        for name, value in before.mode_summary(mode).items():
            if not math.isfinite(value):
                continue
            new = after.mode_summary(mode)[name]
            assert summary["before"][mode][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (mode, name)
            assert summary["after"][mode][name] == pytest.approx(new, rel=1e-9, abs=1e-12)
            assert diag["modes"][mode][name] == pytest.approx(new, rel=1e-9, abs=1e-12)
            assert summary["delta"][mode][name] == pytest.approx(new - value, abs=1e-9)
    for tag, result in (("before", before), ("after", after)):
        for mode in exp1b_vmf_rollout.KEY_MODES:
            for name in exp1b_vmf_rollout.KEY_SUMMARIES:
                assert metrics[f"{tag}/{mode}/{name}"] == pytest.approx(result.mode_summary(mode)[name])
    assert metrics["horizon_k"] == 1.0


@pytest.mark.slow
def test_a_killed_finetuning_resumes_and_ends_like_an_uninterrupted_one(
    exp1_run, exp1b_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after step 7 (periodic checkpoints every 5 steps), then ``resume=true``: steps 6-10 run and
    the weights and logged metrics equal the uninterrupted run's; resumed again, nothing is trained."""
    from lightning.pytorch.callbacks import Callback

    import latentdyn.models.training as training

    root, source_path = exp1_run
    ref_cfg, _ = exp1b_run
    steps: list[list[int]] = []
    build = training.build_trainer

    class Kill(Callback):
        def __init__(self, at: int | None) -> None:
            self.at = at

        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == self.at:
                raise KeyError("killed")  # stands for the process being killed

        def on_train_batch_end(self, trainer, *args) -> None:
            steps[-1].append(trainer.global_step)

    kill_at: list[int | None] = [7]

    def build_trainer(cfg, logger, callbacks=(), **kwargs):
        steps.append([])
        return build(cfg, logger, [*callbacks, Kill(kill_at[0])], **kwargs)

    monkeypatch.setattr(training, "build_trainer", build_trainer)
    overrides = [
        "experiment=exp1b_vmf_rollout",
        *SMOKE,
        f"rollout.k_steps={K_STEPS}",
        f"rollout.teacher_prob.ramp_steps={RAMP}",
        f"trainer.max_steps={MAX_STEPS}",
        "rollout.warmup_steps=0",
        "checkpointing.every_n_steps=5",
        "logger=none",
    ]
    run_dir = root / "exp1b-killed"
    source = load_dynamics(source_path)
    cfg = compose_at(root, overrides, run_dir)
    store = store_of_checkpoint(cfg, source.run_config)
    last = run_dir / "checkpoints" / "vmf_rollout_last.ckpt"
    with pytest.raises(KeyError, match="killed"):
        exp1b_vmf_rollout.finetune(cfg, source, source_path, store)
    assert torch.load(last, weights_only=True)["global_step"] == 5
    kill_at[0] = None
    cfg = compose_at(root, [*overrides, "resume=true"], run_dir)
    tuned, final, fit = exp1b_vmf_rollout.finetune(cfg, source, source_path, store)
    assert steps[-1] == list(range(6, MAX_STEPS + 1)) and not last.exists()
    ref_fit = json.loads((Path(ref_cfg.run_dir) / "summary.json").read_text())["fit"]
    assert fit == pytest.approx(ref_fit, rel=0, abs=1e-6)
    ref = load_dynamics(Path(ref_cfg.run_dir) / "checkpoints" / final.name)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    fits = len(steps)
    again, again_final, again_fit = exp1b_vmf_rollout.finetune(cfg, source, source_path, store)
    assert len(steps) == fits and (again_final, again_fit) == (final, fit)  # done: not fine-tuned again
    for key, value in tuned.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(ValueError, match="resume with checkpoint="):
        exp1b_vmf_rollout.check_same_source(final, run_dir / "another.ckpt")


def test_checkpoint_latest_without_an_exp1_run_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "exp1b_vmf_rollout", "checkpoint=latest")
    with pytest.raises(FileNotFoundError, match="exp1_vmf"):
        exp1b_vmf_rollout.run(cfg)
