"""Distance to the data manifold: exact nearest-neighbour distance to a bank of real (train) latents.

The bank is a uniform sample of train frames in the standardised latent space. The search is exact and
chunked, so memory stays bounded whatever the sizes: with ``chunk = c`` (bank rows per block) and
``query_chunk = q`` (query rows per block, default ``c``), the largest temporary is a ``(q, c)`` float32
distance block, i.e. ``4 q c`` bytes (64 MiB for the default ``c = q = 4096``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_CHUNK = 4096


def nearest_neighbour_distance(
    x: torch.Tensor, bank: torch.Tensor, chunk: int = DEFAULT_CHUNK, query_chunk: int | None = None
) -> torch.Tensor:
    """Euclidean distance from each row of ``x`` ``(N, D)`` to its nearest row of ``bank`` ``(M, D)`` -> ``(N,)``.

    The nearest neighbour is located block by block (``query_chunk x chunk``) by minimising
    ``||b||^2 - 2 x.b`` (one matrix product; ``||x||^2`` and the square root do not change the argmin), then
    the distance to that neighbour is recomputed as ``||x - b||`` directly, so a query that coincides with a
    bank row gets ~0 rather than the square root of a float32 cancellation error. Only near-ties (squared
    distances equal to float32 precision) can pick a different neighbour, at a distance equal to that
    precision. Computed in the dtype of ``x`` (promoted to at least float32) on the device of ``x``; the
    bank is moved block by block.
    """
    if x.ndim != 2 or bank.ndim != 2:
        raise ValueError(
            f"x and bank must be 2-D (N, D) and (M, D), got {tuple(x.shape)} and {tuple(bank.shape)}"
        )
    if x.shape[1] != bank.shape[1]:
        raise ValueError(f"dimension mismatch: x has D={x.shape[1]}, bank has D={bank.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError("the bank is empty")
    if chunk < 1 or (query_chunk is not None and query_chunk < 1):
        raise ValueError(f"chunk sizes must be >= 1, got chunk={chunk}, query_chunk={query_chunk}")
    q_chunk = chunk if query_chunk is None else query_chunk
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.detach().to(dtype)
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for q0 in range(0, x.shape[0], q_chunk):
        xq = x[q0 : q0 + q_chunk]
        best = torch.full((xq.shape[0],), float("inf"), dtype=dtype, device=x.device)
        best_idx = torch.zeros(xq.shape[0], dtype=torch.long, device=x.device)
        for b0 in range(0, bank.shape[0], chunk):
            block = bank[b0 : b0 + chunk].to(device=x.device, dtype=dtype)
            scores = torch.addmm(block.pow(2).sum(dim=1)[None], xq, block.T, alpha=-2.0)  # (q, c)
            score, idx = scores.min(dim=1)
            better = score < best
            best = torch.where(better, score, best)
            best_idx = torch.where(better, idx + b0, best_idx)
        neighbours = bank[best_idx.to(bank.device)].to(device=x.device, dtype=dtype)
        out[q0 : q0 + q_chunk] = torch.linalg.vector_norm(xq - neighbours, dim=1)
    return out


def sample_bank(trajectories: Sequence[np.ndarray | torch.Tensor], size: int, seed: int) -> torch.Tensor:
    """A uniform sample of ``size`` frames (without replacement) from all frames of ``trajectories`` (each ``(T_i, D)``).

    Returns ``(min(size, total_frames), D)`` float32, rows in corpus order (utterance, then time), so reads from
    a memory-mapped store are sequential. Deterministic for a given ``seed`` (numpy ``Generator``).
    """
    if size < 1:
        raise ValueError(f"bank size must be >= 1, got {size}")
    lengths = np.array([int(t.shape[0]) for t in trajectories], dtype=np.int64)
    if lengths.size == 0 or lengths.sum() == 0:
        raise ValueError("no frames to build a bank from")
    total = int(lengths.sum())
    rng = np.random.default_rng(seed)
    flat = np.arange(total) if size >= total else np.sort(rng.choice(total, size=size, replace=False))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    utt = np.searchsorted(offsets, flat, side="right") - 1
    rows = []
    for u in np.unique(utt):
        local = flat[utt == u] - offsets[u]
        traj = trajectories[u]
        frames = traj[torch.as_tensor(local)] if isinstance(traj, torch.Tensor) else np.asarray(traj[local])
        rows.append(torch.as_tensor(frames, dtype=torch.float32).cpu())
    return torch.cat(rows, dim=0)
