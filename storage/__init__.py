"""SQL storage of speakers, utterances, embeddings, centroids and model versions."""

from storage.records import (
    AliasMove,
    ApiKey,
    AuditEntry,
    Centroid,
    Enrollment,
    Job,
    ModelVersion,
    SpeakerSummary,
    UtteranceRecord,
)
from storage.store import Store

__all__ = [
    "AliasMove",
    "ApiKey",
    "AuditEntry",
    "Centroid",
    "Enrollment",
    "Job",
    "ModelVersion",
    "SpeakerSummary",
    "Store",
    "UtteranceRecord",
]
