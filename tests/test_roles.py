"""What each key may do and learn, names every route can address, and what the service
says when it fails: tested in-process (the app with its lifespan) on real speech and a
real database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from test_stored_checkpoints import spoil_stored_checkpoint
from voiceprint.engine import Engine
from voiceprint.engine.errors import InvalidInput
from voiceprint.service import create_app
from voiceprint.storage import Store

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.data


def _home(tmp_path: Path, db: str | None, by_speaker, config: str = "") -> tuple[Path, str, dict[str, str]]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(config)
    db = db or f"sqlite:///{home / 'voiceprint.db'}"
    with Engine.init(home=home, db=db) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("admin", "enroll", "query")}
        for speaker, paths in by_speaker("vctk-4").items():
            for path in paths[:3]:
                eng.enroll(speaker, path)
    return home, db, keys


def _post(client: TestClient, route: str, path: Path, key: str, **params):
    return client.post(route, content=path.read_bytes(), params=params,
                       headers={"X-API-Key": key, "Content-Type": "audio/flac"})


@pytest.fixture
def vctk_home(tmp_path, by_speaker):
    return _home(tmp_path, None, by_speaker, "[service]\nmax_top = 2\n")


def _probe(by_speaker, speaker: str) -> Path:
    return by_speaker("vctk-4")[speaker][-1]  # not among the three enrolled


def test_identify_top_is_bounded_for_every_key(vctk_home, by_speaker):
    home, db, keys = vctk_home
    speaker = sorted(by_speaker("vctk-4"))[0]
    with TestClient(create_app(str(home), db, background=False)) as client:
        for role in ("query", "admin"):
            for top in (3, 100000, 2**70, 0, -1):
                r = _post(client, "/v1/identify", _probe(by_speaker, speaker), keys[role], top=top)
                assert r.status_code == 422, (role, top, r.text)
                assert "max_top" in r.json()["message"] or top > 2**63, r.text
        r = _post(client, "/v1/identify", _probe(by_speaker, speaker), keys["query"], top=2)
        assert r.status_code == 200 and len(r.json()["candidates"]) == 2


def test_a_query_key_cannot_tell_which_names_are_enrolled(vctk_home, by_speaker):
    home, db, keys = vctk_home
    a, b = sorted(by_speaker("vctk-4"))[:2]
    with TestClient(create_app(str(home), db, background=False)) as client:
        probe = _probe(by_speaker, a)
        unknown = _post(client, "/v1/verify/nobody-here", probe, keys["query"])
        impostor = _post(client, f"/v1/verify/{b}", probe, keys["query"])
        genuine = _post(client, f"/v1/verify/{a}", probe, keys["query"])
        assert unknown.status_code == impostor.status_code == genuine.status_code == 200
        shape = lambda r: {k: r.json()[k] for k in ("accepted", "score", "normalised", "llr")}  # noqa: E731
        assert shape(unknown) == shape(impostor) == {"accepted": False, "score": None, "normalised": None, "llr": None}
        assert shape(genuine)["accepted"] is True and shape(genuine)["score"] is None
        # An admin key (it may list the speakers anyway) gets the scores and the 404.
        assert _post(client, "/v1/verify/nobody-here", probe, keys["admin"]).status_code == 404
        assert isinstance(_post(client, f"/v1/verify/{b}", probe, keys["admin"]).json()["score"], float)


def test_forcing_an_enrollment_needs_an_admin_key_and_is_audited(vctk_home, by_speaker):
    home, db, keys = vctk_home
    a, b = sorted(by_speaker("vctk-4"))[:2]
    with Store(db) as store:
        before = len(store.profiles.utterances(status=None))
    with TestClient(create_app(str(home), db, background=False)) as client:
        someone_else = by_speaker("vctk-4")[b][-1]
        refused = _post(client, f"/v1/speakers/{a}/utterances", someone_else, keys["enroll"], force="true")
        assert refused.status_code == 403 and "admin" in refused.json()["message"]
        with Store(db) as store:
            assert len(store.profiles.utterances(status=None)) == before
        forced = _post(client, f"/v1/speakers/{a}/utterances", someone_else, keys["admin"], force="true")
        assert forced.status_code == 201, forced.text
        admin_id = next(k.id for k in Engine.open(home, db).list_keys() if k.role == "admin")
    with Store(db) as store:
        entries = [e for e in store.keys.audit_log() if e.action == "forced_enrollment"]
    assert [(e.actor, e.detail) for e in entries] == [(f"key:{admin_id}", {"utterance": forced.json()["utterance_id"]})]


def test_the_command_line_force_is_audited_under_the_login_name(vctk_home, by_speaker):
    home, db, _ = vctk_home
    a, b = sorted(by_speaker("vctk-4"))[:2]
    with Engine.open(home, db) as eng:
        result = eng.enroll(a, by_speaker("vctk-4")[b][-2], force=True)
        entries = [e for e in eng.store.keys.audit_log() if e.action == "forced_enrollment"]
    assert [e.detail for e in entries] == [{"utterance": result.utterance_id}] and entries[0].actor != ""


@pytest.mark.parametrize("name", ["a/b", "/", ".", "..", "x/../y", " ", "\u200b", "bo\nb", "a" * 201])
def test_names_a_url_path_cannot_carry_are_refused_everywhere(vctk_home, by_speaker, name):
    home, db, keys = vctk_home
    clip = by_speaker("vctk-4")[sorted(by_speaker("vctk-4"))[0]][-1]
    with Engine.open(home, db) as eng, pytest.raises(InvalidInput):
        eng.enroll(name, clip)
    out = subprocess.run([sys.executable, "-m", "voiceprint.cli", "--home", str(home), "--db", db, "enroll", name, str(clip)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr


def test_one_name_policy_for_lookups_enrollment_and_erasure(vctk_home, by_speaker):
    home, db, keys = vctk_home
    clips = by_speaker("vctk-4")[sorted(by_speaker("vctk-4"))[0]]
    with Engine.open(home, db) as eng:
        eng.enroll("Zoe\u0308", clips[0])  # decomposed: e + combining diaeresis
        eng.enroll("Zo\u00eb ", clips[1])  # composed, a trailing space: the same speaker
        eng.enroll("legacy", clips[2])
    with Store(db) as store:
        assert store.profiles.speakers(name="Zo\u00eb")[0].utterances == 2
    # A name an older version let in: it must stay reachable and erasable over HTTP.
    with create_engine(db).begin() as connection:
        connection.execute(text("UPDATE speakers SET name = 'old/name' WHERE name = 'legacy'"))
    admin = {"X-API-Key": keys["admin"]}
    with TestClient(create_app(str(home), db, background=False)) as client:
        assert client.get("/v1/speakers/Zo%C3%AB%20", headers=admin).json()["utterances"] == 2
        assert client.get("/v1/speakers/Zoe%CC%88", headers=admin).status_code == 200
        assert client.get("/v1/speakers/old/name", headers=admin).json()["name"] == "old/name"
        erased = client.delete("/v1/speakers/old%2Fname", headers=admin)
        assert erased.status_code == 200 and erased.json()["speaker"] == "old/name"
        assert client.get("/v1/speakers/old/name", headers=admin).status_code == 404


def test_failures_on_the_server_side_name_no_urls_or_paths(tmp_path, fresh_pg_url, by_speaker):
    home, db, keys = _home(tmp_path, fresh_pg_url, by_speaker)
    clip = by_speaker("vctk-4")[sorted(by_speaker("vctk-4"))[0]][-1]
    database = db.rsplit("/", 1)[1]
    with TestClient(create_app(str(home), db, background=False)) as client:
        assert client.get("/readyz").json()["ready"] is True
        # The database goes away under the running service (as when it is dropped or its host is lost).
        with create_engine(db.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT").connect() as c:
            c.execute(text(f'DROP DATABASE "{database}" WITH (FORCE)'))
        answers = [
            _post(client, "/v1/speakers/someone/utterances", clip, keys["admin"]),
            client.get("/readyz"),
            client.get("/v1/speakers", headers={"X-API-Key": keys["admin"]}),
        ]
        assert client.get("/healthz").status_code == 200  # alive, not ready
    assert [r.status_code for r in answers] in ([503, 503, 503], [401, 503, 401]), [r.text for r in answers]
    for r in answers:
        body = r.text
        assert database not in body and "127.0.0.1" not in body and "postgres" not in body.lower(), body
    assert answers[1].json()["checks"]["database"] == {"ok": False, "error": "storage_error"}


def test_a_corrupted_active_checkpoint_is_not_ready_and_says_no_path(vctk_home, by_speaker):
    home, db, keys = vctk_home
    with Store(db) as store:
        active = store.registry.active_version()
    checkpoint = home / active.checkpoint
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    spoil_stored_checkpoint(db, active.checkpoint_sha256)  # the database's copy too, else it would replace the file
    clip = by_speaker("vctk-4")[sorted(by_speaker("vctk-4"))[0]][-1]
    with TestClient(create_app(str(home), db, background=False)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["checkpoint"] == {"ok": False, "error": "checkpoint_error"}
        assert ready.json()["checks"]["database"]["ok"] and ready.json()["checks"]["disk"]["ok"]
        failed = _post(client, "/v1/identify", clip, keys["query"])
        assert failed.status_code == 500 and failed.json()["error"] == "checkpoint_error"
        assert str(home) not in failed.text and ".pt" not in failed.text, failed.text


def test_eval_reads_its_lists_only_inside_the_audio_roots(tmp_path, dev_data):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f"[audio]\nroots = {json.dumps(str(dev_data))}\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    manifest = outside / "manifest.csv"
    manifest.write_text("path,speaker\n" + "".join(
        f"{p},{p.parent.name}\n" for p in sorted((dev_data / "vctk-4").rglob("*.flac"))[:6]))
    trials = outside / "trials.txt"
    trials.write_text(f"x {sorted((dev_data / 'vctk-4').rglob('*.flac'))[0]} target\n")
    inside_manifest = dev_data / "vctk-4" / "manifest.csv"
    base = [sys.executable, "-m", "voiceprint.cli", "--home", str(home), "--db", f"sqlite:///{home / 'v.db'}"]
    assert subprocess.run(base + ["init"], cwd=REPO, capture_output=True).returncode == 0
    for extra in ([str(manifest)], [str(inside_manifest), "--trials", str(trials)]):
        out = subprocess.run(base + ["eval", *extra], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 2 and "roots" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_utterances_are_listed_accepted_and_removed_over_http_by_the_right_roles(tmp_path, by_speaker):
    voices = by_speaker("librispeech-test-other")
    ann, bob, cat = sorted(voices)[:3]
    home = tmp_path / "home"
    with Engine.init(home=home) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("admin", "enroll", "query")}
        for name in (ann, bob, cat):
            for path in voices[name][:4]:
                eng.enroll(name, path)
        result = eng.enroll(ann, voices[bob][5])  # bob's voice under ann's name: held for review
        assert result.feedback == "INCONSISTENT_SPEAKER"
        held = result.utterance_id
    db = f"sqlite:///{home / 'voiceprint.db'}"
    with TestClient(create_app(str(home), db, background=False)) as client:
        def call(method: str, route: str, role: str, **params):
            return client.request(method, route, params=params, headers={"X-API-Key": keys[role]})

        assert call("GET", "/v1/utterances", "query", speaker=ann).status_code == 403
        listed = call("GET", "/v1/utterances", "enroll", speaker=ann).json()
        assert len(listed) == 5 and [u["id"] for u in listed if u["held_for_review"]] == [held]
        assert {"source", "created_at", "duration_s", "speech_s", "quality"} <= set(listed[0])
        assert [u["id"] for u in call("GET", "/v1/utterances", "enroll", speaker=ann, status="held_for_review").json()] == [held]
        assert len(call("GET", "/v1/utterances", "enroll", speaker=ann, status="enrolled").json()) == 4
        assert call("GET", "/v1/utterances", "enroll", speaker=ann, status="pending").status_code == 422
        missing = call("GET", "/v1/utterances", "enroll", speaker="nobody")
        assert missing.status_code == 404 and missing.json()["error"] == "unknown_speaker"

        assert call("POST", f"/v1/utterances/{held}/accept", "enroll").status_code == 403
        accepted = call("POST", f"/v1/utterances/{held}/accept", "admin")
        assert accepted.status_code == 200 and accepted.json() == {"utterance": held, "speaker": ann, "status": "enrolled"}
        profile = call("GET", f"/v1/speakers/{ann}", "enroll").json()
        assert profile["held_for_review"] == [] and profile["utterances"] == 5
        again = call("POST", f"/v1/utterances/{held}/accept", "admin")
        assert again.status_code == 400 and "not held for review" in again.json()["message"]

        assert call("DELETE", f"/v1/utterances/{held}", "enroll").status_code == 403
        removed = call("DELETE", f"/v1/utterances/{held}", "admin")
        assert removed.status_code == 200 and removed.json()["removed"] is True
        assert call("GET", f"/v1/speakers/{ann}", "enroll").json()["utterances"] == 4
        for method, route in (("DELETE", f"/v1/utterances/{held}"), ("POST", f"/v1/utterances/{held}/accept")):
            gone = call(method, route, "admin")
            assert gone.status_code == 404 and gone.json()["error"] == "unknown_utterance", (method, gone.text)


def test_status_and_calibrate_over_http_need_an_admin_key(vctk_home):
    home, db, keys = vctk_home
    with Engine.open(home=home, db=db) as eng:
        expected = eng.status()
    with TestClient(create_app(str(home), db, background=False)) as client:
        for route, method in (("/v1/status", "GET"), ("/v1/calibrate", "POST")):
            for role in ("enroll", "query"):
                assert client.request(method, route, headers={"X-API-Key": keys[role]}).status_code == 403, (route, role)
        admin = {"X-API-Key": keys["admin"]}
        before = client.get("/v1/status", headers=admin).json()
        assert before["active_version"] == expected["active_version"] == 1
        assert before["held_for_review"] == expected["held_for_review"] and before["calibration"] is None
        assert before["schedule"] == []
        assert before["decisions"]["backend"] == "cosine" and "not calibrated" in before["decisions"]["why"]
        refused = client.post("/v1/calibrate", headers=admin)  # 4 speakers: too few to calibrate on
        assert refused.status_code == 409 and refused.json()["error"] == "not_enough_data", refused.text
        assert "min_calibration_speakers" in refused.json()["message"]
        (home / "config.toml").write_text("[service]\nmax_top = 2\n[scoring]\nmin_calibration_speakers = 2\n")
    with TestClient(create_app(str(home), db, background=False)) as client:
        fitted = client.post("/v1/calibrate", headers=admin)
        assert fitted.status_code == 200, fitted.text
        body = fitted.json()
        assert body["version"] == 1 and body["trials"]["speakers"] == 4 and "cosine" in body["thresholds"]
        after = client.get("/v1/status", headers=admin).json()
        assert after["calibration"]["id"] == body["id"] and after["calibration"]["speakers_now"] == 4


def test_identify_batch_and_dry_run_requests_need_their_roles(tmp_path, by_speaker):
    home, db, keys = _home(tmp_path, None, by_speaker)
    probe = _probe(by_speaker, sorted(by_speaker("vctk-4"))[0])
    files = [("file", ("a.flac", probe.read_bytes()))] * 2
    with TestClient(create_app(str(home), db, background=False)) as client:
        for key, status in ((None, 401), ("vp_not-a-key", 401), (keys["enroll"], 403)):
            headers = {} if key is None else {"X-API-Key": key}
            assert client.post("/v1/identify/batch", files=files, headers=headers).status_code == status, key
        for role in ("query", "admin"):
            answered = client.post("/v1/identify/batch", files=files, headers={"X-API-Key": keys[role]})
            assert answered.status_code == 200 and [a["ok"] for a in answered.json()] == [True, True], answered.text
        for role in ("query", "enroll"):
            asked = client.post("/v1/refresh", json={"dry_run": True}, headers={"X-API-Key": keys[role]})
            assert asked.status_code == 403, role
    with Engine.open(home=home, db=db) as eng:
        assert eng.jobs() == []  # a refused request queues nothing
