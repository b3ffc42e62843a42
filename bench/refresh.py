"""Refresh and rollback on real speech: wall time, throughput, and what a refresh changes.

    .venv/bin/python bench/refresh.py [--steps 100] [--loss NAME] [--lr 1e-4] [--db URL]

speechocean762-train's speakers arrive in two groups (A: the first 50 in manifest
order, B: the next 50). Two files of every speaker are never enrolled: they are the
probes. The last 25 speakers (C) are never enrolled at all: they show what a refresh does
to speakers it has not seen (each is enrolled from 3 files, outside the database, and the
rest are scored against the 25 centroids under each version).

1. Enroll A under version 1; identify A's probes.
2. Refresh -> version 2; identify A's probes.
3. Enroll B; refresh -> version 3 (B is new, A is old and replayed); identify everyone's probes.
4. Roll back to version 1 (B must first be embedded under it), then forward to version 3.

Reported: refresh wall time and its parts, training seconds per step, re-embedding
throughput, rollback times, and top-1 identification of each group's probes under every
version (among that group's speakers, so a group's score does not drop just because the
other group arrived), and EER / top-1 on the unseen speakers C under each version.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_manifest, split_per_speaker, write_result  # noqa: E402

from voiceprint.engine import Engine, audio  # noqa: E402
from voiceprint.engine.errors import AudioError  # noqa: E402
from voiceprint.engine.metrics import eer, top_k_accuracy  # noqa: E402

PROBES = 2


def top1(eng: Engine, probes: list, among: set[str]) -> float:
    right = []
    total = len(eng.speakers())
    for item in probes:
        try:
            hits = eng.identify(item.path, top=total).candidates
        except AudioError:
            continue  # a probe with too little speech; skipped under every version alike
        best = max((h for h in hits if h.speaker in among), key=lambda h: h.score)
        right.append(best.speaker == item.speaker)
    return round(float(np.mean(right)), 4)


def unseen(eng: Engine, enroll: tuple, probes: tuple) -> dict:
    """EER and top-1 on speakers the engine never saw, with the active version's encoder."""
    embedder = eng.embedder(eng.active_version())
    names = sorted(set(enroll[1]))
    e = embedder.embed(enroll[0])
    centroids = np.stack([e[[s == n for s in enroll[1]]].mean(axis=0) for n in names])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    scores = embedder.embed(probes[0]) @ centroids.T
    truth = np.array([names.index(s) for s in probes[1]])
    target = np.zeros_like(scores, dtype=bool)
    target[np.arange(len(truth)), truth] = True
    return {"eer": round(eer(scores[target], scores[~target])[0], 4), "top1": round(top_k_accuracy(scores, truth), 4)}


def load(items: list) -> tuple[list, list]:
    speeches = audio.load_many([it.path for it in items])
    kept = [(s.samples, it.speaker) for it, s in zip(items, speeches) if isinstance(s, audio.Speech)]
    return [w for w, _ in kept], [spk for _, spk in kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--loss", default=None, help="refresh.loss (default: the config default)")
    parser.add_argument("--lr", type=float, default=None, help="refresh.lr (default: the config default)")
    parser.add_argument("--db", default=None, help="database URL (default: SQLite in a temporary home)")
    args = parser.parse_args()

    items = read_manifest("speechocean762-train")
    speakers = list(dict.fromkeys(it.speaker for it in items))
    groups = {"A": set(speakers[:50]), "B": set(speakers[50:100])}
    c_enroll, c_probes = split_per_speaker([it for it in items if it.speaker in set(speakers[100:])], 3)
    c_enroll, c_probes = load(c_enroll), load(c_probes)
    by_speaker: dict[str, list] = {}
    for it in items:
        by_speaker.setdefault(it.speaker, []).append(it)
    enroll = {g: [it for s in names for it in by_speaker[s][:-PROBES]] for g, names in groups.items()}
    probes = {g: [it for s in names for it in by_speaker[s][-PROBES:]] for g, names in groups.items()}

    home = Path(tempfile.mkdtemp(prefix="vp-bench-refresh-"))
    overrides = {"steps": args.steps, "loss": args.loss, "lr": args.lr}
    (home / "config.toml").write_text(
        "[refresh]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides.items() if v is not None)
    )
    accuracy: dict[str, dict[str, float]] = {}
    result: dict = {"set": "speechocean762-train", "db": args.db or "sqlite (temporary home)"}
    with Engine.init(home=home, db=args.db) as eng:
        def enroll_group(g: str) -> None:
            start = time.perf_counter()
            outcomes = eng.enroll_many([(it.speaker, it.path, None) for it in enroll[g]])
            stored = sum(not isinstance(o, Exception) for o in outcomes)
            result[f"enroll_{g}"] = {"utterances": stored, "seconds": round(time.perf_counter() - start, 2)}

        def measure(label: str, *, with_unseen: bool = True) -> None:
            label = f"{label}: v{eng.active_version().number} active"
            accuracy[label] = {g: top1(eng, probes[g], groups[g]) for g in groups if g in seen}
            if with_unseen:
                c = unseen(eng, c_enroll, c_probes)
                accuracy[label].update({"C (unseen) top-1": c["top1"], "C (unseen) EER": c["eer"]})

        seen = ["A"]
        enroll_group("A")
        measure("A enrolled")
        for n, group in ((1, None), (2, "B")):
            if group:
                seen.append(group)
                enroll_group(group)
                measure(f"{group} enrolled", with_unseen=False)
            start = time.perf_counter()
            report = eng.refresh()
            result[f"refresh_{n}"] = {"wall_s": round(time.perf_counter() - start, 2), **report.to_dict()}
            print(f"refresh {n}: {report.status}, {time.perf_counter() - start:.1f} s", file=sys.stderr)
            measure(f"refresh {n} {report.status}")
        utterances = len(eng.store.profiles.utterances())
        for target in (1, 3):
            start = time.perf_counter()
            moved = eng.rollback(target, reason="benchmark")
            result[f"rollback_to_{target}"] = {**moved, "wall_s": round(time.perf_counter() - start, 2), "utterances": utterances}
    result["top1_by_version"] = accuracy
    with Engine.open(home=home, db=args.db) as eng:
        result["refresh_config"] = eng.config.to_dict()["refresh"]
    name = "refresh-" + result["refresh_config"]["loss"] + f"-lr{result['refresh_config']['lr']:g}"
    path = write_result(name, result)
    print(json.dumps(result, indent=2))
    for n in (1, 2):
        r = result[f"refresh_{n}"]
        t = r["timings"]
        print(
            f"refresh {n}: {r['status']} v{r['version']}  wall {r['wall_s']} s  train {t.get('train_s')} s "
            f"({r['metrics']['training']['seconds_per_step']} s/step)  re-embed {t.get('embed_utterances_per_s')} utt/s",
            file=sys.stderr,
        )
    for label, row in accuracy.items():
        print(f"{label:<32} " + "  ".join(f"{g}: {v:.1%}" for g, v in row.items()), file=sys.stderr)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
