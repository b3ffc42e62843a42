"""Continual learning: speakers arrive in tasks; how well does each strategy keep up, and forget?

    .venv/bin/python bench/continual.py [--tasks 5] [--steps 100] [--strategies frozen,naive,replay,replay+distill]

The speakers of speechocean762-train (manifest order) are split into ``--tasks`` equal
tasks. Three files of every speaker are never enrolled: they are its probes. For each
task in turn: enroll its speakers, run a refresh, then score the probes of every task
seen so far against every enrolled speaker (top-1 identification and EER).

Strategies, under the same budget (``--steps`` optimiser steps per refresh):

- ``frozen``: never fine-tuned, centroids only. What every peer toolkit offers.
- ``naive``: fine-tune on the new task's data only (no replay, no distillation).
- ``replay``: new data plus the replay reservoir of earlier tasks.
- ``replay+distill``: replay plus distillation toward the previous version (the default).

Every candidate is promoted here (``gate = false``), so that the strategies themselves
are compared; the README explains what the gate adds on top.

Top-1 is measured two ways: among every speaker enrolled so far (the realistic one,
where a task's accuracy also falls because later tasks add competitors; ``frozen`` shows
how much of the fall that alone explains), and among the task's own speakers only
(``within_task``, which isolates what the encoder forgot).

From an accuracy matrix ``A[i][j]`` (accuracy on task j after task i):
- average accuracy: ``mean_j A[T-1][j]``;
- forgetting: for each earlier task, the best accuracy it ever had minus its final one,
  averaged;
- backward transfer: ``mean_j (A[T-1][j] - A[j][j])`` over earlier tasks; negative means
  forgetting.
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
from common import read_manifest, write_result  # noqa: E402

from engine import Engine, audio  # noqa: E402
from engine.metrics import eer, forgetting  # noqa: E402

PROBES = 3
STRATEGIES = {
    "frozen": None,
    "naive": {"replay_size": 0, "distill_weight": 0.0},
    "replay": {"distill_weight": 0.0},
    "replay+distill": {},
}


def score(eng: Engine, probes: list[tuple[np.ndarray, str]]) -> tuple[float, float, float]:
    """Under the active version: top-1 of probes among every enrolled speaker, top-1 among
    their own task's speakers only, and EER against every enrolled speaker."""
    version = eng.active_version()
    names, centroids = eng.store.profiles.centroid_matrix(version.number)
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    vectors = eng.embedder(version).embed([w for w, _ in probes])
    scores = vectors @ centroids.T
    truth = np.array([names.index(s) for _, s in probes])
    target = np.zeros_like(scores, dtype=bool)
    target[np.arange(len(truth)), truth] = True
    own = sorted({names.index(s) for _, s in probes})
    within = np.array(own)[scores[:, own].argmax(axis=1)]
    return float(np.mean(scores.argmax(axis=1) == truth)), float(np.mean(within == truth)), eer(scores[target], scores[~target])[0]


def run_strategy(name: str, overrides: dict | None, tasks: list, steps: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"vp-continual-{name.replace('+', '-')}-"))
    settings = {"steps": steps, "gate": False, **(overrides or {})}
    (home / "config.toml").write_text("[refresh]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    accuracy = np.full((len(tasks), len(tasks)), np.nan)
    within = np.full((len(tasks), len(tasks)), np.nan)
    errors = np.full((len(tasks), len(tasks)), np.nan)
    refreshes = []
    started = time.perf_counter()
    with Engine.init(home=home) as eng:
        for i, (enroll, _) in enumerate(tasks):
            eng.enroll_many([(it.speaker, it.path, None) for it in enroll])
            if overrides is not None:
                report = eng.refresh()
                refreshes.append({"task": i, "status": report.status, "version": report.version,
                                  "train_s": report.timings.get("train_s"), "reasons": report.reasons})
                print(f"  {name}: task {i} refresh {report.status} in {report.timings.get('train_s')} s", file=sys.stderr)
            for j in range(i + 1):
                accuracy[i, j], within[i, j], errors[i, j] = score(eng, tasks[j][1])
    return {
        "strategy": name,
        "settings": settings if overrides is not None else "no refresh",
        "accuracy_matrix": np.round(accuracy, 4).tolist(),
        "eer_matrix": np.round(errors, 4).tolist(),
        "within_task_matrix": np.round(within, 4).tolist(),
        "final_eer_mean": round(float(np.nanmean(errors[-1])), 4),
        **forgetting(accuracy),
        "within_task": forgetting(within),
        "refreshes": refreshes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in results:
        matrix = np.array(r["accuracy_matrix"], dtype=float)
        axes[0].plot(range(1, len(matrix) + 1), np.nanmean(matrix, axis=1), marker="o", label=r["strategy"])
        axes[1].plot(range(1, len(matrix) + 1), matrix[:, 0], marker="o", label=r["strategy"])
    axes[0].set_title("mean top-1 over the tasks seen so far")
    axes[1].set_title("top-1 on task 1 as later tasks arrive")
    for ax in axes:
        ax.set_xlabel("after task")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(names) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {list(STRATEGIES)}")

    items = read_manifest("speechocean762-train")
    speakers = list(dict.fromkeys(it.speaker for it in items))
    per_task = len(speakers) // args.tasks
    tasks = []
    for t in range(args.tasks):
        group = set(speakers[t * per_task : (t + 1) * per_task])
        files = {s: [it for it in items if it.speaker == s] for s in group}
        enroll = [it for s in sorted(group) for it in files[s][:-PROBES]]
        probe_items = [it for s in sorted(group) for it in files[s][-PROBES:]]
        loaded = audio.load_many([it.path for it in probe_items])
        probes = [(sp.samples, it.speaker) for it, sp in zip(probe_items, loaded) if isinstance(sp, audio.Speech)]
        tasks.append((enroll, probes))
    print(f"{args.tasks} tasks of {per_task} speakers; {sum(len(p) for _, p in tasks)} probes", file=sys.stderr)

    results = []
    for name in names:
        results.append(run_strategy(name, STRATEGIES[name], tasks, args.steps))
        r = results[-1]
        w = r["within_task"]
        print(f"{name:<16} avg acc {r['average_accuracy']:.1%}  forgetting {r['forgetting']:+.1%}  "
              f"BWT {r['backward_transfer']:+.1%}  | within task: avg {w['average_accuracy']:.1%} forgetting "
              f"{w['forgetting']:+.1%} BWT {w['backward_transfer']:+.1%}  | final EER {r['final_eer_mean']:.2%}  ({r['seconds']} s)",
              file=sys.stderr)
    result = {"set": "speechocean762-train", "tasks": args.tasks, "speakers_per_task": per_task,
              "probes_per_speaker": PROBES, "steps": args.steps, "results": results}
    path = write_result("continual", result)
    plot(results, path.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    print(f"written to {path} and {path.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
