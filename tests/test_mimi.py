"""representation=mimi: shapes, frame count, batching, the continuous decode path, weights loading.

Everything runs offline on random-weight Mimi models (pretrained weights are stand-ins saved here and
found through a local HF cache or a checkpoint path); inputs are at most 0.2 s of audio.
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
from moshi.models import loaders
from moshi.quantization import ResidualVectorQuantizer, SplitResidualVectorQuantizer
from moshi.quantization.core_vq import EuclideanCodebook
from safetensors.torch import save_file

from latentdyn.representations import mimi as mimi_module
from latentdyn.representations.base import Representation
from latentdyn.representations.mimi import MimiRepresentation, bypass_quantizer
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
    """Random-weight Mimi, seed 0 (the default)."""
    return MimiRepresentation(pretrained=False)


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
    rep1 = MimiRepresentation(pretrained=False, seed=1)
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


def test_decode_matches_moshis_forward_with_quantisation_skipped(rep0: MimiRepresentation) -> None:
    """Reference: moshi's own training-time forward with ``no_quantization_rate = 1`` on both split
    quantisers (the quantiser returns ``x * mask + (1 - mask) * quantized`` with the mask always 1),
    the rest of the model in eval mode; it decodes in one pass and crops to the input length, which is
    a whole number of frames here so nothing is cropped."""
    x = noise(2, 1, 2 * HOP, seed=5)
    z = rep0.encode(x)
    y = rep0.decode(z)
    assert z.shape == (2, 512, 2) and y.shape == (2, 1, 2 * HOP) and y.dtype == torch.float32

    ref = copy.deepcopy(rep0.model)
    ref.quantizer.train()
    ref.quantizer.rvq_first.no_quantization_rate = 1.0
    ref.quantizer.rvq_rest.no_quantization_rate = 1.0
    for module in ref.quantizer.modules():  # skip the k-means codebook init training mode would run first
        if isinstance(module, EuclideanCodebook):
            module._initialized.fill_(1)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        expected = ref(x).x
    assert rel_close(y, expected)


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
    }
    assert torch.equal(rep.encode(PROBE), stand_in.probe_latents)


def test_pretrained_weights_load_from_a_checkpoint(offline_hf: Path, stand_in: StandIn) -> None:
    rep = MimiRepresentation(pretrained=True, checkpoint=str(stand_in.path))  # the hub cache is empty
    assert rep.weights == {
        "source": str(stand_in.path.resolve()),
        "pretrained": True,
        "sha256": stand_in.sha256,
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
