"""Leave-one-out trials from a version's stored enrollments, the material of a calibration.

Each probe is a stored utterance scored against every profile, its own speaker's
profile rebuilt without it (the centroid it would have met had it arrived as a new
utterance). Before any trial is kept, profiles that look like one person under two
names are found (:func:`likely_duplicates`) and their trials against each other are
left out of the non-targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voiceprint.engine.scoring import Cohort, asnorm, centred, normalise_rows

# A probe this close to another speaker's profile is the same recording under two names.
SAME_RECORDING = 0.97


@dataclass(frozen=True, eq=False)
class TrialScores:
    """Target and non-target scores of leave-one-out trials, on each back-end's scale.

    ``identify[backend]`` holds, per probe, the score of its best non-target by cosine:
    what an open-set search would have decided on had the probe's own speaker not been
    enrolled. The ``*_owner`` arrays name each trial's probe speaker (an index into
    ``names``), the unit of the cross-validated rates. Trials between the profiles of a
    likely duplicate identity (``duplicates``) are left out of the non-targets.
    """

    target: dict  # backend -> [P], one per probe
    nontarget: dict  # backend -> [F] (subsampled when the gallery is large)
    identify: dict  # backend -> [P]
    young_target: np.ndarray  # cosine of each probe with a profile of at most 3 other utterances
    top1: np.ndarray  # [P] whether the probe's own profile ranked first by cosine
    probe_owner: np.ndarray  # [P]
    nontarget_owner: np.ndarray  # [F]
    names: list
    duplicates: list  # [(speaker, speaker, cross score)], the score on the cosine scale
    speakers: int
    utterances: int


def likely_duplicates(
    names, owner: np.ndarray, unit_probes: np.ndarray, profiles: np.ndarray, typical: float, chunk: int = 512
) -> list[tuple[str, str, float]]:
    """Pairs of profiles that look like one person under two names.

    Two signs, either enough: a probe of one speaker within :data:`SAME_RECORDING` of the
    other's profile (the same recording enrolled twice), or the two speakers' probes
    scoring against each other's profiles, on average (both ways where both have
    probes), at least ``typical`` (the median genuine trial: a typical speaker's own
    utterances against its own profile). The cosine of a probe with a fixed unit
    profile is linear in the probe, so a speaker's mean probe gives its mean score.
    Returns ``(speaker, speaker, score)``, highest score first.
    """
    unit = normalise_rows(profiles).astype(np.float64)
    rows = np.unique(owner)
    means = np.stack([unit_probes[owner == r].mean(axis=0) for r in rows])
    at = {int(r): i for i, r in enumerate(rows)}
    found: dict[tuple[int, int], float] = {}
    for start in range(0, len(rows), chunk):  # mean scores, one block of speakers at a time
        block = means[start : start + chunk] @ unit.T
        block[np.arange(len(block)), rows[start : start + chunk]] = -np.inf
        for i, b in zip(*np.nonzero(block >= typical)):
            a, b = int(rows[start + i]), int(b)
            score = float(np.mean([block[i, b]] + ([means[at[b]] @ unit[a]] if b in at else [])))
            if score >= typical:
                found[(min(a, b), max(a, b))] = score
    for start in range(0, len(owner), chunk):  # single probes: the same recording
        block = unit_probes[start : start + chunk] @ unit.T
        block[np.arange(len(block)), owner[start : start + chunk]] = -np.inf
        for i, b in zip(*np.nonzero(block >= SAME_RECORDING)):
            a, b = int(owner[start + i]), int(b)
            pair = (min(a, b), max(a, b))
            found[pair] = max(found.get(pair, -1.0), float(block[i, b]))
    return [(str(names[a]), str(names[b]), score) for (a, b), score in sorted(found.items(), key=lambda kv: -kv[1])]


# Long on purpose: one pass builds every trial kind (target, non-target, best stranger,
# consistency) from the same scores; split, each part would recompute or pass them around.
def leave_one_out_trials(
    ids: np.ndarray,
    speakers: list[str],
    vectors: np.ndarray,
    cohort: Cohort | None,
    *,
    probes_per_speaker: int = 10,
    max_probes: int = 3000,
    max_nontarget: int = 500_000,
    seed: int = 0,
    centre: np.ndarray | None = None,
) -> TrialScores:
    """Score stored utterances against every enrolled profile, leaving each probe out of
    its own speaker's centroid (the centroid it would have been scored against had it
    arrived as a new utterance).

    Only speakers with two or more utterances give probes. With a cohort, the AS-norm
    statistics of a target trial use the leave-one-out centroid as well, and a probe
    never finds itself in the cohort. A non-target trial is normalised as a stranger's
    (the probe's whole speaker out of the cohort): a speaker enrolled after the fit is
    not in the cohort either, and its impostor scores come out higher that way, so the
    thresholds are set on the harder case. ``centre`` (the version's domain centre, see
    :func:`voiceprint.engine.scoring.centred`) is subtracted before scoring, as at search time; the
    enrollment consistency trials stay on uncentred cosines, which is what the
    enrollment check computes.
    """
    rng = np.random.default_rng(seed)
    vectors = np.asarray(vectors, dtype=np.float64)
    names, index = np.unique(np.asarray(speakers, dtype=object), return_inverse=True)
    sums = np.zeros((len(names), vectors.shape[1]))
    np.add.at(sums, index, vectors)
    counts = np.bincount(index, minlength=len(names))
    probe_rows = []
    for j in np.flatnonzero(counts >= 2):
        rows = np.flatnonzero(index == j)
        probe_rows.extend(rng.permutation(rows)[:probes_per_speaker].tolist())
    if len(probe_rows) > max_probes:  # a large gallery: a random subset keeps the fit to seconds
        probe_rows = rng.choice(probe_rows, max_probes, replace=False).tolist()
    probe_rows = np.array(sorted(probe_rows), dtype=np.int64)
    if probe_rows.size == 0:
        raise ValueError("calibration needs speakers with at least two enrolled utterances")
    owner = index[probe_rows]
    probes = vectors[probe_rows]
    profiles = sums / counts[:, None]
    loo = (sums[owner] - probes) / (counts[owner] - 1)[:, None]
    # A new speaker's profile holds few utterances, and its own utterances score lower
    # against it than against a full one; the enrollment consistency cut is set on these.
    young = np.array([
        float(normalise_rows(vectors[rng.permutation(np.setdiff1d(np.flatnonzero(index == owner[p]), [row]))[:3]].mean(axis=0))
              @ normalise_rows(probes[p]))
        for p, row in enumerate(probe_rows)
    ])
    if centre is not None:
        probes, profiles, loo = centred(probes, centre), centred(profiles, centre), centred(loo, centre)

    unit_probes = normalise_rows(probes).astype(np.float64)
    genuine = np.einsum("pd,pd->p", unit_probes, normalise_rows(loo))
    duplicates = likely_duplicates(names, owner, unit_probes, profiles, float(np.median(genuine)))
    twin = {}  # speaker row -> rows of its likely duplicates
    position = {name: i for i, name in enumerate(names)}
    for a, b, _ in duplicates:
        twin.setdefault(position[a], []).append(position[b])
        twin.setdefault(position[b], []).append(position[a])

    backends = ["cosine"] + (["asnorm"] if cohort is not None else [])
    keep = min(1.0, max_nontarget / max(1, probe_rows.size * (len(names) - 1)))
    target = {b: [] for b in backends}
    nontarget = {b: [] for b in backends}
    nontarget_owner = []
    best = {b: [] for b in backends}
    top1 = []
    unit_profiles = normalise_rows(profiles)
    name_list = list(names)
    positions = {name: i for i, name in enumerate(name_list)}
    if cohort is not None:
        e_mean, e_std = cohort.enrollment_stats(name_list, profiles)
        loo_mean, loo_std = cohort.enrollment_stats(list(names[owner]), loo)
    for p, row in enumerate(probe_rows):
        own, probe = owner[p], probes[p]
        raw = (unit_profiles @ unit_probes[p]).astype(np.float64)
        raw[own] = genuine[p]
        genuine_scale = {"cosine": raw}
        stranger_scale = {"cosine": raw}
        if cohort is not None:
            uid = int(ids[row])
            # As the probe of an enrolled speaker: only the probe itself leaves the cohort.
            t_mean, t_std = cohort.test_stats(probe, name_list, exclude_id=uid, positions=positions)
            enroll_mean, enroll_std = e_mean.copy(), e_std.copy()
            enroll_mean[own], enroll_std[own] = loo_mean[p], loo_std[p]
            genuine_scale["asnorm"] = asnorm(raw, enroll_mean, enroll_std, t_mean, t_std)
            # As the probe of a stranger: its whole speaker leaves the cohort.
            s_mean, s_std = cohort.test_stats(probe, name_list, exclude_id=uid, exclude_speaker=names[own], positions=positions)
            stranger_scale["asnorm"] = asnorm(raw, e_mean, e_std, s_mean, s_std)
        others = np.arange(len(names)) != own
        top1.append(not others.any() or raw[own] > raw[others].max())
        others[twin.get(int(own), [])] = False
        sample = others & (rng.random(len(names)) < keep)
        nontarget_owner.append(np.full(int(sample.sum()), own))
        for b in backends:
            target[b].append(genuine_scale[b][own])
            nontarget[b].append(stranger_scale[b][sample])
            # Identification ranks by cosine and decides on the winner's score.
            best[b].append(stranger_scale[b][np.flatnonzero(others)[np.argmax(raw[others])]] if others.any() else -np.inf)
    return TrialScores(
        target={b: np.array(v) for b, v in target.items()},
        nontarget={b: np.concatenate(v) for b, v in nontarget.items()},
        identify={b: np.array(v) for b, v in best.items()},
        young_target=young,
        top1=np.array(top1, dtype=bool),
        probe_owner=owner,
        nontarget_owner=np.concatenate(nontarget_owner),
        names=name_list,
        duplicates=duplicates,
        speakers=len(names),
        utterances=len(ids),
    )
