"""Per-row random draws that a data-parallel fit makes exactly as one process would.

Under ``trainer.strategy=ddp`` every rank holds rows ``rank, rank + world, ...`` of each global batch
(:meth:`latentdyn.data.windows.IndexBatchSampler.shard`) and the same global random state (the same seed,
the same draws so far). A module that draws noise per row of its local batch would give each rank the first
rows of a draw instead of its own rows of the global draw, so the fit would train on other noise than the
one-process fit of the same batches. :func:`global_batch_draw` draws for the whole global batch on every
rank and keeps the rank's rows: the same noise per window as one process, and the random state moves on as
it would there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T", torch.Tensor, tuple[torch.Tensor, ...])


def _rank_world(module: Any) -> tuple[int, int]:
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def global_batch_draw(module: Any, rows: int, draw: Callable[[int], T]) -> T:
    """``draw(n)`` (a tensor, or a tuple of tensors, with ``n`` rows first) for this rank's ``rows`` rows.

    In one process (or outside a trainer) ``draw(rows)``. In a data-parallel fit the ranks exchange their
    batch sizes (one small collective: every rank must call this at the same point), each calls
    ``draw(global rows)`` and keeps its rows ``rank::world``.
    """
    rank, world = _rank_world(module)
    if world == 1:
        return draw(rows)
    sizes = module.all_gather(torch.tensor(rows, device=module.device))
    drawn = draw(int(sizes.sum()))
    mine = tuple(t[rank::world] for t in (drawn if isinstance(drawn, tuple) else (drawn,)))
    if any(t.shape[0] != rows for t in mine):
        raise RuntimeError(
            f"rank {rank} holds {rows} rows but its share of the global draw has {mine[0].shape[0]}"
        )
    return mine if isinstance(drawn, tuple) else mine[0]


def global_batch_randn(module: Any, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like the batch ``like`` (rows first), drawn as :func:`global_batch_draw`
    says: ``torch.randn_like(like)`` in one process."""
    return global_batch_draw(
        module,
        like.shape[0],
        lambda n: torch.randn((n, *like.shape[1:]), dtype=like.dtype, device=like.device),
    )
