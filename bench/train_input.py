"""Input-pipeline overhead of training from a latent store on disk.

Measures training steps/s of a small MLP dynamics step (forward, backward, Adam; B=256, W=8, D=80, plain
torch loop on CPU) fed by ``LatentWindowDataModule.train_dataloader()`` over a synthetic 200k-frame x 80-dim
store in a temporary directory, and the same steps on the same batches preloaded in memory. Prints both rates
and their ratio (target >= 0.9). Within each timed round the two sources alternate every few steps, so load
from other processes penalises both alike; the figures are medians over rounds. On a machine shared with other jobs, pass
``--threads 1``: oversubscribed intra-op threads make every torch op erratic. Runtime ~1 minute.
Run: ``uv run python bench/train_input.py [--threads N] [--num-workers N]``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentdyn.data.latent_store import LatentStoreWriter

META = {
    "representation": "synthetic-bench",
    "sample_rate": 24000,
    "frame_rate": 12.5,
    "weights": {"source": "random"},
}


def write_store(root: Path, n_frames: int, dim: int, utt_frames: int = 250, seed: int = 0) -> None:
    """Random-walk latents in utterances of ``utt_frames`` frames; 80 % train, 10 % val, 10 % test."""
    rng = np.random.default_rng(seed)
    with LatentStoreWriter(root, dim, META) as writer:
        for i in range(n_frames // utt_frames):
            split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
            z = np.cumsum(rng.standard_normal((utt_frames, dim), dtype=np.float32), axis=0) * 0.1
            writer.add(
                f"utt{i:05d}", f"spk{i % 50}", split, z, rng.uniform(-60, -10, utt_frames).astype(np.float32)
            )


def make_step(window: int, dim: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(window * dim, 256),
        nn.GELU(),
        nn.Linear(256, 256),
        nn.GELU(),
        nn.Linear(256, dim),
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterator[dict], n: int) -> float:
    """Run ``n`` training steps on ``batches``; return the wall-clock seconds (data fetch included)."""
    start = time.perf_counter()
    for _ in range(n):
        batch = next(batches)
        loss = (model(batch["context"]) - batch["target_delta"]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def interleaved_rates(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sources: dict[str, Iterator[dict]],
    block: int,
    seconds: float,
) -> dict[str, float]:
    """Steps/s of each source, alternating blocks of ``block`` steps for about ``seconds`` in total.

    Fine-grained alternation exposes every source to the same background load, so the ratio of the rates
    is meaningful even on a shared machine.
    """
    spent = dict.fromkeys(sources, 0.0)
    steps = dict.fromkeys(sources, 0)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for name, batches in sources.items():
            spent[name] += train_steps(model, opt, batches, block)
            steps[name] += block
    return {name: steps[name] / spent[name] for name in sources}


def endless(loader: Iterable[dict]) -> Iterator[dict]:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=80)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--preload", type=int, default=200, help="batches held in memory (cycled)")
    parser.add_argument("--block", type=int, default=10, help="steps per source before switching")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from latentdyn.data.windows import LatentWindowDataModule  # imports lightning (seconds)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        t0 = time.perf_counter()
        write_store(root, args.frames, args.dim)
        print(f"store: {args.frames} frames x {args.dim} dims written in {time.perf_counter() - t0:.1f} s")
        dm = LatentWindowDataModule(
            root, context=args.context, horizon=1, batch_size=args.batch_size, num_workers=args.num_workers
        )
        dm.setup("fit")
        print(f"train windows: {len(dm.dataset('train'))}, torch threads: {torch.get_num_threads()}")

        model, opt = make_step(args.context, args.dim)
        stream = endless(dm.train_dataloader())
        preloaded = itertools.cycle([next(stream) for _ in range(args.preload)])  # batches already in memory
        sources = {"loader": stream, "preloaded": preloaded}
        interleaved_rates(model, opt, sources, args.block, 2.0)  # warm-up
        t0 = time.perf_counter()
        fetched = sum(1 for _ in itertools.takewhile(lambda _: time.perf_counter() - t0 < 1.0, stream))
        fetch_rate = fetched / (time.perf_counter() - t0)
        rounds = [
            interleaved_rates(model, opt, sources, args.block, args.seconds) for _ in range(args.rounds)
        ]

    ratios = [r["loader"] / r["preloaded"] for r in rounds]
    print(f"loader fetch alone:          {fetch_rate:8.1f} batches/s")
    for name in sources:
        rates = [r[name] for r in rounds]
        print(
            f"steps/s, {name:<19} {float(np.median(rates)):8.1f}  (rounds: {' '.join(f'{x:.1f}' for x in rates)})"
        )
    print(
        f"ratio loader / preloaded:    {float(np.median(ratios)):8.3f}  (median over rounds; target >= 0.9)"
    )


if __name__ == "__main__":
    main()
