"""Closed-set identification accuracy: voiceprint vs the original Resemblyzer package.

Each speaker of a set is enrolled from its first N utterances (voiceprint: through the
Engine into a fresh SQLite database, i.e. the real enrollment path); every other
utterance is identified among all speakers. Resemblyzer gets the same split: its
speaker profile is the mean of its own embeddings of the same N utterances.

    .venv/bin/python bench/accuracy.py [--set speechocean762-train] [--enroll 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import Resemblyzer, read_manifest, split_per_speaker, write_result  # noqa: E402

from engine import Engine  # noqa: E402


def voiceprint_top1(enrollment, probes) -> dict:
    with tempfile.TemporaryDirectory() as home, Engine.init(home=home) as eng:
        start = time.perf_counter()
        failed_enroll = 0
        for i in tqdm(range(0, len(enrollment), 16), desc="voiceprint enroll", file=sys.stderr):
            batch = enrollment[i : i + 16]
            results = eng.enroll_many([(it.speaker, it.path, None) for it in batch])
            failed_enroll += sum(isinstance(r, Exception) for r in results)
        enroll_s = time.perf_counter() - start
        correct = unusable = 0
        for item in tqdm(probes, desc="voiceprint identify", file=sys.stderr):
            try:
                result = eng.identify(item.path, top=1)
            except Exception:  # too little speech etc.: counted as an error, not skipped
                unusable += 1
                continue
            correct += result.candidates[0].speaker == item.speaker
    return {
        "top1": correct / len(probes),
        "probes": len(probes),
        "probes_rejected_by_quality_checks": unusable,
        "enrollments_rejected": failed_enroll,
        "enroll_seconds": round(enroll_s, 2),
    }


def resemblyzer_top1(enrollment, probes) -> dict:
    model = Resemblyzer()
    speakers = sorted({it.speaker for it in enrollment})
    profile = {s: [] for s in speakers}
    for item in tqdm(enrollment, desc="resemblyzer enroll", file=sys.stderr):
        profile[item.speaker].append(model.embed_file(item.path))
    centroids = np.stack([np.mean(profile[s], axis=0) for s in speakers])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    correct = 0
    for item in tqdm(probes, desc="resemblyzer identify", file=sys.stderr):
        correct += speakers[int(np.argmax(centroids @ model.embed_file(item.path)))] == item.speaker
    return {"top1": correct / len(probes), "probes": len(probes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="speechocean762-train")
    parser.add_argument("--enroll", type=int, default=3, help="enrollment utterances per speaker")
    args = parser.parse_args()
    enrollment, probes = split_per_speaker(read_manifest(args.set), args.enroll)
    result = {
        "set": args.set,
        "speakers": len({it.speaker for it in enrollment}),
        "enroll_per_speaker": args.enroll,
        "voiceprint": voiceprint_top1(enrollment, probes),
        "resemblyzer": resemblyzer_top1(enrollment, probes),
    }
    path = write_result(f"accuracy-{args.set}", result)
    print(json.dumps(result, indent=2))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
