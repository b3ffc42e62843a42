"""SQL storage of speakers, utterances, embeddings, centroids and model versions."""

from voiceprint.storage.records import (
    AliasMove,
    ApiKey,
    AuditEntry,
    Centroid,
    CentroidChanges,
    CheckpointBlob,
    DiarizationJob,
    Enrollment,
    Job,
    ModelVersion,
    SpeakerSummary,
    UnlabeledRecord,
    UtteranceRecord,
)
from voiceprint.storage.store import Store

__all__ = [
    "AliasMove",
    "ApiKey",
    "AuditEntry",
    "Centroid",
    "CentroidChanges",
    "CheckpointBlob",
    "DiarizationJob",
    "Enrollment",
    "Job",
    "ModelVersion",
    "SpeakerSummary",
    "Store",
    "UnlabeledRecord",
    "UtteranceRecord",
]
