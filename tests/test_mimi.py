"""representation=mimi: shapes, frame count, batching, both latent spaces and their decode paths, weights
loading, and the latent space named in a store's meta.

Everything runs offline on random-weight Mimi models (pretrained weights are stand-ins saved here and
found through a local HF cache or a checkpoint path); inputs are at most 0.2 s of audio. The references
for the latent spaces are computed here from moshi's own modules, not through ``bypass_quantizer``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.modules.conv import pad_for_conv1d
from moshi.quantization import ResidualVectorQuantizer, SplitResidualVectorQuantizer
from moshi.quantization.core_vq import EuclideanCodebook
from safetensors.torch import save_file

from latentdyn.data.latent_store import LatentStore, LatentStoreWriter, store_meta
from latentdyn.representations import mimi as mimi_module
from latentdyn.representations.base import Representation
from latentdyn.representations.mimi import LATENT_SPACES, MimiRepresentation, bypass_quantizer
from latentdyn.representations.weights import WeightsUnavailableError
from tests.test_weights import populate_hf_cache, set_offline_hf_env

HOP = 1920


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    """Reproducible quiet noise, std 0.1."""
    return 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


#: One frame of audio that loaded models are compared on.
PROBE = 0.1 * torch.randn(1, 1, HOP, generator=torch.Generator().manual_seed(4))


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to float32 round-off relative to the tensors' scale."""
    return a.shape == b.shape and bool((a - b).abs().max() <= rtol * b.abs().max())


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline HF environment with an empty cache under ``tmp_path``; returns the hub cache dir."""
    return set_offline_hf_env(tmp_path / "hf_home", monkeypatch)


@pytest.fixture(scope="module")
def rep0() -> MimiRepresentation:
    """Random-weight Mimi, seed 0, in the default latent space (``quantizer_output``)."""
    return MimiRepresentation(pretrained=False)


@pytest.fixture(scope="module")
def rep_pre() -> MimiRepresentation:
    """The same random-weight Mimi (seed 0) in the ``pre_quantizer`` space."""
    return MimiRepresentation(pretrained=False, latent_space="pre_quantizer")


def moshi_pre_quantizer(model: MimiModel, x: torch.Tensor) -> torch.Tensor:
    """``h``, as moshi's encode path computes it: zero-pad to whole frames, SEANet encoder, encoder
    transformer, downsampling to 12.5 Hz."""
    assert model.resample_method == "conv"
    emb = model.encoder(pad_for_conv1d(x, model.frame_size, model.frame_size))
    (emb,) = model.encoder_transformer(emb)
    return model.downsample(emb)


def moshi_quantizer_output(model: MimiModel, h: torch.Tensor) -> torch.Tensor:
    """The reference space: ``output_proj(input_proj(h))`` summed over moshi's two split quantisers."""
    q = model.quantizer
    assert isinstance(q, SplitResidualVectorQuantizer)
    assert isinstance(q.rvq_first.input_proj, torch.nn.Conv1d)  # 512 -> 256 -> 512: not a no-op
    return sum(rvq.output_proj(rvq.input_proj(h)) for rvq in (q.rvq_first, q.rvq_rest))


def moshi_decoder_path(model: MimiModel, z: torch.Tensor) -> torch.Tensor:
    """What moshi's ``decode`` does after the quantiser's decode: upsampling to 25 Hz, decoder
    transformer, SEANet decoder."""
    emb = model.upsample(z)
    (emb,) = model.decoder_transformer(emb)
    return model.decoder(emb)


@dataclass(frozen=True)
class StandIn:
    """A stand-in for the pretrained weights file and what the model it came from gives."""

    path: Path
    sha256: str
    probe_latents: torch.Tensor  # the source model's encode(PROBE)
    first_param: torch.Tensor


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    """A seed-1 random Mimi's state dict saved as safetensors under Mimi's file name.

    Seed 1 so that loading it is told apart from building the default seed-0 random model.
    """
    rep1 = MimiRepresentation(pretrained=False, seed=1)  # default latent space
    path = tmp_path_factory.mktemp("weights") / loaders.MIMI_NAME
    save_file({k: v.contiguous() for k, v in rep1.model.state_dict().items()}, str(path))
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    first = next(rep1.model.parameters()).detach().clone()
    yield StandIn(path, digest.hexdigest(), rep1.encode(PROBE), first)
    path.unlink()


def test_attributes_protocol_and_frame_count(rep0: MimiRepresentation) -> None:
    assert isinstance(rep0, Representation)
    assert (rep0.name, rep0.sample_rate, rep0.frame_rate, rep0.dim) == ("mimi", 24000, 12.5, 512)
    for s in (0, 1, 1919, 1920, 1921, 3840, 24000, 24001, 10**7 + 3):
        assert rep0.num_frames(s) == math.ceil(s / HOP)
    with pytest.raises(ValueError):
        rep0.num_frames(-1)
    assert rep0.to("cpu") is rep0 and rep0.device == torch.device("cpu")


def test_encode_shapes_and_a_padded_batch_matches_each_item(rep0: MimiRepresentation) -> None:
    lengths = (1, 1921, 4100)  # one sample, one past a frame, a partial third frame
    longest = max(lengths)
    batch = torch.zeros(len(lengths), 1, longest)
    singles = []
    for i, s in enumerate(lengths):
        wave = noise(1, 1, s, seed=i)
        batch[i, :, :s] = wave
        z = rep0.encode(wave)
        assert z.shape == (1, 512, rep0.num_frames(s)) and z.dtype == torch.float32
        assert torch.isfinite(z).all()
        singles.append(z)
    zb = rep0.encode(batch)
    assert zb.shape == (len(lengths), 512, rep0.num_frames(longest))
    # Mimi is causal and zero-pads partial frames: each item's own frames are unaffected by the padding.
    for i, z in enumerate(singles):
        assert rel_close(zb[i : i + 1, :, : z.shape[-1]], z)
    assert not rel_close(zb[0:1, :, :1], singles[1][:, :, :1], rtol=1e-2)  # different inputs differ


@pytest.mark.parametrize("space", LATENT_SPACES)
def test_decode_of_encode_matches_moshis_forward_with_quantisation_skipped(
    space: str, request: pytest.FixtureRequest
) -> None:
    """Reference: moshi's own training-time forward with ``no_quantization_rate = 1`` on both split
    quantisers (the quantiser returns ``x * mask + (1 - mask) * quantized`` with the mask always 1),
    the rest of the model in eval mode; it decodes in one pass and crops to the input length, which is
    a whole number of frames here so nothing is cropped. Holds in either latent space."""
    rep: MimiRepresentation = request.getfixturevalue("rep0" if space == "quantizer_output" else "rep_pre")
    assert rep.latent_space == space
    x = noise(2, 1, 2 * HOP, seed=5)
    z = rep.encode(x)
    y = rep.decode(z)
    assert z.shape == (2, 512, 2) and y.shape == (2, 1, 2 * HOP) and y.dtype == torch.float32

    ref = copy.deepcopy(rep.model)
    ref.quantizer.train()
    ref.quantizer.rvq_first.no_quantization_rate = 1.0
    ref.quantizer.rvq_rest.no_quantization_rate = 1.0
    for module in ref.quantizer.modules():  # skip the k-means codebook init training mode would run first
        if isinstance(module, EuclideanCodebook):
            module._initialized.fill_(1)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        expected = ref(x).x
    assert rel_close(y, expected)


def test_quantizer_output_latents_are_the_projected_pre_quantiser_embedding(rep0: MimiRepresentation) -> None:
    """The default space is ``rvq_first.output_proj(rvq_first.input_proj(h)) + rvq_rest.output_proj(
    rvq_rest.input_proj(h))``, not ``h`` itself."""
    assert rep0.latent_space == "quantizer_output"
    x = noise(2, 1, 2 * HOP + 700, seed=6)  # a partial last frame
    z = rep0.encode(x)
    with torch.no_grad():
        h = moshi_pre_quantizer(rep0.model, x)
        expected = moshi_quantizer_output(rep0.model, h)
        assert rel_close(h, rep0.model.encode_to_latent(x, quantize=False))
    assert z.shape == expected.shape == (2, 512, 3)
    assert rel_close(z, expected)
    assert not rel_close(z, h, rtol=0.1)  # a wrong space is caught
    # Each half contributes: neither projection alone is the latent.
    q = rep0.model.quantizer
    with torch.no_grad():
        for rvq in (q.rvq_first, q.rvq_rest):
            assert not rel_close(z, rvq.output_proj(rvq.input_proj(h)), rtol=0.1)


def test_reference_space_latents_decode_to_moshis_forward_with_quantisation_bypassed(
    rep0: MimiRepresentation, rep_pre: MimiRepresentation
) -> None:
    """Mimi reference-space latents decode to the same audio as moshi's forward with quantisation bypassed:
    encoder -> encoder transformer -> downsample -> ``h`` -> summed projections -> upsample -> decoder
    transformer -> decoder, all from moshi's modules."""
    x = noise(2, 1, 2 * HOP + 700, seed=7)
    with torch.no_grad():
        z_ref = moshi_quantizer_output(rep0.model, moshi_pre_quantizer(rep0.model, x))
        expected = moshi_decoder_path(rep0.model, z_ref)
    assert expected.shape == (2, 1, 3 * HOP)
    y_ref = rep0.decode(z_ref)  # the reference latents, decoded by us
    y = rep0.decode(rep0.encode(x))  # our latents, decoded by us
    assert y_ref.shape == y.shape == expected.shape and y.dtype == torch.float32
    assert rel_close(y_ref, expected, rtol=1e-6) and rel_close(y, expected, rtol=1e-6)
    # Projecting a second time (decoding them as pre-quantiser latents) gives other audio. A random-weight
    # decoder's output is mostly its biases, so latents move it by ~1e-3 of its scale: hence rtol=1e-4.
    assert not rel_close(rep_pre.decode(z_ref), expected, rtol=1e-4)


def test_pre_quantizer_space_keeps_h_and_decodes_it_through_the_projections(
    rep0: MimiRepresentation, rep_pre: MimiRepresentation
) -> None:
    x = noise(2, 1, 2 * HOP + 700, seed=8)
    with torch.no_grad():
        h = moshi_pre_quantizer(rep_pre.model, x)
        expected = moshi_decoder_path(rep_pre.model, moshi_quantizer_output(rep_pre.model, h))
    z = rep_pre.encode(x)
    assert rel_close(z, h)
    assert rel_close(z, rep_pre.model.encode_to_latent(x, quantize=False))
    assert not rel_close(z, rep0.encode(x), rtol=0.1)  # the same weights, the other space
    y = rep_pre.decode(h)
    assert rel_close(y, expected, rtol=1e-6)
    # ``h`` fed to the decoder path without the projections is other audio (rtol as above).
    assert not rel_close(rep0.decode(h), expected, rtol=1e-4)


def test_latent_space_is_validated_and_named_in_the_store_meta(
    rep0: MimiRepresentation, rep_pre: MimiRepresentation, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="latent_space"):
        MimiRepresentation(pretrained=False, latent_space="codes")
    for rep, space in ((rep0, "quantizer_output"), (rep_pre, "pre_quantizer")):
        assert rep.latent_space == space and rep.weights["latent_space"] == space
        assert f"latent_space={space}" in repr(rep)
        root = tmp_path / space
        with LatentStoreWriter(root, dim=rep.dim, meta=store_meta(rep)) as writer:
            writer.add("u0", "s0", "train", rep.encode(PROBE)[0].T, torch.zeros(1))
        assert LatentStore(root).meta["weights"]["latent_space"] == space


def test_latent_space_comes_from_the_config(compose_cfg) -> None:
    cfg = compose_cfg(["representation=mimi", "pretrained=false"])
    assert cfg.representation.latent_space == "quantizer_output"
    cfg = compose_cfg(
        ["representation=mimi", "pretrained=false", "representation.latent_space=pre_quantizer"]
    )
    rep = instantiate(cfg.representation)
    assert isinstance(rep, MimiRepresentation) and rep.latent_space == "pre_quantizer"
    assert rep.weights["latent_space"] == "pre_quantizer"


@pytest.mark.parametrize("split", [True, False])
def test_bypass_quantizer_is_moshis_no_quantisation_output(split: bool) -> None:
    torch.manual_seed(0)
    kw = {"dimension": 8, "input_dimension": 12, "output_dimension": 12, "bins": 16}
    if split:
        q = SplitResidualVectorQuantizer(n_q=3, n_q_semantic=1, no_quantization_rate=1.0, **kw)
    else:
        q = ResidualVectorQuantizer(n_q=2, no_quantization_rate=1.0, force_projection=True, **kw)
    q.train()
    z = torch.randn(3, 12, 5)
    with torch.no_grad():
        expected = q(z, 12.5).x
        got = bypass_quantizer(q, z)
    assert rel_close(got, expected)
    if split:  # both halves contribute
        assert not rel_close(got, bypass_quantizer(q.rvq_first, z), rtol=1e-2)
    with pytest.raises(TypeError):
        bypass_quantizer(torch.nn.Identity(), z)


def test_streaming_mode_is_refused(rep0: MimiRepresentation) -> None:
    with rep0.model.streaming(1), pytest.raises(RuntimeError, match="streaming"):
        rep0.encode(noise(1, 1, HOP))
    assert not rep0.model.is_streaming


def test_bad_shapes_are_refused(rep0: MimiRepresentation) -> None:
    with pytest.raises(ValueError):
        rep0.encode(torch.zeros(2, HOP))
    with pytest.raises(ValueError):
        rep0.encode(torch.zeros(1, 1, 0))
    with pytest.raises(ValueError):
        rep0.decode(torch.zeros(1, 128, 2))


def test_random_weights_are_deterministic_and_leave_the_global_rng_alone(
    rep0: MimiRepresentation, stand_in: StandIn
) -> None:
    state = torch.get_rng_state()
    again = MimiRepresentation(pretrained=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert again.weights == {
        "source": "random",
        "pretrained": False,
        "seed": 0,
        "init": "moshi.models.loaders.get_mimi(None)",
        "latent_space": "quantizer_output",
    }
    assert torch.equal(again.encode(PROBE), rep0.encode(PROBE))
    assert not torch.equal(next(rep0.model.parameters()), stand_in.first_param)  # seed 1 differs


def test_pretrained_weights_load_from_the_hf_cache(offline_hf: Path, stand_in: StandIn) -> None:
    pointer = populate_hf_cache(offline_hf, loaders.DEFAULT_REPO, loaders.MIMI_NAME, stand_in.path)
    rep = MimiRepresentation()
    assert rep.weights == {
        "source": f"hf:{loaders.DEFAULT_REPO}/{loaders.MIMI_NAME}",
        "pretrained": True,
        "sha256": stand_in.sha256,
        "revision": pointer.parent.name,
        "latent_space": "quantizer_output",
    }
    assert torch.equal(rep.encode(PROBE), stand_in.probe_latents)


def test_pretrained_weights_load_from_a_checkpoint(offline_hf: Path, stand_in: StandIn) -> None:
    rep = MimiRepresentation(pretrained=True, checkpoint=str(stand_in.path))  # the hub cache is empty
    assert rep.weights == {
        "source": str(stand_in.path.resolve()),
        "pretrained": True,
        "sha256": stand_in.sha256,
        "latent_space": "quantizer_output",
    }
    assert torch.equal(rep.encode(PROBE), stand_in.probe_latents)


def test_missing_weights_fail_before_anything_is_built(
    offline_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the weights were found")

    monkeypatch.setattr(mimi_module.loaders, "get_mimi", no_build)
    with pytest.raises(WeightsUnavailableError) as info:
        MimiRepresentation()
    message = str(info.value)
    assert "representation.checkpoint=" in message and loaders.MIMI_NAME in message
    assert f"huggingface-cli download kyutai/moshiko-pytorch-bf16 {loaders.MIMI_NAME}" in message
    assert "HF_HOME" in message and "representation.pretrained=false" in message

    missing = tmp_path / "no" / "tokenizer.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        MimiRepresentation(checkpoint=str(missing))
