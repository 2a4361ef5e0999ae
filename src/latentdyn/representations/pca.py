"""PCA projections of a latent store: a stackable representation (DESIGN §7) and its streaming fit.

Space. A fit works in one of two input spaces (:data:`SPACES`), chosen by ``space`` and recorded in the fit,
in the projected store's meta and in the weights provenance:

* ``raw`` (the default, the reference study's Exp 4): the raw train latents, centred by the PCA's own mean
  and **not whitened** (no per-dimension scaling, components not rescaled to unit variance). The components
  are the directions of largest raw variance; the projection ``y = C_k (z - mu)`` is an orthogonal
  projection, so distances between points of the components' span are the same in ``y`` and in the raw
  latent space (see *Isometry* below).
* ``train_standardized``: the base store's train-standardised space ``x = (z - m) / s`` (per-dimension train
  mean ``m`` and std ``s``), so no dimension dominates the fit only because its units are large.

Both are one formula: a fit holds the standardisation ``m``, ``s`` it was made in (``store_mean``,
``store_std``; ``0`` and ``1`` for ``raw``) and the PCA mean ``mu`` in that space, and the projection of a
raw frame ``z (D,)`` onto ``k`` components is the affine map

    y = C_k ((z - m) / s - mu),     z_hat = (C_k^T y + mu) * s + m,

with ``C_k (k, D)`` the first ``k`` orthonormal components. With ``k = D`` the round trip is the identity.

Isometry (``raw`` space). Two projections ``y``, ``y'`` decode to ``z_hat - z_hat' = C_k^T (y - y')`` (the
mean cancels) and ``C_k C_k^T = I``, so ``‖z_hat - z_hat'‖ = ‖y - y'‖``: the distance between a rollout of
projected frames and the projected ground truth, both decoded, is their distance in the projected store.
This holds for the stored float16 projections too (any ``y`` decodes through the same linear map). The
distance to the *original* raw frame adds the frame's reconstruction residual, orthogonal to the span, in
quadrature: ``‖z_hat - z‖² = ‖y - C_k (z - mu)‖² + ‖(I - C_k^T C_k)(z - mu)‖²``. For ``train_standardized``
decoding multiplies by ``s`` per dimension, which is not an isometry.

Fit. :func:`fit_incremental_pca` streams the train split through :class:`sklearn.decomposition.
IncrementalPCA` in chunks read from the store's memory map, so memory is ``O(chunk_frames x D)`` whatever
the store's size. One fit with ``n_components = K`` serves every ``k <= K``: the components come out
ordered by explained variance, so the first ``k`` rows are the ``k``-component projection.

Derived stores. :func:`write_projected_store` streams every utterance of a base store through the
projection into a :class:`~latentdyn.data.latent_store.LatentStoreWriter` (same index, splits and
energies; the writer recomputes the train statistics of the projected latents). No audio is re-encoded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdyn.data.latent_store import LatentStore, LatentStoreWriter

__all__ = [
    "SPACE",
    "SPACES",
    "PCAFit",
    "PCARepresentation",
    "check_space",
    "chunk_bounds",
    "fit_incremental_pca",
    "iter_split_chunks",
    "pca_weights",
    "projection_space",
    "reconstruction_mse",
    "write_projected_store",
]

#: Spaces a PCA can be fitted in (see the module docstring); recorded in fits and store metadata.
SPACES: tuple[str, ...] = ("raw", "train_standardized")
#: The default space: raw, centred, unwhitened latents (the reference).
SPACE = "raw"
#: The space of fits saved before the key was recorded.
LEGACY_SPACE = "train_standardized"
FIT_ARRAYS = "pca_fit.npz"
FIT_INFO = "pca_fit.json"
#: Written beside a projected store's files: per-split reconstruction MSE (in the fit's space).
RECON_FILE = "pca_recon.json"


def check_space(space: str) -> str:
    """``space`` if it is one of :data:`SPACES`, else ValueError."""
    if space not in SPACES:
        raise ValueError(f"PCA space must be one of {SPACES}, got {space!r}")
    return str(space)


def pca_weights(base_weights: Mapping[str, Any], store: str, k: int, space: str = SPACE) -> dict[str, Any]:
    """Provenance of a ``k``-component PCA on top of a base representation: the base's weights, and where
    (the train split of the store at ``store``) and in which ``space`` the projection was fitted."""
    return {
        "source": f"fit on train split of {store}",
        "pretrained": bool(base_weights.get("pretrained", False)),
        "kind": "pca",
        "n_components": int(k),
        "space": check_space(space),
        "base": dict(base_weights),
    }


def _float_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 CPU tensor copy of an array or tensor (the module's buffers; ``to`` moves them)."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32).clone()


class PCARepresentation(torch.nn.Module):
    """A ``k``-component linear projection stacked on a base representation.

    ``encode`` = ``base.encode`` then project; ``decode`` = inverse-project then ``base.decode``. Sample and
    frame rates are the base's; the name is ``pca{k}-{base.name}``.

    Args:
        base: the representation whose latents ``(B, D, T)`` are projected.
        components: ``(k, D)`` orthonormal rows (the PCA components, in the space ``(z - mean) / scale``).
        mean: ``(D,)`` raw-latent offset subtracted before projecting (see :meth:`PCAFit.representation`).
        scale: ``(D,)`` positive per-dimension divisor applied after subtracting ``mean``; default ones.
        source: where the projection was fitted, for the weights provenance.
        space: the space the projection was fitted in (:data:`SPACES`), for the weights provenance.
    """

    def __init__(
        self,
        base: Any,
        components: np.ndarray | torch.Tensor,
        mean: np.ndarray | torch.Tensor,
        scale: np.ndarray | torch.Tensor | None = None,
        source: str = "unknown store",
        space: str = SPACE,
    ) -> None:
        super().__init__()
        comps = _float_tensor(components)
        if comps.dim() != 2 or comps.shape[1] != base.dim or not 1 <= comps.shape[0] <= base.dim:
            raise ValueError(
                f"components must be (k, {base.dim}) with 1 <= k <= {base.dim}, got {tuple(comps.shape)}"
            )
        gram = comps.double() @ comps.double().T
        if not torch.allclose(gram, torch.eye(comps.shape[0], dtype=torch.float64), atol=1e-4):
            raise ValueError("components must have orthonormal rows")
        offset = _float_tensor(mean)
        divisor = torch.ones(base.dim) if scale is None else _float_tensor(scale)
        if offset.shape != (base.dim,) or divisor.shape != (base.dim,):
            raise ValueError(
                f"mean and scale must be ({base.dim},), got {tuple(offset.shape)}, {tuple(divisor.shape)}"
            )
        if not bool(torch.all(divisor > 0)):
            raise ValueError("scale must be positive")
        self.base = base
        self.dim = int(comps.shape[0])
        self.sample_rate = int(base.sample_rate)
        self.frame_rate = float(base.frame_rate)
        self.name = f"pca{self.dim}-{base.name}"
        self.weights = pca_weights(base.weights, source, self.dim, space)
        self.register_buffer("components", comps)
        self.register_buffer("offset", offset)
        self.register_buffer("divisor", divisor)

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, D, T)`` base latents -> ``(B, k, T)`` float32 projections."""
        if latents.dim() != 3 or latents.shape[1] != self.base.dim:
            raise ValueError(f"expected base latents (B, {self.base.dim}, T), got {tuple(latents.shape)}")
        x = (latents.to(self.components) - self.offset[:, None]) / self.divisor[:, None]
        return torch.einsum("kd,bdt->bkt", self.components, x)

    def inverse(self, projections: torch.Tensor) -> torch.Tensor:
        """``(B, k, T)`` projections -> ``(B, D, T)`` base latents: the point of the components' span (in the
        scaled space) with these coordinates; ``inverse(project(z))`` is the nearest such point to ``z``."""
        if projections.dim() != 3 or projections.shape[1] != self.dim:
            raise ValueError(f"expected projections (B, {self.dim}, T), got {tuple(projections.shape)}")
        x = torch.einsum("kd,bkt->bdt", self.components, projections.to(self.components))
        return x * self.divisor[:, None] + self.offset[:, None]

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> ``(B, k, T)`` projected latents."""
        return self.project(self.base.encode(wave))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, k, T)`` projected latents -> ``(B, 1, S)`` audio through the base decoder."""
        return self.base.decode(self.inverse(latents))

    def num_frames(self, num_samples: int) -> int:
        return int(self.base.num_frames(num_samples))

    def to(self, *args: Any, **kwargs: Any) -> PCARepresentation:
        """Move the projection (and a base that is not a submodule) to a device; returns self."""
        super().to(*args, **kwargs)
        if not isinstance(self.base, torch.nn.Module):
            self.base.to(*args, **kwargs)
        return self


@dataclass(frozen=True)
class PCAFit:
    """A PCA fitted on a store's train split in ``space`` (float64 arrays); see the module docstring.

    Attributes:
        components: ``(K, D)`` orthonormal rows, in decreasing order of explained variance.
        mean: ``(D,)`` PCA mean in the fit's space (the raw train mean for ``raw``).
        explained_variance: ``(K,)`` variance along each component (ddof=1, as sklearn), in the fit's space.
        explained_variance_ratio: ``(K,)`` fraction of the total variance (in the fit's space) per component.
        store_mean, store_std: ``(D,)`` the standardisation defining the fit's space: the base store's train
            mean and std for ``train_standardized``, zeros and ones for ``raw``.
        n_samples: train frames seen; n_chunks: ``partial_fit`` calls; source: the base store's root.
        space: one of :data:`SPACES`.
    """

    components: np.ndarray
    mean: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    store_mean: np.ndarray
    store_std: np.ndarray
    n_samples: int
    n_chunks: int
    source: str
    space: str = SPACE

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or int(k) != k or not 1 <= k <= self.n_components:
            raise ValueError(
                f"k must be an integer in [1, {self.n_components}] (components fitted), got {k!r}"
            )
        return int(k)

    def explained_fraction(self, k: int) -> float:
        """Fraction of the total train variance (in the fit's space) kept by the first ``k`` components."""
        return float(np.sum(self.explained_variance_ratio[: self._check_k(k)]))

    def project(self, latents: np.ndarray, k: int) -> np.ndarray:
        """``(T, D)`` raw latents -> ``(T, k)`` float64 projections."""
        k = self._check_k(k)
        x = (np.asarray(latents, dtype=np.float64) - self.store_mean) / self.store_std
        return (x - self.mean) @ self.components[:k].T

    def reconstruct(self, projections: np.ndarray) -> np.ndarray:
        """``(T, k)`` projections -> ``(T, D)`` float64 latents in the **fit's** space (raw latents for ``raw``,
        standardised ones for ``train_standardized``)."""
        k = self._check_k(projections.shape[-1])
        return np.asarray(projections, dtype=np.float64) @ self.components[:k] + self.mean

    def representation(self, base: Any, k: int) -> PCARepresentation:
        """The ``k``-component :class:`PCARepresentation` on ``base`` (whose latents the store holds)."""
        k = self._check_k(k)
        if int(base.dim) != self.input_dim:
            raise ValueError(f"base representation has dim {base.dim}, the fit expects {self.input_dim}")
        # (z - m)/s - mu = (z - (m + s mu)) / s: one offset and one divisor in raw units.
        return PCARepresentation(
            base,
            self.components[:k],
            mean=self.store_mean + self.store_std * self.mean,
            scale=self.store_std,
            source=self.source,
            space=self.space,
        )

    def save(self, directory: Path) -> None:
        """Write ``pca_fit.npz`` (arrays) and ``pca_fit.json`` (sizes, source, space) into ``directory``."""
        directory = Path(directory)
        np.savez(
            directory / FIT_ARRAYS,
            components=self.components,
            mean=self.mean,
            explained_variance=self.explained_variance,
            explained_variance_ratio=self.explained_variance_ratio,
            store_mean=self.store_mean,
            store_std=self.store_std,
        )
        info = {
            "n_components": self.n_components,
            "input_dim": self.input_dim,
            "n_samples": self.n_samples,
            "n_chunks": self.n_chunks,
            "source": self.source,
            "space": self.space,
        }
        (directory / FIT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> PCAFit:
        """Read a fit written by :meth:`save`."""
        directory = Path(directory)
        info = json.loads((directory / FIT_INFO).read_text())
        with np.load(directory / FIT_ARRAYS) as arrays:
            fields = {name: np.array(arrays[name]) for name in arrays.files}
        return cls(
            **fields,
            n_samples=int(info["n_samples"]),
            n_chunks=int(info["n_chunks"]),
            source=info["source"],
            space=check_space(info.get("space", LEGACY_SPACE)),
        )


def chunk_bounds(n_rows: int, chunk_frames: int) -> np.ndarray:
    """Boundaries ``(n_chunks + 1,)`` splitting ``n_rows`` into ``max(1, n_rows // chunk_frames)`` near-equal
    chunks, each of at least ``chunk_frames`` rows (when ``n_rows >= chunk_frames``) and fewer than twice that.

    No short trailing chunk: ``IncrementalPCA.partial_fit`` needs at least ``n_components`` rows per call.
    """
    if chunk_frames < 1 or n_rows < 1:
        raise ValueError(f"need n_rows >= 1 and chunk_frames >= 1, got {n_rows}, {chunk_frames}")
    n_chunks = max(1, n_rows // chunk_frames)
    return np.linspace(0, n_rows, n_chunks + 1).round().astype(np.int64)


def _split_runs(store: LatentStore, split: str) -> list[tuple[int, int]]:
    """``(start_row, n_rows)`` of the split's rows, adjacent utterances merged into one run."""
    runs: list[tuple[int, int]] = []
    for utt in store.utterances(split):
        if runs and runs[-1][0] + runs[-1][1] == utt.start:
            runs[-1] = (runs[-1][0], runs[-1][1] + utt.n_frames)
        else:
            runs.append((utt.start, utt.n_frames))
    return runs


def iter_split_chunks(store: LatentStore, split: str, chunk_frames: int) -> Iterator[np.ndarray]:
    """The split's raw latents in row order as float32 ``(n_i, D)`` chunks (see :func:`chunk_bounds`).

    Only one chunk is ever copied out of the memory map.
    """
    runs = _split_runs(store, split)
    bounds = chunk_bounds(sum(n for _, n in runs), chunk_frames)
    run_i, offset = 0, 0
    for size in np.diff(bounds):
        parts: list[np.ndarray] = []
        need = int(size)
        while need:
            start, n = runs[run_i]
            take = min(need, n - offset)
            parts.append(store.latents[start + offset : start + offset + take])
            need -= take
            offset += take
            if offset == n:
                run_i, offset = run_i + 1, 0
        yield np.concatenate(parts).astype(np.float32)


def fit_incremental_pca(
    store: LatentStore,
    n_components: int,
    chunk_frames: int = 8192,
    split: str = "train",
    space: str = SPACE,
) -> PCAFit:
    """Fit ``n_components`` PCA components on ``split`` of ``store`` in ``space``, streaming.

    ``space``: ``raw`` (raw latents, centred by the PCA mean, unwhitened) or ``train_standardized`` (the
    store's per-dimension train standardisation first). Chunks of ``max(chunk_frames, n_components)`` rows
    (one at a time) go through ``IncrementalPCA.partial_fit`` (no whitening) in float64. Raises ValueError
    when ``n_components`` exceeds the store's dimension or the split's frame count, or for an unknown space.
    """
    from sklearn.decomposition import IncrementalPCA

    n_rows = sum(u.n_frames for u in store.utterances(split))
    if not 1 <= n_components <= store.dim:
        raise ValueError(f"n_components must be in [1, {store.dim}] (the store's dim), got {n_components}")
    if n_rows < n_components:
        raise ValueError(
            f"split {split!r} of {store.root} has {n_rows} frames, fewer than {n_components} components"
        )
    if check_space(space) == "raw":
        mean, std = np.zeros(store.dim), np.ones(store.dim)
    else:
        mean, std = store.mean.astype(np.float64), store.std.astype(np.float64)
    ipca = IncrementalPCA(n_components=n_components, whiten=False)
    n_chunks = 0
    for chunk in iter_split_chunks(store, split, max(chunk_frames, n_components)):
        ipca.partial_fit((chunk.astype(np.float64) - mean) / std)
        n_chunks += 1
    return PCAFit(
        components=np.asarray(ipca.components_, dtype=np.float64),
        mean=np.asarray(ipca.mean_, dtype=np.float64),
        explained_variance=np.asarray(ipca.explained_variance_, dtype=np.float64),
        explained_variance_ratio=np.asarray(ipca.explained_variance_ratio_, dtype=np.float64),
        store_mean=mean,
        store_std=std,
        n_samples=int(ipca.n_samples_seen_),
        n_chunks=n_chunks,
        source=str(store.root),
        space=space,
    )


def write_projected_store(fit: PCAFit, base: LatentStore, k: int, root: Path) -> LatentStore:
    """Stream every utterance of ``base`` through the ``k``-component projection into a new store at ``root``.

    Index, splits, genders and log energies are copied; the writer recomputes the train statistics. The
    meta records the representation ``pca{k}-<base>``, the base's rates, :func:`pca_weights` and, under
    ``extra.pca``, the base store, the fit's ``space`` and the fraction of variance kept. ``pca_recon.json``
    beside the store's files holds the per-split reconstruction MSE per base dimension in the fit's space
    (raw latent units for ``raw``), of the stored float16 projections (what readers of the store get back);
    see :func:`reconstruction_mse`.
    """
    if fit.input_dim != base.dim:
        raise ValueError(f"fit expects dim {fit.input_dim}, store {base.root} has dim {base.dim}")
    base_name = str(base.meta["representation"])
    meta = {
        "representation": f"pca{k}-{base_name}",
        "sample_rate": base.meta["sample_rate"],
        "frame_rate": base.frame_rate,
        "weights": pca_weights(base.meta["weights"], str(base.root), k, fit.space),
        "extra": {
            "pca": {
                "base_store": str(base.root),
                "base_representation": base_name,
                "base_dim": base.dim,
                "n_components": int(k),
                "space": fit.space,
                "explained_variance_fraction": fit.explained_fraction(k),
            }
        },
    }
    sq_err: dict[str, float] = {}
    count: dict[str, int] = {}
    with LatentStoreWriter(root, dim=k, meta=meta) as writer:
        for utt in base.index:
            z = base.utterance_latents(utt)
            y = fit.project(z, k)  # float64: the writer checks the float16 range before rounding
            y16 = y.astype(np.float16)  # what the store will hold
            x = (z.astype(np.float64) - fit.store_mean) / fit.store_std
            sq_err[utt.split] = sq_err.get(utt.split, 0.0) + float(np.sum((fit.reconstruct(y16) - x) ** 2))
            count[utt.split] = count.get(utt.split, 0) + z.size
            writer.add(utt.utt_id, utt.speaker, utt.split, y, base.utterance_log_energy(utt), utt.gender)
    recon = {"recon_mse": {split: sq_err[split] / count[split] for split in sorted(sq_err)}}
    (Path(root) / RECON_FILE).write_text(json.dumps(recon, indent=2, sort_keys=True) + "\n")
    return LatentStore(root)


def projection_space(store: LatentStore) -> str | None:
    """The space a store written by :func:`write_projected_store` was projected in (``meta.extra.pca.space``;
    :data:`LEGACY_SPACE` for a projection written before it was recorded), None when it is not a projection."""
    pca = (store.meta.get("extra") or {}).get("pca")
    if pca is None:
        return None
    return check_space(pca.get("space", LEGACY_SPACE))


def reconstruction_mse(store: LatentStore, split: str) -> float:
    """Reconstruction MSE per base dimension (in the fit's space, see :func:`write_projected_store`) of
    ``split`` of a store written by :func:`write_projected_store`; NaN when the store is not a projection or
    lacks the split."""
    path = Path(store.root) / RECON_FILE
    if not path.is_file():
        return math.nan
    value = json.loads(path.read_text())["recon_mse"].get(split)
    return math.nan if value is None else float(value)
