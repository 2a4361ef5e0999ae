"""One training step of Exp 9's VAE-GAN, split by component, so the cost of the WavLM teacher is visible.

Builds ``VAEGANModule`` directly with random weights (``pretrained: false`` for the pocket-tts Mimi codec and
for the WavLM teacher, so nothing is downloaded; timings, not quality), every loss on from step 0 (each
``*_start`` 0, ``deterministic_steps`` 0: posterior sampling, KL, align, pred, hinge + feature matching,
distillation) and the AdamW optimisers ``configure_optimizers()`` returns (lr 1e-4, gradient-norm clip 1.0
per optimiser, only the current optimiser's parameters trainable, as ``training_step`` toggles them). The
teacher is WavLM base's size by default (768-d, 12 layers, target layer 7); ``--tiny-teacher`` uses the
smoke config's 2-layer 32-d one (target layer 2).

Timed on random crops ``(B, 1, S)`` at 24 kHz (``time.perf_counter``, ``torch.cuda.synchronize`` around each
region on a GPU), each figure the median over ``--repeats`` iterations after ``--warmup`` untimed ones:

* encoder: ``vae.encode_codec`` + ``vae.posterior`` (frozen encoder under ``init=pretrained``: no graph);
* decoder: ``vae.decode`` (``dec_proj`` + Mimi decode) of a posterior sample;
* discriminator forwards: the generator's adversarial / feature-matching pass (fake with graph, real without
  gradient) plus ``discriminator_terms`` (real and detached fake) for the D loss;
* WavLM teacher: ``teacher_targets`` on the crop (resample to 16 kHz, forward, interpolate);
* G update / D update: zero_grad + backward + clip + AdamW step after ``generator_terms`` /
  ``discriminator_terms`` (untimed forwards);
* whole step: ``generator_terms`` + G update, then ``discriminator_terms`` + D update, as ``training_step``
  runs them; "rest" is the whole step less the components (losses, sampling), by difference of medians.

On a GPU the table is taken in fp32 and under ``torch.autocast("cuda", dtype=torch.bfloat16)`` around the
step (the codec runs with autocast off inside the module; the teacher in fp16, ``half_on_gpu``), and both
steps/s are printed; bf16 is not measured on a CPU. Defaults: batch 4 x 4.0 s crops, 5 repeats, 2 warm-ups;
on a CPU, unless ``--full``, the quick settings (batch 2 x 1.0 s, 3 repeats, 1 warm-up; as ``--quick``) keep
the run near 1 minute on 2 cores (a batch 4 x 4 s step takes ~50 s there). ``--threads`` sets torch's threads
after the model is built (default: torch's, which latentdyn keeps when it imports pocket_tts). A measurement, not a test: no target, exits 0
whenever it could measure.
Run: ``uv run python bench/vaegan_step.py [--batch 4] [--seconds 4.0] [--repeats 5] [--quick] [--full]
[--init pretrained|scratch] [--tiny-teacher] [--device auto|cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 24000
CODEC = {"_target_": "latentdyn.representations.pocket_mimi.PocketMimiRepresentation", "pretrained": False}
#: conf/debug/smoke.yaml's teacher: 2 layers, 32-d.
TINY_TEACHER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}
FULL = {"batch": 4, "seconds": 4.0, "repeats": 5, "warmup": 2}
QUICK = {"batch": 2, "seconds": 1.0, "repeats": 3, "warmup": 1}
COMPONENTS = {
    "encoder": "encoder (codec encode + posterior)",
    "decoder": "decoder (dec_proj + Mimi decode)",
    "discriminator": "discriminator forwards (G adv/FM + D loss)",
    "teacher": "WavLM teacher (teacher_targets)",
    "g_update": "G backward + clip + AdamW step",
    "d_update": "D backward + clip + AdamW step",
}


def build_module(init: str, tiny_teacher: bool) -> tuple[Any, int]:
    """The VAE-GAN with random weights and every loss on from step 0, and the teacher layer it distils."""
    from latentdyn.models.vae_gan import DEFAULT_LOSS, VAEGANModule

    layer = 2 if tiny_teacher else 7
    loss = {key: 0 for key in DEFAULT_LOSS if key.endswith("_start")}
    loss.update(deterministic_steps=0, distill_layer=layer)
    teacher = {"pretrained": False, "config": dict(TINY_TEACHER) if tiny_teacher else None}
    return VAEGANModule(codec=dict(CODEC), init=init, loss=loss, teacher=teacher), layer


@contextlib.contextmanager
def toggled(optimizer: torch.optim.Optimizer, optimizers: list[torch.optim.Optimizer]) -> Iterator[None]:
    """Only ``optimizer``'s parameters trainable inside the block (Lightning's ``toggle_optimizer``)."""
    state = {p: p.requires_grad for opt in optimizers for g in opt.param_groups for p in g["params"]}
    own = {p for g in optimizer.param_groups for p in g["params"]}
    for p in state:
        p.requires_grad_(state[p] if p in own else False)
    try:
        yield
    finally:
        for p, flag in state.items():
            p.requires_grad_(flag)


class StepBench:
    """Times the components and the whole step of ``model`` on one batch of crops."""

    def __init__(self, model: Any, layer: int, device: torch.device, clip: float | None) -> None:
        self.model = model
        self.layer = layer
        self.device = device
        self.clip = clip
        self.opt_g, self.opt_d = model.configure_optimizers()
        self.optimizers = [self.opt_g, self.opt_d]
        self.step = 0  # every loss is on from step 0; the schedule's step stays there

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``fn()`` and its wall time in ms, synchronised on a GPU."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, (time.perf_counter() - start) * 1e3

    def update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        optimizer.step()

    def whole_step(self, wave: torch.Tensor) -> float:
        """``training_step``'s work: the generator's terms and update, then the discriminator's; the G loss."""
        m = self.model
        with toggled(self.opt_g, self.optimizers):
            terms = m.generator_terms(wave, self.step)
            self.update(self.opt_g, terms["loss"])
        with toggled(self.opt_d, self.optimizers):
            d_terms = m.discriminator_terms(wave, terms["audio"])
            self.update(self.opt_d, d_terms["loss"])
        return float(terms["loss"].detach())

    def forwards(self, wave: torch.Tensor) -> dict[str, float]:
        """The forward components (ms): encoder, decoder, discriminator passes, teacher."""
        from latentdyn.models.wavlm_distill import teacher_targets

        m, vae, times = self.model, self.model.vae, {}
        with toggled(self.opt_g, self.optimizers):

            def encoder() -> tuple[torch.Tensor, torch.Tensor]:
                return vae.posterior(vae.encode_codec(wave))

            (mu, logvar), times["encoder"] = self.timed(encoder)
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
            audio, times["decoder"] = self.timed(lambda: vae.decode(z)[..., : wave.shape[-1]])

            def generator_side() -> Any:
                fake = m.discriminator(audio)
                with torch.no_grad():
                    real = m.discriminator(wave)
                return fake, real

            _, t_g_side = self.timed(generator_side)
            m._teacher_to_device()  # a no-op after the first call, as in generator_terms
            _, times["teacher"] = self.timed(
                lambda: teacher_targets(m.teacher, wave, m.sample_rate, self.layer, mu.shape[-1])
            )
        with toggled(self.opt_d, self.optimizers):
            _, t_d_side = self.timed(lambda: m.discriminator_terms(wave, audio.detach()))
        times["discriminator"] = t_g_side + t_d_side
        return times

    def updates(self, wave: torch.Tensor) -> dict[str, float]:
        """Backward + clip + step of each optimiser (ms), after its untimed forward."""
        m, times = self.model, {}
        with toggled(self.opt_g, self.optimizers):
            terms = m.generator_terms(wave, self.step)
            _, times["g_update"] = self.timed(lambda: self.update(self.opt_g, terms["loss"]))
        with toggled(self.opt_d, self.optimizers):
            d_terms = m.discriminator_terms(wave, terms["audio"].detach())
            _, times["d_update"] = self.timed(lambda: self.update(self.opt_d, d_terms["loss"]))
        return times

    def iteration(self, wave: torch.Tensor) -> tuple[dict[str, float], float]:
        """One timing of every component and of the whole step (ms), and the step's generator loss."""
        times = {**self.forwards(wave), **self.updates(wave)}
        loss, times["step"] = self.timed(lambda: self.whole_step(wave))
        return times, loss


def measure(
    bench: StepBench, wave: torch.Tensor, warmup: int, repeats: int, bf16: bool
) -> tuple[dict[str, list[float]], float]:
    """Per-key lists of ``repeats`` timings (ms) after ``warmup`` untimed iterations, and the last G loss."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    runs: dict[str, list[float]] = {}
    loss = float("nan")
    with amp:
        for i in range(warmup + repeats):
            times, loss = bench.iteration(wave)
            if i >= warmup:
                for key, value in times.items():
                    runs.setdefault(key, []).append(value)
    return runs, loss


def report(runs: dict[str, list[float]], title: str, audio_seconds: float) -> tuple[float, float]:
    """Prints the table; returns steps/s and the teacher's share of the step."""
    step = float(np.median(runs["step"]))
    medians = {key: float(np.median(runs[key])) for key in COMPONENTS}
    rest = step - sum(medians.values())
    print(f"\n== {title} ==")
    print(f"{'component':<48} {'median ms':>10} {'share %':>8} {'range ms':>17}")
    for key, name in COMPONENTS.items():
        low, high = min(runs[key]), max(runs[key])
        spread = f"{low:.1f}-{high:.1f}"
        print(f"{name:<48} {medians[key]:>10.1f} {100 * medians[key] / step:>8.1f} {spread:>17}")
    print(f"{'rest (losses, sampling; by difference)':<48} {rest:>10.1f} {100 * rest / step:>8.1f}")
    spread = f"{min(runs['step']):.1f}-{max(runs['step']):.1f}"
    print(f"{'whole step (G terms + update, D terms + update)':<48} {step:>10.1f} {100.0:>8.1f} {spread:>17}")
    if rest < 0:
        print("(rest < 0: the components' medians add up to more than the step's: timing noise)")
    rate = 1e3 / step
    share = 100 * medians["teacher"] / step
    print(
        f"steps/s {rate:.3f} ({rate * audio_seconds:.2f} audio s trained per s); teacher {share:.1f} % of the step"
    )
    return rate, share


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Defaults: --batch 4 --seconds 4.0 --repeats 5 --warmup 2. On a CPU without --full, the quick "
        "settings apply to whatever is not given (batch 2, 1.0 s crops, 3 repeats, 1 warm-up): about 1 min on "
        "2 cores, where one 4 x 4 s step takes ~50 s (--full: ~12 min). --quick forces them on any device.",
    )
    parser.add_argument("--batch", type=int, default=None, help="crops per step (default 4; quick 2)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="crop length in s (default 4.0; quick 1.0)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations (default 5; quick 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations first (default 2; quick 1)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="quick settings on any device")
    group.add_argument(
        "--full", action="store_true", help="the full defaults on a CPU too (~12 min on 2 cores)"
    )
    parser.add_argument(
        "--init", choices=("pretrained", "scratch"), default="pretrained", help="VAEGANModule init"
    )
    parser.add_argument(
        "--tiny-teacher", action="store_true", help="2-layer 32-d WavLM instead of base's size"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: as left after import)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    quick = args.quick or (device.type == "cpu" and not args.full)
    defaults = QUICK if quick else FULL
    settings = {key: getattr(args, key) if getattr(args, key) is not None else defaults[key] for key in FULL}
    batch, seconds, repeats, warmup = (settings[k] for k in ("batch", "seconds", "repeats", "warmup"))

    warnings.filterwarnings("ignore", ".*weight_norm.*")
    logging.getLogger("latentdyn").setLevel(logging.WARNING)
    threads_before = torch.get_num_threads()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, layer = build_module(args.init, args.tiny_teacher)
    model = model.to(device).train()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    build_s = time.perf_counter() - t0

    bench = StepBench(model, layer, device, model.hparams.gradient_clip_val)
    model._teacher_to_device()
    count = lambda params: sum(p.numel() for p in params) / 1e6  # noqa: E731
    teacher_cfg = model.teacher.config
    teacher_dtype = next(model.teacher.parameters()).dtype
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    why = ("--quick" if args.quick else "quick settings: CPU without --full") if quick else "full defaults"
    print(
        f"device {device} ({name}), torch {torch.__version__}, torch threads {torch.get_num_threads()} "
        f"(before building: {threads_before}; --threads N)"
    )
    print(
        f"crops: batch {batch} x {seconds:g} s of random audio at {SAMPLE_RATE} Hz; {repeats} timed iteration(s) "
        f"after {warmup} warm-up ({why})"
    )
    print(
        f"random weights (codec and teacher pretrained=false): nothing downloaded; timings, not quality. "
        f"Built in {build_s:.1f} s, init={args.init}"
    )
    print(
        f"parameters: generator trainable {count(model.generator_parameters()):.2f} M of VAE "
        f"{count(model.vae.parameters()):.2f} M; discriminator {count(model.discriminator.parameters()):.2f} M; "
        f"teacher {count(model.teacher.parameters()):.2f} M ({teacher_cfg.num_hidden_layers} layers, "
        f"{teacher_cfg.hidden_size}-d, layer {layer}, {str(teacher_dtype).removeprefix('torch.')})"
    )

    wave = (0.1 * torch.randn(batch, 1, round(seconds * SAMPLE_RATE), device=device)).clamp(-1, 1)
    audio_seconds = batch * seconds
    modes = [("fp32", False)] + ([("bf16 autocast", True)] if device.type == "cuda" else [])
    figures = {}
    load_before = os.getloadavg()[0]
    for label, bf16 in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            runs, loss = measure(bench, wave, warmup, repeats, bf16)
        except RuntimeError as err:  # e.g. a dtype clash under autocast: report it, keep the fp32 figures
            if not bf16:
                raise
            print(f"\n== {label}: failed, not measured: {type(err).__name__}: {err}")
            continue
        figures[label] = report(runs, f"{label}: batch {batch} x {seconds:g} s", audio_seconds)
        extra = (
            f"; peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
            if device.type == "cuda"
            else ""
        )
        print(f"last generator loss {loss:.4f} ({'finite' if np.isfinite(loss) else 'NOT finite'}){extra}")
    if device.type != "cuda":
        print("\nbf16 autocast: GPU-only, not measured on a CPU")
    print(
        f"1-min load average before the timings {load_before:.2f}, after {os.getloadavg()[0]:.2f} (the timings "
        f"alone bring it towards {torch.get_num_threads()}, the torch threads; well above that, other processes "
        f"competed for the cores and the times are noisy)"
    )

    print()
    for label, (rate, share) in figures.items():
        print(
            f"the figure ({label}): {rate:.3f} steps/s, {rate * audio_seconds:.2f} audio s per s "
            f"(batch {batch} x {seconds:g} s); WavLM teacher {share:.1f} % of the step"
        )
    if len(figures) == 2:
        print(f"bf16 / fp32 steps/s: {figures['bf16 autocast'][0] / figures['fp32'][0]:.2f}x")


if __name__ == "__main__":
    main()
