"""Rollout fine-tuning (Exp 1B, the reference's loss with its lag slip fixed): train a dynamics model on the
contexts its own rollouts produce.

A training item is a GT *segment* of ``L = W + k - 1 + K`` frames (frames ``t0-k-W+1 .. t0+K-1``, the same
geometry as the injection diagnostic's: :class:`~latentdyn.models.geometry.RolloutGeometry`). The model
is unrolled ``K`` steps. Step ``s`` (frame ``t = t0 + s``) reads the W frames ending at ``t - k`` of the
*believed* trajectory (GT before ``t0``, then the rollout's states) and is scored on the true one-frame delta:

    rollout_nll_s = -log p(x[t] - x[t-1] | believed context)          (nats per frame)
    teacher_nll_s = -log p(x[t] - x[t-1] | GT context)

    loss = mean_s rollout_nll_s + teacher_weight · mean_s teacher_nll_s        (teacher_weight 0.1)

The state then advances by the point prediction, ``x̂[t] = x̂[t-1] + Δ̂`` (``feed``: ``median`` μ·e^m, the
reference's step; ``mean``; ``sample``), **without gradient** unless ``bptt`` (back-propagation through the
fed-back mean, our earlier default). Scheduled sampling: independently per row and step, the state is replaced
by GT with probability ``p_teacher``, which ramps linearly from ``teacher_prob_start`` (0.2) to
``teacher_prob_end`` (0) over ``ramp_steps`` (2000) optimiser steps. ``clip_delta_l2`` optionally clips each
fed-back Δ̂ to an L2 norm (the reference clipped at 5 while the median Mimi delta is ~74: off by default).

The reference paired the context ending at x[t0+W-1] with the target x[t0+W+1] - x[t0+W] (a lag of 2 for a
k = 1 model); here step 0's target is x[t0] - x[t0-1] with the context ending at x[t0-k], as in training and
in the injection diagnostic.

Segments are read with the window machinery (:meth:`~latentdyn.models.geometry.RolloutGeometry.segment_spec`:
``L - 1`` context frames and a one-step target on the rollout grid), so anchors, slices and the seeded
datamodule serve unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from latentdyn.models.dynamics import DynamicsModel
from latentdyn.models.geometry import RolloutGeometry, rollout_geometry
from latentdyn.models.protocol import PREDICT, DeltaModel, point_prediction

FEEDS: tuple[str, ...] = PREDICT


def rollout_segments(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A window batch of :meth:`RolloutGeometry.segment_spec` -> the segments ``(B, L, D)``."""
    return torch.cat([batch["context"], batch["target"][:, None]], dim=1)


def teacher_probability(step: int, start: float, end: float, ramp_steps: int) -> float:
    """Scheduled-sampling probability of feeding GT at optimiser ``step``: linear from ``start`` to ``end``
    over ``ramp_steps`` steps, then ``end`` (``ramp_steps == 0``: ``end`` from the first step)."""
    if ramp_steps < 0 or step < 0:
        raise ValueError(f"need step >= 0 and ramp_steps >= 0, got {step}, {ramp_steps}")
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"teacher probability {name} must lie in [0, 1], got {value}")
    if ramp_steps == 0 or step >= ramp_steps:
        return float(end)
    return float(start + (end - start) * step / ramp_steps)


def clip_l2(delta: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Rows of ``delta`` ``(B, D)`` scaled down to an L2 norm of at most ``max_norm`` (None: unchanged)."""
    if max_norm is None:
        return delta
    norm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
    return delta * torch.clamp(max_norm / norm.clamp_min(1e-12), max=1.0)


@dataclass
class UnrolledNLL:
    """Outcome of :func:`unrolled_nll`: ``rollout`` and ``teacher`` ``(K,)`` NLLs (nats per frame, mean over
    rows) and ``gt_fraction``, the fraction of states replaced by GT by scheduled sampling."""

    rollout: torch.Tensor
    teacher: torch.Tensor
    gt_fraction: float

    def loss(self, teacher_weight: float) -> torch.Tensor:
        """``mean(rollout) + teacher_weight · mean(teacher)`` (a scalar)."""
        return self.rollout.mean() + teacher_weight * self.teacher.mean()


def unrolled_nll(
    model: DeltaModel,
    segments: torch.Tensor,
    geometry: RolloutGeometry,
    k_steps: int,
    p_teacher: float,
    feed: str = "median",
    bptt: bool = False,
    clip_delta_l2: float | None = None,
    generator: torch.Generator | None = None,
) -> UnrolledNLL:
    """Unroll ``model`` over GT ``segments`` ``(B, L, D)`` (see the module docstring).

    ``generator`` drives the per-row coin flips (and samples), so a seeded generator makes the unroll
    reproducible. With ``bptt`` and ``feed`` ``median``/``mean``, gradients flow through the fed-back states.
    """
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    if not 0.0 <= p_teacher <= 1.0:
        raise ValueError(f"p_teacher must lie in [0, 1], got {p_teacher}")
    length = geometry.segment_length(k_steps)
    if segments.ndim != 3 or segments.shape[1] != length or segments.shape[2] != model.dim:
        raise ValueError(
            f"segments must be (B, {length}, {model.dim}) (W + k - 1 + K frames); got {tuple(segments.shape)}"
        )
    w, lag, origin = geometry.window, geometry.lag, geometry.origin
    rows = segments.shape[0]
    believed = list(segments.unbind(1))  # GT before t0; the rollout's states from t0 on
    rollout_losses: list[torch.Tensor] = []
    teacher_losses: list[torch.Tensor] = []
    replaced = 0
    for s in range(k_steps):
        i = origin + s
        lo, hi = i - lag - w + 1, i - lag + 1
        true_delta = segments[:, i] - segments[:, i - 1]
        context = torch.stack(believed[lo:hi], dim=1)
        predictive = model.predictive(context)
        rollout_losses.append(-predictive.log_prob(true_delta).mean())
        teacher_losses.append(-model.predictive(segments[:, lo:hi]).log_prob(true_delta).mean())
        with torch.set_grad_enabled(bptt and feed != "sample" and torch.is_grad_enabled()):
            delta = clip_l2(point_prediction(predictive, feed, generator=generator), clip_delta_l2)
            state = believed[i - 1] + delta.to(segments.dtype)
        use_gt = torch.rand(rows, generator=generator, device=segments.device) < p_teacher
        replaced += int(use_gt.sum())
        believed[i] = torch.where(use_gt[:, None], segments[:, i], state)
    return UnrolledNLL(torch.stack(rollout_losses), torch.stack(teacher_losses), replaced / (rows * k_steps))


class RolloutFinetuneModule(DynamicsModel):
    """A :class:`DynamicsModel` trained with the unrolled K-step loss and a scheduled-sampling ramp.

    Its checkpoints are dynamics checkpoints (same ``net.*`` state, the run config embedded under
    ``latentdyn_config``): :func:`latentdyn.models.dynamics.load_dynamics` loads them as a plain
    ``DynamicsModel``. Batches are windows of :meth:`RolloutGeometry.segment_spec` (``k_steps``).

    Args (beyond :class:`DynamicsModel`'s):
        k_steps: K, unrolled steps per segment.
        teacher_weight: weight of the teacher-forced NLL in the loss.
        feed, bptt, clip_delta_l2: the fed-back state (see :func:`unrolled_nll`).
        teacher_prob_start, teacher_prob_end, ramp_steps: the scheduled-sampling ramp.
        feed_seed: seed of the coin flips and samples; training step ``n`` uses its own generator seeded
            from ``(feed_seed, n)``, validation a fixed one, so both are reproducible.

    Validation unrolls with ``p_teacher = 0`` (pure free-running, what fine-tuning is for) and logs
    ``val/rollout_nll`` and the teacher-forced ``val/nll`` (comparable with Exp 1's).
    """

    def __init__(
        self,
        dim: int,
        context: int,
        horizon: int,
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        context_stride: int = 1,
        name: str = "model",
        run_config: Mapping[str, Any] | None = None,
        horizon_mode: str = "stride",
        standardized: bool = True,
        k_steps: int = 16,
        teacher_weight: float = 0.1,
        feed: str = "median",
        bptt: bool = False,
        clip_delta_l2: float | None = None,
        teacher_prob_start: float = 0.2,
        teacher_prob_end: float = 0.0,
        ramp_steps: int = 2000,
        feed_seed: int = 0,
    ) -> None:
        super().__init__(
            dim=dim,
            context=context,
            horizon=horizon,
            backbone=backbone,
            head=head,
            optimizer=optimizer,
            context_stride=context_stride,
            name=name,
            run_config=run_config,
            horizon_mode=horizon_mode,
            standardized=standardized,
        )
        if feed not in FEEDS:
            raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
        if isinstance(ramp_steps, bool) or int(ramp_steps) != ramp_steps or ramp_steps < 0:
            raise ValueError(f"ramp_steps must be a non-negative integer, got {ramp_steps!r}")
        if teacher_weight < 0:
            raise ValueError(f"teacher_weight must be >= 0, got {teacher_weight}")
        if clip_delta_l2 is not None and clip_delta_l2 <= 0:
            raise ValueError(f"clip_delta_l2 must be > 0 or null, got {clip_delta_l2}")
        teacher_probability(0, teacher_prob_start, teacher_prob_end, int(ramp_steps))  # validates the ramp
        self.geometry = rollout_geometry(self.net)
        self.k_steps = int(k_steps)
        self.segment_spec = self.geometry.segment_spec(self.k_steps)
        self.teacher_weight, self.feed, self.bptt = float(teacher_weight), feed, bool(bptt)
        self.clip_delta_l2 = None if clip_delta_l2 is None else float(clip_delta_l2)
        self.teacher_prob_start, self.teacher_prob_end = float(teacher_prob_start), float(teacher_prob_end)
        self.ramp_steps, self.feed_seed = int(ramp_steps), int(feed_seed)

    @classmethod
    def from_dynamics(
        cls,
        source: DynamicsModel,
        optimizer: Mapping[str, Any],
        run_config: Mapping[str, Any],
        **rollout: Any,
    ) -> RolloutFinetuneModule:
        """A fine-tuning module with ``source``'s architecture and weights, a new optimiser and run config."""
        hp = source.hparams
        module = cls(
            dim=hp["dim"],
            context=hp["context"],
            horizon=hp["horizon"],
            backbone=hp["backbone"],
            head=hp["head"],
            optimizer=dict(optimizer),
            context_stride=hp["context_stride"],
            name=hp["name"],
            run_config=run_config,
            horizon_mode=source.horizon_mode,
            standardized=source.standardized,
            **rollout,
        )
        module.net.load_state_dict(source.net.state_dict())
        return module

    def p_teacher(self) -> float:
        """Scheduled-sampling probability of feeding GT at the current optimiser step."""
        return teacher_probability(
            int(self.global_step), self.teacher_prob_start, self.teacher_prob_end, self.ramp_steps
        )

    def _generator(self, device: torch.device, step: int | None) -> torch.Generator:
        seed = self.feed_seed if step is None else self.feed_seed * 1_000_003 + step + 1
        return torch.Generator(device=device).manual_seed(seed)

    def unroll(self, batch: Mapping[str, torch.Tensor], p_teacher: float, step: int | None) -> UnrolledNLL:
        """:func:`unrolled_nll` of a batch with this module's settings; ``step`` seeds it (None: validation)."""
        segments = rollout_segments(batch)
        generator = self._generator(segments.device, step)
        return unrolled_nll(
            self.net,
            segments,
            self.geometry,
            self.k_steps,
            p_teacher,
            self.feed,
            self.bptt,
            self.clip_delta_l2,
            generator,
        )

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        p = self.p_teacher()
        out = self.unroll(batch, p, int(self.global_step))
        loss = out.loss(self.teacher_weight)
        size = batch["context"].shape[0]
        prefix = self.metric_prefix
        self.log(f"{prefix}train/loss", loss, prog_bar=True, batch_size=size)
        self.log(f"{prefix}train/rollout_nll", out.rollout.mean(), batch_size=size)
        self.log(f"{prefix}train/nll", out.teacher.mean(), batch_size=size)
        self.log(f"{prefix}train/p_teacher", p, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        out = self.unroll(batch, 0.0, None)
        size = batch["context"].shape[0]
        prefix = self.metric_prefix
        self.log(
            f"{prefix}val/rollout_nll", out.rollout.mean(), prog_bar=True, batch_size=size, sync_dist=True
        )
        self.log(f"{prefix}val/nll", out.teacher.mean(), batch_size=size, sync_dist=True)
