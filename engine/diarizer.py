"""Diarization of one recording on the active version: who spoke when, by name where known.

The recording is read block by block (:mod:`voiceprint.engine.recording`), its speech is
covered by encoder windows and the windows are clustered (:mod:`voiceprint.engine.diarization`).
Each cluster's centroid then goes through the version's own open-set identification
(:meth:`Recognizer.identify_embedding`): the same back-end, threshold and calibration as
``identify``, so "unknown" keeps the false-accept rate measured for identify. Clusters
given the same enrolled name become one speaker; the others are ``unknown-1``,
``unknown-2``, ... in order of first appearance. Nothing is stored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from voiceprint.engine import diarization, recording
from voiceprint.engine.audio import SAMPLE_RATE, Source, level_gain
from voiceprint.engine.config import Config
from voiceprint.engine.errors import InvalidInput
from voiceprint.engine.models import ModelRegistry
from voiceprint.engine.recognition import Recognizer
from voiceprint.engine.results import Diarization, Segment, SpeakerFound

log = logging.getLogger(__name__)

BLOCK_S = 60.0


class Diarizer:
    def __init__(self, models: ModelRegistry, recognizer: Recognizer, config: Config) -> None:
        self.models = models
        self.recognizer = recognizer
        self.config = config

    def diarize(
        self,
        source: Source,
        *,
        speakers: int | None = None,
        name: str | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
    ) -> Diarization:
        cfg = self.config.diarization
        if speakers is not None and not 1 <= speakers <= cfg.max_speakers:
            raise InvalidInput(f"the number of speakers must lie in 1..{cfg.max_speakers} ([diarization] max_speakers)")
        version = self.models.active()
        info, windows, x = self.embed_windows(source, version, name=name, on_progress=on_progress)
        labels = diarization.cluster(
            x, threshold=cfg.threshold, speakers=speakers, method=cfg.clustering, max_speakers=cfg.max_speakers,
            durations=np.array([w.own_end - w.own_start for w in windows]), min_speaker_s=cfg.min_speaker_s,
        )
        return self.name_clusters(info, version, windows, x, labels, speakers)

    def embed_windows(
        self, source: Source, version, *, name: str | None = None, on_progress: Callable[[int, int, str], None] | None = None
    ) -> tuple[recording.RecordingInfo, list[diarization.Window], np.ndarray]:
        """The recording's speech windows and their embeddings under ``version``."""
        cfg = self.config.diarization
        embedder = self.models.embedder(version)
        info, sound = recording.open_recording(source, self.config.audio, cfg.max_duration_s, name=name)
        total = recording.block_count(info, BLOCK_S)
        windows: list[diarization.Window] = []
        embeddings: list[np.ndarray] = []
        for done, block in enumerate(recording.blocks(info, sound, self.config.audio, block_s=BLOCK_S), 1):
            placed = diarization.layout(block.speech, embedder.window_s, cfg.window_step_s)
            if placed:
                clips = [self._clip(block, w, embedder.window_s) for w in placed]
                embeddings.append(embedder.embed(clips))
                windows += placed
            if on_progress is not None:
                on_progress(done, total, "embedding")
        return info, windows, np.concatenate(embeddings)

    def _clip(self, block: recording.Block, window: diarization.Window, window_s: float) -> np.ndarray:
        """The window's samples, kept inside the block, at the level enrollments are embedded at."""
        length = round(window_s * SAMPLE_RATE)
        begin = round((window.start - block.offset_s) * SAMPLE_RATE)
        begin = max(0, min(begin, len(block.samples) - length))
        clip = block.samples[begin : begin + length]
        if len(clip) < length:  # a block shorter than one window: the last seconds of a file
            clip = np.pad(clip, (0, length - len(clip)))
        rms = float(np.sqrt(np.mean(np.square(clip, dtype=np.float64))))
        if rms == 0.0:
            return clip
        return clip * np.float32(level_gain(clip, 20.0 * math.log10(rms), self.config.audio))

    def name_clusters(
        self, info: recording.RecordingInfo, version, windows: list[diarization.Window], x: np.ndarray,
        labels: np.ndarray, speakers: int | None = None, clustering: str | None = None,
    ) -> Diarization:
        """Name each cluster of windows by the version's open-set identification, and lay
        the named clusters out as segments."""
        cfg = self.config.diarization
        owned = np.array([w.own_end - w.own_start for w in windows])
        speakers_found: dict[str, SpeakerFound] = {}  # by name, in order of first appearance
        name_of: list[str] = []  # per cluster
        answer = None
        for k in range(int(labels.max()) + 1):  # clusters are numbered by first appearance
            members = labels == k
            centroid = x[members].mean(axis=0)
            centroid = (centroid / max(float(np.linalg.norm(centroid)), 1e-12)).astype(np.float32)
            answer = self.recognizer.identify_embedding(centroid, version, top=1, source=info.source)
            best = answer.candidates[0] if answer.candidates else None
            score = _rounded(best.on(answer.backend)) if best is not None else None
            name = answer.decision or f"unknown-{sum(not s.enrolled for s in speakers_found.values()) + 1}"
            speech = float(owned[members].sum())
            before = speakers_found.get(name)
            if before is not None:  # a second cluster decided for the same enrolled speaker: one person
                speakers_found[name] = SpeakerFound(name, True, before.speech_s + speech, max(before.score, score), name)
            else:
                speakers_found[name] = SpeakerFound(name, answer.decision is not None, speech, score, best and best.speaker)
            name_of.append(name)
        order = list(speakers_found)
        turns = diarization.turns(windows, [order.index(name_of[k]) for k in labels], join_gap_s=cfg.join_gap_s)
        segments = []
        for turn in turns:
            who = speakers_found[order[turn.cluster]]
            segments.append(Segment(round(turn.start, 3), round(turn.end, 3), who.speaker, who.score if who.enrolled else None))
        notes = list(answer.notes)
        if speakers is not None and len(order) != speakers:
            notes.append(f"{speakers} speakers were asked for; {len(order)} remain once clusters matched to the same enrolled speaker were joined")
        log.info("%s: %d segments, %d speakers (%d enrolled)", info.source, len(segments), len(order),
                 sum(s.enrolled for s in speakers_found.values()))
        return Diarization(
            info.source, version.number, round(info.duration_s, 3), round(float(owned.sum()), 3), tuple(segments),
            tuple(replace(s, speech_s=round(s.speech_s, 3)) for s in speakers_found.values()),
            answer.backend, answer.threshold, clustering or cfg.clustering, tuple(notes),
        )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
