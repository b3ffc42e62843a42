"""voiceprint's command line: a thin layer over :class:`engine.Engine`.

Exit codes: 0 success (or "accept" for verify), 1 a negative outcome (verify rejected,
or some rows of an enroll/stream failed while the others were stored), 2 an error
(nothing was done). With ``--json`` every result is JSON on stdout; errors are still
one line on stderr, plus a JSON document on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections import deque
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, TextIO

EXIT_OK, EXIT_NEGATIVE, EXIT_ERROR = 0, 1, 2
GLOBAL_DEFAULTS = {"home": None, "db": None, "json": False, "verbose": False}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, default in GLOBAL_DEFAULTS.items():
        if not hasattr(args, option):
            setattr(args, option, default)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from engine.errors import VoiceprintError

    try:
        return args.run(args)
    except VoiceprintError as exc:
        print(f"voiceprint: error: {exc}", file=sys.stderr)
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="home folder (default $VOICEPRINT_HOME, else ./voiceprint-home)")
    common.add_argument("--db", default=argparse.SUPPRESS, help="SQLAlchemy URL (default $VOICEPRINT_DATABASE_URL, else SQLite in the home)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON on stdout")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress to stderr")

    parser = argparse.ArgumentParser(prog="voiceprint", description="Incremental speaker recognition.", parents=[common])
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

    p = command("stream", cmd_stream, "enroll rows (speaker,path) from a CSV/JSON-lines file or stdin as they arrive")
    p.add_argument("source", help="file, or - for stdin")
    p.add_argument("--force", action="store_true", help=force)

    command("calibrate", cmd_calibrate, "fit the active version's score normalisation, LLR calibration and thresholds on its enrollments")
    p = command("pending", cmd_pending, "list utterances held for review (they did not sound like their speaker)")
    p.add_argument("--speaker", help="only this speaker's")
    p = command("accept", cmd_accept, "move a held utterance into its speaker's profile")
    p.add_argument("utterance", type=int, help="utterance id (see `voiceprint pending`)")
    p = command("remove-utterance", cmd_remove_utterance, "delete an utterance and take it out of its speaker's profile exactly")
    p.add_argument("utterance", type=int, help="utterance id")

    p = command("identify", cmd_identify, "rank enrolled speakers for one utterance (1:N)")
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=5, help="how many candidates to show (default 5)")

    p = command("verify", cmd_verify, "accept or reject a claimed identity (1:1)")
    p.add_argument("speaker")
    p.add_argument("file", type=Path)

    command("speakers", cmd_speakers, "list enrolled speakers")
    command("versions", cmd_versions, "list model versions with their status, gate metrics and why any was rejected")

    p = command("refresh", cmd_refresh, "fine-tune a candidate version now; promote it if it passes the gate")
    p.add_argument("--dry-run", action="store_true", help="train and evaluate the candidate, never promote it")
    p.add_argument("--reason", default="manual", help="recorded with the job (default: manual)")

    p = command("rollback", cmd_rollback, "make an earlier (or any kept) version active again")
    p.add_argument("version", type=int)
    p.add_argument("--reason", default="rollback", help="recorded in the alias history (default: rollback)")

    p = command("eval", cmd_eval, "measure EER, minDCF, top-1/top-5 and open-set errors on a labelled set (stores nothing)")
    p.add_argument("manifest", type=Path, help="CSV with columns path,speaker (paths relative to the manifest)")
    p.add_argument("--enroll", type=int, default=3, help="files per speaker enrolled (first in manifest order); the rest are probes (default 3)")
    p.add_argument("--trials", type=Path, help="trial list: 'enroll-speaker probe-path target|nontarget' per line")
    p.add_argument("--version", type=int, help="evaluate this kept version instead of the active one")
    p.add_argument("--min-speech", type=float, help="seconds of speech a file needs, for this evaluation only")
    p.add_argument("--plot", type=Path, help="write a DET curve and score histograms to this PNG")

    p = command("schedule", cmd_schedule, "set, list or clear when refreshes run (executed by `voiceprint serve`)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--every", help="refresh at this interval: 90s, 15m, 6h, 2d")
    when.add_argument("--cron", help='refresh at these times, crontab syntax in UTC, e.g. "0 3 * * *"')
    p.add_argument("--min-new", type=int, help="refresh only once this many utterances arrived since the active version")
    p.add_argument("--check-every", default="1m", help="how often queued requests and --min-new are checked (default 1m)")
    p.add_argument("--list", action="store_true", help="show the schedule")
    p.add_argument("--clear", action="store_true", help="remove the schedule")

    p = command("serve", cmd_serve, "run the HTTP API and the refresh schedule until stopped (SIGINT/SIGTERM)")
    p.add_argument("--host", help="address to listen on (default [service] host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default [service] port, 8080; 0 picks a free one and prints it)")

    p = command("keys", cmd_keys, "create, list or revoke the service's API keys")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("--role", choices=["admin", "enroll", "query"], help="create: what the key may do")
    p.add_argument("--note", default="", help="create: what the key is for")
    p.add_argument("--id", type=int, help="revoke: the key's id (see `keys list`)")

    p = command("delete-speaker", cmd_delete_speaker, "erase everything stored about a speaker (audio, embeddings, profiles, held items)")
    p.add_argument("speaker")
    p.add_argument("--yes", action="store_true", help="do it without asking")

    command("openapi", cmd_openapi, "print the HTTP API's OpenAPI schema (JSON)")
    command("status", cmd_status, "active version, pending utterances, running and last job, next scheduled runs")

    p = command("db", cmd_db, "database schema")
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


def open_engine(args: argparse.Namespace):
    from engine import Engine

    return Engine.open(home=args.home, db=args.db)


def describe_failure(exc: Exception) -> str:
    return f"{exc} ({getattr(exc, 'code', 'error')})"


def enrollment_line(result) -> str:
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


# -- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from engine import Engine

    with Engine.init(home=args.home, db=args.db) as eng:
        active = eng.active_version()
        doc = {"home": str(eng.home), "db": str(eng.store.url), "active_version": active.number}
    if args.json:
        emit(doc)
    else:
        print(f"initialised {doc['home']} (database {doc['db']}); active model version {doc['active_version']}")
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    failed = 0
    with open_engine(args) as eng:
        show_bar = sys.stderr.isatty() and not args.json and len(args.files) > 1
        results = eng.enroll_stream(((args.speaker, path, None) for path in args.files), force=args.force)
        for path, result in zip(args.files, tqdm(results, total=len(args.files), unit="utt", disable=not show_bar, file=sys.stderr)):
            failed += report_row(args, result, source=str(path))
    if failed and len(args.files) == 1:
        return EXIT_ERROR  # a single bad file is an error, not a partial outcome
    return EXIT_NEGATIVE if failed else EXIT_OK


def report_row(args: argparse.Namespace, result, *, source: str, row: int | None = None) -> int:
    """Print one row's outcome; return 1 if it failed."""
    from engine.errors import VoiceprintError

    where = f"row {row}: " if row is not None else ""
    if isinstance(result, VoiceprintError):
        if args.json:
            emit({"row": row, "ok": False, "source": source, "error": result.code, "feedback": result.code.upper(), "message": str(result)})
        else:
            print(f"voiceprint: error: {where}{source}: {describe_failure(result)}", file=sys.stderr, flush=True)
        return 1
    if args.json:
        emit({"row": row, "ok": True, **asdict(result)})
    else:
        print(f"{where}{enrollment_line(result)}", flush=True)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from engine.audio import check_root
    from engine.config import load_config
    from engine.engine import CONFIG_FILE, resolve_home

    if args.source == "-":
        stream, base = sys.stdin, Path.cwd()
    else:
        # A manifest is read only from where audio may be read ([audio] roots).
        roots = load_config(resolve_home(args.home) / CONFIG_FILE).audio.roots
        path = check_root(args.source, roots)
        try:
            stream = open(path, encoding="utf-8", newline="")
        except OSError as exc:
            from engine.errors import InvalidInput

            raise InvalidInput(f"cannot open stream {path}: {exc.strerror}") from None
        base = path.parent
    # Rows and results come in the same order; the row number and the path as written
    # travel beside the engine's items, appended before each item is handed over.
    labels: deque[tuple[int, str]] = deque()

    def items() -> Iterator[Any]:
        for number, item, source in rows(stream, base):
            labels.append((number, source))
            yield item

    failed = total = 0
    try:
        with open_engine(args) as eng:
            for result in eng.enroll_stream(items(), force=args.force):
                number, source = labels.popleft()
                total += 1
                failed += report_row(args, result, source=source, row=number)
    finally:
        if stream is not sys.stdin:
            stream.close()
    if not args.json:
        print(f"{total - failed} of {total} rows enrolled", file=sys.stderr)
    return EXIT_NEGATIVE if failed else EXIT_OK


def rows(stream: TextIO, base: Path) -> Iterator[tuple[int, Any, str]]:
    """Parse rows as they arrive: ``(row number, (speaker, path, None) or an error, source)``.

    The first non-empty line decides the format: ``{`` starts JSON lines with keys
    ``speaker`` and ``path``; anything else is a CSV header naming ``speaker`` and
    ``path`` columns (others ignored, e.g. a dataset manifest). Relative paths are
    resolved against the stream file's folder (the working folder for stdin).
    """
    from engine.errors import InvalidInput

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


def cmd_identify(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        result = eng.identify(args.file, top=args.top)
    if args.json:
        doc = asdict(result)
        doc["unknown"] = result.decision is None
        emit(doc)
        return EXIT_OK
    why = f" ({result.reason})" if result.reason and result.candidates else ""
    print(
        f"decision: {result.decision or 'unknown'}{why}  ({result.backend} threshold {result.threshold:.3f}, "
        f"model version {result.version})"
    )
    if result.candidates:
        print(f"{'':>4} {'speaker':<30} {'cosine':>7} {'as-norm':>8} {'LLR':>7}")
    for rank, hit in enumerate(result.candidates, 1):
        print(f"{rank:>3}. {hit.speaker:<30} {hit.score:>7.3f} {_maybe(hit.normalised):>8} {_maybe(hit.llr):>7}")
    if not result.candidates:
        print("no speakers are enrolled yet")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        result = eng.verify(args.speaker, args.file)
    if args.json:
        emit(asdict(result))
    else:
        verdict = "accept" if result.accepted else "reject"
        print(
            f"{verdict} {result.speaker}: cosine {result.score:.3f}  as-norm {_maybe(result.normalised)}  "
            f"LLR {_maybe(result.llr)}  ({result.backend} threshold {result.threshold:.3f}, model version {result.version})"
        )
    return EXIT_OK if result.accepted else EXIT_NEGATIVE


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_calibrate(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        calibration = eng.calibrate()
    doc = asdict(calibration)
    if args.json:
        emit(doc)
        return EXIT_OK
    t = calibration.trials
    print(
        f"calibrated version {calibration.version} on {t['target']} target and {t['nontarget']} non-target "
        f"leave-one-out trials ({t['speakers']} speakers, {t['utterances']} utterances)"
    )
    for backend, cuts in calibration.thresholds.items():
        fit = calibration.fit.get(backend, {})
        extra = f"  Cllr {fit['cllr']:.3f}" if "cllr" in fit else ""
        print(
            f"  {backend:<18} verify >= {cuts['verify']:.3f}  identify >= {cuts['identify']:.3f}  "
            f"EER {fit.get('eer', float('nan')):.2%}{extra}"
        )
    for note in calibration.fit.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if "asnorm" not in calibration.thresholds:
        print("note: the AS-norm cohort is too small (see [scoring] min_cohort); cosine decides", file=sys.stderr)
    return EXIT_OK


def cmd_pending(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        held = eng.store.utterances(args.speaker, status="pending")
    if args.json:
        emit([asdict(u) for u in held])
        return EXIT_OK
    for u in held:
        print(f"{u.id:>8}  {u.speaker:<30} {u.source}  ({u.created_at:%Y-%m-%d %H:%M})")
    print(f"{len(held)} utterances pending review", file=sys.stderr)
    return EXIT_OK


def cmd_accept(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        doc = eng.accept_utterance(args.utterance)
    emit(doc) if args.json else print(f"utterance {doc['utterance']} joined {doc['speaker']}'s profile")
    return EXIT_OK


def cmd_remove_utterance(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        doc = eng.remove_utterance(args.utterance)
    emit(doc) if args.json else print(f"utterance {doc['utterance']} of {doc['speaker']} removed (it was {doc['was']})")
    return EXIT_OK


def cmd_speakers(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        speakers = eng.speakers()
    if args.json:
        emit([asdict(s) for s in speakers])
        return EXIT_OK
    print(f"{'speaker':<30} {'utterances':>10} {'speech s':>9} {'pending':>8}")
    for s in speakers:
        print(f"{s.name:<30} {s.utterances:>10} {s.speech_s:>9.1f} {s.pending:>8}")
    print(f"{len(speakers)} speakers", file=sys.stderr)
    return EXIT_OK


def cmd_versions(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        versions = eng.versions()
    if args.json:
        emit([asdict(v) for v in versions])
        return EXIT_OK
    print(f"{'version':>7} {'parent':>6} {'status':<9} {'created':<19} {'top-1':>13} {'EER':>13}  note")
    for v in versions:
        created = v.created_at.strftime("%Y-%m-%d %H:%M:%S")
        marker = "*" if v.active else " "
        print(
            f"{marker}{v.number:>6} {v.parent if v.parent is not None else '-':>6} {v.status:<9} {created:<19} "
            f"{_gate_change(v.metrics, 'accuracy', '.1%'):>13} {_gate_change(v.metrics, 'eer', '.2%'):>13}  {v.note or ''}"
        )
    print("* active; top-1 and EER: parent -> this version on held-out utterances (refresh gate)", file=sys.stderr)
    return EXIT_OK


def _gate_change(metrics: dict, key: str, spec: str) -> str:
    try:
        before, after = metrics["parent"]["overall"][key], metrics["candidate"]["overall"][key]
    except (KeyError, TypeError):
        return "-"
    return f"{before:{spec}}->{after:{spec}}"


def cmd_refresh(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        report = eng.refresh(dry_run=args.dry_run, reason=args.reason, progress=_show_progress(args))
    if args.json:
        emit({"ok": True, **report.to_dict()})
    else:
        gate = report.metrics.get("parent"), report.metrics.get("candidate")
        what = {
            "promoted": f"version {report.version} promoted (now active)",
            "rejected": f"version {report.version} rejected, version {report.parent} stays active",
            "dry-run": "dry run: nothing stored",
            "skipped": "skipped",
        }[report.status]
        print(f"refresh job {report.job}: {what}")
        if all(gate):
            for group in ("overall", "old", "new"):
                if group in gate[0]:
                    p, c = gate[0][group], gate[1][group]
                    print(
                        f"  {group:<8} {p['probes']:>4} held-out  top-1 {p['accuracy']:.1%} -> {c['accuracy']:.1%}"
                        f"  EER {p['eer']:.2%} -> {c['eer']:.2%}"
                    )
        for reason in report.reasons:
            print(f"  {'why' if report.status != 'skipped' else 'because'}: {reason}")
        if report.timings:
            print("  " + "  ".join(f"{k} {v}" for k, v in report.timings.items()), file=sys.stderr)
    return EXIT_NEGATIVE if report.status == "rejected" else EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    with open_engine(args) as eng:
        result = eng.rollback(args.version, reason=args.reason, progress=_show_progress(args))
    if args.json:
        emit({"ok": True, **result})
    elif result["changed"]:
        print(
            f"version {result['version']} is active again (was {result['previous']}); "
            f"{result['embedded']} utterances embedded under it, {result['seconds']:.1f} s"
        )
    else:
        print(f"version {result['version']} was already active; nothing changed")
    return EXIT_OK


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from engine import evaluation

    files = evaluation.read_manifest(args.manifest)
    trials = evaluation.read_trials(args.trials) if args.trials else None
    with open_engine(args) as eng:
        if args.min_speech is not None:
            audio_cfg = dataclasses.replace(eng.config.audio, min_speech_s=args.min_speech)
            eng.config = dataclasses.replace(eng.config, audio=audio_cfg)
        report = evaluation.evaluate(
            eng, files, enroll=args.enroll, trials=trials, version=args.version, progress=_show_progress(args)
        )
    if args.plot:
        evaluation.plot(report, args.plot)
    if args.json:
        emit({"ok": True, **report.to_dict(), "plot": str(args.plot) if args.plot else None})
        return EXIT_OK
    m = report.metrics
    print(f"version {report.version}: {report.speakers} speakers, {report.probes} probes, "
          f"{report.trials['target']} target / {report.trials['nontarget']} non-target trials")
    print(f"  EER        {m['eer']:.2%}  (at cosine {m['eer_threshold']:.3f})")
    print(f"  minDCF     {m['min_dcf_0.01']:.4f} (p_target 0.01)  {m['min_dcf_0.05']:.4f} (p_target 0.05)")
    print(f"  top-1      {m['top1']:.2%}   top-5 {m['top5']:.2%}")
    print(f"  at verify threshold {m['verify_threshold']:.2f}: false accepts {m['false_accept_rate']:.2%}, misses {m['miss_rate']:.2%}")
    print(f"  open set at identify threshold {m['identify_threshold']:.2f}: {m['open_set_false_accept_rate']:.2%} of probes "
          "would be accepted as someone else if their speaker were not enrolled")
    for label, bucket in report.by_duration.items():
        top1 = "-" if bucket["top1"] is None else f"{bucket['top1']:.2%}"
        print(f"  speech {label:<6} {bucket['probes']:>5} probes  EER {bucket['eer']:.2%}  top-1 {top1}")
    for note in report.notes:
        print(f"  note: {note}")
    if args.plot:
        print(f"  plot written to {args.plot}")
    return EXIT_OK


def _home_and_db(args: argparse.Namespace) -> tuple[str, str]:
    from engine.engine import resolve_db, resolve_home

    home = resolve_home(args.home)
    return str(home), resolve_db(args.db, home)


def cmd_schedule(args: argparse.Namespace) -> int:
    from engine import scheduler
    from engine.errors import InvalidInput

    home, db = _home_and_db(args)
    open_engine(args).close()  # a clear error if the home or database is not initialised
    setting = bool(args.every or args.cron or args.min_new is not None)
    if args.clear:
        if setting:
            raise InvalidInput("--clear takes no --every/--cron/--min-new")
        removed = scheduler.clear_schedule(db)
        jobs: list = []
    elif args.list or not setting:
        jobs, removed = scheduler.list_schedule(db), 0
    else:
        jobs = scheduler.set_schedule(home, db, every=args.every, cron=args.cron, min_new=args.min_new, check_every=args.check_every)
        removed = 0
    if args.json:
        emit({"ok": True, "jobs": jobs, "removed": removed})
    elif args.clear:
        print(f"schedule cleared ({removed} job(s) removed)")
    elif not jobs:
        print("no schedule: set one with --every, --cron or --min-new")
    else:
        for job in jobs:
            condition = f"  if >= {job['min_new']} new" if job["min_new"] else ""
            print(f"{job['id']:<26} {job['trigger']:<22} next {job['next_run']}{condition}")
        print("runs while `voiceprint serve` is up", file=sys.stderr)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import socket

    import uvicorn

    from service import create_app

    home, db = _home_and_db(args)
    with open_engine(args) as eng:  # fail fast, with the usual message, if not initialised
        where, cfg = eng.store.url, eng.config.service
        keys = [k for k in eng.store.list_keys() if k.revoked_at is None]
    host = args.host or cfg.host
    # The socket is bound here so that port 0 can report the port it got.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only
    # on sockets that say they are TCP, and with it on every response waited 40 ms for a
    # delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, cfg.port if args.port is None else args.port))
    except OSError as exc:
        from engine.errors import InvalidInput

        raise InvalidInput(f"cannot listen on {host}:{args.port or cfg.port}: {exc.strerror}") from None
    port = sock.getsockname()[1]
    print(f"voiceprint serve: http://{host}:{port} on {where}; stop with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
    if not keys:
        print("voiceprint serve: no API keys yet, every request will get 401 (voiceprint keys create --role admin)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(home, db), log_level="info" if args.verbose else "warning"))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for
    # the handler that was there before it; a no-op one lets us exit 0 after a clean stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("voiceprint serve: stopped", file=sys.stderr)
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from engine.engine import actor
    from engine.errors import InvalidInput
    from service.keys import create_key

    with open_engine(args) as eng:
        if args.action == "create":
            if not args.role:
                raise InvalidInput("keys create needs --role admin|enroll|query")
            record, key = create_key(eng.store, args.role, note=args.note, actor=actor())
            if args.json:
                emit({"ok": True, "id": record.id, "role": record.role, "key": key})
            else:
                print(key)
                print(f"key {record.id} ({record.role}) created; it is shown only now, store it safely", file=sys.stderr)
            return EXIT_OK
        if args.action == "revoke":
            if args.id is None:
                raise InvalidInput("keys revoke needs --id (see `voiceprint keys list`)")
            records = [eng.store.revoke_key(args.id, actor=actor())]
        else:
            records = eng.store.list_keys()
    if args.json:
        emit([asdict(r) for r in records])
    for r in [] if args.json else records:
        state = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "live"
        print(f"{r.id:>4}  {r.prefix}...  {r.role:<7} {state:<24} {r.created_at:%Y-%m-%d %H:%M}  {r.note}")
    return EXIT_OK


def cmd_delete_speaker(args: argparse.Namespace) -> int:
    from engine.errors import InvalidInput

    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInput("delete-speaker erases data for good: pass --yes")
        if input(f"erase everything stored about {args.speaker!r}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing erased", file=sys.stderr)
            return EXIT_NEGATIVE
    with open_engine(args) as eng:
        result = eng.erase_speaker(args.speaker)
    if args.json:
        emit({"ok": True, **result})
    else:
        print(
            f"erased {result['speaker']}: {result['utterances']} utterance(s), {result['embeddings']} embedding(s), "
            f"{result['centroids']} profile(s)"
        )
        if result["trained_into"]:
            print(
                f"versions {result['trained_into']} were fine-tuned on some of this speaker's audio; their weights "
                "are unchanged (roll back past them and refresh again to remove that too)",
                file=sys.stderr,
            )
    return EXIT_OK


def cmd_openapi(args: argparse.Namespace) -> int:
    from service import create_app

    print(json.dumps(create_app(args.home, args.db).openapi(), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from engine import scheduler

    _, db = _home_and_db(args)
    with open_engine(args) as eng:
        status = eng.status()
    status["schedule"] = scheduler.list_schedule(db)
    if args.json:
        emit(status)
        return EXIT_OK
    print(f"active version      {status['active_version']}")
    print(f"new utterances      {status['pending_utterances']} (enrolled since the active version was trained)")
    print(f"held for review     {status['held_for_review']} (voiceprint pending)")
    cal = status["calibration"]
    if cal is None:
        print("calibration         none: cosine decides (run voiceprint calibrate)")
    else:
        print(
            f"calibration         {cal['created_at'][:19]} on {cal['speakers_then']} speakers "
            f"({cal['speakers_now']} enrolled now; calibrate again when that grows a lot)"
        )
    print(f"queued requests     {status['queued']}")
    running = status["running_job"]
    print(f"running job         {'-' if not running else _job_line(running)}")
    last = status["last_job"]
    print(f"last job            {'-' if not last else _job_line(last)}")
    for job in status["schedule"] or [{"id": "-", "next_run": "no schedule"}]:
        print(f"next run            {job['next_run']}  ({job['id']})")
    return EXIT_OK


def _job_line(job: dict) -> str:
    when = job["finished_at"] or job["started_at"] or job["requested_at"]
    version = f" -> v{job['version']}" if job["version"] else ""
    return f"#{job['id']} {job['kind']} {job['status']}{version} at {when} ({job['reason']})"


def cmd_db(args: argparse.Namespace) -> int:
    from engine.engine import ensure_sqlite_folder
    from storage import Store

    _, url = _home_and_db(args)
    ensure_sqlite_folder(url)
    store = Store(url)
    try:
        if args.action == "upgrade":
            store.upgrade()
        doc = {"db": str(store.url), "revision": store.current_revision(), "head": store.head_revision()}
    finally:
        store.close()
    if args.json:
        emit(doc)
    else:
        print(f"{doc['db']}: revision {doc['revision'] or '(empty)'}, newest {doc['head']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
