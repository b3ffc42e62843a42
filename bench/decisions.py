"""Scores and decisions on speakers the calibration never saw.

    .venv/bin/python bench/decisions.py

Half of speechocean762-train's speakers (every other one) are enrolled with all their
utterances and the version is calibrated on them (`Engine.calibrate`: leave-one-out
trials). Then the test speakers are enrolled through the normal path: the other half of
speechocean762 (first 8 utterances each) and, as a domain the calibration has never
heard, librispeech-test-other (first 6 each). Their remaining utterances are probes.

For each back-end (cosine, asnorm, asnorm+calibrated), within each test set:

- verification: EER, minDCF (p_target 0.01), and the false-accept and miss rates at the
  threshold the calibration chose for the requested false-accept rate (1 %); for the
  LLRs also Cllr and the actual DCF at the Bayes threshold;
- open-set identification as the engine does it (rank by cosine, decide on the
  winner's score): each probe searched with its own speaker left out of the gallery (a
  stranger), the false-accept rate at the identify threshold vs the requested one, and
  the share of probes correctly identified (top-1 and above the threshold); for the
  LLRs also the strangers still accepted with a margin of 1 or 2 over the runner-up;
- enrollment consistency: how many genuine test enrollments were held for review, and
  how many wrong-speaker utterances the same cut would catch;
- multi-prototype profiles (2 k-means prototypes besides the mean) vs the mean alone;
- the cost of AS-norm in a 1:N search against 1e3, 1e4 and 1e5 synthetic profiles with a
  full 5000-utterance cohort: building the profile statistics (once per calibration)
  and the search itself, p50 and p99, against plain cosine.

Writes bench/results/decisions.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, embed_set, read_manifest, split_per_speaker, write_result  # noqa: E402

from voiceprint.engine import Engine, audio  # noqa: E402
from voiceprint.engine.centroids import prototypes  # noqa: E402
from voiceprint.engine.errors import VoiceprintError  # noqa: E402
from voiceprint.engine.metrics import eer, min_dcf  # noqa: E402
from voiceprint.engine.calibration import bayes_threshold, cllr, fit_calibration, reference_thresholds  # noqa: E402
from voiceprint.engine.encoders import reference_scores  # noqa: E402
from voiceprint.engine.trials import leave_one_out_trials  # noqa: E402
from voiceprint.engine.index import CentroidIndex  # noqa: E402
from voiceprint.engine.scoring import BACKENDS, Cohort, centred, normalise_rows  # noqa: E402

P_TARGET = 0.01
TEST_SETS = {"speechocean762 (held-out speakers)": ("speechocean762-train", 8), "librispeech-test-other": ("librispeech-test-other", 6)}


POPULATIONS = (10, 20, 30, 62)  # calibration speakers (62: every other speechocean762 speaker)
DRAWS = 5  # seeded draws of calibration speakers per size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations-only", action="store_true", help="only the realised-vs-requested table (minutes)")
    args = parser.parse_args()
    started = time.time()
    previous = RESULTS / "decisions.json"
    if args.populations_only and previous.exists():  # keep the engine section of the last full run
        result = {k: v for k, v in json.loads(previous.read_text()).items() if k not in ("benchmark", "when", "machine")}
        result["populations"] = populations()
        result["seconds_populations"] = round(time.time() - started, 1)
        print(f"wrote {write_result('decisions', result)}")
        return
    ocean = read_manifest("speechocean762-train")
    speakers = sorted({i.speaker for i in ocean})
    calibration_speakers = set(speakers[0::2])
    with tempfile.TemporaryDirectory() as tmp, Engine.init(home=tmp) as eng:
        items = [(i.speaker, i.path, None) for i in ocean if i.speaker in calibration_speakers]
        list(tqdm(eng.enroll_stream(items), total=len(items), desc="enroll calibration speakers"))
        calibration = eng.calibrate()
        result = {
            "calibration": {"trials": calibration.trials, "fit": calibration.fit, "thresholds": calibration.thresholds},
            "requested": {"verify_far": eng.config.scoring.verify_far, "identify_far": eng.config.scoring.identify_far},
            "sets": {},
        }
        for label, (name, enroll) in TEST_SETS.items():
            items = read_manifest(name)
            if name == "speechocean762-train":
                items = [i for i in items if i.speaker not in calibration_speakers]
            enrollment, probes = split_per_speaker(items, enroll)
            outcomes = list(tqdm(eng.enroll_stream([(i.speaker, i.path, None) for i in enrollment]), total=len(enrollment), desc=f"enroll {name}"))
            feedback = Counter(o.code.upper() if isinstance(o, VoiceprintError) else o.feedback for o in outcomes)
            result["sets"][label] = {"enrollment_feedback": dict(feedback), **evaluate(eng, probes, calibration)}
            if name != "speechocean762-train":
                # The same probes once the version is recalibrated with this domain enrolled
                # (its speakers are then in the cohort and in the fitting trials).
                recalibrated = eng.calibrate()
                result["sets"][label + ", after recalibrating"] = evaluate(eng, probes, recalibrated)
        result["search_cost"] = search_cost()
        result["populations"] = populations()
        result["seconds"] = round(time.time() - started, 1)
    path = write_result("decisions", result)
    print(f"wrote {path}")


def evaluate(eng: Engine, probes, calibration) -> dict:
    version = eng.active_version()
    scoring = eng.recognizer.scoring(version.number)
    index = eng.recognizer.indexes.index(version.number, scoring).index
    names = index.names
    test_speakers = sorted({p.speaker for p in probes})
    columns = np.array([names.index(s) for s in test_speakers])
    rows = []  # per probe: own column position, raw/norm/llr over all speakers, embedding
    for probe in tqdm(probes, desc="score probes"):
        try:
            speech = audio.load(probe.path, eng.config.audio)
        except VoiceprintError:
            continue
        embedding = eng.embedder(version).embed([speech.samples])[0]
        raw, norm, llr = index.scores(scoring.centred(embedding))  # searched as the engine does
        rows.append((names.index(probe.speaker), {"cosine": raw, "asnorm": norm, "asnorm+calibrated": llr}, embedding))
    out = {"probes": len(rows), "speakers": len(test_speakers), "backends": {}}
    for backend in BACKENDS:
        cut = calibration.thresholds[backend]
        identify_cut = calibration.identify_threshold(backend, len(names))
        tar, non, own_ranked = [], [], []
        identified, stranger_score, stranger_margin = [], [], []
        for own, scales, _ in rows:
            raw, s = scales["cosine"], scales[backend]
            tar.append(s[own])
            non.extend(s[columns[columns != own]])
            own_ranked.append(int(np.argmax(s)) == own)
            # The engine's identification: rank by cosine, decide on the winner's score.
            winner = int(np.argmax(raw))
            identified.append(winner == own and s[winner] >= identify_cut)
            others = np.delete(np.arange(len(raw)), own)  # the probe's speaker as a stranger
            first, second = others[np.argsort(-raw[others])[:2]]
            stranger_score.append(s[first])
            stranger_margin.append(s[first] - s[second])
        tar, non = np.array(tar), np.array(non)
        stranger_score, stranger_margin = np.array(stranger_score), np.array(stranger_margin)
        doc = {
            "eer": eer(tar, non)[0],
            "min_dcf_0.01": min_dcf(tar, non, P_TARGET)[0],
            "verify_far_at_threshold": float(np.mean(non >= cut["verify"])),
            "verify_miss_at_threshold": float(np.mean(tar < cut["verify"])),
            "open_set_far_at_threshold": float(np.mean(stranger_score >= identify_cut)),
            "identified_at_threshold": float(np.mean(identified)),
            "top1_if_ranked_by_this_score": float(np.mean(own_ranked)),
        }
        if backend == "asnorm+calibrated":
            doc["cllr"] = cllr(tar, non)
            bayes = bayes_threshold(P_TARGET)
            miss, fa = np.mean(tar < bayes), np.mean(non >= bayes)
            doc["act_dcf_0.01"] = float((miss * P_TARGET + fa * (1 - P_TARGET)) / P_TARGET)
            doc["open_set_far_by_margin"] = {
                str(m): float(np.mean((stranger_score >= identify_cut) & (stranger_margin >= m))) for m in (1.0, 2.0)
            }
        out["backends"][backend] = doc
    out["top1"] = float(np.mean([int(np.argmax(scales["cosine"])) == own for own, scales, _ in rows]))
    out["prototypes"] = compare_prototypes(eng, version.number, test_speakers, rows, names)
    out["consistency"] = consistency(rows, calibration, eng, version.number, names, columns)
    return out


def populations() -> dict:
    """Requested against realised false-accept rates on speakers the calibration never saw,
    at several population sizes, beside the rate and bound the engine reported.

    The engine's recipe on embeddings of its own encoder, without the database:
    ``n`` speakers of one half of speechocean762 are calibrated (all their utterances;
    the domain centre, the AS-norm cohort of their first utterances, leave-one-out trials,
    :func:`fit_calibration`), then every speaker of the other half is enrolled from 8
    utterances and their other utterances probe: verify against every other new
    speaker's profile, identify among all enrolled speakers with their own profile left
    out (a stranger), the identify threshold grown to the gallery's size as the engine
    does. LibriSpeech (6 utterances enrolled) is a domain the calibration never heard.
    Beside it, the same searches decided by the encoder's reference thresholds (plain
    cosine), what the engine uses below ``min_calibration_speakers``; that reference was
    measured on all of speechocean762, so on its speakers it is not an unseen population.
    """
    with tempfile.TemporaryDirectory() as tmp, Engine.init(home=tmp) as eng:
        cfg = eng.config.scoring
        ocean = embed_set("speechocean762-train", eng)
        libri = embed_set("librispeech-test-other", eng)
        reference = reference_scores(eng.config.encoder.name)
    names = sorted(set(ocean[1]))
    pool, held = names[0::2], names[1::2]
    settings = {
        "verify_far": cfg.verify_far, "identify_far": cfg.identify_far, "consistency_hold_rate": 0.02,
        "decision": "far", "p_target": cfg.p_target, "c_miss": cfg.c_miss, "c_fa": cfg.c_fa,
    }
    out = {"requested": {"verify": cfg.verify_far, "identify": cfg.identify_far}, "sizes": {}}
    for size in POPULATIONS:
        runs = []
        for draw in range(DRAWS if size < len(pool) else 1):
            chosen = sorted(np.random.default_rng(draw).choice(pool, size, replace=False))
            runs.append(_population_run(ocean, libri, chosen, held, settings, cfg, reference))
        out["sizes"][str(size)] = {
            "draws": len(runs),
            "backends": sorted({r["backend"] for r in runs}),
            **{key: _mean_std([r[key] for r in runs]) for key in runs[0] if key != "backend"},
        }
        print(size, json.dumps(out["sizes"][str(size)]), flush=True)
    return out


def _population_run(ocean, libri, chosen, held, settings, cfg, reference: dict) -> dict:
    """One draw: the calibration fitted on ``chosen`` and, for comparison, the encoder's
    reference thresholds (plain cosine), each applied to the held-out speakers."""
    x, y = ocean
    fit_rows = np.isin(y, chosen)
    vectors, speakers = x[fit_rows].astype(np.float64), list(y[fit_rows])
    centre = vectors.mean(axis=0)
    first = np.concatenate([np.flatnonzero(np.array(speakers) == s)[: cfg.cohort_per_speaker] for s in chosen])
    cohort = None
    if len(first) >= cfg.min_cohort:
        cohort = Cohort(first, [speakers[i] for i in first], centred(vectors[first], centre), top_k=cfg.cohort_top_k)
    calibration = fit_calibration(1, leave_one_out_trials(np.arange(len(speakers)), speakers, vectors, cohort, seed=1, centre=centre), settings)
    backend = cfg.backend if cohort is not None else "cosine"
    fit = calibration.fit[backend]
    row = {
        "backend": backend,
        "expected_verify": fit["verify_expected"]["rate"], "bound_verify": fit["verify_expected"]["bound"],
        "expected_identify": fit["identify_expected"]["rate"], "bound_identify": fit["identify_expected"]["bound"],
    }
    for label, (vx, vy, enroll) in (("speechocean", (x, y, 8)), ("librispeech", (*libri, 6))):
        new = held if label == "speechocean" else sorted(set(vy))
        gallery = {s: x[y == s].mean(axis=0) for s in chosen}
        probes = []
        for s in new:
            rows = np.flatnonzero(vy == s)
            gallery[s] = vx[rows[:enroll]].mean(axis=0)
            probes.extend((s, vx[r]) for r in rows[enroll:])
        names = list(gallery)
        profiles = np.stack([gallery[n] for n in names])
        calibrated = CentroidIndex(names, centred(profiles, centre), cohort=cohort, calibration=calibration)
        plain = CentroidIndex(names, profiles)
        cuts = reference_thresholds(reference, cfg.verify_far, cfg.identify_far, len(names))
        ways = {  # how each way scores a probe and the two thresholds it decides with
            "calibrated": (lambda v: calibrated.scores(centred(v, centre)), backend,
                           calibration.thresholds[backend]["verify"], calibration.identify_threshold(backend, len(names))),
            "reference": (plain.scores, "cosine", cuts["verify"], cuts["identify"]),
        }
        new_cols = np.array([names.index(s) for s in new])
        for way, (score, scale_name, verify_cut, identify_cut) in ways.items():
            impostor, stranger, named = [], [], []
            for s, vector in probes:
                raw, normalised, llr = score(vector)
                scale = {"cosine": raw, "asnorm": normalised, "asnorm+calibrated": llr}[scale_name]
                own = names.index(s)
                impostor.append(scale[new_cols[new_cols != own]] >= verify_cut)
                others = np.delete(np.arange(len(names)), own)
                stranger.append(scale[others[np.argmax(raw[others])]] >= identify_cut)
                named.append(int(np.argmax(raw)) == own and scale[own] >= identify_cut)
            row[f"{way}_{label}_verify_far"] = float(np.mean(np.concatenate(impostor)))
            row[f"{way}_{label}_identify_far"] = float(np.mean(stranger))
            row[f"{way}_{label}_identified"] = float(np.mean(named))
    return row


def _mean_std(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}


def compare_prototypes(eng: Engine, version: int, test_speakers: list[str], rows, names: list[str]) -> dict:
    """Raw cosine EER and top-1 among the test speakers: mean only vs mean + 2 prototypes."""
    protos = {s: normalise_rows(prototypes(eng.store.profiles.embeddings(s, version), 2)) for s in test_speakers}
    means = {s: normalise_rows(eng.store.profiles.centroid(s, version).mean) for s in test_speakers}
    out = {}
    for label, use in (("mean", False), ("mean+2 prototypes", True)):
        tar, non, ok = [], [], []
        for own, _, embedding in rows:
            e = normalise_rows(embedding)
            scores = {}
            for s in test_speakers:
                score = float(means[s] @ e)
                if use and len(protos[s]):
                    score = max(score, float((protos[s] @ e).max()))
                scores[s] = score
            truth = names[own]
            tar.append(scores[truth])
            non.extend(v for s, v in scores.items() if s != truth)
            ok.append(max(scores, key=scores.get) == truth)
        out[label] = {"eer": eer(np.array(tar), np.array(non))[0], "top1": float(np.mean(ok))}
    return out


def consistency(rows, calibration, eng, version, names, columns) -> dict:
    """Of the test probes scored against their own profile and against other profiles, how
    many the enrollment consistency cut would hold (plain cosine below it, as the
    enrollment check computes it: no domain centre)."""
    cut = calibration.thresholds["cosine"]["consistency"]
    stored, means = eng.store.profiles.centroid_matrix(version)
    plain = normalise_rows(means[[stored.index(n) for n in names]])
    scores = [(o, plain @ normalise_rows(embedding)) for o, _, embedding in rows]
    own = np.array([s[o] for o, s in scores])
    wrong = np.concatenate([s[columns[columns != o]] for o, s in scores])
    return {
        "cosine_cut": cut,
        "genuine_held": float(np.mean(own < cut)),
        "wrong_speaker_caught": float(np.mean(wrong < cut)),
    }


def search_cost() -> list[dict]:
    from voiceprint.engine.calibration import Calibration
    from voiceprint.engine.scoring import Cohort

    rng = np.random.default_rng(0)
    dim = 256
    cohort = Cohort(np.arange(5000), [f"c{i // 5}" for i in range(5000)], rng.standard_normal((5000, dim)), top_k=100)
    calibration = Calibration(version=1, slope=1.0, offset=0.0, thresholds={}, settings={}, trials={})
    probe = rng.standard_normal(dim).astype(np.float32)
    out = []
    for n in (1_000, 10_000, 100_000):
        names = [f"s{i}" for i in range(n)]
        centroids = rng.standard_normal((n, dim)).astype(np.float32)
        start = time.perf_counter()
        stats = cohort.enrollment_stats(names, centroids)
        build = time.perf_counter() - start
        row = {"speakers": n, "cohort": len(cohort), "profile_stats_build_s": round(build, 2)}
        for label, index in (
            ("cosine", CentroidIndex(names, centroids)),
            ("asnorm+calibrated", CentroidIndex(names, centroids, cohort=cohort, enroll_stats=stats, calibration=calibration)),
        ):
            for _ in range(5):
                index.search(probe, 5)
            times = []
            for _ in range(100):
                start = time.perf_counter()
                index.search(probe, 5)
                times.append(time.perf_counter() - start)
            row[label] = {"p50_ms": round(1000 * float(np.percentile(times, 50)), 2), "p99_ms": round(1000 * float(np.percentile(times, 99)), 2)}
        out.append(row)
    return out


if __name__ == "__main__":
    main()
