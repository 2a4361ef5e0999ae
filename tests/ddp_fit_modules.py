"""Fit every Lightning module of latentdyn for a few steps, in one process or data-parallel, and save the weights.

    python tests/ddp_fit_modules.py OUT_DIR WORLD [ROOT]

WORLD 1 fits in one process (``strategy=auto``), WORLD > 1 with ``accelerator=cpu devices=WORLD strategy=ddp``
(gloo). ROOT (default ``OUT_DIR/root``) holds the synthetic corpus, latent store and audio caches, which two
invocations may share. Each module is built with a fixed seed and fitted through the package's own path
(``build_trainer`` + ``fit``, mostly the pipelines' functions); rank 0 saves its weights before and after
the fit to ``OUT_DIR/<module>.init.pt`` and ``OUT_DIR/<module>.pt`` (tensors only), and every rank writes
``OUT_DIR/ranks/<module>.rank<r>.json`` with the rank and world size it fitted in.

Lightning's ``ddp`` launcher starts ranks 1..WORLD-1 by re-running this command line when rank 0's first
fit starts, so everything here is safe to run again with the same arguments: artifacts are reused, each
module's files are overwritten, and every rank fits the same modules in the same order.
``tests/test_ddp_modules.py`` compares the WORLD=1 and WORLD=2 weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tests.conftest import compose_at  # noqa: E402

MODULES = ("dynamics_vmf", "dynamics_mdn", "rollout", "betavae", "score", "direction_ar", "vae_gan")
#: Optimiser steps of every fit, and validation (with sync_dist metrics) after every second one.
STEPS = 4
VAL_EVERY = 2
SEED = 0
BACKBONE = ["model.backbone.hidden=32"]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _trainer_overrides(world: int) -> list[str]:
    strategy = "ddp" if world > 1 else "auto"
    return [
        "trainer.accelerator=cpu",
        f"trainer.devices={world}",
        f"trainer.strategy={strategy}",
        f"trainer.max_steps={STEPS}",
        f"max_steps={STEPS}",
        f"trainer.val_check_interval={VAL_EVERY}",
        "trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0",
        "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"checkpointing.every_n_steps={STEPS}",
        f"seed={SEED}",
    ]


def _compose(root: Path, out: Path, name: str, world: int, overrides: list[str]) -> DictConfig:
    return compose_at(root, ["debug=smoke", *_trainer_overrides(world), *overrides], out / "runs" / name)


def _save(out: Path, name: str, tag: str, module: Any) -> None:
    rank, world = _rank_world()
    if tag == "final":
        ranks = out / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"{name}.rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world}))
    if rank != 0:
        return
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    path = out / (f"{name}.pt" if tag == "final" else f"{name}.init.pt")
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _SaveInit(out: Path, name: str) -> Any:  # noqa: N802 (a callback class, built when lightning is imported)
    """A callback that saves the module's weights when its fit starts (a one-process fit starts from the
    seed as each DDP rank does: ``latentdyn.models.training.SeedLikeDataParallel``)."""
    from lightning.pytorch.callbacks import Callback

    class SaveInit(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            _save(out, name, "init", pl_module)

    return SaveInit()


def fit_dynamics(root: Path, out: Path, world: int, name: str) -> Any:
    """The dynamics train path (``pipeline.train.train_horizon``): vMF×LogNormal or Gaussian MDN, k = 1."""
    from latentdyn.pipeline.store import prepare_latent_store
    from latentdyn.pipeline.train import train_horizon

    model = "vmf_lognormal" if name == "dynamics_vmf" else "gaussian_mdn"
    cfg = _compose(
        root,
        out,
        name,
        world,
        [f"model={model}", *BACKBONE, "datamodule.batch_size=8", "model.optimizer.warmup_steps=2"],
    )
    store = prepare_latent_store(cfg)
    return _with_init_hook(out, name, lambda: train_horizon(cfg, store, 1, None)[0])


def fit_rollout(root: Path, out: Path, world: int, name: str) -> Any:
    """Exp 1B's fine-tuning (``experiments.exp1b_vmf_rollout.finetune``, loaders passed to ``fit``) of a
    freshly seeded vMF dynamics model."""
    from latentdyn.experiments.exp1b_vmf_rollout import finetune
    from latentdyn.models.training import seed_everything
    from latentdyn.pipeline.common import build_dynamics
    from latentdyn.pipeline.store import prepare_latent_store

    cfg = _compose(
        root,
        out,
        name,
        world,
        [
            "experiment=exp1b_vmf_rollout",
            *BACKBONE,
            "datamodule.batch_size=8",
            "rollout.k_steps=3",
            "rollout.warmup_steps=0",
            # Scheduled sampling draws one coin per row of the batch: see tests/test_ddp_modules.py.
            "rollout.teacher_prob.start=0.0",
            "rollout.teacher_prob.end=0.0",
        ],
    )
    store = prepare_latent_store(cfg)
    seed_everything(cfg.seed)
    source = build_dynamics(cfg, dim=store.dim, horizon=1)
    return _with_init_hook(out, name, lambda: finetune(cfg, source, Path("untrained-source.ckpt"), store)[0])


def fit_betavae(root: Path, out: Path, world: int, name: str) -> Any:
    """Exp 5's β-VAE over the mel base (``pipeline.betavae.train_betavae``, ``AudioCropDataModule``)."""
    from latentdyn.pipeline.betavae import train_betavae

    cfg = _compose(
        root,
        out,
        name,
        world,
        [
            "experiment=exp5_betavae",
            "latent_dim=4",
            "vae.dec_hidden_dim=16",
            "vae.lambda_smooth=0.1",
            "vae.lambda_pred=0.1",
            "vae.predictor.window=2",
            "vae.predictor.hidden=16",
            "vae_train.batch_size=4",
            f"vae_train.val_check_interval={VAL_EVERY}",
        ],
    )
    return _with_init_hook(out, name, lambda: train_betavae(cfg, None)[0])


def _window_fit(cfg: DictConfig, out: Path, name: str, model: Any, spec: Any, standardize: bool) -> Any:
    from latentdyn.models.training import build_trainer, fit
    from latentdyn.pipeline.common import checkpoint_dir, window_datamodule
    from latentdyn.pipeline.store import prepare_latent_store

    store = prepare_latent_store(cfg)
    datamodule = window_datamodule(cfg, store, spec, standardize)
    last = checkpoint_dir(cfg) / f"{name}_last.ckpt"
    trainer = build_trainer(cfg, None, [_SaveInit(out, name)], last_checkpoint=last)
    fit(trainer, model, last, False, datamodule=datamodule)
    return model


def fit_score(root: Path, out: Path, world: int, name: str) -> Any:
    """Exp 6's score model (conditional, on standardised windows)."""
    from latentdyn.data.windows import WindowSpec
    from latentdyn.models.score import ScoreModule
    from latentdyn.models.training import seed_everything
    from latentdyn.pipeline.store import prepare_latent_store

    cfg = _compose(root, out, name, world, ["datamodule.batch_size=8"])
    dim = prepare_latent_store(cfg).dim
    seed_everything(cfg.seed)
    model = ScoreModule(dim, hidden_dim=32, n_layers=2, sigma_embed_dim=8, conditional=True, context_frames=3)
    return _window_fit(cfg, out, name, model, WindowSpec(3, 1), standardize=True)


def fit_direction_ar(root: Path, out: Path, world: int, name: str) -> Any:
    """Exp 10's direction AR over a random unit codebook of 8 codewords (raw windows, W = 3)."""
    from latentdyn.data.windows import WindowSpec
    from latentdyn.models.direction_ar import DirectionARModule
    from latentdyn.models.training import seed_everything
    from latentdyn.pipeline.store import prepare_latent_store

    cfg = _compose(root, out, name, world, ["datamodule.batch_size=8"])
    dim = prepare_latent_store(cfg).dim
    seed_everything(cfg.seed)
    codebook = torch.nn.functional.normalize(torch.randn(8, dim), dim=-1)
    backbone = {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 32, "layers": 2}
    model = DirectionARModule(dim, 3, 8, backbone, optimizer={"lr": 1e-3}, codebook=codebook)
    return _window_fit(cfg, out, name, model, WindowSpec(3, 1), standardize=False)


def fit_vae_gan(root: Path, out: Path, world: int, name: str) -> Any:
    """Exp 9's VAE-GAN (``pipeline.vae_gan.train_vae_gan``: manual optimisation, generator + discriminator)
    with every loss on within the fit and a tiny random WavLM teacher."""
    from latentdyn.pipeline.vae_gan import train_vae_gan

    cfg = _compose(
        root,
        out,
        name,
        world,
        [
            "experiment=exp9_pocket_mimi_vae",
            "latent_dim=4",
            "vae_gan.dec_hidden_dim=16",
            "vae_gan.discriminator.filters=4",
            "vae_gan_train.batch_size=2",
            "vae_gan_train.crop_seconds=0.4",
            f"vae_gan_train.val_check_interval={VAL_EVERY}",
            "vae_gan.loss.gan_start=1",
            "vae_gan.loss.kl_start=1",
            "vae_gan.loss.kl_ramp=2",
            "vae_gan.loss.pred_start=1",
            "vae_gan.loss.distill_start=1",
            # Sampled latents and the relative feature-matching normaliser: see tests/test_ddp_modules.py.
            f"vae_gan.loss.deterministic_steps={STEPS}",
            "vae_gan.loss.fm_normalization=absolute",
            "samples.n_utterances=0",
        ],
    )
    return _with_init_hook(out, name, lambda: train_vae_gan(cfg, None)[0])


def _with_init_hook(out: Path, name: str, run: Any) -> Any:
    """Run a pipeline's fit with :class:`_SaveInit` added to every trainer ``build_trainer`` makes."""
    from latentdyn.models import training

    original = training.build_trainer

    def build_trainer(cfg: Any, logger: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        return original(cfg, logger, [*callbacks, _SaveInit(out, name)], **kwargs)

    training.build_trainer = build_trainer
    try:
        return run()
    finally:
        training.build_trainer = original


FITS = {
    "dynamics_vmf": fit_dynamics,
    "dynamics_mdn": fit_dynamics,
    "rollout": fit_rollout,
    "betavae": fit_betavae,
    "score": fit_score,
    "direction_ar": fit_direction_ar,
    "vae_gan": fit_vae_gan,
}


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    out, world = Path(argv[0]).resolve(), int(argv[1])
    root = Path(argv[2]).resolve() if len(argv) == 3 else out / "root"
    only = [m for m in os.environ.get("DDP_FIT_MODULES", ",".join(MODULES)).split(",") if m]
    out.mkdir(parents=True, exist_ok=True)
    for name in only:
        model = FITS[name](root, out, world, name)
        _save(out, name, "final", model)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
