"""What is stored of an utterance for later training and re-embedding, and its codecs.

Two kinds, by ``[privacy] keep``: the speech itself as 16-bit FLAC (``"audio"``, the
default), or only the encoder's input features (``"features"``), which cannot be played
back but still train and re-embed any encoder of the same frontend. This module is the
one place that knows the difference: :func:`encode` chooses the kind, :func:`decode`
reads either back, and :func:`embed` feeds either to an embedder.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence

import numpy as np
import soundfile as sf

from voiceprint.engine.audio import SAMPLE_RATE
from voiceprint.engine.errors import IncompatibleFeatures, InvalidInput, UndecodableAudio

FEATURES_CODEC_PREFIX = "features-"  # kept features (privacy.keep = "features"), by frontend


def encode(samples: np.ndarray, embedder, keep: str) -> tuple[bytes, str, int]:
    """``(data, codec, sample_rate)`` to store for speech ``samples``, as ``keep`` asks.

    Features depend on the encoder's frontend only, not on its weights, so what is kept
    under one version still serves every later version with that frontend.
    """
    if keep == "features":
        return encode_features(embedder.features(samples)), features_codec(embedder.encoder.frontend), embedder.frontend.sample_rate
    return encode_flac(samples), "flac", SAMPLE_RATE


def decode(data: bytes, codec: str, sample_rate: int, *, frontend: str) -> np.ndarray:
    """What was kept of an utterance, ready for an encoder of ``frontend``: its 16 kHz
    speech (1-D float32) when audio was kept, else its features (2-D, ``[frames, dims]``)."""
    if codec == "flac":
        if sample_rate != SAMPLE_RATE:
            raise InvalidInput(f"stored FLAC at {sample_rate} Hz, expected {SAMPLE_RATE}")
        return decode_flac(data)
    return decode_features(data, codec=codec, frontend=frontend)


def embed(embedder, kept: Sequence[np.ndarray]) -> np.ndarray:
    """Embeddings ``[n, D]`` of decoded kept data, speech and features mixed in any order
    (a store whose ``keep`` setting changed holds both)."""
    if not len(kept):
        return np.zeros((0, embedder.dim), dtype=np.float32)
    speech = [i for i, k in enumerate(kept) if k.ndim == 1]
    features = [i for i, k in enumerate(kept) if k.ndim == 2]
    out = np.zeros((len(kept), embedder.dim), dtype=np.float32)
    if speech:
        out[speech] = embedder.embed([kept[i] for i in speech])
    if features:
        out[features] = embedder.embed_features([kept[i] for i in features])
    return out


def encode_flac(samples: np.ndarray) -> bytes:
    """Encode 16 kHz float samples as 16-bit FLAC bytes, for storing speech in the database."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected 1-D samples, got shape {samples.shape}")
    # Quantise here with the same 32768 scale soundfile uses when reading back: libsndfile
    # writes floats with 32767, which would add up to one extra step of error per sample.
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    """Decode bytes from :func:`encode_flac` back to float32 1-D samples."""
    try:
        samples, _ = sf.read(io.BytesIO(data), dtype="float32")
    except sf.SoundFileError as exc:
        # libsndfile's own words; str(exc) would name an in-memory buffer by its address.
        reason = getattr(exc, "error_string", None) or str(exc)
        raise UndecodableAudio(f"stored FLAC: cannot be decoded ({reason})") from None
    return samples


def features_codec(frontend: str) -> str:
    """The ``codec`` of kept features: they mean something only to encoders of this frontend."""
    return f"{FEATURES_CODEC_PREFIX}{frontend}"


def encode_features(features: np.ndarray) -> bytes:
    """Encode ``[frames, dims]`` encoder input features as zlib-compressed float16 ``.npy`` bytes.

    float16 moves an utterance embedding by at most about 5e-5 per value (1 - cosine
    about 1e-7, measured on vctk, LibriSpeech and speechocean762 speech) and halves the
    size; zlib takes another 15-20 % off. Power mel values of speech stay far below
    float16's largest value (65504); features that do not fit are kept as float32 rather
    than as inf (the ``.npy`` header records the dtype).
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"expected [frames, dims] features, got shape {features.shape}")
    with np.errstate(over="ignore"):
        half = features.astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, half if np.isfinite(half).all() else features.astype(np.float32), allow_pickle=False)
    return zlib.compress(buffer.getvalue())


def decode_features(data: bytes, *, codec: str, frontend: str) -> np.ndarray:
    """Decode bytes from :func:`encode_features` kept under ``codec``, for an encoder of ``frontend``.

    Raises
    ------
    IncompatibleFeatures
        ``codec`` names another frontend's features (or no features at all).
    UndecodableAudio
        The bytes are not what :func:`encode_features` writes.
    """
    if codec != features_codec(frontend):
        raise IncompatibleFeatures(
            f"stored {codec!r} data cannot feed an encoder of frontend {frontend!r} "
            f"(it needs {features_codec(frontend)!r} or kept audio)"
        )
    try:
        features = np.load(io.BytesIO(zlib.decompress(data)), allow_pickle=False)
    except (zlib.error, ValueError, OSError, EOFError) as exc:
        raise UndecodableAudio(f"stored features: cannot be decoded ({exc})") from None
    if features.ndim != 2:
        raise UndecodableAudio(f"stored features: expected [frames, dims], got shape {features.shape}")
    return features


