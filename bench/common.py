"""Shared pieces of the benchmarks: data location, manifests, results, Resemblyzer."""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voiceprint.engine import manifests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def data_dir() -> Path:
    """The development data: ``$VOICEPRINT_DEV_DATA`` or ``../shared/data`` beside the repo."""
    return Path(os.environ.get("VOICEPRINT_DEV_DATA", ROOT.parent / "shared" / "data")).resolve()


@dataclass(frozen=True)
class Item:
    path: Path
    speaker: str
    duration_s: float


def read_manifest(name: str) -> list[Item]:
    """Data set ``name``'s files, read by :func:`engine.manifests.read_manifest`, with durations.

    The benchmarks also need the ``duration_s`` column (seconds of audio per file); the
    engine's reader checks the header and rows, this adds that one column in row order.
    """
    path = data_dir() / name / "manifest.csv"
    files = manifests.read_manifest(path)
    with open(path, newline="") as fh:
        durations = [float(row["duration_s"]) for row in csv.DictReader(fh)]
    if len(durations) != len(files):  # both readers skip only blank lines, so this is a bug
        raise RuntimeError(f"{path}: {len(files)} files but {len(durations)} durations")
    return [Item(f.path, f.speaker, d) for f, d in zip(files, durations)]


def split_per_speaker(items: list[Item], enroll: int) -> tuple[list[Item], list[Item]]:
    """The first ``enroll`` utterances of each speaker (manifest order) and the rest."""
    seen: dict[str, int] = defaultdict(int)
    enrollment, probes = [], []
    for item in items:
        (enrollment if seen[item.speaker] < enroll else probes).append(item)
        seen[item.speaker] += 1
    return enrollment, probes


def embed_set(name: str, eng) -> tuple[np.ndarray, np.ndarray]:
    """Every usable file of data set ``name`` embedded by ``eng``'s active version (as the
    engine loads audio), and each row's speaker; files the engine refuses are left out."""
    from voiceprint.engine import audio

    items = read_manifest(name)
    loaded = audio.load_many([it.path for it in items], eng.config.audio)
    kept = [(it.speaker, sp.samples) for it, sp in zip(items, loaded) if isinstance(sp, audio.Speech)]
    vectors = eng.embedder(eng.active_version()).embed([samples for _, samples in kept])
    return vectors, np.array([s for s, _ in kept])


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


class Resemblyzer:
    """The original package, used exactly as its README shows: preprocess_wav + embed_utterance."""

    def __init__(self) -> None:
        from resemblyzer import VoiceEncoder, preprocess_wav

        self._preprocess = preprocess_wav
        self.encoder = VoiceEncoder("cpu", verbose=False)

    def embed_file(self, path: Path):
        return self.encoder.embed_utterance(self._preprocess(path))


class SyntheticSpeakers:
    """Speaker centroids and probes drawn to look like the encoder's real embeddings, for
    galleries larger than any data set here (SYNTHETIC: say so wherever they are used).

    Isotropic random vectors are the worst case for an approximate index, and nothing like
    speaker embeddings, whose energy sits in a few directions. So the pretrained encoder
    embeds every file of ``speechocean762-train`` once (cached under
    ``~/.cache/voiceprint-bench``), and speakers are drawn from a Gaussian with those
    embeddings' mean and covariance; a genuine probe is a speaker plus a deviation drawn
    from the within-speaker covariance, an impostor a speaker never enrolled.
    """

    def __init__(self, seed: int = 0, data_set: str = "speechocean762-train") -> None:
        vectors, speakers = self._embeddings(data_set)
        self.dim = vectors.shape[1]
        self.mean = vectors.mean(axis=0)
        shrink = 1e-4 * np.eye(self.dim)  # the covariances of ~1,500 rows need a little help to factorise
        self._between = np.linalg.cholesky(np.cov(vectors, rowvar=False) + shrink)
        within = np.concatenate([vectors[speakers == s] - vectors[speakers == s].mean(axis=0) for s in np.unique(speakers)])
        self._within = np.linalg.cholesky(np.cov(within, rowvar=False) + shrink)
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _embeddings(data_set: str) -> tuple[np.ndarray, np.ndarray]:
        cache = Path.home() / ".cache" / "voiceprint-bench" / f"{data_set}-ge2e.npz"
        if cache.exists():
            held = np.load(cache, allow_pickle=False)
            return held["vectors"], held["speakers"]
        import tempfile

        from voiceprint.engine import Engine

        with tempfile.TemporaryDirectory() as home, Engine.init(home=home) as eng:
            vectors, speakers = embed_set(data_set, eng)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, vectors=vectors.astype(np.float64), speakers=speakers.astype(str))
        return vectors.astype(np.float64), speakers.astype(str)

    def speakers(self, n: int) -> np.ndarray:
        """``n`` unit-length speaker centroids ``[n, D]`` float32."""
        rows = self.mean + self.rng.standard_normal((n, self.dim)) @ self._between.T
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    def probes(self, centroids: np.ndarray) -> np.ndarray:
        """One genuine probe per centroid row: the speaker plus a within-speaker deviation."""
        rows = centroids + self.rng.standard_normal(centroids.shape) @ self._within.T
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
