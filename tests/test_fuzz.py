"""Property-style fuzzing of every HTTP route and every CLI command (Hypothesis).

Routes and commands are discovered from the app and the argument parser, so a new one is
fuzzed without editing this file. Each example sends hostile values (huge and negative
integers, dot segments, slashes, control and combining characters, NUL bytes, random
and truncated audio, wrong media types, every kind of key) and checks three things:

- no 5xx over HTTP, no traceback and no exit code outside 0 / 1 / 2 on the CLI;
- an answer that refuses (4xx, exit 2) leaves the database exactly as it was
  (a fingerprint of every row of every table);
- the run is bounded: ``VOICEPRINT_FUZZ_EXAMPLES`` examples per test (default 300 routes,
  150 commands), derandomised so CI is repeatable; ``VOICEPRINT_FUZZ_RANDOM=1`` explores
  new examples instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import MetaData, create_engine, select

from voiceprint import cli
from voiceprint.engine import Engine
from voiceprint.service import create_app
from voiceprint.service.routes import router

pytestmark = pytest.mark.data

EXAMPLES = int(os.environ.get("VOICEPRINT_FUZZ_EXAMPLES", "0"))
FUZZ = dict(
    deadline=None,
    derandomize=os.environ.get("VOICEPRINT_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Commands that run until stopped or train a model: their argument parsing is fuzzed
# through --help-free invalid values only (see _argv), never a valid run.
LONG_RUNNING = {"serve", "refresh"}

# -- hostile values ----------------------------------------------------------------------

NASTY_STRINGS = [
    "", " ", ".", "..", "/", "a/b", "%2F", "%00", "alice ", " alice", "Zoe\u0308", "\u200b", "\u202e", "bo\nb",
    "-1", "0", "1e309", "NaN", "inf", "null", "true", "9" * 40, "x" * 300, "'; DROP TABLE speakers;--",
    "{\"a\": 1}", "\\", "C:\\x", "~", "*", "?", "#",
]
NASTY_INTS = [0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]

printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
texts = st.one_of(st.sampled_from(NASTY_STRINGS), printable)
ints = st.one_of(st.sampled_from(NASTY_INTS), st.integers(-(2**70), 2**70))
values = st.one_of(texts, ints.map(str), st.sampled_from(["true", "false", "1", "yes", "", "1.5", "-0"]))


def fingerprint(engine) -> str:
    """A hash of every row of every table: equal before and after means nothing was stored."""
    meta = MetaData()
    meta.reflect(engine)
    digest = hashlib.sha256()
    with engine.connect() as connection:
        for table in sorted(meta.sorted_tables, key=lambda t: t.name):
            order = list(table.primary_key.columns) or list(table.columns)
            for row in connection.execute(select(table).order_by(*order)):
                digest.update(repr((table.name, tuple(row))).encode())
    return digest.hexdigest()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fuzz_home(request, tmp_path_factory, by_speaker):
    """A home with three vctk-4 speakers, keys of each role and one revoked key, on each
    backend (PostgreSQL's 32-bit integers and its errors differ from SQLite's)."""
    root = tmp_path_factory.mktemp("fuzz")
    home = root / "home"
    home.mkdir()
    (home / "config.toml").write_text("")
    db = f"sqlite:///{home / 'voiceprint.db'}" if request.param == "sqlite" else request.getfixturevalue("module_pg_url")
    speakers = by_speaker("vctk-4")
    with Engine.init(home=home, db=db) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("admin", "enroll", "query")}
        revoked, keys["revoked"] = eng.create_key("admin", by="test")
        eng.revoke_key(revoked.id, by="test")
        for speaker in sorted(speakers)[:3]:
            for path in speakers[speaker][:3]:
                eng.enroll(speaker, path)
    clips = [paths[-1] for paths in speakers.values()]
    return {"root": root, "home": home, "db": db, "keys": keys, "names": sorted(speakers), "clips": clips}


def _audio_bodies(clips: list[Path]):
    real = st.sampled_from(clips).map(lambda p: p.read_bytes())
    return st.one_of(
        real,
        st.tuples(real, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),  # truncated
        st.tuples(real, st.integers(0, 10**6), st.integers(0, 255)).map(
            lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]  # one byte changed
        ),
        st.binary(max_size=4000),
        st.just(b""),
        st.just(b"RIFF\xff\xff\xff\xffWAVEfmt "),
    )


CONTENT_TYPES = ["audio/flac", "audio/wav", "application/octet-stream", "multipart/form-data; boundary=zz",
                 "application/json", "text/plain", "audio/", "", None]


def _routes(app) -> list:
    """The API's routes (with their declared parameters) and the app's own (schema, docs)."""
    found = [r for r in [*app.routes, *router.routes] if isinstance(getattr(r, "methods", None), set)]
    return sorted(found, key=lambda r: (r.path, sorted(r.methods)))


def _params(route, where: str) -> list:
    dependant = getattr(route, "dependant", None)
    return [] if dependant is None else getattr(dependant, where)


def _fill(path: str, params: dict[str, str]) -> str:
    for name, value in params.items():
        path = path.replace("{" + name + ":path}", value).replace("{" + name + "}", value)
    return path


def test_every_route_answers_hostile_requests_without_5xx_or_stored_changes(fuzz_home):
    app = create_app(str(fuzz_home["home"]), fuzz_home["db"], background=False)
    routes = _routes(app)
    assert {"/v1/identify", "/v1/speakers/{speaker}/utterances", "/readyz"} <= {r.path for r in routes}
    engine = create_engine(fuzz_home["db"])
    known = st.sampled_from(fuzz_home["names"] + ["1", "2"])
    keys = st.sampled_from([None, "vp_not-a-key", "x" * 5000, *fuzz_home["keys"].values()])

    @settings(max_examples=EXAMPLES or 300, **FUZZ)
    @given(data=st.data())
    def request(data):
        route = data.draw(st.sampled_from(routes), label="route")
        method = data.draw(st.sampled_from(sorted(route.methods)), label="method")
        path_params = {p.name: data.draw(st.one_of(known, texts, ints.map(str)), label=p.name)
                       for p in _params(route, "path_params")}
        # Percent-encoded as a client would, '/' kept or encoded: both reach the server differently.
        url = _fill(route.path, {k: quote(v, safe="/" if data.draw(st.booleans()) else "") for k, v in path_params.items()})
        query = {p.name: data.draw(values, label=p.name) for p in _params(route, "query_params") if data.draw(st.booleans())}
        query.update(data.draw(st.dictionaries(st.sampled_from(["force", "top", "dry_run", "x"]), values, max_size=2)))
        headers = {}
        key = data.draw(keys, label="key")
        if key is not None:
            header = data.draw(st.sampled_from(["X-API-Key", "Authorization"]), label="key header")
            headers[header] = key if header == "X-API-Key" else f"Bearer {key}"
        kind = data.draw(st.sampled_from(CONTENT_TYPES), label="content-type")
        if kind is not None:
            headers["Content-Type"] = kind
        body = data.draw(_audio_bodies(fuzz_home["clips"]), label="body") if method in ("POST", "PUT") else b""
        before = fingerprint(engine)
        try:
            response = client.request(method, url, params=query, headers=headers, content=body)
        except UnicodeEncodeError:
            return  # the client cannot send it (a lone surrogate or the like): nothing reached the server
        seen[response.status_code // 100] += 1
        assert response.status_code < 500, (method, url, query, response.status_code, response.text)
        if response.status_code >= 400:
            assert fingerprint(engine) == before, (method, url, query, response.status_code, response.text)

    seen: Counter = Counter()
    with TestClient(app) as client:
        request()
    # A fuzzer that only ever hits the key check tests nothing: some requests must get through.
    assert seen[2] >= 0.05 * sum(seen.values()) and seen[4], dict(seen)


def _commands() -> dict[str, object]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sorted(sub.choices.items()))


COMMON = {"--home", "--db", "--json", "-v", "--verbose", "-h", "--help"}


def _argv(data, name: str, parser, paths) -> list[str]:
    argv = [name]
    for action in parser._actions:
        if not action.option_strings and action.dest != "help":  # a positional argument
            count = 2 if action.nargs in ("+", "*") else 1
            argv += [_value(data, action, paths) for _ in range(count)]
    options = [a for a in parser._actions if a.option_strings and not set(a.option_strings) & COMMON]
    for action in data.draw(st.lists(st.sampled_from(options), max_size=3, unique_by=id) if options else st.just([])):
        argv.append(action.option_strings[0])
        if action.nargs != 0:
            argv.append(_value(data, action, paths))
    if name in LONG_RUNNING:
        argv.append("--no-such-flag")  # parsing is fuzzed; the long work itself is tested elsewhere
    return argv


def _value(data, action, paths) -> str:
    options = [texts, ints.map(str), st.sampled_from(paths)]
    if action.choices:
        options.append(st.sampled_from(sorted(action.choices)))
    return data.draw(st.one_of(*options), label=action.dest)


def test_every_command_answers_hostile_arguments_with_one_line_and_a_known_exit_code(fuzz_home, tmp_path_factory):
    home, db = fuzz_home["home"], fuzz_home["db"]
    scratch = tmp_path_factory.mktemp("cli-fuzz")
    folder = scratch / "a-folder"
    folder.mkdir()
    manifest = scratch / "manifest.csv"
    manifest.write_text("path,speaker\n" + "".join(f"{p},{p.parent.name}\n" for p in fuzz_home["clips"]))
    bad_csv = scratch / "bad.csv"
    bad_csv.write_bytes(b"\xef\xbb\xbfspeaker,path\n\"x\ny\",\x00\n")
    fifo = scratch / "a-fifo"
    os.mkfifo(fifo)  # opening it would wait for a writer for ever
    paths = [str(p) for p in (*fuzz_home["clips"][:2], folder, fifo, manifest, bad_csv, scratch / "missing.wav")]
    paths += ["/dev/null", "/dev/zero", "nul\x00byte.wav"]
    commands = _commands()
    assert {"enroll", "identify", "rollback", "keys", "eval"} <= set(commands)
    engine = create_engine(db)

    @settings(max_examples=EXAMPLES or 150, **FUZZ)
    @given(data=st.data())
    def run(data):
        name = data.draw(st.sampled_from(sorted(commands)), label="command")
        argv = _argv(data, name, commands[name], paths) + ["--home", str(home), "--db", db]
        before = fingerprint(engine)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse refusing the arguments
                code = exc.code
        seen[code] += 1
        assert code in (0, 1, 2), (argv, code, err.getvalue())
        assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
        if code == 2:
            assert fingerprint(engine) == before, (argv, err.getvalue())
            assert err.getvalue().strip(), (argv, "an error must say what went wrong")

    seen: Counter = Counter()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO("")  # `stream -` and prompts read an empty, closed stdin
    try:
        run()
    finally:
        sys.stdin = old_stdin
    assert seen[0] and seen[2], dict(seen)  # some commands ran, some were refused
