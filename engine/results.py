"""What the engine answers: plain dataclasses shared by the facade, the CLI and the service."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from voiceprint.engine import diarization
from voiceprint.engine.index import Hit
from voiceprint.engine.errors import VoiceprintError


@dataclass(frozen=True)
class EnrollmentResult:
    """Feedback for one enrolled utterance."""

    speaker: str
    utterance_id: int
    source: str
    version: int
    speech_s: float
    quality: dict
    similarity_before: float | None  # cosine to the speaker's centroid before this utterance
    count: int  # utterances in the speaker's profile now
    feedback: str = "OK"  # or "INCONSISTENT_SPEAKER": stored pending review, outside the profile
    profile_speech_s: float = 0.0  # speech in the speaker's profile now
    progress: float = 0.0  # profile_speech_s / [enrollment] required_speech_s, at most 1


@dataclass(frozen=True)
class UnlabeledResult:
    """An utterance stored without a speaker: kept and embedded, in no profile, until a
    cluster holding it is named (``voiceprint clusters``)."""

    utterance_id: int  # in the unlabeled utterances' own numbering
    source: str
    version: int
    speech_s: float
    quality: dict
    feedback: str = "UNLABELED"


@dataclass(frozen=True)
class Cluster:
    """A group of unlabeled utterances that sound like one person (``Engine.clusters``)."""

    number: int  # the id of its first utterance: it stays while later ones join
    utterances: tuple[int, ...]  # unlabeled utterance ids, ascending
    speech_s: float
    cohesion: float  # mean cosine of its utterances to their centroid: how alike they sound
    stability: float  # share of them that stay together at a stricter threshold (1.0: none split off)
    status: str  # "proposed" (a new speaker), "known" (sounds like an enrolled one), "small" (too little yet)
    candidate: str | None  # the enrolled speaker most of its utterances are identified as, else the nearest one
    recognised: float  # share of its utterances the identify decision gives to that speaker (over 0.5: "known")
    score: float | None  # the centroid's score against that speaker, on the deciding back-end
    threshold: float | None  # the identify threshold on that back-end: below it, "not enrolled"
    backend: str = "cosine"


@dataclass(frozen=True)
class Identification:
    source: str
    version: int
    speech_s: float
    candidates: tuple[Hit, ...]  # best first, by the deciding back-end's score
    decision: str | None  # the best speaker, or None for "unknown"
    threshold: float | None  # on the deciding back-end's scale (None: nothing to decide with)
    backend: str = "cosine"  # the back-end that decided (cosine until the version is calibrated)
    reason: str = ""  # why "unknown": below the threshold, or too close to the second best
    notes: tuple[str, ...] = ()  # what the operator should know: another back-end decided, or no calibration yet


@dataclass(frozen=True)
class Segment:
    """One stretch of a recording given to one speaker."""

    start: float  # seconds from the start of the recording
    end: float
    speaker: str  # an enrolled name, or unknown-1, unknown-2, ...
    score: float | None  # the speaker's match score on the deciding back-end (None: unknown)


@dataclass(frozen=True)
class SpeakerFound:
    speaker: str
    enrolled: bool
    speech_s: float
    score: float | None  # best enrolled candidate's score on the deciding back-end
    candidate: str | None  # that candidate (for an unknown speaker: who it was nearest to)


@dataclass(frozen=True)
class Diarization:
    """Who spoke when in one recording (``Engine.diarize``)."""

    source: str
    version: int
    duration_s: float
    speech_s: float
    segments: tuple[Segment, ...]
    speakers: tuple[SpeakerFound, ...]
    backend: str  # the back-end that matched clusters to enrolled speakers
    threshold: float | None
    clustering: str
    notes: tuple[str, ...] = ()

    def rttm(self) -> str:
        return diarization.rttm([(s.start, s.end, s.speaker) for s in self.segments], self.source.rsplit("/", 1)[-1].rsplit(".", 1)[0])


@dataclass(frozen=True)
class ProbeAnswer:
    """One file's slot in a batch (``POST /v1/identify/batch``): its answer, or the error
    code and message that refused it (the rest of the batch is answered all the same)."""

    file: str
    ok: bool
    result: Identification | None = None
    error: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class Verification:
    speaker: str
    source: str
    version: int
    speech_s: float
    score: float | None  # cosine with the profile (centred when the calibration centres); None: not disclosed
    threshold: float | None  # on the deciding back-end's scale (None: nothing to decide with)
    accepted: bool
    normalised: float | None = None
    llr: float | None = None
    backend: str = "cosine"
    notes: tuple[str, ...] = ()  # as Identification.notes


@dataclass
class RefreshReport:
    """What a refresh did. ``status``: promoted, rejected, dry-run or skipped."""

    job: int
    status: str
    parent: int
    version: int | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


Outcome = EnrollmentResult | UnlabeledResult | VoiceprintError


def utterance_dict(utterance) -> dict:
    """A stored utterance as JSON-ready values; ``status`` in the words of the CLI and the
    HTTP API: "enrolled" (in the profile) or "held_for_review" (accept or remove it)."""
    held = utterance.status == "pending"
    return {
        "id": utterance.id, "speaker": utterance.speaker, "source": utterance.source,
        "status": "held_for_review" if held else "enrolled", "created_at": utterance.created_at.isoformat(),
        "duration_s": utterance.duration_s, "speech_s": utterance.speech_s, "held_for_review": held,
        "quality": utterance.quality,
    }


def job_dict(job) -> dict:
    """A job record as JSON-ready values (timestamps in ISO 8601)."""
    out = asdict(job)
    for key in ("requested_at", "started_at", "finished_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


def diarization_job_dict(job) -> dict:
    """A diarization job as JSON-ready values (timestamps in ISO 8601, progress as a pair)."""
    return {
        "id": job.id, "status": job.status, "source": job.source, "speakers": job.speakers,
        "progress": {"done": job.done, "total": job.total}, "result": job.result or None,
        **{key: (getattr(job, key).isoformat() if getattr(job, key) else None)
           for key in ("requested_at", "started_at", "finished_at")},
    }
