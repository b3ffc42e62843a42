"""Cosine scoring between embeddings and speaker profiles.

Embeddings are L2-normalised; centroids (means of embeddings) are not, so they are
normalised here, which makes the score a true cosine whatever the profile's size.
"""

from __future__ import annotations

import numpy as np


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero rather than becoming NaN)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def cosine(embedding: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """Cosine between one embedding ``[D]`` and each profile row ``[N, D]`` -> ``[N]``.

    >>> [round(float(s), 3) for s in cosine(np.array([1.0, 0.0]), np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))]
    [1.0, 0.0, 0.707]
    """
    return normalise_rows(profiles) @ normalise_rows(embedding)
