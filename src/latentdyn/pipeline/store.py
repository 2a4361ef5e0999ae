"""Phase 0 steps: corpus -> speaker-disjoint splits -> latent store, each a cached artifact.

Every experiment that trains on latents calls :func:`prepare_latent_store`; it builds what is missing
and reuses what exists (``force=true`` rebuilds).

Audio files a stage could not use (``data.on_bad_audio=skip``) are recorded in the artifact of that stage
(``bad_files.json`` of the corpus index and of the latent store; the store's lists the corpus's too), so a
run that reuses the artifacts reports them exactly as the run that built them: in its run record
(``run_info.json`` ``data.bad_files``) and in one warning.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import call, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn import artifacts
from latentdyn.data.audio import BAD_FILES_NAME, BadAudioError, BadFile, read_bad_files, write_bad_files
from latentdyn.data.corpus import Utterance, read_index, write_index
from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.data.splits import SPLITS
from latentdyn.tracking.run import record_data, record_weights

log = logging.getLogger(__name__)

# Bump when the on-disk layout or content of an artifact changes, so stale caches are not reused.
# Corpus 2 and store 2: bad_files.json records every skipped file with its stage.
CORPUS_VERSION = 2
SPLITS_VERSION = 1
STORE_VERSION = 2
INDEX_NAME = "index.jsonl"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def corpus_spec(cfg: DictConfig) -> dict[str, Any]:
    return {"version": CORPUS_VERSION, "corpus": _plain(cfg.data.corpus)}


def splits_spec(cfg: DictConfig) -> dict[str, Any]:
    return {"version": SPLITS_VERSION, "corpus": corpus_spec(cfg), "split": _plain(cfg.data.split)}


def store_spec(cfg: DictConfig) -> dict[str, Any]:
    spec = {
        "version": STORE_VERSION,
        "splits": splits_spec(cfg),
        "representation": _plain(cfg.representation),
        "on_bad_audio": cfg.data.on_bad_audio,
        # Half-precision encoding changes the stored values.
        "precision": cfg.extract.precision,
    }
    checkpoint = cfg.representation.get("checkpoint")
    if checkpoint and Path(str(checkpoint)).expanduser().is_file():
        # What the weights are, not only where: a retrained or replaced file makes a new store.
        from latentdyn.representations.weights import cached_sha256

        spec["checkpoint_sha256"] = cached_sha256(Path(str(checkpoint)).expanduser())
    return spec


def is_run_reference(value: Any) -> bool:
    """Whether a checkpoint value names a run rather than a file: ``latest:EXPERIMENT[/SUB_RUN]``."""
    return isinstance(value, str) and (value == "latest" or value.startswith("latest:"))


def resolve_representation_checkpoint(cfg: DictConfig) -> None:
    """Turn a run reference or a run directory in ``representation.checkpoint`` into the checkpoint file it
    names (``latest:exp5_betavae/betavae_smooth`` -> that variant's newest ``*_final.ckpt``), in ``cfg``.

    So the store's spec, its recorded representation config and every checkpoint trained on it name the file
    (with its SHA-256), and a later run of the named experiment cannot change what this run's store means.
    """
    from latentdyn.tracking.lookup import resolve_checkpoint, resolve_checkpoint_in_dir

    value = cfg.representation.get("checkpoint")
    if is_run_reference(value):
        if value == "latest":
            raise ValueError(
                "representation.checkpoint=latest does not say which experiment: use latest:EXPERIMENT or "
                "latest:EXPERIMENT/SUB_RUN (e.g. latest:exp5_betavae/betavae_smooth)"
            )
        resolved = resolve_checkpoint(value, Path(cfg.paths.manifest), "", ["*_final.ckpt"])
    elif value and Path(str(value)).expanduser().is_dir():
        resolved = resolve_checkpoint_in_dir(Path(str(value)).expanduser(), ["*_final.ckpt"])
    else:
        return
    log.info("representation.checkpoint=%s -> %s", value, resolved)
    with open_dict(cfg):
        cfg.representation.checkpoint = str(Path(resolved).resolve())


def store_identity(store: LatentStore) -> dict[str, Any]:
    """What a latent store is, for the keys of artifacts derived from it (a score model, a dynamics model): its
    artifact key when it is a cached artifact (content-addressed), else its resolved path; with its size."""
    record = Path(store.root) / artifacts.SPEC_NAME
    ident: dict[str, Any] = {"dim": store.dim, "n_frames": store.n_frames}
    if record.is_file():
        meta = json.loads(record.read_text())
        return {**ident, "artifact": f"{meta.get('kind')}/{meta.get('key')}"}
    return {**ident, "path": str(Path(store.root).resolve())}


def _corpus_artifact(cfg: DictConfig) -> Path:
    """The corpus artifact's directory: ``index.jsonl`` and ``bad_files.json`` (the files indexing left out)."""
    corpus = instantiate(cfg.data.corpus)

    def build(tmp: Path) -> None:
        write_index(corpus.materialize(tmp), tmp / INDEX_NAME, relative_to=tmp)
        if not (tmp / BAD_FILES_NAME).exists():  # a corpus that reads no audio (generated) skips nothing
            write_bad_files([], tmp / BAD_FILES_NAME)

    return artifacts.get_or_build(
        Path(cfg.paths.cache_dir), "corpus", corpus_spec(cfg), build, force=cfg.force
    )


def prepare_corpus(cfg: DictConfig) -> list[Utterance]:
    """The corpus's utterance index (materialising the corpus into the cache if it is generated)."""
    return read_index(_corpus_artifact(cfg) / INDEX_NAME)


def corpus_bad_files(cfg: DictConfig) -> list[BadFile]:
    """The audio files the corpus's indexing left out (stage ``index``), from its artifact's record."""
    return read_bad_files(_corpus_artifact(cfg) / BAD_FILES_NAME)


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


def encoding_settings(cfg: DictConfig, device: Any) -> dict[str, Any]:
    """The extraction settings (``cfg.extract``, ``cfg.data.on_bad_audio``) as keyword arguments of
    :func:`~latentdyn.representations.extract.extract_to_store` and ``encode_worker_shards``."""
    return {
        "batch_seconds": batch_seconds(cfg, device),
        "on_bad_audio": cfg.data.on_bad_audio,
        "device": device,
        "precision": cfg.extract.precision,
        "num_workers": cfg.extract.num_workers,
        "shard_seconds": cfg.extract.shard_seconds,
    }


def batch_seconds(cfg: DictConfig, device: Any) -> float:
    """Audio seconds per encoder batch: ``extract.batch_seconds``, or when null 600 s on GPU (batching is what
    makes a GPU fast) and 8 s on CPU (codecs run no faster in large CPU batches; padding only costs)."""
    if cfg.extract.batch_seconds is not None:
        return float(cfg.extract.batch_seconds)
    return 600.0 if getattr(device, "type", str(device)) == "cuda" else 8.0


def latent_store_path(cfg: DictConfig) -> Path:
    """Where the latent store of ``cfg.data`` x ``cfg.representation`` lives in the cache, built or not (a run
    reference in ``representation.checkpoint`` is resolved in ``cfg`` first)."""
    resolve_representation_checkpoint(cfg)
    return artifacts.artifact_path(Path(cfg.paths.cache_dir), "latents", store_spec(cfg))


def extract_worker(cfg: DictConfig) -> Any:
    """This process's :class:`~latentdyn.representations.extract.Worker` of the latent extraction, from
    ``extract.rank`` / ``extract.world_size`` or (null) the launcher's environment (torchrun, SLURM)."""
    from latentdyn.representations.extract import resolve_worker

    return resolve_worker(cfg.extract.get("rank"), cfg.extract.get("world_size"))


def _checked_corpus_bad_files(cfg: DictConfig) -> list[BadFile]:
    indexing_skipped = corpus_bad_files(cfg)
    if indexing_skipped and cfg.data.on_bad_audio == "error":  # a corpus indexed under another policy
        first = indexing_skipped[0]
        raise BadAudioError(first.path, first.reason, first.stage)
    return indexing_skipped


def prepare_latent_store(cfg: DictConfig) -> LatentStore:
    """The latent store of ``cfg.data`` x ``cfg.representation`` (built on first use, then reused).

    With several extraction workers (``extract.world_size`` > 1, or a torchrun / SLURM environment: see
    :func:`extract_worker`) each encodes its share of the shards outside the artifact's lock, and the store is
    assembled from them once, under the lock, by a worker that finds them all complete (see
    :func:`_encode_distributed`).
    """
    from latentdyn.representations.extract import (
        assemble_store,
        extract_to_store,
        release_shard_dir,
        resolve_device,
    )

    store_path = latent_store_path(cfg)
    # Beside the artifact, outside its temporary build dir: a killed build resumes from here, and every
    # distributed worker finds the same directory (the artifact key names it).
    shard_dir = store_path.parent / f"{store_path.name}.shards"
    worker = extract_worker(cfg)
    distributed: dict[str, Any] = {}  # the representation and plan of a distributed extraction
    if worker.world_size > 1:
        if cfg.force:
            raise ValueError(
                f"force=true cannot rebuild the latent store with distributed extraction ({worker}, from "
                f"{worker.source}): workers that start at different times cannot agree on which build is "
                f"fresh. Rebuild it with one worker (force=true extract.world_size=1 extract.rank=0), or "
                f"delete {store_path} and run the workers without force"
            )
        if not artifacts.is_complete(store_path):
            distributed.update(_encode_distributed(cfg, store_path, shard_dir, worker))

    def build(tmp: Path) -> None:
        rep = distributed["rep"] if "rep" in distributed else instantiate(cfg.representation)
        splits = None if "plan" in distributed else prepare_splits(cfg)
        indexing_skipped = _checked_corpus_bad_files(cfg)
        meta = {
            "representation": rep.name,
            "sample_rate": rep.sample_rate,
            "frame_rate": rep.frame_rate,
            "weights": rep.weights,
            "extra": {"representation_config": _plain(cfg.representation)},
        }
        device = resolve_device(cfg.extract.device)
        with LatentStoreWriter(tmp, dim=rep.dim, meta=meta) as writer:
            if splits is None:  # distributed, every shard complete: merge them in the plan's fixed order
                log.info("%s: assembling the latent store from the shards in %s", worker, shard_dir)
                bad = assemble_store(distributed["plan"], shard_dir, writer)
            else:
                bad = extract_to_store(
                    rep,
                    splits,
                    writer,
                    **encoding_settings(cfg, device),
                    shard_dir=shard_dir,
                    resume=not cfg.force,
                )
        write_bad_files([*indexing_skipped, *bad], tmp / BAD_FILES_NAME)

    path = artifacts.get_or_build(
        Path(cfg.paths.cache_dir), "latents", store_spec(cfg), build, force=cfg.force
    )
    if worker.world_size > 1:
        release_shard_dir(shard_dir)  # the store is in place: its shards have served
    store = LatentStore(path)
    skipped = bad_files(store)
    record_weights(store.meta["representation"], store.meta["weights"])
    record_data({**data_provenance(cfg), **bad_file_provenance(skipped)})
    if skipped:
        log.warning(
            "%s left out of this data (%s); the list is in %s and in this run's run_info.json (data.bad_files)",
            _count_files(len(skipped)),
            ", ".join(f"{n} at {stage}" for stage, n in Counter(b.stage for b in skipped).items()),
            Path(store.root) / BAD_FILES_NAME,
        )
    return store


def _encode_distributed(cfg: DictConfig, store_path: Path, shard_dir: Path, worker: Any) -> dict[str, Any]:
    """Encode ``worker``'s shards into ``shard_dir``, then wait until the store can be assembled.

    Returns ``{"rep", "plan"}`` when every shard is complete (the caller assembles the store under the
    artifact's lock; a concurrent worker may have done it first, which the lock sorts out) and ``{"rep"}``
    when another worker has already put the store in place.

    Raises:
        ShardsPending: ``extract.assemble=leave`` and other workers' shards are still missing.
        TimeoutError: ``extract.assemble=wait`` and they stayed missing for ``extract.wait_timeout_s``.
    """
    from latentdyn.representations.extract import (
        ASSEMBLE_MODES,
        ShardsPending,
        encode_worker_shards,
        missing_shards,
        resolve_device,
        wait_for_shards,
    )

    assemble = str(cfg.extract.get("assemble") or "wait")
    timeout_s = float(cfg.extract.get("wait_timeout_s") or 86400.0)
    poll_s = float(cfg.extract.get("poll_s") or 30.0)
    if assemble not in ASSEMBLE_MODES:
        raise ValueError(f"extract.assemble must be one of {ASSEMBLE_MODES}, got {assemble!r}")
    if not timeout_s > 0 or not poll_s > 0:
        raise ValueError(
            f"extract.wait_timeout_s and extract.poll_s must be positive, got {timeout_s}, {poll_s}"
        )
    rep = instantiate(cfg.representation)
    splits = prepare_splits(cfg)
    _checked_corpus_bad_files(cfg)
    device = resolve_device(cfg.extract.device)
    plan = encode_worker_shards(rep, splits, shard_dir, worker, **encoding_settings(cfg, device))

    def store_done() -> bool:
        return artifacts.is_complete(store_path)

    if store_done():
        return {"rep": rep}
    missing = missing_shards(shard_dir, plan, rep.dim)
    if missing and assemble == "leave":
        raise ShardsPending(
            f"{worker}: its shards are written to {shard_dir}; shards {missing} of {len(plan.shards)} (rank(s) "
            f"{sorted({worker.owner(k) for k in missing})}) are not done yet, so it leaves "
            "(extract.assemble=leave): the worker that finishes last assembles the store "
            f"{store_path}. Set extract.assemble=wait to wait for it instead.",
            missing,
        )
    if missing and not wait_for_shards(
        shard_dir, plan, rep.dim, worker, timeout_s=timeout_s, poll_s=poll_s, done=store_done
    ):
        return {"rep": rep}  # another worker assembled the store while this one waited
    return {"rep": rep, "plan": plan}


def checkpoint_store(cfg: DictConfig, target: str, checkpoint: Path) -> LatentStore:
    """The corpus encoded by a trained model's representation (``target``, e.g. the β-VAE's or the VAE-GAN's,
    built from ``checkpoint``): a cached latent store keyed by the checkpoint file."""
    store_cfg = cfg.copy()
    with open_dict(store_cfg):
        store_cfg.representation = {"_target_": target, "checkpoint": str(Path(checkpoint).resolve())}
    return prepare_latent_store(store_cfg)


def _count_files(n: int) -> str:
    return f"{n} bad audio file{'' if n == 1 else 's'}"


def data_provenance(cfg: DictConfig) -> dict[str, Any]:
    """What the latents come from: corpus name, subsets (LibriSpeech) and split method, with a short ``label``
    for the results table (``synthetic/stratified``, ``librispeech:train-clean-100/reference``)."""
    corpus = str(cfg.data.get("name", "data"))
    subsets = list(cfg.data.corpus.get("subsets") or [])
    split = str(cfg.data.split.get("_target_", "")).rsplit(".", 1)[-1].removesuffix("_splits") or "split"
    label = f"{corpus}{':' + '+'.join(subsets) if subsets else ''}/{split}"
    return {"corpus": corpus, "subsets": subsets, "split": split, "label": label}


def bad_file_provenance(skipped: Sequence[BadFile]) -> dict[str, Any]:
    """The run record's account of the audio files its data left out: ``n_bad_files`` and ``bad_files``
    (``{path, stage, reason, utt_id}`` each)."""
    return {"n_bad_files": len(skipped), "bad_files": [b.to_dict() for b in skipped]}


def bad_files(store: LatentStore) -> list[BadFile]:
    """Every audio file left out of a store built by :func:`prepare_latent_store`: those its corpus's indexing
    skipped (stage ``index``), then those extraction skipped (stage ``extract``, in store order)."""
    return read_bad_files(Path(store.root) / BAD_FILES_NAME)
