"""The HTTP status of each error the engine raises on purpose, and what a client is told
of a failure on the server's side. A WebSocket session that fails closes with 4000 + the
status an upload of the same audio would have got (:mod:`voiceprint.service.live`)."""

from __future__ import annotations

from voiceprint.engine import errors

# The HTTP status of each error the engine raises on purpose (most specific class first).
STATUS_OF: tuple[tuple[type[errors.VoiceprintError], int], ...] = (
    (errors.TooLong, 413),
    (errors.PathNotAllowed, 403),
    (errors.AudioError, 422),
    (errors.UnknownSpeaker, 404),
    (errors.UnknownVersion, 404),
    (errors.UnknownUtterance, 404),
    (errors.UnknownCluster, 404),
    (errors.DuplicateUtterance, 409),
    (errors.RefreshBusy, 409),
    (errors.UnfinishedVersion, 409),
    (errors.WeightsPruned, 409),
    (errors.NotEnoughData, 409),
    (errors.NoAudioKept, 409),
    (errors.InvalidInput, 400),
    (errors.CheckpointError, 500),
    (errors.StorageError, 503),
    (errors.VoiceprintError, 400),
)

# What a client is told of a failure on the server's side; the log has the details.
SAFE_MESSAGES = {
    500: "the server could not complete the request; its log has the details",
    503: "storage is unavailable (database unreachable or the disk full); try again later",
}


def status_of(exc: errors.VoiceprintError) -> int:
    return next(status for cls, status in STATUS_OF if isinstance(exc, cls))
