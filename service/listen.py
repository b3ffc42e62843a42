"""The live-audio client: streams a file, or raw PCM from stdin (a microphone through
``arecord`` or ``sox``), to a server's WebSocket routes and hands back its events.
``voiceprint listen`` runs it; the protocol is in :mod:`voiceprint.service.live`.

The key travels in the upgrade request's ``Authorization`` header, never in the URL.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import numpy as np
import soundfile as sf
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect

FRAME_S = 0.1  # audio per binary frame sent

ROUTES = {"enroll": "/v1/stream/enroll/{speaker}", "identify": "/v1/stream/identify", "verify": "/v1/stream/verify/{speaker}"}


def file_frames(path: str | Path) -> tuple[int, Iterator[bytes]]:
    """An audio file's sample rate and its 16-bit mono PCM (channels averaged), a frame at a time."""
    rate = sf.info(str(path)).samplerate

    def frames() -> Iterator[bytes]:
        for block in sf.blocks(str(path), blocksize=max(1, int(rate * FRAME_S)), dtype="int16", always_2d=True):
            mono = block[:, 0] if block.shape[1] == 1 else np.round(block.mean(axis=1)).astype(np.int16)
            yield mono.astype("<i2").tobytes()

    return rate, frames()


def raw_frames(stream: BinaryIO, rate: int, width: int = 2) -> Iterator[bytes]:
    """Raw PCM from a pipe, as it arrives (about ``FRAME_S`` at a time)."""
    size = max(width, int(rate * FRAME_S) * width)
    while chunk := stream.read(size):
        yield chunk


def stream(
    url: str, task: str, key: str, frames: Iterable[bytes], rate: int, *, speaker: str | None = None,
    fmt: str = "s16le", options: dict | None = None, pace: float = 1.0, on_event: Callable[[dict], None] = lambda e: None,
) -> tuple[dict, int]:
    """Stream ``frames`` to ``url`` (``ws://host:port``) for ``task`` (enroll, identify or
    verify); returns the last event (``result`` or ``error``) and the close code.

    ``pace`` 1 sends in real time (what a microphone does), 2 twice as fast, 0 as fast as
    the socket takes it. Sending stops early when the server ends the session (an
    enrollment that reached 100 %).
    """
    route = ROUTES[task].format(speaker=quote(speaker or "", safe=""))
    events: list[dict] = []
    done = threading.Event()
    with ExitStack() as opened:
        try:
            ws = opened.enter_context(connect(url.rstrip("/") + route, additional_headers={"Authorization": f"Bearer {key}"},
                                              open_timeout=30, close_timeout=10))
        except (OSError, InvalidHandshake) as exc:
            raise ConnectionError(f"cannot open {url}{route}: {exc}") from None

        def receive() -> None:
            try:
                for message in ws:
                    event = json.loads(message)
                    events.append(event)
                    on_event(event)
            except ConnectionClosed:
                pass
            finally:
                done.set()

        reader = threading.Thread(target=receive, name="listen-events", daemon=True)
        reader.start()
        try:
            ws.send(json.dumps({"type": "start", "rate": rate, "format": fmt, **(options or {})}))
            started, sent = time.monotonic(), 0
            width = 2 if fmt == "s16le" else 4
            for frame in frames:
                if done.is_set():
                    break
                ws.send(frame)
                sent += len(frame)
                if pace > 0:
                    time.sleep(max(0.0, started + sent / width / rate / pace - time.monotonic()))
            if not done.is_set():
                ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass  # the server closed first; its events say why
        reader.join()
        code = ws.close_code if ws.close_code is not None else 1006
    final = next((e for e in reversed(events) if e.get("event") in ("result", "error")), {})
    return final, code


def main_of(args) -> tuple[dict, int]:
    """What ``voiceprint listen`` runs: the frames of ``args.source`` (a file, or ``-``: raw
    16-bit PCM at ``--rate`` on stdin) streamed with events printed as they come."""
    if args.source == "-":
        rate, frames = args.rate, raw_frames(sys.stdin.buffer, args.rate)
    else:
        rate, frames = file_frames(args.source)
    options = {"force": True} if getattr(args, "force", False) else {}
    if args.task == "identify":
        options["top"] = args.top
    printer = _json_line if args.json else _text_line
    return stream(args.url, args.task, args.key, frames, rate, speaker=getattr(args, "speaker", None),
                  options=options, pace=args.pace, on_event=printer)


def _json_line(event: dict) -> None:
    print(json.dumps(event), flush=True)


def _text_line(event: dict) -> None:
    kind = event.get("event")
    if kind == "progress":
        print(f"progress {event['progress']:>4.0%}  speech {event['speech_s']:5.1f} s  {event['feedback']}",
              file=sys.stderr, flush=True)
    elif kind == "partial":
        print(f"after {event['speech_s']:.1f} s of speech: {_summary(event['result'])}", file=sys.stderr, flush=True)
    elif kind == "result":
        print(_summary(event["result"]), flush=True)
    elif kind == "error":
        print(f"voiceprint listen: {event['error']}: {event['message']}", file=sys.stderr, flush=True)


def _summary(result: dict) -> str:
    if "candidates" in result:
        best = ", ".join(f"{c['speaker']} {c['score']:.3f}" for c in result["candidates"][:3])
        return f"decision: {result['decision'] or 'unknown'}  ({best})"
    if "accepted" in result:
        score = "" if result["score"] is None else f"  cosine {result['score']:.3f}"
        return f"{'accept' if result['accepted'] else 'reject'} {result['speaker']}{score}"
    return (f"{result['feedback']}: utterance {result['utterance_id']} of {result['speaker']}, speech "
            f"{result['speech_s']:.2f} s, profile {result['profile_speech_s']:.1f} s ({result['progress']:.0%})")
