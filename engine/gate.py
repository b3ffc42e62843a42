"""The gate a candidate version must pass before it is promoted.

A fixed slice of each speaker's utterances is held out (never trained on). Parent and
candidate both embed it; the candidate must separate speakers better (d') and may not
lose top-1 or EER beyond tolerances, overall or on speakers the parent knew.
"""

from __future__ import annotations

import numpy as np

from engine.config import RefreshConfig
from engine.metrics import d_prime, eer, top_k_accuracy


def is_held_out(utterance, fraction: float) -> bool:
    """Whether an utterance belongs to the gate's held-out slice.

    Decided by its content hash, so the slice is the same in every refresh and a held-out
    utterance is not trained on later (the one exception: see :func:`split`).
    """
    return int(utterance.content_sha256[:8], 16) / 0x1_0000_0000 < fraction


def split(utterances: list, fraction: float) -> tuple[list, list]:
    """(trainable, held out); every speaker keeps at least one trainable utterance.

    When all of a speaker's utterances fall in the held-out slice, the first one is
    trained on anyway; once the speaker has others, it returns to the slice.
    """
    trainable, held = [], []
    by_speaker: dict[str, list] = {}
    for utt in utterances:
        by_speaker.setdefault(utt.speaker, []).append(utt)
    for utts in by_speaker.values():
        out = [u for u in utts if is_held_out(u, fraction)]
        if len(out) == len(utts):
            out = out[1:]  # the speaker's first utterance stays trainable
        out_ids = {u.id for u in out}
        trainable += [u for u in utts if u.id not in out_ids]
        held += out
    return trainable, held


def gate_metrics(
    vectors: np.ndarray, speakers: list[str], held: np.ndarray, old_speakers: set[str]
) -> dict:
    """Top-1 accuracy and EER of held-out rows against centroids of the other rows.

    Reported overall and for "old" / "new" speakers (by the held-out utterance's speaker).
    Groups without held-out utterances are left out.
    """
    speakers_arr = np.array(speakers)
    names = sorted(set(speakers_arr[~held]))
    centroids = np.stack([vectors[~held & (speakers_arr == s)].mean(axis=0) for s in names])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    column = {s: i for i, s in enumerate(names)}
    probes = np.flatnonzero(held & np.isin(speakers_arr, names))
    scores = vectors[probes] @ centroids.T
    truth = np.array([column[s] for s in speakers_arr[probes]], dtype=int)
    out = {}
    groups = {"overall": np.ones(len(probes), bool), "old": np.isin(speakers_arr[probes], list(old_speakers))}
    groups["new"] = ~groups["old"]
    for group, rows in groups.items():
        if not rows.any():
            continue
        sub, sub_truth = scores[rows], truth[rows]
        is_target = np.zeros_like(sub, dtype=bool)
        is_target[np.arange(len(sub_truth)), sub_truth] = True
        target, nontarget = sub[is_target], sub[~is_target]
        # None, not NaN, where a metric is undefined: PostgreSQL's JSON refuses NaN.
        out[group] = {
            "probes": int(rows.sum()),
            "accuracy": round(top_k_accuracy(sub, sub_truth), 4),
            "eer": round(eer(target, nontarget)[0], 4) if len(nontarget) else None,
            "d_prime": round(d_prime(target, nontarget), 3) if min(len(target), len(nontarget)) > 1 else None,
        }
    return out


def decide(parent: dict, candidate: dict, cfg: RefreshConfig) -> list[str]:
    """Reasons to reject the candidate; an empty list means promote.

    The candidate must separate target from non-target trials better than its parent:
    a higher d' over every (held-out utterance, speaker) trial. d' is continuous and
    uses all trials, where EER hinges on the few trials near one threshold and top-1 moves
    in steps of a whole utterance, so on a few hundred held-out utterances both are too
    noisy to rank two close models. They act as guards instead: neither may get worse by
    more than its tolerance, overall or on the speakers the parent already knew.
    """
    probes = parent.get("overall", {}).get("probes", 0)
    if probes < cfg.min_holdout:
        return [f"only {probes} held-out utterance(s) to judge by; the gate needs {cfg.min_holdout}"]
    p, c = parent["overall"], candidate["overall"]
    if p["d_prime"] is None or c["d_prime"] is None:
        return ["too few held-out trials to compare the two versions (need two speakers with held-out utterances)"]
    reasons = []
    if not c["d_prime"] > p["d_prime"]:
        reasons.append(f"does not separate speakers better: d' {c['d_prime']:.2f} vs parent {p['d_prime']:.2f}")
    for group, label in (("overall", "overall"), ("old", "on old speakers")):
        if group not in parent:
            continue
        p, c = parent[group], candidate[group]
        if c["accuracy"] < p["accuracy"] - cfg.accuracy_tolerance:
            reasons.append(
                f"top-1 worse {label}: {c['accuracy']:.1%} vs parent {p['accuracy']:.1%} "
                f"(tolerance {cfg.accuracy_tolerance:.1%})"
            )
        if c["eer"] is not None and p["eer"] is not None and c["eer"] > p["eer"] + cfg.eer_tolerance:
            reasons.append(
                f"EER worse {label}: {c['eer']:.2%} vs parent {p['eer']:.2%} (tolerance {cfg.eer_tolerance:.2%})"
            )
    return reasons
