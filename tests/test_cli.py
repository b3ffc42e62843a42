"""The command line end to end: real audio, a real database, the installed entry point.

Most tests call ``cli.main`` in-process (fast); streaming and crash tests run the
``voiceprint`` executable as a separate process, because that is what they are about.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import MetaData, create_engine, select as sql_select

from test_stored_checkpoints import spoil_stored_checkpoint
from voiceprint import cli

pytestmark = pytest.mark.data

VOICEPRINT = Path(sys.executable).with_name("voiceprint")


def librispeech(dev_data: Path) -> dict[str, list[Path]]:
    with open(dev_data / "librispeech-test-other" / "manifest.csv", newline="") as fh:
        by_speaker: dict[str, list[Path]] = {}
        for row in csv.DictReader(fh):
            by_speaker.setdefault(row["speaker"], []).append(dev_data / "librispeech-test-other" / row["path"])
    return by_speaker


def _lockstep(proc, lines: list[str]) -> list[dict]:
    """Write each line to ``proc``'s stdin only after the previous one was answered on its
    stdout (one JSON line each), then close stdin: this deadlocks unless the command
    answers lines as they arrive."""
    answers = []
    for line in lines:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        answers.append(json.loads(_readline(proc)))
    proc.stdin.close()
    return answers


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fingerprint(url: str) -> str:
    """A hash of every row of every table: equal fingerprints mean nothing was stored."""
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        digest = hashlib.sha256()
        with engine.connect() as conn:
            for table in sorted(meta.sorted_tables, key=lambda t: t.name):
                rows = sorted(repr(tuple(r)) for r in conn.execute(sql_select(table)))
                digest.update(f"{table.name}:{len(rows)}:{''.join(rows)}".encode())
        return digest.hexdigest()
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def home(request, tmp_path) -> tuple[Path, str]:
    """An initialised home folder with its database URL, on SQLite and on PostgreSQL."""
    home = tmp_path / "home"
    if request.param == "sqlite":
        url = f"sqlite:///{home / 'voiceprint.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    assert cli.main(["--home", str(home), "--db", url, "init"]) == 0
    return home, url


def test_walkthrough(home, dev_data, capsys):
    root, url = home
    g = ["--home", str(root), "--db", url]
    voices = librispeech(dev_data)
    names = sorted(voices)[:3]
    for name in names:
        code, out, _ = run(capsys, *g, "enroll", name, *map(str, voices[name][:3]))
        assert code == 0, out
        assert out.count("enrolled") == 3

    code, out, _ = run(capsys, *g, "--json", "speakers")
    speakers = json.loads(out)
    assert [s["name"] for s in speakers] == names
    assert all(s["utterances"] == 3 and s["speech_s"] > 3 for s in speakers)

    probe = voices[names[1]][5]
    code, out, _ = run(capsys, *g, "identify", str(probe), "--top", "2", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["decision"] == names[1] and not result["unknown"]
    assert [c["speaker"] for c in result["candidates"]][0] == names[1]
    assert len(result["candidates"]) == 2
    assert result["candidates"][0]["score"] >= result["candidates"][1]["score"]

    code, out, _ = run(capsys, *g, "verify", names[1], str(probe), "--json")
    assert code == 0 and json.loads(out)["accepted"] is True
    code, out, _ = run(capsys, *g, "verify", names[0], str(probe))
    assert out.startswith("reject") and code == 1

    code, out, _ = run(capsys, *g, "versions", "--json")
    (version,) = json.loads(out)
    assert version["number"] == 1 and version["active"] and version["status"] == "active"
    assert version["parent"] is None and len(version["checkpoint_sha256"]) == 64

    code, out, _ = run(capsys, *g, "db", "upgrade", "--json")
    assert code == 0 and json.loads(out)["revision"] == json.loads(out)["head"]


def test_enrollment_feedback_and_exact_centroid(home, dev_data, capsys):
    root, url = home
    voice = librispeech(dev_data)["1688"]
    code, out, _ = run(capsys, "--home", str(root), "--db", url, "--json", "enroll", "1688", *map(str, voice[:4]))
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["count"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["similarity_before"] is None
    assert all(0.5 < r["similarity_before"] <= 1.0 for r in rows[1:])
    assert all(r["speech_s"] > 1.0 and r["version"] == 1 for r in rows)

    from voiceprint.storage import Store

    store = Store(url)
    try:
        centroid = store.profiles.centroid("1688", 1)
        np.testing.assert_allclose(centroid.mean, store.profiles.embeddings("1688", 1).mean(axis=0), atol=1e-6)
        assert centroid.count == 4
    finally:
        store.close()


def _bad_inputs(tmp: Path, dev_data: Path) -> dict[str, tuple[Path, str]]:
    """Bad audio files and the error code each must produce."""
    real, sr = sf.read(librispeech(dev_data)["1688"][2], dtype="float32")
    (tmp / "noise.wav").write_bytes(os.urandom(4000))
    (tmp / "empty.wav").write_bytes(b"")
    sf.write(tmp / "silence.wav", np.zeros(16000 * 3, dtype=np.float32), 16000)
    middle = len(real) // 2
    sf.write(tmp / "short.wav", real[middle : middle + sr // 2], sr)  # half a second of speech
    sf.write(tmp / "nan.wav", np.full(16000 * 2, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    # 11 minutes: over the 10-minute default limit, rejected from the header alone.
    sf.write(tmp / "long.flac", np.zeros(16000 * 660, dtype=np.int16), 16000)
    return {
        "undecodable": (tmp / "noise.wav", "undecodable_audio"),
        "empty": (tmp / "empty.wav", "empty_audio"),
        "silence": (tmp / "silence.wav", "no_speech"),
        "too short": (tmp / "short.wav", "too_short"),
        "non-finite": (tmp / "nan.wav", "non_finite_audio"),
        "too long": (tmp / "long.flac", "too_long"),
        "missing": (tmp / "does-not-exist.wav", "missing_audio"),
    }


def test_bad_inputs_are_clear_errors_and_store_nothing(home, dev_data, tmp_path, capsys):
    root, url = home
    g = ["--home", str(root), "--db", url]
    assert run(capsys, *g, "enroll", "1688", str(librispeech(dev_data)["1688"][0]))[0] == 0
    before = fingerprint(url)
    for label, (path, expected) in _bad_inputs(tmp_path, dev_data).items():
        for argv in (["enroll", "1688", str(path)], ["enroll", "newcomer", str(path)], ["identify", str(path)], ["verify", "1688", str(path)]):
            code, out, err = run(capsys, *g, *argv)
            assert code == 2, (label, argv, out, err)
            assert err.count("\n") == 1 and err.startswith("voiceprint: error:"), (label, err)
            assert err.count(path.name) == 1, (label, err)  # named once, not "a.wav: a.wav: ..."
            code, out, err = run(capsys, *g, "--json", *argv)
            assert json.loads(out.splitlines()[-1])["error"] == expected, (label, argv, out)
    assert fingerprint(url) == before


def test_exit_code_2_when_no_row_at_all_was_stored(home, dev_data, tmp_path, capsys):
    root, url = home
    g = ["--home", str(root), "--db", url]
    empty, missing = tmp_path / "empty.wav", tmp_path / "missing.wav"
    empty.write_bytes(b"")
    before = fingerprint(url)
    assert run(capsys, *g, "enroll", "ann", str(empty), str(missing))[0] == 2
    rows = tmp_path / "rows.csv"
    rows.write_text(f"speaker,path\nann,{empty}\nbob,{missing}\n")
    assert run(capsys, *g, "stream", str(rows))[0] == 2
    assert fingerprint(url) == before
    good = librispeech(dev_data)["1688"][0]
    assert run(capsys, *g, "enroll", "ann", str(empty), str(good))[0] == 1  # some stored, some not


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "voiceprint 0.1.0"


def test_unknown_speaker_in_verify_is_an_error(home, dev_data, capsys):
    root, url = home
    code, out, err = run(capsys, "--home", str(root), "--db", url, "--json", "verify", "nobody", str(librispeech(dev_data)["1688"][0]))
    assert code == 2 and json.loads(out)["error"] == "unknown_speaker"
    assert "nobody" in err


def test_corrupted_checkpoint_is_refused(home, dev_data, capsys):
    """Both copies spoilt: the home's file, and the database's (which alone would replace it)."""
    root, url = home
    checkpoint = root / "checkpoints" / "v0001.pt"
    data = bytearray(checkpoint.read_bytes())
    spoil_stored_checkpoint(url, hashlib.sha256(data).hexdigest())
    data[-100] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    before = fingerprint(url)
    code, out, err = run(capsys, "--home", str(root), "--db", url, "--json", "enroll", "1688", str(librispeech(dev_data)["1688"][0]))
    assert code == 2 and json.loads(out.splitlines()[-1])["error"] == "checkpoint_error"
    assert "corrupted" in err
    assert fingerprint(url) == before


def test_commands_before_init_say_what_to_do(tmp_path, dev_data, capsys):
    code, _, err = run(capsys, "--home", str(tmp_path / "nothing"), "speakers")
    assert code == 2 and "voiceprint" in err and ("init" in err or "upgrade" in err)


def test_identify_with_nobody_enrolled(home, dev_data, capsys):
    root, url = home
    code, out, _ = run(capsys, "--home", str(root), "--db", url, "--json", "identify", str(librispeech(dev_data)["1688"][0]))
    result = json.loads(out)
    assert code == 0 and result["unknown"] and result["candidates"] == []


# -- stream: separate processes ------------------------------------------------------


def _readline(proc: subprocess.Popen, timeout: float = 120) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no acknowledgement within the timeout"
    return proc.stdout.readline()


@pytest.fixture
def sqlite_home(tmp_path) -> tuple[Path, dict]:
    home = tmp_path / "home"
    env = {**os.environ, "VOICEPRINT_HOME": str(home)}
    env.pop("VOICEPRINT_DATABASE_URL", None)
    subprocess.run([VOICEPRINT, "init"], env=env, check=True, capture_output=True)
    return home, env


def test_stream_acknowledges_each_row_as_it_arrives(sqlite_home, dev_data):
    home, env = sqlite_home
    voices = librispeech(dev_data)
    proc = subprocess.Popen(
        [VOICEPRINT, "--json", "stream", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        proc.stdin.write("speaker,path\n")
        rows = [("1688", voices["1688"][0]), ("1998", voices["1998"][0]), ("1998", dev_data / "nope.flac"), ("1688", voices["1688"][1])]
        acks = _lockstep(proc, [f"{speaker},{path}" for speaker, path in rows])
        assert proc.wait(timeout=60) == 1  # one bad row
    finally:
        proc.kill()
    assert [a["ok"] for a in acks] == [True, True, False, True]
    assert acks[2]["error"] == "missing_audio" and acks[2]["row"] == 3
    assert acks[3]["count"] == 2


def test_stream_file_with_json_lines_and_bad_rows(sqlite_home, dev_data, tmp_path):
    home, env = sqlite_home
    voices = librispeech(dev_data)
    lines = [
        json.dumps({"speaker": "2033", "path": str(voices["2033"][0])}),
        "not json",
        json.dumps({"speaker": "2033"}),
        json.dumps({"speaker": "2033", "path": str(voices["2033"][1])}),
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run([VOICEPRINT, "--json", "stream", str(tmp_path / "rows.jsonl")], env=env, capture_output=True, text=True)
    acks = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["ok"] for a in acks] == [True, False, False, True]
    assert {a.get("error") for a in acks if not a["ok"]} == {"invalid_input"}
    assert done.returncode == 1


def test_stream_of_a_dataset_manifest(sqlite_home, dev_data):
    """A manifest with extra columns and relative paths streams as is."""
    _, env = sqlite_home
    done = subprocess.run(
        [VOICEPRINT, "--json", "stream", str(dev_data / "vctk-4" / "manifest.csv")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    acks = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(acks) == 40 and all(a["ok"] for a in acks)
    speakers = json.loads(subprocess.run([VOICEPRINT, "--json", "speakers"], env=env, capture_output=True, text=True).stdout)
    assert sorted(s["utterances"] for s in speakers) == [10, 10, 10, 10]


def test_acknowledged_enrollments_survive_kill_9(sqlite_home, dev_data):
    home, env = sqlite_home
    items = [(speaker, path) for speaker, paths in sorted(librispeech(dev_data).items()) for path in paths[:4]]
    proc = subprocess.Popen(
        [VOICEPRINT, "--json", "stream", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    proc.stdin.write("speaker,path\n" + "".join(f"{s},{p}\n" for s, p in items))
    proc.stdin.flush()
    acked = [json.loads(_readline(proc)) for _ in range(5)]
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream, while later rows are being processed
    proc.wait()
    from voiceprint.storage import Store

    store = Store(f"sqlite:///{home / 'voiceprint.db'}")
    try:
        stored = {(u.speaker, u.id) for u in store.profiles.utterances()}
        assert {(a["speaker"], a["utterance_id"]) for a in acked} <= stored
        for name in {speaker for speaker, _ in stored}:
            np.testing.assert_allclose(store.profiles.centroid(name, 1).mean, store.profiles.embeddings(name, 1).mean(axis=0), atol=1e-6)
    finally:
        store.close()


def test_review_and_calibration_through_the_cli(home, dev_data, capsys):
    root, url = home
    g = ["--home", str(root), "--db", url]
    voices = librispeech(dev_data)
    ann, bob, cat = sorted(voices)[:3]
    for name in (ann, bob, cat):
        assert run(capsys, *g, "enroll", name, *map(str, voices[name][:4]))[0] == 0

    code, out, _ = run(capsys, *g, "--json", "enroll", ann, str(voices[bob][5]))  # bob's voice, ann's name
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and row["feedback"] == "INCONSISTENT_SPEAKER" and row["count"] == 4
    held = row["utterance_id"]
    code, out, _ = run(capsys, *g, "--json", "pending")
    assert [u["id"] for u in json.loads(out)] == [held]
    code, out, _ = run(capsys, *g, "--json", "speakers")
    assert {s["name"]: (s["utterances"], s["pending"]) for s in json.loads(out)}[ann] == (4, 1)
    # One speaker's utterances: the ids that accept / remove-utterance take, the held one marked.
    code, out, _ = run(capsys, *g, "--json", "speakers", ann)
    listed = json.loads(out)
    assert code == 0 and len(listed) == 5 and {u["speaker"] for u in listed} == {ann}
    assert [(u["id"], u["status"]) for u in listed if u["held_for_review"]] == [(held, "held_for_review")]
    assert all(u["status"] == "enrolled" and u["speech_s"] > 1 and u["created_at"] for u in listed if u["id"] != held)
    code, out, err = run(capsys, *g, "speakers", f" {ann} ")  # the name policy: surrounding spaces are not part of it
    rows = out.splitlines()[1:]
    assert code == 0 and len(rows) == 5 and "1 held for review" in err
    assert [r.split()[:2] for r in rows if r.split()[0] == str(held)] == [[str(held), "held_for_review"]]
    code, out, err = run(capsys, *g, "speakers", "nobody-here")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "nobody-here" in err
    code, out, _ = run(capsys, *g, "--json", "remove-utterance", str(held))
    assert code == 0 and json.loads(out)["was"] == "pending"
    code, out, err = run(capsys, *g, "accept", str(held))
    assert code == 2 and "no utterance" in err

    code, out, err = run(capsys, *g, "calibrate")  # 3 speakers: the reference thresholds stay
    assert code != 0 and "min_calibration_speakers" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, *g, "--json", "status")
    decisions = json.loads(out)["decisions"]
    assert decisions["backend"] == "cosine" and "not calibrated" in decisions["why"]
    assert "reference" in decisions["identify_threshold_from"] and decisions["identify_threshold"] > decisions["verify_threshold"]
    (root / "config.toml").write_text("[scoring]\nmin_calibration_speakers = 2\n")  # calibrate them anyway
    code, out, err = run(capsys, *g, "--json", "calibrate")
    assert code == 0, err
    calibration = json.loads(out)
    assert code == 0 and calibration["trials"]["speakers"] == 3, err
    assert set(calibration["thresholds"]) == {"cosine"}  # 12 utterances: too few for an AS-norm cohort
    code, out, err = run(capsys, *g, "calibrate")
    assert "cannot measure" in err and "cosine" in err  # says why its numbers are rough

    code, out, _ = run(capsys, *g, "--json", "identify", str(voices[cat][6]))
    result = json.loads(out)
    assert result["decision"] == cat and result["backend"] == "cosine"
    assert result["threshold"] == pytest.approx(calibration["thresholds"]["cosine"]["identify"])

    code, out, _ = run(capsys, *g, "--json", "enroll", "--force", ann, str(voices[bob][5]))
    assert json.loads(out)["feedback"] == "OK"


def test_verbose_shows_the_engines_log_and_alembic_only_at_vv(tmp_path, dev_data):
    def voiceprint(*argv: str) -> str:
        done = subprocess.run([str(VOICEPRINT), *argv], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stderr

    quiet = voiceprint("--home", str(tmp_path / "a"), "-v", "init")
    assert "alembic" not in quiet
    assert "INFO alembic.runtime.migration: Running upgrade" in voiceprint("--home", str(tmp_path / "b"), "-vv", "init")
    first, second = [str(p) for p in sorted((dev_data / "vctk-4" / "p225").iterdir())[:2]]
    verbose = voiceprint("--home", str(tmp_path / "a"), "enroll", "ann", first, "-v")
    assert "INFO voiceprint.engine.audio: loading the silero-vad model" in verbose and "alembic" not in verbose
    assert "INFO" not in voiceprint("--home", str(tmp_path / "a"), "enroll", "ann", second)


# -- several probes in one call --------------------------------------------------------


def test_identify_and_verify_answer_each_file_alone(tmp_path, dev_data, capsys):
    """One engine for every file; each file gets its own answer in order, a bad one its
    own error; exit 0 all answered, 1 some refused (or, for verify, rejected), 2 none."""
    home = tmp_path / "home"
    g = ["--home", str(home), "--db", f"sqlite:///{home / 'voiceprint.db'}"]
    assert run(capsys, *g, "init")[0] == 0
    voices = librispeech(dev_data)
    ann, bob = sorted(voices)[:2]
    for name in (ann, bob):
        assert run(capsys, *g, "enroll", name, *map(str, voices[name][:3]))[0] == 0
    probe_a, probe_b, missing = voices[ann][5], voices[bob][5], tmp_path / "missing.flac"
    (tmp_path / "silence.wav").write_bytes(b"RIFF\x00\x00")  # undecodable

    code, out, err = run(capsys, *g, "--json", "identify", str(probe_a), str(missing), str(probe_b))
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 1, err
    assert [(a["file"], a["ok"]) for a in answers] == [(str(probe_a), True), (str(missing), False), (str(probe_b), True)]
    assert [a["candidates"][0]["speaker"] for a in answers if a["ok"]] == [ann, bob] and answers[1]["error"] == "missing_audio"

    code, out, err = run(capsys, *g, "identify", "--top", "1", str(probe_b), str(probe_a))
    assert code == 0, err
    blocks = out.split(f"{probe_a}:\n")
    assert blocks[0].startswith(f"{probe_b}:\n  decision: ") and blocks[1].startswith("  decision: ")
    assert blocks[0].splitlines()[3].split()[:2] == ["1.", bob] and blocks[1].splitlines()[2].split()[:2] == ["1.", ann]
    assert "2 of 2 files answered" in err

    # --list: one path a line, relative to the list's folder, after the files named.
    listing = tmp_path / "probes.txt"
    listing.write_text(f"{probe_b}\n\nsilence.wav\n{probe_a}\n")
    code, out, err = run(capsys, *g, "--json", "identify", str(probe_a), "--list", str(listing))
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [a["file"] for a in answers] == [str(probe_a), str(probe_b), "silence.wav", str(probe_a)]
    assert [a["candidates"][0]["speaker"] if a["ok"] else a["error"] for a in answers] == [ann, bob, "undecodable_audio", ann]

    code, out, err = run(capsys, *g, "identify", str(missing), str(tmp_path / "silence.wav"))
    assert code == 2 and out == "" and "missing" in err and "undecodable_audio" in err
    for refused in (["--list", str(tmp_path)], ["--list", str(tmp_path / "nope.txt")], []):
        code, out, err = run(capsys, *g, "identify", *refused)
        assert code == 2 and len(err.strip().splitlines()) == 1, (refused, err)
    (tmp_path / "empty.txt").write_text("\n")
    code, out, err = run(capsys, *g, "identify", "--list", str(tmp_path / "empty.txt"))
    assert code == 2 and "names no audio files" in err

    # verify: 0 only when every file was answered and accepted; an impostor's file makes it 1.
    code, out, err = run(capsys, *g, "--json", "verify", ann, str(probe_a), str(probe_b))
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [a["file"] for a in answers] == [str(probe_a), str(probe_b)] and not answers[1]["accepted"], err
    code, out, err = run(capsys, *g, "verify", ann, str(probe_a), str(voices[ann][6]))
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(probe_a), str(voices[ann][6])], out
    assert all(line.split(": ")[1] in (f"accept {ann}", f"reject {ann}") for line in lines), out
    assert code == (0 if all(": accept " in line for line in lines) else 1), (code, out)
    code, out, err = run(capsys, *g, "verify", "nobody", str(probe_a), str(probe_b))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nobody" in err


def test_identify_list_from_stdin_answers_each_line_as_it_arrives(sqlite_home, dev_data):
    home, env = sqlite_home
    voices = librispeech(dev_data)
    ann = sorted(voices)[0]
    subprocess.run([VOICEPRINT, "enroll", ann, *map(str, voices[ann][:3])], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([VOICEPRINT, "--json", "identify", "--list", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        answers = _lockstep(proc, [str(p) for p in (voices[ann][5], dev_data / "nope.flac", voices[ann][6])])
        assert proc.wait(timeout=60) == 1  # one file refused
    finally:
        proc.kill()
    assert [(a["ok"], a["candidates"][0]["speaker"] if a["ok"] else a["error"]) for a in answers] == [
        (True, ann), (False, "missing_audio"), (True, ann)]
