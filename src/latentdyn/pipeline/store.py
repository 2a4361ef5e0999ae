"""Phase 0 steps: corpus -> speaker-disjoint splits -> latent store, each a cached artifact.

Every experiment that trains on latents calls :func:`prepare_latent_store`; it builds what is missing
and reuses what exists (``force=true`` rebuilds).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.utils import call, instantiate
from omegaconf import DictConfig, OmegaConf

from latentdyn import artifacts
from latentdyn.data.corpus import Utterance, read_index, write_index
from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.data.splits import SPLITS
from latentdyn.tracking.run import record_data, record_weights

log = logging.getLogger(__name__)

# Bump when the on-disk layout or content of an artifact changes, so stale caches are not reused.
CORPUS_VERSION = 1
SPLITS_VERSION = 1
STORE_VERSION = 1
INDEX_NAME = "index.jsonl"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def corpus_spec(cfg: DictConfig) -> dict[str, Any]:
    return {"version": CORPUS_VERSION, "corpus": _plain(cfg.data.corpus)}


def splits_spec(cfg: DictConfig) -> dict[str, Any]:
    return {"version": SPLITS_VERSION, "corpus": corpus_spec(cfg), "split": _plain(cfg.data.split)}


def store_spec(cfg: DictConfig) -> dict[str, Any]:
    return {
        "version": STORE_VERSION,
        "splits": splits_spec(cfg),
        "representation": _plain(cfg.representation),
        "on_bad_audio": cfg.data.on_bad_audio,
        # Half-precision encoding changes the stored values.
        "precision": cfg.extract.precision,
    }


def prepare_corpus(cfg: DictConfig) -> list[Utterance]:
    """The corpus's utterance index (materialising the corpus into the cache if it is generated)."""
    corpus = instantiate(cfg.data.corpus)

    def build(tmp: Path) -> None:
        write_index(corpus.materialize(tmp), tmp / INDEX_NAME, relative_to=tmp)

    path = artifacts.get_or_build(
        Path(cfg.paths.cache_dir), "corpus", corpus_spec(cfg), build, force=cfg.force
    )
    return read_index(path / INDEX_NAME)


def prepare_splits(cfg: DictConfig) -> dict[str, list[Utterance]]:
    """Train/val/test utterance lists, by the split method ``cfg.data.split`` names (``_target_``): the
    speaker-disjoint, gender-stratified ``stratified`` split or the reference study's ``reference`` split."""

    def build(tmp: Path) -> None:
        splits = call(cfg.data.split, prepare_corpus(cfg))
        for name, split_utts in splits.items():
            write_index(split_utts, tmp / f"{name}.jsonl")

    path = artifacts.get_or_build(
        Path(cfg.paths.cache_dir), "splits", splits_spec(cfg), build, force=cfg.force
    )
    return {name: read_index(path / f"{name}.jsonl") for name in SPLITS}


def batch_seconds(cfg: DictConfig, device: Any) -> float:
    """Audio seconds per encoder batch: ``extract.batch_seconds``, or when null 600 s on GPU (batching is what
    makes a GPU fast) and 8 s on CPU (codecs run no faster in large CPU batches; padding only costs)."""
    if cfg.extract.batch_seconds is not None:
        return float(cfg.extract.batch_seconds)
    return 600.0 if getattr(device, "type", str(device)) == "cuda" else 8.0


def prepare_latent_store(cfg: DictConfig) -> LatentStore:
    """The latent store of ``cfg.data`` x ``cfg.representation`` (built on first use, then reused)."""
    from latentdyn.representations.extract import extract_to_store, resolve_device

    store_path = artifacts.artifact_path(Path(cfg.paths.cache_dir), "latents", store_spec(cfg))

    def build(tmp: Path) -> None:
        rep = instantiate(cfg.representation)
        splits = prepare_splits(cfg)
        meta = {
            "representation": rep.name,
            "sample_rate": rep.sample_rate,
            "frame_rate": rep.frame_rate,
            "weights": rep.weights,
            "extra": {"representation_config": _plain(cfg.representation)},
        }
        device = resolve_device(cfg.extract.device)
        with LatentStoreWriter(tmp, dim=rep.dim, meta=meta) as writer:
            bad = extract_to_store(
                rep,
                splits,
                writer,
                batch_seconds=batch_seconds(cfg, device),
                on_bad_audio=cfg.data.on_bad_audio,
                device=device,
                precision=cfg.extract.precision,
                num_workers=cfg.extract.num_workers,
                # Beside the artifact, outside its temporary build dir: a killed build resumes from here.
                shard_dir=store_path.parent / f"{store_path.name}.shards",
                shard_seconds=cfg.extract.shard_seconds,
                resume=not cfg.force,
            )
        (tmp / "bad_files.json").write_text(json.dumps([b.__dict__ for b in bad], indent=2))

    path = artifacts.get_or_build(
        Path(cfg.paths.cache_dir), "latents", store_spec(cfg), build, force=cfg.force
    )
    store = LatentStore(path)
    record_weights(store.meta["representation"], store.meta["weights"])
    record_data(data_provenance(cfg))
    return store


def data_provenance(cfg: DictConfig) -> dict[str, Any]:
    """What the latents come from: corpus name, subsets (LibriSpeech) and split method, with a short ``label``
    for the results table (``synthetic/stratified``, ``librispeech:train-clean-100/reference``)."""
    corpus = str(cfg.data.get("name", "data"))
    subsets = list(cfg.data.corpus.get("subsets") or [])
    split = str(cfg.data.split.get("_target_", "")).rsplit(".", 1)[-1].removesuffix("_splits") or "split"
    label = f"{corpus}{':' + '+'.join(subsets) if subsets else ''}/{split}"
    return {"corpus": corpus, "subsets": subsets, "split": split, "label": label}


def bad_files(store: LatentStore) -> list[dict[str, str]]:
    """Audio files skipped while the store was built (path, utt_id, reason)."""
    path = Path(store.root) / "bad_files.json"
    return json.loads(path.read_text()) if path.exists() else []
