"""EnCodec 24 kHz representation: frame count, exactness against the package's own modules, weight loading
from the torch.hub cache / a checkpoint / a (simulated) download, and offline failure messages.

No test touches the network: the hub cache is a temporary TORCH_HOME and ``torch.hub``'s download is
replaced by fakes. Weights are random (a seeded state dict saved to disk plays the release file).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
import torch
from encodec import EncodecModel
from encodec.modules import SEANetDecoder, SEANetEncoder
from hydra.utils import instantiate

from latentdyn.representations import encodec_rep
from latentdyn.representations.base import Representation
from latentdyn.representations.encodec_rep import (
    CHECKPOINT_NAME,
    CHECKPOINT_URL,
    EncodecRepresentation,
    EncodecWeightsUnavailableError,
    build_encodec_24khz,
    hub_checkpoint_path,
)

SEED = 123


@pytest.fixture(scope="module")
def rep() -> EncodecRepresentation:
    return EncodecRepresentation(pretrained=False, seed=SEED)


@pytest.fixture(scope="module")
def state_file(rep: EncodecRepresentation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``rep``'s weights saved like the release file (a plain state dict)."""
    path = tmp_path_factory.mktemp("encodec_state") / "my_encodec.th"
    torch.save(rep.model.state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty TORCH_HOME, and a torch.hub download that fails the test if it is ever reached."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"unexpected download attempt: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return home


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _audio(batch: int, samples: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, 1, samples, generator=gen)


def _assert_same_model(a: EncodecRepresentation, b: EncodecRepresentation) -> None:
    x = _audio(2, 1000, seed=1)
    za, zb = a.encode(x), b.encode(x)
    torch.testing.assert_close(za, zb, rtol=0, atol=0)
    torch.testing.assert_close(a.decode(za), b.decode(zb), rtol=0, atol=0)


def test_protocol_attributes(rep: EncodecRepresentation) -> None:
    assert isinstance(rep, Representation)
    assert (rep.name, rep.sample_rate, rep.frame_rate, rep.dim) == ("encodec", 24000, 75.0, 128)
    assert math.prod(rep.model.encoder.ratios) == rep.sample_rate / rep.frame_rate == 320
    assert rep.model.encoder.dimension == rep.dim
    assert rep.to("cpu") is rep and rep.device == torch.device("cpu")
    assert not any(p.requires_grad for p in rep.parameters())


@pytest.mark.parametrize("samples", [1, 7, 319, 320, 321, 640, 641, 1000, 2413])
@pytest.mark.slow
def test_frame_count_and_decoded_length(rep: EncodecRepresentation, samples: int) -> None:
    z = rep.encode(_audio(2, samples))
    assert z.dtype == torch.float32
    assert z.shape == (2, 128, rep.num_frames(samples))
    assert rep.num_frames(samples) == -(-samples // 320)  # a trailing partial hop gets its own frame
    y = rep.decode(z)
    assert y.shape == (2, 1, 320 * z.shape[-1])
    assert torch.isfinite(y).all()


def test_encode_and_decode_are_the_seanet_networks(rep: EncodecRepresentation) -> None:
    """Oracle: SEANet encoder/decoder built from the package's modules with the 24 kHz settings."""
    state = rep.model.state_dict()
    kwargs = {"channels": 1, "norm": "weight_norm", "causal": True}
    with pytest.warns(FutureWarning):  # the package's old-style weight norm
        encoder, decoder = SEANetEncoder(**kwargs), SEANetDecoder(**kwargs)
    for prefix, net in (("encoder.", encoder), ("decoder.", decoder)):
        net.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        net.eval()
    x = _audio(3, 2000, seed=2)
    with torch.no_grad():
        z_ref = encoder(x)
        torch.testing.assert_close(rep.encode(x), z_ref, rtol=0, atol=1e-6)
        z = torch.randn(3, 128, 9, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(rep.decode(z), decoder(z), rtol=0, atol=1e-6)


class _IdentityQuantizer(torch.nn.Module):
    """Stands in for the RVQ in ``EncodecModel``: codes are the continuous latents themselves."""

    def encode(self, emb: torch.Tensor, frame_rate: int, bandwidth: float | None = None) -> torch.Tensor:
        return emb

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the package's old-style weight norm
@pytest.mark.slow
def test_round_trip_is_the_model_with_the_quantiser_bypassed(rep: EncodecRepresentation) -> None:
    """``EncodecModel.forward`` (its normalisation and segmenting included) with an identity quantiser."""
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.load_state_dict(rep.model.state_dict())
    model.quantizer = _IdentityQuantizer()
    for samples, scale in ((1000, 1.0), (960, 0.01)):
        x = scale * _audio(2, samples, seed=samples)
        with torch.no_grad():
            expected = model(x)
        got = rep.decode(rep.encode(x))
        assert got.shape[-1] == 320 * rep.num_frames(samples) >= samples
        torch.testing.assert_close(got[..., :samples], expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_zero_padded_batch_keeps_full_frames(rep: EncodecRepresentation) -> None:
    """Frames covering only real samples do not see the batch's zero padding, once past the first 7 frames.

    The convolutions are causal but pad on the left by reflection, which mirrors up to 6 steps of the
    future into the start; at the last (75 Hz) layer that reaches frame 6, so a signal of at least
    7 * 320 = 2240 samples has padding-invariant full frames.
    """
    short, long = _audio(1, 2300, seed=4), _audio(1, 4000, seed=5)
    batch = torch.zeros(2, 1, 4000)
    batch[0, :, :2300], batch[1] = short[0], long[0]
    z = rep.encode(batch)
    full = 2300 // 320
    torch.testing.assert_close(z[0, :, :full], rep.encode(short)[0, :, :full], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z[1], rep.encode(long)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_random_weights_are_seeded_locally(rep: EncodecRepresentation) -> None:
    before = torch.get_rng_state()
    again = EncodecRepresentation(pretrained=False, seed=SEED)
    assert torch.equal(torch.get_rng_state(), before)
    assert again.weights == {"source": "random", "pretrained": False, "seed": SEED, "model": "encodec_24khz"}
    _assert_same_model(again, rep)
    other = build_encodec_24khz(seed=SEED + 1).state_dict()
    mine = rep.model.state_dict()
    assert not torch.equal(
        other["encoder.model.0.conv.conv.weight_v"], mine["encoder.model.0.conv.conv.weight_v"]
    )


@pytest.mark.slow
def test_config_loads_pretrained_from_the_hub_cache(
    rep: EncodecRepresentation, state_file: Path, offline: Path, compose_cfg: Any
) -> None:
    cached = offline / "hub" / "checkpoints" / CHECKPOINT_NAME
    assert hub_checkpoint_path() == cached
    cached.parent.mkdir(parents=True)
    shutil.copyfile(state_file, cached)
    cfg = compose_cfg(["representation=encodec"])
    assert cfg.representation.pretrained is True and cfg.representation.checkpoint is None
    loaded = instantiate(cfg.representation)
    assert isinstance(loaded, EncodecRepresentation)
    _assert_same_model(loaded, rep)
    assert loaded.weights["source"] == CHECKPOINT_URL
    assert loaded.weights["pretrained"] is True
    assert loaded.weights["path"] == str(cached)
    assert loaded.weights["sha256"] == _sha256(cached)
    assert loaded.weights["matches_release"] is False  # a random state dict, not the d7cc33bc release


def test_config_loads_pretrained_from_a_checkpoint(
    rep: EncodecRepresentation, state_file: Path, offline: Path, compose_cfg: Any
) -> None:
    cfg = compose_cfg(["representation=encodec", f"representation.checkpoint={state_file}"])
    loaded = instantiate(cfg.representation)
    _assert_same_model(loaded, rep)
    assert loaded.weights["source"] == str(state_file.resolve())
    assert loaded.weights["sha256"] == _sha256(state_file)
    assert not offline.exists()  # the cache was never consulted for writing


@pytest.mark.slow
def test_download_goes_through_torch_hub_into_the_cache(
    rep: EncodecRepresentation, state_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A fake ``load_state_dict_from_url`` that behaves like torch.hub: writes into the cache, returns the dict."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_hub(url: str, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls.append((url, kwargs))
        assert socket.getdefaulttimeout() == encodec_rep.DOWNLOAD_TIMEOUT_S
        dest = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(state_file, dest)
        return torch.load(dest, weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    timeout = socket.getdefaulttimeout()
    loaded = EncodecRepresentation()
    assert socket.getdefaulttimeout() == timeout
    assert [url for url, _ in calls] == [CHECKPOINT_URL]
    assert CHECKPOINT_URL.startswith("https://dl.fbaipublicfiles.com/")
    assert calls[0][1]["check_hash"] is True and calls[0][1]["weights_only"] is True
    _assert_same_model(loaded, rep)
    assert loaded.weights["source"] == CHECKPOINT_URL
    assert loaded.weights["sha256"] == _sha256(tmp_path / "hub" / "checkpoints" / CHECKPOINT_NAME)


def _refuse_build(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the model was built before the missing weights were reported")


@pytest.mark.parametrize("download", [True, False])
def test_missing_weights_fail_at_once_naming_both_ways(
    download: bool, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise URLError("[Errno -2] Name or service not known")

    if download:
        monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(encodec_rep, "build_encodec_24khz", _refuse_build)
    timeout = socket.getdefaulttimeout()
    with pytest.raises(EncodecWeightsUnavailableError) as info:
        EncodecRepresentation(pretrained=True, download=download)
    assert socket.getdefaulttimeout() == timeout
    message = str(info.value)
    for part in (
        "representation.checkpoint=PATH",
        f"{CHECKPOINT_NAME} in $TORCH_HOME/hub/checkpoints/",
        str(offline / "hub" / "checkpoints"),
        "dl.fbaipublicfiles.com",
        "representation.pretrained=false",
    ):
        assert part in message
    assert ("Name or service not known" in message) is download
    assert not (offline / "hub" / "checkpoints" / CHECKPOINT_NAME).exists()


def test_missing_checkpoint_names_the_path(
    offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(encodec_rep, "build_encodec_24khz", _refuse_build)
    missing = tmp_path / "no" / "encodec.th"
    with pytest.raises(FileNotFoundError, match="representation.checkpoint=.*no/encodec.th"):
        EncodecRepresentation(checkpoint=str(missing))


def test_checkpoint_is_ignored_with_random_weights(
    state_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger=encodec_rep.__name__):
        random_rep = EncodecRepresentation(pretrained=False, checkpoint=str(state_file), seed=7)
    assert random_rep.weights["source"] == "random"
    assert "is ignored: pretrained=false" in caplog.text


def test_foreign_state_dict_is_rejected_naming_its_file(offline: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.th"
    torch.save({"encoder.model.0.conv.conv.bias": torch.zeros(32), "unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(RuntimeError, match=f"{path.name}.*do not fit the 24 kHz model"):
        EncodecRepresentation(checkpoint=str(path))


def test_bad_shapes_are_rejected(rep: EncodecRepresentation) -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, S >= 1\)"):
        rep.encode(torch.zeros(2, 1000))
    with pytest.raises(ValueError, match=r"\(B, 1, S >= 1\)"):
        rep.encode(torch.zeros(2, 1, 0))
    with pytest.raises(ValueError, match=r"\(B, 128, T >= 1\)"):
        rep.decode(torch.zeros(1, 64, 5))
