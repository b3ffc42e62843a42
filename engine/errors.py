"""The project's exception hierarchy.

Every error a user can cause or meet carries a stable ``code`` so the CLI and the
HTTP service can report it to machines, and a message written for a person.
Library code raises these; it never prints or exits.
"""


class VoiceprintError(Exception):
    """Base class of every error voiceprint raises on purpose."""

    code = "error"


class ConfigError(VoiceprintError):
    """A configuration file or environment override is invalid."""

    code = "config_error"


class AudioError(VoiceprintError):
    """Audio that cannot be used; nothing is stored when this is raised."""

    code = "audio_error"


class UndecodableAudio(AudioError):
    code = "undecodable_audio"


class EmptyAudio(AudioError):
    code = "empty_audio"


class NonFiniteAudio(AudioError):
    code = "non_finite_audio"


class NoSpeech(AudioError):
    code = "no_speech"


class TooShort(AudioError):
    code = "too_short"


class TooLong(AudioError):
    code = "too_long"


class Clipped(AudioError):
    """Too much of the input sits at full scale: the level was set too high."""

    code = "clipped"


class TooNoisy(AudioError):
    """The speech does not stand far enough above the background."""

    code = "too_noisy"


class NotEnoughData(VoiceprintError):
    """A fit (calibration) needs more enrolled speakers or utterances than there are."""

    code = "not_enough_data"


class NoAudioKept(VoiceprintError):
    """An utterance was kept as encoder features only (``[privacy] keep = "features"``):
    there is no recording to play back."""

    code = "no_audio_kept"


class UnknownSpeaker(VoiceprintError):
    code = "unknown_speaker"


class UnknownVersion(VoiceprintError):
    code = "unknown_version"


class WeightsPruned(VoiceprintError):
    """A version whose checkpoint was deleted by ``voiceprint prune``: its row and metrics
    remain as the record, but it can no longer embed, be evaluated or be activated."""

    code = "weights_pruned"


class UnknownName(VoiceprintError):
    """A registry lookup (encoder, frontend, loss) named something unregistered."""

    code = "unknown_name"


class CheckpointError(VoiceprintError):
    """A model checkpoint is missing, corrupted or does not match its checksum."""

    code = "checkpoint_error"


class StorageError(VoiceprintError):
    """The database refused or failed an operation."""

    code = "storage_error"


class DiskFull(StorageError):
    """No space left where the database or the checkpoints are written."""

    code = "disk_full"


class NotInitialised(StorageError):
    """The database has no active model version yet (run ``voiceprint init``)."""

    code = "not_initialised"


class SchemaOutdated(StorageError):
    """The database schema is not at the newest revision (run ``voiceprint db upgrade``)."""

    code = "schema_outdated"


class DuplicateUtterance(StorageError):
    """The same audio content was already enrolled for this speaker."""

    code = "duplicate_utterance"


class PathNotAllowed(AudioError):
    """A path outside the folders that ``[audio] roots`` allows audio to be read from."""

    code = "path_not_allowed"


class MissingAudio(AudioError):
    """The audio file named does not exist, cannot be read, or is not a regular file
    (a directory, a named pipe, a device), or the path names no file at all (a NUL byte)."""

    code = "missing_audio"


class InvalidInput(VoiceprintError):
    """An argument is malformed (an empty speaker name, a bad stream row, ...)."""

    code = "invalid_input"


class MalformedStream(InvalidInput):
    """Live audio that breaks its protocol: PCM before the start message, a partial sample
    at the end, an unknown format or rate, a message that is not what was expected."""

    code = "malformed_stream"


class UnknownUtterance(InvalidInput):
    """No stored utterance has this id (HTTP 404)."""

    code = "unknown_utterance"


class UnknownCluster(InvalidInput):
    """No cluster of unlabeled utterances has this number now (HTTP 404)."""

    code = "unknown_cluster"


class RefreshBusy(VoiceprintError):
    """Another process holds the refresh lock (a refresh or rollback is running)."""

    code = "refresh_busy"


class VersionChanged(StorageError):
    """The active version moved while this write was prepared for the previous one.

    The Engine catches it and redoes the write under the new active version.
    """

    code = "version_changed"


class IncompleteVersion(StorageError):
    """A version cannot become active: some utterances have no embedding under it yet."""

    code = "incomplete_version"


class TrainingDataErased(StorageError):
    """A candidate cannot become active: audio it was trained on was erased (or removed)
    while the refresh ran, so its weights hold what must be gone."""

    code = "training_data_erased"


class UnfinishedVersion(VoiceprintError):
    """A rollback named a candidate whose refresh stopped before promoting it: it never
    became active, so only an explicit override (``--force``) activates it."""

    code = "unfinished_version"


class IncompatibleFeatures(VoiceprintError):
    """Stored features were made by another frontend than the encoder's, so they cannot be
    embedded; only kept audio can move to an encoder with another frontend."""

    code = "incompatible_features"
