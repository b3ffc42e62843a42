"""The live 1:N index: approximate above ``[index] approximate_from``, changed in place by
the change feed, and built again in the background from ``[index] background_from``
speakers while the index before it keeps answering."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from voiceprint.engine import Engine
from voiceprint.engine.ann import ApproximateSearch
from voiceprint.engine.index import CentroidIndex


def _speakers(rng: np.random.Generator, n: int, dim: int = 64) -> np.ndarray:
    """Unit vectors with a few strong directions, as speaker embeddings have (isotropic
    noise would be the worst case for any approximate index, and unlike speech)."""
    scales = np.exp(-np.arange(dim) / 12.0)
    rows = rng.standard_normal((n, dim)) * scales
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _near(rng: np.random.Generator, rows: np.ndarray, spread: float = 0.4) -> np.ndarray:
    probes = rows + spread * _speakers(rng, len(rows), rows.shape[1])
    return probes / np.linalg.norm(probes, axis=1, keepdims=True)


def test_the_approximate_index_finds_what_exact_search_finds_and_changes_in_place() -> None:
    rng = np.random.default_rng(3)
    rows = _speakers(rng, 20_000)
    keys = np.arange(100, 20_100)
    ann = ApproximateSearch(keys, rows)
    probes = _near(rng, rows[:300])
    exact = keys[np.argmax(probes @ rows.T, axis=1)]
    found = [ann.search(p, 32) for p in probes]
    assert np.mean([e in f for e, f in zip(exact, found)]) >= 0.99
    moved = _speakers(rng, 1)
    ann.put([keys[7]], moved)  # a profile that moved is found where it is now, once
    hits = ann.search(moved[0], 5)
    assert hits[0] == keys[7] and list(hits).count(keys[7]) == 1
    ann.remove([keys[7]])
    assert keys[7] not in ann.search(moved[0], 5) and len(ann) == 19_999


def test_an_approximate_centroid_index_answers_as_the_exact_one() -> None:
    rng = np.random.default_rng(4)
    rows = _speakers(rng, 5_000)
    names = [f"s{i}" for i in range(len(rows))]
    exact, approximate = CentroidIndex(names, rows), CentroidIndex(names, rows, approximate=True)
    assert (exact.kind, approximate.kind) == ("exact", "approximate")
    probes = _near(rng, rows[:200])
    same = [exact.search(p, 1)[0] == approximate.search(p, 1)[0] for p in probes]
    assert np.mean(same) >= 0.99
    assert approximate.recall(probes) == pytest.approx(np.mean(same))
    approximate.remove([3])
    assert "s3" not in [h.speaker for h in approximate.search(rows[3], 5)]
    assert exact.recall(probes) is None  # nothing to compare an exact index with


def _enroll(eng: Engine, voices: dict[str, list[Path]], per_speaker: int) -> None:
    for speaker, paths in sorted(voices.items()):
        for path in paths[:per_speaker]:
            eng.enroll(speaker, path)


@pytest.mark.data
def test_an_engine_above_approximate_from_answers_and_reports_recall(tmp_path, by_speaker) -> None:
    """Every gallery approximate (``approximate_from = 1``): identify ranks the same speakers
    as exact search, a new enrollment is written into the index in place (not built again),
    and ``index status`` reports the recall on stored utterances. The exact engine's
    calibration is fitted on a sample of its speakers (``calibration_speakers``)."""
    voices = {**by_speaker("librispeech-test-other"), **by_speaker("vctk-4")}
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[index]\napproximate_from = 1\n[scoring]\nmin_cohort = 20\nmin_calibration_speakers = 5\n")
    late = sorted(voices)[-1]
    with Engine.init(home=home) as eng:
        _enroll(eng, {s: p for s, p in voices.items() if s != late}, 3)
        eng.calibrate()
        probes = [paths[5] for _, paths in sorted(voices.items())]
        first = [eng.identify(p).candidates[0].speaker for p in probes]
        served = eng.recognizer.indexes.index(1, eng.recognizer.scoring(1))
        assert served.index.kind == "approximate"
        _enroll(eng, {late: voices[late]}, 3)
        assert eng.identify(voices[late][5]).candidates[0].speaker == late
        # The same served index, the new speaker written into it.
        assert eng.recognizer.indexes.index(1, eng.recognizer.scoring(1)) is served
        (status,) = eng.index_status()
        assert (status["kind"], status["speakers"], status["behind"]) == ("approximate", len(voices), 0)
        assert status["recall_at_1"] == 1.0 and status["recall_probes"] >= 20
    exact_home = tmp_path / "exact"
    exact_home.mkdir()
    # Here the calibration is also fitted on a sample of the speakers, as at a million.
    (exact_home / "config.toml").write_text("[scoring]\nmin_cohort = 20\nmin_calibration_speakers = 5\ncalibration_speakers = 8\n")
    with Engine.init(home=exact_home) as eng:
        _enroll(eng, {s: p for s, p in voices.items() if s != late}, 3)
        fitted = eng.calibrate()
        assert (fitted.trials["speakers"], fitted.settings["speakers_enrolled"]) == (8, len(voices) - 1)
        assert not eng.recognizer.needs_calibration(1)  # 13 speakers now, 13 then: not 8
        assert [eng.identify(p).candidates[0].speaker for p in probes] == first
        assert eng.index_status()[0]["recall_at_1"] is None


@pytest.mark.data
def test_an_index_built_empty_takes_the_first_speakers_and_turns_approximate_as_it_grows(tmp_path, by_speaker) -> None:
    voices = by_speaker("vctk-4")
    a, b = sorted(voices)[:2]
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[index]\napproximate_from = 2\n")
    with Engine.init(home=home) as eng:
        assert eng.identify(voices[a][0]).reason == "no speaker is enrolled"  # an index of nobody, built
        eng.enroll(a, voices[a][0])
        assert eng.identify(voices[a][1]).candidates[0].speaker == a  # written into it: it learnt the dimension
        assert eng.index_status()[0]["kind"] == "exact"
        eng.enroll(b, voices[b][0])
        assert eng.identify(voices[b][1]).candidates[0].speaker == b
        _until(lambda: eng.index_status()[0]["kind"] == "approximate")  # built again, in the background
        assert eng.identify(voices[b][1]).candidates[0].speaker == b


def _until(check, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("not within the time allowed")


@pytest.mark.data
def test_a_new_scoring_state_or_version_is_indexed_in_the_background_while_the_old_one_answers(tmp_path, by_speaker) -> None:
    """``background_from = 1``: after a calibration the next answer still comes from the
    uncalibrated index, then from the calibrated one, which also holds a speaker enrolled
    while it was built; after a promotion, version 1 answers until version 2 is indexed."""
    voices = {**by_speaker("librispeech-test-other"), **by_speaker("vctk-4")}
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        "[index]\nbackground_from = 1\n[scoring]\nmin_cohort = 20\nmin_calibration_speakers = 5\n"
        "[refresh]\nsteps = 2\nspeakers_per_batch = 4\nholdout_fraction = 0.3\ngate = false\n"
    )
    late = sorted(voices)[0]
    with Engine.init(home=home) as eng:
        _enroll(eng, {s: p for s, p in voices.items() if s != late}, 3)
        probe = voices[sorted(voices)[3]][5]
        assert eng.identify(probe).backend == "cosine"  # not calibrated yet: built before this answer
        eng.calibrate()
        assert eng.identify(probe).backend == "cosine"  # the older index answers while the new one is built
        _enroll(eng, {late: voices[late]}, 3)
        _until(lambda: eng.identify(probe).backend == "asnorm+calibrated")
        assert eng.identify(voices[late][5]).candidates[0].speaker == late
        assert not eng.index_status()[0]["rebuilding"]

        report = eng.refresh()
        assert report.status == "promoted"
        assert eng.identify(probe).version == 1  # version 2 is indexed in the background meanwhile
        _until(lambda: eng.identify(probe).version == 2)
        answer = eng.identify(voices[late][5])
        assert answer.version == 2 and answer.candidates[0].speaker == late
        eng.rollback(1)
        assert eng.identify(probe).version == 1  # indexed already: no wait
