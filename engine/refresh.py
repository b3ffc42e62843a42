"""Fine-tune a candidate version, gate it, promote it; and catch versions up for rollback.

A refresh, step by step (every step is undone by simply not reaching the last one):

1. Snapshot the stored utterances. A fixed slice of each speaker's utterances (chosen by
   a hash of their content, so the same ones in every refresh) is held out: never
   trained on, used only by the gate.
2. Training data: the utterances new since the parent (active) version was trained, plus
   a speaker-balanced replay sample of older ones (:mod:`engine.replay`).
3. Train a copy of the parent in speaker-balanced mini-batches of random 1.6 s crops with
   the configured loss, plus distillation toward the frozen parent on replayed crops so
   that embeddings stay compatible with what the parent knew.
4. Embed every utterance of the snapshot under the candidate and run the gate: top-1
   identification and EER of held-out utterances against centroids of the others, for
   parent and candidate, split into speakers the parent was trained on ("old") and the
   rest ("new"). Promote only if the candidate separates speakers better (d') and is
   not worse in top-1 or EER, overall or on old speakers, beyond the tolerances.
5. Promotion: store the candidate's embeddings and centroids, embed whatever was enrolled
   meanwhile, and move the "active" alias in one transaction that first checks nothing is
   missing. Until that commit the parent stays active and untouched.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from engine import audio
from engine.checkpoints import save_checkpoint
from engine.config import RefreshConfig
from engine.embedder import Embedder, pick_device
from engine.errors import IncompleteVersion, InvalidInput, NotEnoughData, VoiceprintError
from engine.frontends import create_frontend
from engine.losses import LOSSES, create_loss
from engine.metrics import d_prime, eer, top_k_accuracy
from engine.replay import SpeakerReservoir
from engine.samplers import ClassBatchSampler, SpeakerBalancedSampler

if TYPE_CHECKING:
    from engine.engine import Engine
    from storage import ModelVersion, UtteranceRecord

log = logging.getLogger(__name__)

CLIP_NORM = 3.0  # GE2E's paper clips the gradient norm at 3
EMBED_CHUNK = 64  # utterances decoded and embedded together when re-embedding
WRITE_CHUNK = 256  # embeddings per transaction when storing a version's embeddings
MIN_NOISE_S = 1.6  # noise recordings with less sound than one training crop are left out
PROMOTE_ATTEMPTS = 20  # catch-up rounds before giving up on a busy enrollment stream


@dataclass
class RefreshReport:
    """What a refresh did. ``status``: promoted, rejected, dry-run or skipped."""

    job: int
    status: str
    parent: int
    version: int | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# -- data ------------------------------------------------------------------------------


def is_held_out(utterance: UtteranceRecord, fraction: float) -> bool:
    """Whether an utterance belongs to the gate's held-out slice.

    Decided by its content hash, so the slice is the same in every refresh and a held-out
    utterance is not trained on later (the one exception: see :func:`split`).
    """
    return int(utterance.content_sha256[:8], 16) / 0x1_0000_0000 < fraction


def split(utterances: list[UtteranceRecord], fraction: float) -> tuple[list[UtteranceRecord], list[UtteranceRecord]]:
    """(trainable, held out); every speaker keeps at least one trainable utterance.

    When all of a speaker's utterances fall in the held-out slice, the first one is
    trained on anyway; once the speaker has others, it returns to the slice.
    """
    trainable, held = [], []
    by_speaker: dict[str, list[UtteranceRecord]] = {}
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


def choose_training(
    trainable: list[UtteranceRecord], parent: ModelVersion, cfg: RefreshConfig
) -> tuple[list[UtteranceRecord], list[UtteranceRecord]]:
    """(new, replayed): every new utterance (newest ``max_new``) and a replay sample of the rest."""
    new = [u for u in trainable if u.id > parent.trained_through][-cfg.max_new :]
    if cfg.replay_size == 0:
        return new, []
    reservoir = SpeakerReservoir(cfg.replay_size, seed=cfg.seed)
    for utt in trainable:
        if utt.id <= parent.trained_through:
            reservoir.learn_one(utt.speaker, utt)
    return new, sorted(reservoir.items(), key=lambda u: u.id)


def load_stored(engine: Engine, ids: list[int], frontend: str) -> dict[int, np.ndarray]:
    """What was kept of utterances, by id: 16 kHz speech (1-D float32) where audio was kept,
    encoder input features (2-D ``[frames, dims]``, of ``frontend``) where only those were
    (``privacy.keep = "features"``). A store can hold both kinds if that setting changed."""
    out = {}
    for uid, (data, codec, rate) in engine.store.audio_many(ids).items():
        try:
            out[uid] = audio.decode_stored(data, codec, rate, frontend=frontend)
        except VoiceprintError as exc:
            raise type(exc)(f"utterance {uid}: {exc}") from None
    return out


class NoiseBank:
    """Noise recordings mixed into training crops at a random SNR (augmentation, off by default)."""

    def __init__(self, folder: str, snr_db: float, seed: int) -> None:
        self.snr_db = snr_db
        self.rng = np.random.default_rng(seed)
        self.noises = []
        for path in sorted(Path(folder).expanduser().rglob("*")):
            if path.suffix.lower() not in {".wav", ".flac", ".ogg"}:
                continue
            samples, rate = sf.read(path, dtype="float32", always_2d=True)
            wave = torch.from_numpy(samples.mean(axis=1))
            if rate != audio.SAMPLE_RATE:
                wave = torchaudio.functional.resample(wave, rate, audio.SAMPLE_RATE)
            # Clips are often padded with digital silence; mixing a silent stretch would
            # add no noise at all, so only the blocks that carry sound are kept.
            blocks = wave.numpy()[: len(wave) // 400 * 400].reshape(-1, 400)
            audible = blocks[np.sqrt((blocks**2).mean(axis=1)) > 1e-4]
            if audible.size >= MIN_NOISE_S * audio.SAMPLE_RATE:
                self.noises.append(audible.ravel())
        if not self.noises:
            raise InvalidInput(f"refresh.noise_dir {folder!r} holds no wav/flac/ogg noise")

    def mix(self, crop: np.ndarray) -> np.ndarray:
        noise = self.noises[self.rng.integers(len(self.noises))]
        if len(noise) < len(crop):
            noise = np.tile(noise, len(crop) // len(noise) + 1)
        start = self.rng.integers(len(noise) - len(crop) + 1)
        noise = noise[start : start + len(crop)]
        snr = self.snr_db + self.rng.uniform(-5, 5)
        speech_power = float(np.mean(crop**2)) + 1e-10
        noise_power = float(np.mean(noise**2)) + 1e-10
        return crop + noise * np.sqrt(speech_power / (noise_power * 10 ** (snr / 10)))


class Crops:
    """Random fixed-length crops of kept utterances (see :func:`load_stored`), as encoder input frames.

    Speech is cropped to ``window_frames`` frames' worth of samples and goes through the
    frontend; kept features are cropped to ``window_frames`` frames directly.
    """

    def __init__(self, kept: list[np.ndarray], encoder: torch.nn.Module, device: torch.device, seed: int, noise: NoiseBank | None) -> None:
        self.kept = kept
        self.frames = encoder.window_frames
        self.frontend = create_frontend(encoder.frontend).to(device)
        self.samples = self.frames * self.frontend.hop_length
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.noise = noise

    def batch(self, indices: list[int]) -> torch.Tensor:
        crops = [self._crop(self.kept[i]) for i in indices]
        out = [torch.from_numpy(crop).float().to(self.device) if crop.ndim == 2 else None for crop in crops]
        speech = [k for k, crop in enumerate(crops) if crop.ndim == 1]
        if speech:
            with torch.no_grad():
                features = self.frontend(torch.from_numpy(np.stack([crops[k] for k in speech])).float().to(self.device))
            for k, frames in zip(speech, features[:, : self.frames]):
                out[k] = frames
        return torch.stack(out)

    def _crop(self, kept: np.ndarray) -> np.ndarray:
        length = self.samples if kept.ndim == 1 else self.frames
        if len(kept) < length:  # a short utterance is zero-padded, as at inference
            kept = np.pad(kept, [(0, length - len(kept))] + [(0, 0)] * (kept.ndim - 1))
        start = int(self.rng.integers(len(kept) - length + 1))
        crop = kept[start : start + length]
        return self.noise.mix(crop) if self.noise and crop.ndim == 1 else crop


# -- training --------------------------------------------------------------------------


def train(
    parent: torch.nn.Module,
    kept: list[np.ndarray],
    speakers: list[str],
    replayed: np.ndarray,
    init_heads: dict[str, np.ndarray],
    cfg: RefreshConfig,
    device_name: str,
    progress: bool,
) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a copy of ``parent`` on ``kept`` utterances (as :func:`load_stored` returns
    them); returns the candidate (on CPU, eval mode) and training stats."""
    device = pick_device(device_name)
    torch.manual_seed(cfg.seed)
    teacher = copy.deepcopy(parent).to(device).eval().requires_grad_(False)
    student = copy.deepcopy(parent).to(device).train()
    names = sorted(set(speakers))
    labels = np.array([names.index(s) for s in speakers])
    loss_cls = LOSSES.get(cfg.loss)
    n, m = _batch_shape(labels, cfg)
    if loss_cls.kind == "classification":
        loss_fn = create_loss(cfg.loss, embedding_dim=student.embedding_dim, num_classes=0)
        # Heads start at each speaker's centroid under the parent (weight imprinting), so
        # the first steps refine a good classifier instead of fighting a random one.
        loss_fn.grow(len(names), init=torch.from_numpy(np.stack([init_heads[s] for s in names])).float())
        batches = _forever(ClassBatchSampler(labels.tolist(), n * m, seed=cfg.seed))
    elif loss_cls.kind == "metric":
        loss_fn = create_loss(cfg.loss, embedding_dim=student.embedding_dim)
        batches = _forever(SpeakerBalancedSampler(labels.tolist(), n, m, seed=cfg.seed))
    else:
        raise InvalidInput(f"refresh.loss {cfg.loss!r} is a {loss_cls.kind} loss; pick a classification or metric loss")
    loss_fn = loss_fn.to(device)
    distill = create_loss("distill", embedding_dim=student.embedding_dim).to(device)
    optimiser = torch.optim.Adam(
        [{"params": student.parameters(), "lr": cfg.lr}, {"params": loss_fn.parameters(), "lr": cfg.loss_lr}]
    )
    noise = NoiseBank(cfg.noise_dir, cfg.noise_snr_db, cfg.seed) if cfg.noise_dir else None
    features_only = sum(k.ndim == 2 for k in kept)
    if noise and features_only:
        # Noise is mixed into speech before the frontend; kept features have no speech left.
        log.warning(
            "refresh: %d of %d training utterances were kept as features only (privacy.keep); "
            "they are trained on without noise augmentation",
            features_only,
            len(kept),
        )
    crops = Crops(kept, student, device, cfg.seed, noise)
    # Mixed precision only where it pays (CUDA); bfloat16 needs no loss scaling.
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    started, losses, step = time.perf_counter(), [], 0
    bar = tqdm(total=cfg.steps, desc="training", unit="step", disable=not progress, leave=False)
    for step in range(1, cfg.steps + 1):
        indices = next(batches)
        frames = crops.batch(indices)
        with autocast:
            embeddings = student(frames).float()
            if loss_fn.kind == "classification":
                value = loss_fn(embeddings, torch.as_tensor(labels[indices], device=device))
            else:
                value = loss_fn(embeddings.view(n, m, -1))
            mask = torch.as_tensor(replayed[indices], device=device)
            if cfg.distill_weight > 0 and bool(mask.any()):
                target = teacher(frames[mask]).float()
                value = value + cfg.distill_weight * distill(embeddings[mask], target)
        if hasattr(loss_fn, "step"):  # A-Softmax anneals once per optimiser step
            loss_fn.step()
        optimiser.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(list(student.parameters()) + list(loss_fn.parameters()), CLIP_NORM)
        optimiser.step()
        losses.append(float(value.detach()))
        bar.update()
        if time.perf_counter() - started > cfg.time_budget_s:
            log.info("refresh: time budget of %.0f s spent after %d steps", cfg.time_budget_s, step)
            break
    bar.close()
    seconds = time.perf_counter() - started
    stats = {
        "loss": cfg.loss,
        "steps": step,
        "batch": [n, m],
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step, 1), 3),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "device": device.type,
    }
    return student.cpu().eval(), stats


def _batch_shape(labels: np.ndarray, cfg: RefreshConfig) -> tuple[int, int]:
    """(N speakers, M utterances) per batch, shrunk to what the data allows."""
    counts = np.bincount(labels)
    m = cfg.utterances_per_speaker
    while m > 2 and (counts >= m).sum() < 2:
        m -= 1
    n = min(cfg.speakers_per_batch, int((counts >= m).sum()))
    if n < 2 or counts.max() < 2:
        raise _NotEnoughData(
            f"training needs at least 2 speakers with 2 trainable utterances each; have {int((counts >= 2).sum())}"
        )
    return n, m


class _NotEnoughData(Exception):
    """Nothing worth training on: the refresh is skipped, not failed."""


def _forever(sampler):
    while True:  # each pass over a sampler is a new, differently shuffled epoch
        yield from sampler


# -- gate ------------------------------------------------------------------------------


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


# -- embedding a whole version -----------------------------------------------------------


def embed_utterances(engine: Engine, embedder: Embedder, ids: list[int], *, desc: str, progress: bool) -> dict[int, np.ndarray]:
    """Embed stored utterances, ``EMBED_CHUNK`` at a time; returns ``{id: vector}``."""
    out: dict[int, np.ndarray] = {}
    with tqdm(total=len(ids), desc=desc, unit="utt", disable=not progress, leave=False) as bar:
        for start in range(0, len(ids), EMBED_CHUNK):
            kept = load_stored(engine, ids[start : start + EMBED_CHUNK], embedder.encoder.frontend)
            speech = {uid: k for uid, k in kept.items() if k.ndim == 1}
            features = {uid: k for uid, k in kept.items() if k.ndim == 2}
            out.update(zip(speech, embedder.embed(list(speech.values()))))
            out.update(zip(features, embedder.embed_features(list(features.values()))))
            bar.update(min(EMBED_CHUNK, len(ids) - start))
    return out


def store_embeddings(engine: Engine, version: int, vectors: dict[int, np.ndarray]) -> None:
    items = sorted(vectors.items())
    for start in range(0, len(items), WRITE_CHUNK):
        engine.store.add_embeddings(version, items[start : start + WRITE_CHUNK])


def activate_complete(engine: Engine, version: ModelVersion, *, reason: str, progress: bool) -> int:
    """Embed every utterance ``version`` lacks, then move "active" to it atomically.

    Enrollments may keep arriving under the old version while this runs; each round embeds
    what is missing and tries the move, which only succeeds when nothing is missing at the
    moment of the move. Returns how many utterances were embedded here.
    """
    from engine.engine import actor

    embedder = engine.embedder(version)
    added = 0
    for _ in range(PROMOTE_ATTEMPTS):
        missing = [uid for uid, _ in engine.store.missing_embeddings(version.number)]
        if missing:
            vectors = embed_utterances(engine, embedder, missing, desc=f"embedding under v{version.number}", progress=progress)
            store_embeddings(engine, version.number, vectors)
            added += len(vectors)
        try:
            engine.store.set_alias("active", version.number, actor=actor(), reason=reason, require_complete=True)
            return added
        except IncompleteVersion:
            continue  # enrollments arrived in between: embed those too
    raise IncompleteVersion(f"enrollments kept arriving; version {version.number} could not be completed")


# -- the whole refresh -----------------------------------------------------------------


def calibrate_quietly(engine: Engine, version: int) -> dict:
    """Calibrate ``version``; too little data is reported, not raised (cosine decides then)."""
    try:
        return engine.calibrate(version).trials
    except NotEnoughData as exc:
        log.warning("version %d not calibrated: %s", version, exc)
        return {"skipped": str(exc)}


def job_owner() -> str:
    """``host:pid`` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run(engine: Engine, *, dry_run: bool = False, reason: str = "manual", progress: bool = False) -> RefreshReport:
    """Build a candidate from the active version, gate it, and promote or reject it.

    Holds the database-wide refresh lock throughout (:class:`~engine.errors.RefreshBusy`
    if taken). Any failure marks the job failed and leaves the active version as it was.
    """
    store, cfg = engine.store, engine.config.refresh
    LOSSES.get(cfg.loss)  # an unknown loss fails before any work
    with store.exclusive("refresh"):
        job, interrupted = store.start_job("refresh", reason, owner=job_owner())
        for old in interrupted:
            log.warning("job %d was interrupted (its process stopped); marked failed", old.id)
        parent = engine.active_version()
        report = RefreshReport(job=job.id, status="skipped", parent=parent.number)
        try:
            _refresh(engine, parent, report, dry_run=dry_run, progress=progress)
        except _NotEnoughData as exc:
            report.status, report.reasons = "skipped", [str(exc)]
        except BaseException as exc:
            # KeyboardInterrupt too: the job must not stay "running" after a clean stop.
            store.update_job(job.id, status="failed", result={**report.to_dict(), "error": str(exc) or type(exc).__name__})
            raise
        status = {"promoted": "succeeded", "dry-run": "succeeded"}.get(report.status, report.status)
        store.update_job(job.id, status=status, version=report.version, result=report.to_dict())
        return report


def _refresh(engine: Engine, parent: ModelVersion, report: RefreshReport, *, dry_run: bool, progress: bool) -> None:
    store, cfg, timings = engine.store, engine.config.refresh, report.timings
    clock = time.perf_counter()
    utterances = store.utterances()
    trainable, held = split(utterances, cfg.holdout_fraction)
    new, replay = choose_training(trainable, parent, cfg)
    if not new:
        raise _NotEnoughData(f"no new utterances since version {parent.number} was trained")
    if len(held) < cfg.min_holdout:
        # Known before any training: don't spend minutes on a candidate nobody can judge.
        raise _NotEnoughData(
            f"only {len(held)} held-out utterance(s) for the gate, {cfg.min_holdout} needed "
            f"(refresh.min_holdout); enroll more, or raise refresh.holdout_fraction"
        )
    chosen = new + replay
    kept_by_id = load_stored(engine, [u.id for u in chosen], engine.embedder(parent).encoder.frontend)
    chosen = [u for u in chosen if u.id in kept_by_id]  # deleted meanwhile
    names, matrix = store.centroid_matrix(parent.number)
    init_heads = dict(zip(names, matrix))
    replay_ids = {u.id for u in replay}
    timings["load_s"] = round(time.perf_counter() - clock, 2)
    report.metrics["data"] = {
        "utterances": len(utterances),
        "held_out": len(held),
        "new": len(new),
        "replayed": len(replay),
        "speakers": len({u.speaker for u in utterances}),
    }

    parent_encoder = engine.embedder(parent).encoder
    candidate, report.metrics["training"] = train(
        parent_encoder,
        [kept_by_id[u.id] for u in chosen],
        [u.speaker for u in chosen],
        np.array([u.id in replay_ids for u in chosen]),
        init_heads,
        cfg,
        engine.config.encoder.device,
        progress,
    )
    timings["train_s"] = report.metrics["training"]["seconds"]

    clock = time.perf_counter()
    embedder = Embedder(candidate, device=engine.config.encoder.device, batch_windows=engine.config.encoder.batch_windows)
    snapshot = [u.id for u in utterances]
    candidate_vectors = embed_utterances(engine, embedder, snapshot, desc="re-embedding", progress=progress)
    timings["embed_s"] = round(time.perf_counter() - clock, 2)
    timings["embed_utterances_per_s"] = round(len(candidate_vectors) / max(timings["embed_s"], 1e-9), 1)

    ids, speakers, parent_matrix = store.version_embeddings(parent.number)
    row = {int(uid): i for i, uid in enumerate(ids)}
    common = [uid for uid in snapshot if uid in row and uid in candidate_vectors]
    speaker_of = {u.id: u.speaker for u in utterances}
    held_ids = {u.id for u in held}
    old_speakers = {u.speaker for u in utterances if u.id <= parent.trained_through}
    held_mask = np.array([uid in held_ids for uid in common])
    gate_speakers = [speaker_of[uid] for uid in common]
    report.metrics["parent"] = gate_metrics(parent_matrix[[row[uid] for uid in common]], gate_speakers, held_mask, old_speakers)
    report.metrics["candidate"] = gate_metrics(np.stack([candidate_vectors[uid] for uid in common]), gate_speakers, held_mask, old_speakers)
    report.reasons = decide(report.metrics["parent"], report.metrics["candidate"], cfg)
    if not cfg.gate and report.reasons:
        report.metrics["gate_overridden"] = report.reasons
        report.reasons = []

    if dry_run:
        report.status = "dry-run"
        return

    number = max(v.number for v in store.list_versions()) + 1  # only refreshes create versions, one at a time
    relative = Path("checkpoints") / f"v{number:04d}.pt"
    sha = save_checkpoint(candidate.state_dict(), engine.home / relative)
    version = store.create_version(
        encoder=parent.encoder,
        config=engine.config.to_dict(),
        checkpoint=str(relative),
        checkpoint_sha256=sha,
        parent=parent.number,
        status="rejected" if report.reasons else "candidate",
        metrics=report.metrics,
        note="; ".join(report.reasons) or None,
        trained_through=max(snapshot),
    )
    report.version = version.number
    if report.reasons:
        report.status = "rejected"
        return
    store.update_job(report.job, version=version.number)

    clock = time.perf_counter()
    store_embeddings(engine, version.number, candidate_vectors)
    timings["store_s"] = round(time.perf_counter() - clock, 2)
    # Calibrated before it becomes active, so its first decisions already use its own
    # thresholds (a new encoder moves every score).
    report.metrics["calibration"] = calibrate_quietly(engine, version.number)
    clock = time.perf_counter()
    caught_up = activate_complete(engine, version, reason=f"refresh job {report.job}: gate passed", progress=progress)
    timings["promote_s"] = round(time.perf_counter() - clock, 2)
    report.metrics["enrolled_during_refresh"] = caught_up
    report.status = "promoted"
