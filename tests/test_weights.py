"""Pretrained-weights helpers: HF cache resolution (offline, from a cache laid out here), errors, provenance."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import requests
import torch

from latentdyn.representations import weights
from latentdyn.representations.weights import (
    WeightsUnavailableError,
    cached_sha256,
    hf_hub_cache_dir,
    hf_hub_offline,
    locate_pretrained,
    missing_weights_message,
    random_provenance,
    resolve_checkpoint,
    resolve_hf_file,
    seeded_init,
)

REPO = "kyutai/moshiko-pytorch-bf16"
FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_ENV_VARS = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "XDG_CACHE_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


def populate_hf_cache(cache: Path, repo: str, filename: str, source: Path, commit: str = COMMIT) -> Path:
    """Lay ``source`` out in an HF hub cache as ``hf_hub_download`` leaves a downloaded file.

    ``models--<owner>--<name>/blobs/<sha256>`` holds the content, ``snapshots/<commit>/<filename>`` is a
    relative symlink to it and ``refs/main`` names the commit (huggingface_hub's ``file_download``:
    ``_get_pointer_path``, ``refs/<revision>`` lookup when offline). Returns the snapshot path.
    """
    storage = cache / ("models--" + repo.replace("/", "--"))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    blob = storage / "blobs" / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.symlink_to(source.resolve())
    pointer = storage / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return pointer


def set_offline_hf_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME=home and HF_HUB_OFFLINE=1, every other HF cache variable unset; returns the hub cache dir.

    huggingface_hub's own offline constant is set too, so nothing can reach the network.
    """
    for name in HF_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline HF environment with an empty cache under ``tmp_path``; returns the hub cache dir."""
    return set_offline_hf_env(tmp_path / "hf_home", monkeypatch)


def test_cache_dir_and_offline_follow_huggingface_hubs_own_reading_of_the_environment(tmp_path: Path) -> None:
    combos = [
        {},
        {"HF_HOME": str(tmp_path / "home")},
        {"HF_HOME": "~/hfh", "HF_HUB_CACHE": str(tmp_path / "hubcache")},
        {"XDG_CACHE_HOME": str(tmp_path / "xdg")},
        {"HF_HOME": str(tmp_path / "home"), "HUGGINGFACE_HUB_CACHE": str(tmp_path / "legacy")},
        {"HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "yes"},
        {"HF_HUB_OFFLINE": "0"},
        {"TRANSFORMERS_OFFLINE": "true"},
    ]
    # huggingface_hub reads these variables once, at import: reload its constants under each setting.
    oracle = (
        "import importlib, json, os, sys\n"
        "import huggingface_hub.constants as c\n"
        "out = []\n"
        f"names = {list(HF_ENV_VARS)!r}\n"
        "for combo in json.loads(sys.argv[1]):\n"
        "    for n in names: os.environ.pop(n, None)\n"
        "    os.environ.update(combo)\n"
        "    importlib.reload(c)\n"
        "    out.append([c.HF_HUB_CACHE, c.HF_HUB_OFFLINE])\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", oracle, json.dumps(combos)], capture_output=True, text=True, check=True
    )
    expected = json.loads(proc.stdout)
    saved = {n: os.environ.get(n) for n in HF_ENV_VARS}
    try:
        for combo, (cache, offline) in zip(combos, expected, strict=True):
            for n in HF_ENV_VARS:
                os.environ.pop(n, None)
            os.environ.update(combo)
            assert hf_hub_cache_dir() == Path(cache), combo
            assert hf_hub_offline() is offline, combo
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def test_resolve_hf_file_finds_a_cached_file_offline(offline_hf: Path, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"mimi weights \x00\x01")
    pointer = populate_hf_cache(offline_hf, REPO, FILENAME, source)

    path = resolve_hf_file(REPO, FILENAME)
    assert path == pointer and path.read_bytes() == source.read_bytes()
    assert resolve_hf_file(REPO, FILENAME, revision=COMMIT) == pointer

    found = locate_pretrained(checkpoint=None, hf_repo=REPO, filename=FILENAME)
    assert found.path == pointer
    assert found.provenance == {
        "source": f"hf:{REPO}/{FILENAME}",
        "pretrained": True,
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "revision": COMMIT,
    }


def test_missing_hub_file_offline_names_both_ways_to_provide_weights(offline_hf: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_hf_file(REPO, FILENAME, config_key="representation")
    message = str(info.value)
    assert f"representation.checkpoint=/path/to/{FILENAME}" in message
    assert f"huggingface-cli download {REPO} {FILENAME}" in message
    assert "HF_HOME" in message and str(offline_hf) in message
    assert "HF_HUB_OFFLINE" in message
    assert "representation.pretrained=false" in message
    assert isinstance(info.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


@pytest.mark.parametrize(
    "error",
    [
        requests.exceptions.ConnectionError("Failed to resolve 'huggingface.co'"),
        huggingface_hub.errors.LocalEntryNotFoundError("not in the cache and the hub is unreachable"),
        huggingface_hub.errors.HFValidationError("Repo id must be in the form 'repo_name'"),
    ],
)
def test_hub_errors_become_weights_unavailable(
    error: Exception, offline_hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []

    def failing_download(**kwargs: object) -> str:
        calls.append(kwargs)
        raise error

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "hf_hub_download", failing_download)
    monkeypatch.setattr(weights, "hub_resolves", lambda: True)  # as on a machine with a network
    with pytest.raises(WeightsUnavailableError, match="representation.pretrained=false") as info:
        resolve_hf_file(REPO, FILENAME)
    assert info.value.__cause__ is error and str(error) in str(info.value)
    # Online (HF_HUB_OFFLINE unset) the hub may be asked; the cache is the one the environment names.
    assert calls == [
        {
            "repo_id": REPO,
            "filename": FILENAME,
            "revision": None,
            "cache_dir": offline_hf,
            "local_files_only": False,
        }
    ]


def test_offline_mode_never_lets_the_hub_be_asked(offline_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = weights.hf_hub_download

    def spy(**kwargs: object) -> str:
        seen.append(bool(kwargs["local_files_only"]))
        return real(**kwargs)

    monkeypatch.setattr(weights, "hf_hub_download", spy)
    with pytest.raises(WeightsUnavailableError):
        resolve_hf_file(REPO, FILENAME)
    assert seen == [True]


def test_checkpoint_wins_over_the_hub_and_must_exist(
    offline_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "local" / "mimi.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"local weights")
    found = locate_pretrained(checkpoint=str(ckpt), hf_repo=REPO, filename=FILENAME)
    assert found.path == ckpt
    assert found.provenance == {
        "source": str(ckpt.resolve()),
        "pretrained": True,
        "sha256": hashlib.sha256(b"local weights").hexdigest(),
    }
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_checkpoint("~/local/mimi.safetensors") == ckpt

    missing = tmp_path / "nowhere" / "tokenizer.safetensors"
    with pytest.raises(FileNotFoundError, match="representation.checkpoint=.*nowhere/tokenizer.safetensors"):
        locate_pretrained(checkpoint=str(missing), hf_repo=REPO, filename=FILENAME)
    with pytest.raises(FileNotFoundError, match="codec.checkpoint="):
        resolve_checkpoint(tmp_path, config_key="codec")  # a directory is not a weights file


def test_sha256_is_streamed_correctly_and_cached_per_file_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blob.bin"
    content = bytes(range(256)) * 9000  # > 1 MiB: several read chunks
    path.write_bytes(content)
    computed: list[Path] = []
    real = weights.sha256_file

    def counting(p: Path) -> str:
        computed.append(p)
        return real(p)

    monkeypatch.setattr(weights, "sha256_file", counting)
    weights._sha256_cached.cache_clear()
    assert cached_sha256(path) == hashlib.sha256(content).hexdigest()
    assert cached_sha256(str(path)) == hashlib.sha256(content).hexdigest()
    assert len(computed) == 1

    path.write_bytes(content[::-1])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cached_sha256(path) == hashlib.sha256(content[::-1]).hexdigest()
    assert len(computed) == 2


def test_seeded_init_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    with seeded_init(7):
        a = torch.nn.Linear(5, 3)
    with seeded_init(7):
        b = torch.nn.Linear(5, 3)
    with seeded_init(8):
        c = torch.nn.Linear(5, 3)
    assert torch.equal(torch.rand(4), expected_next)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_random_provenance() -> None:
    assert random_provenance(3, init="x") == {"source": "random", "pretrained": False, "seed": 3, "init": "x"}


def test_an_unresolvable_hub_is_not_asked_and_fails_fast(
    offline_hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online mode but no DNS for the hub: only the cache is consulted (no 25 s of client retries)."""
    import time

    calls: list[dict] = []
    real = weights.hf_hub_download

    def spy(**kwargs: object) -> str:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_dns(*args: object, **kwargs: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(weights.socket, "getaddrinfo", no_dns)  # no resolver is asked in the test
    monkeypatch.setattr(weights, "hf_hub_download", spy)
    assert weights.hub_resolves() is False
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="representation.checkpoint="):
        resolve_hf_file(REPO, FILENAME)
    assert time.monotonic() - t0 < 10
    assert [c["local_files_only"] for c in calls] == [True]


def test_missing_weights_message_advises_unsetting_offline_only_when_it_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in HF_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(weights, "hub_resolves", lambda timeout_s=5.0: False)
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_hf_file(REPO, FILENAME)
    message = str(info.value)
    assert "HF_HUB_OFFLINE" not in message and "local_files_only" not in message
    assert "does not resolve" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "unset HF_HUB_OFFLINE (it is set now)" in missing_weights_message(REPO, FILENAME, "x")


@pytest.mark.slow
def test_missing_weights_reach_the_user_and_the_run_record_as_readable_text(tmp_path: Path) -> None:
    """Hydra's instantiate wraps the error in a one-line repr; the CLI and run_info.json show the message."""
    from tests.conftest import REPO_ROOT

    env = {**os.environ, "LATENTDYN_ROOT": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "latentdyn", "pipeline=tests.pipelines.missing_weights", "run_id=w", "name=w"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Provide them in one of two ways:\n  1. a local file" in proc.stderr
    assert "InstantiationException" not in proc.stderr and "\\n" not in proc.stderr
    info = json.loads(next((tmp_path / "outputs").glob("*/w/w/run_info.json")).read_text())
    assert info["error"]["type"] == "WeightsUnavailableError"
    assert info["error"]["message"].startswith("pretrained weights unavailable")
    assert "\n  1. a local file" in info["error"]["message"]
