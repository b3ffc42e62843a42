"""The gate a candidate version must pass before it is promoted.

Two slices are held out of training, both fixed by hashes so they are the same in every
refresh: a slice of each speaker's utterances, and a slice of whole speakers ("unseen":
never trained on, they stand for the people who will enroll after the refresh). Parent
and candidate both embed them; the candidate must separate speakers better (d') and may
not lose top-1 or EER beyond tolerances, overall, on speakers the parent knew, or on
the unseen speakers.
"""

from __future__ import annotations

import hashlib

import numpy as np

from voiceprint.engine.config import RefreshConfig
from voiceprint.engine.metrics import d_prime, eer, top_k_accuracy


def is_held_out(utterance, fraction: float) -> bool:
    """Whether an utterance belongs to the gate's held-out slice.

    Decided by its content hash, so the slice is the same in every refresh and a held-out
    utterance is not trained on later (the one exception: see :func:`split`).
    """
    return _in_slice(utterance.content_sha256, fraction)


def _in_slice(hex_digest: str, fraction: float) -> bool:
    """Whether a sha256 hex digest falls in the first ``fraction`` of its range."""
    return int(hex_digest[:8], 16) / 0x1_0000_0000 < fraction


UNSEEN_MIN_SPEAKERS = 2  # fewer unseen speakers than this: no speaker slice (all are trained on)


def unseen_speakers(names, fraction: float) -> set[str]:
    """The speakers never trained on, chosen by a hash of the name (so a speaker stays in
    or out for good); empty when fewer than ``UNSEEN_MIN_SPEAKERS`` fall in the slice, so
    a small home trains on everyone."""
    chosen = {n for n in names if _in_slice(hashlib.sha256(n.encode()).hexdigest(), fraction)}
    return chosen if len(chosen) >= UNSEEN_MIN_SPEAKERS else set()


def split(utterances: list, fraction: float, unseen: set[str] = frozenset()) -> tuple[list, list]:
    """(trainable, held out); every speaker keeps at least one utterance outside the
    held-out slice (for its centroid).

    When all of a speaker's utterances fall in the held-out slice, the first one is
    trained on anyway; once the speaker has others, it returns to the slice. Utterances
    of ``unseen`` speakers are never trainable: the held-out ones are probes, the others
    make their centroids.
    """
    trainable, held = [], []
    by_speaker: dict[str, list] = {}
    for utt in utterances:
        by_speaker.setdefault(utt.speaker, []).append(utt)
    for speaker, utts in by_speaker.items():
        out = [u for u in utts if is_held_out(u, fraction)]
        if len(out) == len(utts):
            out = out[1:]  # the speaker's first utterance stays out of the slice
        out_ids = {u.id for u in out}
        if speaker not in unseen:
            trainable += [u for u in utts if u.id not in out_ids]
        held += out
    return trainable, held


def gate_metrics(
    vectors: np.ndarray,
    speakers: list[str],
    held: np.ndarray,
    old_speakers: set[str],
    unseen: set[str] = frozenset(),
    *,
    centre: bool = False,
) -> dict:
    """Top-1 accuracy and EER of held-out rows against centroids of the other rows.

    Reported overall and, by the held-out utterance's speaker, for "old" / "new" speakers
    (trained on; known to the parent or not) and "unseen" ones (never trained on).
    Groups without held-out utterances are left out. ``centre``: score after subtracting
    the mean of the centroid rows, as a centring back-end does.
    """
    speakers_arr = np.array(speakers)
    if centre:
        vectors = vectors - vectors[~held].mean(axis=0)
    names = sorted(set(speakers_arr[~held]))
    centroids = np.stack([vectors[~held & (speakers_arr == s)].mean(axis=0) for s in names])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    column = {s: i for i, s in enumerate(names)}
    probes = np.flatnonzero(held & np.isin(speakers_arr, names))
    scores = vectors[probes] @ centroids.T
    truth = np.array([column[s] for s in speakers_arr[probes]], dtype=int)
    out = {}
    is_unseen = np.isin(speakers_arr[probes], list(unseen))
    groups = {"overall": np.ones(len(probes), bool), "old": np.isin(speakers_arr[probes], list(old_speakers)) & ~is_unseen}
    groups["new"] = ~groups["old"] & ~is_unseen
    groups["unseen"] = is_unseen
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
            "speakers": len(set(speakers_arr[probes][rows])),
            "accuracy": round(top_k_accuracy(sub, sub_truth), 4),
            "eer": round(eer(target, nontarget)[0], 4) if len(nontarget) else None,
            "d_prime": round(d_prime(target, nontarget), 3) if min(len(target), len(nontarget)) > 1 else None,
        }
    return out


def mixing_score(metrics: dict) -> float:
    """How a WiSE-FT mix is chosen: d' of the unseen speakers (never trained on, so what
    the mix promises, robustness for people the refresh has not seen, is measured
    there), overall d' when there is no unseen slice. The gate then judges the chosen mix
    on those same speakers, so its unseen guard is optimistic by the choice; the
    continual benchmark's never-enrolled group is the independent check."""
    unseen = metrics.get("unseen", {}).get("d_prime")
    value = unseen if unseen is not None else metrics["overall"]["d_prime"]
    return float("-inf") if value is None else float(value)


def decide(parent: dict, candidate: dict, cfg: RefreshConfig) -> list[str]:
    """Reasons to reject the candidate; an empty list means promote.

    The candidate must separate target from non-target trials better than its parent:
    a higher d' over every (held-out utterance, speaker) trial. d' is continuous and
    uses all trials, where EER hinges on the few trials near one threshold and top-1 moves
    in steps of a whole utterance, so on a few hundred held-out utterances both are too
    noisy to rank two close models. They act as guards instead: neither may get worse by
    more than its tolerance, overall, on the speakers the parent already knew, or on the
    unseen speakers (never trained on: what the refresh does to people who enroll later).
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
    for group, label in (("overall", "overall"), ("old", "on old speakers"), ("unseen", "on unseen speakers")):
        if group not in parent or group not in candidate:
            continue
        if group == "unseen":
            label = f"on unseen speakers (the {parent[group]['speakers']} held out of training)"
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
