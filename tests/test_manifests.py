"""engine.manifests: enrollment streams, labelled manifests and trial lists."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import threading
from pathlib import Path

import pytest

from voiceprint.engine.errors import InvalidInput
from voiceprint.engine.manifests import LabelledFile, Trial, by_speaker, read_manifest, read_trials, stream_rows

BASE = Path("/streams")


def parse(text: str, base: Path = BASE) -> list:
    return list(stream_rows(io.StringIO(text), base))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- stream rows -------------------------------------------------------------------------


def test_csv_stream_rows_resolve_relative_paths_and_ignore_other_columns():
    rows = parse("utterance_id,Speaker , PATH,duration_s\nu1,ann,a/1.flac,1.5\nu2,bob,/abs/2.flac,2.0\n")
    assert rows == [
        (1, ("ann", BASE / "a/1.flac", None), "a/1.flac"),
        (2, ("bob", Path("/abs/2.flac"), None), "/abs/2.flac"),
    ]


def test_csv_stream_a_malformed_row_is_reported_in_place_and_the_rest_still_come():
    rows = parse('speaker,path\n\nann,1.flac\nbob\n"carl, jr",3.flac\n\n')
    assert [number for number, _, _ in rows] == [1, 2, 3]  # blank lines are not rows
    assert rows[0][1] == ("ann", BASE / "1.flac", None)
    number, error, source = rows[1]
    assert isinstance(error, InvalidInput)
    assert "malformed row" in str(error) and "1 fields, header has 2" in str(error)
    assert source == "bob"
    assert rows[2][1] == ("carl, jr", BASE / "3.flac", None)  # CSV quoting holds a comma


def test_csv_stream_header_without_path_is_an_error():
    with pytest.raises(InvalidInput, match="must name a 'path' column"):
        parse("who,file\nann,1.flac\n")


def test_rows_without_a_speaker_are_unlabeled():
    """An empty cell, no speaker column, no key or JSON null: speaker None (stored unlabeled)."""
    assert parse("speaker,path\n,1.flac\nann,2.flac\n") == [
        (1, (None, BASE / "1.flac", None), "1.flac"), (2, ("ann", BASE / "2.flac", None), "2.flac")]
    assert parse("path\n1.flac\n") == [(1, (None, BASE / "1.flac", None), "1.flac")]
    assert [row[1] for row in parse('{"path": "1.flac"}\n{"speaker": null, "path": "2.flac"}\n')] == [
        (None, BASE / "1.flac", None), (None, BASE / "2.flac", None)]


def test_json_lines_stream_rows_and_their_malformed_rows():
    text = (
        '{"speaker": "ann", "path": "1.flac", "extra": 1}\n'
        '[1, 2]\n'
        '{"speaker": "bob"}\n'
        "{not json\n"
        '{"speaker": 7, "path": "/x/2.flac"}\n'
    )
    rows = parse(text, Path("/data"))
    assert [number for number, _, _ in rows] == [1, 2, 3, 4, 5]
    assert rows[0][1:] == (("ann", Path("/data/1.flac"), None), "1.flac")
    for number in (2, 3, 4):
        assert isinstance(rows[number - 1][1], InvalidInput), number
    assert "not a JSON object" in str(rows[1][1])
    assert "'path'" in str(rows[2][1])  # the missing key is named
    assert rows[3][2] == "{not json"
    assert rows[4][1] == ("7", Path("/x/2.flac"), None)  # a speaker is a name, whatever its JSON type


def test_an_empty_stream_has_no_rows():
    assert parse("") == []
    assert parse("\n  \n") == []


def test_a_long_malformed_row_is_quoted_in_short():
    (_, error, source), = parse("speaker,path\n" + "x" * 200 + "\n")
    assert isinstance(error, InvalidInput) and source == "x" * 80


def test_rows_already_on_a_pipe_are_not_held_back():
    """The first row comes out while the writer still holds the pipe open."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r") as reader, os.fdopen(write_fd, "w") as writer:
        writer.write("speaker,path\nann,1.flac\n")
        writer.flush()
        rows = stream_rows(reader, BASE)
        got: list = []
        thread = threading.Thread(target=lambda: got.append(next(rows)), daemon=True)
        thread.start()
        thread.join(timeout=10)
        held_back = thread.is_alive()
        writer.write("bob,2.flac\n")
        writer.close()  # unblocks a reader that waited for more
        thread.join(timeout=10)
        assert not held_back, "the first row waited for more input"
        assert got == [(1, ("ann", BASE / "1.flac", None), "1.flac")]
        assert [row[1][0] for row in rows] == ["bob"]


def test_stream_rows_needs_only_readline():
    """Rows are pulled one readline() at a time, never by reading ahead through iteration."""

    class LinesOnly:
        def __init__(self, lines: list[str]) -> None:
            self.lines = lines

        def readline(self) -> str:
            return self.lines.pop(0) if self.lines else ""

    rows = stream_rows(LinesOnly(["speaker,path\n", "ann,1.flac\n", "bob,2.flac\n"]), BASE)  # type: ignore[arg-type]
    assert [row[1][0] for row in rows] == ["ann", "bob"]


def test_a_quoted_newline_stays_inside_its_field():
    """Split line by line, the second half of the field became a row of its own: a bogus speaker."""
    rows = parse('speaker,path\nann,"odd\nname.flac"\n"bob\nsmith",2.flac\ncarl,3.flac\n')
    assert [row[:2] for row in rows] == [
        (1, ("ann", BASE / "odd\nname.flac", None)),
        (2, ("bob\nsmith", BASE / "2.flac", None)),  # the name policy refuses it later, as its own row
        (3, ("carl", BASE / "3.flac", None)),
    ]


def test_a_quoted_field_with_commas_and_quotes():
    rows = parse('speaker,path\n"Smith, Ann","a, ""b"".flac"\n')
    assert rows == [(1, ("Smith, Ann", BASE / 'a, "b".flac', None), 'a, "b".flac')]


def test_a_byte_order_mark_before_the_header_is_ignored():
    rows = parse("\ufeffspeaker,path\nann,1.flac\n")
    assert rows == [(1, ("ann", BASE / "1.flac", None), "1.flac")]


def test_a_byte_order_mark_before_json_lines_is_ignored():
    rows = parse('\ufeff{"speaker": "ann", "path": "1.flac"}\n{"speaker": "bob", "path": "2.flac"}\n')
    assert [row[1] for row in rows] == [("ann", BASE / "1.flac", None), ("bob", BASE / "2.flac", None)]


def test_a_file_with_a_byte_order_mark_streams(tmp_path):
    """What a spreadsheet's "CSV UTF-8" export writes, read the way `voiceprint stream` opens it."""
    path = tmp_path / "rows.csv"
    path.write_bytes("speaker,path\r\nann,1.flac\r\n".encode("utf-8-sig"))
    with open(path, encoding="utf-8", newline="") as fh:
        assert [row[1] for row in stream_rows(fh, tmp_path)] == [("ann", tmp_path / "1.flac", None)]


def test_a_json_list_is_not_a_speaker_nor_a_number_a_path():
    rows = parse('{"speaker": ["a"], "path": "2.flac"}\n{"speaker": "c", "path": 3}\n{"speaker": true, "path": "4.flac"}\n')
    assert len(rows) == 3 and all(isinstance(error, InvalidInput) for _, error, _ in rows)


def test_undecodable_bytes_make_their_row_malformed_not_the_stream():
    data = b"speaker,path\nj\xf6rg,1.flac\nann,2\xff.flac\nbob,3.flac\n"
    rows = list(stream_rows(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline=""), BASE))
    assert [number for number, _, _ in rows] == [1, 2, 3]
    assert all(isinstance(rows[i][1], InvalidInput) and "UTF-8" in str(rows[i][1]) for i in (0, 1))
    assert rows[2][1] == ("bob", BASE / "3.flac", None)


def test_a_csv_error_is_its_rows_alone():
    limit = csv.field_size_limit(50)
    try:
        rows = parse("speaker,path\nann," + "x" * 60 + "\nbob,2.flac\n")
    finally:
        csv.field_size_limit(limit)
    assert isinstance(rows[0][1], InvalidInput) and "field larger than field limit" in str(rows[0][1])
    assert rows[1][:2] == (2, ("bob", BASE / "2.flac", None))


def test_quoted_rows_arriving_slowly_on_a_pipe_come_before_eof():
    """Parsed as CSV yet still row by row: each row is yielded once its last line arrived."""
    read_fd, write_fd = os.pipe()
    seen: list = []
    arrived = [threading.Event() for _ in range(3)]
    held_back: list[int] = []

    def write_slowly() -> None:
        with os.fdopen(write_fd, "w") as writer:
            for i, chunk in enumerate(['speaker,path\nann,"a\n', 'b.flac"\n', 'bob,"2, x.flac"\n', "carl,3.flac\n"]):
                writer.write(chunk)
                writer.flush()
                if i >= 1 and not arrived[i - 1].wait(timeout=10):  # the row is complete: it must come out
                    held_back.append(i)

    writer = threading.Thread(target=write_slowly, daemon=True)
    writer.start()
    with os.fdopen(read_fd, "r", newline="") as reader:
        for number, item, _ in stream_rows(reader, BASE):
            seen.append((number, item))
            arrived[number - 1].set()
    writer.join(timeout=10)
    assert not held_back and not writer.is_alive(), f"rows {held_back} were held back until more input came"
    assert seen == [(1, ("ann", BASE / "a\nb.flac", None)), (2, ("bob", BASE / "2, x.flac", None)), (3, ("carl", BASE / "3.flac", None))]


# --- labelled manifests ------------------------------------------------------------------


def test_read_manifest_resolves_paths_against_its_folder(tmp_path):
    manifest = write(tmp_path / "set" / "manifest.csv", "path,speaker,duration_s\n a/1.flac , ann ,1.0\n/abs/2.flac,bob,2\n")
    assert read_manifest(manifest) == [
        LabelledFile(tmp_path / "set" / "a/1.flac", "ann"),
        LabelledFile(Path("/abs/2.flac"), "bob"),
    ]
    assert read_manifest(str(manifest)) == read_manifest(manifest)  # a str path is fine too


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,speaker\n1.flac,ann\n", r"the header needs columns path and speaker \(missing \['path'\]\)"),
        ("", r"missing \['path', 'speaker'\]"),
        ("path,speaker\n", "no rows"),
        ("path,speaker\n1.flac,ann\n2.flac,\n", r"manifest.csv:3: empty path or speaker"),
        ("path,speaker\n1.flac,ann\n   ,bob\n", r"manifest.csv:3: empty path or speaker"),
    ],
)
def test_read_manifest_errors(tmp_path, text, message):
    with pytest.raises(InvalidInput, match=message):
        read_manifest(write(tmp_path / "manifest.csv", text))


def test_read_manifest_of_a_missing_file(tmp_path):
    with pytest.raises(InvalidInput, match=r"cannot read manifest .*nowhere.csv: No such file or directory"):
        read_manifest(tmp_path / "nowhere.csv")


def test_read_manifest_with_a_byte_order_mark_and_a_quoted_newline(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes('path,speaker\r\n"odd\nname.flac",ann\r\n2.flac,bob\r\n'.encode("utf-8-sig"))
    assert read_manifest(manifest) == [LabelledFile(tmp_path / "odd\nname.flac", "ann"), LabelledFile(tmp_path / "2.flac", "bob")]


def test_read_manifest_names_the_line_of_an_empty_field_after_a_quoted_newline(tmp_path):
    manifest = write(tmp_path / "manifest.csv", 'path,speaker\n"a\nb.flac",ann\nc.flac,\n')
    with pytest.raises(InvalidInput, match=r"manifest.csv:4: empty path or speaker"):
        read_manifest(manifest)


def test_read_manifest_that_is_not_utf8(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"path,speaker\n1.flac,j\xf6rg\n")
    with pytest.raises(InvalidInput, match="not a UTF-8 CSV file"):
        read_manifest(manifest)


def test_by_speaker_keeps_manifest_order(tmp_path):
    manifest = write(
        tmp_path / "manifest.csv",
        "path,speaker\nb1.flac,bob\na1.flac,ann\nb2.flac,bob\nc1.flac,carl\na2.flac,ann\n",
    )
    groups = by_speaker(manifest)
    assert list(groups) == ["bob", "ann", "carl"]  # speakers in order of first appearance
    assert groups == {
        "bob": [tmp_path / "b1.flac", tmp_path / "b2.flac"],
        "ann": [tmp_path / "a1.flac", tmp_path / "a2.flac"],
        "carl": [tmp_path / "c1.flac"],
    }


def test_by_speaker_raises_what_read_manifest_raises(tmp_path):
    with pytest.raises(InvalidInput, match="no rows"):
        by_speaker(write(tmp_path / "manifest.csv", "path,speaker\n"))


# --- trial lists -------------------------------------------------------------------------


def test_read_trials(tmp_path):
    trials = write(
        tmp_path / "lists" / "trials.txt",
        "# enroll probe label\n\nann  probes/1.flac target\nbob /abs/2.flac   nontarget\n",
    )
    assert read_trials(trials) == [
        Trial("ann", tmp_path / "lists" / "probes/1.flac", True),
        Trial("bob", Path("/abs/2.flac"), False),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ann 1.flac target\nbob 2.flac maybe\n", r"trials.txt:2: expected 'enroll-speaker probe-path target\|nontarget'"),
        ("ann 1.flac\n", r"trials.txt:1: expected"),
        ("ann 1.flac target extra\n", r"trials.txt:1: expected"),
        ("# only a comment\n\n", "no trials"),
    ],
)
def test_read_trials_errors(tmp_path, text, message):
    with pytest.raises(InvalidInput, match=message):
        read_trials(write(tmp_path / "trials.txt", text))


def test_read_trials_with_a_byte_order_mark(tmp_path):
    trials = tmp_path / "trials.txt"
    trials.write_bytes("ann 1.flac target\n".encode("utf-8-sig"))
    assert read_trials(trials) == [Trial("ann", tmp_path / "1.flac", True)]


def test_read_trials_of_a_missing_file(tmp_path):
    with pytest.raises(InvalidInput, match="cannot read trials"):
        read_trials(tmp_path / "nowhere.txt")


def test_records_are_frozen():
    item = LabelledFile(Path("a.flac"), "ann")
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.speaker = "bob"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Trial("ann", Path("a.flac"), True).target = False  # type: ignore[misc]


@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero"])
@pytest.mark.parametrize("reader", [read_manifest, read_trials])
def test_lists_are_read_only_from_regular_files(tmp_path, kind, reader):
    """A named pipe would wait for a writer for ever and /dev/zero is one endless line
    (it filled 24 GB of memory before this check): both are refused before reading."""
    path = {"fifo": tmp_path / "fifo", "directory": tmp_path, "/dev/zero": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    outcome: list = []

    def read() -> None:
        try:
            reader(path)
        except InvalidInput as exc:
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), f"reading {kind} hangs"
    assert len(outcome) == 1 and "not a regular file" in str(outcome[0])
