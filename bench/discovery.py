"""New speakers found in an unlabeled stream: how pure, how complete, how soon.

Per set and seed, the set's speakers are shuffled; the first ones are enrolled (their
first ``--enroll`` files each) and the rest are new. Then an unlabeled stream arrives
one utterance at a time, in a shuffled order: every other file of the new speakers (up
to ``--per-new``) and ``--per-known`` more files of each enrolled speaker. After each
arrival ``Engine.clusters()`` is asked again, as an operator polling it would.

Reported (mean ± std over seeds), at the end of the stream:

- purity: of the utterances in proposed clusters, the share that belong to the cluster's
  majority speaker;
- coverage: the share of the new speakers' utterances that sit in a proposed cluster
  whose majority is their speaker;
- found: the share of new speakers with such a cluster; proposals per new speaker
  (1.0 when no speaker is split in two);
- false proposals: proposed clusters whose majority is an enrolled speaker (they should
  read "known");
- known right: the share of the enrolled speakers' unlabeled utterances in a "known"
  cluster that names their speaker;
- utterances to proposal: how many of a new speaker's utterances had arrived when a
  cluster of theirs was first proposed (speakers never proposed are counted apart);
- the time of one ``clusters()`` call at the end.

``--sweep`` reports the end-state metrics at several ``[unlabeled] threshold`` values
(the same embeddings, clustered again), each also with only the clusters of full
``stability`` proposed ("stable"); ``--end-only`` skips the polling after each arrival.

    .venv/bin/python bench/discovery.py --sweep 0.25,0.3                                  # the table in the README
    .venv/bin/python bench/discovery.py --sweep 0.15,0.2,0.25,0.3,0.35 --end-only --out discovery-sweep
    .venv/bin/python bench/discovery.py --report bench/results/discovery.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_manifest, write_result  # noqa: E402

from voiceprint.engine import Engine  # noqa: E402
from voiceprint.engine.errors import VoiceprintError  # noqa: E402

# Speakers enrolled per set; the rest of the set's speakers (up to NEW) are the new ones.
# speechocean762 enrolls enough speakers for the version to be calibrated (30).
ENROLLED = {"speechocean762-train": 40, "librispeech-test-other": 5, "vctk-4": 2}
NEW = 10


def end_metrics(clusters, truth: dict[int, str], new: set[str], min_stability: float = 0.0) -> dict:
    proposed = [c for c in clusters if c.status == "proposed" and c.stability >= min_stability]
    majority = {c.number: Counter(truth[u] for u in c.utterances).most_common(1)[0] for c in proposed}
    in_proposed = sum(len(c.utterances) for c in proposed)
    new_utts = [u for u, s in truth.items() if s in new]
    covered = sum(1 for c in proposed for u in c.utterances if truth[u] in new and truth[u] == majority[c.number][0])
    of_new = [c for c in proposed if majority[c.number][0] in new]
    known_utts = [u for u, s in truth.items() if s not in new]
    known_right = sum(1 for c in clusters if c.status == "known" for u in c.utterances if truth[u] == c.candidate)
    return {
        "purity": sum(m for _, m in majority.values()) / in_proposed if in_proposed else None,
        "coverage": covered / len(new_utts) if new_utts else None,
        "found": len({majority[c.number][0] for c in of_new}) / len(new) if new else None,
        "proposals_per_new_speaker": len(of_new) / len(new) if new else None,
        "false_proposals": len(proposed) - len(of_new),
        "known_right": known_right / len(known_utts) if known_utts else None,
        "clusters": len(clusters),
    }


def one_run(name: str, seed: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(seed)
    files = defaultdict(list)
    for item in read_manifest(name):
        files[item.speaker].append(item.path)
    speakers = sorted(files)
    rng.shuffle(speakers)
    enrolled = speakers[: ENROLLED[name]]
    new = set(speakers[ENROLLED[name] : ENROLLED[name] + NEW])
    stream = [(s, p) for s in new for p in files[s][: args.per_new]]
    stream += [(s, p) for s in enrolled for p in files[s][args.enroll : args.enroll + args.per_known]]
    stream = [stream[i] for i in rng.permutation(len(stream))]
    with tempfile.TemporaryDirectory() as home, Engine.init(home=home) as eng:
        list(eng.enroll_stream([(s, p, None) for s in enrolled for p in files[s][: args.enroll]]))
        eng.calibrate_if_needed()
        truth: dict[int, str] = {}
        arrived: Counter = Counter()
        first_proposed: dict[str, int] = {}
        for speaker, path in stream:
            result = eng.enroll_stream([(None, path, None)]).__next__()
            if isinstance(result, VoiceprintError):
                continue
            truth[result.utterance_id] = speaker
            arrived[speaker] += 1
            for c in ([] if args.end_only else eng.clusters()):
                if c.status == "proposed":
                    top, _ = Counter(truth[u] for u in c.utterances).most_common(1)[0]
                    if top in new and top not in first_proposed:
                        first_proposed[top] = arrived[top]
        started = time.perf_counter()
        clusters = eng.clusters()
        cluster_s = time.perf_counter() - started
        out = {"set": name, "seed": seed, "enrolled": len(enrolled), "new": len(new), "stream": len(truth),
               "calibrated": eng.calibration() is not None, **end_metrics(clusters, truth, new),
               "utterances_to_proposal": [first_proposed[s] for s in sorted(first_proposed)],
               "never_proposed": None if args.end_only else len(new) - len(first_proposed), "clusters_s": cluster_s}
        if args.sweep:
            out["sweep"] = {}
            for threshold in args.sweep:
                cfg = eng.discovery.config
                eng.discovery.config = dataclasses.replace(cfg, unlabeled=dataclasses.replace(cfg.unlabeled, threshold=threshold))
                found = eng.clusters()
                out["sweep"][str(threshold)] = end_metrics(found, truth, new)
                out["sweep"][f"{threshold} stable"] = end_metrics(found, truth, new, min_stability=1.0)
                eng.discovery.config = cfg
    return out


def summarise(runs: list[dict]) -> dict:
    keys = ("purity", "coverage", "found", "proposals_per_new_speaker", "false_proposals", "known_right", "clusters_s")
    table = {}
    for name in dict.fromkeys(r["set"] for r in runs):
        mine = [r for r in runs if r["set"] == name]
        row = {k: _mean_std([r[k] for r in mine]) for k in keys}
        row["utterances_to_proposal"] = _mean_std([n for r in mine for n in r["utterances_to_proposal"]])
        row["never_proposed"] = sum(r["never_proposed"] or 0 for r in mine)
        row["new_speakers"] = sum(r["new"] for r in mine)
        row["stream"] = _mean_std([r["stream"] for r in mine])
        if mine[0].get("sweep"):
            row["sweep"] = {t: {k: _mean_std([r["sweep"][t][k] for r in mine]) for k in keys if k != "clusters_s"}
                            for t in mine[0]["sweep"]}
        table[name] = row
    return table


def _mean_std(values: list) -> list[float] | None:
    values = [v for v in values if v is not None]
    return [round(float(np.mean(values)), 4), round(float(np.std(values)), 4)] if values else None


def report(result: dict) -> str:
    def cell(pair, percent=False):
        if pair is None:
            return "-"
        return f"{pair[0]:.1%} ± {pair[1]:.1%}" if percent else f"{pair[0]:.2f} ± {pair[1]:.2f}"

    lines = ["| set | new speakers found | purity | coverage | proposals per new speaker | false proposals | known speakers recognised | utterances to proposal |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in result["summary"].items():
        lines.append(
            f"| {name} | {cell(row['found'], True)} | {cell(row['purity'], True)} | {cell(row['coverage'], True)} | "
            f"{cell(row['proposals_per_new_speaker'])} | {cell(row['false_proposals'])} | {cell(row['known_right'], True)} | "
            f"{cell(row['utterances_to_proposal'])} ({row['never_proposed']} of {row['new_speakers']} never) |"
        )
    for name, row in result["summary"].items():
        for threshold, metrics in row.get("sweep", {}).items():
            lines.append(f"sweep {name} threshold {threshold}: " + ", ".join(
                f"{k} {cell(v, k not in ('proposals_per_new_speaker', 'false_proposals'))}" for k, v in metrics.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=lambda s: s.split(","), default=list(ENROLLED))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--enroll", type=int, default=3, help="files enrolled per enrolled speaker")
    parser.add_argument("--per-new", type=int, default=8, help="unlabeled files per new speaker")
    parser.add_argument("--per-known", type=int, default=2, help="unlabeled files per enrolled speaker")
    parser.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",")], default=None,
                        help="also cluster the final stream at these [unlabeled] threshold values")
    parser.add_argument("--end-only", action="store_true",
                        help="ask clusters() only once the stream has arrived (no utterances-to-proposal; much faster)")
    parser.add_argument("--out", default="discovery", help="result name under bench/results")
    parser.add_argument("--report", metavar="RESULT", help="print the markdown table of a stored result and stop")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    runs = []
    for name in args.sets:
        for seed in range(args.seeds):
            runs.append(one_run(name, seed, args))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "sweep"}), file=sys.stderr, flush=True)
    result = {"simulated": "an unlabeled stream drawn from single-speaker sets; see the module docstring",
              "settings": {k: v for k, v in vars(args).items() if k not in ("report",)}, "runs": runs,
              "summary": summarise(runs)}
    print(f"wrote {write_result(args.out, result)}", file=sys.stderr)
    print(report(result))


if __name__ == "__main__":
    main()
