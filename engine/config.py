"""Typed configuration: defaults, then ``config.toml`` in the home folder, then environment.

Environment overrides are named ``VOICEPRINT_<SECTION>__<KEY>`` (double underscore),
e.g. ``VOICEPRINT_AUDIO__MIN_SPEECH_S=2``. Unknown sections or keys are errors, in the
file and in the environment alike, so a typo never silently falls back to a default.
Every numeric key is declared with :func:`key` and the range its values must lie in, checked
whenever a section is built, so ``batch_windows = 0`` fails at load time, naming the key.
The resolved configuration is stored with every model version.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from voiceprint.engine.bounds import Bounds, flag
from voiceprint.engine.errors import ConfigError

ENV_PREFIX = "VOICEPRINT_"
REPLAY_SELECTIONS = ("reservoir", "herding")


def key(default: float, **bounds: float) -> Any:
    """A numeric key, its default and its range (the keywords of :class:`voiceprint.engine.bounds.Bounds`)."""
    return field(default=default, metadata={"bounds": Bounds(**bounds)})


class Section:
    """Checks each key declared with :func:`key` against its range whenever a section is
    built: from the file, the environment, the defaults or ``dataclasses.replace``."""

    def __post_init__(self) -> None:
        name = type(self).__name__.removesuffix("Config").lower()  # AudioConfig -> [audio]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            bounds = f.metadata.get("bounds")
            problem = bounds and bounds.problem(getattr(self, f.name))
            if problem:
                raise ConfigError(f"[{name}] {f.name} {problem}")


@dataclass(frozen=True)
class AudioConfig(Section):
    min_speech_s: float = key(1.0, at_least=0, at_most=3600)  # less speech than this after VAD is rejected
    max_duration_s: float = key(600.0, above=0, at_most=14400)  # longer inputs are rejected before being decoded
    vad_threshold: float = key(0.5, above=0, below=1)  # silero-vad speech probability
    # Quieter speech is raised to this RMS level (Resemblyzer's rule)
    target_dbfs: float = key(-30.0, at_least=-80, at_most=0)
    # Folders that audio files and stream manifests may be read from, separated by ":"
    # (os.pathsep); empty: anywhere. Paths are resolved (symlinks and "..") before the check.
    roots: str = ""


@dataclass(frozen=True)
class EncoderConfig(Section):
    name: str = "ge2e-lstm"
    device: str = "auto"  # "auto" picks CUDA when present
    batch_windows: int = key(256, at_least=1, at_most=65536)  # windows per encoder forward pass


@dataclass(frozen=True)
class ScoringConfig(Section):
    """How scores are computed and turned into decisions (README, "Scores and decisions")."""

    backend: str = "asnorm+calibrated"  # "cosine", "asnorm" or "asnorm+calibrated" (engine/scoring.py)
    # Decisions of a calibrated version: thresholds set at these false-accept rates on its
    # leave-one-out trials ("far"), or, for asnorm+calibrated only, the Bayes threshold of
    # (p_target, c_miss, c_fa) on the LLR ("cost").
    decision: str = "far"
    verify_far: float = key(0.01, above=0, below=1)  # 1:1, per trial
    identify_far: float = key(0.01, above=0, below=1)  # 1:N, per probe of a speaker who is not enrolled
    p_target: float = key(0.01, above=0, below=1)
    c_miss: float = key(1.0, above=0, at_most=1e6)
    c_fa: float = key(1.0, above=0, at_most=1e6)
    # "Unknown" when best - second best is below this (back-end's scale)
    identify_margin: float = key(0.0, at_least=0, at_most=100)
    # Calibrate again (automatically: the service worker, and the CLI after enroll/stream)
    # once the number of enrolled speakers has changed by this share of the number the
    # calibration saw. Before any calibration, thresholds come from the encoder's
    # reference measurement (README, "Scores and decisions").
    recalibrate_change: float = key(0.25, above=0, at_most=100)
    # A calibration needs this many speakers with two or more utterances: fitted on fewer
    # (10-20), the realised false-accept rates on new speakers missed the request by 2-10x
    # while the reference thresholds held theirs (README, "Scores and decisions").
    min_calibration_speakers: int = key(30, at_least=2, at_most=1_000_000)
    # Subtract the mean of the version's enrolled embeddings before cosine scoring
    # (fitted with each calibration; uncalibrated versions score plain cosines).
    centre: bool = True
    cohort_per_speaker: int = key(5, at_least=1, at_most=10_000)  # stored utterances per speaker in the AS-norm cohort
    # At most this many (speakers drawn at random beyond it)
    cohort_size: int = key(5000, at_least=1, at_most=1_000_000)
    cohort_top_k: int = key(100, at_least=1, at_most=100_000)  # best cohort scores each side's statistics use
    # Smaller cohorts give no normalised scores (cosine decides); 2 for a spread
    min_cohort: int = key(50, at_least=2, at_most=1_000_000)
    # Leave-one-out probes per speaker when fitting
    calibration_probes_per_speaker: int = key(10, at_least=1, at_most=10_000)
    # A larger population is fitted on this many of its speakers, drawn at random (seeded
    # by the version): the fit's cost stays bounded, and the identify threshold grows from
    # their number to the gallery's as it does for speakers enrolled after a fit
    calibration_speakers: int = key(5000, at_least=2, at_most=10_000_000)
    # K-means prototypes per speaker scored besides the mean; 0: mean only
    prototypes: int = key(0, at_least=0, at_most=64)

    def __post_init__(self) -> None:
        super().__post_init__()
        from voiceprint.engine.scoring import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(f"[scoring] backend={self.backend!r}; valid: {list(BACKENDS)}")
        if self.decision not in ("far", "cost"):
            raise ConfigError(f"[scoring] decision={self.decision!r}; valid: ['cost', 'far']")
        if self.decision == "cost" and self.backend != "asnorm+calibrated":
            raise ConfigError("[scoring] decision='cost' needs backend='asnorm+calibrated' (only LLRs have costs)")


@dataclass(frozen=True)
class DiarizationConfig(Section):
    """Who spoke when in long recordings (README, "Diarization")."""

    max_duration_s: float = key(14400.0, above=0, at_most=86400)  # longer recordings are refused from the header
    window_step_s: float = key(0.5, at_least=0.1, at_most=5)  # one embedding window (1.6 s for GE2E) every this many seconds of speech
    clustering: str = "ahc"  # ahc (agglomerative, stops at a distance) or spectral (eigengap count)
    # Cosine distance at which agglomerative clustering stops merging windows into one
    # speaker, when the number of speakers is not given (measured: bench/conversations.py)
    threshold: float = key(0.4, above=0, below=2)
    join_gap_s: float = key(0.5, at_least=0, at_most=10)  # a pause up to this long stays inside one speaker's segment
    min_speaker_s: float = key(2.0, at_least=0, at_most=600)  # a cluster with less speech joins its nearest neighbour
    max_speakers: int = key(20, at_least=1, at_most=1000)  # the most --speakers and the spectral estimate may give


@dataclass(frozen=True)
class UnlabeledConfig(Section):
    """Utterances without a speaker, grouped into proposed new speakers (README, "New speakers in the unlabeled stream")."""

    # Cosine distance at which agglomerative clustering stops merging utterances into one
    # speaker (measured: bench/discovery.py)
    threshold: float = key(0.2, above=0, below=2)
    min_utterances: int = key(3, at_least=1, at_most=1_000_000)  # a cluster needs this many to be proposed
    min_speech_s: float = key(8.0, at_least=0, at_most=86400)  # ... and this much speech


@dataclass(frozen=True)
class EnrollmentConfig(Section):
    """What an enrollment must pass to join a profile (README, "Enrollment feedback")."""

    required_speech_s: float = key(30.0, above=0, at_most=86400)  # speech per speaker the progress figure counts toward
    max_clipping_ratio: float = key(0.01, at_least=0, at_most=1)  # more clipped samples than this: CLIPPED
    min_snr_db: float = key(10.0, at_least=-50, at_most=100)  # a lower estimated SNR: TOO_NOISY
    consistency_check: bool = True  # hold utterances that do not sound like the profile
    consistency_min_count: int = key(2, at_least=1, at_most=1_000_000)  # profiles with fewer utterances are not checked
    # Calibrated versions set the cosine cut where this fraction of genuine leave-one-out
    # trials would be held (so about 1 in 50 of a speaker's own utterances needs review).
    consistency_hold_rate: float = key(0.02, at_least=0, below=1)
    # Cosine cut until the version is calibrated (calibrated: about 0.73 on speechocean762)
    consistency_threshold: float = key(0.7, at_least=-1, at_most=1)
    # At least this cosine to one of the speaker's stored utterances: the same recording in
    # another encoding, refused as a duplicate; 0 turns it off. Measured (pretrained GE2E):
    # two different utterances of one speaker reach 0.964 (vctk-4) and 0.982 (LibriSpeech);
    # a WAV copy of a FLAC scores 1.0, MP3 / Vorbis copies 0.966-1.0 (most above this cut),
    # 8 kHz or gain-changed copies as low as 0.78: only a fingerprint could catch those.
    duplicate_cosine: float = key(0.995, at_least=0, at_most=1)


@dataclass(frozen=True)
class RefreshConfig(Section):
    """How a refresh trains, what it replays, and the gate a candidate must pass (README, "Refresh")."""

    loss: str = "aam-softmax"  # any name in the loss registry (classification losses get a head)
    steps: int = key(100, at_least=1, at_most=1_000_000)  # optimiser steps per refresh
    time_budget_s: float = key(1800.0, above=0, at_most=7 * 86400)  # training stops early when this is spent
    lr: float = key(1e-4, above=0, at_most=1)  # Adam learning rate of the encoder
    # Lower encoder layers kept as the parent's (GE2E: 3 LSTM layers, then the projection).
    frozen_layers: int = key(0, at_least=0, at_most=64)  # the encoder refuses more than it has
    # L2-SP (Li et al., 2018): this weight times the squared distance of the trained
    # weights from the parent's is added to the loss, so fine-tuning cannot wander far.
    l2sp_weight: float = key(0.0, at_least=0, at_most=1e6)  # 0: off
    # WiSE-FT (Wortsman et al., 2022): the candidate becomes (1 - a) * parent + a * tuned,
    # a in 0.25 / 0.5 / 0.75 / 1 chosen by the gate's unseen speakers (README, "Refresh").
    interpolate: bool = False
    # LoRA (Hu et al., 2021): only rank-r updates B A of the trained weight matrices learn,
    # merged into the weights afterwards; 0: off (every weight of the unfrozen layers learns).
    lora_rank: int = key(0, at_least=0, at_most=4096)
    loss_lr: float = key(1e-2, above=0, at_most=10)  # of the loss's own parameters (heads, GE2E scale and bias)
    speakers_per_batch: int = key(16, at_least=2, at_most=4096)  # N (fewer when fewer speakers qualify)
    utterances_per_speaker: int = key(4, at_least=2, at_most=1024)  # M: crops per speaker in a batch
    distill_weight: float = key(1.0, at_least=0, at_most=1e6)  # pull toward the parent's embeddings on replayed crops
    # Utterances kept in the replay reservoir; 0: no replay (new data only)
    replay_size: int = key(1000, at_least=0, at_most=10_000_000)
    # Which old utterances fill it: "reservoir" (a uniform sample per speaker) or
    # "herding" (per speaker, those whose mean under the parent tracks the speaker's mean)
    replay_selection: str = "reservoir"
    # Cap on new utterances loaded for training (the newest are kept)
    max_new: int = key(2000, at_least=1, at_most=10_000_000)
    holdout_fraction: float = key(0.2, above=0, below=1)  # of each speaker's utterances, never trained on, for the gate
    # Whole speakers, chosen by a hash of the name, never trained on: the gate judges on
    # them what a refresh does to people it has not seen (at least 2 must fall in the slice).
    unseen_speaker_fraction: float = key(0.1, at_least=0, below=1)
    # Fewer held-out utterances than this: the gate cannot judge, reject
    min_holdout: int = key(5, at_least=1, at_most=1_000_000)
    # The gate: a candidate must separate held-out trials better (d'), and may lose at
    # most this much top-1 accuracy and EER, overall and on old speakers.
    accuracy_tolerance: float = key(0.03, at_least=0, at_most=1)
    eer_tolerance: float = key(0.01, at_least=0, at_most=1)
    noise_dir: str = ""  # folder of noise recordings to mix in (augmentation); empty: off
    noise_snr_db: float = key(10.0, at_least=-20, at_most=80)  # mean SNR of the mixed noise (uniform +/- 5 dB)
    seed: int = key(0, at_least=0, at_most=2**32 - 1)  # numpy's seeds are 32-bit
    gate: bool = True  # false promotes every candidate whatever its metrics (for experiments only)
    # ADWIN confidence on genuine enrollment scores; 0 turns drift requests off
    drift_delta: float = key(0.002, at_least=0, below=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.replay_selection not in REPLAY_SELECTIONS:
            raise ConfigError(f"[refresh] replay_selection={self.replay_selection!r}; valid: {list(REPLAY_SELECTIONS)}")


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """What is kept of an enrolled utterance besides its embeddings (README, "Privacy")."""

    # "audio": the 16 kHz speech (FLAC); "features": only the encoder's input features,
    # so no playable recording is kept (trade-offs in the README).
    keep: str = "audio"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep not in ("audio", "features"):
            raise ConfigError(f"[privacy] keep={self.keep!r}; valid: ['audio', 'features']")


@dataclass(frozen=True)
class ServiceConfig(Section):
    """``voiceprint serve``: the HTTP API (README, "The HTTP service")."""

    host: str = "127.0.0.1"
    port: int = key(8080, at_least=0, at_most=65535)  # 0: a free one (serve prints it)
    max_request_bytes: int = key(16 * 1024 * 1024, at_least=1, at_most=2**31)  # larger bodies get 413 before being read
    # POST /v1/diarize/jobs: a long recording streamed to disk, up to this many bytes (413 past it)
    max_upload_bytes: int = key(2 * 1024**3, at_least=1, at_most=2**40)
    # PyTorch threads of the thread that runs diarization jobs, one job at a time
    diarize_threads: int = key(1, at_least=1, at_most=1024)
    # Longer uploads get 413 (the smaller of this and [audio] max_duration_s)
    max_audio_s: float = key(300.0, above=0, at_most=14400)
    # How often the service looks for queued refresh requests
    refresh_check_s: float = key(5.0, at_least=0.1, at_most=86400)
    # The most candidates POST /v1/identify returns: a larger ``top`` would let a query key
    # list the enrolled names (README, "Keys and roles").
    max_top: int = key(5, at_least=1, at_most=1000)
    # The most files one POST /v1/identify/batch may carry (the body stays under max_request_bytes)
    max_batch_files: int = key(16, at_least=1, at_most=1000)
    # PyTorch threads per request. Requests run side by side in a thread pool; one thread
    # each keeps their OpenMP teams from spinning against each other on the same cores
    # (2 cores, 8 clients: 40 identify/s with 1, 34 with 2; one client: the same).
    torch_threads: int = key(1, at_least=1, at_most=1024)


@dataclass(frozen=True)
class LiveConfig(Section):
    """Live audio over WebSocket (README, "Live audio"); a session's audio is also bounded
    by ``[audio] max_duration_s`` (and, under ``voiceprint serve``, ``[service] max_audio_s``)."""

    max_sessions: int = key(32, at_least=1, at_most=100_000)  # open sessions per process; more are refused (4503)
    idle_timeout_s: float = key(10.0, above=0, at_most=3600)  # no message for this long: closed (4408)
    max_session_s: float = key(600.0, above=0, at_most=86400)  # wall-clock length of one session (4408 past it)
    # PCM bytes one session may send (4413 past it), whatever its rate and format allow in time
    max_session_bytes: int = key(64 * 1024 * 1024, at_least=1, at_most=2**34)
    # identify / verify: a running answer each time this much more speech has arrived (and at
    # least a quarter more than at the last one, so a long session is not re-read every second)
    partial_every_s: float = key(1.0, above=0, at_most=3600)
    # enrollment: the speech so far checked against the profile each time this much more has arrived (idem)
    check_every_s: float = key(3.0, above=0, at_most=3600)


@dataclass(frozen=True)
class IndexConfig(Section):
    """The 1:N index each process holds per version, kept current from the database's
    centroid change feed (README, "The 1:N index")."""

    # Another process's enrollments reach this one's answers within this many seconds
    # (its own at once): the feed is read at most this often, one indexed query.
    refresh_s: float = key(0.5, at_least=0, at_most=3600)
    # From this many speakers a version is searched through an approximate index (FAISS
    # inverted lists, candidates rescored exactly) instead of scoring every profile: on one
    # core, exact search of 1e5 speakers took 9 ms (p50), the approximate one 0.6 ms.
    approximate_from: int = key(50_000, at_least=1, at_most=1_000_000_000)
    # From this many speakers a new scoring state (a calibration, an erasure, a promoted
    # version) is indexed in the background while the index before it keeps answering;
    # smaller galleries are indexed before the next answer.
    background_from: int = key(20_000, at_least=1, at_most=1_000_000_000)


@dataclass(frozen=True)
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    diarization: DiarizationConfig = field(default_factory=DiarizationConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

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
            elif expected is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)  # int() would quietly drop the fraction of 2.5
            else:
                kwargs[key] = expected(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise ConfigError(f"{origin}: {key}={value!r} is not a valid {expected.__name__}") from None
    return section_cls(**kwargs)


def _section_classes() -> dict[str, type]:
    """Each ``[section]`` name and the dataclass its keys are built into."""
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def flag_for(section: str, name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` refusing what ``[section] name`` refuses (``serve --port``)."""
    section_cls = _section_classes()[section]
    declared = {f.name: f for f in dataclasses.fields(section_cls)}[name]
    return flag(declared.metadata["bounds"], type(declared.default))


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
        _check_variable(name, section, key, value)
        data.setdefault(section, {})[key] = value
    return Config.from_dict(data, origin=str(path) if path else "environment")


def _check_variable(name: str, section: str, key: str, value: str) -> None:
    """An environment override checked on its own, so that a mistake in it names the
    variable, not the config file it would have overridden."""
    sections = _section_classes()
    if section not in sections:
        raise ConfigError(f"environment variable {name}: no section [{section}]; valid: {sorted(sections)}")
    try:
        _build_section(sections[section], {key: value}, f"environment variable {name}")
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith("environment variable") else f"environment variable {name}: {message}") from None
