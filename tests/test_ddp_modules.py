"""Every Lightning module of latentdyn trains under ``accelerator=cpu devices=2 strategy=ddp`` to the weights
of a one-process fit on the same global batches (``tests/ddp_fit_modules.py`` does the fits).

Each rank takes rows ``r, r + 2, ...`` of every global batch and DDP averages the gradients, so with equal
shards (even global batches) a step is the one-process step up to float rounding. The per-row noise of the
score model, the β-VAE and the VAE-GAN is drawn for the global batch on every rank
(:mod:`latentdyn.models.data_parallel`). Conditions of the comparison, each a known difference:

* Lightning's ``ddp`` re-seeds the global random state when a fit starts; a one-process fit does the same
  (:class:`latentdyn.models.training.SeedLikeDataParallel`), so both draw the same training noise.
* Exp 1B runs without scheduled sampling (p_teacher 0): :func:`latentdyn.models.rollout.unrolled_nll` draws one
  coin per row of the local batch from a generator seeded by the step, so under DDP the ranks flip other
  coins than one process would (same distribution, other draws).
* The VAE-GAN decodes the posterior means (``deterministic_steps`` = the fit) and uses the ``absolute``
  feature-matching normaliser: ``relative`` divides by the mean magnitude of the rank's real feature maps,
  a ratio of batch means that DDP averages per rank. Even so it is not equivalent (see :data:`NOT_EQUIVALENT`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_fit_modules import MODULES

SCRIPT = Path(__file__).with_name("ddp_fit_modules.py")
REPO_ROOT = SCRIPT.parents[1]
RTOL, ATOL = 1e-4, 1e-5
#: Not equivalent (the test is an expected failure, strict: it fails once the module matches).
NOT_EQUIVALENT = {
    "vae_gan": (
        "the VAE-GAN's random-weight Mimi decoder gives near-silent audio, where the log-|STFT| reconstruction "
        "terms (1/|S| gradients) turn float rounding into gradient differences of ~3e-3 of the largest gradient "
        "even between one batch of 2 crops and two batches of 1 in one process; Adam's first steps "
        "(update ~ lr * sign) then move ~30 % of the decoder's elements differently (max diff 2.4e-4 for a "
        "movement of 4e-4 in 4 steps at lr 1e-4)"
    )
}


def _run(out: Path, world: int, root: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    for var in (
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PL_GLOBAL_SEED",
    ):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(world), str(root)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"WORLD={world} exited {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}"
        )


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(one-process output, two-process output) of the script, sharing one corpus and store."""
    base = tmp_path_factory.mktemp("ddp")
    _run(base / "one", 1, base / "root")
    _run(base / "two", 2, base / "root")
    return base / "one", base / "two"


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / name, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("module", MODULES)
def test_ddp_fit_ran_on_two_ranks_from_one_start(fits: tuple[Path, Path], module: str) -> None:
    one, two = fits
    # Both ranks fitted this module, each in a world of 2 (the test cannot pass by running one process).
    for out, world in ((one, 1), (two, 2)):
        seen = [json.loads((out / "ranks" / f"{module}.rank{r}.json").read_text()) for r in range(world)]
        assert seen == [{"rank": r, "world": world} for r in range(world)]
    assert not (one / "ranks" / f"{module}.rank1.json").exists()
    init, init_ddp = _weights(one, f"{module}.init.pt"), _weights(two, f"{module}.init.pt")
    assert set(init) == set(init_ddp) and init
    for key, value in init.items():
        assert torch.equal(init_ddp[key], value), f"{module}: {key} starts elsewhere"
    # Training did something: the two-process fit moved the weights.
    ddp = _weights(two, f"{module}.pt")
    moved = max(
        (ddp[k].float() - v.float()).abs().max().item() for k, v in init.items() if v.is_floating_point()
    )
    assert moved > 1e-5, f"{module}: the 2-process fit left the weights at their init"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "module",
    [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=NOT_EQUIVALENT[m]))
        if m in NOT_EQUIVALENT
        else m
        for m in MODULES
    ],
)
def test_ddp_fit_matches_one_process_fit(fits: tuple[Path, Path], module: str) -> None:
    one, two = fits
    ref, ddp = _weights(one, f"{module}.pt"), _weights(two, f"{module}.pt")
    assert set(ref) == set(ddp) and ref
    worst = 0.0
    for key, a in ref.items():
        b = ddp[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{module}: {key}"
            continue
        worst = max(worst, (a - b).abs().max().item())
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{module}: {k}: {m}")
    print(f"{module}: max |ddp - one-process| = {worst:.3g}")
