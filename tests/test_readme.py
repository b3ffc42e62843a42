"""The README's code blocks are run or checked here, so they cannot drift from the code:
the configuration example is the defaults, key for key; the Python example runs; the
quick start's session transcript and the diarization example are what the commands
print; the walk-through runs in order on real speech; the curl calls of "The HTTP
service" get their answers from a real server; every other command line shown parses,
and every benchmark flag shown exists."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import soundfile

from voiceprint.engine.config import Config

README = Path(__file__).resolve().parent.parent / "README.md"


def block(section: str, language: str) -> str:
    """The first ``language`` code block after the heading ``## section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    found = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert found, f"no {language} block in README section {section!r}"
    return found.group(1)


def test_the_configuration_example_is_every_key_with_its_default():
    documented = tomllib.loads(block("Configuration", "toml"))
    defaults = Config().to_dict()
    assert sorted(documented) == sorted(defaults), "sections"
    for section, keys in defaults.items():
        missing = sorted(set(keys) - set(documented[section]))
        unknown = sorted(set(documented[section]) - set(keys))
        assert not missing and not unknown, (section, "missing", missing, "unknown", unknown)
        for name, value in keys.items():
            assert documented[section][name] == value, f"[{section}] {name}: README {documented[section][name]!r}, default {value!r}"


def test_the_python_example_runs_as_written(tmp_path, dev_data):
    """In a fresh folder, as a newcomer would paste it (the data from VOICEPRINT_DEV_DATA)."""
    code = block("Python", "python")
    env = {**os.environ, "VOICEPRINT_DEV_DATA": str(dev_data)}  # `voiceprint` comes from the install, as for a user
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    decision, accepted, backend = done.stdout.split()[-3:]
    assert decision == "p228" and accepted == "True" and backend == "cosine", done.stdout
    assert (tmp_path / "vp-home" / "voiceprint.db").is_file()


def test_the_session_transcript_is_what_the_commands_print(tmp_path, dev_data, capsys, monkeypatch):
    """The quick start's transcript in the README, run again: every line shown is printed."""
    import io

    from voiceprint import cli

    text = README.read_text()
    start = text.index("What a session looks like (from the quick start):")
    shown = re.compile(r"```\n(.*?)```", re.S).search(text, start).group(1)
    vctk = dev_data / "vctk-4"
    rows = "speaker,path\n" + "".join(
        f"{path.parent.name},{path}\n" for path in sorted(vctk.glob("*/*.flac")) if path.name != "p225_024.flac"
    )
    g = ["--home", str(tmp_path / "home")]
    assert cli.main([*g, "init"]) == 0
    capsys.readouterr()
    printed = {}
    for command in re.findall(r"^\$ voiceprint (.+)$", shown, re.M):
        argv = command.split()
        if argv[0] == "stream":
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(rows.encode())))
            argv = ["stream", "-"]
        argv = [str(vctk / "p225" / a) if a.endswith(".flac") else a for a in argv]
        assert cli.main([*g, *argv]) == 0, command
        printed[command] = capsys.readouterr().out.replace(str(vctk) + "/p225/", ".../")
    for command, output in zip(printed, re.split(r"^\$ voiceprint .+\n", shown, flags=re.M)[1:]):
        for line in output.splitlines():
            if line != "...":
                assert line in printed[command].splitlines(), (command, line, printed[command])


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)


def command_lines(text: str, program: str) -> list[list[str]]:
    """The argument lists of ``program`` in shell text: comments dropped, continuation
    lines joined, the part after a pipe's ``|`` taken."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while "|" in words:
            words = words[words.index("|") + 1 :]
        if words and words[0] == program:
            found.append(words[1:])
    return found


def test_every_voiceprint_command_shown_parses(capsys):
    from voiceprint import cli

    shown = [argv for text in bash_blocks() for argv in command_lines(text, "voiceprint")]
    assert len(shown) >= 40, len(shown)  # the walk-through alone has 28: the search works
    parser = cli.build_parser()
    for argv in shown:
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README: `voiceprint {' '.join(argv)}` does not parse: {capsys.readouterr().err}") from None


def test_every_benchmark_flag_shown_exists():
    repo = README.parent
    shown: dict[str, set[str]] = {}
    for text in bash_blocks():
        for argv in command_lines(text, ".venv/bin/python"):
            if argv and argv[0].startswith("bench/"):
                shown.setdefault(argv[0], set()).update(a.split("=")[0] for a in argv[1:] if a.startswith("--"))
    assert len(shown) >= 5, shown
    for script, flags in sorted(shown.items()):
        assert (repo / script).is_file(), f"README runs {script}, which does not exist"
        usage = subprocess.run([sys.executable, script, "--help"], cwd=repo, capture_output=True, text=True, timeout=300)
        assert usage.returncode == 0, usage.stderr[-2000:]
        missing = sorted(f for f in flags if not re.search(rf"{re.escape(f)}\b", usage.stdout))
        assert not missing, f"README gives {script} flags its --help does not know: {missing}"


SMALL_REFRESH = "[refresh]\nsteps = 30\nspeakers_per_batch = 4\n"
NEEDS_A_SERVER = {"serve", "listen"}


def test_the_walk_through_runs_in_order(tmp_path, dev_data, capsys, monkeypatch):
    """Every walk-through command, in its order, on vctk-4: the placeholders become real
    files (alice is p225; a p227 clip streamed as hers is what ``pending`` shows,
    ``accept 42`` takes and ``remove-utterance 42`` removes again), and each command must succeed, except the ones the walk-through
    itself says cannot here. ``serve`` blocks and ``listen`` needs it, so they are left to
    tests/test_service.py and tests/test_live.py."""
    from voiceprint import cli

    vctk = dev_data / "vctk-4"
    files = {s: sorted((vctk / s).glob("*.flac")) for s in ("p225", "p226", "p227", "p228")}
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rows = [("alice", files["p225"][2]), ("alice", files["p227"][0])]  # the second is held for review
    rows += [(s, f) for s in ("p226", "p227", "p228") for f in files[s][1:6]]
    (work / "enrollments.csv").write_text("speaker,path\n" + "".join(f"{s},{f}\n" for s, f in rows))
    (work / "more.txt").write_text(f"{files['p228'][-1]}\n")
    place = {
        "a1.wav": files["p225"][0], "a2.flac": files["p225"][1], "probe.wav": files["p225"][-1],
        "unknown.wav": files["p226"][-1], "a.wav": files["p227"][-1], "b.wav": files["p225"][-2],
        "manifest.csv": vctk / "manifest.csv", "meeting.wav": files["p228"][-2],
    }
    expected_rc = {"calibrate": 2}  # four speakers: not_enough_data, as the line's comment says
    g = ["--home", str(tmp_path / "home")]
    ran, ran_on = [], {}
    shown = command_lines(block("Walk-through", "bash"), "voiceprint")
    for argv in shown:
        if argv[0] in NEEDS_A_SERVER:
            continue
        if argv[0] == "accept":
            held = [u["id"] for u in json.loads(_run(cli, [*g, "--json", "pending"], capsys)[1])]
            assert held, "the p227 clip streamed as alice was not held for review"
            argv = [argv[0], str(held[0])]
        if argv[0] == "remove-utterance":
            argv = [argv[0], ran_on["accept"]]  # the utterance just accepted: it is wrong after all
        argv = [str(place.get(a, a)) for a in argv]
        rc, out = _run(cli, [*g, *argv], capsys)
        assert rc == expected_rc.get(argv[0], 0), (argv, rc, out)
        ran.append(argv[0])
        ran_on[argv[0]] = argv[-1]
        if argv[0] == "init":
            (tmp_path / "home" / "config.toml").write_text(SMALL_REFRESH)
    assert ran == [argv[0] for argv in shown if argv[0] not in NEEDS_A_SERVER] and len(ran) > 20, ran
    assert (work / "det.png").is_file()


def _run(cli, argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().out


def test_the_http_services_curl_calls_get_their_answers(tmp_path, dev_data, capsys):
    """The block of "The HTTP service" as a user would paste it: keys made by its
    `voiceprint keys create` lines, a real `voiceprint serve` on a free port, and curl."""
    from test_service import Server

    from voiceprint import cli

    text = block("The HTTP service", "bash")
    home, db = tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'voiceprint.db'}"
    g = ["--home", str(home)]
    assert cli.main([*g, "init"]) == 0
    capsys.readouterr()
    keys = {}
    for argv in command_lines(text, "voiceprint"):
        if argv[0] == "keys":
            rc, out = _run(cli, [*g, "--json", *argv], capsys)
            assert rc == 0, out
            keys[argv[argv.index("--role") + 1]] = json.loads(out)["key"]
    assert sorted(keys) == ["admin", "enroll", "query"]
    assert re.search(r"^KEY=vp_", text, re.M), "the block no longer sets KEY: update this test"

    work = tmp_path / "work"
    work.mkdir()
    p225 = sorted((dev_data / "vctk-4" / "p225").glob("*.flac"))
    (work / "a1.flac").write_bytes(p225[0].read_bytes())
    speech, rate = soundfile.read(p225[-1])
    soundfile.write(work / "probe.wav", speech, rate)  # a real WAV, as the name says

    server = Server(home, db, keys, tmp_path / "serve.log").start()
    try:
        port = server.url.rsplit(":", 1)[1]
        calls = [line for line in text.replace("\\\n", " ").splitlines() if line.startswith("curl ")]
        assert len(calls) == 2, calls
        answers = []
        for call in calls:
            call = call.replace("localhost:8080", f"localhost:{port}").split("#")[0]
            done = subprocess.run(["bash", "-c", f"curl -sS --fail-with-body {call[5:]}"], cwd=work,
                                  env={**os.environ, "KEY": keys["admin"]}, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (call, done.stdout, done.stderr)
            answers.append(json.loads(done.stdout))
    finally:
        server.stop()
    enrolled, identified = answers
    assert enrolled["feedback"] == "OK" and enrolled["speaker"] == "alice", enrolled
    assert identified["candidates"][0]["speaker"] == "alice" and "decision" in identified, identified


def test_the_diarization_example_is_what_diarize_prints(tmp_path, dev_data, capsys, monkeypatch):
    """The example of "Diarization: who spoke when", run again from the simulation it names."""
    import numpy as np

    from voiceprint import cli

    monkeypatch.setenv("VOICEPRINT_DEV_DATA", str(dev_data))
    monkeypatch.syspath_prepend(str(README.parent / "bench"))
    from conversations import _pools, simulate

    enroll, talk = _pools("vctk-4")
    conv = simulate({s: talk[s] for s in ("p225", "p226", "p227")}, turns=9, rng=np.random.default_rng(5))
    recording = tmp_path / "conv.wav"
    soundfile.write(recording, conv.samples, 16000)
    g = ["--home", str(tmp_path / "home")]
    assert cli.main([*g, "init"]) == 0
    assert cli.main([*g, "enroll", "p225", *map(str, enroll["p225"])]) == 0
    assert cli.main([*g, "enroll", "p226", *map(str, enroll["p226"])]) == 0
    capsys.readouterr()
    assert cli.main([*g, "diarize", str(recording)]) == 0
    out, err = capsys.readouterr()
    printed = out.splitlines() + err.splitlines()
    text = README.read_text()
    shown = re.compile(r"```\n(.*?)```", re.S).search(text, text.index("On a conversation of three vctk-4 speakers")).group(1)
    assert len(shown.splitlines()) >= 4
    for line in shown.splitlines():
        if line != "    ...":
            assert line in printed, (line, printed)


def test_the_clusters_example_is_what_the_commands_print(tmp_path, dev_data, capsys):
    """The transcript of "New speakers in the unlabeled stream", run again as its text
    describes it: five LibriSpeech speakers (sorted by name) enrolled with their first
    three files, then nine rows without a speaker."""
    from voiceprint import cli

    libri = dev_data / "librispeech-test-other"
    files: dict[str, list[str]] = {}
    for line in (libri / "manifest.csv").read_text().splitlines()[1:]:
        path, speaker = line.split(",")[:2]
        files.setdefault(speaker, []).append(str(libri / path))
    names = sorted(files)
    rows = [f"{s},{p}" for s in names[:5] for p in files[s][:3]]
    rows += [f",{p}" for p in files[names[5]][:5] + files[names[6]][:2] + files[names[0]][3:5]]
    (tmp_path / "calls.csv").write_text("speaker,path\n" + "\n".join(rows) + "\n")
    g = ["--home", str(tmp_path / "home")]
    assert cli.main([*g, "init"]) == 0
    assert cli.main([*g, "stream", str(tmp_path / "calls.csv")]) == 0
    capsys.readouterr()
    text = README.read_text()
    shown = re.compile(r"```\n(.*?)```", re.S).search(text, text.index("then nine rows without a")).group(1).splitlines()
    commands = [i for i, line in enumerate(shown) if line.startswith("$ voiceprint ")]
    assert len(commands) == 2, shown
    for begin, end in zip(commands, commands[1:] + [len(shown)]):
        assert cli.main([*g, *shlex.split(shown[begin].removeprefix("$ voiceprint "))]) == 0
        out, err = capsys.readouterr()
        assert shown[begin + 1 : end] == out.splitlines() + err.splitlines(), (shown[begin], out, err)
