"""Calibrated decisions, enrollment feedback and profile review, on real speech."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import soundfile as sf

from voiceprint.engine import Engine
from voiceprint.engine.home import load_home_config
from voiceprint.engine.errors import Clipped, NotEnoughData, TooNoisy
from voiceprint.engine.audio import resample


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, by_speaker):
    """30 speakers enrolled and calibrated; 20 others enrolled afterwards (8 utterances
    each) with 4 probes each held back."""
    voices = by_speaker("speechocean762-train")
    names = sorted(voices)
    home = tmp_path_factory.mktemp("calibrated")
    (home / "config.toml").write_text("[scoring]\nverify_far = 0.05\nidentify_far = 0.05\n")
    with Engine.init(home=home) as eng:
        eng.enroll_many([(s, p, None) for s in names[:30] for p in voices[s]])
        calibration = eng.calibrate()
        held_out = names[30:50]
        eng.enroll_many([(s, p, None) for s in held_out for p in voices[s][:8]], force=True)
        probes = {s: voices[s][8:] for s in held_out}
    return home, calibration, probes


def test_calibration_is_stored_with_the_version_and_used_by_every_process(calibrated):
    home, calibration, _ = calibrated
    with Engine.open(home=home) as eng:
        again = eng.calibration()
        assert again.id == calibration.id and again.version == eng.active_version().number
        assert again.thresholds == calibration.thresholds
    assert calibration.trials["speakers"] == 30 and calibration.trials["target"] >= 250
    fit = calibration.fit
    assert fit["asnorm"]["eer"] <= fit["cosine"]["eer"] + 0.01
    assert fit["asnorm+calibrated"]["cllr"] < 0.3


def test_thresholds_hold_their_false_accept_rate_on_speakers_the_fit_never_saw(calibrated):
    home, calibration, probes = calibrated
    held_out = sorted(probes)
    non, tar = [], []
    with Engine.open(home=home) as eng:
        for speaker, files in probes.items():
            for path in files:
                result = eng.identify(path, top=100)
                assert result.backend == "asnorm+calibrated"
                llr = {h.speaker: h.llr for h in result.candidates}
                tar.append(llr[speaker])
                non.extend(llr[s] for s in held_out if s != speaker)
    cut = calibration.thresholds["asnorm+calibrated"]["verify"]
    far = np.mean(np.array(non) >= cut)
    # Requested 0.05, on about 1500 non-target trials of people the fit never saw. The
    # realised rate runs above the request (over 12 random 30/20 splits of these speakers:
    # 8.8 +/- 1.3 % on plain cosines, 9.0 +/- 1.3 % with the centring back-end; this split
    # gives 9.1 and 11.1 %): thresholds that hold on strangers are an open issue of their own.
    assert 0.02 <= far <= 0.12, far
    assert np.mean(np.array(tar) >= cut) > 0.85


def test_identify_and_verify_report_every_scale(calibrated):
    home, calibration, probes = calibrated
    speaker, files = next(iter(probes.items()))
    with Engine.open(home=home) as eng:
        found = eng.identify(files[0], top=3)
        best = found.candidates[0]
        assert best.normalised is not None and best.llr == pytest.approx(calibration.llr(best.normalised))
        # Fitted on 30 speakers, searched among 50: the identify threshold grew with the gallery.
        assert found.threshold == pytest.approx(calibration.identify_threshold("asnorm+calibrated", 50))
        assert found.threshold > calibration.thresholds["asnorm+calibrated"]["identify"]
        assert found.notes == ()  # the configured back-end decides, on a fitted threshold
        verdict = eng.verify(speaker, files[0])
        assert verdict.backend == "asnorm+calibrated" and verdict.llr is not None
        assert verdict.accepted == (verdict.llr >= calibration.thresholds["asnorm+calibrated"]["verify"])


def test_a_cost_decision_uses_the_bayes_threshold(calibrated, tmp_path):
    home, _, probes = calibrated
    speaker, files = next(iter(probes.items()))
    (home / "config.toml").write_text('[scoring]\ndecision = "cost"\np_target = 0.01\n')
    try:
        with Engine.open(home=home) as eng:
            fitted = eng.calibrate()
            assert fitted.thresholds["asnorm+calibrated"]["verify"] == pytest.approx(np.log(99))
            assert eng.verify(speaker, files[0]).threshold == pytest.approx(np.log(99))
    finally:
        (home / "config.toml").write_text("[scoring]\nverify_far = 0.05\nidentify_far = 0.05\n")
        with Engine.open(home=home) as eng:
            eng.calibrate()


def test_calibration_needs_data(tmp_path, by_speaker):
    voices = by_speaker("vctk-4")
    with Engine.init(home=tmp_path) as eng:
        with pytest.raises(NotEnoughData):
            eng.calibrate()
        speaker = sorted(voices)[0]
        eng.enroll(speaker, voices[speaker][0])
        with pytest.raises(NotEnoughData):
            eng.calibrate()


def test_a_wrong_speaker_is_held_for_review_and_accepting_or_removing_is_exact(tmp_path, by_speaker):
    voices = by_speaker("vctk-4")
    ann, bob = sorted(voices)[:2]
    with Engine.init(home=tmp_path) as eng:
        version = eng.active_version().number
        for path in voices[ann][:3]:
            assert eng.enroll(ann, path).feedback == "OK"
        eng.enroll(bob, voices[bob][0])
        before = eng.store.profiles.centroid(ann, version)

        held = eng.enroll(ann, voices[bob][1])  # bob's voice under ann's name
        assert held.feedback == "INCONSISTENT_SPEAKER" and held.count == 3
        assert np.array_equal(eng.store.profiles.centroid(ann, version).sum, before.sum)
        assert [u.id for u in eng.store.profiles.utterances(ann, status="pending")] == [held.utterance_id]
        assert eng.identify(voices[bob][1]).candidates[0].speaker == bob

        eng.accept_utterance(held.utterance_id)
        merged = eng.store.profiles.centroid(ann, version)
        assert merged.count == 4
        np.testing.assert_allclose(merged.mean, eng.store.profiles.embeddings(ann, version).astype(np.float64).mean(axis=0), atol=1e-7)

        eng.remove_utterance(held.utterance_id)
        restored = eng.store.profiles.centroid(ann, version)
        assert restored.count == 3
        np.testing.assert_allclose(restored.sum, before.sum, rtol=0, atol=1e-12)

        forced = eng.enroll(ann, voices[bob][2], force=True)
        assert forced.feedback == "OK" and forced.count == 4


def test_enrollment_reports_progress_toward_the_speech_required(tmp_path, by_speaker):
    voices = by_speaker("vctk-4")
    speaker = sorted(voices)[0]
    (tmp_path / "config.toml").write_text("[enrollment]\nrequired_speech_s = 10\n")
    with Engine.init(home=tmp_path) as eng:
        first = eng.enroll(speaker, voices[speaker][0])
        second = eng.enroll(speaker, voices[speaker][1])
    assert first.profile_speech_s == pytest.approx(first.speech_s)
    assert second.profile_speech_s == pytest.approx(first.speech_s + second.speech_s)
    assert second.progress == pytest.approx(min(1.0, second.profile_speech_s / 10))
    assert 0 < first.progress < second.progress <= 1


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_clipped_and_noisy_audio_is_refused_unless_forced(tmp_path, dev_data, by_speaker):
    voices = by_speaker("vctk-4")
    speaker = sorted(voices)[0]
    speech, rate = sf.read(voices[speaker][0], dtype="float32")
    clipped = np.clip(speech * 30, -1, 1)
    chainsaw = sorted((dev_data / "esc10-noise" / "008_-_Chainsaw").glob("*.ogg"))[0]  # steady noise
    noise, noise_rate = sf.read(chainsaw, dtype="float32")
    noise = noise.mean(axis=1) if noise.ndim > 1 else noise
    noise = np.resize(resample(noise, noise_rate), speech.shape)
    noisy = speech + 2 * noise * np.sqrt(np.mean(speech**2) / np.mean(noise**2))  # -6 dB SNR
    noisy /= np.abs(noisy).max() * 1.1
    with Engine.init(home=tmp_path) as eng:
        before = eng.store.counts()
        with pytest.raises(Clipped):
            eng.enroll(speaker, _wav(clipped), name="clipped.wav")
        with pytest.raises(TooNoisy):
            eng.enroll(speaker, _wav(noisy), name="noisy.wav")
        assert eng.store.counts() == before
        assert eng.enroll(speaker, _wav(noisy), name="noisy.wav", force=True).feedback == "OK"


def test_a_large_cohort_is_cut_to_whole_speakers_the_same_way_every_time(calibrated):
    home, _, _ = calibrated
    config = load_home_config(home)
    with Engine.open(home=home, config=dataclasses.replace(config, scoring=dataclasses.replace(config.scoring, cohort_size=60))) as eng:
        version = eng.active_version().number
        cohort = eng.recognizer.cohort(version, None)
        again = eng.recognizer.cohort(version, None)
    assert 50 <= len(cohort) <= 60  # min_cohort <= size <= cohort_size
    assert np.array_equal(cohort.ids, again.ids)
    _, counts = np.unique(cohort.speakers, return_counts=True)
    assert set(counts) == {5}  # whole speakers: cohort_per_speaker rows each


# -- small and changing populations (issue 20) -------------------------------------------------


def _small_home(tmp_path, scoring: str = "") -> object:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[refresh]\nsteps = 4\ngate = false\n[scoring]\n" + scoring)
    return home


def _answers(eng, probes) -> list[tuple[str, str | None]]:
    return [(speaker, eng.identify(path).decision) for speaker, path in probes]


def test_a_ten_speaker_home_names_its_speakers_before_and_after_refresh_and_rollback(tmp_path, by_speaker):
    """Ten speakers are too few to calibrate on (the realised false-accept rates of a fit on
    10-20 speakers missed the request by 2-10x, README): the reference thresholds decide,
    say so, and keep naming the speakers through calibrate, refresh and rollback."""
    voices = by_speaker("librispeech-test-other")
    probes = [(s, p) for s in sorted(voices) for p in voices[s][6:]]
    with Engine.init(home=_small_home(tmp_path)) as eng:
        eng.enroll_many([(s, p, None) for s in sorted(voices) for p in voices[s][:6]], force=True)
        before = _answers(eng, probes)
        named = sum(decision == speaker for speaker, decision in before)
        assert named >= 0.8 * len(probes), before
        assert all(decision in (speaker, None) for speaker, decision in before)  # nobody named as someone else
        found = eng.identify(probes[0][1])
        assert found.backend == "cosine" and any("reference" in note for note in found.notes)
        with pytest.raises(NotEnoughData, match="min_calibration_speakers"):
            eng.calibrate()
        assert eng.calibrate_if_needed() is None
        report = eng.refresh()
        assert report.status in ("promoted", "skipped", "rejected"), report
        after_refresh = sum(d == s for s, d in _answers(eng, probes))
        rolled = eng.rollback(1, reason="test")
        assert rolled["calibration"] is None or "min_calibration_speakers" in rolled["calibration"]["skipped"]
        after_rollback = _answers(eng, probes)
        assert after_rollback == before  # version 1 answers exactly as it did
        assert after_refresh >= named - 2


def test_a_duplicate_identity_is_reported_and_does_not_silence_identification(tmp_path, by_speaker):
    """The issue's case: one clip enrolled under a second name. Calibrated anyway (the
    minimum lowered), the pair is reported and the thresholds do not jump to its score."""
    voices = by_speaker("librispeech-test-other")
    names = sorted(voices)
    probes = [(s, p) for s in names for p in voices[s][6:]]
    home = _small_home(tmp_path, "min_calibration_speakers = 2\n")
    with Engine.init(home=home) as eng:
        eng.enroll_many([(s, p, None) for s in names for p in voices[s][:6]], force=True)
        clean = eng.calibrate()
        eng.enroll("second-name", voices[names[0]][2], force=True)  # the same recording, a second name
        dup = eng.calibrate()
        assert [d["speakers"] for d in dup.fit["duplicates"]] == [sorted([names[0], "second-name"])]
        assert any("score like one person" in note for note in dup.fit["notes"])
        assert eng.status()["decisions"]["duplicates"] == dup.fit["duplicates"]
        for task in ("verify", "identify"):
            assert dup.thresholds["cosine"][task] == pytest.approx(clean.thresholds["cosine"][task], abs=0.05), task
        others = [(s, p) for s, p in probes if s != names[0]]
        named = sum(d == s for s, d in _answers(eng, others))
        assert named >= 0.8 * len(others)


def test_a_switch_to_cosine_is_said_in_every_answer_and_in_status(calibrated):
    home, _, probes = calibrated
    speaker, files = next(iter(probes.items()))
    # The cohort falling below min_cohort (after erasures, or by configuration).
    (home / "config.toml").write_text("[scoring]\nverify_far = 0.05\nidentify_far = 0.05\nmin_cohort = 100000\n")
    try:
        with Engine.open(home=home) as eng:
            found, verdict = eng.identify(files[0]), eng.verify(speaker, files[0])
            status = eng.status()["decisions"]
    finally:
        (home / "config.toml").write_text("[scoring]\nverify_far = 0.05\nidentify_far = 0.05\n")
    for answer in (found, verdict):
        assert answer.backend == "cosine"
        assert any("min_cohort = 100000" in note and "asnorm+calibrated" in note for note in answer.notes), answer.notes
    assert status["backend"] == "cosine" and "min_cohort" in status["why"]
    assert status["verify_threshold_from"] == "calibration"


def test_a_growing_population_is_calibrated_again(tmp_path, by_speaker):
    voices = by_speaker("librispeech-test-other")
    names = sorted(voices)
    home = _small_home(tmp_path, "min_calibration_speakers = 4\nrecalibrate_change = 0.5\n")
    with Engine.init(home=home) as eng:
        eng.enroll_many([(s, p, None) for s in names[:3] for p in voices[s][:3]], force=True)
        assert eng.calibrate_if_needed() is None  # 3 speakers: below the minimum
        eng.enroll_many([(s, p, None) for s in names[3:5] for p in voices[s][:3]], force=True)
        first = eng.calibrate_if_needed()
        assert first is not None and first.trials["speakers"] == 5
        assert eng.calibrate_if_needed() is None and eng.status()["decisions"]["recalibrate"] is False
        eng.enroll_many([(s, p, None) for s in names[5:7] for p in voices[s][:3]], force=True)  # 7 of 5: +40 %
        assert eng.calibrate_if_needed() is None
        eng.enroll_many([(names[7], p, None) for p in voices[names[7]][:3]], force=True)  # 8 of 5: +60 %
        assert eng.status()["decisions"]["recalibrate"] is True
        again = eng.calibrate_if_needed()
        assert again is not None and again.trials["speakers"] == 8 and again.id != first.id
