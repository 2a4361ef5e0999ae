"""A deterministic multi-speaker, speech-like corpus generated in code (the offline default).

Every pipeline and the quickstart run on this corpus, and dynamics models are trained on its
latents, so the audio has real temporal structure: an utterance is a Markov sequence of
segments — voiced vowel-like segments (a Rosenberg glottal pulse train following a smooth pitch
contour, through a cascade of formant resonators whose targets glide between vowels),
fricative-like band-passed noise, plosive bursts and pauses — under attack/decay envelopes and an
utterance-level amplitude contour. Each speaker has its own pitch range, vocal-tract scaling,
speaking rate and breathiness.

Determinism: every random draw comes from ``np.random.default_rng([seed, s])`` (speaker ``s``'s
voice) or ``np.random.default_rng([seed, s, u])`` (its utterance ``u``), never global state, so
the same parameters give byte-identical files and an identical index.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal
from tqdm import tqdm

from latentdyn.data.corpus import Utterance

#: F0 bounds of each gender, Hz; a speaker's own range lies inside its gender's.
GENDER_F0_RANGE: dict[str, tuple[float, float]] = {"M": (85.0, 155.0), "F": (165.0, 255.0)}

#: Vocal-tract scaling factor bounds per gender (multiplies every formant frequency).
GENDER_TRACT_RANGE: dict[str, tuple[float, float]] = {"M": (0.85, 1.02), "F": (1.0, 1.15)}

#: F1, F2, F3 (Hz) of ten American English vowels, adult male averages (Peterson & Barney 1952).
VOWEL_FORMANTS: np.ndarray = np.array(
    [
        [270.0, 2290.0, 3010.0],  # i  (beet)
        [390.0, 1990.0, 2550.0],  # ɪ  (bit)
        [530.0, 1840.0, 2480.0],  # ɛ  (bet)
        [660.0, 1720.0, 2410.0],  # æ  (bat)
        [730.0, 1090.0, 2440.0],  # ɑ  (father)
        [570.0, 840.0, 2410.0],  # ɔ  (bought)
        [440.0, 1020.0, 2240.0],  # ʊ  (book)
        [300.0, 870.0, 2240.0],  # u  (boot)
        [640.0, 1190.0, 2390.0],  # ʌ  (but)
        [490.0, 1350.0, 1690.0],  # ɝ  (bird)
    ]
)

#: Fourth formant (Hz, before tract scaling) and the formant bandwidths F1..F4 (Hz).
F4_HZ = 3500.0
FORMANT_BANDWIDTHS_HZ: np.ndarray = np.array([80.0, 110.0, 160.0, 250.0])

#: Segment kinds and the Markov chain over them (rows: previous kind, columns: next kind).
VOICED, FRICATIVE, PLOSIVE, PAUSE = 0, 1, 2, 3
_TRANSITIONS: np.ndarray = np.array(
    [
        [0.30, 0.30, 0.25, 0.15],  # after a vowel: glide to another vowel, or a consonant / pause
        [0.85, 0.00, 0.05, 0.10],  # after a fricative: mostly a vowel
        [0.90, 0.05, 0.00, 0.05],  # after a plosive: mostly a vowel
        [0.50, 0.25, 0.25, 0.00],  # after a pause: a new phrase
    ]
)
#: Segment duration bounds per kind, seconds, at speaking rate 1.
_SEGMENT_DURATION_S: dict[int, tuple[float, float]] = {
    VOICED: (0.08, 0.30),
    FRICATIVE: (0.06, 0.18),
    PLOSIVE: (0.05, 0.10),
    PAUSE: (0.10, 0.30),
}
#: Length of one block of the time-varying formant filter, samples (formants are constant inside).
_FILTER_BLOCK = 64


@dataclass(frozen=True)
class SpeakerProfile:
    """The voice of one synthetic speaker.

    Attributes:
        gender: ``"M"`` or ``"F"``.
        f0_low, f0_high: the speaker's pitch range, Hz (inside :data:`GENDER_F0_RANGE`).
        tract_factor: multiplies every formant frequency (shorter tract → higher formants).
        speaking_rate: divides segment durations (1 = nominal).
        breathiness: aspiration noise mixed into the glottal source, as a fraction of its RMS.
    """

    gender: str
    f0_low: float
    f0_high: float
    tract_factor: float
    speaking_rate: float
    breathiness: float


def speaker_gender(speaker_index: int) -> str:
    """Gender of speaker ``speaker_index``: alternating ``M``/``F`` so any corpus is balanced."""
    return "M" if speaker_index % 2 == 0 else "F"


def speaker_profile(seed: int, speaker_index: int) -> SpeakerProfile:
    """Draw the voice of speaker ``speaker_index`` from ``default_rng([seed, speaker_index])``."""
    rng = np.random.default_rng([seed, speaker_index])
    gender = speaker_gender(speaker_index)
    g_low, g_high = GENDER_F0_RANGE[gender]
    # A range ±~15 % around a centre drawn so that it stays inside the gender's bounds.
    half_width = float(rng.uniform(0.10, 0.18))
    centre = float(rng.uniform(g_low / (1.0 - half_width), g_high / (1.0 + half_width)))
    t_low, t_high = GENDER_TRACT_RANGE[gender]
    return SpeakerProfile(
        gender=gender,
        f0_low=centre * (1.0 - half_width),
        f0_high=centre * (1.0 + half_width),
        tract_factor=float(rng.uniform(t_low, t_high)),
        speaking_rate=float(rng.uniform(0.8, 1.25)),
        breathiness=float(rng.uniform(0.02, 0.25)),
    )


def _smooth_noise(rng: np.random.Generator, n_samples: int, sample_rate: int, rate_hz: float) -> np.ndarray:
    """Zero-mean, unit-ish amplitude random contour of ``n_samples`` varying at about ``rate_hz``.

    Random knots every ``1 / rate_hz`` seconds joined by cubic (C1) interpolation.
    """
    n_knots = max(2, int(math.ceil(n_samples / sample_rate * rate_hz)) + 2)
    knots = rng.uniform(-1.0, 1.0, n_knots)
    x = np.linspace(0.0, n_knots - 1.0, n_samples)
    i = np.minimum(x.astype(np.int64), n_knots - 2)
    t = x - i
    h = t * t * (3.0 - 2.0 * t)  # smoothstep: zero slope at every knot
    return knots[i] * (1.0 - h) + knots[i + 1] * h


def _plan_segments(
    rng: np.random.Generator, n_samples: int, sample_rate: int, speaking_rate: float
) -> list[tuple[int, int, int]]:
    """Segment plan ``[(kind, start, stop), ...]`` covering ``[0, n_samples)`` in samples.

    Starts and ends with a pause (leading/trailing silence); inside, kinds follow the Markov
    chain :data:`_TRANSITIONS` and durations are uniform per kind, divided by the speaking rate.
    """
    edge_max = 0.2 * n_samples  # leading/trailing silence leave at least 60 % for speech
    lead = int(min(rng.uniform(0.08, 0.25) * sample_rate, edge_max))
    trail = int(min(rng.uniform(0.08, 0.25) * sample_rate, edge_max))
    end = n_samples - trail
    segments = [(PAUSE, 0, lead)]
    kind, pos = PAUSE, lead
    min_len = int(0.04 * sample_rate)
    while pos < end:
        kind = int(rng.choice(4, p=_TRANSITIONS[kind]))
        lo, hi = _SEGMENT_DURATION_S[kind]
        length = int(rng.uniform(lo, hi) / speaking_rate * sample_rate)
        stop = min(pos + length, end)
        if end - stop < min_len:  # no sliver before the trailing pause
            stop = end
        segments.append((kind, pos, stop))
        pos = stop
    segments.append((PAUSE, end, n_samples))
    return segments


def _raised_cosine_envelope(n: int, attack: int, decay: int) -> np.ndarray:
    """Envelope of ``n`` samples: raised-cosine rise over ``attack``, flat 1, fall over ``decay``."""
    env = np.ones(n)
    attack, decay = min(attack, n // 2), min(decay, n // 2)
    if attack > 0:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(attack) + 0.5) / attack)
    if decay > 0:
        env[n - decay :] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(decay) + 0.5) / decay)
    return env


def _pitch_contour(
    rng: np.random.Generator, n_samples: int, sample_rate: int, profile: SpeakerProfile
) -> np.ndarray:
    """F0 per sample, Hz: declination plus slow random modulation, inside the speaker's range."""
    span = math.log(profile.f0_high / profile.f0_low)
    # Log-F0 relative to f0_low: start high, decline, modulate (intonation), clip to the range.
    start = span * rng.uniform(0.55, 0.85)
    declination = span * rng.uniform(0.15, 0.35)
    t = np.linspace(0.0, 1.0, n_samples)
    modulation = 0.25 * span * _smooth_noise(rng, n_samples, sample_rate, rate_hz=3.0)
    log_f0 = np.clip(start - declination * t + modulation, 0.0, span)
    return profile.f0_low * np.exp(log_f0)


def _glottal_source(
    rng: np.random.Generator, f0: np.ndarray, sample_rate: int, breathiness: float
) -> np.ndarray:
    """Rosenberg glottal-flow derivative driven by ``f0`` (Hz per sample), plus aspiration noise.

    The flow rises as a half cosine over 40 % of each cycle, closes over 16 %, stays shut for the
    rest; its derivative (the flow seen through lip radiation) has the -6 dB/oct harmonic spectrum
    of voiced speech. Aspiration is white noise gated by the open phase.
    """
    phase = np.cumsum(f0 / sample_rate) + rng.uniform()
    phase -= np.floor(phase)
    t_open, t_close = 0.40, 0.16
    flow = np.where(
        phase < t_open,
        0.5 - 0.5 * np.cos(np.pi * phase / t_open),
        np.where(phase < t_open + t_close, np.cos(0.5 * np.pi * (phase - t_open) / t_close), 0.0),
    )
    pulse = np.diff(flow, prepend=flow[0])
    pulse /= np.sqrt(np.mean(pulse**2)) + 1e-12
    aspiration = rng.standard_normal(f0.size) * (0.3 + flow)
    return pulse + breathiness * aspiration


def _formant_tracks(
    rng: np.random.Generator,
    segments: list[tuple[int, int, int]],
    n_samples: int,
    tract_factor: float,
) -> np.ndarray:
    """Formant frequencies F1..F4 per sample, Hz, shape ``(n_samples, 4)``.

    Each voiced segment gets a random vowel target (scaled by the tract factor, jittered ±4 %),
    held over its middle half; the tracks glide linearly between consecutive targets, so vowel
    sequences have smooth transitions.
    """
    knots_t: list[float] = []
    knots_f: list[np.ndarray] = []
    for kind, start, stop in segments:
        if kind != VOICED:
            continue
        vowel = VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))]
        target = np.append(vowel, F4_HZ) * tract_factor * rng.uniform(0.96, 1.04, 4)
        quarter = (stop - start) / 4.0
        knots_t += [start + quarter, stop - quarter]
        knots_f += [target, target]
    if not knots_t:  # an utterance without vowels: a neutral (schwa-like) tract
        knots_t, knots_f = [0.0], [np.array([500.0, 1500.0, 2500.0, F4_HZ]) * tract_factor]
    t = np.arange(n_samples)
    f = np.stack(knots_f)
    return np.stack([np.interp(t, knots_t, f[:, j]) for j in range(4)], axis=1)


def _formant_filter(source: np.ndarray, formants: np.ndarray, sample_rate: int) -> np.ndarray:
    """Filter ``source`` (S,) through a cascade of 4 time-varying formant resonators.

    Each resonator is a second-order IIR (Klatt): poles at radius ``exp(-pi B / sr)`` and angle
    ``2 pi F / sr``, numerator set for unity gain at DC so the cascade keeps the source's level.
    Coefficients are recomputed every :data:`_FILTER_BLOCK` samples from the per-sample formant
    tracks ``formants`` (S, 4), carrying the filter state across blocks (stretches with zero input
    and a rung-out state are skipped: their output is zero to ~1e-7 of the peak); formants at or above
    0.95 Nyquist are dropped (their resonators pass the signal unchanged).
    """
    n_samples = source.size
    starts = np.arange(0, n_samples, _FILTER_BLOCK)
    centre = np.minimum(starts + _FILTER_BLOCK // 2, n_samples - 1)
    freqs = formants[centre]  # (n_blocks, 4)
    radius = np.exp(-np.pi * FORMANT_BANDWIDTHS_HZ / sample_rate) * np.ones_like(freqs)
    theta = 2.0 * np.pi * freqs / sample_rate
    a1 = -2.0 * radius * np.cos(theta)
    a2 = radius**2
    b0 = 1.0 + a1 + a2
    active = freqs < 0.95 * (sample_rate / 2.0)
    a1, a2, b0 = np.where(active, a1, 0.0), np.where(active, a2, 0.0), np.where(active, b0, 1.0)
    zeros = np.zeros_like(b0)
    sos = np.stack([b0, zeros, zeros, np.ones_like(b0), a1, a2], axis=-1)  # (n_blocks, 4, 6)
    out = np.zeros_like(source)
    zi = np.zeros((4, 2))
    scale = np.max(np.abs(source)) + 1e-30
    for k, start in enumerate(starts):
        block = slice(start, start + _FILTER_BLOCK)
        # Skip blocks with no input once the resonators have rung out (pauses, consonants).
        if np.max(np.abs(zi)) < 1e-7 * scale and not source[block].any():
            continue
        out[block], zi = signal.sosfilt(sos[k], source[block], zi=zi)
    return out


def _fricative(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Fricative-like noise of ``n`` samples: white noise band-passed inside 2–7 kHz.

    The band imitates /s/ (high, narrow-ish), /ʃ/ (lower) or /f/ (broad); band edges are clipped
    below Nyquist so low sample rates still work.
    """
    kind = rng.integers(3)
    lo, hi = [(4000.0, 7000.0), (2000.0, 4000.0), (2000.0, 7000.0)][kind]
    lo, hi = lo * rng.uniform(0.9, 1.1), hi * rng.uniform(0.9, 1.1)
    nyquist = sample_rate / 2.0
    hi = min(hi, 0.95 * nyquist)
    lo = min(lo, 0.6 * hi)
    sos = signal.butter(2, [lo, hi], btype="bandpass", fs=sample_rate, output="sos")
    noise = signal.sosfilt(sos, rng.standard_normal(n))
    level = (1.0, 1.2, 0.4)[kind]  # ~5-10 dB below a vowel for sibilants, ~15-20 dB for /f/
    return level * noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _plosive(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Plosive of ``n`` samples: a silent closure, then a broadband burst decaying in ~5–15 ms."""
    closure = int(n * rng.uniform(0.4, 0.7))
    burst_len = n - closure
    tau = rng.uniform(0.005, 0.015) * sample_rate
    burst = rng.standard_normal(burst_len) * np.exp(-np.arange(burst_len) / tau)
    # A first-difference tilts the burst towards high frequencies, like a release transient.
    burst = np.diff(burst, prepend=0.0) * rng.uniform(0.15, 0.35)
    return np.concatenate([np.zeros(closure), burst])


def generate_utterance(
    profile: SpeakerProfile,
    rng: np.random.Generator,
    duration: float,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Synthesise one utterance of ``round(duration * sample_rate)`` samples.

    Args:
        profile: the speaker's voice.
        rng: the utterance's generator (all randomness comes from it).
        duration: seconds (at least 0.5 s so there is room for speech between the edge pauses).
        sample_rate: Hz.

    Returns:
        ``(S,)`` float32 in ``[-1, 1]``, peak normalised to a random level in ``[0.5, 0.9]``,
        with a noise floor ~55–65 dB below the peak (so pauses are quiet but never digital zero).
    """
    if duration < 0.5:
        raise ValueError(f"duration must be at least 0.5 s, got {duration}")
    n = int(round(duration * sample_rate))
    segments = _plan_segments(rng, n, sample_rate, profile.speaking_rate)

    f0 = _pitch_contour(rng, n, sample_rate, profile)
    source = _glottal_source(rng, f0, sample_rate, profile.breathiness)
    voicing = np.zeros(n)
    noise = np.zeros(n)
    ms = sample_rate / 1000.0
    for kind, start, stop in segments:
        length = stop - start
        gain = rng.uniform(0.6, 1.0)
        if kind == VOICED:
            attack, decay = int(rng.uniform(15, 40) * ms), int(rng.uniform(20, 60) * ms)
            voicing[start:stop] = gain * _raised_cosine_envelope(length, attack, decay)
        elif kind == FRICATIVE:
            attack, decay = int(rng.uniform(10, 30) * ms), int(rng.uniform(10, 30) * ms)
            env = _raised_cosine_envelope(length, attack, decay)
            noise[start:stop] = gain * env * _fricative(rng, length, sample_rate)
        elif kind == PLOSIVE:
            noise[start:stop] = gain * _plosive(rng, length, sample_rate)
    formants = _formant_tracks(rng, segments, n, profile.tract_factor)
    voiced = _formant_filter(source * voicing, formants, sample_rate)

    # Utterance-level contour: slow loudness variation with a 2–6 dB downward drift.
    t = np.linspace(0.0, 1.0, n)
    drift_db = rng.uniform(2.0, 6.0)
    contour = 10.0 ** ((-drift_db * t + 2.0 * _smooth_noise(rng, n, sample_rate, rate_hz=1.5)) / 20.0)
    wave = (voiced + noise) * contour

    peak = max(float(np.max(np.abs(wave))), 1e-6)
    floor_db = rng.uniform(55.0, 65.0)
    wave = wave + peak * 10.0 ** (-floor_db / 20.0) * rng.standard_normal(n)
    wave *= rng.uniform(0.5, 0.9) / np.max(np.abs(wave))
    return wave.astype(np.float32)


@dataclass
class SyntheticCorpus:
    """Parameters of the synthetic corpus; :meth:`materialize` writes it to disk.

    Speaker ``s`` is ``f"s{s:03d}"`` with gender :func:`speaker_gender` and voice
    :func:`speaker_profile`; its utterance ``u`` is ``f"{speaker}-0-{u:04d}"`` (LibriSpeech style),
    of duration uniform in ``[min_duration, max_duration]`` seconds.
    """

    n_speakers: int = 24
    utterances_per_speaker: int = 10
    sample_rate: int = 16000
    min_duration: float = 2.0
    max_duration: float = 5.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.n_speakers < 1 or self.utterances_per_speaker < 1:
            raise ValueError(
                f"need at least one speaker and one utterance per speaker, got n_speakers={self.n_speakers}, "
                f"utterances_per_speaker={self.utterances_per_speaker}"
            )
        if not 0.5 <= self.min_duration <= self.max_duration:
            raise ValueError(
                f"need 0.5 <= min_duration <= max_duration (seconds), got {self.min_duration}, {self.max_duration}"
            )
        if self.sample_rate < 8000:
            raise ValueError(f"sample_rate must be at least 8000 Hz, got {self.sample_rate}")

    def _utterance_rng(self, speaker_index: int, utterance_index: int) -> tuple[np.random.Generator, int]:
        """The utterance's generator and its length in samples (the first draw from it)."""
        rng = np.random.default_rng([self.seed, speaker_index, utterance_index])
        lo = math.ceil(self.min_duration * self.sample_rate)
        hi = math.floor(self.max_duration * self.sample_rate)
        return rng, int(rng.integers(lo, hi + 1))

    def utterance_audio(self, speaker_index: int, utterance_index: int) -> np.ndarray:
        """Audio of one utterance, ``(S,)`` float32, exactly as :meth:`materialize` writes it."""
        rng, n = self._utterance_rng(speaker_index, utterance_index)
        profile = speaker_profile(self.seed, speaker_index)
        return generate_utterance(profile, rng, n / self.sample_rate, self.sample_rate)

    def materialize(self, root: Path) -> list[Utterance]:
        """Write every utterance as 16-bit PCM WAV under ``root/<speaker>/<utt_id>.wav``.

        Files are written to a temporary name and renamed, so an interrupted run leaves no
        truncated WAV behind. Returns the utterances (absolute paths) sorted by ``utt_id``.
        """
        root = Path(root).resolve()
        utterances: list[Utterance] = []
        total = self.n_speakers * self.utterances_per_speaker
        with tqdm(total=total, desc="synthetic corpus", unit="utt", file=sys.stderr) as progress:
            for s in range(self.n_speakers):
                speaker = f"s{s:03d}"
                (root / speaker).mkdir(parents=True, exist_ok=True)
                for u in range(self.utterances_per_speaker):
                    utt_id = f"{speaker}-0-{u:04d}"
                    path = root / speaker / f"{utt_id}.wav"
                    wave = self.utterance_audio(s, u)
                    tmp = path.with_name(path.name + ".tmp")
                    sf.write(tmp, wave, self.sample_rate, subtype="PCM_16", format="WAV")
                    tmp.replace(path)
                    utterances.append(
                        Utterance(
                            utt_id=utt_id,
                            speaker=speaker,
                            path=str(path),
                            duration=wave.size / self.sample_rate,
                            sample_rate=self.sample_rate,
                            gender=speaker_gender(s),
                            chapter="",
                            subset="synthetic",
                        )
                    )
                    progress.update()
        return utterances
