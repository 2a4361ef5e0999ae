"""Exp 5: the β-VAE representation, checkpoint references, the training data's speakers, and the CLI runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_at, manifest_lines, run_cli
from tests.test_betavae_model import MEL_BASE


def _train_checkpoint(base: dict, path: Path, latent_dim: int = 4, steps: int = 2, **kwargs) -> Path:
    """A β-VAE over ``base`` fitted for ``steps`` steps on noise crops and saved as a Lightning checkpoint."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from latentdyn.models.betavae import BetaVAEModule

    torch.manual_seed(0)
    model = BetaVAEModule(base=base, latent_dim=latent_dim, dec_hidden_dim=16, variant="v", **kwargs)
    crops = [0.1 * torch.randn(2, 1, 9600) for _ in range(steps)]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=DataLoader(crops, batch_size=None))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def mel_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_checkpoint(MEL_BASE, tmp_path_factory.mktemp("betavae") / "betavae_final.ckpt")


def test_betavae_representation_has_the_bottleneck_dim_and_the_base_rates(mel_checkpoint: Path) -> None:
    from latentdyn.representations.base import Representation
    from latentdyn.representations.betavae import BetaVAERepresentation
    from latentdyn.representations.weights import cached_sha256

    rep = BetaVAERepresentation(str(mel_checkpoint))
    assert isinstance(rep, Representation)
    assert (rep.dim, rep.sample_rate, rep.frame_rate, rep.name) == (4, 24000, 12.5, "betavae4-mel-v")
    wave = 0.1 * torch.randn(2, 1, 24000 + 700)
    z = rep.encode(wave)
    assert z.shape == (2, 4, rep.num_frames(wave.shape[-1])) == (2, 4, 12)
    audio = rep.decode(z)
    assert audio.shape == (2, 1, 12 * 1920) and torch.isfinite(audio).all()
    assert rep.weights["kind"] == "betavae" and rep.weights["variant"] == "v"
    assert rep.weights["sha256"] == cached_sha256(mel_checkpoint)
    assert rep.weights["base"]["source"] == "none" and rep.weights["reconstruction"] == "latent"


def test_a_deterministic_encode_of_the_same_audio_twice_is_identical(mel_checkpoint: Path) -> None:
    from latentdyn.representations.betavae import BetaVAERepresentation

    rep = BetaVAERepresentation(str(mel_checkpoint))
    wave = 0.1 * torch.randn(1, 1, 48000)
    torch.manual_seed(1)
    first = rep.encode(wave)
    torch.manual_seed(2)  # no sampling: another RNG state gives the same means
    assert torch.equal(first, rep.encode(wave))
    # The encoding is the posterior mean mu_proj(h), not a draw.
    model = rep.model
    expected = model.vae.mu_proj(model.base.encode(wave))
    torch.testing.assert_close(first, expected)


def test_betavae_representation_accepts_a_run_directory_and_refuses_references(
    mel_checkpoint: Path, tmp_path: Path
) -> None:
    from latentdyn.representations.betavae import BetaVAERepresentation

    run_dir = tmp_path / "variant"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "betavae_final.ckpt").write_bytes(mel_checkpoint.read_bytes())
    assert BetaVAERepresentation(str(run_dir)).dim == 4
    with pytest.raises(ValueError, match="run reference"):
        BetaVAERepresentation("latest:exp5_betavae/betavae_smooth")
    with pytest.raises(ValueError, match="needs representation.checkpoint"):
        BetaVAERepresentation(None)


@pytest.mark.slow
def test_betavae_over_encodec_trains_a_copy_of_the_decoder_and_decodes_through_it(tmp_path: Path) -> None:
    from latentdyn.representations.betavae import BetaVAERepresentation

    base = {"_target_": "latentdyn.representations.encodec_rep.EncodecRepresentation", "pretrained": False}
    ckpt = _train_checkpoint(base, tmp_path / "b.ckpt", latent_dim=8, steps=2)
    rep = BetaVAERepresentation(str(ckpt))
    assert rep.weights["reconstruction"] == "audio" and rep.weights["base"]["source"] == "random"
    assert rep.weights["pretrained"] is False
    assert (rep.dim, rep.frame_rate) == (8, 75.0)
    z = rep.encode(0.1 * torch.randn(1, 1, 3200))
    assert z.shape == (1, 8, 10)
    audio = rep.decode(z)
    model = rep.model
    # Decoded through the trained copy, which the two steps moved away from the base's own decoder.
    torch.testing.assert_close(audio, model.vae.synthesise(model.vae.to_base(z)))
    trained, original = model.vae.decoder.state_dict(), model.base.decoder_module().state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.parametrize("latent_space", ["quantizer_output", "pre_quantizer"])
def test_mimi_decoder_path_is_mimis_decoding(latent_space: str) -> None:
    from latentdyn.representations.mimi import MimiRepresentation

    rep = MimiRepresentation(pretrained=False, latent_space=latent_space)
    z = rep.encode(0.1 * torch.randn(1, 1, 1920 * 3))
    with torch.no_grad():
        torch.testing.assert_close(rep.decoder_module()(z), rep.decode(z))


def _manifest_run(path: Path, run_id: str, experiment: str, run_dir: Path, end: str) -> None:
    with path.open("a") as fh:
        for status in ("started", "completed"):
            record = {
                "run_id": run_id,
                "experiment": experiment,
                "tier": "tier2",
                "run_dir": str(run_dir),
                "status": status,
                "start_time": "2026-12-01T00:00:00+00:00",
                **({"time": end} if status == "completed" else {}),
            }
            fh.write(json.dumps(record) + "\n")


def test_latest_experiment_slash_variant_finds_the_newest_completed_sub_run(tmp_path: Path) -> None:
    from latentdyn.tracking.lookup import latest_run_dir

    manifest = tmp_path / "manifest.jsonl"
    old, new, other = (
        tmp_path / "a" / "betavae_smooth",
        tmp_path / "b" / "betavae_smooth",
        tmp_path / "c" / "betavae_pred",
    )
    _manifest_run(manifest, "a/betavae_smooth", "exp5_betavae", old, "2026-12-01T01:00:00+00:00")
    _manifest_run(manifest, "b/betavae_smooth", "exp5_betavae", new, "2026-12-01T02:00:00+00:00")
    _manifest_run(manifest, "c/betavae_pred", "exp5_betavae", other, "2026-12-01T03:00:00+00:00")
    assert latest_run_dir(manifest, "exp5_betavae/betavae_smooth") == new
    assert latest_run_dir(manifest, "exp5_betavae") == other
    with pytest.raises(FileNotFoundError, match="sub-run 'betavae_smooth_pred'"):
        latest_run_dir(manifest, "exp5_betavae/betavae_smooth_pred")
    # An experiment without sub-runs (Exp 3): a folder of its newest completed run.
    for run_id, when in (("r1", "2026-12-01T01:00:00+00:00"), ("r2", "2026-12-01T02:00:00+00:00")):
        (tmp_path / run_id / "mimi").mkdir(parents=True)
        _manifest_run(manifest, run_id, "exp3_rep_compare", tmp_path / run_id, when)
    assert latest_run_dir(manifest, "exp3_rep_compare/mimi") == tmp_path / "r2" / "mimi"
    with pytest.raises(FileNotFoundError, match="sub-run 'encodec'"):
        latest_run_dir(manifest, "exp3_rep_compare/encodec")
    # A run over several seeds: the first seed's folder, or the one named.
    for seed in (10, 2):
        (tmp_path / "r3" / f"seed{seed}" / "mimi").mkdir(parents=True)
    _manifest_run(manifest, "r3", "exp3_rep_compare", tmp_path / "r3", "2026-12-01T03:00:00+00:00")
    assert latest_run_dir(manifest, "exp3_rep_compare/mimi") == tmp_path / "r3" / "seed2" / "mimi"
    assert latest_run_dir(manifest, "exp3_rep_compare/seed10/mimi") == tmp_path / "r3" / "seed10" / "mimi"


def test_a_run_reference_is_resolved_to_the_file_and_the_store_is_keyed_on_its_contents(
    mel_checkpoint: Path, tmp_path: Path
) -> None:
    from latentdyn.pipeline.store import resolve_representation_checkpoint, store_spec

    run_dir = tmp_path / "outputs" / "tier2" / "exp5_betavae" / "r" / "betavae_smooth"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "betavae_final.ckpt"
    ckpt.write_bytes(mel_checkpoint.read_bytes())
    _manifest_run(
        tmp_path / "outputs" / "manifest.jsonl",
        "r/betavae_smooth",
        "exp5_betavae",
        run_dir,
        "2026-12-01T01:00:00+00:00",
    )
    cfg = compose_at(
        tmp_path,
        ["representation=betavae", "representation.checkpoint=latest:exp5_betavae/betavae_smooth"],
        tmp_path / "run",
    )
    resolve_representation_checkpoint(cfg)
    assert cfg.representation.checkpoint == str(ckpt.resolve())
    spec = store_spec(cfg)
    assert spec["representation"]["checkpoint"] == str(ckpt.resolve())
    # A retrained file at the same path is another store.
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    assert store_spec(cfg)["checkpoint_sha256"] != spec["checkpoint_sha256"]
    bare = compose_at(
        tmp_path, ["representation=betavae", "representation.checkpoint=latest"], tmp_path / "run"
    )
    with pytest.raises(ValueError, match="does not say which experiment"):
        resolve_representation_checkpoint(bare)


def test_the_vae_trains_on_train_speakers_only(tmp_path: Path) -> None:
    from latentdyn.pipeline.betavae import crop_datamodule
    from latentdyn.pipeline.store import prepare_splits

    cfg = compose_at(tmp_path, ["experiment=exp5_betavae", "debug=smoke"], tmp_path / "run")
    dm = crop_datamodule(cfg, 24000)
    splits = prepare_splits(cfg)
    eval_speakers = {u.speaker for name in ("test", "val") for u in splits[name]}
    train_speakers = {u.speaker for u in dm.train.utterances}
    assert train_speakers and not train_speakers & eval_speakers
    assert {u.utt_id for u in dm.train.utterances} == {u.utt_id for u in splits["train"]}
    # Every crop the loader hands out comes from those utterances.
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (int(cfg.vae_train.batch_size), 1, int(cfg.vae_train.crop_seconds * 24000))
    assert {u.speaker for u in dm.val.utterances} <= {u.speaker for u in splits["val"]}


@pytest.mark.slow
def test_exp5_one_variant_then_exp1_on_its_latents(tmp_path: Path) -> None:
    proc = run_cli(
        ["experiment=exp5_betavae", "debug=smoke", "variant=betavae_smooth", "horizons=[1,2]", "run_id=v"],
        tmp_path,
    )
    # The run ends with the command that trains on this variant's latents (run below).
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("representation.checkpoint=latest:exp5_betavae/betavae_smooth")
    run_dir = tmp_path / "outputs" / "tier2" / "exp5_betavae" / "v"
    var_dir = run_dir / "betavae_smooth"
    for name in ("metrics.json", "tables.csv", "injection_diag.json", "injection_dnll.png", "per_step.csv"):
        assert (var_dir / "phase1" / name).is_file(), name
    assert (var_dir / "checkpoints" / "betavae_final.ckpt").is_file()
    recon = json.loads((var_dir / "recon_metrics.json").read_text())
    assert recon["deterministic"] and recon["n_utterances"] == 2
    for comparison in ("vs_original", "vs_base_codec", "base_codec_vs_original"):
        assert math.isfinite(recon[comparison]["mel_l1"]["mean"]) and recon[comparison]["mel_l1"]["n"] == 2
    sample = recon["samples"][0]
    for stem in ("original", "base", "betavae"):
        assert (var_dir / sample[stem]["path"]).is_file()
    (row,) = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert row["variant"] == "betavae_smooth" and float(row["lambda_smooth"]) == 0.1
    assert float(row["best_dnll"]) == min(float(row["k1_dnll"]), float(row["k2_dnll"]))
    info = json.loads((var_dir / "run_info.json").read_text())
    assert (
        info["status"] == "completed"
        and info["parent_run_id"] == "v"
        and info["run_id"] == "v/betavae_smooth"
    )
    from omegaconf import OmegaConf

    variant_cfg = OmegaConf.load(var_dir / "config.yaml")
    assert (variant_cfg.vae.lambda_smooth, variant_cfg.vae.lambda_pred, variant_cfg.vae.variant) == (
        0.1,
        0.0,
        "betavae_smooth",
    )
    assert any(name.startswith("betavae32-mel") for name in info["weights"])

    run_cli(
        [
            "experiment=exp1_vmf",
            "debug=smoke",
            "horizons=[1]",
            "run_id=on_vae",
            "representation=betavae",
            "representation.checkpoint=latest:exp5_betavae/betavae_smooth",
        ],
        tmp_path,
    )
    exp1 = json.loads((tmp_path / "outputs" / "tier1" / "exp1_vmf" / "on_vae" / "run_info.json").read_text())
    assert exp1["status"] == "completed"
    (weights,) = [w for name, w in exp1["weights"].items() if name.startswith("betavae")]
    assert weights["source"] == str((var_dir / "checkpoints" / "betavae_final.ckpt").resolve())
    statuses = [(r["run_id"], r["status"]) for r in manifest_lines(tmp_path)]
    assert ("v/betavae_smooth", "completed") in statuses and ("on_vae", "completed") in statuses

    # Exp 6 on the variant's 32-d latents with its Phase 1 MDN: the checkpoint names the β-VAE store it was
    # trained on, and the score model is trained on that store.
    run_cli(
        [
            "experiment=exp6_score_correction",
            "debug=smoke",
            "run_id=e6",
            "checkpoint=latest:exp5_betavae/betavae_smooth",
        ],
        tmp_path,
    )
    exp6 = json.loads(
        (tmp_path / "outputs" / "tier2" / "exp6_score_correction" / "e6" / "metrics.json").read_text()
    )
    assert exp6["checkpoint"] == str(var_dir / "phase1" / "checkpoints" / "mdn_k1_final.ckpt")
    store_meta = json.loads((Path(exp6["latent_store"]) / "meta.json").read_text())
    assert store_meta["dim"] == 32 and store_meta["representation"].startswith("betavae32-mel")

    # resume: the completed variant is not run again, and the summary is rebuilt from its outputs.
    summary = (run_dir / "summary.csv").read_text()
    run_cli(
        [
            "experiment=exp5_betavae",
            "debug=smoke",
            "variant=betavae_smooth",
            "horizons=[1,2]",
            "run_id=v",
            "resume=true",
        ],
        tmp_path,
    )
    starts = [
        r for r in manifest_lines(tmp_path) if r["run_id"] == "v/betavae_smooth" and r["status"] == "started"
    ]
    assert len(starts) == 1
    assert (run_dir / "summary.csv").read_text() == summary


@pytest.mark.slow
def test_exp5_over_a_random_codec_says_so(tmp_path: Path) -> None:
    run_cli(
        [
            "experiment=exp5_betavae",
            "debug=smoke",
            "representation=encodec",
            "variant=betavae_smooth_pred",
            "horizons=[1]",
            "recon_eval.n_utterances=1",
            "run_id=enc",
        ],
        tmp_path,
    )
    var_dir = tmp_path / "outputs" / "tier2" / "exp5_betavae" / "enc" / "betavae_smooth_pred"
    info = json.loads((var_dir / "run_info.json").read_text())
    assert info["weights"]["encodec"]["source"] == "random"
    (vae,) = [w for name, w in info["weights"].items() if name.startswith("betavae32-encodec")]
    assert vae["pretrained"] is False and vae["base"]["source"] == "random"
    results = run_cli(
        ["--experiment", "exp5_betavae", "--no-save"], tmp_path, module="latentdyn.tracking.results"
    )
    assert "random" in results.stdout
