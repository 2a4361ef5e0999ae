"""Exp 9 end to end under ``debug=smoke``: the VAE-GAN trains (every loss switched on within its few steps),
its latents become a store, Phase 1 and the reconstruction scores run, and every output is where the README
says; the trained checkpoint is then a representation other runs reuse."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import compose_at, manifest_lines, run_cli

RUN_ID = "e9"


def test_base_codec_is_only_scored_when_the_vae_gan_started_from_it(tmp_path: Path) -> None:
    from latentdyn.experiments.exp9_pocket_mimi_vae import base_codec
    from latentdyn.pipeline.vae_gan import COMPARISONS_ALONE, COMPARISONS_WITH_CODEC, vae_gan_reconstructor

    cfg = compose_at(tmp_path, ["experiment=exp9_pocket_mimi_vae", "debug=smoke"], tmp_path / "run")
    scratch = SimpleNamespace(hparams=SimpleNamespace(init="scratch"), sample_rate=24000, frame_rate=12.5)
    assert base_codec(cfg, scratch) is None
    assert vae_gan_reconstructor(scratch, None).comparisons == COMPARISONS_ALONE
    pretrained = SimpleNamespace(hparams=SimpleNamespace(init="pretrained"))
    codec = base_codec(cfg, pretrained)
    assert codec is not None and codec.weights["source"] == "random"  # debug=smoke: pretrained=false
    assert vae_gan_reconstructor(scratch, codec).comparisons == COMPARISONS_WITH_CODEC


def test_listening_samples_come_from_speakers_the_vae_gan_does_not_train_on(tmp_path: Path) -> None:
    from latentdyn.pipeline.store import prepare_splits
    from latentdyn.pipeline.vae_gan import sample_writer

    cfg = compose_at(
        tmp_path,
        ["experiment=exp9_pocket_mimi_vae", "debug=smoke", "samples.n_utterances=3"],
        tmp_path / "run",
    )
    writer = sample_writer(cfg)
    splits = prepare_splits(cfg)
    train_speakers = {u.speaker for u in splits["train"]}
    assert writer is not None and len(writer.utterances) == min(3, len(splits["val"]))
    assert all(u.speaker not in train_speakers for u in writer.utterances)
    none = compose_at(
        tmp_path,
        ["experiment=exp9_pocket_mimi_vae", "debug=smoke", "samples.n_utterances=0"],
        tmp_path / "r2",
    )
    assert sample_writer(none) is None


def test_init_must_be_pretrained_or_scratch(tmp_path: Path) -> None:
    proc = run_cli(["experiment=exp9_pocket_mimi_vae", "debug=smoke", "init=frozen"], tmp_path, check=False)
    assert proc.returncode != 0 and "init=" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_exp9_smoke_trains_extracts_and_scores(tmp_path: Path) -> None:
    run_cli(["experiment=exp9_pocket_mimi_vae", "debug=smoke", f"run_id={RUN_ID}"], tmp_path, timeout=900)
    run_dir = tmp_path / "outputs" / "tier2" / "exp9_pocket_mimi_vae" / RUN_ID
    assert [r["status"] for r in manifest_lines(tmp_path) if r["run_id"] == RUN_ID] == [
        "started",
        "completed",
    ]

    assert (run_dir / "checkpoints" / "vae_gan_final.ckpt").is_file()
    assert not (run_dir / "checkpoints" / "vae_gan_last.ckpt").exists()
    for step in ("step_000010", "step_000020"):
        (utt,) = (run_dir / "samples" / step).iterdir()
        assert {p.name for p in utt.glob("*.wav")} == {"original.wav", "vae_gan.wav"}

    (row,) = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert (row["init"], row["latent_dim"], row["max_steps"]) == ("pretrained", "32", "20")
    for column in (
        "k1_dnll",
        "k8_dnll",
        "best_eval_dnll",
        "rollout_cos",
        "recon_mel_l1",
        "base_codec_mel_l1",
    ):
        assert math.isfinite(float(row[column])), column
    assert float(row["best_eval_dnll"]) == min(float(row[f"k{k}_dnll"]) for k in (1, 2, 4, 8))

    recon = json.loads((run_dir / "recon_metrics.json").read_text())
    assert recon["deterministic"] is True and recon["split"] == "test" and recon["n_utterances"] == 2
    assert {"vs_original", "vs_base_codec", "base_codec_vs_original"} <= set(recon)
    assert recon["mel_distance_mean"] == recon["vs_original"]["mel_l1"]["mean"]
    (sample,) = recon["samples"]
    assert {"original", "vae_gan", "base"} <= set(sample)
    assert (run_dir / sample["vae_gan"]["path"]).is_file()

    phase1 = run_dir / "phase1"
    assert (phase1 / "injection_diag.json").is_file() and (phase1 / "tables.csv").is_file()
    info = json.loads((run_dir / "run_info.json").read_text())
    weights = info["weights"]
    assert weights["pocket_mimi-english_2026-04"]["source"] == "random"
    assert weights["pocket_mimi-english_2026-04"]["vae_gan_init"] == "pretrained"
    assert weights["wavlm_teacher"]["source"] == "random"
    assert weights["pocket_vae32-pretrained"]["kind"] == "vae_gan"

    # The trained bottleneck is a representation: the latest Exp 9 run's store is found and reused.
    store = Path(json.loads((run_dir / "metrics.json").read_text())["latent_store"])
    run_cli(
        [
            "experiment=phase0",
            "debug=smoke",
            "run_id=p0",
            "representation=pocket_vae",
            "representation.checkpoint=latest:exp9_pocket_mimi_vae",
        ],
        tmp_path,
    )
    log = (tmp_path / "outputs" / "phase0" / "phase0" / "p0" / "run.log").read_text()
    assert f"latents/{store.name} reused" in log


@pytest.mark.slow
def test_a_killed_vae_gan_fit_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed before step 4 of 5 (after the checkpoint at 2, with the discriminator and every loss on), then
    resumed: the same generator, discriminator and optimiser states as an uninterrupted fit."""
    import torch

    from latentdyn.pipeline.vae_gan import train_vae_gan
    from tests.test_resume import Killed, Probe, _assert_same

    probe = Probe(monkeypatch)
    overrides = [
        "experiment=exp9_pocket_mimi_vae",
        "debug=smoke",
        "logger=none",
        "max_steps=5",
        "checkpointing.every_n_steps=2",
        "samples.n_utterances=0",
        "vae_gan_train.val_check_interval=100",
    ]
    ref_model, ref_final = train_vae_gan(compose_at(tmp_path, overrides, tmp_path / "ref"), None)
    assert probe.fits[-1] == [1, 2, 3, 4, 5]

    cfg = compose_at(tmp_path, overrides, tmp_path / "killed")
    probe.kill_at = 3
    with pytest.raises(Killed):
        train_vae_gan(cfg, None)
    probe.kill_at = None
    model, final = train_vae_gan(compose_at(tmp_path, [*overrides, "resume=true"], tmp_path / "killed"), None)
    assert probe.fits[-1] == [3, 4, 5]
    _assert_same(dict(model.state_dict()), dict(ref_model.state_dict()), "weights")
    ref_ckpt = torch.load(ref_final, map_location="cpu", weights_only=True)
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2
    _assert_same(ckpt["optimizer_states"], ref_ckpt["optimizer_states"], "optimizers")
    assert ckpt["global_step"] == ref_ckpt["global_step"] == 5
