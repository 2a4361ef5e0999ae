"""GPU check: bf16 extraction throughput, bf16 training steps of every Lightning module, a 1-GPU DDP run.

Three parts, each reported (never raised) so that one failure does not hide the others:

1. **extraction**: ``bench/extract.py --device cuda --precision bf16 --rep mimi`` as a subprocess (random-weight
   Mimi: extract.py always builds it with ``pretrained=False``, so nothing is downloaded; throughput does not
   depend on the weights' values). Its real-time factors are compared with the targets: Mimi pipeline >= 1000x
   real time on one H100-class GPU, pipeline/naive >= 5x, pipeline/forward >= 0.8.
2. **training steps**: every Lightning module (dynamics with the vMF x LogNormal and the Gaussian MDN heads,
   Exp 1B rollout fine-tuning, beta-VAE over log-mel, conditional score model, the Tweedie denoiser's settings
   of the same ``ScoreModule``, direction AR, VAE-GAN with random codec and a tiny random WavLM teacher) is
   fitted for 3 steps by a Lightning Trainer in ``bf16-mixed`` precision on tiny synthetic batches: the loss
   and logged metrics must be finite and trainable parameters must change; the step time (median of steps 2
   and 3, step 1 a warm-up) and, on CUDA, the peak GPU memory are printed.
3. **DDP**: ``python -m latentdyn experiment=exp1_vmf debug=smoke trainer.accelerator=gpu trainer.devices=1
   trainer.strategy=ddp`` in fresh temporary output and cache directories (``++trainer.strategy`` while
   conf/trainer has no such key); its exit code and wall time. It passes with exit code 0 and Lightning's
   "Initializing distributed" line in its output.

    uv run python bench/gpu_check.py [--out figures.json]           # on a CUDA machine
    uv run python bench/gpu_check.py --device cpu [--skip-extract]  # tiny sizes, to try it on a CPU

On ``--device cpu`` the modules train under bf16 autocast where torch supports it on the CPU (else fp32, said
so), extraction runs in fp32 on a tiny corpus (extract.py allows bf16 on CUDA only) and the DDP run uses
``trainer.accelerator=cpu``. Exit code 0 when every part that ran succeeded (figures below target do not
count as failures: they are measurements), 1 otherwise, 2 for bad arguments (``--device cuda`` without CUDA).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

#: Extraction targets (bench/README.md, extract.py).
MIMI_RTF_TARGET = 1000.0
PIPE_NAIVE_TARGET = 5.0
PIPE_FORWARD_TARGET = 0.8
#: What Lightning logs when a DDP process group starts (the DDP run must show it).
DDP_INIT = "Initializing distributed"
#: Training steps per module: one warm-up, then the timed ones.
STEPS = 3
#: Tiny synthetic sizes: latent dim, context window, batch, codewords.
DIM, WINDOW, BATCH, N_CODES = 16, 4, 8, 8
MLP = {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 64, "layers": 2, "layer_norm": False}
OPTIMIZER = {"lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 0}
MEL_BASE = {
    "_target_": "latentdyn.representations.mel.MelRepresentation",
    "sample_rate": 24000,
    "frame_rate": 12.5,
    "n_mels": 16,
    "griffin_lim_iters": 2,
}
POCKET_CODEC = {
    "_target_": "latentdyn.representations.pocket_mimi.PocketMimiRepresentation",
    "pretrained": False,
}
TINY_TEACHER = {
    "pretrained": False,
    "config": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "conv_dim": [8] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
    },
}
#: VAE-GAN schedule with every loss on within the fit: GAN from step 1, KL / sampling / distillation from 2.
VAE_GAN_LOSS = {
    "gan_start": 1,
    "kl_start": 2,
    "kl_ramp": 2,
    "deterministic_steps": 2,
    "distill_start": 2,
    "pred_start": 2,
    "distill_layer": 2,
}


@dataclass
class Figure:
    """One row of the final table."""

    part: str
    name: str
    value: str
    target: str = ""
    verdict: str = ""


@dataclass
class ModuleResult:
    """Outcome of one module's training steps."""

    name: str
    ok: bool
    precision: str
    loss: float | None = None
    step_ms: float | None = None
    peak_mib: float | None = None
    changed: int = 0
    trainable: int = 0
    error: str | None = None


@dataclass
class RunResult:
    """Outcome of a subprocess: exit code (None: timed out), wall seconds, command, output tail, and which of
    the strings looked for occur anywhere in its output."""

    command: list[str]
    rc: int | None
    wall_s: float
    tail: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)


@dataclass
class Case:
    """A module to train and the batches to train it on (one per step)."""

    module: Any
    batches: list[Any]


# --- devices and precision -----------------------------------------------------------------------------------
def check_device(device: str, parser: argparse.ArgumentParser) -> None:
    """Refuse ``--device cuda`` on a machine where torch sees no CUDA device, with the reason."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda requested but torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); run with --device cpu to try the script on a CPU"
        )


def cpu_bf16_autocast_works() -> bool:
    """Whether ``torch.autocast('cpu', bfloat16)`` runs a linear layer in bf16 on this machine."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.randn(4, 8), torch.randn(8, 8))
        return out.dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def training_precision(device: str) -> tuple[str, str | None]:
    """Lightning precision of the training steps and a note to print (None: nothing to say)."""
    if device == "cuda":
        return "bf16-mixed", None
    if cpu_bf16_autocast_works():
        return "bf16-mixed", "training steps: bf16 autocast on the CPU (times are not GPU figures)"
    return "32-true", "training steps: this torch has no bf16 autocast on the CPU: fp32 instead"


def sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on the CPU), so wall times cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def describe_device(device: str) -> str:
    """The device in words: GPU name and memory, or the CPU's thread count."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} torch threads"


# --- subprocesses --------------------------------------------------------------------------------------------
def run_command(
    command: list[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    keep: int = 25,
    look_for: Sequence[str] = (),
) -> RunResult:
    """Run ``command`` from the repository root, output captured (the last ``keep`` lines kept, and which of
    ``look_for`` occur in it); never raises for a failing command."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = None, _as_text(err.stdout) + _as_text(err.stderr) + f"\n[timed out after {timeout:.0f} s]"
    except OSError as err:
        rc, text = -1, f"[could not start: {err}]"
    found = [s for s in look_for if s in text]
    return RunResult(command, rc, time.perf_counter() - t0, text.rstrip().splitlines()[-keep:], found)


def _as_text(data: bytes | str | None) -> str:
    """Captured output of a timed-out process as text."""
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def print_tail(lines: Sequence[str], indent: str = "    | ") -> None:
    """Echo a subprocess's last output lines, indented."""
    for line in lines:
        print(f"{indent}{line}")


# --- 1. extraction -------------------------------------------------------------------------------------------
def extract_command(device: str, extra: Sequence[str]) -> tuple[list[str], str | None]:
    """bench/extract.py's command line for ``device`` and a note to print (None: nothing to say)."""
    cmd = [sys.executable, str(BENCH / "extract.py"), "--device", device, "--rep", "mimi"]
    if device == "cuda":
        cmd += ["--precision", "bf16", "--repeat", "20", "--batch-seconds", "600"]
        note = None
    else:
        # Tiny corpus; extract.py refuses bf16 without CUDA.
        cmd += ["--precision", "fp32", "--speakers", "2", "--utterances", "2"]
        cmd += ["--min-duration", "1", "--max-duration", "2", "--trials", "1"]
        note = "extraction: bench/extract.py allows bf16 on CUDA only: fp32 on the CPU, tiny corpus"
    return cmd + list(extra), note


def parse_extract(lines: Sequence[str]) -> dict[str, float] | None:
    """Mimi's pipeline / forward / naive real-time factors from extract.py's output (None: not found)."""
    pattern = re.compile(r"^mimi: pipeline ([\d.]+)x, forward ([\d.]+)x, naive ([\d.]+)x real time")
    for line in lines:
        m = pattern.match(line.strip())
        if m:
            pipeline, forward, naive = (float(g) for g in m.groups())
            return {"pipeline_rtf": pipeline, "forward_rtf": forward, "naive_rtf": naive}
    return None


def verdict(value: float, target: float) -> str:
    """PASS when ``value >= target``, else BELOW TARGET."""
    return "PASS" if value >= target else "BELOW TARGET"


def extract_figures(rtf: Mapping[str, float], device: str) -> list[Figure]:
    """The extraction rows of the final table, each against its target."""
    where = "" if device == "cuda" else " (a GPU target; this is a CPU run)"
    pipe, fwd, naive = rtf["pipeline_rtf"], rtf["forward_rtf"], rtf["naive_rtf"]
    return [
        Figure(
            "extract",
            "Mimi pipeline real-time factor",
            f"{pipe:.1f}x",
            f">= {MIMI_RTF_TARGET:.0f}x{where}",
            verdict(pipe, MIMI_RTF_TARGET),
        ),
        Figure(
            "extract",
            "pipeline / naive",
            f"{pipe / naive:.2f}x",
            f">= {PIPE_NAIVE_TARGET:.0f}x{where}",
            verdict(pipe / naive, PIPE_NAIVE_TARGET),
        ),
        Figure(
            "extract",
            "pipeline / forward",
            f"{pipe / fwd:.2f}",
            f">= {PIPE_FORWARD_TARGET}",
            verdict(pipe / fwd, PIPE_FORWARD_TARGET),
        ),
        Figure("extract", "forward / naive real-time factor", f"{fwd:.1f}x / {naive:.1f}x"),
    ]


def check_extract(device: str, extra: Sequence[str], timeout: float) -> tuple[dict[str, Any], list[Figure]]:
    """Run bench/extract.py, print its table and the figures against the targets."""
    cmd, note = extract_command(device, extra)
    print("\n== 1. extraction: bench/extract.py (Mimi, random weights) ==")
    if note:
        print(f"note: {note}")
    print("$ " + shlex.join(cmd))
    result = run_command(cmd, timeout, keep=40)
    rtf = parse_extract(result.tail) if result.rc == 0 else None
    print_tail([line for line in result.tail if "%|" not in line][-12:])  # without progress bars
    print(
        "weights: random (extract.py builds Mimi with pretrained=False: nothing downloaded; "
        "throughput does not depend on the weights' values)"
    )
    record: dict[str, Any] = {**asdict(result), "weights": "random", "figures": rtf, "ok": rtf is not None}
    if rtf is None:
        print(f"extraction FAILED (rc {result.rc}, {result.wall_s:.1f} s): no Mimi figures in its output")
        return record, [Figure("extract", "bench/extract.py", f"rc {result.rc}", "rc 0", "FAIL")]
    figures = extract_figures(rtf, device)
    for f in figures:
        print(f"{f.name:34} {f.value:>16}   target {f.target or '-':28} {f.verdict}")
    return record, figures


# --- 2. training steps ---------------------------------------------------------------------------------------
def windows(n_steps: int, context: int, dim: int = DIM) -> list[dict[str, torch.Tensor]]:
    """Window batches (``context`` ``(B, W, D)``, ``target`` and ``target_delta`` ``(B, D)``) of random latents."""
    out = []
    for _ in range(n_steps):
        frames = torch.randn(BATCH, context + 1, dim).cumsum(dim=1)
        out.append(
            {
                "context": frames[:, :-1].contiguous(),
                "target": frames[:, -1].contiguous(),
                "target_delta": (frames[:, -1] - frames[:, -2]).contiguous(),
            }
        )
    return out


def crops(n_steps: int, batch: int, samples: int) -> list[torch.Tensor]:
    """Batches of random audio crops ``(B, 1, S)`` at a speech-like level."""
    return [0.1 * torch.randn(batch, 1, samples) for _ in range(n_steps)]


def dynamics_case(head: str) -> Case:
    """A lag-1 :class:`DynamicsModel` with the ``vmf`` (vMF x LogNormal) or ``mdn`` (Gaussian MDN) head."""
    from latentdyn.models.dynamics import DynamicsModel

    heads = {
        "vmf": {"_target_": "latentdyn.models.heads.VMFLogNormalHead"},
        "mdn": {"_target_": "latentdyn.models.heads.GaussianMDNHead", "n_components": 4},
    }
    module = DynamicsModel(
        DIM, WINDOW, 1, MLP, heads[head], OPTIMIZER, name=head, horizon_mode="lag", standardized=False
    )
    return Case(module, windows(STEPS, WINDOW))


def rollout_case() -> Case:
    """Exp 1B's :class:`RolloutFinetuneModule` (K = 3 unrolled steps, scheduled sampling ramping over 2 steps)."""
    from latentdyn.models.rollout import RolloutFinetuneModule

    module = RolloutFinetuneModule(
        DIM,
        WINDOW,
        1,
        MLP,
        {"_target_": "latentdyn.models.heads.VMFLogNormalHead"},
        OPTIMIZER,
        horizon_mode="lag",
        standardized=False,
        k_steps=3,
        ramp_steps=2,
    )
    # A segment of L frames is a window of L - 1 context frames and one target frame.
    length = module.geometry.segment_length(module.k_steps)
    return Case(module, windows(STEPS, length - 1))


def betavae_case() -> Case:
    """Exp 5's :class:`BetaVAEModule` over a 16-band log-mel base, with the predictability loss on."""
    from latentdyn.models.betavae import BetaVAEModule

    module = BetaVAEModule(
        base=MEL_BASE, latent_dim=4, dec_hidden_dim=32, lambda_pred=0.1, predictor={"window": 4, "hidden": 16}
    )
    return Case(module, crops(STEPS, 2, 24000))


def score_case(conditional: bool) -> Case:
    """Exp 6's :class:`ScoreModule`; ``conditional=False`` with a 1e-4 rate is Exp 11's Tweedie denoiser
    (conf/model/denoiser.yaml: the same class, not a separate module)."""
    from latentdyn.models.score import ScoreModule

    lr = 1e-3 if conditional else 1e-4
    module = ScoreModule(
        DIM,
        hidden_dim=64,
        n_layers=2,
        sigma_embed_dim=16,
        conditional=conditional,
        context_frames=WINDOW,
        optimizer={"lr": lr, "weight_decay": 1e-4},
    )
    return Case(module, windows(STEPS, WINDOW))


def direction_ar_case() -> Case:
    """Exp 10's :class:`DirectionARModule` over a random unit codebook of :data:`N_CODES` codewords."""
    from latentdyn.models.direction_ar import DirectionARModule

    book = torch.nn.functional.normalize(torch.randn(N_CODES, DIM), dim=-1)
    module = DirectionARModule(DIM, WINDOW, N_CODES, MLP, optimizer={"lr": 3e-4}, codebook=book)
    return Case(module, windows(STEPS, WINDOW))


def vae_gan_case() -> Case:
    """Exp 9's :class:`VAEGANModule` (manual optimisation: G then D), random pocket-tts Mimi, tiny teacher."""
    from latentdyn.models.vae_gan import VAEGANModule

    module = VAEGANModule(
        codec=POCKET_CODEC,
        init="scratch",
        loss=VAE_GAN_LOSS,
        teacher=TINY_TEACHER,
        discriminator={"filters": 4},
    )
    return Case(module, crops(STEPS, 2, 12000))


CASES: dict[str, Callable[[], Case]] = {
    "dynamics vMF x LogNormal": lambda: dynamics_case("vmf"),
    "dynamics Gaussian MDN": lambda: dynamics_case("mdn"),
    "rollout fine-tune (Exp 1B)": rollout_case,
    "beta-VAE (mel base)": betavae_case,
    "score model (conditional)": lambda: score_case(True),
    "Tweedie denoiser (ScoreModule)": lambda: score_case(False),
    "direction AR": direction_ar_case,
    "VAE-GAN": vae_gan_case,
}


def make_step_timer(device: str) -> Any:
    """A Lightning callback recording each training step's wall time and returned loss."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            sync(device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
            sync(device)
            self.times.append(time.perf_counter() - self._t0)
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, torch.Tensor):
                self.losses.append(float(loss.detach().float()))

    return StepTimer()


def fit_steps(case: Case, device: str, precision: str, timer: Any) -> Any:
    """Fit ``case.module`` for one step per batch with a bare Lightning Trainer; returns the trainer."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=len(case.batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(case.batches, batch_size=None)
    trainer.fit(case.module, train_dataloaders=loader)
    return trainer


def trainable_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the module's trainable parameters."""
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def count_changed(before: Mapping[str, torch.Tensor], module: torch.nn.Module) -> tuple[int, bool]:
    """How many of the snapshot's parameters changed, and whether all of them are finite now."""
    params = dict(module.named_parameters())
    after = {n: params[n].detach().float().cpu() for n in before}
    changed = sum(not torch.equal(before[n], after[n]) for n in before)
    return changed, all(bool(torch.isfinite(t).all()) for t in after.values())


def logged_loss(trainer: Any, timer: Any) -> float | None:
    """The last step's loss: returned by ``training_step`` or (manual optimisation) logged as ``train/loss``."""
    if timer.losses:
        return timer.losses[-1]
    for key, value in trainer.callback_metrics.items():
        if key.endswith("loss"):
            return float(value)
    return None


def check_module(name: str, build: Callable[[], Case], device: str, precision: str) -> ModuleResult:
    """Build a module, fit it for :data:`STEPS` steps and judge it; any exception makes a FAIL, not a crash."""
    result = ModuleResult(name, ok=False, precision=precision)
    try:
        torch.manual_seed(0)
        case = build()
        before = trainable_snapshot(case.module)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timer = make_step_timer(device)
        trainer = fit_steps(case, device, precision, timer)
        if device == "cuda":
            result.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        result.changed, finite_params = count_changed(before, case.module)
        result.trainable = len(before)
        result.loss = logged_loss(trainer, timer)
        metrics_finite = all(
            bool(torch.isfinite(torch.as_tensor(v)).all()) for v in trainer.callback_metrics.values()
        )
        if len(timer.times) > 1:
            result.step_ms = 1e3 * statistics.median(timer.times[1:])
        problems = [
            msg
            for bad, msg in (
                (
                    len(timer.times) != len(case.batches),
                    f"{len(timer.times)} of {len(case.batches)} steps ran",
                ),
                (result.loss is None or not torch.isfinite(torch.tensor(result.loss)), "loss not finite"),
                (not metrics_finite, "a logged metric is not finite"),
                (not finite_params, "a parameter is not finite"),
                (result.changed == 0, "no parameter changed"),
            )
            if bad
        ]
        result.ok = not problems
        result.error = "; ".join(problems) or None
    except Exception as err:  # a check reports every failure and moves on to the next module
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        traceback.print_exc(limit=-6, file=sys.stdout)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def format_module(r: ModuleResult) -> str:
    """One line of the training table."""
    loss = f"{r.loss:.4g}" if r.loss is not None else "-"
    step = f"{r.step_ms:.1f}" if r.step_ms is not None else "-"
    peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
    changed = f"{r.changed}/{r.trainable}"
    line = f"{r.name:32} {loss:>10} {step:>9} {peak:>9} {changed:>8}  {'OK' if r.ok else 'FAIL'}"
    return line + (f"  ({r.error})" if r.error else "")


def quiet_lightning() -> None:
    """Keep Lightning's per-fit chatter (device inventory, tips, sanity warnings) out of the report."""
    import lightning.pytorch  # noqa: F401 - creates the loggers to quieten

    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "lightning"]
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", *names):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def check_modules(device: str) -> tuple[list[ModuleResult], list[Figure]]:
    """Train every module a few steps; print one line each as it finishes and return the results."""
    precision, note = training_precision(device)
    print(f"\n== 2. training steps: {len(CASES)} Lightning modules, precision {precision}, {STEPS} steps ==")
    if note:
        print(f"note: {note}")
    quiet_lightning()
    print(f"{'module':32} {'loss':>10} {'step ms':>9} {'peak MiB':>9} {'changed':>8}  verdict")
    results = []
    for name, build in CASES.items():
        results.append(check_module(name, build, device, precision))
        print(format_module(results[-1]), flush=True)
    print(f"(step ms: median of steps 2..{STEPS}, step 1 a warm-up; changed: trainable tensors that moved)")
    figures = [
        Figure(
            "train",
            r.name,
            (f"{r.step_ms:.1f} ms" if r.step_ms is not None else "-")
            + (f", {r.peak_mib:.0f} MiB" if r.peak_mib is not None else ""),
            "finite loss, parameters change",
            "OK" if r.ok else "FAIL",
        )
        for r in results
    ]
    return results, figures


# --- 3. DDP --------------------------------------------------------------------------------------------------
def strategy_override() -> tuple[str, str | None]:
    """``trainer.strategy=ddp``, or ``++trainer.strategy=ddp`` with a note while conf/trainer has no such key."""
    conf = ROOT / "conf" / "trainer" / "default.yaml"
    if conf.is_file() and re.search(r"^strategy\s*:", conf.read_text(), flags=re.MULTILINE):
        return "trainer.strategy=ddp", None
    return "++trainer.strategy=ddp", "conf/trainer/default.yaml has no `strategy` key yet: forced with ++"


def ddp_command(device: str, root: Path) -> tuple[list[str], str | None]:
    """The smoke Exp 1 run with DDP on one device, writing under ``root``; and a note (None: nothing)."""
    strategy, note = strategy_override()
    cmd = [
        sys.executable,
        "-m",
        "latentdyn",
        "experiment=exp1_vmf",
        "debug=smoke",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        strategy,
        f"paths.output_dir={root / 'outputs'}",
        f"paths.cache_dir={root / 'cache'}",
    ]
    return cmd, note


def check_ddp(device: str, timeout: float) -> tuple[dict[str, Any], list[Figure]]:
    """Run the 1-device DDP smoke job in fresh temporary directories; report its exit code and wall time."""
    print("\n== 3. DDP: exp1_vmf debug=smoke, strategy ddp, 1 device ==")
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as tmp:
        cmd, note = ddp_command(device, Path(tmp))
        if note:
            print(f"note: {note}")
        print("$ " + shlex.join(cmd))
        env = {**os.environ, "LATENTDYN_ROOT": tmp, "PYTHONUNBUFFERED": "1"}
        result = run_command(cmd, timeout, env=env, look_for=(DDP_INIT,))
        metrics = sorted(str(p.relative_to(tmp)) for p in Path(tmp, "outputs").rglob("metrics.json"))
    initialised = DDP_INIT in result.found
    ok = result.rc == 0 and initialised
    print(
        f"rc {result.rc}, wall {result.wall_s:.1f} s, {len(metrics)} metrics.json written, DDP process group "
        f"initialised: {'yes' if initialised else 'no (Lightning did not log it)'}: {'OK' if ok else 'FAIL'}"
    )
    if not ok:
        print("last lines of its output:")
        print_tail(result.tail)
    record = {**asdict(result), "metrics_files": metrics, "ddp_initialised": initialised, "ok": ok}
    figure = Figure(
        "ddp", "exp1_vmf smoke, ddp x1", f"rc {result.rc}, {result.wall_s:.1f} s", "rc 0, DDP initialised"
    )
    figure.verdict = "OK" if ok else "FAIL"
    return record, [figure]


# --- report --------------------------------------------------------------------------------------------------
def print_table(figures: Sequence[Figure]) -> None:
    """The final table of every figure, its target and verdict."""
    rows = [("part", "figure", "value", "target", "verdict")]
    rows += [(f.part, f.name, f.value, f.target or "-", f.verdict or "-") for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print("\n== figures ==")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Command-line options (and the parser, for argument errors found later)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--skip-extract", action="store_true", help="skip the extraction benchmark")
    p.add_argument("--skip-ddp", action="store_true", help="skip the DDP smoke run")
    p.add_argument("--out", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--extract-args", default="", help="extra arguments for bench/extract.py (one string)")
    p.add_argument("--extract-timeout", type=float, default=1200.0, help="seconds (default 1200)")
    p.add_argument("--ddp-timeout", type=float, default=1200.0, help="seconds (default 1200)")
    return p.parse_args(argv), p


def main(argv: Sequence[str] | None = None) -> int:
    args, parser = parse_args(argv)
    check_device(args.device, parser)
    print(
        f"gpu_check: device {describe_device(args.device)}, torch {torch.__version__}, python {sys.version.split()[0]}"
    )
    report: dict[str, Any] = {"device": args.device, "device_name": describe_device(args.device)}
    report["torch"] = torch.__version__
    figures: list[Figure] = []
    oks: list[bool] = []
    if not args.skip_extract:
        report["extract"], rows = check_extract(
            args.device, shlex.split(args.extract_args), args.extract_timeout
        )
        figures += rows
        oks.append(report["extract"]["ok"])
    results, rows = check_modules(args.device)
    report["modules"] = [asdict(r) for r in results]
    figures += rows
    oks += [r.ok for r in results]
    if not args.skip_ddp:
        report["ddp"], rows = check_ddp(args.device, args.ddp_timeout)
        figures += rows
        oks.append(report["ddp"]["ok"])
    print_table(figures)
    report["figures"] = [asdict(f) for f in figures]
    report["ok"] = all(oks)
    failed = len(oks) - sum(oks)
    print(
        f"\n{'all checks passed' if not failed else f'{failed} check(s) FAILED'} (below-target figures are not failures)"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
