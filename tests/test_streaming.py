"""The read / prepare / finish pipeline behind ``voiceprint stream``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from voiceprint.engine.streaming import pipelined


def record_batches(sizes: list[int]):
    def prepare(batch):
        sizes.append(len(batch))
        return [x * 2 for x in batch]

    return prepare


def test_order_is_kept_and_waiting_items_are_batched():
    sizes: list[int] = []
    out = list(pipelined(range(100), record_batches(sizes), lambda ys: ys, batch_size=8))
    assert out == [x * 2 for x in range(100)]
    assert max(sizes) == 8 and sum(sizes) == 100
    assert len(sizes) < 50  # items that were already there went in batches


def test_a_slow_source_is_not_held_back_to_fill_a_batch():
    answered = threading.Event()
    sizes: list[int] = []

    def source():
        yield 1
        # The second item comes only after the first one was finished: a stream that
        # waited for a full batch would deadlock here.
        assert answered.wait(timeout=10), "first item was not finished before the second arrived"
        yield 2

    results = []
    for value in pipelined(source(), record_batches(sizes), lambda ys: ys, batch_size=64):
        results.append(value)
        answered.set()
    assert results == [2, 4] and sizes == [1, 1]


def test_errors_surface_after_the_items_before_them():
    def source():
        yield from range(5)
        raise ValueError("bad header")

    seen = []
    with pytest.raises(ValueError, match="bad header"):
        for value in pipelined(source(), lambda b: list(b), lambda ys: ys, batch_size=2):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]


def test_an_error_in_prepare_is_raised_to_the_caller():
    def prepare(batch):
        raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        list(pipelined(range(3), prepare, lambda ys: ys, batch_size=2))


def test_closing_early_stops_the_stage_threads():
    before = {t.name for t in threading.enumerate()}
    results = pipelined(iter(range(10_000)), lambda b: list(b), lambda ys: ys, batch_size=4)
    assert next(results) == 0
    results.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = {t.name for t in threading.enumerate() if t.name.startswith("voiceprint-")} - before
        if not alive:
            break
        time.sleep(0.05)
    assert not alive


# -- an enrollment stream: one bad row is that row's alone ------------------------------


def finished_within(work, seconds: float):
    """``work()``'s value, failing (not hanging) if it has not returned in time."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    assert outcome, "raised instead of returning (see the thread's traceback above)"
    return outcome[0]


@pytest.fixture
def bad_paths(tmp_path, by_speaker) -> dict[str, str]:
    """Paths of every kind that names no audio file that may be read, in the folder
    ``tmp_path / "allowed"``; and real audio in ``tmp_path / "outside"``."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    os.mkfifo(allowed / "pipe.flac")
    (allowed / "folder.flac").mkdir()
    (outside / "real.flac").write_bytes(by_speaker("vctk-4")[sorted(by_speaker("vctk-4"))[0]][0].read_bytes())
    return {
        "nul byte": str(allowed / "a\0b.flac"),
        "directory": str(allowed / "folder.flac"),
        "missing": str(allowed / "nope.flac"),
        "fifo": str(allowed / "pipe.flac"),
        "name too long": str(allowed / ("x" * 5000 + ".flac")),
        "device": "/dev/zero",
        "outside the roots": str(outside / "real.flac"),
    }


@pytest.mark.data
def test_bad_rows_fail_alone_and_the_rows_batched_with_them_are_stored(tmp_path, dev_data, by_speaker, bad_paths):
    from voiceprint.engine import Engine
    from voiceprint.engine.config import AudioConfig, Config
    from voiceprint.engine.errors import MissingAudio, PathNotAllowed
    from voiceprint.engine.manifests import stream_rows

    voices = by_speaker("librispeech-test-other")
    ann, bob = sorted(voices)[:2]
    rows = [{"speaker": ann, "path": str(voices[ann][0])}]
    rows += [{"speaker": bob, "path": path} for path in bad_paths.values()]
    rows += [{"speaker": "a\tb", "path": str(voices[bob][1])}]  # refused by the name policy
    rows += [{"speaker": bob, "path": str(voices[bob][0])}, {"speaker": ann, "path": str(voices[ann][1])}]
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as writer:  # all rows wait on the pipe: they come in one batch
        writer.write("".join(json.dumps(row) + "\n" for row in rows))
    config = Config(audio=AudioConfig(roots=os.pathsep.join([str(dev_data), str(tmp_path / "allowed")])))
    with Engine.init(home=tmp_path / "home", config=config) as eng, os.fdopen(read_fd) as reader:
        items = (item for _, item, _ in stream_rows(reader, tmp_path))
        results = finished_within(lambda: list(eng.enroll_stream(items, batch_size=64)), 120)
        stored = sorted((u.speaker, u.source) for u in eng.store.profiles.utterances())
    assert len(results) == len(rows)
    errors = dict(zip(bad_paths, results[1 : 1 + len(bad_paths)]))
    outside = {"outside the roots", "device"}
    assert all(isinstance(e, PathNotAllowed if kind in outside else MissingAudio) for kind, e in errors.items()), errors
    assert "not a regular file" in str(errors["fifo"]) and "not a regular file" in str(errors["directory"])
    assert results[-3].code == "invalid_input"
    assert [r.speaker for r in (results[0], results[-2], results[-1])] == [ann, bob, ann]
    assert stored == sorted([(ann, str(voices[ann][0])), (bob, str(voices[bob][0])), (ann, str(voices[ann][1]))])


@pytest.mark.data
def test_enroll_of_a_fifo_or_directory_is_refused_without_hanging(tmp_path):
    from voiceprint.engine import Engine
    from voiceprint.engine.errors import MissingAudio

    os.mkfifo(tmp_path / "pipe.flac")
    with Engine.init(home=tmp_path / "home") as eng:
        for path in (tmp_path / "pipe.flac", tmp_path):

            def enroll(path=path):
                try:
                    eng.enroll("ann", path)
                except MissingAudio as exc:
                    return exc

            assert "not a regular file" in str(finished_within(enroll, 30))
        assert eng.store.profiles.utterances() == []


@pytest.mark.data
def test_voiceprint_stream_goes_on_past_every_kind_of_bad_row(tmp_path, by_speaker, bad_paths):
    """The CLI over stdin: a byte-order mark, a quoted newline, bytes that are not UTF-8,
    and every kind of bad path each cost only their own row."""
    voices = by_speaker("librispeech-test-other")
    ann, bob = sorted(voices)[:2]

    def row(speaker: str, path: str) -> bytes:
        return ('"' + speaker + '","' + path.replace('"', '""') + '"\n').encode()

    text = "\ufeffspeaker,path\n".encode()  # what a spreadsheet's "CSV UTF-8" export starts with
    text += row(ann, str(voices[ann][0])) + row("carl\nsmith", str(voices[bob][2]))
    text += b"j\xf6rg," + str(voices[bob][3]).encode() + b"\n"
    text += b"".join(row(bob, path) for kind, path in bad_paths.items() if kind != "outside the roots")
    text += row(bob, str(voices[bob][0])) + row(ann, str(voices[ann][1]))
    home = tmp_path / "home"
    env = {**os.environ, "VOICEPRINT_HOME": str(home)}
    env.pop("VOICEPRINT_DATABASE_URL", None)
    voiceprint = Path(sys.executable).with_name("voiceprint")
    subprocess.run([voiceprint, "init"], env=env, check=True, capture_output=True)
    done = subprocess.run([voiceprint, "--json", "stream", "-"], input=text, env=env, capture_output=True, timeout=300)
    acks = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1, done.stderr  # some rows failed, the others were stored
    assert [a["ok"] for a in acks] == [True, False, False] + [False] * (len(bad_paths) - 1) + [True, True]
    assert acks[1]["error"] == "invalid_input"  # "carl\nsmith": one row, refused by the name policy
    assert acks[2]["error"] == "invalid_input" and "UTF-8" in acks[2]["message"]
    assert [a["speaker"] for a in acks if a["ok"]] == [ann, bob, ann]
    assert [a["row"] for a in acks] == list(range(1, len(acks) + 1))
