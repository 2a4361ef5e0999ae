"""Rollout fine-tuning (Exp 1B): train a dynamics model on its own predictions, R steps at a time.

A training item is a GT *segment* on the model's stride-``k`` grid: ``W`` context frames then ``R`` target
frames, grid index ``j`` being frame ``t0 + jk`` (``W + R`` frames, ``(W + R - 1)k + 1`` store rows). Step
``r = 0 .. R-1`` predicts from the current context buffer (``W`` frames) and scores the GT frame ``W + r``:

    loss_r = -log p(z_gt[W + r] - buffer[-1]) / D

so when the buffer holds the model's own earlier predictions, the target delta is the one that brings the
rollout back to the ground truth. The frame appended to the buffer for the next step is, independently per
row and step, the model's prediction (``buffer[-1]`` + the predictive's mean or a sample) with probability
``p`` (*scheduled sampling*), else the GT frame. ``p`` ramps linearly from 0 to 1 over ``ramp_steps``
optimiser steps. The loss is the mean of ``loss_r`` over ``r``. With ``R = 1`` (or ``p = 0``) every step
is teacher-forced, and ``R = 1`` is exactly Exp 1's one-step loss on the same windows.

The segments are Exp 1 windows with a longer context: ``WindowSpec(W + R - 1, k, k)`` reads grid frames
``0 .. W + R - 2`` as its context and frame ``W + R - 1`` as its target, so the window machinery of
:mod:`latentdyn.data.windows` (anchors, slices, seeded batches, the datamodule) serves unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from latentdyn.data.windows import WindowSpec
from latentdyn.models.dynamics import DynamicsModel
from latentdyn.models.protocol import DeltaModel

FEEDS: tuple[str, ...] = ("mean", "sample")


def rollout_spec(context: int, horizon: int, steps: int) -> WindowSpec:
    """Window geometry whose context + target is a whole ``W + R`` segment on the stride-``k`` grid."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"rollout steps R must be a positive integer, got {steps!r}")
    return WindowSpec(context=context + int(steps) - 1, horizon=horizon, context_stride=horizon)


def rollout_grid(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A window batch of :func:`rollout_spec` -> the segments ``(B, W + R, D)`` on the stride-``k`` grid."""
    return torch.cat([batch["context"], batch["target"][:, None]], dim=1)


def feed_probability(step: int, ramp_steps: int) -> float:
    """Scheduled-sampling probability ``min(1, step / ramp_steps)`` of feeding the model its own prediction.

    ``ramp_steps == 0`` means no ramp: the model is fed its own predictions from the first step.
    """
    if ramp_steps < 0 or step < 0:
        raise ValueError(f"need step >= 0 and ramp_steps >= 0, got {step}, {ramp_steps}")
    return 1.0 if ramp_steps == 0 else min(1.0, step / ramp_steps)


@dataclass
class UnrolledNLL:
    """Outcome of :func:`unrolled_nll`: ``per_step`` ``(R,)`` NLL per dimension (nats / D), mean over rows;
    ``fed_fraction``: the fraction of appended frames (over rows and the ``R - 1`` feedback steps) that were
    the model's own predictions (NaN when ``R = 1``)."""

    per_step: torch.Tensor
    fed_fraction: float

    @property
    def loss(self) -> torch.Tensor:
        """The training loss: the mean of ``per_step`` (a scalar)."""
        return self.per_step.mean()


def unrolled_nll(
    model: DeltaModel,
    grid: torch.Tensor,
    feed_prob: float,
    feed: str = "mean",
    detach_feedback: bool = False,
    generator: torch.Generator | None = None,
) -> UnrolledNLL:
    """Unroll ``model`` over GT segments ``grid`` ``(B, W + R, D)`` (standardised, stride-``k`` grid).

    See the module docstring. ``feed``: ``mean`` appends ``buffer[-1] + E[Δ]`` (gradients flow through it,
    back-propagation through time, unless ``detach_feedback``); ``sample`` appends ``buffer[-1] + Δ`` with
    ``Δ`` drawn from the predictive (never differentiated). ``generator`` drives the per-row coin flips and
    the samples, so a seeded generator makes the unroll reproducible.
    """
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    if not 0.0 <= feed_prob <= 1.0:
        raise ValueError(f"feed_prob must lie in [0, 1], got {feed_prob}")
    w = model.context
    if grid.ndim != 3 or grid.shape[1] <= w or grid.shape[2] != model.dim:
        raise ValueError(
            f"grid must be (B, W + R, D) with W={w}, R >= 1, D={model.dim}; got {tuple(grid.shape)}"
        )
    rows, steps = grid.shape[0], grid.shape[1] - w
    buffer = grid[:, :w]
    losses: list[torch.Tensor] = []
    fed = 0
    for r in range(steps):
        predictive = model.predictive(buffer)
        last, target = buffer[:, -1], grid[:, w + r]
        losses.append(-(predictive.log_prob(target - last).mean() / model.dim))
        if r == steps - 1:
            break
        use_pred = torch.rand(rows, generator=generator, device=grid.device) < feed_prob
        fed += int(use_pred.sum())
        if bool(use_pred.any()):
            if feed == "mean":
                delta = predictive.mean()
                if detach_feedback:
                    delta = delta.detach()
            else:
                with torch.no_grad():
                    delta = predictive.sample(generator=generator)
            nxt = torch.where(use_pred[:, None], (last + delta).to(grid.dtype), target)
        else:
            nxt = target
        buffer = torch.cat([buffer[:, 1:], nxt[:, None]], dim=1)
    fed_fraction = fed / (rows * (steps - 1)) if steps > 1 else float("nan")
    return UnrolledNLL(torch.stack(losses), fed_fraction)


class RolloutFinetuneModule(DynamicsModel):
    """A :class:`DynamicsModel` trained with the unrolled R-step loss and a scheduled-sampling ramp.

    Its checkpoints are dynamics checkpoints (same ``net.*`` state, the run config embedded under
    ``latentdyn_config``): :func:`latentdyn.models.dynamics.load_dynamics` loads them as a plain
    ``DynamicsModel``. Batches are windows of :func:`rollout_spec` (``context`` ``(B, W + R - 1, D)``,
    ``target`` ``(B, D)``).

    Args (beyond :class:`DynamicsModel`'s):
        rollout_steps: R, unrolled steps per segment.
        feed: ``mean`` or ``sample``, the prediction fed back (see :func:`unrolled_nll`).
        detach_feedback: with ``feed=mean``, stop gradients through the fed-back predictions.
        ramp_steps: optimiser steps over which the feed probability rises linearly from 0 to 1.
        feed_seed: seed of the coin flips and samples; training step ``n`` uses its own generator seeded
            from ``(feed_seed, n)``, validation a fixed one, so both are reproducible.

    Validation unrolls with ``p = 1`` (pure free-running, what fine-tuning is for) and logs the mean NLL
    over steps (``val/rollout_nll_per_dim``) and its first, teacher-forced step (``val/nll_per_dim``,
    comparable with Exp 1's).
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
        rollout_steps: int = 8,
        feed: str = "mean",
        detach_feedback: bool = False,
        ramp_steps: int = 1000,
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
        )
        if context_stride != horizon:
            raise ValueError(
                f"rollout fine-tuning needs context_stride == horizon (got {context_stride}, {horizon}): each "
                "step advances k frames, so its prediction lands on the context grid only at stride k"
            )
        if feed not in FEEDS:
            raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
        if isinstance(ramp_steps, bool) or int(ramp_steps) != ramp_steps or ramp_steps < 0:
            raise ValueError(f"ramp_steps must be a non-negative integer, got {ramp_steps!r}")
        self.spec = rollout_spec(context, horizon, rollout_steps)
        self.rollout_steps, self.feed, self.detach_feedback = int(rollout_steps), feed, bool(detach_feedback)
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
            **rollout,
        )
        module.net.load_state_dict(source.net.state_dict())
        return module

    def feed_prob(self) -> float:
        """Scheduled-sampling probability at the current optimiser step (0 outside a trainer)."""
        return feed_probability(int(self.global_step), self.ramp_steps)

    def _generator(self, device: torch.device, step: int | None) -> torch.Generator:
        seed = self.feed_seed if step is None else self.feed_seed * 1_000_003 + step + 1
        return torch.Generator(device=device).manual_seed(seed)

    def unroll(self, batch: Mapping[str, torch.Tensor], feed_prob: float, step: int | None) -> UnrolledNLL:
        """:func:`unrolled_nll` of a batch with this module's settings; ``step`` seeds it (None: validation)."""
        grid = rollout_grid(batch)
        generator = self._generator(grid.device, step)
        return unrolled_nll(self.net, grid, feed_prob, self.feed, self.detach_feedback, generator)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        p = self.feed_prob()
        out = self.unroll(batch, p, int(self.global_step))
        size = batch["context"].shape[0]
        prefix = self.metric_prefix
        self.log(f"{prefix}train/rollout_nll_per_dim", out.loss, prog_bar=True, batch_size=size)
        self.log(f"{prefix}train/nll_per_dim", out.per_step[0], batch_size=size)
        self.log(f"{prefix}train/feed_prob", p, prog_bar=True, batch_size=size)
        return out.loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        out = self.unroll(batch, 1.0, None)
        size = batch["context"].shape[0]
        prefix = self.metric_prefix
        self.log(f"{prefix}val/rollout_nll_per_dim", out.loss, prog_bar=True, batch_size=size)
        self.log(f"{prefix}val/nll_per_dim", out.per_step[0], batch_size=size)
