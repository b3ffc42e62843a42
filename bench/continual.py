"""Continual learning: speakers arrive in tasks; does each refresh recipe keep up, forget, or hurt strangers?

    .venv/bin/python bench/continual.py [--stream speechocean|domains] [--orders 3] [--tasks 4]
                                        [--steps 100] [--strategies frozen,ge2e-v0.1,aam]

Streams (every speaker's last three files are its probes, never enrolled):

- ``speechocean``: the speakers of speechocean762-train in a seeded shuffle per order;
  the first ``--tasks`` x 25 arrive 25 per task, the last 25 are never enrolled.
- ``domains``: one task per set (30 speechocean762 speakers, librispeech-test-other,
  vctk-4), in a different order per seed; 25 other speechocean762 speakers are never
  enrolled.

For each order and strategy, in a fresh home: for each task, enroll its speakers, run a
refresh (every candidate is promoted: ``gate = false``, so the recipes themselves are
compared), then measure under the active version:

- top-1 of the probes of every task so far among every enrolled speaker, and among the
  task's own speakers only (``within_task``: what the encoder forgot);
- EER of those probes against every enrolled speaker;
- the never-enrolled group: each of its speakers enrolled from 3 files outside the
  database, its other files identified among the group (EER and top-1): what the
  version does to people who enroll after it.

Each measure is taken on two scales: plain cosine, and ``centred`` (the version's domain
centre subtracted first, the default back-end; see README "Scores and decisions").
``frozen`` never refreshes; it is calibrated after each task so that its centre exists.

From an accuracy matrix ``A[i][j]`` (accuracy on task j after task i): average accuracy
``mean_j A[T-1][j]``; forgetting: each earlier task's best accuracy minus its final one,
averaged; backward transfer: ``mean_j (A[T-1][j] - A[j][j])``. Orders are summarised as
mean and standard deviation.
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
from common import RESULTS, read_manifest, write_result  # noqa: E402

from voiceprint.engine import Engine, audio  # noqa: E402
from voiceprint.engine.metrics import eer, forgetting  # noqa: E402

PROBES = 3
NEVER_ENROLL = 3  # files each never-enrolled speaker is enrolled from, outside the database
SCALES = ("cosine", "centred")
# Refresh settings per strategy (None: never refreshed), spelled out in full so that a
# change of the configured default does not change what a stored row means. The rest is
# the configured default: AAM-softmax, replay and distillation, 100 steps.
FULL = {"lr": 1e-4, "frozen_layers": 0, "l2sp_weight": 0.0, "interpolate": False, "lora_rank": 0,
        "replay_selection": "reservoir"}  # the default recipe's knobs
STRATEGIES = {
    "frozen": None,
    "ge2e-v0.1": {**FULL, "loss": "ge2e-softmax", "lr": 1e-5},  # the default before this benchmark
    "aam": FULL,  # every layer fine-tuned
    "aam-naive": {**FULL, "replay_size": 0, "distill_weight": 0.0},
    "aam-top": {**FULL, "lr": 3e-4, "frozen_layers": 2},  # the two lower LSTM layers kept: the top layer and projection train
    # The same at aam's rate, with the steps that fit in aam's training time (steps take 0.4 s, not 1 s).
    "aam-top-250": {**FULL, "frozen_layers": 2, "steps": 250},
    # Only the 256 x 256 projection trains: a linear adapter on the LSTM's output (as
    # expressive as a residual linear adapter started at the identity), at an adapter's rate.
    "aam-linear": {**FULL, "lr": 1e-3, "frozen_layers": 3},
    # L2-SP: a weight of 1 makes the pull 2e-3 per weight 1e-3 away from the parent, about a
    # typical weight's share of a clipped gradient (norm 3 over 1.4 M weights: 2.5e-3).
    "aam-l2sp": {**FULL, "l2sp_weight": 1.0},
    "aam-wise": {**FULL, "interpolate": True},  # WiSE-FT, the mix chosen by the gate's unseen speakers
    "subcenter-aam": {**FULL, "loss": "subcenter-aam"},  # 3 sub-centres per speaker
    # LoRA: rank-8 updates of every weight matrix, at the tenfold rate usual for low-rank factors.
    "aam-lora": {**FULL, "lora_rank": 8, "lr": 1e-3},
    # A small reservoir (about 4, 2 and 1.3 utterances per old speaker at tasks 2, 3 and 4, the
    # share a 1000-utterance reservoir leaves each of 250 to 750 speakers), filled two ways.
    "aam-replay-100": {**FULL, "replay_size": 100},
    "aam-herding-100": {**FULL, "replay_size": 100, "replay_selection": "herding"},
}


def speech(items: list) -> list[tuple[np.ndarray, str]]:
    loaded = audio.load_many([it.path for it in items])
    return [(sp.samples, it.speaker) for it, sp in zip(items, loaded) if isinstance(sp, audio.Speech)]


def by_speaker(items: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for it in items:
        out.setdefault(it.speaker, []).append(it)
    return out


def build_stream(stream: str, n_tasks: int, seed: int) -> tuple[list, tuple]:
    """Tasks ``[(enroll items, probe speech)]`` and the never-enrolled group ``(enroll speech, probe speech)``."""
    rng = np.random.default_rng(seed)
    ocean = by_speaker(read_manifest("speechocean762-train"))
    names = list(ocean)
    rng.shuffle(names)
    if stream == "speechocean":
        groups = [{s: ocean[s] for s in names[t * 25 : (t + 1) * 25]} for t in range(n_tasks)]
    else:
        groups = [{s: ocean[s] for s in names[:30]}, by_speaker(read_manifest("librispeech-test-other")),
                  by_speaker(read_manifest("vctk-4"))]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    tasks = [([it for s in sorted(g) for it in g[s][:-PROBES]], speech([it for s in sorted(g) for it in g[s][-PROBES:]]))
             for g in groups]
    never = [ocean[s] for s in names[-25:]]
    return tasks, (speech([it for f in never for it in f[:NEVER_ENROLL]]), speech([it for f in never for it in f[NEVER_ENROLL:]]))


def scores_of(vectors: np.ndarray, names: list[str], centroids: np.ndarray, speakers: list[str], centre) -> tuple:
    """Cosine scores of probes against centroids, with the truth as columns."""
    if centre is not None:
        vectors, centroids = vectors - centre, centroids - centre
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return vectors @ centroids.T, np.array([names.index(s) for s in speakers])


def eer_of(scores: np.ndarray, truth: np.ndarray) -> float:
    target = np.zeros_like(scores, dtype=bool)
    target[np.arange(len(truth)), truth] = True
    return eer(scores[target], scores[~target])[0]


def measure(eng: Engine, tasks: list, seen: int, never: tuple) -> dict:
    """Every measure of the active version, on both scales."""
    version = eng.active_version()
    embedder = eng.embedder(version)
    calibration = eng.calibration()
    centre = None
    if calibration is not None and calibration.settings.get("centre"):
        total = eng.store.embeddings.embedding_sum(version.number, through=calibration.settings["cohort_through"])
        centre = total.mean
    names, centroids = eng.store.profiles.centroid_matrix(version.number)
    out = {scale: {"top1": [], "within": [], "eer": []} for scale in SCALES}
    for j in range(seen):
        probes = tasks[j][1]
        vectors = embedder.embed([w for w, _ in probes])
        speakers = [s for _, s in probes]
        own = sorted({names.index(s) for s in speakers})
        for scale in SCALES:
            scores, truth = scores_of(vectors, names, centroids, speakers, centre if scale == "centred" else None)
            within = np.array(own)[scores[:, own].argmax(axis=1)]
            out[scale]["top1"].append(float(np.mean(scores.argmax(axis=1) == truth)))
            out[scale]["within"].append(float(np.mean(within == truth)))
            out[scale]["eer"].append(eer_of(scores, truth))
    (enroll, probes) = never
    e = embedder.embed([w for w, _ in enroll])
    group = sorted({s for _, s in enroll})
    spk = np.array([s for _, s in enroll])
    group_centroids = np.stack([e[spk == s].mean(axis=0) for s in group])
    p = embedder.embed([w for w, _ in probes])
    for scale in SCALES:
        scores, truth = scores_of(p, group, group_centroids, [s for _, s in probes], centre if scale == "centred" else None)
        out[scale]["never_eer"] = eer_of(scores, truth)
        out[scale]["never_top1"] = float(np.mean(scores.argmax(axis=1) == truth))
    return out


def run_order(name: str, overrides: dict | None, tasks: list, never: tuple, steps: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"vp-continual-{name}-"))
    settings = {"steps": steps, "gate": False, **(overrides or {})}
    # Every task is calibrated (its domain centre is part of the recipe measured), also the
    # first, whose 25 speakers are fewer than the product's minimum for a calibration.
    (home / "config.toml").write_text(
        "[refresh]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        + "[scoring]\nmin_calibration_speakers = 2\n"
    )
    n = len(tasks)
    matrices = {scale: {k: np.full((n, n), np.nan) for k in ("top1", "within", "eer")} for scale in SCALES}
    never_curve = {scale: [] for scale in SCALES}
    refreshes, started = [], time.perf_counter()
    with Engine.init(home=home) as eng:
        version_1 = None
        for i, (enroll, _) in enumerate(tasks):
            eng.enroll_many([(it.speaker, it.path, None) for it in enroll])
            if i == 0:  # the never-enrolled group under version 1, the reference of the target
                eng.calibrate()
                version_1 = measure(eng, tasks, 0, never)
            if overrides is None:
                if i > 0:
                    eng.calibrate()
            else:
                report = eng.refresh()
                training = report.metrics.get("training", {})
                refreshes.append({"task": i, "status": report.status, "version": report.version,
                                  "steps": training.get("steps"), "train_s": report.timings.get("train_s"),
                                  "seconds_per_step": training.get("seconds_per_step"),
                                  "distance_from_parent": training.get("distance_from_parent"),
                                  "alpha": report.metrics.get("interpolation", {}).get("alpha")})
                print(f"  {name}: task {i} refresh {report.status} in {report.timings.get('train_s')} s", file=sys.stderr)
            got = measure(eng, tasks, i + 1, never)
            for scale in SCALES:
                for key in ("top1", "within", "eer"):
                    matrices[scale][key][i, : i + 1] = got[scale][key]
                never_curve[scale].append({"eer": got[scale]["never_eer"], "top1": got[scale]["never_top1"]})
    result = {"seconds": round(time.perf_counter() - started, 1), "refreshes": refreshes}
    for scale in SCALES:
        m = matrices[scale]
        result[scale] = {
            "accuracy_matrix": np.round(m["top1"], 4).tolist(),
            "within_task_matrix": np.round(m["within"], 4).tolist(),
            "eer_matrix": np.round(m["eer"], 4).tolist(),
            **forgetting(m["top1"]),
            "within_task": forgetting(m["within"]),
            "final_eer": round(float(np.nanmean(m["eer"][-1])), 4),
            "never_enrolled": never_curve[scale],
            "never_enrolled_v1": {"eer": version_1[scale]["never_eer"], "top1": version_1[scale]["never_top1"]},
        }
    return result


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over orders of the numbers the targets are stated in."""
    out = {}
    for scale in SCALES:
        rows = {
            "average_top1": [r[scale]["average_accuracy"] for r in runs],
            "forgetting": [r[scale]["forgetting"] for r in runs],
            "within_task_average": [r[scale]["within_task"]["average_accuracy"] for r in runs],
            "within_task_forgetting": [r[scale]["within_task"]["forgetting"] for r in runs],
            "final_eer": [r[scale]["final_eer"] for r in runs],
            "never_eer_final": [r[scale]["never_enrolled"][-1]["eer"] for r in runs],
            "never_eer_v1": [r[scale]["never_enrolled_v1"]["eer"] for r in runs],
            "never_top1_final": [r[scale]["never_enrolled"][-1]["top1"] for r in runs],
        }
        out[scale] = {k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)} for k, v in rows.items()}
    steps = [r["steps"] for run in runs for r in run["refreshes"] if r["steps"]]
    seconds = [r["train_s"] for run in runs for r in run["refreshes"] if r["train_s"]]
    out["budget"] = {"steps_per_refresh": max(steps) if steps else 0, "train_s_per_refresh": round(float(np.mean(seconds)), 1) if seconds else 0.0}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for name, entry in results.items():
        curves = np.array([[np.nanmean(row) for row in run["centred"]["accuracy_matrix"]] for run in entry["orders"]])
        never = np.array([[p["eer"] for p in run["centred"]["never_enrolled"]] for run in entry["orders"]])
        first = np.array([np.array(run["centred"]["within_task_matrix"])[:, 0] for run in entry["orders"]])
        x = np.arange(1, curves.shape[1] + 1)
        for ax, values in zip(axes, (curves, first, never * 100)):
            ax.errorbar(x, values.mean(axis=0), yerr=values.std(axis=0), marker="o", capsize=3, label=name)
        # The trade-off: what a recipe gives the enrolled (top-1) against what it costs strangers.
        s = entry["summary"]["centred"]
        axes[3].errorbar(100 * s["never_eer_final"]["mean"], 100 * s["average_top1"]["mean"],
                         xerr=100 * s["never_eer_final"]["std"], yerr=100 * s["average_top1"]["std"], marker="o", capsize=3)
        axes[3].annotate(name, (100 * s["never_eer_final"]["mean"], 100 * s["average_top1"]["mean"]),
                         textcoords="offset points", xytext=(4, 4), fontsize=8)
    titles = ("mean top-1 over the tasks seen so far", "within-task top-1 of the first task", "never-enrolled EER (%)")
    for ax, title in zip(axes, titles):
        ax.set_title(title + " (centred)")
        ax.set_xlabel("after task")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[3].set_title("average top-1 (%) vs final never-enrolled EER (%), centred")
    axes[3].set_xlabel("never-enrolled EER (%), lower is better")
    axes[3].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", choices=("speechocean", "domains"), default="speechocean")
    parser.add_argument("--orders", type=int, default=3, help="seeded task orders (mean and std over them)")
    parser.add_argument("--seeds", default=None, help="run these order seeds instead, e.g. 1,2")
    parser.add_argument("--merge", action="store_true", help="add the runs to the stream's existing results file")
    parser.add_argument("--tasks", type=int, default=4, help="tasks of 25 speakers (speechocean stream)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--strategies", default="frozen,ge2e-v0.1,aam")
    args = parser.parse_args()
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(names) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {list(STRATEGIES)}")
    if args.stream == "speechocean" and not 1 <= args.tasks <= 4:
        parser.error("--tasks: 1 to 4 (25 speakers each; 25 more are never enrolled)")

    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(range(args.orders))
    results = {name: {"settings": STRATEGIES[name], "orders": []} for name in names}
    if args.merge:
        saved = json.loads((RESULTS / f"continual-{args.stream}.json").read_text())["results"]
        results = {**saved, **{n: results[n] for n in names if n not in saved}}
    for seed in seeds:
        tasks, never = build_stream(args.stream, args.tasks, seed)
        print(f"order {seed}: {len(tasks)} tasks, {sum(len(p) for _, p in tasks)} probes", file=sys.stderr)
        for name in names:
            run = run_order(name, STRATEGIES[name], tasks, never, args.steps)
            results[name]["orders"] = [o for o in results[name]["orders"] if o["seed"] != seed] + [{"seed": seed, **run}]
            results[name]["summary"] = summarise(results[name]["orders"])
            c = run["centred"]
            print(f"{name:<15} order {seed}: top-1 {c['average_accuracy']:.1%} within-task forgetting "
                  f"{c['within_task']['forgetting']:+.1%} final EER {c['final_eer']:.2%} never EER "
                  f"{c['never_enrolled'][-1]['eer']:.2%} (v1 {c['never_enrolled_v1']['eer']:.2%})  ({run['seconds']} s)",
                  file=sys.stderr)
            # Written after every run, so an interrupted benchmark keeps what it measured.
            result = {"stream": args.stream, "tasks": len(tasks), "probes_per_speaker": PROBES,
                      "steps": args.steps, "results": {k: v for k, v in results.items() if v["orders"]}}
            path = write_result(f"continual-{args.stream}", result)
    results = {k: v for k, v in results.items() if v["orders"]}
    plot(results, path.with_suffix(".png"))
    for name, entry in results.items():
        s = entry["summary"]
        for scale in SCALES:
            v = s[scale]
            print(f"{name:<15} {scale:<8} top-1 {v['average_top1']['mean']:.1%}±{v['average_top1']['std']:.1%}  "
                  f"within-task forgetting {v['within_task_forgetting']['mean']:+.1%}±{v['within_task_forgetting']['std']:.1%}  "
                  f"final EER {v['final_eer']['mean']:.2%}±{v['final_eer']['std']:.2%}  never-enrolled EER "
                  f"{v['never_eer_final']['mean']:.2%}±{v['never_eer_final']['std']:.2%} (v1 {v['never_eer_v1']['mean']:.2%})")
    print(f"written to {path} and {path.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
