"""voiceprint's command line: a thin layer over :class:`voiceprint.engine.Engine`.

Exit codes: 0 success (or "accept" for verify), 1 a negative outcome (verify rejected,
or some rows of an enroll/stream failed while the others were stored), 2 an error
(nothing was done). With ``--json`` every result is JSON on stdout; errors are still
one line on stderr, plus a JSON document on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, replace
from datetime import datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from voiceprint.engine.bounds import COUNT, OneLineParser, flag, identifier, interval
from voiceprint.engine.config import flag_for
from voiceprint.engine.errors import InvalidInput, VoiceprintError
from voiceprint.engine.manifests import path_lines

EXIT_OK, EXIT_NEGATIVE, EXIT_ERROR = 0, 1, 2
GLOBAL_DEFAULTS = {"home": None, "db": None, "json": False, "verbose": 0}
OWN_LOGGERS = ("voiceprint",)  # what -v shows at INFO (every module of the package); -vv shows every library's too


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, default in GLOBAL_DEFAULTS.items():
        if not hasattr(args, option):
            setattr(args, option, default)
    logging.basicConfig(level=logging.INFO if args.verbose > 1 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in OWN_LOGGERS if args.verbose else ():
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        return args.run(args)
    except VoiceprintError as exc:
        error(str(exc))
        if args.json:
            emit({"ok": False, "error": exc.code, "message": str(exc)})
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other command-line tools do.
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    # Global options may come before or after the subcommand, so they live in a parent
    # parser shared by the top level and every subcommand. Their defaults are suppressed
    # (the action objects are shared, so a default would let the subcommand overwrite a
    # value given before it) and filled in from GLOBAL_DEFAULTS after parsing.
    # One function on purpose: it is the table of every command, read top to bottom.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="home folder (default $VOICEPRINT_HOME, else ./voiceprint-home)")
    common.add_argument("--db", default=argparse.SUPPRESS, help="SQLAlchemy URL (default $VOICEPRINT_DATABASE_URL, else SQLite in the home)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON on stdout")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log what the engine does to stderr; -vv also what its libraries do (Alembic's migrations, ...)")

    parser = OneLineParser(prog="voiceprint", description="Incremental speaker recognition.", parents=[common])
    parser.add_argument("--version", action="version", version=f"voiceprint {package_version('voiceprint-engine')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(run=run)
        return p

    command("init", cmd_init, "create the home folder and database; the pretrained encoder becomes version 1")

    force = "skip the clipping, noise and consistency checks (you vouch for the audio)"
    p = command("enroll", cmd_enroll, "enroll audio files for one speaker")
    p.add_argument("speaker")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--force", action="store_true", help=force)

    p = command("stream", cmd_stream, "enroll rows (speaker,path) from a CSV/JSON-lines file or stdin as they arrive; "
                "a row without a speaker is stored unlabeled (see clusters)")
    p.add_argument("source", help="file, or - for stdin")
    p.add_argument("--force", action="store_true", help=force)

    command("calibrate", cmd_calibrate, "fit the active version's score normalisation, LLR calibration and thresholds on its enrollments")
    p = command("pending", cmd_pending, "list utterances held for review (they did not sound like their speaker)")
    p.add_argument("--speaker", help="only this speaker's")
    p = command("accept", cmd_utterance, "move a held utterance into its speaker's profile")
    p.add_argument("utterance", type=identifier, help="utterance id (see `voiceprint pending`)")
    p.set_defaults(method="accept_utterance", done="utterance {utterance} joined {speaker}'s profile")
    p = command("remove-utterance", cmd_utterance, "delete an utterance and take it out of its speaker's profile exactly")
    p.add_argument("utterance", type=identifier, help="utterance id")
    p.set_defaults(method="remove_utterance", done="utterance {utterance} of {speaker} removed (it was {was})")

    probes = "also the audio files this file names, one path a line ('-' for stdin), answered as the lines arrive"
    p = command("identify", cmd_identify, "rank enrolled speakers for each utterance (1:N); one answer per file as it is computed")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--list", dest="probe_list", metavar="FILE", help=probes)
    p.add_argument("--top", type=flag(COUNT), default=5, help="how many candidates to show (default 5)")

    p = command("verify", cmd_verify, "accept or reject a claimed identity (1:1) for each utterance")
    p.add_argument("speaker")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--list", dest="probe_list", metavar="FILE", help=probes)

    p = command("diarize", cmd_diarize, "who spoke when in a recording: segments named by enrolled speaker, or unknown-1, unknown-2, ...")
    p.add_argument("file", type=Path)
    p.add_argument("--speakers", type=flag(COUNT), help="the number of speakers, when it is known")
    p.add_argument("--rttm", type=Path, metavar="FILE", help="also write the segments as RTTM")

    command("clusters", cmd_clusters, "unlabeled utterances grouped into likely speakers; new ones proposed, with how sure")
    p = command("name-cluster", cmd_name_cluster, "enroll a cluster's utterances under a name (the normal enrollment checks apply)")
    p.add_argument("cluster", type=identifier, help="cluster number (see `voiceprint clusters`)")
    p.add_argument("speaker")
    p.add_argument("--force", action="store_true", help=force)
    p = command("delete-cluster", cmd_delete_cluster, "erase a cluster's unlabeled utterances (kept speech and embeddings)")
    p.add_argument("cluster", type=identifier, help="cluster number (see `voiceprint clusters`)")
    p.add_argument("--yes", action="store_true", help="do it without asking")

    p = command("speakers", cmd_speakers, "list enrolled speakers, or one speaker's utterances (ids for accept / remove-utterance)")
    p.add_argument("speaker", nargs="?", help="list this speaker's utterances: id, status, speech seconds, when enrolled")
    command("versions", cmd_versions, "list model versions with their status, gate metrics and why any was rejected")
    p = command("prune", cmd_prune, "delete the weights of rejected and retired versions (their rows and metrics stay)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")

    p = command("refresh", cmd_refresh, "fine-tune a candidate version now; promote it if it passes the gate")
    p.add_argument("--dry-run", action="store_true", help="train and evaluate the candidate, never promote it")
    p.add_argument("--reason", default="manual", help="recorded with the job (default: manual)")

    p = command("rollback", cmd_rollback, "make an earlier (or any kept) version active again")
    p.add_argument("version", type=identifier)
    p.add_argument("--reason", default="rollback", help="recorded in the alias history (default: rollback)")
    p.add_argument("--force", action="store_true", help="also a candidate whose refresh stopped before promoting it")

    p = command("eval", cmd_eval, "measure EER, minDCF, top-1/top-5 and open-set errors on a labelled set (stores nothing)")
    p.add_argument("manifest", type=Path, help="CSV with columns path,speaker (paths relative to the manifest)")
    p.add_argument("--enroll", type=flag(COUNT), default=3, help="files per speaker enrolled (first in manifest order); the rest are probes (default 3)")
    p.add_argument("--trials", type=Path, help="trial list: 'enroll-speaker probe-path target|nontarget' per line")
    p.add_argument("--version", type=identifier, help="evaluate this kept version instead of the active one")
    p.add_argument("--min-speech", type=flag_for("audio", "min_speech_s"), help="seconds of speech a file needs, for this evaluation only")
    p.add_argument("--plot", type=Path, help="write a DET curve and score histograms to this PNG")
    p.add_argument("--scoring", choices=["cosine", "asnorm", "asnorm+calibrated"],
                   help="the back-end whose scores and thresholds are reported (default: the one the version decides with)")

    p = command("schedule", cmd_schedule, "set, list or clear when refreshes run (executed by `voiceprint serve`)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--every", type=interval, help="refresh at this interval: 90s, 15m, 6h, 2d")
    when.add_argument("--cron", help='refresh at these times, crontab syntax in UTC, e.g. "0 3 * * *"')
    p.add_argument("--min-new", type=flag(COUNT), help="refresh only once this many utterances arrived since the active version")
    p.add_argument("--check-every", type=interval, help="how often --min-new is checked (default 1m)")
    p.add_argument("--list", action="store_true", help="show the schedule")
    p.add_argument("--clear", nargs="?", const="all", choices=["all", "timed", "min-new"],
                   help="remove the schedule, or only its timed part (--every/--cron) or its --min-new")

    p = command("serve", cmd_serve, "run the HTTP API and the refresh schedule until stopped (SIGINT/SIGTERM)")
    p.add_argument("--host", help="address to listen on (default [service] host, 127.0.0.1)")
    p.add_argument("--port", type=flag_for("service", "port"), help="port (default [service] port, 8080; 0 picks a free one and prints it)")

    p = command("listen", cmd_listen, "stream a file, or a microphone's raw PCM on stdin, to a server's live routes")
    p.add_argument("task", choices=["enroll", "identify", "verify"])
    p.add_argument("what", nargs="+", metavar="[SPEAKER] SOURCE", help="the speaker (enroll, verify), then a file or - (16-bit PCM on stdin)")
    p.add_argument("--url", default="ws://127.0.0.1:8080", help="the server (default ws://127.0.0.1:8080)")
    p.add_argument("--key", default=os.environ.get("VOICEPRINT_KEY"), help="API key (default $VOICEPRINT_KEY)")
    p.add_argument("--rate", type=flag(COUNT), default=16000, help="sample rate of stdin's PCM (default 16000)")
    p.add_argument("--pace", type=float, default=1.0, help="1: real time (default), 0: as fast as the socket takes it")
    p.add_argument("--top", type=flag(COUNT), default=5, help="identify: candidates in each answer (default 5)")
    p.add_argument("--force", action="store_true", help="enroll: " + force + " (admin key)")

    p = command("keys", cmd_keys, "create, list or revoke the service's API keys")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("--role", choices=["admin", "enroll", "query"], help="create: what the key may do")
    p.add_argument("--note", default="", help="create: what the key is for")
    p.add_argument("--id", type=identifier, help="revoke: the key's id (see `keys list`)")

    p = command("delete-speaker", cmd_delete_speaker, "erase everything stored about a speaker (audio, embeddings, profiles, held items)")
    p.add_argument("speaker")
    p.add_argument("--yes", action="store_true", help="do it without asking")

    command("openapi", cmd_openapi, "print the HTTP API's OpenAPI schema (JSON)")
    command("status", cmd_status, "active version, pending utterances, running and last job, next scheduled runs")
    p = command("index", cmd_index, "the 1:N index of the active version: kind, size, memory, revision of the change feed, recall")
    p.add_argument("action", choices=["status"])

    p = command("db", cmd_db, "database schema (upgrade also stores the home's checkpoint files in the database)")
    p.add_argument("action", choices=["upgrade", "current"])
    return parser


# -- helpers -------------------------------------------------------------------------


def emit(document: Any) -> None:
    print(json.dumps(document, default=_json_default), flush=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def answer(args: argparse.Namespace, document: Any, lines: Iterable[str] = (), notes: Iterable[str] = ()) -> None:
    """With ``--json`` the document on stdout; else the lines on stdout, then the notes on stderr."""
    if args.json:
        emit(document)
        return
    for line in lines:
        print(line)
    for note in notes:
        print(note, file=sys.stderr)


def error(text: str) -> None:
    print(f"voiceprint: error: {text}", file=sys.stderr, flush=True)


def open_engine(args: argparse.Namespace, config=None):
    from voiceprint.engine import Engine

    return Engine.open(home=args.home, db=args.db, config=config)


def _home_and_db(args: argparse.Namespace) -> tuple[str, str]:
    from voiceprint.engine.home import resolve_db, resolve_home

    home = resolve_home(args.home)
    return str(home), resolve_db(args.db, home)


class ProgressBars:
    """Draws the engine's ``on_progress(done, total, what)`` reports: a tqdm bar on
    stderr per phase (a new ``what`` starts a new bar), only for a person watching: not
    with ``--json``, not into a file or a pipe, not when ``wanted`` is false."""

    def __init__(self, args: argparse.Namespace, wanted: bool = True) -> None:
        self.enabled = wanted and not args.json and sys.stderr.isatty()
        self.what, self.bar = None, None

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if self.bar is None or what != self.what:
            from tqdm import tqdm

            self.close()
            self.bar, self.what = tqdm(total=total, desc=what, leave=False, file=sys.stderr), what
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- enrollment ----------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from voiceprint.engine import Engine

    with Engine.init(home=args.home, db=args.db) as eng:
        doc = {"home": str(eng.home), "db": str(eng.url), "active_version": eng.active_version().number}
    answer(args, doc, [f"initialised {doc['home']} (database {doc['db']}); active model version {doc['active_version']}"])
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace) -> int:
    failed = 0
    with open_engine(args) as eng, closing(ProgressBars(args, wanted=len(args.files) > 1)) as bars:
        results = eng.enroll_stream(((args.speaker, path, None) for path in args.files), force=args.force)
        for done, (path, result) in enumerate(zip(args.files, results), 1):
            failed += report_row(args, result, source=str(path))
            bars(done, len(args.files), "enrolling")
        recalibrate(eng, args)
    return outcome(failed, len(args.files))


def recalibrate(eng, args: argparse.Namespace) -> None:
    """After enrolling: calibrate again if the population changed enough (a note says so)."""
    fitted = eng.calibrate_if_needed()
    if fitted is not None and not args.json:
        print(f"note: calibrated version {fitted.version} again on {fitted.trials['speakers']} speakers "
              "([scoring] recalibrate_change)", file=sys.stderr)


def report_row(args: argparse.Namespace, result, *, source: str, row: int | None = None) -> int:
    """Print one row's outcome; return 1 if it failed."""
    where = f"row {row}: " if row is not None else ""
    if isinstance(result, VoiceprintError):
        if args.json:
            emit({"row": row, "ok": False, "source": source, "error": result.code, "feedback": result.code.upper(), "message": str(result)})
        else:
            text = str(result) if source in str(result) else f"{source}: {result}"  # audio errors name it already
            error(f"{where}{text} ({result.code})")
        return 1
    if args.json:
        emit({"row": row, "ok": True, **asdict(result)})
    else:
        print(f"{where}{enrollment_line(result)}", flush=True)
    return 0


def enrollment_line(result) -> str:
    if result.feedback == "UNLABELED":
        return f"unlabeled: {result.source}  speech {result.speech_s:.2f} s  stored as unlabeled utterance {result.utterance_id}"
    before = "new speaker" if result.similarity_before is None else f"cos-before {result.similarity_before:.3f}"
    if result.feedback != "OK":
        return (
            f"held {result.speaker}: {result.source}  {result.feedback}: {before}; stored as utterance "
            f"{result.utterance_id} pending review (voiceprint accept|remove-utterance {result.utterance_id})"
        )
    return (
        f"enrolled {result.speaker}: {result.source}  speech {result.speech_s:.2f} s  {before}  n={result.count}  "
        f"progress {result.progress:.0%}"
    )


def cmd_stream(args: argparse.Namespace) -> int:
    from voiceprint.engine.audio import check_root
    from voiceprint.engine.home import load_home_config
    from voiceprint.engine.manifests import open_list, stream_rows

    # errors="replace": an undecodable row is refused on its own (stream_rows), not the stream.
    if args.source == "-":
        sys.stdin.reconfigure(errors="replace")
        stream, base = sys.stdin, Path.cwd()
    else:
        # A manifest is read only from where audio may be read ([audio] roots).
        path = check_root(args.source, load_home_config(args.home).audio.roots)
        stream = open_list(path, "stream", encoding="utf-8", errors="replace", newline="")
        base = path.parent
    # Rows and results come in the same order; the row number and the path as written
    # travel beside the engine's items, appended before each item is handed over.
    labels: deque[tuple[int, str]] = deque()

    def items() -> Iterator[Any]:
        for number, item, source in stream_rows(stream, base):
            labels.append((number, source))
            yield item

    failed = total = 0
    try:
        with open_engine(args) as eng:
            for result in eng.enroll_stream(items(), force=args.force):
                number, source = labels.popleft()
                total += 1
                failed += report_row(args, result, source=source, row=number)
            recalibrate(eng, args)
    finally:
        if stream is not sys.stdin:
            stream.close()
    if not args.json:
        print(f"{total - failed} of {total} rows stored", file=sys.stderr)
    return outcome(failed, total)


def outcome(failed: int, total: int) -> int:
    """0 all stored, 1 some stored and some not, 2 none stored (an error, not a partial outcome)."""
    return EXIT_OK if not failed else EXIT_ERROR if failed == total else EXIT_NEGATIVE


def cmd_pending(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        held = eng.utterances(args.speaker, status="pending")
    lines = (f"{u.id:>8}  {u.speaker:<30} {u.source}  ({u.created_at:%Y-%m-%d %H:%M})" for u in held)
    answer(args, [asdict(u) for u in held], lines, [f"{len(held)} utterances pending review"])
    return EXIT_OK


def cmd_utterance(args: argparse.Namespace) -> int:
    """accept and remove-utterance: one utterance id in, one line out."""
    with open_engine(args) as eng:
        doc = getattr(eng, args.method)(args.utterance)
    answer(args, doc, [args.done.format(**doc)])
    return EXIT_OK


def cmd_speakers(args: argparse.Namespace) -> int:
    if args.speaker is not None:
        return _speaker_utterances(args)
    with open_engine(args) as eng:
        speakers = eng.speakers()
    lines = [f"{'speaker':<30} {'utterances':>10} {'speech s':>9} {'pending':>8}"]
    lines += [f"{s.name:<30} {s.utterances:>10} {s.speech_s:>9.1f} {s.pending:>8}" for s in speakers]
    answer(args, [asdict(s) for s in speakers], lines, [f"{len(speakers)} speakers"])
    return EXIT_OK


def _speaker_utterances(args: argparse.Namespace) -> int:
    from voiceprint.engine.results import utterance_dict

    with open_engine(args) as eng:
        found = [utterance_dict(u) for u in eng.speaker_utterances(args.speaker)]
    lines = [f"{'id':>8}  {'status':<15} {'speech s':>8}  {'enrolled':<16}  source"]
    lines += [f"{u['id']:>8}  {u['status']:<15} {u['speech_s']:>8.1f}  {u['created_at'][:16].replace('T', ' '):<16}  {u['source']}"
              for u in found]
    held = sum(u["held_for_review"] for u in found)
    notes = [f"{len(found)} utterances, {held} held for review (voiceprint accept|remove-utterance ID)"]
    answer(args, found, lines, notes)
    return EXIT_OK


SCRUB_PENDING = "a reader holds erased bytes in the database files: scrubbed once it ends (voiceprint status)"


def cmd_delete_speaker(args: argparse.Namespace) -> int:
    if not args.yes and not confirmed(f"erase everything stored about {args.speaker!r}?", "delete-speaker"):
        return EXIT_NEGATIVE
    with open_engine(args) as eng:
        result = eng.erase_speaker(args.speaker)
    line = (
        f"erased {result['speaker']}: {result['utterances']} utterance(s), {result['embeddings']} embedding(s), "
        f"{result['centroids']} profile(s)"
    )
    trained = [] if not result["trained_into"] else [
        f"versions {result['trained_into']} were fine-tuned on some of this speaker's audio; their weights "
        "are unchanged (roll back past them and refresh again to remove that too)"
    ]
    trained += [f"refresh job(s) {result['running_refresh']} running: none promotes weights trained on this audio"] * bool(
        result["running_refresh"])
    trained += [SCRUB_PENDING] * (result["scrub"] == "pending")
    answer(args, {"ok": True, **result}, [line], trained)
    return EXIT_OK


def cmd_clusters(args: argparse.Namespace) -> int:
    with open_engine(args) as eng, closing(ProgressBars(args)) as bars:
        found = eng.clusters(on_progress=bars)
    lines = [f"{'cluster':>8}  {'status':<9} {'utts':>5} {'speech s':>8} {'cohesion':>8} {'stable':>6}  "
             "nearest enrolled: utterances identified as them; centroid score / threshold"]
    for c in found:
        near = "-" if c.candidate is None else (
            f"{c.candidate}: {c.recognised:.0%}; {_maybe(c.score)} / {_maybe(c.threshold)} {c.backend}")
        lines.append(f"{c.number:>8}  {c.status:<9} {len(c.utterances):>5} {c.speech_s:>8.1f} {c.cohesion:>8.3f} "
                     f"{c.stability:>6.0%}  {near}")
    proposed = sum(c.status == "proposed" for c in found)
    answer(args, [asdict(c) for c in found], lines,
           [f"{len(found)} clusters, {proposed} proposed as new speakers (voiceprint name-cluster N NAME)"])
    return EXIT_OK


def cmd_name_cluster(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        doc = eng.name_cluster(args.cluster, args.speaker, force=args.force)
        recalibrate(eng, args)
    lines = [f"cluster {doc['cluster']} -> {doc['speaker']}: {len(doc['enrolled'])} enrolled, "
             f"{len(doc['held'])} held for review, {len(doc['refused'])} refused (still unlabeled)"]
    lines += [f"  unlabeled {r['unlabeled']}: {r['message']} ({r['error']})" for r in doc["refused"]]
    answer(args, doc, lines)
    return outcome(len(doc["refused"]), len(doc["enrolled"]) + len(doc["held"]) + len(doc["refused"]))


def cmd_delete_cluster(args: argparse.Namespace) -> int:
    if not args.yes and not confirmed(f"erase the unlabeled utterances of cluster {args.cluster}?", "delete-cluster"):
        return EXIT_NEGATIVE
    with open_engine(args) as eng:
        doc = eng.delete_cluster(args.cluster)
    notes = [SCRUB_PENDING] * (doc["scrub"] == "pending")
    answer(args, {"ok": True, **doc}, [f"erased cluster {doc['cluster']}: {doc['unlabeled_utterances']} utterance(s), "
                                       f"{doc['embeddings']} embedding(s)"], notes)
    return EXIT_OK


def confirmed(question: str, command: str) -> bool:
    """Ask on a terminal before erasing; elsewhere --yes is required."""
    if not sys.stdin.isatty():
        raise InvalidInput(f"{command} erases data for good: pass --yes")
    if input(f"{question} [y/N] ").strip().lower() in ("y", "yes"):
        return True
    print("nothing erased", file=sys.stderr)
    return False


# -- recognition ---------------------------------------------------------------------


def cmd_identify(args: argparse.Namespace) -> int:
    return recognise(args, lambda eng, probes: eng.identify_each(probes, top=args.top), _identification_lines,
                     lambda result: {**asdict(result), "unknown": result.decision is None})


def _identification_lines(result) -> list[str]:
    why = f" ({result.reason})" if result.reason and result.candidates else ""
    lines = [
        f"decision: {result.decision or 'unknown'}{why}  ({result.backend} threshold {_maybe(result.threshold)}, "
        f"model version {result.version})"
    ]
    if result.candidates:
        lines.append(f"{'':>4} {'speaker':<30} {'cosine':>7} {'as-norm':>8} {'LLR':>7}")
    for rank, hit in enumerate(result.candidates, 1):
        lines.append(f"{rank:>3}. {hit.speaker:<30} {hit.score:>7.3f} {_maybe(hit.normalised):>8} {_maybe(hit.llr):>7}")
    if not result.candidates:
        lines.append("no speakers are enrolled yet")
    return lines + [f"note: {note}" for note in result.notes]


def cmd_verify(args: argparse.Namespace) -> int:
    return recognise(args, lambda eng, probes: eng.verify_each(args.speaker, probes), lambda result: [
        f"{'accept' if result.accepted else 'reject'} {result.speaker}: cosine {result.score:.3f}  as-norm {_maybe(result.normalised)}  "
        f"LLR {_maybe(result.llr)}  ({result.backend} threshold {_maybe(result.threshold)}, model version {result.version})"
    ], asdict, accepted=lambda result: result.accepted)


def recognise(args: argparse.Namespace, run, lines_of, document_of, accepted=lambda result: True) -> int:
    """identify and verify. One file answers as it always did. Several (or --list) answer
    each file as soon as it is computed: a block (one line for verify), or one JSON line,
    a refused file with its error in its own answer. Exit 0 all answered (and, for
    verify, accepted), 1 some refused (or rejected), 2 none answered."""
    if not args.files and args.probe_list is None:
        raise InvalidInput("no audio to answer for: name files, or --list FILE ('-' for stdin)")
    batch = args.probe_list is not None or len(args.files) > 1
    stream, base = _probe_list(args)
    labels: deque[str] = deque()  # each probe's path as written, beside the engine's items

    def probes() -> Iterator[Any]:
        named = ((str(path), path) for path in args.files)
        listed = path_lines(stream, base) if stream is not None else ()
        for text, item in itertools.chain(named, listed):
            labels.append(text)
            yield item if isinstance(item, VoiceprintError) else (item, None)

    failed = total = rejected = 0
    try:
        with open_engine(args) as eng:
            for result in run(eng, probes()):
                source, total = labels.popleft(), total + 1
                if not batch:
                    if isinstance(result, VoiceprintError):
                        raise result
                    answer(args, document_of(result), lines_of(result))
                    return EXIT_OK if accepted(result) else EXIT_NEGATIVE
                failed += report_probe(args, source, result, lines_of, document_of)
                rejected += not isinstance(result, VoiceprintError) and not accepted(result)
    finally:
        if stream is not None and stream is not sys.stdin:
            stream.close()
    if not total:
        raise InvalidInput(f"{args.probe_list} names no audio files")
    if not args.json:
        print(f"{total - failed} of {total} files answered", file=sys.stderr)
    return EXIT_ERROR if failed == total else EXIT_NEGATIVE if failed or rejected else EXIT_OK


def _probe_list(args: argparse.Namespace):
    """The --list stream and the folder its relative paths start from (None: no list)."""
    from voiceprint.engine.audio import check_root
    from voiceprint.engine.home import load_home_config
    from voiceprint.engine.manifests import open_list

    if args.probe_list is None:
        return None, Path.cwd()
    if args.probe_list == "-":
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # a line that is not UTF-8 fails alone (path_lines)
        return sys.stdin, Path.cwd()
    # A list is read only from where audio may be read ([audio] roots), like a stream's rows.
    path = check_root(args.probe_list, load_home_config(args.home).audio.roots)
    return open_list(path, "probe list", encoding="utf-8", errors="replace"), path.parent


def report_probe(args: argparse.Namespace, source: str, result, lines_of, document_of) -> int:
    """Print one file's answer as soon as it is known; return 1 if the file was refused."""
    refused = isinstance(result, VoiceprintError)
    if args.json:
        emit({"file": source, "ok": False, "error": result.code, "message": str(result)} if refused else
             {"file": source, "ok": True, **document_of(result)})
    elif refused:
        error(f"{str(result) if source in str(result) else f'{source}: {result}'} ({result.code})")
    else:
        lines = lines_of(result)
        print("\n".join([f"{source}: {lines[0]}"] if len(lines) == 1 else [f"{source}:", *(f"  {ln}" for ln in lines)]), flush=True)
    return int(refused)


def cmd_calibrate(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        calibration = eng.calibrate()
    t = calibration.trials
    lines = [
        f"calibrated version {calibration.version} on {t['target']} target, {t['nontarget']} non-target and "
        f"{t.get('identify', 0)} open-set leave-one-out trials ({t['speakers']} speakers, {t['utterances']} utterances)"
    ]
    for backend, cuts in calibration.thresholds.items():
        fit = calibration.fit.get(backend, {})
        extra = f"  Cllr {fit['cllr']:.3f}" if "cllr" in fit else ""
        lines.append(
            f"  {backend:<18} verify >= {cuts['verify']:.3f} ({fit.get('verify_basis', '?')})  identify >= "
            f"{cuts['identify']:.3f} ({fit.get('identify_basis', '?')})  EER {fit.get('eer', float('nan')):.2%}{extra}"
        )
        lines.extend(_expected_lines(fit, "    "))
    notes = [f"note: {note}" for note in calibration.fit.get("notes", [])]
    if "asnorm" not in calibration.thresholds:
        notes.append("note: the AS-norm cohort is too small (see [scoring] min_cohort); cosine decides")
    answer(args, asdict(calibration), lines, notes)
    return EXIT_OK


def _expected_lines(fit: dict, indent: str) -> list[str]:
    """The false-accept rates a calibration expects on speakers it never saw, with bounds."""
    return [
        f"{indent}{task} false accepts expected on new speakers {e['rate']:.2%} (95 % bound {e['bound']:.2%}, "
        f"{e['trials']} trials of {e['speakers']} speakers)"
        for task in ("verify", "identify")
        if (e := fit.get(f"{task}_expected"))
    ]


def cmd_eval(args: argparse.Namespace) -> int:
    from voiceprint.engine.audio import check_root
    from voiceprint.engine.det import plot
    from voiceprint.engine.home import load_home_config
    from voiceprint.engine.manifests import read_manifest, read_trials

    home_config = load_home_config(args.home)
    # Lists of audio are read only from where audio may be read ([audio] roots), like the audio.
    files = read_manifest(check_root(args.manifest, home_config.audio.roots))
    trials = read_trials(check_root(args.trials, home_config.audio.roots)) if args.trials else None
    config = None
    if args.min_speech is not None:
        config = replace(home_config, audio=replace(home_config.audio, min_speech_s=args.min_speech))
    with open_engine(args, config) as eng, closing(ProgressBars(args)) as bars:
        report = eng.evaluate(files, enroll=args.enroll, trials=trials, version=args.version, scoring=args.scoring, on_progress=bars)
    if args.plot:
        plot(report.det(), args.plot)
    m = report.metrics
    lines = [
        f"version {report.version}: {report.speakers} speakers, {report.probes} probes, "
        f"{report.trials['target']} target / {report.trials['nontarget']} non-target trials",
        f"  EER        {m['eer']:.2%}  (at {report.backend} {m['eer_threshold']:.3f})",
        f"  minDCF     {m['min_dcf_0.01']:.4f} (p_target 0.01)  {m['min_dcf_0.05']:.4f} (p_target 0.05)",
        f"  top-1      {m['top1']:.2%}   top-5 {m['top5']:.2%}",
        f"  at verify threshold {m['verify_threshold']:.2f}: false accepts {m['false_accept_rate']:.2%}, misses {m['miss_rate']:.2%}",
        f"  open set at identify threshold {m['identify_threshold']:.2f}: {m['open_set_false_accept_rate']:.2%} of probes "
        "would be accepted as someone else if their speaker were not enrolled",
    ]
    for label, bucket in report.by_duration.items():
        top1 = "-" if bucket["top1"] is None else f"{bucket['top1']:.2%}"
        lines.append(f"  speech {label:<6} {bucket['probes']:>5} probes  EER {bucket['eer']:.2%}  top-1 {top1}")
    lines += [f"  note: {note}" for note in report.notes]
    lines += [f"  plot written to {args.plot}"] if args.plot else []
    answer(args, {"ok": True, **report.to_dict(), "plot": str(args.plot) if args.plot else None}, lines)
    return EXIT_OK


def cmd_diarize(args: argparse.Namespace) -> int:
    with open_engine(args) as eng, closing(ProgressBars(args)) as bars:
        result = eng.diarize(args.file, speakers=args.speakers, on_progress=bars)
    if args.rttm:
        args.rttm.write_text(result.rttm())
    lines = [f"{s.start:9.2f} {s.end:9.2f}  {s.speaker:<30} {'-' if s.score is None else f'{s.score:.3f}'}" for s in result.segments]
    found = ", ".join(f"{s.speaker} {s.speech_s:.1f} s" for s in result.speakers)
    notes = [f"{len(result.speakers)} speakers in {result.speech_s:.1f} s of speech ({result.duration_s:.1f} s): {found}; "
             f"matched by {result.backend} (model version {result.version})", *result.notes]
    notes += [f"RTTM written to {args.rttm}"] if args.rttm else []
    answer(args, {"ok": True, **asdict(result), "rttm": str(args.rttm) if args.rttm else None}, lines, notes)
    return EXIT_OK


# -- models --------------------------------------------------------------------------


def cmd_versions(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        versions = eng.versions()
    lines = [f"{'version':>7} {'parent':>6} {'status':<9} {'created':<19} {'top-1':>13} {'EER':>13}  note"]
    for v in versions:
        lines.append(
            f"{'*' if v.active else ' '}{v.number:>6} {v.parent if v.parent is not None else '-':>6} {v.status:<9} "
            f"{v.created_at:%Y-%m-%d %H:%M:%S} "
            f"{_gate_change(v.metrics, 'accuracy', '.1%'):>13} {_gate_change(v.metrics, 'eer', '.2%'):>13}  {v.note or ''}"
            + (" [weights pruned]" if "pruned" in v.metrics else "")
        )
    legend = "* active; top-1 and EER: parent -> this version on held-out utterances (refresh gate)"
    answer(args, [asdict(v) for v in versions], lines, [legend])
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        result = eng.prune(dry_run=args.dry_run)
    lines = [f"version {v['version']} ({v['status']}): {v['bytes'] / 2**20:.1f} MiB" for v in result["versions"]]
    lines.append(f"{'would free' if args.dry_run else 'freed'} {result['freed_bytes'] / 2**20:.1f} MiB")
    answer(args, {"ok": True, **result}, lines)
    return EXIT_OK


def _gate_change(metrics: dict, key: str, spec: str) -> str:
    try:
        before, after = metrics["parent"]["overall"][key], metrics["candidate"]["overall"][key]
    except (KeyError, TypeError):
        return "-"
    return f"{before:{spec}}->{after:{spec}}"


def cmd_refresh(args: argparse.Namespace) -> int:
    with open_engine(args) as eng, closing(ProgressBars(args)) as bars:
        report = eng.refresh(dry_run=args.dry_run, reason=args.reason, on_progress=bars)
    what = {
        "promoted": f"version {report.version} promoted (now active)",
        "rejected": f"version {report.version} rejected, version {report.parent} stays active",
        "dry-run": "dry run: nothing stored",
        "skipped": "skipped",
    }[report.status]
    lines = [f"refresh job {report.job}: {what}"]
    parent, candidate = report.metrics.get("parent"), report.metrics.get("candidate")
    if parent and candidate:
        lines += [
            f"  {group:<8} {parent[group]['probes']:>4} held-out  "
            f"top-1 {parent[group]['accuracy']:.1%} -> {candidate[group]['accuracy']:.1%}  "
            f"EER {parent[group]['eer']:.2%} -> {candidate[group]['eer']:.2%}"
            for group in ("overall", "old", "new")
            if group in parent
        ]
    lines += [f"  {'why' if report.status != 'skipped' else 'because'}: {reason}" for reason in report.reasons]
    timings = ["  " + "  ".join(f"{k} {v}" for k, v in report.timings.items())] if report.timings else []
    warning = (report.metrics.get("calibration") or {}).get("warning")
    answer(args, {"ok": True, **report.to_dict()}, lines, timings + ([f"warning: {warning}"] if warning else []))
    return EXIT_NEGATIVE if report.status == "rejected" else EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    with open_engine(args) as eng, closing(ProgressBars(args)) as bars:
        result = eng.rollback(args.version, reason=args.reason, force=args.force, on_progress=bars)
    if result["changed"]:
        line = (
            f"version {result['version']} is active again (was {result['previous']}); "
            f"{result['embedded']} utterances embedded under it, {result['seconds']:.1f} s"
        )
    else:
        line = f"version {result['version']} was already active; nothing changed"
    warning = (result.get("calibration") or {}).get("warning")
    answer(args, {"ok": True, **result}, [line], [f"warning: {warning}"] if warning else [])
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    from voiceprint.engine import scheduler
    home, db = _home_and_db(args)
    open_engine(args).close()  # a clear error if the home or database is not initialised
    setting = bool(args.every or args.cron or args.min_new is not None or args.check_every)
    jobs, removed = [], 0
    if args.clear:
        if setting:
            raise InvalidInput("--clear takes no --every/--cron/--min-new/--check-every")
        removed = scheduler.clear_schedule(db, args.clear)
        jobs = scheduler.list_schedule(db)
        lines, notes = [f"schedule cleared: {args.clear} ({removed} job(s) removed)"], []
    else:
        if args.list or not setting:
            jobs = scheduler.list_schedule(db)
        else:
            jobs = scheduler.set_schedule(home, db, every=args.every, cron=args.cron, min_new=args.min_new, check_every=args.check_every)
        lines = [
            f"{job['id']:<26} {job['trigger']:<22} next {job['next_run'] or '-'}"
            + (f"  if >= {job['min_new']} new" if job["min_new"] else "")
            for job in jobs
        ] or ["no schedule: set one with --every, --cron or --min-new"]
        notes = ["runs while `voiceprint serve` is up"] if jobs else []
    answer(args, {"ok": True, "jobs": jobs, "removed": removed}, lines, notes)
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        started = time.perf_counter()
        rows = eng.index_status()
        built_s = time.perf_counter() - started
    lines = [f"version {r['version']}: {r['kind']}, {r['speakers']} speakers, {r['memory_bytes'] / 2**20:.1f} MiB, "
             f"revision {r['revision']} of the feed's {r['feed_revision']} ({r['behind']} behind)"
             + (f", recall@1 {r['recall_at_1']:.4f} on {r['recall_probes']} stored utterances" if r["recall_at_1"] is not None else "")
             for r in rows]
    answer(args, {"ok": True, "versions": rows, "built_s": round(built_s, 3)}, [*lines, f"built in {built_s:.2f} s"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from voiceprint.engine import scheduler

    _, db = _home_and_db(args)
    with open_engine(args) as eng:
        status = eng.status()
    status["schedule"] = scheduler.list_schedule(db)
    cal, running, last = status["calibration"], status["running_job"], status["last_job"]
    decisions = status["decisions"]
    lines = [
        f"active version      {status['active_version']}",
        f"new utterances      {status['pending_utterances']} (enrolled since the active version was trained)",
        f"held for review     {status['held_for_review']} (voiceprint pending)",
        f"unlabeled           {status['unlabeled_utterances']} (voiceprint clusters)",
        "calibration         none yet (see decisions)" if cal is None else
        f"calibration         {cal['created_at'][:19]} on {cal['speakers_then']} speakers "
        f"({cal['speakers_now']} enrolled now{'; calibrate again' if decisions['recalibrate'] else ''})"
        f"{', scores centred' if cal.get('centred') else ''}",
        f"decisions           {decisions['backend']}: verify >= {_maybe(decisions['verify_threshold'])}, "
        f"identify >= {_maybe(decisions['identify_threshold'])} among {decisions['speakers']} speakers"
        + (f" ({decisions['why']})" if decisions["why"] else ""),
        f"queued requests     {status['queued']}",
        f"erasure scrub       {status['scrub']['scrub']} {(status['scrub']['pending_since'] or '')[:19]}".rstrip(),
        f"running job         {'-' if not running else _job_line(running)}",
        f"last job            {'-' if not last else _job_line(last)}",
    ]
    for job in status["schedule"] or [{"id": "-", "next_run": "no schedule"}]:
        when = job["next_run"] or f"once {job['min_new']} are new"  # the --min-new condition has no fixed time
        lines.append(f"next run            {when}  ({job['id']})")
    expected = {f"{task}_expected": e for task, e in decisions["expected_false_accepts"].items()}
    notes = [f"note: {n}" for n in (decisions["verify_threshold_from"], *_expected_lines(expected, "")) if n != "calibration"]
    notes += [f"note: {d['speakers'][0]!r} and {d['speakers'][1]!r} score like one person" for d in decisions["duplicates"]]
    answer(args, status, lines, notes)
    return EXIT_OK


def _job_line(job: dict) -> str:
    when = job["finished_at"] or job["started_at"] or job["requested_at"]
    version = f" -> v{job['version']}" if job["version"] else ""
    kind = f"{job['kind']} (dry run)" if job.get("dry_run") else job["kind"]
    return f"#{job['id']} {kind} {job['status']}{version} at {when} ({job['reason']})"


# -- the service ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from voiceprint.service import create_app
    from voiceprint.service.server import listen, serve

    home, db = _home_and_db(args)
    with open_engine(args) as eng:  # fail fast, with the usual message, if not initialised
        where, cfg = eng.url, eng.config.service
        keys = [k for k in eng.list_keys() if k.revoked_at is None]
    host = args.host or cfg.host
    sock = listen(host, cfg.port if args.port is None else args.port)
    print(f"voiceprint serve: http://{host}:{sock.getsockname()[1]} on {where}; stop with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
    if not keys:
        print("voiceprint serve: no API keys yet, every request will get 401 (voiceprint keys create --role admin)", file=sys.stderr, flush=True)
    for name in ("voiceprint.access", "voiceprint.events"):  # the access log and lifecycle events, -v or not
        logging.getLogger(name).setLevel(logging.INFO)
    serve(create_app(home, db), sock, verbose=args.verbose)
    print("voiceprint serve: stopped", file=sys.stderr)
    return EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    from voiceprint.service.listen import main_of

    *speaker, args.source = args.what
    if len(speaker) != (args.task != "identify"):
        raise InvalidInput(f"listen {args.task} takes {'SOURCE' if args.task == 'identify' else 'SPEAKER SOURCE'}")
    args.speaker = speaker[0] if speaker else None
    if not args.key:
        raise InvalidInput("listen needs an API key: --key, or $VOICEPRINT_KEY (kept out of the shell history)")
    try:
        final, _ = main_of(args)
    except ConnectionError as exc:
        raise InvalidInput(str(exc)) from None
    result = final.get("result")
    if result is None:
        return EXIT_ERROR
    return EXIT_NEGATIVE if result.get("accepted") is False or result.get("decision", "") is None else EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        if args.action == "create":
            if not args.role:
                raise InvalidInput("keys create needs --role admin|enroll|query")
            record, key = eng.create_key(args.role, note=args.note)
            notes = [f"key {record.id} ({record.role}) created; it is shown only now, store it safely"]
            answer(args, {"ok": True, "id": record.id, "role": record.role, "key": key}, [key], notes)
            return EXIT_OK
        if args.action == "revoke":
            if args.id is None:
                raise InvalidInput("keys revoke needs --id (see `voiceprint keys list`)")
            records = [eng.revoke_key(args.id)]
        else:
            records = eng.list_keys()
    answer(args, [asdict(r) for r in records], map(_key_line, records))
    return EXIT_OK


def _key_line(key) -> str:
    state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
    return f"{key.id:>4}  {key.prefix}...  {key.role:<7} {state:<24} {key.created_at:%Y-%m-%d %H:%M}  {key.note}"


def cmd_openapi(args: argparse.Namespace) -> int:
    from voiceprint.service import create_app

    print(json.dumps(create_app(args.home, args.db).openapi(), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    # The one command below the engine: it must work on a database the engine cannot open yet.
    from voiceprint.engine.home import Home, ensure_sqlite_folder
    from voiceprint.engine.models import ModelRegistry
    from voiceprint.storage import Store

    home = Home.resolve(args.home, args.db)
    ensure_sqlite_folder(home.url)
    weights: dict[str, list] = {}
    with Store(home.url) as store:
        if args.action == "upgrade":
            store.schema.upgrade()
            weights = ModelRegistry(home, store).import_files()  # what a home from before 0011 holds only as files
        doc = {"db": str(store.url), "revision": store.schema.current_revision(), "head": store.schema.head_revision()}
    lines = [f"{doc['db']}: revision {doc['revision'] or '(empty)'}, newest {doc['head']}"]
    if weights:
        doc["checkpoints"] = weights
        lines.append(f"checkpoints: {len(weights['imported'])} imported from {home.path}, {len(weights['stored'])} stored already")
    notes = [f"version {n}: its checkpoint is neither in {home.path} nor in the database" for n in weights.get("missing", [])]
    answer(args, doc, lines, notes + [f"version {m['version']}: not imported: {m['error']}" for m in weights.get("mismatched", [])])
    return EXIT_NEGATIVE if weights.get("mismatched") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
