"""Scoring back-ends fitted on the enrolled speakers: do in-domain transforms beat the domain centre?

    .venv/bin/python bench/backends.py [--orders 5]

The frozen pretrained encoder embeds speechocean762-train once. For each seeded order the
speakers are split as ``bench/continual.py`` splits them: tasks of 25 enrolled speakers
(every speaker's last three files are its probes, the rest enroll), and the last 25
speakers never enrolled (3 files make each one's profile outside the database; the rest
are its probes). After 1, 2, 3 and 4 tasks every back-end is fitted on the enrolled
utterances only, as an online back-end would be, and measured twice:

- ``enrolled``: top-1 and EER of the enrolled speakers' probes among every enrolled speaker
  (the back-end saw these speakers, not these probes);
- ``never``: top-1 and EER of the never-enrolled group among itself, under the transform
  fitted on the others: what the back-end does to people who enroll after it was fitted.

Back-ends: plain cosine; ``centred`` (the shipped default: the enrolled mean subtracted);
WCCN (within-class covariance normalisation) with OAS shrinkage and with a fixed ridge of
1 or 3 times the mean within-class variance; LDA to 50 or 100 dimensions after
within-class whitening; two-covariance PLDA (OAS-shrunk covariances, the exact
likelihood ratio for a speaker enrolled from n utterances); and ``asnorm`` ranking
(symmetric AS-norm, top 100 of a cohort of the other enrolled speakers' utterances).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.covariance import oas

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_manifest, write_result  # noqa: E402

from voiceprint.engine import Engine, audio  # noqa: E402
from voiceprint.engine.metrics import eer  # noqa: E402

PROBES, NEVER_ENROLL, TASK = 3, 3, 25
BACKENDS = ("cosine", "centred", "wccn-oas", "wccn-1", "wccn-3", "lda-50", "lda-100", "plda", "asnorm")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(values**-0.5) @ vectors.T


class Fitted:
    """A back-end fitted on enrolled embeddings ``x`` with speaker labels ``y``."""

    def __init__(self, name: str, x: np.ndarray, y: np.ndarray) -> None:
        self.name, self.x, self.y = name, x, y
        speakers = sorted(set(y))
        self.mean = x.mean(axis=0)
        means = np.stack([x[y == s].mean(axis=0) for s in speakers])
        within = x - means[np.searchsorted(speakers, y)]
        self.within = within.T @ within / len(x)
        self.between = (means - self.mean).T @ (means - self.mean) / len(speakers)
        self.transform = None
        dim = x.shape[1]
        if name == "wccn-oas":
            self.transform = inverse_sqrt(oas(within, assume_centered=True)[0])
        elif name.startswith("wccn-"):
            ridge = float(name.split("-")[1]) * np.trace(self.within) / dim
            self.transform = inverse_sqrt(self.within + ridge * np.eye(dim))
        elif name.startswith("lda-"):
            whiten = inverse_sqrt(oas(within, assume_centered=True)[0])
            _, directions = np.linalg.eigh(whiten @ self.between @ whiten)
            self.transform = whiten @ directions[:, ::-1][:, : int(name.split("-")[1])]
        elif name == "plda":
            # Whiten the within-class covariance, then diagonalise the between-class one:
            # in that basis both are diagonal (I and b) and the likelihood ratio is a sum.
            whiten = inverse_sqrt(oas(within, assume_centered=True)[0])
            b, rotation = np.linalg.eigh(whiten @ oas(means - self.mean, assume_centered=True)[0] @ whiten)
            self.plda_basis, self.plda_b = whiten @ rotation, np.maximum(b, 1e-9)

    def project(self, v: np.ndarray) -> np.ndarray:
        if self.name == "cosine":
            return unit(v)
        centred = v - self.mean
        return unit(centred if self.transform is None else centred @ self.transform)

    def scores(self, probes: np.ndarray, enroll: np.ndarray, enroll_y: np.ndarray, speakers: list[str]) -> np.ndarray:
        if self.name == "plda":
            return self._plda(probes, enroll, enroll_y, speakers)
        p = self.project(probes)
        profiles = unit(np.stack([self.project(enroll[enroll_y == s]).mean(axis=0) for s in speakers]))
        raw = p @ profiles.T
        if self.name != "asnorm":
            return raw
        cohort = self.project(self.x)
        against = profiles @ cohort.T
        against[np.array(speakers)[:, None] == self.y[None, :]] = -np.inf  # a speaker is not its own cohort
        top_e = -np.sort(-against, axis=1)[:, :100]
        top_t = -np.sort(-(p @ cohort.T), axis=1)[:, :100]
        return 0.5 * ((raw - top_e.mean(1)) / top_e.std(1) + (raw - top_t.mean(1)[:, None]) / top_t.std(1)[:, None])

    def _plda(self, probes, enroll, enroll_y, speakers) -> np.ndarray:
        b = self.plda_b
        z = (probes - self.mean) @ self.plda_basis
        null = -0.5 * ((z**2) / (b + 1) + np.log(b + 1)).sum(axis=1)
        out = np.empty((len(probes), len(speakers)))
        for j, s in enumerate(speakers):
            own = (enroll[enroll_y == s] - self.mean) @ self.plda_basis
            n = len(own)
            mean, var = n * b / (1 + n * b) * own.mean(axis=0), b / (1 + n * b) + 1  # the speaker's predictive
            out[:, j] = -0.5 * (((z - mean) ** 2) / var + np.log(var)).sum(axis=1) - null
        return out


def measure(backend: Fitted, enroll, enroll_y, probes, probe_y) -> tuple[float, float]:
    speakers = sorted(set(enroll_y))
    scores = backend.scores(probes, enroll, enroll_y, speakers)
    truth = np.searchsorted(speakers, probe_y)
    target = np.zeros_like(scores, dtype=bool)
    target[np.arange(len(truth)), truth] = True
    return float(np.mean(scores.argmax(axis=1) == truth)), float(eer(scores[target], scores[~target])[0])


def embed_speechocean() -> tuple[np.ndarray, np.ndarray]:
    items = read_manifest("speechocean762-train")
    loaded = audio.load_many([it.path for it in items])
    kept = [(it.speaker, sp.samples) for it, sp in zip(items, loaded) if isinstance(sp, audio.Speech)]
    with tempfile.TemporaryDirectory() as home, Engine.init(home=home) as eng:
        vectors = eng.embedder(eng.active_version()).embed([samples for _, samples in kept])
    return vectors, np.array([s for s, _ in kept])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=5)
    args = parser.parse_args()
    x, y = embed_speechocean()
    files = {s: np.flatnonzero(y == s) for s in sorted(set(y))}
    runs = {name: [] for name in BACKENDS}
    for seed in range(args.orders):
        names = list(files)
        np.random.default_rng(seed).shuffle(names)
        never = names[-TASK:]
        never_enroll = np.concatenate([files[s][:NEVER_ENROLL] for s in never])
        never_probe = np.concatenate([files[s][NEVER_ENROLL:] for s in never])
        for tasks in (1, 2, 3, 4):
            enrolled = names[: TASK * tasks]
            enroll = np.concatenate([files[s][:-PROBES] for s in enrolled])
            probe = np.concatenate([files[s][-PROBES:] for s in enrolled])
            for name in BACKENDS:
                fitted = Fitted(name, x[enroll], y[enroll])
                top1, err = measure(fitted, x[enroll], y[enroll], x[probe], y[probe])
                never_top1, never_err = measure(fitted, x[never_enroll], y[never_enroll], x[never_probe], y[never_probe])
                runs[name].append({"seed": seed, "tasks": tasks, "top1": top1, "eer": err, "never_top1": never_top1, "never_eer": never_err})
    summary = {}
    for name, rows in runs.items():
        summary[name] = {}
        for tasks in (1, 4):
            chosen = [r for r in rows if r["tasks"] == tasks]
            summary[name][f"after_{tasks}_tasks"] = {
                k: {"mean": round(float(np.mean([r[k] for r in chosen])), 4), "std": round(float(np.std([r[k] for r in chosen])), 4)}
                for k in ("top1", "eer", "never_top1", "never_eer")}
        s = summary[name]["after_4_tasks"]
        print(f"{name:<9} after 4 tasks: top-1 {s['top1']['mean']:.1%}±{s['top1']['std']:.1%}  EER {s['eer']['mean']:.2%}  "
              f"never-enrolled top-1 {s['never_top1']['mean']:.1%}  EER {s['never_eer']['mean']:.2%}±{s['never_eer']['std']:.2%}")
    path = write_result("backends-speechocean", {"orders": args.orders, "encoder": "ge2e-lstm (pretrained, frozen)",
                                                "summary": summary, "runs": runs})
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
