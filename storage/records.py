"""Plain, frozen values returned by the repositories of :class:`voiceprint.storage.Store`.

Callers never see ORM rows or sessions: these records stay valid after the session
that produced them is closed, and cannot be changed by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SpeakerSummary:
    name: str
    utterances: int  # in the profile (pending ones are not)
    speech_s: float  # total speech after VAD, of the utterances in the profile
    created_at: datetime
    pending: int = 0  # held for review: stored, but outside the centroid


@dataclass(frozen=True)
class UtteranceRecord:
    id: int
    speaker: str
    source: str
    content_sha256: str
    duration_s: float
    speech_s: float
    quality: dict[str, Any]
    created_at: datetime
    status: str = "enrolled"  # or "pending": held for review, outside the centroid


@dataclass(frozen=True)
class CentroidChanges:
    """A version's centroids written or deleted between two revisions of the change feed
    (:mod:`voiceprint.storage.feed`); from revision -1, every centroid of the version."""

    revision: int  # the feed's revision a reader holding these is current to
    speaker_ids: np.ndarray  # [n] int64, the rows written
    names: list[str]
    means: np.ndarray  # [n, D] float32
    removed: list[int]  # speaker ids whose centroid is gone (an erasure, a dropped version)


@dataclass(frozen=True)
class DiarizationJob:
    """A long upload being diarized in the background (``POST /v1/diarize/jobs``)."""

    id: int
    status: str  # queued / running / succeeded / failed
    owner: str  # host:pid of the server that holds the upload and runs it
    source: str
    speakers: int | None
    done: int  # progress: blocks of the recording embedded, of total
    total: int
    result: dict[str, Any]  # the diarization once succeeded; error and message once failed
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class UnlabeledRecord:
    """An utterance stored without a speaker (no audio loaded)."""

    id: int
    source: str
    content_sha256: str
    duration_s: float
    speech_s: float
    quality: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ModelVersion:
    number: int
    parent: int | None
    status: str  # candidate / active / rejected / retired
    encoder: str
    config: dict[str, Any]
    checkpoint: str
    checkpoint_sha256: str
    metrics: dict[str, Any]
    note: str | None
    created_at: datetime
    active: bool  # the "active" alias points at this version
    trained_through: int = 0  # highest utterance id its training saw; later ones are new to it


@dataclass(frozen=True)
class CheckpointBlob:
    """A checkpoint stored in the database (its bytes are read by ``Checkpoints.chunks``)."""

    sha256: str
    size_bytes: int
    chunks: int
    created_at: datetime


@dataclass(frozen=True)
class AliasMove:
    alias: str
    version: int
    previous_version: int | None
    actor: str
    reason: str
    moved_at: datetime


# eq=False: a generated __eq__ would compare numpy arrays and raise on truth testing.
@dataclass(frozen=True, eq=False)
class Centroid:
    speaker: str
    version: int
    count: int
    sum: np.ndarray  # float64
    mean: np.ndarray  # float64, sum / count


@dataclass(frozen=True, eq=False)
class Enrollment:
    utterance: UtteranceRecord
    version: int
    count: int  # utterances in the speaker's centroid after this one
    previous_mean: np.ndarray | None  # None when the speaker had no centroid at this version
    mean: np.ndarray | None  # None only for a pending first utterance (no profile yet)
    speech_s: float = 0.0  # total speech in the speaker's profile now
    similarity_before: float | None = None  # cosine to previous_mean; None when there was none

    @property
    def pending(self) -> bool:
        return self.utterance.status == "pending"


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    status: str  # queued / running / succeeded / rejected / failed / skipped
    reason: str
    owner: str | None
    version: int | None  # the candidate version it built, if any
    result: dict[str, Any]
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    dry_run: bool = False  # a refresh that trains and evaluates a candidate and stores no version


@dataclass(frozen=True)
class ApiKey:
    id: int
    prefix: str  # the key's first characters, enough to tell keys apart in a listing
    role: str  # admin / enroll / query
    note: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    action: str
    actor: str
    detail: dict[str, Any]
    at: datetime
