"""The drift detector on genuine scores, alone and wired into enrollment."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from voiceprint.engine import Engine
from voiceprint.engine.drift import GenuineScoreDrift


def detections(detector: GenuineScoreDrift, scores) -> list[int]:
    return [i for i, s in enumerate(scores) if detector.update(s).drift_detected]


def test_a_fall_is_detected_after_it_happens_and_not_before():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.85, 0.05, 300), rng.normal(0.6, 0.05, 300)]
    found = detections(GenuineScoreDrift(), scores)
    assert found and 300 <= found[0] < 400


def test_steady_scores_and_a_rise_raise_no_signal():
    rng = np.random.default_rng(1)
    assert detections(GenuineScoreDrift(), rng.normal(0.8, 0.05, 1000)) == []
    rise = np.r_[rng.normal(0.6, 0.05, 300), rng.normal(0.85, 0.05, 300)]
    assert detections(GenuineScoreDrift(), rise) == []


def test_non_finite_scores_are_refused():
    detector = GenuineScoreDrift()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            detector.update(bad)
    assert detector.n_seen == 0


def test_mislabelled_enrollments_queue_one_refresh_request(tmp_path, dev_data):
    root = dev_data / "speechocean762-train"
    files: dict[str, list] = {}
    with open(root / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            files.setdefault(row["speaker"], []).append(root / row["path"])
    speakers = list(files)
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[refresh]\nsteps = 3\n")
    with Engine.init(home=home) as eng:
        # Genuine: 30 speakers' own files.
        eng.enroll_many([(s, p, None) for s in speakers[:30] for p in files[s][:10]])
        assert eng.store.jobs.list_jobs() == []
        # Then the labels "break": the next files are filed under the wrong names, so the
        # genuine scores fall (about 0.81 -> 0.72 on average). ADWIN needs a few hundred
        # scores at its default confidence to be sure.
        wrong = [(speakers[i % 30], p, None) for i, s in enumerate(speakers[30:60]) for p in files[s][:8]]
        outcomes = eng.enroll_many(wrong)
        # Most are caught one by one (held for review, outside the profiles), and the
        # fall in scores is reported as well.
        assert sum(getattr(o, "feedback", "") == "INCONSISTENT_SPEAKER" for o in outcomes) > len(wrong) / 2
        assert sum(s.pending for s in eng.speakers()) > len(wrong) / 2
        queued = eng.store.jobs.list_jobs(status="queued")
        assert len(queued) == 1 and queued[0].reason.startswith("drift: genuine enrollment scores fell")
        assert eng.status()["queued"] == 1
        # The next refresh takes the request over as its own job (a real one: a dry run
        # stores nothing, so it never stands in for a request to refresh).
        report = eng.refresh()
        assert report.job == queued[0].id
        assert eng.store.jobs.get_job(report.job).reason.startswith("drift:")
