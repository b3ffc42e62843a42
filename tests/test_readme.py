"""The README's code blocks are run or checked here, so they cannot drift from the code:
the configuration example is the defaults, key for key, the Python example runs, and
the quick start's session transcript is what the commands print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from engine.config import Config

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
    env = {**os.environ, "VOICEPRINT_DEV_DATA": str(dev_data), "PYTHONPATH": str(README.parent)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    decision, accepted, backend = done.stdout.split()[-3:]
    assert decision == "p228" and accepted == "True" and backend == "cosine", done.stdout
    assert (tmp_path / "vp-home" / "voiceprint.db").is_file()


def test_the_session_transcript_is_what_the_commands_print(tmp_path, dev_data, capsys, monkeypatch):
    """The quick start's transcript in the README, run again: every line shown is printed."""
    import io

    import cli

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
