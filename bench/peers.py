"""Peers side by side on one enrollment/probe split: EER, top-1 and real-time factor.

    .venv/bin/python bench/peers.py [--set speechocean762-train] [--enroll 3]

Each speaker of a set is enrolled from its first N utterances, and every other utterance
is a probe scored against all speakers: top-1 identification, and EER over every
(probe, speaker) trial. The real-time factor is the wall time spent on the probes
(decode, preprocessing, embedding, scoring) divided by their audio duration.

- voiceprint goes through its real enrollment path: the Engine, into a fresh SQLite
  database, and Engine.identify per probe. A probe it refuses (too little speech) counts
  as a top-1 error and takes no part in the EER.
- Resemblyzer 0.1.4 (the PyPI package) uses ``preprocess_wav`` + ``embed_utterance``, as
  its README shows; a speaker's profile is the mean of the same N utterances.

Peers that cannot run here are listed in the output with the reason. This machine
reaches only the package registries, and each of them fetches its weights from a model
hub on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Resemblyzer, read_manifest, split_per_speaker, write_result  # noqa: E402

from voiceprint.engine import Engine  # noqa: E402
from voiceprint.engine.errors import AudioError  # noqa: E402
from voiceprint.engine.metrics import eer  # noqa: E402

NOT_RUN = {
    "SpeechBrain (ECAPA-TDNN)": "pretrained weights are downloaded from the Hugging Face hub at first use; no hub access here",
    "WeSpeaker": "pretrained models are downloaded (wespeaker.load_model) at first use; no download access here",
    "3D-Speaker": "models come from ModelScope at run time; no access here",
    "NeMo (TitaNet)": "checkpoints are fetched from NGC / Hugging Face at first use; no access here",
    "pyannote.audio": "its embedding models are gated on the Hugging Face hub (token and download)",
    "Picovoice Eagle": "needs an AccessKey validated online by Picovoice",
}


def summarise(scores: np.ndarray, truth: np.ndarray, answered: np.ndarray, seconds: float, audio_s: float) -> dict:
    rows = scores[answered]
    target = np.zeros_like(rows, dtype=bool)
    target[np.arange(len(rows)), truth[answered]] = True
    correct = int((rows.argmax(axis=1) == truth[answered]).sum())
    return {
        "probes": len(truth),
        "probes_refused": int((~answered).sum()),
        "top1": round(correct / len(truth), 4),
        "eer": round(eer(rows[target], rows[~target])[0], 4),
        "rtf": round(seconds / audio_s, 4),
    }


def voiceprint(enrollment, probes, speakers: list[str]) -> dict:
    column = {s: i for i, s in enumerate(speakers)}
    scores = np.full((len(probes), len(speakers)), -np.inf)
    answered = np.zeros(len(probes), dtype=bool)
    with tempfile.TemporaryDirectory() as home, Engine.init(home=home) as eng:
        eng.enroll_many([(it.speaker, it.path, None) for it in enrollment[:16]])  # warm-up, part of the enrollment
        eng.enroll_many([(it.speaker, it.path, None) for it in enrollment[16:]])
        start = time.perf_counter()
        for i, item in enumerate(tqdm(probes, desc="voiceprint", file=sys.stderr)):
            try:
                hits = eng.identify(item.path, top=len(speakers)).candidates
            except AudioError:
                continue
            answered[i] = True
            for hit in hits:
                scores[i, column[hit.speaker]] = hit.score
        seconds = time.perf_counter() - start
    truth = np.array([column[it.speaker] for it in probes])
    return summarise(scores, truth, answered, seconds, sum(it.duration_s for it in probes))


def resemblyzer(enrollment, probes, speakers: list[str]) -> dict:
    model = Resemblyzer()
    profile: dict[str, list] = {s: [] for s in speakers}
    for item in tqdm(enrollment, desc="resemblyzer enroll", file=sys.stderr):
        profile[item.speaker].append(model.embed_file(item.path))
    centroids = np.stack([np.mean(profile[s], axis=0) for s in speakers])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    start = time.perf_counter()
    scores = np.stack([centroids @ model.embed_file(it.path) for it in tqdm(probes, desc="resemblyzer", file=sys.stderr)])
    seconds = time.perf_counter() - start
    truth = np.array([speakers.index(it.speaker) for it in probes])
    return summarise(scores, truth, np.ones(len(probes), bool), seconds, sum(it.duration_s for it in probes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="speechocean762-train")
    parser.add_argument("--enroll", type=int, default=3, help="enrollment utterances per speaker")
    args = parser.parse_args()
    enrollment, probes = split_per_speaker(read_manifest(args.set), args.enroll)
    speakers = sorted({it.speaker for it in enrollment})
    result = {
        "set": args.set,
        "speakers": len(speakers),
        "enroll_per_speaker": args.enroll,
        "voiceprint": voiceprint(enrollment, probes, speakers),
        "resemblyzer": resemblyzer(enrollment, probes, speakers),
        "not_run": NOT_RUN,
    }
    path = write_result(f"peers-{args.set}", result)
    print(json.dumps(result, indent=2))
    for name in ("voiceprint", "resemblyzer"):
        r = result[name]
        print(f"{name:<12} top-1 {r['top1']:.1%}  EER {r['eer']:.2%}  RTF {r['rtf']:.4f}  ({r['probes_refused']} refused)", file=sys.stderr)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
