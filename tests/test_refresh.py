"""Refresh, gate, promotion and rollback on real speech (speechocean762-train, vctk-4).

The continual scenario runs once per module: group A is enrolled and refreshed into
version 2, group B is enrolled and refreshed into version 3, then version 1 is made
active again. Two files of every speaker are never enrolled; they are the probes.
"""

from __future__ import annotations

import csv
import logging
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_stored_checkpoints import spoil_stored_checkpoint
from voiceprint.engine import Engine
from voiceprint.engine import audio
from voiceprint.engine.errors import CheckpointError, InvalidInput, RefreshBusy, TooShort, UnknownVersion, WeightsPruned
from voiceprint.engine.training import NoiseBank
from voiceprint.engine.replay import SpeakerReservoir

REPO = Path(__file__).resolve().parents[1]
GROUP = 20  # speakers per group
PROBES = 2  # files per speaker kept out of enrollment


def manifest(root: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    with open(root / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            files.setdefault(row["speaker"], []).append(root / row["path"])
    return files


def write_config(home: Path, **refresh) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[refresh]"] + [f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {value}" for key, value in refresh.items()]
    (home / "config.toml").write_text("\n".join(lines).replace("'", '"') + "\n")


def enroll_all(eng: Engine, files: dict[str, list[Path]]) -> None:
    items = [(speaker, path, None) for speaker, paths in files.items() for path in paths]
    # A few files of these sets hold less than the 1 s of speech enrollment requires.
    failures = [r for r in eng.enroll_many(items) if isinstance(r, Exception) and not isinstance(r, TooShort)]
    assert not failures, failures


def usable(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not isinstance(audio.load_many([p])[0], TooShort)]


def all_scores(eng: Engine, probes: dict[str, list[Path]]) -> list[dict[str, float]]:
    """Every enrolled speaker's score for every probe, under the active version."""
    total = len(eng.speakers())
    return [
        {hit.speaker: hit.score for hit in eng.identify(path, top=total).candidates}
        for paths in probes.values()
        for path in paths
    ]


def accuracy(scores: list[dict[str, float]], probes: dict[str, list[Path]], among: set[str]) -> float:
    truth = [speaker for speaker, paths in probes.items() for _ in paths]
    right = [max(among, key=lambda s: row.get(s, -1.0)) == t for row, t in zip(scores, truth)]
    return float(np.mean(right))


@pytest.fixture(scope="module")
def continual(tmp_path_factory, dev_data):
    files = manifest(dev_data / "speechocean762-train")
    speakers = list(files)
    groups = {"A": speakers[:GROUP], "B": speakers[GROUP : 2 * GROUP]}
    enroll = {g: {s: files[s][:-PROBES] for s in names} for g, names in groups.items()}
    probes = {g: {s: usable(files[s][-PROBES:]) for s in names} for g, names in groups.items()}
    home = tmp_path_factory.mktemp("continual")
    write_config(home, steps=60)
    # 20 speakers a group, fewer than the 30 a calibration waits for: calibrated anyway,
    # so that the rollback's exact-answers check covers a centred, calibrated scale.
    with open(home / "config.toml", "a") as fh:
        fh.write("[scoring]\nmin_calibration_speakers = 2\n")
    out: dict = {"groups": {g: set(names) for g, names in groups.items()}, "probes": probes}
    with Engine.init(home=home) as eng:
        enroll_all(eng, enroll["A"])
        # Calibrated first, as a deployment would be: version 1's answers are then on its
        # own centred scale, the one it must give again after the rollback.
        eng.calibrate()
        out["v1_A"] = all_scores(eng, probes["A"])
        out["refresh1"] = eng.refresh()
        out["v2_A"] = all_scores(eng, probes["A"])
        enroll_all(eng, enroll["B"])
        out["refresh2"] = eng.refresh()
        out["v3_A"] = all_scores(eng, probes["A"])
        out["rollback"] = eng.rollback(1, reason="test")
        out["rolled_back_A"] = all_scores(eng, probes["A"])
        out["versions"] = eng.versions()
        out["calibrated"] = {v.number: eng.store.registry.latest_calibration(v.number) is not None for v in out["versions"]}
        out["history"] = eng.store.registry.alias_history()
        out["missing_v1"] = eng.store.embeddings.missing_embeddings(1)
        out["centroid_counts"] = {s: eng.store.profiles.centroid(s, 1).count for s in speakers[: 2 * GROUP]}
        out["utterances"] = {s.name: s.utterances for s in eng.speakers()}
    return out


def test_first_refresh_is_promoted_and_identifies_better(continual):
    report = continual["refresh1"]
    assert report.status == "promoted", report.reasons
    assert report.version == 2 and report.parent == 1
    gate = report.metrics
    assert gate["data"]["new"] > 0 and gate["data"]["replayed"] == 0  # nothing is old to version 1
    assert gate["calibration"]["target"] > 0  # calibrated before promotion
    assert "old" not in gate["parent"]
    # The gate's own verdict: better on the enrolled speakers' held-out utterances.
    p, c = gate["parent"]["overall"], gate["candidate"]["overall"]
    assert c["d_prime"] > p["d_prime"] and c["accuracy"] >= p["accuracy"] - 0.03 and c["eer"] <= p["eer"] + 0.01
    # Independently, through identify, on files that were never enrolled at all: the true
    # speaker's score rises relative to the best impostor's, and no more than one probe
    # is lost (one probe is 2.5 points here).
    group, probes = continual["groups"]["A"], continual["probes"]["A"]
    assert _mean_margin(continual["v2_A"], probes) > _mean_margin(continual["v1_A"], probes)
    assert accuracy(continual["v2_A"], probes, group) >= accuracy(continual["v1_A"], probes, group) - 0.03


def test_second_refresh_replays_and_keeps_the_first_group(continual):
    report = continual["refresh2"]
    assert report.status == "promoted", report.reasons
    assert report.version == 3 and report.parent == 2
    data = report.metrics["data"]
    assert data["replayed"] > 0, "group A must be replayed"
    assert "old" in report.metrics["parent"] and "new" in report.metrics["parent"]
    tolerance = 0.03  # the default refresh.accuracy_tolerance
    group, probes = continual["groups"]["A"], continual["probes"]["A"]
    # Among group A's speakers only, so that B's arrival does not count as forgetting.
    assert accuracy(continual["v3_A"], probes, group) >= accuracy(continual["v2_A"], probes, group) - tolerance


def test_rollback_to_version_1_restores_its_exact_scores(continual):
    result = continual["rollback"]
    assert result["changed"] and result["previous"] == 3 and result["version"] == 1
    assert result["embedded"] > 0  # group B was enrolled under version 2 and is caught up
    group = continual["groups"]["A"]
    for before, after in zip(continual["v1_A"], continual["rolled_back_A"], strict=True):
        assert {s: after[s] for s in group} == {s: before[s] for s in group}  # exactly, not approximately
    # Version 1's centroids now cover everyone, each over all of the speaker's utterances.
    assert continual["missing_v1"] == []
    assert continual["centroid_counts"] == {s: n for s, n in continual["utterances"].items()}
    status = {v.number: (v.status, v.active) for v in continual["versions"]}
    assert status == {1: ("active", True), 2: ("retired", False), 3: ("retired", False)}
    assert continual["calibrated"] == {1: True, 2: True, 3: True}
    moves = [(m.version, m.previous_version) for m in continual["history"]]
    assert moves == [(1, None), (2, 1), (3, 2), (1, 3)]
    assert continual["history"][-1].reason.startswith("test")


def _mean_margin(scores: list[dict[str, float]], probes: dict[str, list[Path]]) -> float:
    truth = [speaker for speaker, paths in probes.items() for _ in paths]
    margins = [row[t] - max(v for s, v in row.items() if s != t) for row, t in zip(scores, truth)]
    return float(np.mean(margins))


# -- smaller homes: vctk-4 ----------------------------------------------------------------

SMALL = {"speakers_per_batch": 4, "holdout_fraction": 0.3}  # 4 speakers, 10 files each


def make_vctk_home(tmp_path: Path, dev_data: Path, **refresh) -> tuple[Path, tuple]:
    """A home with all of vctk-4 enrolled under version 1, and its :func:`_snapshot`."""
    home = tmp_path / "home"
    write_config(home, **SMALL, **refresh)
    with Engine.init(home=home) as eng:
        enroll_all(eng, manifest(dev_data / "vctk-4"))
        return home, _snapshot(eng)


@pytest.fixture
def vctk_home(tmp_path, dev_data):
    return make_vctk_home(tmp_path, dev_data, steps=3)[0]


def test_dry_run_stores_no_version(vctk_home):
    with Engine.open(home=vctk_home) as eng:
        report = eng.refresh(dry_run=True)
        assert report.status == "dry-run" and report.version is None
        assert [v.number for v in eng.versions()] == [1]
        job = eng.store.jobs.get_job(report.job)
        assert job.status == "succeeded" and job.result["metrics"]["candidate"]["overall"]["probes"] >= 5
        assert not (vctk_home / "checkpoints" / "v0002.pt").exists()


def test_refresh_reports_each_phase_and_logs_its_start_and_outcome(vctk_home, caplog):
    from voiceprint.engine.events import parse

    calls = []
    with caplog.at_level(logging.INFO), Engine.open(home=vctk_home) as eng:
        report = eng.refresh(on_progress=lambda done, total, what: calls.append((done, total, what)))
    phases = list(dict.fromkeys(what for _, _, what in calls))
    assert phases[:4] == ["loading kept audio", "training", "re-embedding", "gate"], phases
    for phase in phases:  # every phase reaches its end
        done, total = [(d, t) for d, t, w in calls if w == phase][-1]
        assert done == total, (phase, done, total)
    assert [(d, t) for d, t, w in calls if w == "training"] == [(1, 3), (2, 3), (3, 3)]
    events = [parse(r.getMessage()) for r in caplog.records if r.name == "voiceprint.events"]
    started = [e for e in events if e["event"] == "refresh_started"]
    finished = [e for e in events if e["event"] == "refresh_finished"]
    assert started and started[0]["job"] == str(report.job)
    assert finished and finished[0]["outcome"] == report.status and finished[0]["parent"] == "1"
    if report.status == "rejected":
        assert finished[0]["why"] == "; ".join(report.reasons)
    assert any(r.name == "voiceprint.engine.refresh" and "loading the kept data" in r.getMessage() for r in caplog.records)


def test_training_progress_counts_toward_the_time_budget_when_it_ends_first(tmp_path, dev_data):
    home = make_vctk_home(tmp_path, dev_data, steps=1_000_000, time_budget_s=2.0)[0]
    training = []
    with Engine.open(home=home) as eng:
        report = eng.refresh(dry_run=True, on_progress=lambda d, t, w: training.append((d, t)) if w == "training" else None)
    steps = report.metrics["training"]["steps"]
    assert steps < 1000 and training[-1] == (steps, steps), training[-3:]
    assert all(t < 1_000_000 for _, t in training[1:])  # a total the budget allows, not the step cap


def test_prune_deletes_retired_weights_keeps_their_record_and_refuses_a_rollback_to_them(vctk_home, capsys):
    from voiceprint import cli

    write_config(vctk_home, steps=10, **SMALL, lr=0.1)
    with Engine.open(home=vctk_home) as eng:
        number = eng.refresh().version  # rejected: a thousand times too high a learning rate
        path = vctk_home / eng.version(number).checkpoint
        size = path.stat().st_size
        eng.rollback(number)
        assert eng.prune(dry_run=True)["versions"] == []  # v2 active, v1 the pretrained root
        eng.rollback(1)
        assert eng.version(number).status == "retired"
        with Engine.open(home=vctk_home) as other, other.store.exclusive("refresh"):
            with pytest.raises(RefreshBusy):
                eng.prune()  # a refresh or rollback runs: it may be using any version
    home = ["--home", str(vctk_home), "--json"]
    assert cli.main([*home, "prune", "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["versions"] == [{"version": number, "status": "retired", "bytes": size}] and dry["freed_bytes"] == size
    assert path.exists()
    assert cli.main([*home, "prune"]) == 0
    assert json.loads(capsys.readouterr().out)["freed_bytes"] == size and not path.exists()
    assert (vctk_home / "checkpoints" / "v0001.pt").exists()
    with Engine.open(home=vctk_home) as eng:
        kept = eng.version(number)
        assert kept.status == "retired" and kept.metrics["candidate"]["overall"] and kept.metrics["pruned"]["bytes"] == size
        for force in (False, True):
            with pytest.raises(WeightsPruned, match="weights were pruned"):
                eng.rollback(number, force=force)
        assert eng.active_version().number == 1 and eng.prune()["versions"] == []
    assert cli.main([*home, "rollback", str(number)]) == 2
    out, err = capsys.readouterr()
    assert "weights were pruned" in err and json.loads(out)["error"] == "weights_pruned"


def test_a_worse_candidate_is_rejected_with_reasons(vctk_home):
    # A learning rate a thousand times too high wrecks the encoder in a few steps.
    write_config(vctk_home, steps=10, **SMALL, lr=0.1)
    with Engine.open(home=vctk_home) as eng:
        before = eng.store.profiles.centroid_matrix(1)
        report = eng.refresh()
        assert report.status == "rejected", report.metrics
        assert report.reasons and "does not separate speakers better" in report.reasons[0]
        rejected = eng.store.registry.get_version(report.version)
        assert rejected.status == "rejected" and rejected.note == "; ".join(report.reasons)
        assert rejected.metrics["candidate"]["overall"]["accuracy"] <= rejected.metrics["parent"]["overall"]["accuracy"]
        assert eng.active_version().number == 1
        assert eng.store.embeddings.version_embeddings(report.version)[0].size == 0  # nothing stored under it
        after = eng.store.profiles.centroid_matrix(1)
        assert after[0] == before[0] and np.array_equal(after[1], before[1])
        assert eng.store.jobs.get_job(report.job).status == "rejected"


def test_gate_off_promotes_even_a_worse_candidate_and_says_so(vctk_home):
    write_config(vctk_home, steps=10, **SMALL, lr=0.1, gate="false")
    with open(vctk_home / "config.toml", "a") as fh:  # 4 speakers may be calibrated here
        fh.write("[scoring]\nmin_calibration_speakers = 2\n")
    with Engine.open(home=vctk_home) as eng:
        report = eng.refresh()
        assert report.status == "promoted" and report.reasons == []
        assert report.metrics["gate_overridden"]  # what the gate would have said
        assert eng.active_version().number == report.version
        # Going back to version 1, never calibrated, fits it on the way.
        assert eng.store.registry.latest_calibration(1) is None
        eng.rollback(1)
        assert eng.store.registry.latest_calibration(1) is not None


def test_ge2e_refresh_trains_without_a_head(vctk_home):
    write_config(vctk_home, steps=3, **SMALL, loss="ge2e-softmax", lr=1e-5)
    with Engine.open(home=vctk_home) as eng:
        report = eng.refresh(dry_run=True)
    training = report.metrics["training"]
    assert training["loss"] == "ge2e-softmax" and training["steps"] == 3
    assert np.isfinite(training["last_loss"])


def test_aam_softmax_refresh_trains_a_head_over_the_enrolled_speakers(vctk_home):
    write_config(vctk_home, steps=3, **SMALL)  # the default loss
    with Engine.open(home=vctk_home) as eng:
        report = eng.refresh(dry_run=True)
    training = report.metrics["training"]
    assert training["loss"] == "aam-softmax" and training["steps"] == 3
    assert np.isfinite(training["last_loss"])


def test_noise_augmentation_mixes_real_noise_recordings(vctk_home, dev_data):
    # ESC-10 is 44.1 kHz OGG: the noise bank resamples it to 16 kHz before mixing.
    write_config(vctk_home, steps=2, **SMALL, noise_dir=str(dev_data / "esc10-noise"))
    with Engine.open(home=vctk_home) as eng:
        report = eng.refresh(dry_run=True)
    assert report.metrics["training"]["steps"] == 2 and np.isfinite(report.metrics["training"]["last_loss"])


def test_noise_bank_hits_the_requested_snr(dev_data):
    bank = NoiseBank(str(dev_data / "esc10-noise"), snr_db=10.0, seed=0)
    speech = np.sin(np.linspace(0, 2000, 25_600)).astype(np.float32) * 0.1
    snrs = []
    for _ in range(50):
        noise = bank.mix(speech) - speech
        snrs.append(10 * np.log10(np.mean(speech**2) / np.mean(noise**2)))
    assert 5.0 - 1e-6 <= min(snrs) and max(snrs) <= 15.0 + 1e-6  # 10 dB +/- 5
    with pytest.raises(InvalidInput):
        NoiseBank(str(dev_data / "vctk-4" / "no-such-folder"), snr_db=10.0, seed=0)


def test_nothing_new_is_skipped(vctk_home):
    with Engine.open(home=vctk_home) as eng:
        first = eng.refresh()
        assert first.status in {"promoted", "rejected"}
        if first.status == "rejected":
            pytest.skip("needs a promoted version to have nothing new")  # pragma: no cover
        second = eng.refresh()
        assert second.status == "skipped" and "no new utterances" in second.reasons[0]
        assert eng.pending_utterances() == 0
        assert eng.store.jobs.get_job(second.job).status == "skipped"


def test_too_few_held_out_utterances_skip_before_training(vctk_home):
    write_config(vctk_home, steps=3, speakers_per_batch=4, holdout_fraction=0.01)
    with Engine.open(home=vctk_home) as eng:
        report = eng.refresh()
        assert report.status == "skipped" and "held-out" in report.reasons[0]
        assert "training" not in report.metrics and report.version is None
        assert [v.number for v in eng.versions()] == [1]


def test_rollback_to_a_corrupted_checkpoint_changes_nothing(vctk_home):
    with Engine.open(home=vctk_home) as eng:
        report = eng.refresh()
        assert report.status == "promoted", report.reasons
        path = vctk_home / "checkpoints" / "v0001.pt"
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
        spoil_stored_checkpoint(f"sqlite:///{vctk_home / 'voiceprint.db'}", eng.version(1).checkpoint_sha256)  # else it replaces the file
    with Engine.open(home=vctk_home) as eng:  # a new process: no cached embedder hides the file
        with pytest.raises(CheckpointError):
            eng.rollback(1)
        assert eng.active_version().number == 2
        assert [m.version for m in eng.store.registry.alias_history()] == [1, 2]
        with pytest.raises(UnknownVersion):
            eng.rollback(9)


def test_only_one_refresh_at_a_time(vctk_home):
    with Engine.open(home=vctk_home) as eng, Engine.open(home=vctk_home) as other:
        with other.store.exclusive("refresh"):
            with pytest.raises(RefreshBusy):
                eng.refresh()
            with pytest.raises(RefreshBusy):
                eng.rollback(1)
        assert eng.store.jobs.list_jobs() == []  # refused before anything was recorded


@pytest.mark.postgres
def test_refresh_lock_and_rollback_on_postgresql(fresh_pg_url, tmp_path, dev_data):
    home = tmp_path / "home"
    write_config(home, steps=3, **SMALL)
    with Engine.init(home=home, db=fresh_pg_url) as eng:
        enroll_all(eng, manifest(dev_data / "vctk-4"))
        with Engine.open(home=home, db=fresh_pg_url) as other, other.store.exclusive("refresh"):
            with pytest.raises(RefreshBusy):
                eng.refresh()
        report = eng.refresh()
        assert report.status in {"promoted", "rejected"}
        if report.status == "promoted":
            assert eng.store.embeddings.missing_embeddings(report.version) == []
        result = eng.rollback(1)
        assert eng.active_version().number == 1 and result["version"] == 1


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_enrollments_during_a_refresh_reach_the_new_version(backend, request, tmp_path, dev_data):
    db = request.getfixturevalue("fresh_pg_url") if backend == "postgresql" else None
    files = manifest(dev_data / "vctk-4")
    early = {s: paths[:6] for s, paths in files.items()}
    # Arrive one by one during the whole refresh (training, re-embedding and the alias
    # move), for known speakers and for new ones.
    late = [(s, p) for s, paths in files.items() for p in paths[6:]]
    late += [(s, p) for s, paths in list(manifest(dev_data / "speechocean762-train").items())[:4] for p in paths]
    home = tmp_path / "home"
    write_config(home, steps=40, **SMALL, min_holdout=1)
    with Engine.init(home=home, db=db) as eng:
        enroll_all(eng, early)
    proc = subprocess.Popen(
        [sys.executable, "-m", "voiceprint.cli", "--home", str(home), *(["--db", db] if db else []), "--json", "refresh"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    acknowledged, held = [], []
    try:
        with Engine.open(home=home, db=db) as eng:
            _wait_for(lambda: eng.store.jobs.list_jobs(status="running"), proc)
            for speaker, path in late:
                result = eng.enroll_many([(speaker, path, None)])[0]
                if not isinstance(result, TooShort):
                    assert not isinstance(result, Exception), result
                    # Once the candidate is promoted and calibrated, its consistency cut
                    # may hold some of the new speakers' files for review.
                    (acknowledged if result.feedback == "OK" else held).append(result.utterance_id)
                time.sleep(0.1)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)
    report = json.loads(out)
    assert report["status"] == "promoted", report
    # The candidate's snapshot was taken before the late files arrived; promotion embedded them.
    assert report["metrics"]["enrolled_during_refresh"] > 0
    with Engine.open(home=home, db=db) as eng:
        active = eng.active_version()
        assert active.number == report["version"]
        assert eng.store.embeddings.missing_embeddings(active.number) == []
        ids, _, _ = eng.store.embeddings.version_embeddings(active.number)
        assert set(acknowledged) <= set(ids.tolist())
        assert set(held) == {u.id for u in eng.store.profiles.utterances(status="pending")}
        for summary in eng.speakers():
            centroid = eng.store.profiles.centroid(summary.name, active.number)
            vectors = eng.store.profiles.embeddings(summary.name, active.number)
            assert centroid.count == summary.utterances == len(vectors)
            np.testing.assert_allclose(centroid.mean, vectors.astype(np.float64).mean(axis=0), atol=1e-6)


def test_a_refresh_killed_midway_leaves_everything_as_it_was(tmp_path, dev_data):
    home, before = make_vctk_home(tmp_path, dev_data, steps=10_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "voiceprint.cli", "--home", str(home), "refresh"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        with Engine.open(home=home) as eng:
            _wait_for(lambda: eng.store.jobs.list_jobs(status="running"), proc)
        time.sleep(3)  # well into training
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    with Engine.open(home=home) as eng:
        assert _snapshot(eng) == before
        assert eng.store.jobs.list_jobs(status="running")[0].owner.endswith(f":{proc.pid}")
    # The next refresh starts clean: it marks the dead job failed and runs to the end.
    write_config(home, steps=3, **SMALL)
    with Engine.open(home=home) as eng:
        report = eng.refresh()
        assert report.status in {"promoted", "rejected"}
        jobs = {j.id: j for j in eng.store.jobs.list_jobs()}
        dead = jobs[min(jobs)]
        assert dead.status == "failed" and "interrupted" in dead.result["error"]


def test_a_crash_after_the_candidate_was_stored_is_cleaned_up(tmp_path, dev_data):
    """A process dies between storing the candidate's embeddings and moving the alias."""
    home, before = make_vctk_home(tmp_path, dev_data, steps=3)
    crash = f"""
import os, numpy as np
from voiceprint.engine import Engine
eng = Engine.open(home={str(home)!r})
with eng.store.exclusive("refresh"):
    job, _ = eng.store.jobs.start_job("refresh", "crash test", owner="test:1")
    v1 = eng.active_version()
    version = eng.store.registry.create_version(encoder=v1.encoder, config={{}}, checkpoint=v1.checkpoint,
                                       checkpoint_sha256=v1.checkpoint_sha256, parent=1, trained_through=10**9)
    eng.store.jobs.update_job(job.id, version=version.number)
    ids, _, vectors = eng.store.embeddings.version_embeddings(1)
    eng.store.embeddings.add_embeddings(version.number, list(zip(ids[:5].tolist(), vectors[:5])))
    os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", crash], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    with Engine.open(home=home) as eng:
        assert _snapshot(eng) == before
        assert eng.store.registry.get_version(2).status == "candidate"
        assert eng.store.embeddings.version_embeddings(2)[0].size == 5
        report = eng.refresh()
        stale = eng.store.registry.get_version(2)
        assert stale.status == "rejected" and stale.note == "interrupted before promotion"
        assert eng.store.embeddings.version_embeddings(2)[0].size == 0
        assert report.version == 3 or report.status != "promoted"


def _snapshot(eng: Engine) -> tuple:
    """Everything a killed refresh must not change: the active version and its data."""
    active = eng.active_version().number
    names, matrix = eng.store.profiles.centroid_matrix(active)
    ids, _, vectors = eng.store.embeddings.version_embeddings(active)
    return (
        active,
        [(m.version, m.reason) for m in eng.store.registry.alias_history()],
        [(u.id, u.speaker, u.content_sha256) for u in eng.store.profiles.utterances()],
        names,
        matrix.tobytes(),
        ids.tolist(),
        vectors.tobytes(),
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the refresh process ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the refresh to start")
        time.sleep(0.2)


# -- replay reservoir -------------------------------------------------------------------


def test_reservoir_is_bounded_and_balanced():
    reservoir = SpeakerReservoir(capacity=60, seed=1)
    rng = np.random.default_rng(0)
    sizes = {"big": 5000, "mid": 400, "small": 7}
    stream = [(s, i) for s, n in sizes.items() for i in range(n)]
    for index in rng.permutation(len(stream)):
        reservoir.learn_one(*stream[index])
    kept = reservoir.by_speaker()
    assert len(reservoir) == 60
    assert len(kept["small"]) == 7  # a speaker with little data keeps all of it
    assert abs(len(kept["big"]) - len(kept["mid"])) <= 1  # the rest is shared evenly
    assert all(0 <= i < sizes[s] for s, items in kept.items() for i in items)


def test_reservoir_samples_each_speaker_uniformly():
    # Each of 100 items of one speaker should be kept about equally often.
    hits = np.zeros(100)
    for seed in range(400):
        reservoir = SpeakerReservoir(capacity=10, seed=seed)
        for i in range(100):
            reservoir.learn_one("only", i)
        hits[reservoir.items()] += 1
    expected = 400 * 10 / 100
    assert hits.min() > expected * 0.3 and hits.max() < expected * 2.0
    assert abs(hits.mean() - expected) < 1e-9


def test_gate_metrics_and_decision_by_hand():
    from voiceprint.engine.config import RefreshConfig
    from voiceprint.engine.gate import decide, gate_metrics

    # Two speakers on orthogonal axes: rows 0-2 are "a", 3-5 are "b"; rows 2 and 5 are held out.
    a, b = np.eye(4)[0], np.eye(4)[1]
    clean = np.stack([a, a, a, b, b, b])
    held = np.array([False, False, True, False, False, True])
    speakers = ["a", "a", "a", "b", "b", "b"]
    good = gate_metrics(clean, speakers, held, old_speakers={"a"})
    assert good["overall"]["probes"] == 2 and good["overall"]["accuracy"] == 1.0 and good["overall"]["eer"] == 0.0
    # One held-out utterance is one target trial: no spread, so no d' (None, not NaN).
    assert good["old"] == {"probes": 1, "speakers": 1, "accuracy": 1.0, "eer": 0.0, "d_prime": None}
    one = gate_metrics(clean, speakers, np.array([False] * 5 + [True]), old_speakers={"a"})
    assert "too few held-out trials" in decide(one, one, RefreshConfig(min_holdout=1))[0]
    assert "does not separate speakers better" in decide(good, good, RefreshConfig(min_holdout=2))[0]
    # With more held-out rows, a candidate whose held-out "a" drifts toward "b" is rejected.
    vectors = np.stack([a, a, a, a, b, b, b, b])
    held = np.array([False, False, True, True, False, False, True, True])
    speakers = ["a"] * 4 + ["b"] * 4
    parent = gate_metrics(vectors + 0.05 * np.eye(4)[2], speakers, held, {"a"})
    drifted = vectors.copy()
    drifted[3] = 0.4 * a + 0.6 * b
    worse = gate_metrics(drifted + 0.05 * np.eye(4)[2], speakers, held, {"a"})
    reasons = decide(parent, worse, RefreshConfig(min_holdout=2))
    assert any("d'" in r for r in reasons) and any("top-1 worse on old speakers" in r for r in reasons)
    assert decide(parent, parent, RefreshConfig(min_holdout=5))[0].startswith("only 4 held-out")


def test_replay_size_zero_trains_on_new_data_only():
    from datetime import UTC, datetime

    from voiceprint.engine.config import RefreshConfig
    from voiceprint.engine.training import choose_training
    from voiceprint.storage import UtteranceRecord

    now = datetime.now(UTC)
    utts = [UtteranceRecord(i, f"s{i % 3}", "x", f"{i:064x}", 2.0, 2.0, {}, now) for i in range(1, 31)]
    new, replay = choose_training(utts, 20, RefreshConfig(replay_size=0))
    assert [u.id for u in new] == list(range(21, 31)) and replay == []
    new, replay = choose_training(utts, 20, RefreshConfig(replay_size=6))
    assert len(replay) == 6 and all(u.id <= 20 for u in replay)
    assert sorted(len([u for u in replay if u.speaker == s]) for s in ("s0", "s1", "s2")) == [2, 2, 2]
