"""The one reader of manifests: labelled CSV files, trial lists and enrollment streams.

Three shapes of input name audio files and who speaks in them:

- a *labelled manifest* (``read_manifest``, ``by_speaker``): a CSV file with a header
  holding at least ``path`` and ``speaker`` (a data set's ``manifest.csv``; other columns
  are ignored), paths relative to the manifest's folder;
- a *trial list* (``read_trials``): lines ``enroll-speaker probe-path target|nontarget``;
- an *enrollment stream* (``stream_rows``): CSV with a header, or JSON lines, read row by
  row as they arrive (``voiceprint stream``), where one bad row must not stop the rest.

Pure: the standard library and :mod:`engine.errors` only, so the CLI, the evaluation, the
benchmarks and the tests all read the same files the same way.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from engine.errors import InvalidInput


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    speaker: str


@dataclass(frozen=True)
class Trial:
    speaker: str
    probe: Path
    target: bool


def read_manifest(path: Path) -> list[LabelledFile]:
    """CSV with a header holding at least ``path`` and ``speaker``; paths relative to the file."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "speaker"} - set(reader.fieldnames or [])
            if missing:
                raise InvalidInput(f"{path}: the header needs columns path and speaker (missing {sorted(missing)})")
            rows = []
            for line, row in enumerate(reader, start=2):
                if not (row.get("path") or "").strip() or not (row.get("speaker") or "").strip():
                    raise InvalidInput(f"{path}:{line}: empty path or speaker")
                rows.append(LabelledFile(path.parent / row["path"].strip(), row["speaker"].strip()))
    except OSError as exc:
        raise InvalidInput(f"cannot read manifest {path}: {exc.strerror}") from None
    if not rows:
        raise InvalidInput(f"{path}: no rows")
    return rows


def read_trials(path: Path) -> list[Trial]:
    """Lines ``enroll-speaker probe-path target|nontarget``; probe paths relative to the file."""
    path = Path(path)
    trials = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read trials {path}: {exc.strerror}") from None
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


def stream_rows(stream: TextIO, base: Path) -> Iterator[tuple[int, tuple[str, Path, None] | InvalidInput, str]]:
    """Parse rows as they arrive: ``(row number, (speaker, path, None) or an error, source)``.

    The first non-empty line decides the format: ``{`` starts JSON lines with keys
    ``speaker`` and ``path``; anything else is a CSV header naming ``speaker`` and
    ``path`` columns (others ignored, e.g. a dataset manifest). Relative paths are
    resolved against the stream file's folder (the working folder for stdin).

    A malformed row is yielded as an :class:`~engine.errors.InvalidInput` in place of its
    values, so the caller can report it and go on; a header without the two columns
    raises.

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
    """
    header: list[str] | None = None
    json_lines = False
    number = 0
    # readline() rather than iterating the file: iteration reads ahead in blocks and
    # would hold back rows that have already arrived on a pipe.
    for line in iter(stream.readline, ""):
        if not line.strip():
            continue
        if header is None and not json_lines:
            if line.lstrip().startswith("{"):
                json_lines = True
            else:
                header = [h.strip().lower() for h in next(csv.reader([line]))]
                if "speaker" not in header or "path" not in header:
                    raise InvalidInput(f"stream header {header} must name 'speaker' and 'path' columns")
                continue
        number += 1
        try:
            if json_lines:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            else:
                values = next(csv.reader([line]))
                if len(values) != len(header):
                    raise ValueError(f"{len(values)} fields, header has {len(header)}")
                record = dict(zip(header, values))
            speaker, raw_path = str(record["speaker"]), str(record["path"])
        except (ValueError, KeyError) as exc:
            yield number, InvalidInput(f"malformed row: {exc}"), line.strip()[:80]
            continue
        path = Path(raw_path)
        yield number, (speaker, path if path.is_absolute() else base / path, None), raw_path
