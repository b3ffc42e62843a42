"""The routes the web console stands on, in-process on real speech and a real database:
who a key is, the console's own files, a held utterance's recording, a version's DET
plot, and jobs with their progress."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from voiceprint.engine import Engine
from voiceprint.engine.errors import VoiceprintError
from voiceprint.engine.jobs import running_job
from voiceprint.service import create_app
from voiceprint.storage import Store

pytestmark = pytest.mark.data


def _home(tmp_path: Path, config: str = "") -> tuple[Path, str, dict[str, str]]:
    home = tmp_path / "home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(config)
    db = f"sqlite:///{home / 'voiceprint.db'}"
    with Engine.init(home=home, db=db) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("admin", "enroll", "query")}
    return home, db, keys


def test_whoami_and_the_console_files_for_every_key(tmp_path):
    """Each key learns its own role and the roles whose routes it may call; the console's
    files are served from the package at /console with no key, and /console redirects."""
    home, db, keys = _home(tmp_path)
    with TestClient(create_app(str(home), db, background=False), follow_redirects=False) as client:
        may = {role: client.get("/v1/whoami", headers={"X-API-Key": key}).json() for role, key in keys.items()}
        assert {r: (m["role"], m["may"]) for r, m in may.items()} == {
            "admin": ("admin", ["admin", "enroll", "query"]), "enroll": ("enroll", ["enroll"]), "query": ("query", ["query"]),
        }
        assert client.get("/v1/whoami").status_code == 401
        assert client.get("/v1/whoami", headers={"Authorization": "Bearer vp_nope"}).status_code == 401
        moved = client.get("/console")
        assert moved.status_code == 307 and moved.headers["location"] == "/console/"
        page = client.get("/console/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="console.js"' in page.text and 'href="console.css"' in page.text
        for asset in ("console.js", "console.css", "capture.js"):  # capture.js: loaded by console.js as an audio worklet
            assert client.get(f"/console/{asset}").status_code == 200
        # Nothing from elsewhere: no absolute URL in the page or its script.
        for text in (page.text, client.get("/console/console.js").text):
            assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_a_held_utterance_can_be_played_by_an_admin_only(tmp_path, by_speaker):
    """The kept speech comes back as FLAC, the speech the utterance was embedded from;
    only an admin may listen; unknown ids are 404; under keep = "features" there is no
    recording, and the answer says so (409)."""
    voices = by_speaker("vctk-4")
    a, b = sorted(voices)[:2]
    home, db, keys = _home(tmp_path)
    with Engine.open(home, db) as eng:
        for path in voices[a][:3]:
            eng.enroll(a, path)
        held = eng.enroll(a, voices[b][0])
    assert held.feedback == "INCONSISTENT_SPEAKER"
    with TestClient(create_app(str(home), db, background=False)) as client:
        heard = client.get(f"/v1/utterances/{held.utterance_id}/audio", headers={"X-API-Key": keys["admin"]})
        assert heard.status_code == 200 and heard.headers["content-type"] == "audio/flac"
        assert heard.headers["cache-control"] == "no-store"
        samples, rate = sf.read(io.BytesIO(heard.content))
        assert rate == 16000 and abs(len(samples) / rate - held.speech_s) < 0.05
        for role in ("enroll", "query"):
            assert client.get(f"/v1/utterances/{held.utterance_id}/audio", headers={"X-API-Key": keys[role]}).status_code == 403
        missing = client.get("/v1/utterances/99999/audio", headers={"X-API-Key": keys["admin"]})
        assert missing.status_code == 404 and missing.json()["error"] == "unknown_utterance"

    features_home, features_db, features_keys = _home(tmp_path / "features", '[privacy]\nkeep = "features"\n')
    with Engine.open(features_home, features_db) as eng:
        kept = eng.enroll(a, voices[a][0])
    with TestClient(create_app(str(features_home), features_db, background=False)) as client:
        refused = client.get(f"/v1/utterances/{kept.utterance_id}/audio", headers={"X-API-Key": features_keys["admin"]})
        assert refused.status_code == 409 and refused.json()["error"] == "no_audio_kept"


def test_the_det_plot_of_a_version_is_drawn_from_its_leave_one_out_trials(tmp_path, dev_data):
    """Before a calibration is possible the plot is refused with the reason (409); on a
    calibrated version it is a PNG of that version's trials on the back-end it decides
    with, its thresholds marked where the trials put them. Admin only."""
    from voiceprint.engine.det import det_marks
    from voiceprint.engine.manifests import read_manifest

    files = read_manifest(dev_data / "speechocean762-train" / "manifest.csv")
    speakers = sorted({f.speaker for f in files})[:6]
    home, db, keys = _home(tmp_path, "[scoring]\nmin_calibration_speakers = 5\n")
    admin = {"X-API-Key": keys["admin"]}
    with TestClient(create_app(str(home), db, background=False)) as client:
        early = client.get("/v1/calibration/det.png", headers=admin)
        assert early.status_code == 409 and early.json()["error"] == "not_enough_data"
        assert "min_calibration_speakers" in early.json()["message"]
    enrolled = 0
    with Engine.open(home, db) as eng:
        for speaker in speakers:
            for f in [f for f in files if f.speaker == speaker][:4]:
                with contextlib.suppress(VoiceprintError):  # a file with too little speech: the others do
                    eng.enroll(speaker, f.path, force=True)
                    enrolled += 1
        eng.calibrate()
        scores = eng.calibration_scores()
        decisions = eng.status()["decisions"]
    assert scores.backend == decisions["backend"] and scores.verify_threshold == pytest.approx(decisions["verify_threshold"])
    assert len(scores.target) == enrolled and len(scores.nontarget) > len(scores.target)  # every utterance a probe
    marks = det_marks(scores)
    verify = next(v for k, v in marks.items() if k.startswith("verify"))
    assert verify[0] == pytest.approx(np.mean(scores.nontarget >= scores.verify_threshold))
    with TestClient(create_app(str(home), db, background=False)) as client:
        image = client.get("/v1/calibration/det.png", headers=admin)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG") and len(image.content) > 10_000
        assert client.get("/v1/calibration/det.png?version=7", headers=admin).json()["error"] == "unknown_version"
        assert client.get("/v1/calibration/det.png", headers={"X-API-Key": keys["query"]}).status_code == 403


def test_a_running_job_records_its_progress_for_other_processes(tmp_path):
    """A refresh or rollback writes its stage and counts into the job as it goes (a new
    stage at once, else at most every second), readable by GET /v1/jobs; the finished
    result replaces it."""
    home, db, keys = _home(tmp_path)
    seen = []
    with Store(db) as store, running_job(store, "refresh", "test") as job:
        record = job.recording(lambda done, total, what: seen.append((done, total, what)), every_s=60)
        record(0, 10, "training")
        record(1, 10, "training")  # the same stage within a minute: not written
        first = store.jobs.get_job(job.id).result["progress"]
        record(0, 5, "re-embedding")  # a new stage: written at once
        second = store.jobs.get_job(job.id).result["progress"]
        record(5, 5, "re-embedding")  # the end of a stage: written at once
        last = store.jobs.get_job(job.id).result["progress"]
        with TestClient(create_app(str(home), db, background=False)) as client:
            listed = client.get("/v1/jobs", headers={"X-API-Key": keys["admin"]}).json()
            assert client.get("/v1/jobs", headers={"X-API-Key": keys["enroll"]}).status_code == 403
            assert client.get("/v1/jobs?limit=0", headers={"X-API-Key": keys["admin"]}).status_code == 422
        job.finish("succeeded", result={"status": "promoted"})
    assert seen == [(0, 10, "training"), (1, 10, "training"), (0, 5, "re-embedding"), (5, 5, "re-embedding")]
    assert first == {"stage": "training", "done": 0, "total": 10}
    assert second == {"stage": "re-embedding", "done": 0, "total": 5}
    assert last == {"stage": "re-embedding", "done": 5, "total": 5}
    assert [(j["id"], j["status"], j["result"]["progress"]["done"]) for j in listed] == [(job.id, "running", 5)]
    with Store(db) as store:
        assert store.jobs.get_job(job.id).result == {"status": "promoted"}
