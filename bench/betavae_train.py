"""Input-pipeline overhead of β-VAE training on audio crops read from disk.

Measures Lightning training steps/s of a ``BetaVAEModule`` (log-mel base at 24 kHz / 12.5 Hz, D=32,
lambda_smooth 0.1, lambda_pred 0.01) fed by ``AudioCropDataModule.train_dataloader()`` over synthetic 16 kHz
FLAC utterances of 3-6 s in a temporary directory (LibriSpeech's rate), cropped from the audio cache the
pipeline builds (decoded and resampled to 24 kHz once; ``--no-cache``: each crop read and resampled),
and the same steps on the same batches preloaded in memory. Prints both rates, their ratio (target >= 0.9 on
CPU) and the audio seconds trained per wall second. Each rate is timed between the ends of steps ``warmup``
and ``warmup + steps`` of a fit (worker start-up and first-step costs excluded, the next batch's fetch
included); the two sources alternate over ``--rounds`` fits so background load hits both alike, and the
figures are medians over rounds. On a GPU it also times a loader-fed fit in ``bf16-mixed`` precision.
On a machine shared with other jobs pass ``--threads 1``. Runtime ~1-2 minutes on 2 CPU cores.
Run: ``uv run python bench/betavae_train.py [--steps N] [--batch N] [--workers N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from latentdyn.data.corpus import Utterance

SOURCE_RATE = 16000
MODEL_RATE = 24000
BASE = {
    "_target_": "latentdyn.representations.mel.MelRepresentation",
    "sample_rate": MODEL_RATE,
    "frame_rate": 12.5,
}


def write_corpus(root: Path, n: int, seed: int = 0) -> list[Utterance]:
    """``n`` speech-like 16 kHz FLAC files of 3-6 s: a harmonic tone with a gliding pitch plus noise, under a
    4 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    utts = []
    for i in range(n):
        samples = int(rng.uniform(3.0, 6.0) * SOURCE_RATE)
        t = np.arange(samples) / SOURCE_RATE
        f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
        phase = 2 * np.pi * np.cumsum(f0) / SOURCE_RATE
        voiced = sum(np.sin(h * phase) / h for h in range(1, 12))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi))
        x = envelope * (0.15 * voiced + 0.03 * rng.standard_normal(samples))
        path = root / f"utt{i:03d}.flac"
        sf.write(path, np.clip(x, -1, 1).astype(np.float32), SOURCE_RATE, subtype="PCM_16")
        utts.append(Utterance(f"utt{i:03d}", f"spk{i % 8}", str(path), samples / SOURCE_RATE, SOURCE_RATE))
    return utts


class Preloaded:
    """The batches of a list, as one training iterable (a bare list would be taken for several loaders)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


def build_model() -> Any:
    from latentdyn.models.betavae import BetaVAEModule

    return BetaVAEModule(base=BASE, lambda_smooth=0.1, lambda_pred=0.01)


def timed_fit(model: Any, data: Any, warmup: int, steps: int, precision: str | None = None) -> float:
    """Steps/s of a fit of ``warmup + steps`` steps on ``data`` (a datamodule or an iterable of batches),
    timed from the end of step ``warmup`` to the end of the last step."""
    import lightning.pytorch as pl

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    marks: dict[str, float] = {}

    class StepTimer(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step in (warmup, warmup + steps):
                sync()
                marks["start" if trainer.global_step == warmup else "end"] = time.perf_counter()

    kwargs = {"precision": precision} if precision else {}
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepTimer()],
        **kwargs,
    )
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(model, datamodule=data)
    else:
        trainer.fit(model, train_dataloaders=data)
    return steps / (marks["end"] - marks["start"])


def collect(datamodule: Any, n: int) -> tuple[list[torch.Tensor], float]:
    """The first ``n`` training batches of ``datamodule`` (as a fit draws them) and the loader's fetch rate
    alone in batches/s (after the first batch, which pays for starting the workers)."""
    batches: list[torch.Tensor] = []
    loader = datamodule.train_dataloader()
    start = None
    while len(batches) < n:
        for batch in loader:
            batches.append(batch)
            if start is None:
                start = time.perf_counter()
            if len(batches) == n:
                break
    rate = (n - 1) / (time.perf_counter() - start) if n > 1 else float("nan")
    return batches, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each fit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader processes (default: the pipeline's default_crop_workers)",
    )
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--crop-seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3, help="fits per source (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="read and resample each crop's span from its file (no audio cache)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no per-fit "GPU available" banners
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*pin_memory.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")

    from latentdyn.data.audio_cache import AudioCache, write_audio_cache
    from latentdyn.data.audio_crops import AudioCropDataModule  # imports lightning (seconds)

    cache: AudioCache | None = None
    if args.workers is None:
        from latentdyn.data.audio_crops import default_crop_workers

        args.workers = default_crop_workers(not args.no_cache, torch.cuda.is_available())

    def datamodule() -> Any:
        return AudioCropDataModule(
            {"train": utts},
            sample_rate=MODEL_RATE,
            crop_seconds=args.crop_seconds,
            batch_size=args.batch,
            num_workers=args.workers,
            seed=0,
            cache=cache,
        )

    torch.manual_seed(0)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        utts = write_corpus(Path(tmp), args.utterances)
        minutes = sum(u.duration for u in utts) / 60
        print(
            f"corpus: {len(utts)} utterances, {minutes:.1f} min at {SOURCE_RATE} Hz, written in {time.perf_counter() - t0:.1f} s"
        )
        if not args.no_cache:  # the pipeline's default: decode and resample every utterance once
            t0 = time.perf_counter()
            (Path(tmp) / "cache").mkdir()
            write_audio_cache(utts, MODEL_RATE, Path(tmp) / "cache", "error")
            cache = AudioCache(Path(tmp) / "cache")
            print(
                f"audio cache at {MODEL_RATE} Hz built in {time.perf_counter() - t0:.1f} s (once per corpus)"
            )
        batches, fetch_rate = collect(datamodule(), total)
        print(
            f"batch {tuple(batches[0].shape)}, {args.workers} workers, torch threads {torch.get_num_threads()}, "
            f"device {'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        model = build_model()
        rates: dict[str, list[float]] = {"loader": [], "preloaded": []}
        for _ in range(args.rounds):
            rates["loader"].append(timed_fit(model, datamodule(), args.warmup, args.steps))
            rates["preloaded"].append(timed_fit(model, Preloaded(batches), args.warmup, args.steps))
        bf16 = (
            timed_fit(model, datamodule(), args.warmup, args.steps, precision="bf16-mixed")
            if torch.cuda.is_available()
            else None
        )

    audio_per_step = args.batch * args.crop_seconds
    ratios = [a / b for a, b in zip(rates["loader"], rates["preloaded"], strict=True)]
    print(f"loader fetch alone:      {fetch_rate:8.2f} batches/s")
    for name, values in rates.items():
        median = float(np.median(values))
        print(
            f"steps/s, {name:<15} {median:8.2f}  ({median * audio_per_step:.0f} audio s / s; "
            f"rounds: {' '.join(f'{x:.2f}' for x in values)})"
        )
    if bf16 is not None:
        print(f"steps/s, loader bf16-mixed {bf16:6.2f}  ({bf16 * audio_per_step:.0f} audio s / s)")
    ratio = float(np.median(ratios))
    verdict = "PASS" if ratio >= 0.9 else "FAIL"
    print(f"ratio loader / preloaded: {ratio:7.3f}  (median over rounds; target >= 0.9 on CPU: {verdict})")


if __name__ == "__main__":
    main()
