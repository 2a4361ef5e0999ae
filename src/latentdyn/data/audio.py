"""Loading audio files as validated mono float32 waveforms at a representation's sample rate, and the record
of files that could not be used.

Every problem with a file is raised as :class:`BadAudioError` naming the file and the reason, so
the caller (which owns the skip-or-fail policy) can report it; nothing unusable is returned. A stage that
meets a bad file (corpus indexing, latent extraction) applies ``data.on_bad_audio`` with
:func:`report_bad_file` and keeps what it skipped as :class:`BadFile` records in its artifact
(:func:`write_bad_files`), so every later run that uses the artifact can list them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from latentdyn.jsonio import write_json_atomic

log = logging.getLogger(__name__)

#: What ``data.on_bad_audio`` may say: leave a bad file out (and record it), or stop at it.
BAD_AUDIO_POLICIES = ("skip", "error")
#: The stages that read audio, in pipeline order: corpus indexing (headers), latent extraction (samples).
BAD_FILE_STAGES = ("index", "extract")
#: File name of the bad-file record in an artifact directory (corpus index, latent store).
BAD_FILES_NAME = "bad_files.json"

#: Peak absolute amplitude below which a file counts as silent.
SILENCE_PEAK = 1e-6

# Windowed-sinc settings of librosa's "kaiser_best": ~-100 dB stop band, passband to 0.95 Nyquist.
_RESAMPLE_KW = {
    "lowpass_filter_width": 64,
    "rolloff": 0.9475937167399596,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.769656459379492,
}


class BadAudioError(Exception):
    """A file that cannot be used as audio: unreadable, empty, non-finite, silent or out of range.

    Attributes:
        path: the file, as given.
        reason: what is wrong with it, in words.
        stage: the stage that met it (one of :data:`BAD_FILE_STAGES`), or ``""`` when not known.
    """

    def __init__(self, path: str | Path, reason: str, stage: str = "") -> None:
        super().__init__(str(path), reason, stage)  # all in args, so the error survives pickling
        self.path = str(path)
        self.reason = reason
        self.stage = stage

    def __str__(self) -> str:
        where = f" (found by {_STAGE_WORDS[self.stage]})" if self.stage else ""
        return f"bad audio file {self.path}: {self.reason}{where}"


_STAGE_WORDS = {"index": "corpus indexing", "extract": "latent extraction"}


@dataclass(frozen=True)
class BadFile:
    """An audio file a stage left out under ``data.on_bad_audio=skip``, and why.

    Attributes:
        path: the file.
        stage: which stage met it: ``index`` (its header is unreadable or empty) or ``extract`` (its
            samples are unusable, or too few for one latent frame).
        reason: what is wrong with it, in words.
        utt_id: its utterance id (the file stem for an indexing skip).
    """

    path: str
    stage: str
    reason: str
    utt_id: str = ""

    def __post_init__(self) -> None:
        if self.stage not in BAD_FILE_STAGES:
            raise ValueError(f"bad-file stage must be one of {BAD_FILE_STAGES}, got {self.stage!r}")

    def to_dict(self) -> dict[str, str]:
        """``{path, stage, reason, utt_id}``, as stored in :data:`BAD_FILES_NAME` and run records."""
        return asdict(self)


def check_bad_audio_policy(policy: str) -> str:
    """Return ``policy`` if it is one of :data:`BAD_AUDIO_POLICIES`, else raise a ValueError naming the option."""
    if policy not in BAD_AUDIO_POLICIES:
        raise ValueError(f"data.on_bad_audio must be one of {BAD_AUDIO_POLICIES}, got {policy!r}")
    return policy


def report_bad_file(bad: BadFile, policy: str) -> None:
    """Apply ``data.on_bad_audio`` to one bad file: raise it (``error``) or log a warning naming it (``skip``;
    the caller then keeps ``bad`` in its artifact's record)."""
    if check_bad_audio_policy(policy) == "error":
        raise BadAudioError(bad.path, bad.reason, bad.stage)
    log.warning("skipping bad audio file %s (%s) [%s]", bad.path, bad.reason, bad.stage)


def write_bad_files(bad_files: Iterable[BadFile], path: Path) -> None:
    """Write a bad-file record: a JSON list of :meth:`BadFile.to_dict`, possibly empty, atomically."""
    write_json_atomic(Path(path), [b.to_dict() for b in bad_files])


def read_bad_files(path: Path) -> list[BadFile]:
    """Read a record written by :func:`write_bad_files`.

    Raises:
        FileNotFoundError: there is no record, i.e. the artifact predates bad-file records (rebuild it with
            ``force=true``); an absent record is never taken to mean "no bad files".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this artifact has no record of the audio files it skipped"
        )
    return [BadFile(**row) for row in json.loads(path.read_text())]


def resample(wave: torch.Tensor, orig_sr: int, target_sr: int, *, pad_to_second: bool = True) -> torch.Tensor:
    """Resample ``wave`` (..., S) from ``orig_sr`` to ``target_sr`` Hz along the last axis.

    Band-limited windowed-sinc interpolation (torchaudio, Kaiser window); the output has
    ``ceil(S * target_sr / orig_sr)`` samples. Returns the input unchanged when the rates match.
    ``pad_to_second=False`` skips the padding below (same output), for callers whose lengths repeat.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wave
    # Resampling is a strided conv1d whose backend caches a plan per input length: a corpus of distinct
    # lengths would fill that cache (~170 kB a plan). Zero-padding to whole seconds bounds the number of
    # shapes; the kernel already treats samples past the end as zeros, so the cropped output is identical.
    n = wave.shape[-1]
    padded = torch.nn.functional.pad(wave, (0, (-n) % int(orig_sr) if pad_to_second else 0))
    out = AF.resample(padded, int(orig_sr), int(target_sr), **_RESAMPLE_KW)
    return out[..., : math.ceil(n * target_sr / orig_sr)]


def read_frames(path: Path, start: int = 0, frames: int = -1) -> tuple[np.ndarray, int]:
    """Read ``frames`` frames from ``start`` (default: all) of ``path`` as ``(frames, channels)`` float32 and
    its sample rate, or raise BadAudioError. Unvalidated samples: :func:`load_audio` checks them."""
    if not path.is_file():
        raise BadAudioError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        data, sample_rate = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as err:
        raise BadAudioError(path, f"unreadable ({err})") from err
    return data, int(sample_rate)


def load_audio(path: str | Path, target_sample_rate: int) -> torch.Tensor:
    """Load an audio file as a mono float32 waveform at ``target_sample_rate`` Hz.

    Channels are averaged; the sample rate is converted with :func:`resample` when it differs
    (the result is clamped to ``[-1, 1]``, which only touches the sinc's overshoot on full-scale
    input).

    Returns:
        ``(S,)`` float32 tensor with values in ``[-1, 1]``.

    Raises:
        BadAudioError: the file is missing or unreadable (corrupt, unknown format), has no samples,
            contains NaN/inf, exceeds full scale (float files with ``|x| > 1``), or is silent
            (peak below :data:`SILENCE_PEAK`).
    """
    if target_sample_rate <= 0:
        raise ValueError(f"target_sample_rate must be positive, got {target_sample_rate}")
    path = Path(path)
    data, sample_rate = read_frames(path)
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise BadAudioError(path, "empty (0 samples)")
    finite = np.isfinite(data)
    if not finite.all():
        raise BadAudioError(path, f"{int((~finite).sum())} non-finite samples (NaN/inf)")
    peak = float(np.max(np.abs(data)))
    if peak > 1.0:
        raise BadAudioError(path, f"samples outside [-1, 1] (peak {peak:.3g})")
    if peak < SILENCE_PEAK:
        what = "all zeros" if peak == 0.0 else f"peak {peak:.3g} < {SILENCE_PEAK:g}"
        raise BadAudioError(path, f"silent ({what})")
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    if sample_rate != target_sample_rate:
        wave = resample(wave, sample_rate, target_sample_rate).clamp_(-1.0, 1.0)
    return wave
