"""Bad audio files are recorded by the stage that skips them and reported by every run that uses the corpus.

The scenario: a tiny LibriSpeech tree (tests.test_librispeech) plus six bad FLAC files, three that indexing
cannot read (0 bytes, corrupt bytes, a stream with no frames) and three that only extraction finds (silent,
shorter than one latent frame, truncated after a valid header).
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import DictConfig

from latentdyn.data.audio import BadAudioError, BadFile, read_bad_files, write_bad_files
from latentdyn.data.librispeech import LibriSpeechCorpus
from latentdyn.experiments import phase0
from latentdyn.pipeline import store as store_steps
from latentdyn.tracking.run import tracked_run
from tests.test_librispeech import SR, build_tree

CHAPTER = ("dev-clean", "1272", "1001")
# file name -> (stage that finds it, words in its reason)
BAD = {
    "1272-1001-0090.flac": ("index", "unreadable"),  # 0 bytes
    "1272-1001-0091.flac": ("index", "unreadable"),  # corrupt bytes
    "1272-1001-0092.flac": ("index", "unreadable"),  # a FLAC stream with no frames
    "1272-1001-0093.flac": ("extract", "silent"),
    "1272-1001-0094.flac": ("extract", "shorter than one latent frame"),
    "1272-1001-0095.flac": ("extract", "unreadable"),  # header fine, body truncated
}


def add_bad_files(root: Path) -> dict[str, tuple[str, str]]:
    """Write the six bad files of :data:`BAD` into ``root``'s LibriSpeech tree; returns ``{path: (stage, reason)}``."""
    chapter = root / "LibriSpeech" / Path(*CHAPTER)
    names = iter(BAD)
    (chapter / next(names)).write_bytes(b"")
    (chapter / next(names)).write_bytes(b"fLaC this is not a flac stream" * 10)
    sf.write(chapter / next(names), np.zeros(0, np.float32), SR, format="FLAC")
    sf.write(chapter / next(names), np.zeros(SR, np.float32), SR, format="FLAC")
    sf.write(chapter / next(names), np.full(200, 0.1, np.float32), SR, format="FLAC")
    truncated = chapter / next(names)
    wave = (0.1 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)
    sf.write(truncated, wave, SR, format="FLAC", subtype="PCM_16")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    return {str(chapter / name): what for name, what in BAD.items()}


@pytest.fixture
def bad_corpus(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    root = tmp_path / "data"
    build_tree(root)
    return root, add_bad_files(root)


def librispeech_overrides(root: Path) -> list[str]:
    """Phase 0 on the tiny tree: every speaker in a split, no duration filter, small mel latents on CPU."""
    return [
        "experiment=phase0",
        "data=librispeech",
        f"data.root={root}",
        "data.corpus.subsets=[train-clean-100,dev-clean]",
        "data.split.n_speakers={train: 6, val: 1, test: 1}",
        "data.split.max_utts_per_speaker=null",
        "data.split.min_duration=null",
        "pretrained=false",
        "representation.sample_rate=16000",  # the files' own rate: no resampling
        "representation.n_mels=32",
        "extract.device=cpu",
        "extract.batch_seconds=8.0",
        "extract.num_workers=0",
    ]


def assert_lists_all(records: list[dict], expected: dict[str, tuple[str, str]]) -> None:
    """``records`` ({path, stage, reason}) name exactly the expected files, each with its stage and reason."""
    assert sorted(r["path"] for r in records) == sorted(expected)
    for r in records:
        stage, reason = expected[r["path"]]
        assert r["stage"] == stage and reason in r["reason"], r


def test_phase0_summary_counts_every_bad_file_fresh_and_cached(
    bad_corpus, compose_cfg: Callable[..., DictConfig], caplog: pytest.LogCaptureFixture
) -> None:
    root, expected = bad_corpus
    cfg = compose_cfg(librispeech_overrides(root))
    summary_path = Path(cfg.run_dir) / "summary.json"
    for attempt in ("fresh", "cached"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            metrics = phase0.run(cfg)
        assert ("building" in caplog.text) == (attempt == "fresh")
        summary = json.loads(summary_path.read_text())
        assert metrics["bad_files_skipped"] == 6 and summary["metrics"]["bad_files_skipped"] == 6, attempt
        assert_lists_all(summary["bad_files"], expected)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("6 bad audio files" in m for m in warnings), (attempt, warnings)


def test_each_artifact_records_the_files_it_skipped(bad_corpus, compose_cfg) -> None:
    root, expected = bad_corpus
    cfg = compose_cfg(librispeech_overrides(root))
    store = store_steps.prepare_latent_store(cfg)
    corpus_dir = next((Path(cfg.paths.cache_dir) / "corpus").glob("[0-9a-f]*[0-9a-f]"))
    from_index = json.loads((corpus_dir / "bad_files.json").read_text())
    assert_lists_all(from_index, {p: w for p, w in expected.items() if w[0] == "index"})
    assert_lists_all([b.to_dict() for b in store_steps.bad_files(store)], expected)


def test_run_info_of_a_pipeline_run_lists_every_bad_file(
    bad_corpus, compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, expected = bad_corpus
    cfg = compose_cfg(librispeech_overrides(root))
    store_steps.prepare_latent_store(cfg)  # the artifacts exist: the run below reuses them
    with tracked_run(
        run_dir=tmp_path / "exp1",
        manifest_path=tmp_path / "manifest.jsonl",
        run_id="exp1",
        experiment="exp1_vmf",
        config={},
    ) as run:
        store_steps.prepare_latent_store(cfg)  # the step every experiment that trains on latents takes
        run.result = {}
    data = json.loads((tmp_path / "exp1" / "run_info.json").read_text())["data"]
    assert data["n_bad_files"] == 6
    assert_lists_all(data["bad_files"], expected)
    assert "6 bad audio files" in (tmp_path / "exp1" / "run.log").read_text()


def test_error_policy_stops_at_the_zero_byte_file_while_indexing(bad_corpus, compose_cfg) -> None:
    root, expected = bad_corpus
    zero_bytes = next(p for p in expected if Path(p).stat().st_size == 0)
    cfg = compose_cfg([*librispeech_overrides(root), "data.on_bad_audio=error"])
    with pytest.raises(BadAudioError) as info:
        phase0.run(cfg)
    assert info.value.path == zero_bytes and info.value.stage == "index"
    assert zero_bytes in str(info.value) and "unreadable" in str(info.value)
    cache = Path(cfg.paths.cache_dir)
    assert not list(cache.glob("*/*/artifact.json"))  # nothing left marked complete


def test_error_policy_stops_even_when_a_skip_run_cached_the_corpus(bad_corpus, compose_cfg) -> None:
    root, expected = bad_corpus
    phase0.run(compose_cfg(librispeech_overrides(root)))
    with pytest.raises(BadAudioError, match="1272-1001-0090.flac"):
        phase0.run(compose_cfg([*librispeech_overrides(root), "data.on_bad_audio=error"]))


def test_indexing_records_what_it_skips_in_the_corpus_workdir(bad_corpus, tmp_path: Path) -> None:
    root, expected = bad_corpus
    corpus = LibriSpeechCorpus(root=str(root), subsets=["train-clean-100", "dev-clean"])
    utts = corpus.materialize(tmp_path / "work")
    recorded = read_bad_files(tmp_path / "work" / "bad_files.json")
    assert_lists_all([b.to_dict() for b in recorded], {p: w for p, w in expected.items() if w[0] == "index"})
    assert {b.utt_id for b in recorded}.isdisjoint(u.utt_id for u in utts)


def test_a_missing_record_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no record of the audio files it skipped"):
        read_bad_files(tmp_path / "bad_files.json")
    write_bad_files([BadFile("/a.flac", "extract", "silent", "a")], tmp_path / "bad_files.json")
    assert read_bad_files(tmp_path / "bad_files.json") == [BadFile("/a.flac", "extract", "silent", "a")]
    with pytest.raises(ValueError, match="stage"):
        BadFile("/a.flac", "decode", "silent")


def test_bad_audio_error_keeps_its_stage_through_pickling() -> None:
    err = pickle.loads(pickle.dumps(BadAudioError("/x.flac", "unreadable (junk)", "index")))
    assert (err.path, err.reason, err.stage) == ("/x.flac", "unreadable (junk)", "index")
    assert str(err) == "bad audio file /x.flac: unreadable (junk) (found by corpus indexing)"


@pytest.mark.slow
def test_exp1_run_info_lists_every_bad_file(bad_corpus, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    root, expected = bad_corpus
    overrides = [o for o in librispeech_overrides(root) if not o.startswith("experiment=")]
    args = ["experiment=exp1_vmf", *overrides, "horizons=[1]", "model.context=2"]
    smoke = ["trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.val_check_interval=2"]
    smoke += [
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "rollout_gap.n_utterances=1",
    ]
    for attempt in ("fresh", "cached"):
        run_cli([*args, *smoke, f"run_id=e1-{attempt}"], tmp_path)
        info = json.loads(next((tmp_path / "outputs").rglob(f"e1-{attempt}/run_info.json")).read_text())
        assert info["status"] == "completed" and info["data"]["n_bad_files"] == 6, attempt
        assert_lists_all(info["data"]["bad_files"], expected)
