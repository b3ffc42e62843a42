"""Evaluate a model version on a labelled set: verification and identification metrics.

Nothing is written to the database. Speakers are enrolled in memory from their first
``enroll`` usable files (manifest order); the rest of their files are probes, scored
against every enrolled speaker. With a trial list, only the listed (speaker, probe)
pairs count as verification trials.

Scores are those of one back-end, as the engine computes them for the version: cosine,
AS-norm against the version's stored cohort, or the LLR of its stored calibration (and
centred when the calibration centres). Speakers are ranked by cosine, as the engine
ranks them; decisions are taken on the back-end's score of the winner, with the
thresholds the engine decides with now.

Reported: EER, minDCF at p_target 0.01 and 0.05, top-1 / top-5 identification, the
false-accept and miss rates at the verify threshold, the open-set false-accept rate at
the identify threshold for the gallery's size (each probe with its own speaker removed
from the gallery: would anyone else be accepted?), trial counts, per-duration buckets,
and what was done with files that could not be used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from voiceprint.engine import audio
from voiceprint.engine.config import Config
from voiceprint.engine.det import DetScores
from voiceprint.engine.errors import AudioError, InvalidInput
from voiceprint.engine.index import CentroidIndex
from voiceprint.engine.manifests import LabelledFile, Trial
from voiceprint.engine.metrics import eer, min_dcf, top_k_accuracy
from voiceprint.engine.progress import Progress, report

log = logging.getLogger(__name__)

LOAD_CHUNK = 64  # files decoded and run through the VAD together
DURATION_BUCKETS = ((0.0, 2.0, "< 2 s"), (2.0, 5.0, "2-5 s"), (5.0, float("inf"), "> 5 s"))


@dataclass
class EvalReport:
    version: int
    files: int
    used: int
    refused: dict[str, int]  # error code -> files
    input_sample_rates: dict[int, int]  # rate -> files
    speakers: int
    probes: int
    trials: dict[str, int]
    metrics: dict
    by_duration: dict[str, dict]
    notes: list[str] = field(default_factory=list)
    backend: str = "cosine"  # the scores and thresholds reported: cosine, asnorm or asnorm+calibrated
    scores: dict = field(default_factory=dict, repr=False)  # target / nontarget arrays, for the plot

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("scores")
        return out

    def det(self) -> DetScores:
        """The trial scores and thresholds, as :mod:`voiceprint.engine.det` plots them."""
        return DetScores(
            self.version, self.backend, self.scores["target"], self.scores["nontarget"],
            self.metrics["verify_threshold"], self.metrics["identify_threshold"], trials="eval trials",
        )


def evaluate(
    embedder,
    version: int,
    config: Config,
    files: list[LabelledFile],
    *,
    scoring,
    backend: str,
    threshold: Callable[[str, int], tuple[float | None, str]],
    enroll: int = 3,
    trials: list[Trial] | None = None,
    on_progress: Progress | None = None,
) -> EvalReport:
    """Score ``files`` (and ``trials``) with ``embedder``, the encoder of ``version``, on
    ``backend`` with the version's ``scoring`` state (centre, cohort, calibration);
    ``threshold(task, gallery)`` is the engine's threshold for it and a note."""
    if enroll < 1:
        raise InvalidInput("--enroll must be at least 1")
    probe_paths = sorted({t.probe for t in trials}, key=str) if trials else []
    paths = list(dict.fromkeys([f.path for f in files] + probe_paths))
    speeches, embeddings, refused, rates = _embed_files(embedder, config, paths, on_progress)
    notes = _notes(refused, rates, config)
    gallery = _gallery(files, speeches, enroll, notes)
    names = sorted(gallery)
    centroids = np.stack([np.mean([embeddings[p] for p in gallery[s]], axis=0) for s in names])
    column = {s: i for i, s in enumerate(names)}
    probes, probe_speaker, pairs = _probes_and_pairs(files, trials, embeddings, gallery, names, notes)
    index = CentroidIndex(names, scoring.centred(centroids), cohort=scoring.cohort, calibration=scoring.calibration)
    on_scale = {"cosine": 0, "asnorm": 1, "asnorm+calibrated": 2}[backend]
    every = [index.scores(scoring.centred(embeddings[p])) for p in probes]
    if every[0][on_scale] is None:
        raise InvalidInput(f"version {version} gives no {backend} scores (no cohort or no calibration)")
    scores = np.stack([s[0] for s in every])  # cosine: what speakers are ranked by
    decided = np.stack([s[on_scale] for s in every])  # the back-end's score: what decides
    pair_rows = np.array([i for i, _, _ in pairs])
    pair_scores = np.array([decided[i, j] for i, j, _ in pairs])
    is_target = np.array([t for _, _, t in pairs])
    if is_target.all() or not is_target.any():
        raise InvalidInput("the trials need both target and non-target pairs")

    # Identification: probes whose true speaker is enrolled.
    known = np.array([probe_speaker.get(p) in column for p in probes])
    truth = np.array([column.get(probe_speaker.get(p), -1) for p in probes])
    durations = np.array([speeches[p].quality.speech_s for p in probes])
    # The engine's thresholds for this back-end (identify: for the gallery a probe's
    # open-set search sees, its own speaker left out).
    (verify, basis), (identify, _) = threshold("verify", 1), threshold("identify", max(len(names) - 1, 1))
    if verify is None or identify is None:
        raise InvalidInput(f"no thresholds to evaluate with: {basis}")
    thresholds = verify, identify
    metrics = _metrics(scores, decided, truth, known, pair_scores, is_target, *thresholds)
    by_duration = {}
    for low, high, label in DURATION_BUCKETS:
        in_bucket = (durations >= low) & (durations < high)
        pair_in = in_bucket[pair_rows]
        if in_bucket.any() and is_target[pair_in].any() and (~is_target[pair_in]).any():
            by_duration[label] = {
                "probes": int(in_bucket.sum()),
                **_metrics(scores[in_bucket], decided[in_bucket], truth[in_bucket], known[in_bucket], pair_scores[pair_in],
                           is_target[pair_in], *thresholds, brief=True),
            }
    return EvalReport(
        version=version,
        files=len(paths),
        used=len(speeches),
        refused=dict(refused),
        input_sample_rates=dict(sorted(rates.items())),
        speakers=len(names),
        probes=len(probes),
        trials={"target": int(is_target.sum()), "nontarget": int((~is_target).sum())},
        metrics=metrics,
        by_duration=by_duration,
        notes=notes,
        backend=backend,
        scores={"target": pair_scores[is_target], "nontarget": pair_scores[~is_target]},
    )


def _embed_files(embedder, config: Config, paths: list[Path], on_progress: Progress | None):
    """Load and embed every file: speech and embedding by path, refusals by error code,
    files by input sample rate."""
    speeches: dict[Path, audio.Speech] = {}
    embeddings: dict[Path, np.ndarray] = {}
    refused: Counter = Counter()
    rates: Counter = Counter()
    # The first chunk takes seconds (decoding, the VAD, the encoder): say at once what is coming.
    log.info("eval: loading and embedding %d files, %d at a time", len(paths), LOAD_CHUNK)
    report(on_progress, 0, len(paths), "embedding")
    for start in range(0, len(paths), LOAD_CHUNK):
        chunk = paths[start : start + LOAD_CHUNK]
        loaded = audio.load_many(chunk, config.audio)
        ok = [(p, s) for p, s in zip(chunk, loaded) if isinstance(s, audio.Speech)]
        for s in loaded:
            if isinstance(s, AudioError):
                refused[s.code] += 1
        if ok:
            for (p, s), vector in zip(ok, embedder.embed([s.samples for _, s in ok])):
                speeches[p], embeddings[p] = s, vector
                rates[s.quality.input_sample_rate] += 1
        report(on_progress, start + len(chunk), len(paths), "embedding")
    return speeches, embeddings, refused, rates


def _gallery(files: list[LabelledFile], speeches: dict, enroll: int, notes: list[str]) -> dict[str, list[Path]]:
    """Each speaker's first ``enroll`` usable files (manifest order); speakers with fewer are left out."""
    by_speaker: dict[str, list[Path]] = {}
    for f in files:
        if f.path in speeches:
            by_speaker.setdefault(f.speaker, []).append(f.path)
    gallery = {s: ps[:enroll] for s, ps in by_speaker.items() if len(ps) >= enroll}
    dropped = sorted(set(by_speaker) - set(gallery))
    if dropped:
        notes.append(f"{len(dropped)} speaker(s) with fewer than {enroll} usable files left out of enrollment")
    if len(gallery) < 2:
        raise InvalidInput(
            f"only {len(gallery)} speaker(s) have {enroll} usable file(s) to enroll from; need 2. " + "; ".join(notes)
        )
    return gallery


def _probes_and_pairs(files, trials, embeddings, gallery, names, notes):
    """Probes, each probe's true speaker, and the verification pairs ``(probe row,
    speaker column, is target)``: the listed trials, else every probe against every speaker."""
    column = {s: i for i, s in enumerate(names)}
    enrolled = {p for ps in gallery.values() for p in ps}
    if trials:
        usable = [t for t in trials if t.probe in embeddings and t.speaker in column]
        if len(usable) < len(trials):
            notes.append(f"{len(trials) - len(usable)} trial(s) skipped: probe unusable or speaker not enrolled")
        probes = list(dict.fromkeys(t.probe for t in usable))
        probe_speaker = {t.probe: t.speaker for t in usable if t.target}
    else:
        probes = [f.path for f in files if f.path in embeddings and f.path not in enrolled and f.speaker in column]
        probe_speaker = {f.path: f.speaker for f in files}
    if not probes:
        raise InvalidInput("no probes left after enrollment: give more files per speaker or a smaller --enroll")
    row = {p: i for i, p in enumerate(probes)}
    if trials:
        pairs = [(row[t.probe], column[t.speaker], t.target) for t in usable]
    else:
        pairs = [(i, j, probe_speaker[p] == s) for i, p in enumerate(probes) for j, s in enumerate(names)]
    return probes, probe_speaker, pairs


def _metrics(scores, decided, truth, known, pair_scores, is_target, verify_threshold, identify_threshold, brief=False) -> dict:
    """``scores``: cosine, which ranks; ``decided``: the back-end's score, which decides."""
    target, nontarget = pair_scores[is_target], pair_scores[~is_target]
    rate, threshold = eer(target, nontarget)
    out = {
        "eer": round(rate, 4),
        "eer_threshold": round(threshold, 4),
        "top1": round(top_k_accuracy(scores[known], truth[known], 1), 4) if known.any() else None,
    }
    if brief:
        return out
    out["min_dcf_0.01"] = round(min_dcf(target, nontarget, p_target=0.01)[0], 4)
    out["min_dcf_0.05"] = round(min_dcf(target, nontarget, p_target=0.05)[0], 4)
    # With 5 speakers or fewer, every probe is trivially in the top 5.
    out["top5"] = round(top_k_accuracy(scores[known], truth[known], min(5, scores.shape[1])), 4) if known.any() else None
    out["verify_threshold"] = verify_threshold
    out["false_accept_rate"] = round(float(np.mean(nontarget >= verify_threshold)), 4)
    out["miss_rate"] = round(float(np.mean(target < verify_threshold)), 4)
    # Open set: hide each probe's own speaker; would the best of the others (by cosine) be
    # accepted on the back-end's score?
    rows = np.arange(int(known.sum()))
    others = scores[known].copy()
    others[rows, truth[known]] = -np.inf
    winners = decided[known][rows, others.argmax(axis=1)] if len(rows) else np.zeros(0)
    out["identify_threshold"] = identify_threshold
    out["open_set_false_accept_rate"] = round(float(np.mean(winners >= identify_threshold)), 4) if len(rows) else None
    return out


def _notes(refused: Counter, rates: Counter, config: Config) -> list[str]:
    notes = []
    for code, count in sorted(refused.items()):
        why = {"too_short": f"less than {config.audio.min_speech_s:g} s of speech after VAD"}.get(code, code)
        notes.append(f"{count} file(s) refused: {why}")
    if refused.get("too_short"):
        notes.append("short clips (e.g. spoken digits) can be kept with VOICEPRINT_AUDIO__MIN_SPEECH_S=0.3 or eval --min-speech 0.3")
    resampled = {rate: n for rate, n in rates.items() if rate != audio.SAMPLE_RATE}
    for rate, count in sorted(resampled.items()):
        notes.append(f"{count} file(s) at {rate} Hz resampled to {audio.SAMPLE_RATE} Hz")
    return notes
