"""SQL storage of speakers, utterances, embeddings, centroids and model versions."""

from storage.records import (
    AliasMove,
    Centroid,
    Enrollment,
    ModelVersion,
    SpeakerSummary,
    UtteranceRecord,
)
from storage.store import Store

__all__ = [
    "AliasMove",
    "Centroid",
    "Enrollment",
    "ModelVersion",
    "SpeakerSummary",
    "Store",
    "UtteranceRecord",
]
