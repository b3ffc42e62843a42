"""Refresh and rollback: build a candidate version, gate it, promote it; or go back.

A refresh, step by step (every step is undone by simply not reaching the last one):

1. Snapshot the stored utterances. A fixed slice of each speaker's utterances is held
   out for the gate (:mod:`voiceprint.engine.gate`): never trained on.
2. Training data: the utterances new since the parent (active) version was trained, plus
   a speaker-balanced replay sample of older ones (:mod:`voiceprint.engine.replay`).
3. Train a copy of the parent (:mod:`voiceprint.engine.training`).
4. Embed every utterance of the snapshot under the candidate and run the gate. With
   ``[refresh] interpolate``, mixes of parent and tuned weights are embedded too, and
   the one the unseen speakers score best under becomes the candidate.
5. Promotion: store the candidate's embeddings and centroids, calibrate it, embed
   whatever was enrolled meanwhile, and move the "active" alias in one transaction that
   first checks nothing is missing. Until that commit the parent stays active and untouched.
   The same transaction checks that every utterance trained on is still stored: a
   candidate that learned from audio erased during the refresh is rejected instead, and
   its weights deleted (an erasure names the refreshes running while it happened).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from voiceprint.engine import gate, kept
from voiceprint.engine.config import Config
from voiceprint.engine.embedder import Embedder
from voiceprint.engine.errors import IncompleteVersion, NotEnoughData, TrainingDataErased, UnfinishedVersion, VoiceprintError
from voiceprint.engine.home import actor
from voiceprint.engine.jobs import running_job, unfinished
from voiceprint.engine.losses import LOSSES
from voiceprint.engine.models import ACTIVE, ModelRegistry, require_weights
from voiceprint.engine.progress import Progress, report
from voiceprint.engine.results import RefreshReport
from voiceprint.engine.training import NothingToTrain, check_frozen_layers, choose_training, interpolate, train
from voiceprint.storage import ModelVersion, Store

log = logging.getLogger(__name__)

EMBED_CHUNK = 64  # utterances decoded and embedded together when re-embedding
WRITE_CHUNK = 256  # embeddings per transaction when storing a version's embeddings
PROMOTE_ATTEMPTS = 20  # catch-up rounds before giving up on a busy enrollment stream
MIX_ALPHAS = (1.0, 0.75, 0.5, 0.25)  # WiSE-FT mixes tried ([refresh] interpolate); a tie keeps more learning
ERASED_MEANWHILE = "a speaker it trained on was erased during the refresh (or an utterance removed): its weights were deleted"


class Refresher:
    """Refresh, promote and roll back model versions of one store.

    ``calibrate(version)`` fits a version's calibration (the recognizer's); a candidate
    is calibrated before it becomes active, so its first decisions use its own thresholds.
    """

    def __init__(self, store: Store, models: ModelRegistry, config: Config, calibrate) -> None:
        self.store, self.models, self.config = store, models, config
        self._calibrate = calibrate

    # -- refresh -----------------------------------------------------------------------

    def refresh(self, *, dry_run: bool = False, reason: str = "manual", on_progress: Progress | None = None) -> RefreshReport:
        """Build a candidate from the active version, gate it, and promote or reject it.

        Holds the database-wide refresh lock throughout (:class:`~voiceprint.engine.errors.RefreshBusy`
        if taken). Any failure marks the job failed and leaves the active version as it was.
        """
        LOSSES.get(self.config.refresh.loss)  # an unknown loss fails before any work
        with running_job(self.store, "refresh", reason, dry_run=dry_run) as job:
            parent = self.models.active()
            result = RefreshReport(job=job.id, status="skipped", parent=parent.number)
            job.snapshot = result.to_dict
            try:
                self._refresh(job, parent, result, dry_run=dry_run, on_progress=job.recording(on_progress))
            except NothingToTrain as exc:
                result.status, result.reasons = "skipped", [str(exc)]
            status = {"promoted": "succeeded", "dry-run": "succeeded"}.get(result.status, result.status)
            job.finish(status, version=result.version, result=result.to_dict())
            return result

    def _refresh(self, job, parent: ModelVersion, result: RefreshReport, *, dry_run: bool, on_progress) -> None:
        utterances = self.store.profiles.utterances()
        tuned, held, unseen, trained = self._train_candidate(parent, utterances, result, on_progress)
        clock = time.perf_counter()
        snapshot = [u.id for u in utterances]
        candidate, vectors, embedded = self._embed_candidate(parent, tuned, snapshot, self._gate_view(parent, utterances, held, unseen), result, on_progress)
        result.timings["embed_s"] = round(time.perf_counter() - clock, 2)
        result.timings["embed_utterances_per_s"] = round(embedded / max(result.timings["embed_s"], 1e-9), 1)
        self._judge(result)
        if dry_run:
            result.status = "dry-run"
            return
        version = self.models.create(
            candidate,
            name=parent.encoder,
            parent=parent.number,
            status="rejected" if result.reasons else "candidate",
            metrics=result.metrics,
            note="; ".join(result.reasons) or None,
            trained_through=max(snapshot),
        )
        result.version = version.number
        if result.reasons:
            result.status = "rejected"
            # Checked after the version exists: an erasure from here on lists it in trained_into.
            if self.store.registry.deleted_training_data(trained):
                self._discard_erased(version, result)
            return
        job.attach(version.number)
        self._promote(version, vectors, result, job.id, trained, on_progress)

    def _train_candidate(self, parent: ModelVersion, utterances: list, result: RefreshReport, on_progress):
        """Choose the training data, load what was kept of it, and train; returns the
        candidate encoder, the gate's held-out utterances, the unseen speakers, and what
        it trained on (``{utterance id: content sha256}``, checked again at promotion)."""
        cfg, clock = self.config.refresh, time.perf_counter()
        unseen = gate.unseen_speakers({u.speaker for u in utterances}, cfg.unseen_speaker_fraction)
        trainable, held = gate.split(utterances, cfg.holdout_fraction, unseen)
        vector_of = None
        if cfg.replay_selection == "herding" and cfg.replay_size:
            ids, _, matrix = self.store.embeddings.version_embeddings(parent.number)
            vector_of = {int(uid): row for uid, row in zip(ids, matrix)}
        new, replay = choose_training(trainable, parent.trained_through, cfg, vector_of)
        if not new:
            raise NothingToTrain(f"no new utterances since version {parent.number} was trained")
        if len(held) < cfg.min_holdout:
            # Known before any training: don't spend minutes on a candidate nobody can judge.
            raise NothingToTrain(
                f"only {len(held)} held-out utterance(s) for the gate, {cfg.min_holdout} needed "
                f"(refresh.min_holdout); enroll more, or raise refresh.holdout_fraction"
            )
        parent_encoder = self.models.embedder(parent).encoder
        check_frozen_layers(parent_encoder, cfg.frozen_layers)  # before minutes of loading
        chosen = new + replay
        log.info("refresh: loading the kept data of %d new and %d replayed utterances", len(new), len(replay))
        kept_by_id = self.load_kept([u.id for u in chosen], parent_encoder.frontend, on_progress=on_progress)
        chosen = [u for u in chosen if u.id in kept_by_id]  # deleted meanwhile
        names, matrix = self.store.profiles.centroid_matrix(parent.number)
        replay_ids = {u.id for u in replay}
        result.timings["load_s"] = round(time.perf_counter() - clock, 2)
        result.metrics["data"] = {
            "utterances": len(utterances),
            "held_out": len(held),
            "new": len(new),
            "replayed": len(replay),
            "speakers": len({u.speaker for u in utterances}),
            "unseen_speakers": len(unseen),
        }
        candidate, result.metrics["training"] = train(
            parent_encoder,
            [kept_by_id[u.id] for u in chosen],
            [u.speaker for u in chosen],
            np.array([u.id in replay_ids for u in chosen]),
            dict(zip(names, matrix)),
            cfg,
            self.config.encoder.device,
            on_progress,
        )
        result.timings["train_s"] = result.metrics["training"]["seconds"]
        log.info("refresh: trained %d steps in %.0f s", result.metrics["training"]["steps"], result.timings["train_s"])
        return candidate, held, unseen, {u.id: u.content_sha256 for u in chosen}

    def _embed_candidate(self, parent: ModelVersion, tuned, snapshot: list[int], judge_on, result: RefreshReport, on_progress):
        """Embed the snapshot under the tuned encoder (and, with ``[refresh] interpolate``,
        under each WiSE-FT mix, keeping the best by :func:`gate.mixing_score`); fills the
        gate metrics in ``result``. Returns the candidate, its embeddings, and how many
        utterances were embedded in all."""
        mixes = MIX_ALPHAS if self.config.refresh.interpolate else (1.0,)
        parent_encoder = self.models.embedder(parent).encoder
        best, tried = None, {}
        for alpha in mixes:
            encoder = tuned if alpha == 1.0 else interpolate(parent_encoder, tuned, alpha)
            embedder = Embedder(encoder, device=self.config.encoder.device, batch_windows=self.config.encoder.batch_windows)
            what = "re-embedding" if len(mixes) == 1 else f"re-embedding (mix {alpha:g})"
            log.info("refresh: %s %d utterances", what, len(snapshot))
            vectors = self.embed_utterances(embedder, snapshot, what=what, on_progress=on_progress)
            report(on_progress, 0, 1, "gate")
            parent_metrics, metrics = judge_on(vectors)
            report(on_progress, 1, 1, "gate")
            score = tried[f"{alpha:g}"] = gate.mixing_score(metrics)
            if best is None or score > best[0]:
                best = (score, alpha, encoder, vectors, parent_metrics, metrics)
        _, alpha, candidate, vectors, result.metrics["parent"], result.metrics["candidate"] = best
        if len(mixes) > 1:
            result.metrics["interpolation"] = {"alpha": alpha, "mixing_score_by_alpha": tried}
        return candidate, vectors, len(mixes) * len(vectors)

    def _gate_view(self, parent: ModelVersion, utterances: list, held: list, unseen: set[str]):
        """The gate's judge for this snapshot: a function from candidate embeddings
        ``{id: vector}`` to (parent metrics, candidate metrics), both on the held-out
        utterances that parent and candidate embedded (one deleted meanwhile is left out)."""
        ids, _, parent_matrix = self.store.embeddings.version_embeddings(parent.number)
        row = {int(uid): i for i, uid in enumerate(ids)}
        speaker_of = {u.id: u.speaker for u in utterances}
        held_ids = {u.id for u in held}
        old_speakers = {u.speaker for u in utterances if u.id <= parent.trained_through}
        centre = self.config.scoring.centre  # judged on the scores the product will use

        def judge_on(vectors: dict) -> tuple[dict, dict]:
            common = [u.id for u in utterances if u.id in row and u.id in vectors]
            args = ([speaker_of[uid] for uid in common], np.array([uid in held_ids for uid in common]), old_speakers, unseen)
            return (gate.gate_metrics(parent_matrix[[row[uid] for uid in common]], *args, centre=centre),
                    gate.gate_metrics(np.stack([vectors[uid] for uid in common]), *args, centre=centre))

        return judge_on

    def _judge(self, result: RefreshReport) -> None:
        """The reasons to reject the candidate (none: promote), from the gate metrics of
        parent and candidate on the same held-out utterances."""
        result.reasons = gate.decide(result.metrics["parent"], result.metrics["candidate"], self.config.refresh)
        if not self.config.refresh.gate and result.reasons:
            result.metrics["gate_overridden"] = result.reasons
            result.reasons = []

    def _promote(self, version: ModelVersion, vectors: dict, result: RefreshReport, job_id: int, trained, on_progress) -> None:
        if self.store.registry.deleted_training_data(trained):  # known already: spare the work below
            self._discard_erased(version, result)
            return
        clock = time.perf_counter()
        self.store_embeddings(version.number, vectors)
        result.timings["store_s"] = round(time.perf_counter() - clock, 2)
        # Calibrated before it becomes active, so its first decisions already use its own
        # thresholds (a new encoder moves every score).
        result.metrics["calibration"] = self.calibrate_quietly(version.number, previous=version.parent)
        clock = time.perf_counter()
        reason = f"refresh job {job_id}: gate passed"
        try:
            caught_up = self.activate_complete(version, reason=reason, on_progress=on_progress, trained=trained)
        except TrainingDataErased:
            self._discard_erased(version, result)
            return
        result.timings["promote_s"] = round(time.perf_counter() - clock, 2)
        result.metrics["enrolled_during_refresh"] = caught_up
        result.status = "promoted"

    def _discard_erased(self, version: ModelVersion, result: RefreshReport) -> None:
        """Reject a candidate that trained on audio erased during the refresh: its weights
        hold what the erasure removed, so they are deleted (first: a crash right after
        leaves no copy), then its row records why and its embeddings go."""
        self.models.delete_weights(version)
        result.status = "rejected"
        result.reasons.append(ERASED_MEANWHILE)
        self.store.registry.update_version(version.number, status="rejected", note="; ".join(result.reasons))
        self.store.registry.discard_version_data(version.number)
        log.warning("version %d rejected: %s", version.number, ERASED_MEANWHILE)

    # -- rollback ----------------------------------------------------------------------

    def rollback(
        self, number: int, *, reason: str = "rollback", force: bool = False, on_progress: Progress | None = None
    ) -> dict:
        """Make version ``number`` active again.

        Its checkpoint is verified first; utterances enrolled since it was active are
        embedded under it, so its centroids cover every speaker; then the alias moves (and
        the move is appended to the alias history). Nothing changes on any error.

        A candidate whose refresh stopped before promoting it (killed, or failed) passed
        the gate but was never activated nor calibrated: :class:`UnfinishedVersion` unless
        ``force``. A rejected version (the gate said no) is a choice a person may make.
        """
        started = time.perf_counter()
        target = self.models.get(number)
        require_weights(target)  # before "unfinished": no force brings pruned weights back
        if unfinished(target) and not force:
            raise UnfinishedVersion(
                f"version {number} is a candidate its refresh never finished ({target.status}); "
                "it was never active: pass force to activate it anyway"
            )
        self.models.embedder(target)  # verifies the checkpoint before anything is written
        with running_job(self.store, "rollback", reason) as job:
            previous = self.models.active().number
            added, calibration = 0, None
            if previous != number:
                added = self.activate_complete(target, reason=f"{reason} (job {job.id})", on_progress=job.recording(on_progress))
                if self.store.registry.latest_calibration(number) is None:
                    calibration = self.calibrate_quietly(number, previous=previous)
            result = {
                "job": job.id,
                "version": number,
                "previous": previous,
                "embedded": added,
                "seconds": round(time.perf_counter() - started, 2),
                "changed": previous != number,
                "calibration": calibration,  # None: the version kept the calibration it had
            }
            job.finish("succeeded", version=number, result=result)
            return result

    # -- a whole version's embeddings --------------------------------------------------

    def load_kept(self, ids: list[int], frontend: str, *, on_progress: Progress | None = None) -> dict[int, np.ndarray]:
        """What was kept of utterances, decoded for an encoder of ``frontend``, by id;
        with ``on_progress``, read ``EMBED_CHUNK`` at a time and reported as "loading kept audio"."""
        out = {}
        step = EMBED_CHUNK if on_progress is not None else max(len(ids), 1)
        for start in range(0, len(ids), step):
            for uid, (data, codec, rate) in self.store.embeddings.audio_many(ids[start : start + step]).items():
                try:
                    out[uid] = kept.decode(data, codec, rate, frontend=frontend)
                except VoiceprintError as exc:
                    raise type(exc)(f"utterance {uid}: {exc}") from None
            report(on_progress, min(start + step, len(ids)), len(ids), "loading kept audio")
        return out

    def embed_utterances(self, embedder: Embedder, ids: list[int], *, what: str, on_progress=None) -> dict[int, np.ndarray]:
        """Embed stored utterances, ``EMBED_CHUNK`` at a time; returns ``{id: vector}``."""
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), EMBED_CHUNK):
            loaded = self.load_kept(ids[start : start + EMBED_CHUNK], embedder.encoder.frontend)
            out.update(zip(loaded, kept.embed(embedder, list(loaded.values()))))
            report(on_progress, min(start + EMBED_CHUNK, len(ids)), len(ids), what)
        return out

    def store_embeddings(self, version: int, vectors: dict[int, np.ndarray]) -> None:
        items = sorted(vectors.items())
        for start in range(0, len(items), WRITE_CHUNK):
            self.store.embeddings.add_embeddings(version, items[start : start + WRITE_CHUNK])

    def activate_complete(
        self, version: ModelVersion, *, reason: str, on_progress=None, trained: Mapping[int, str] | None = None
    ) -> int:
        """Embed every utterance ``version`` lacks, then move "active" to it atomically.

        Enrollments may keep arriving under the old version while this runs; each round
        embeds what is missing and tries the move, which only succeeds when nothing is
        missing at the moment of the move. Returns how many utterances were embedded here.
        With ``trained`` (what a candidate trained on), the move also requires all of it
        still stored, else :class:`TrainingDataErased`.
        """
        embedder = self.models.embedder(version)
        added = 0
        for _ in range(PROMOTE_ATTEMPTS):
            missing = [uid for uid, _ in self.store.embeddings.missing_embeddings(version.number)]
            if missing:
                what = f"embedding under v{version.number}"
                vectors = self.embed_utterances(embedder, missing, what=what, on_progress=on_progress)
                self.store_embeddings(version.number, vectors)
                added += len(vectors)
            try:
                self.store.registry.set_alias(
                    ACTIVE, version.number, actor=actor(), reason=reason, require_complete=True, require_trained=trained
                )
                return added
            except IncompleteVersion:
                continue  # enrollments arrived in between: embed those too
        raise IncompleteVersion(f"enrollments kept arriving; version {version.number} could not be completed")

    def calibrate_quietly(self, version: int, previous: int | None = None) -> dict:
        """Calibrate ``version``; too little data is reported, not raised (cosine decides then).

        The answer includes the share of the enrolled speakers' own utterances its
        thresholds would identify. When that falls more than 10 points below the share
        under ``previous`` (the version it replaces), a warning is logged and returned:
        an automatic calibration never silences identification without a word.
        """
        try:
            fitted = self._calibrate(version)
        except NotEnoughData as exc:
            log.warning("version %d not calibrated: %s", version, exc)
            return {"skipped": str(exc)}
        out = dict(fitted.trials)
        backend = self.config.scoring.backend if self.config.scoring.backend in fitted.fit else "cosine"
        out["identified"] = now = fitted.fit[backend].get("identified")
        before = self.store.registry.latest_calibration(previous) if previous is not None else None
        then = before[2].get("fit", {}).get(backend, {}).get("identified") if before else None
        if now is not None and then is not None and now < then - 0.10:
            out["warning"] = (
                f"version {version}'s calibration identifies {now:.0%} of the enrolled speakers' own utterances, "
                f"against {then:.0%} under version {previous}: check `voiceprint status` and calibrate again "
                "once more speakers are enrolled"
            )
            log.warning("%s", out["warning"])
        return out
