"""The encoder's reference scores: how its non-target cosines are distributed.

    .venv/bin/python bench/reference.py

Before a version is calibrated on its own speakers, it decides with thresholds derived
from a reference measurement shipped with the encoder
(``GE2ELSTM.reference_nontarget_cosine``): the mean and standard deviation of the
cosine between an utterance and the profile of another speaker. This measures them on
each speech set of ``../shared/data`` with the pretrained weights: every speaker's
profile is the mean of ``PROFILE`` utterances, the rest are probes, and every probe is
scored against every other speaker's profile.

The reference is the set of ten or more speakers with the highest verify threshold at
1 % (the strictest), so an unknown domain errs toward "unknown" rather than toward
accepting a stranger. For
each set the file also records how well a normal law with that mean and spread predicts
the false-accept rate at its own 1 % threshold, and the open-set rate at the identify
threshold for the set's gallery, which treats the gallery's non-targets as independent.

Writes bench/results/reference-ge2e-lstm.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embed_set, write_result  # noqa: E402

from voiceprint.engine import Engine  # noqa: E402
from voiceprint.engine.calibration import reference_thresholds  # noqa: E402
from voiceprint.engine.scoring import normalise_rows  # noqa: E402

SETS = ("speechocean762-train", "librispeech-test-other", "vctk-4")
PROFILE = 5  # utterances per profile, about what a first enrollment gives
FAR = 0.01
MIN_SPEAKERS = 10


def measure(vectors: np.ndarray, speakers: np.ndarray) -> dict:
    names = sorted(set(speakers))
    profiles, probes, owner = [], [], []
    for i, name in enumerate(names):
        rows = np.flatnonzero(speakers == name)
        profiles.append(vectors[rows[:PROFILE]].mean(axis=0))
        probes.extend(rows[PROFILE:])
        owner.extend([i] * len(rows[PROFILE:]))
    scores = normalise_rows(vectors[probes]) @ normalise_rows(np.stack(profiles)).T
    owner = np.array(owner)
    other = np.arange(len(names))[None, :] != owner[:, None]
    non = scores[other]
    reference = {"mean": float(non.mean()), "std": float(non.std())}
    cuts = reference_thresholds(reference, FAR, FAR, len(names) - 1)
    best_other = np.where(other, scores, -np.inf).max(axis=1)
    return {
        "speakers": len(names),
        "nontarget_trials": int(non.size),
        **reference,
        "verify_threshold": cuts["verify"],
        "verify_far_realised": float(np.mean(non >= cuts["verify"])),
        "empirical_verify_threshold": float(np.quantile(non, 1 - FAR)),
        "identify_threshold": cuts["identify"],
        "identify_far_realised": float(np.mean(best_other >= cuts["identify"])),
        "genuine_accepted_at_verify": float(np.mean(scores[~other] >= cuts["verify"])),
    }


def main() -> None:
    started = time.time()
    sets = {}
    with tempfile.TemporaryDirectory() as home, Engine.init(home=home) as eng:
        for name in SETS:
            sets[name] = measure(*embed_set(name, eng))
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in sets[name].items()}, flush=True)
    # Sets of fewer than MIN_SPEAKERS speakers give too few trials for a spread.
    strictest = max((n for n in sets if sets[n]["speakers"] >= MIN_SPEAKERS), key=lambda n: sets[n]["verify_threshold"])
    result = {
        "profile_utterances": PROFILE,
        "far": FAR,
        "sets": sets,
        "reference": {"mean": round(sets[strictest]["mean"], 4), "std": round(sets[strictest]["std"], 4), "set": strictest},
        "seconds": round(time.time() - started, 1),
    }
    write_result("reference-ge2e-lstm", result)


if __name__ == "__main__":
    main()
