"""Phase 0 on LibriSpeech-layout data and with each codec (random weights), offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentdyn.data.latent_store import LatentStore
from latentdyn.experiments import phase0
from tests.conftest import run_cli
from tests.test_librispeech import build_tree


@pytest.mark.parametrize(
    ("representation", "dim", "frame_rate"), [("mimi", 512, 12.5), ("encodec", 128, 75.0)]
)
@pytest.mark.slow
def test_smoke_phase0_runs_each_codec_with_random_weights(
    compose_cfg, representation, dim, frame_rate
) -> None:
    cfg = compose_cfg(["experiment=phase0", "debug=smoke", f"representation={representation}"])
    assert cfg.representation.pretrained is False
    metrics = phase0.run(cfg)
    store = LatentStore(Path(json.loads((Path(cfg.run_dir) / "summary.json").read_text())["latent_store"]))
    assert store.dim == dim and store.frame_rate == frame_rate
    assert store.meta["weights"]["source"] == "random" and store.meta["weights"]["pretrained"] is False
    assert metrics["train_frames"] > 0 and metrics["bad_files_skipped"] == 0


def test_phase0_on_a_librispeech_tree(compose_cfg, tmp_path: Path) -> None:
    root = tmp_path / "libri"
    frames = build_tree(root, subsets=("train-clean-100", "dev-clean"))
    cfg = compose_cfg(
        [
            "experiment=phase0",
            "data=librispeech",
            f"data.root={root}",
            "data.corpus.subsets=[train-clean-100,dev-clean]",
            "data.split.n_speakers={train:4,val:2,test:2}",
            "data.split.min_duration=0.1",
            "extract.device=cpu",
        ]
    )
    metrics = phase0.run(cfg)
    store = LatentStore(Path(json.loads((Path(cfg.run_dir) / "summary.json").read_text())["latent_store"]))
    assert {u.utt_id for u in store.index} <= set(frames)
    per_split = {s: {u.speaker for u in store.utterances(s)} for s in ("train", "val", "test")}
    assert [len(per_split[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert not (per_split["train"] & per_split["val"]) and not (per_split["val"] & per_split["test"])
    assert metrics["train_utterances"] + metrics["val_utterances"] + metrics["test_utterances"] == len(
        store.index
    )


@pytest.mark.slow
def test_random_weights_are_stated_in_run_info_and_results(tmp_path: Path) -> None:
    run_cli(["experiment=phase0", "debug=smoke", "representation=encodec", "run_id=rand"], tmp_path)
    info = json.loads((tmp_path / "outputs" / "phase0" / "phase0" / "rand" / "run_info.json").read_text())
    assert info["weights"]["encodec"]["source"] == "random"
    table = run_cli([], tmp_path, module="latentdyn.tracking.results").stdout
    assert "encodec:random" in table
