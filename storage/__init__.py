"""SQL storage of speakers, utterances, embeddings, centroids and model versions."""

from storage.records import (
    AliasMove,
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
    "Centroid",
    "Enrollment",
    "Job",
    "ModelVersion",
    "SpeakerSummary",
    "Store",
    "UtteranceRecord",
]
