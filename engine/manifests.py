"""The one reader of manifests: labelled CSV files, trial lists and enrollment streams.

Three shapes of input name audio files and who speaks in them:

- a *labelled manifest* (``read_manifest``, ``by_speaker``): a CSV file with a header
  holding at least ``path`` and ``speaker`` (a data set's ``manifest.csv``; other columns
  are ignored), paths relative to the manifest's folder;
- a *trial list* (``read_trials``): lines ``enroll-speaker probe-path target|nontarget``;
- an *enrollment stream* (``stream_rows``): CSV with a header, or JSON lines, read row by
  row as they arrive (``voiceprint stream``), where one bad row must not stop the rest.
- a *list of probes* (``path_lines``): one audio path a line (``voiceprint identify
  --list``), read as the lines arrive.

Pure: the standard library and :mod:`voiceprint.engine.errors` only, so the CLI, the evaluation, the
benchmarks and the tests all read the same files the same way.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from voiceprint.engine.errors import InvalidInput

BOM = "\ufeff"
REPLACED = "\ufffd"  # what a stream opened with errors="replace" reads for bytes that are not UTF-8


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    speaker: str


@dataclass(frozen=True)
class Trial:
    speaker: str
    probe: Path
    target: bool


def open_list(path: Path, what: str, **options) -> TextIO:
    """Open a manifest, trial list or stream file as UTF-8 text, provided it is a regular
    file: a named pipe would wait for a writer for ever, and a device (/dev/zero) is one
    endless line. ``options`` go to :func:`open` (``errors``, ``newline``)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InvalidInput(f"{what} {path}: not a regular file")
        return open(path, encoding=options.pop("encoding", "utf-8-sig"), **options)
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the path
        raise InvalidInput(f"cannot read {what} {path!r}: {exc}") from None


def read_manifest(path: Path) -> list[LabelledFile]:
    """CSV with a header holding at least ``path`` and ``speaker``; paths relative to the file."""
    path = Path(path)
    try:
        # utf-8-sig: the byte-order mark a spreadsheet's export starts with is not a column name.
        with open_list(path, "manifest", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "speaker"} - set(reader.fieldnames or [])
            if missing:
                raise InvalidInput(f"{path}: the header needs columns path and speaker (missing {sorted(missing)})")
            rows = []
            for row in reader:
                if not (row.get("path") or "").strip() or not (row.get("speaker") or "").strip():
                    raise InvalidInput(f"{path}:{reader.line_num}: empty path or speaker")
                rows.append(LabelledFile(path.parent / row["path"].strip(), row["speaker"].strip()))
    except OSError as exc:
        raise InvalidInput(f"cannot read manifest {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"{path}: not a UTF-8 CSV file ({exc})") from None
    if not rows:
        raise InvalidInput(f"{path}: no rows")
    return rows


def read_trials(path: Path) -> list[Trial]:
    """Lines ``enroll-speaker probe-path target|nontarget``; probe paths relative to the file."""
    path = Path(path)
    trials = []
    try:
        with open_list(path, "trials") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read trials {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[2] not in ("target", "nontarget"):
            raise InvalidInput(f"{path}:{number}: expected 'enroll-speaker probe-path target|nontarget'")
        trials.append(Trial(fields[0], path.parent / fields[1], fields[2] == "target"))
    if not trials:
        raise InvalidInput(f"{path}: no trials")
    return trials


def by_speaker(path: Path) -> dict[str, list[Path]]:
    """A labelled manifest's files grouped by speaker, speakers and files in manifest order.

    Parameters
    ----------
    path
        The manifest (see :func:`read_manifest`, whose errors it raises).

    Returns
    -------
    dict
        speaker -> the paths of their files, resolved against the manifest's folder.
    """
    out: dict[str, list[Path]] = {}
    for item in read_manifest(path):
        out.setdefault(item.speaker, []).append(item.path)
    return out


def stream_rows(stream: TextIO, base: Path) -> Iterator[tuple[int, tuple[str | None, Path, None] | InvalidInput, str]]:
    """Parse rows as they arrive: ``(row number, (speaker, path, None) or an error, source)``.

    The first non-empty line decides the format: ``{`` starts JSON lines with keys
    ``speaker`` and ``path``; anything else is a CSV header naming a ``path`` column and
    usually a ``speaker`` column (others ignored, e.g. a dataset manifest), the rows
    parsed as CSV (a quoted field may hold commas and newlines). A leading UTF-8
    byte-order mark is ignored. Relative paths are resolved against the stream file's
    folder (the working folder for stdin).

    A row without a speaker (no ``speaker`` key or JSON null; an empty cell or no such
    column) has speaker None: its utterance is stored unlabeled
    (:mod:`voiceprint.engine.discovery`).

    A malformed row is yielded as an :class:`~voiceprint.engine.errors.InvalidInput` in place of its
    values, so the caller can report it and go on (a row holding U+FFFD, which a stream
    opened with ``errors="replace"`` reads for bytes that are not UTF-8, is one); a header
    without the two columns raises.

    Examples
    --------
    >>> import io
    >>> rows = stream_rows(io.StringIO("speaker,path\\nann,a.flac\\nbob\\n"), Path("/data"))
    >>> number, (speaker, path, _), source = next(rows)
    >>> number, speaker, path.as_posix(), source
    (1, 'ann', '/data/a.flac', 'a.flac')
    >>> number, error, source = next(rows)
    >>> number, error.code, source
    (2, 'invalid_input', 'bob')
    >>> next(stream_rows(io.StringIO('{"path": "c.flac"}'), Path("/data")))[1][0] is None
    True
    """
    # readline() rather than iterating the file: iteration reads ahead in blocks and
    # would hold back rows that have already arrived on a pipe.
    lines = iter(stream.readline, "")
    # A spreadsheet's UTF-8 export starts with a byte-order mark; it is not part of the header.
    lines = itertools.chain([next(lines, "").removeprefix(BOM)], lines)
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        return
    lines = itertools.chain([first], lines)
    rows = _json_rows(lines) if first.lstrip().startswith("{") else _csv_rows(lines)
    for number, (fields, text) in enumerate(rows, start=1):
        problem = fields if isinstance(fields, str) else _problem(fields)
        if problem:
            yield number, InvalidInput(f"malformed row: {problem}"), text.strip()[:80]
            continue
        path = Path(fields["path"])
        speaker = fields.get("speaker")
        speaker = None if speaker is None or speaker == "" else str(speaker)
        yield number, (speaker, path if path.is_absolute() else base / path, None), fields["path"]


def path_lines(stream: TextIO, base: Path) -> Iterator[tuple[str, Path | InvalidInput]]:
    """A list of audio files, one path a line, read as the lines arrive (``voiceprint
    identify --list``): ``(the line as written, its path or an error)``.

    Blank lines are skipped; a relative path is resolved against ``base`` (the list's
    folder, the working folder for stdin). A line holding U+FFFD (bytes that were not
    UTF-8, read by a stream opened with ``errors="replace"``) names no file anyone can
    open: it is yielded as an :class:`~voiceprint.engine.errors.InvalidInput` in its place.

    >>> import io
    >>> [(text, str(p)) for text, p in path_lines(io.StringIO("a.flac\\n\\n /x/b.wav \\n"), Path("/data"))]
    [('a.flac', '/data/a.flac'), ('/x/b.wav', '/x/b.wav')]
    """
    lines = iter(stream.readline, "")  # not iteration: that reads ahead and holds back lines on a pipe
    for number, line in enumerate(lines, start=1):
        text = line.removeprefix(BOM) if number == 1 else line
        text = text.strip()
        if not text:
            continue
        if REPLACED in text:
            yield text[:80], InvalidInput(f"line {number}: not valid UTF-8")
            continue
        path = Path(text)
        yield text, path if path.is_absolute() else base / path


Row = tuple[dict | str, str]  # the row's fields (or why it has none), and its text


def _problem(fields: dict) -> str | None:
    """Why a row's fields name no path (and a speaker or none), or None."""
    if "path" not in fields:
        return "no 'path'"
    speaker, path = fields.get("speaker"), fields["path"]
    # A JSON list would become the speaker "[...]": not a name anyone meant (null: no speaker).
    if not isinstance(path, str) or isinstance(speaker, bool) or not isinstance(speaker, (str, int, float, type(None))):
        return "speaker must be a string, a number or null, path a string"
    if REPLACED in f"{speaker}{path}":
        return "not valid UTF-8"  # the bytes are gone: neither the name nor the file is known
    return None


def _json_rows(lines: Iterator[str]) -> Iterator[Row]:
    """One JSON object a line; blank lines are not rows."""
    for line in lines:
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except ValueError as exc:
            yield str(exc), line
            continue
        yield (fields, line) if isinstance(fields, dict) else ("not a JSON object", line)


def _csv_rows(lines: Iterator[str]) -> Iterator[Row]:
    """A header, then rows parsed as CSV proper: a quoted field may hold commas and newlines
    (the reader pulls the next line only when a row needs it). Blank rows are not rows."""
    reader = csv.reader(lines)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except csv.Error as exc:
        raise InvalidInput(f"stream header is not CSV: {exc}") from None
    if "path" not in header:
        raise InvalidInput(f"stream header {header} must name a 'path' column (and 'speaker', unless no row has one)")
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader starts afresh on the next line
            yield str(exc), f"line {reader.line_num}"
            continue
        if not any(value.strip() for value in values):
            continue
        text = ",".join(values)
        if len(values) != len(header):
            yield f"{len(values)} fields, header has {len(header)}", text
        else:
            yield dict(zip(header, values)), text
