"""Ids and numbers out of range: unknown or refused, never a storage failure or a traceback.

Every id the schema stores is a 32-bit INTEGER on PostgreSQL (64-bit on SQLite); a number
past that (2**31, 2**63, 2**64) or below 1 names no row. Over HTTP it gets 422 or 404,
on the command line one line and exit 2, from the library the same typed error as any
other unknown id. Real databases (SQLite and PostgreSQL), real keys, the real parser.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from voiceprint import cli
from voiceprint.engine import Engine
from voiceprint.engine.bounds import MAX_ID, Bounds, flag
from voiceprint.engine.errors import InvalidInput, UnknownVersion
from voiceprint.service import create_app
from voiceprint.storage import ids
from voiceprint.storage import models as m

OUTSIDE = [2**31, 2**63, 2**64, -1, 0]
BEYOND = [2**31, 2**63, 2**64]  # past INTEGER on PostgreSQL, past 64 bits on SQLite


@pytest.fixture
def initialised(db_url, tmp_path) -> tuple[str, str, str]:
    """An initialised home on each backend: (home, database URL, an admin key)."""
    home = str(tmp_path / "home")
    with Engine.init(home=home, db=db_url) as eng:
        _, admin = eng.create_key("admin", by="test")
    return home, db_url, admin


def test_max_id_is_what_every_id_column_holds():
    # engine.bounds.MAX_ID (the HTTP and CLI limit) must follow the schema: were a column
    # widened to BIGINT, this fails until the limit is reconsidered.
    columns = [c for t in m.Base.metadata.tables.values() for c in t.columns if c.primary_key or c.foreign_keys]
    integer = [c for c in columns if c.type.python_type is int]
    assert len(integer) >= 10
    for column in integer:
        assert ids.fits(column, MAX_ID) and not ids.fits(column, MAX_ID + 1), column


@pytest.mark.parametrize("number", BEYOND + [-1, 0, MAX_ID])
def test_store_lookups_answer_unknown_for_any_id(store, number):
    with pytest.raises(InvalidInput, match=f"no job {number}$"):
        store.jobs.get_job(number)
    with pytest.raises(UnknownVersion, match=f"model version {number} does not exist"):
        store.registry.get_version(number)
    with pytest.raises(UnknownVersion):
        store.registry.set_alias("active", number, actor="test", reason="test")
    with pytest.raises(InvalidInput, match=f"no API key {number}$"):
        store.keys.revoke_key(number, actor="test")
    for lookup in (store.profiles.embedded_versions, store.profiles.accept_utterance, store.profiles.remove_utterance):
        with pytest.raises(InvalidInput, match=f"no utterance {number}$"):
            lookup(number)
    assert store.keys.audit_log() == []  # nothing was written


@pytest.mark.parametrize("number", BEYOND)
def test_engine_calls_with_ids_past_the_schema_are_unknown(initialised, number):
    home, db, _ = initialised
    with Engine.open(home=home, db=db) as eng:
        with pytest.raises(UnknownVersion):
            eng.rollback(number)
        with pytest.raises(UnknownVersion):
            eng.evaluate([], version=number)
        for call in (eng.job, eng.revoke_key, eng.accept_utterance, eng.remove_utterance):
            with pytest.raises(InvalidInput, match=f"no .*{number}$"):
                call(number)
        assert eng.active_version().number == 1


def test_http_id_routes_refuse_ids_out_of_range(initialised):
    home, db, admin = initialised
    auth = {"Authorization": f"Bearer {admin}"}
    with TestClient(create_app(home, db, background=False), raise_server_exceptions=False) as client:
        for number in OUTSIDE:
            for method, route in (("GET", f"/v1/jobs/{number}"), ("POST", f"/v1/versions/{number}/activate")):
                reply = client.request(method, route, headers=auth)
                assert reply.status_code == 422, (route, reply.status_code, reply.text)
                assert reply.json()["error"] == "invalid_request", reply.text
        # The largest id that can exist, and does not: unknown, 404.
        assert client.get(f"/v1/jobs/{MAX_ID}", headers=auth).json()["error"] == "unknown_job"
        reply = client.post(f"/v1/versions/{MAX_ID}/activate", headers=auth)
        assert (reply.status_code, reply.json()["error"]) == (404, "unknown_version")
        assert client.post("/v1/versions/1/activate", headers=auth).json()["changed"] is False


def _refused(capsys, argv: list[str]) -> str:
    """Run the command line in-process; it must exit 2 with one line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, (argv, out, err)
    assert err.startswith("voiceprint: error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    return err


ID_COMMANDS = [
    ["rollback", "{}"],
    ["accept", "{}"],
    ["remove-utterance", "{}"],
    ["keys", "revoke", "--id", "{}"],
    ["eval", "manifest.csv", "--version", "{}"],
]


@pytest.mark.parametrize("command", ID_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("number", [*map(str, OUTSIDE), "1e3", "seven"])
def test_cli_refuses_ids_out_of_range_in_one_line(capsys, tmp_path, command, number):
    argv = ["--home", str(tmp_path / "never-created"), *(a.format(number) for a in command)]
    err = _refused(capsys, argv)
    assert number in err and "(see voiceprint " in err
    assert not (tmp_path / "never-created").exists()  # refused before anything was opened


@pytest.mark.parametrize(
    "argv, words",
    [
        (["schedule", "--every", "100000000000d"], "argument --every: '100000000000d': must be from 1s to 365d"),
        (["schedule", "--every", "0s"], "argument --every"),
        (["schedule", "--every", "-5m"], "argument --every"),
        (["schedule", "--min-new", "1", "--check-every", "99999999999999h"], "argument --check-every"),
        (["schedule", "--min-new", "0"], "argument --min-new: must be at least 1, got 0"),
        (["schedule", "--min-new", str(2**63)], "argument --min-new: must be at most 2147483647"),
        (["identify", "x.wav", "--top", "0"], "argument --top: must be at least 1, got 0"),
        (["identify", "x.wav", "--top", "-3"], "argument --top"),
        (["eval", "m.csv", "--enroll", "0"], "argument --enroll: must be at least 1, got 0"),
        (["eval", "m.csv", "--min-speech", "-1"], "argument --min-speech: must be at least 0, got -1"),
        (["eval", "m.csv", "--min-speech", "nan"], "argument --min-speech: must be a finite number"),
        (["eval", "m.csv", "--min-speech", "1e9"], "argument --min-speech: must be at most 3600"),
        (["serve", "--port", "70000"], "argument --port: must be at most 65535, got 70000"),
        (["serve", "--port", "-1"], "argument --port: must be at least 0, got -1"),
        (["keys", "frobnicate"], "argument action: invalid choice"),
    ],
)
def test_cli_refuses_numbers_out_of_range_in_one_line(capsys, tmp_path, argv, words):
    err = _refused(capsys, ["--home", str(tmp_path / "never-created"), *argv])
    assert words in err


def test_cli_ids_that_fit_but_name_nothing_are_one_line_errors(initialised, capsys):
    home, db, _ = initialised
    g = ["--home", home, "--db", db]
    for argv, words in (
        (["rollback", str(MAX_ID)], f"model version {MAX_ID} does not exist"),
        (["accept", str(MAX_ID)], f"no utterance {MAX_ID}"),
        (["remove-utterance", str(MAX_ID)], f"no utterance {MAX_ID}"),
        (["keys", "revoke", "--id", str(MAX_ID)], f"no API key {MAX_ID}"),
    ):
        code = cli.main([*g, *argv])
        _, err = capsys.readouterr()
        assert code == 2 and err.startswith("voiceprint: error: ") and err.count("\n") == 1, (argv, err)
        assert words in err, (argv, err)


def test_flag_parses_within_bounds_and_names_the_problem():
    parse = flag(Bounds(above=0, below=1), float)
    assert parse("0.25") == 0.25
    for text, words in (("0", "must be above 0, got 0"), ("1", "must be below 1, got 1"), ("x", "'x' is not a number")):
        with pytest.raises(Exception, match=words):
            parse(text)
