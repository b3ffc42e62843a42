"""Typed configuration: defaults, then ``config.toml`` in the home folder, then environment.

Environment overrides are named ``VOICEPRINT_<SECTION>__<KEY>`` (double underscore),
e.g. ``VOICEPRINT_AUDIO__MIN_SPEECH_S=2``. Unknown sections or keys are errors, in the
file and in the environment alike, so a typo never silently falls back to a default.
The resolved configuration is stored with every model version.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from engine.errors import ConfigError

ENV_PREFIX = "VOICEPRINT_"


@dataclass(frozen=True)
class AudioConfig:
    min_speech_s: float = 1.0  # less speech than this after VAD is rejected
    max_duration_s: float = 600.0  # longer inputs are rejected before being decoded
    vad_threshold: float = 0.5  # silero-vad speech probability
    target_dbfs: float = -30.0  # quieter speech is raised to this RMS level (Resemblyzer's rule)
    # Folders that audio files and stream manifests may be read from, separated by ":"
    # (os.pathsep); empty: anywhere. Paths are resolved (symlinks and "..") before the check.
    roots: str = ""


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "ge2e-lstm"
    device: str = "auto"  # "auto" picks CUDA when present
    batch_windows: int = 256  # windows per encoder forward pass


@dataclass(frozen=True)
class ScoringConfig:
    """How scores are computed and turned into decisions (README, "Scores and decisions")."""

    backend: str = "asnorm+calibrated"  # "cosine", "asnorm" or "asnorm+calibrated" (engine/scoring.py)
    # Decisions of a calibrated version: thresholds set at these false-accept rates on its
    # leave-one-out trials ("far"), or, for asnorm+calibrated only, the Bayes threshold of
    # (p_target, c_miss, c_fa) on the LLR ("cost").
    decision: str = "far"
    verify_far: float = 0.01  # 1:1, per trial
    identify_far: float = 0.01  # 1:N, per probe of a speaker who is not enrolled
    p_target: float = 0.01
    c_miss: float = 1.0
    c_fa: float = 1.0
    identify_margin: float = 0.0  # "unknown" when best - second best is below this (back-end's scale)
    # Cosine thresholds, used only until the active version has a calibration.
    identify_threshold: float = 0.75
    verify_threshold: float = 0.80
    # Subtract the mean of the version's enrolled embeddings before cosine scoring
    # (fitted with each calibration; uncalibrated versions score plain cosines).
    centre: bool = True
    cohort_per_speaker: int = 5  # stored utterances per speaker in the AS-norm cohort
    cohort_size: int = 5000  # at most this many (speakers drawn at random beyond it)
    cohort_top_k: int = 100  # best cohort scores each side's statistics use
    min_cohort: int = 50  # smaller cohorts give no normalised scores (cosine decides)
    calibration_probes_per_speaker: int = 10  # leave-one-out probes per speaker when fitting
    prototypes: int = 0  # k-means prototypes per speaker scored besides the mean; 0: mean only

    def __post_init__(self) -> None:
        from engine.scoring import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(f"[scoring] backend={self.backend!r}; valid: {list(BACKENDS)}")
        if self.decision not in ("far", "cost"):
            raise ConfigError(f"[scoring] decision={self.decision!r}; valid: ['cost', 'far']")
        if self.decision == "cost" and self.backend != "asnorm+calibrated":
            raise ConfigError("[scoring] decision='cost' needs backend='asnorm+calibrated' (only LLRs have costs)")
        for name in ("verify_far", "identify_far", "p_target"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"[scoring] {name} must lie strictly between 0 and 1")


@dataclass(frozen=True)
class EnrollmentConfig:
    """What an enrollment must pass to join a profile (README, "Enrollment feedback")."""

    required_speech_s: float = 30.0  # speech per speaker the progress figure counts toward
    max_clipping_ratio: float = 0.01  # more clipped samples than this: CLIPPED
    min_snr_db: float = 10.0  # a lower estimated SNR: TOO_NOISY
    consistency_check: bool = True  # hold utterances that do not sound like the profile
    consistency_min_count: int = 2  # profiles with fewer utterances are not checked
    # Calibrated versions set the cosine cut where this fraction of genuine leave-one-out
    # trials would be held (so about 1 in 50 of a speaker's own utterances needs review).
    consistency_hold_rate: float = 0.02
    consistency_threshold: float = 0.7  # cosine cut until the version is calibrated (calibrated: about 0.73 on speechocean762)


@dataclass(frozen=True)
class RefreshConfig:
    """How a refresh trains, what it replays, and the gate a candidate must pass (README, "Refresh")."""

    loss: str = "aam-softmax"  # any name in the loss registry (classification losses get a head)
    steps: int = 100  # optimiser steps per refresh
    time_budget_s: float = 1800.0  # training stops early when this is spent
    lr: float = 1e-4  # Adam learning rate of the encoder
    # Lower encoder layers kept as the parent's (GE2E: 3 LSTM layers, then the projection).
    frozen_layers: int = 0
    # L2-SP (Li et al., 2018): this weight times the squared distance of the trained
    # weights from the parent's is added to the loss, so fine-tuning cannot wander far.
    l2sp_weight: float = 0.0
    # WiSE-FT (Wortsman et al., 2022): the candidate becomes (1 - a) * parent + a * tuned,
    # a in 0.25 / 0.5 / 0.75 / 1 chosen by the gate's unseen speakers (README, "Refresh").
    interpolate: bool = False
    loss_lr: float = 1e-2  # of the loss's own parameters (heads, GE2E scale and bias)
    speakers_per_batch: int = 16  # N (fewer when fewer speakers qualify)
    utterances_per_speaker: int = 4  # M: crops per speaker in a batch
    distill_weight: float = 1.0  # pull toward the parent's embeddings on replayed crops
    replay_size: int = 1000  # utterances kept in the replay reservoir; 0: no replay (new data only)
    max_new: int = 2000  # cap on new utterances loaded for training (the newest are kept)
    holdout_fraction: float = 0.2  # of each speaker's utterances, never trained on, for the gate
    # Whole speakers, chosen by a hash of the name, never trained on: the gate judges on
    # them what a refresh does to people it has not seen (at least 2 must fall in the slice).
    unseen_speaker_fraction: float = 0.1
    min_holdout: int = 5  # fewer held-out utterances than this: the gate cannot judge, reject
    # The gate: a candidate must separate held-out trials better (d'), and may lose at
    # most this much top-1 accuracy and EER, overall and on old speakers.
    accuracy_tolerance: float = 0.03
    eer_tolerance: float = 0.01
    noise_dir: str = ""  # folder of noise recordings to mix in (augmentation); empty: off
    noise_snr_db: float = 10.0  # mean SNR of the mixed noise (uniform +/- 5 dB)
    seed: int = 0
    gate: bool = True  # false promotes every candidate whatever its metrics (for experiments only)
    drift_delta: float = 0.002  # ADWIN confidence on genuine enrollment scores; 0 turns drift requests off

    def __post_init__(self) -> None:
        if self.frozen_layers < 0:
            raise ConfigError("[refresh] frozen_layers must be >= 0")
        if self.l2sp_weight < 0:
            raise ConfigError("[refresh] l2sp_weight must be >= 0")
        if not 0.0 <= self.unseen_speaker_fraction < 1.0:
            raise ConfigError("[refresh] unseen_speaker_fraction must lie in [0, 1)")


@dataclass(frozen=True)
class PrivacyConfig:
    """What is kept of an enrolled utterance besides its embeddings (README, "Privacy")."""

    # "audio": the 16 kHz speech (FLAC); "features": only the encoder's input features,
    # so no playable recording is kept (trade-offs in the README).
    keep: str = "audio"

    def __post_init__(self) -> None:
        if self.keep not in ("audio", "features"):
            raise ConfigError(f"[privacy] keep={self.keep!r}; valid: ['audio', 'features']")


@dataclass(frozen=True)
class ServiceConfig:
    """``voiceprint serve``: the HTTP API (README, "The HTTP service")."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_request_bytes: int = 16 * 1024 * 1024  # larger bodies get 413 before being read
    max_audio_s: float = 300.0  # longer uploads get 413 (the smaller of this and [audio] max_duration_s)
    refresh_check_s: float = 5.0  # how often the service looks for queued refresh requests
    # PyTorch threads per request. Requests run side by side in a thread pool; one thread
    # each keeps their OpenMP teams from spinning against each other on the same cores
    # (2 cores, 8 clients: 40 identify/s with 1, 34 with 2; one client: the same).
    torch_threads: int = 1


@dataclass(frozen=True)
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "config") -> Config:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"{origin}: unknown section(s) {sorted(unknown)}; valid: {sorted(sections)}")
        built = {}
        for name, f in sections.items():
            section_cls = f.default_factory  # type: ignore[misc]
            values = data.get(name, {})
            if not isinstance(values, Mapping):
                raise ConfigError(f"{origin}: [{name}] must be a table of keys")
            built[name] = _build_section(section_cls, values, f"{origin} [{name}]")
        return cls(**built)


def _build_section(section_cls: type, values: Mapping[str, Any], origin: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {sorted(unknown)}; valid: {sorted(fields)}")
    kwargs = {}
    for key, value in values.items():
        expected = type(fields[key].default)
        try:
            if expected is bool and isinstance(value, str):
                kwargs[key] = value.strip().lower() in {"1", "true", "yes", "on"}
            else:
                kwargs[key] = expected(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{origin}: {key}={value!r} is not a valid {expected.__name__}") from None
    return section_cls(**kwargs)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Resolve the configuration from defaults, an optional TOML file and the environment."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None and Path(path).exists():
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        data.setdefault(section, {})[key] = value
    return Config.from_dict(data, origin=str(path) if path else "environment")
