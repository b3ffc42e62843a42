"""Live audio over WebSocket: enroll, identify and verify while a person speaks.

The protocol (README, "Live audio"): the client's first message is JSON text,
``{"type": "start", "rate": 16000, "format": "s16le"}`` (and ``"key"`` when the upgrade
request carried none in a header; a key in the URL is refused, as URLs land in logs);
then binary frames of mono PCM in that format, of any size; then ``{"type": "end"}``.
The server answers with JSON events and, after the last, closes with 1000, or with
4000 + the HTTP status an upload would have got: 4400 malformed, 4401 no valid key,
4403 role, 4404 unknown speaker, 4408 idle or too long, 4413 too much audio, 4422 bad
audio, 4503 too many sessions.

Nothing is stored before the end. The session's audio then becomes the WAV file a client
could have uploaded (:meth:`voiceprint.engine.live.LiveAudio.wav`), and that file takes
the upload's own engine call, so a streamed enrollment stores what the upload stores,
and a client that disconnects before the end leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict

from fastapi import APIRouter, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from voiceprint.engine import errors
from voiceprint.engine.config import Config
from voiceprint.engine.events import ACCESS, logfmt
from voiceprint.engine.live import LiveAudio
from voiceprint.engine.names import check_speaker_name
from voiceprint.service.keys import allows
from voiceprint.service.routes import infer
from voiceprint.service.statuses import SAFE_MESSAGES, status_of

log = logging.getLogger(__name__)
router = APIRouter()

DETECT_EVERY_S = 0.25  # received audio between two VAD passes (and progress events)
START_KEYS = {"type", "rate", "format", "key"}
_URL_SECRETS = ("key", "api_key", "apikey", "token", "access_token")


def next_time(speech_s: float, every: float) -> float:
    """When the next look at the whole audio so far is due: ``every`` more seconds of speech,
    and at least a quarter more than now. Each look reads everything again, so the
    quarter keeps a long session's total at about five readings of its audio.

    >>> [round(next_time(s, 1.0), 2) for s in (1.0, 3.0, 4.0, 10.0, 60.0)]
    [2.0, 4.0, 5.0, 12.5, 75.0]
    """
    return max((speech_s // every + 1) * every, speech_s * 1.25)


class Closing(Exception):
    """Ends a session with an error event and the close code 4000 + ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Session:
    """One WebSocket session: its key, its audio and how it sends."""

    def __init__(self, ws: WebSocket, config: Config) -> None:
        self.ws, self.config = ws, config
        self.live: LiveAudio | None = None
        self.key = None
        self.started = time.monotonic()
        self._send_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()

    def spawn(self, work) -> asyncio.Task:
        """Run ``work`` beside the session (a partial answer, a consistency check)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()

    async def send(self, doc: dict) -> None:
        async with self._send_lock:  # a partial answer and the main loop may both send
            await self.ws.send_text(json.dumps(doc))

    async def receive(self) -> dict:
        """The next message; Closing(408) when the client is idle too long or the session
        has run its ``max_session_s``."""
        cfg = self.config.live
        left = cfg.max_session_s - (time.monotonic() - self.started)
        if left <= 0:
            raise Closing(408, "session_too_long", f"a session lasts at most {cfg.max_session_s:g} s")
        try:
            return await asyncio.wait_for(self.ws.receive(), min(cfg.idle_timeout_s, left))
        except TimeoutError:
            if left <= cfg.idle_timeout_s:
                raise Closing(408, "session_too_long", f"a session lasts at most {cfg.max_session_s:g} s") from None
            raise Closing(408, "idle", f"no message for {cfg.idle_timeout_s:g} s") from None


class Enrolling:
    """Enrollment: progress toward ``[enrollment] required_speech_s`` for the profile (what is
    stored plus the speech so far), with feedback; ends on its own when it reaches 100 %."""

    role, extra = "enroll", {"force"}

    def __init__(self, speaker: str) -> None:
        self.speaker = speaker
        self.force = False
        self.profile_s = 0.0
        self.has_profile = False
        self.check_at = 0.0  # speech after which the next consistency check runs (set by begin)
        self.consistency = "OK"
        self.checking: asyncio.Task | None = None
        self.shown_s = 0.0  # the most speech a progress event has reported

    async def begin(self, s: Session, start: dict) -> dict:
        self.speaker = check_speaker_name(self.speaker)  # InvalidInput: closed with 4400, as every engine error
        self.force = start.get("force", False)
        if not isinstance(self.force, bool):
            raise errors.MalformedStream("force must be true or false")
        if self.force and not allows(s.key, "admin"):
            raise Closing(403, "forbidden", f"force needs an admin key; this key has the {s.key.role} role")
        self.check_at = s.config.live.check_every_s  # a second of speech says little about who speaks
        engine = s.ws.app.state.engine
        try:
            summary = await infer(s.ws, engine.speaker, self.speaker)
            self.profile_s, self.has_profile = summary.speech_s, summary.utterances > 0
        except errors.UnknownSpeaker:
            pass
        return {"speaker": self.speaker, "required_speech_s": s.config.enrollment.required_speech_s,
                "profile_speech_s": round(self.profile_s, 3)}

    async def update(self, s: Session, speech_s: float) -> bool:
        rules = s.config.enrollment
        # The cut's padding at a segment's open end can shrink by a few frames once the
        # pause after it is heard: what a person was shown never goes back.
        self.shown_s = max(speech_s, self.shown_s)
        progress = min(1.0, (self.profile_s + self.shown_s) / rules.required_speech_s)
        feedback = s.live.feedback(rules)
        if self.has_profile and not self.force and speech_s >= s.config.audio.min_speech_s:
            if self.checking is None and speech_s >= self.check_at:
                self.check_at = next_time(speech_s, s.config.live.check_every_s)
                self.checking = s.spawn(self._check(s, s.live.wav()))
        if feedback == "OK":
            feedback = self.consistency
        await s.send({"event": "progress", "progress": round(progress, 4), "speech_s": round(self.shown_s, 3),
                      "received_s": round(s.live.received_s, 3), "feedback": feedback})
        # A profile that was complete before the session started does not end it: the
        # client, adding more speech, says when it is done.
        return self.profile_s < rules.required_speech_s <= self.profile_s + speech_s and speech_s >= s.config.audio.min_speech_s

    async def _check(self, s: Session, wav: bytes) -> None:
        try:
            self.consistency = await infer(s.ws, s.ws.app.state.engine.preview_enrollment, self.speaker, wav, name="live")
        except errors.VoiceprintError:
            pass  # the quality feedback already says what is wrong with the audio so far
        finally:
            self.checking = None

    async def finish(self, s: Session, wav: bytes) -> dict:
        s.cancel_background()
        outcomes = s.ws.app.state.metrics.enrollments
        try:
            result = await infer(s.ws, s.ws.app.state.engine.enroll, self.speaker, wav, name="live",
                                 force=self.force, by=f"key:{s.key.id}")
        except errors.VoiceprintError as exc:
            outcomes.labels(exc.code).inc()
            raise
        outcomes.labels(result.feedback).inc()
        return {"result": asdict(result)}


class Answering:
    """Identify or verify: a running answer each ``[live] partial_every_s`` of speech (none
    while the previous is still being computed), and the final one at the end."""

    extra: set[str]

    def __init__(self) -> None:
        self.next_at = 0.0
        self.answering: asyncio.Task | None = None

    async def update(self, s: Session, speech_s: float) -> bool:
        every = s.config.live.partial_every_s
        # The whole audio so far is read again for each answer; none is started while one
        # is being computed, so a fast sender gets fewer of them, never a queue.
        if self.answering is None and speech_s >= max(self.next_at, s.config.audio.min_speech_s):
            self.next_at = next_time(speech_s, every)
            self.answering = s.spawn(self._partial(s, s.live.wav(), speech_s))
        return False

    async def _partial(self, s: Session, wav: bytes, speech_s: float) -> None:
        try:
            answer = await infer(s.ws, self.answer, s, wav)
            await s.send({"event": "partial", "speech_s": round(speech_s, 3), "result": asdict(answer)})
        except errors.VoiceprintError:
            pass  # too little speech by the file path's measure yet: the next one may do
        finally:
            self.answering = None

    async def finish(self, s: Session, wav: bytes) -> dict:
        s.cancel_background()
        answer = await infer(s.ws, self.answer, s, wav)
        self.count(s, answer)
        return {"result": asdict(answer)}


class Identifying(Answering):
    role, extra = "query", {"top"}

    async def begin(self, s: Session, start: dict) -> dict:
        most = s.config.service.max_top
        self.top = start.get("top", min(5, most))
        if not isinstance(self.top, int) or isinstance(self.top, bool) or not 1 <= self.top <= most:
            raise errors.MalformedStream(f"top must be a whole number from 1 to {most} ([service] max_top)")
        return {}

    def answer(self, s: Session, wav: bytes):
        return s.ws.app.state.engine.identify(wav, top=self.top, name="live")

    def count(self, s: Session, answer) -> None:
        s.ws.app.state.metrics.decisions.labels("identify", "known" if answer.decision else "unknown").inc()


class Verifying(Answering):
    role, extra = "query", set()

    def __init__(self, speaker: str) -> None:
        super().__init__()
        self.speaker = speaker

    async def begin(self, s: Session, start: dict) -> dict:
        self.disclose = allows(s.key, "admin")  # as POST /v1/verify: a query key gets the decision alone
        return {"speaker": self.speaker}

    def answer(self, s: Session, wav: bytes):
        return s.ws.app.state.engine.verify(self.speaker, wav, name="live", disclose=self.disclose)

    def count(self, s: Session, answer) -> None:
        s.ws.app.state.metrics.decisions.labels("verify", "accepted" if answer.accepted else "rejected").inc()


@router.websocket("/v1/stream/enroll/{speaker}")
async def stream_enroll(ws: WebSocket, speaker: str) -> None:
    await run_session(ws, "/v1/stream/enroll/{speaker}", Enrolling(speaker))


@router.websocket("/v1/stream/identify")
async def stream_identify(ws: WebSocket) -> None:
    await run_session(ws, "/v1/stream/identify", Identifying())


@router.websocket("/v1/stream/verify/{speaker}")
async def stream_verify(ws: WebSocket, speaker: str) -> None:
    await run_session(ws, "/v1/stream/verify/{speaker}", Verifying(speaker))


async def run_session(ws: WebSocket, route: str, task) -> None:
    """Accept, authenticate, collect the audio with running feedback, answer, close."""
    app = ws.app
    s = Session(ws, app.state.engine.config)
    outcome, close_code = "disconnect", None  # a client that leaves sends (or skips) its own close
    await ws.accept()
    app.state.live_sessions += 1
    try:
        try:
            await _collect(s, task, app)
            final = await task.finish(s, s.live.wav())
            await s.send({"event": "result", **final})
            outcome, close_code = "result", 1000
            await ws.close(1000)
        except errors.VoiceprintError as exc:
            status = status_of(exc)
            message = SAFE_MESSAGES.get(status, SAFE_MESSAGES[500]) if status >= 500 else str(exc)
            if status >= 500:
                log.error("%s on WS %s: %s", exc.code, route, exc)
            raise Closing(status, exc.code, message) from None
    except (_Disconnected, WebSocketDisconnect):
        pass  # the client left before the end: nothing was stored
    except Closing as exc:
        outcome, close_code = exc.code, 4000 + exc.status
        await _close(s, close_code, exc.code, str(exc))
    except (asyncio.CancelledError, RuntimeError, OSError) as exc:
        # The client went away (a send or receive on a closed socket): nothing was stored.
        if not _gone(ws):
            log.exception("live session on %s failed", route)
            outcome, close_code = "internal_error", 1011
            await _close(s, 1011, "internal_error", "internal error; the server log has the details")
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        s.cancel_background()
        app.state.live_sessions -= 1
        app.state.metrics.live_sessions.labels(route, outcome).inc()
        key = s.key
        ACCESS.info(logfmt(method="WS", route=route, status=close_code, outcome=outcome,
                           ms=round((time.monotonic() - s.started) * 1000, 1), audio_s=round(s.live.received_s, 2) if s.live else 0,
                           key=key.id if key else None, role=key.role if key else None))


class _Disconnected(Exception):
    pass


async def _collect(s: Session, task, app) -> None:
    """Everything before the final answer: limits, the start message, the frames."""
    ws, cfg = s.ws, s.config
    if app.state.live_sessions > cfg.live.max_sessions:
        raise Closing(503, "busy", f"this server holds {cfg.live.max_sessions} live sessions ([live] max_sessions); try again later")
    if any(name in ws.query_params for name in _URL_SECRETS):
        raise Closing(400, "key_in_url", "never put an API key in a URL (URLs land in logs): send it in a header or the start message")
    start = await _start_message(s, task)
    secret = _header_key(ws) or start.get("key")
    if secret is not None and not isinstance(secret, str):
        raise errors.MalformedStream("key must be a string")
    s.key = await run_in_threadpool(app.state.engine.authenticate, secret)  # a database read: off the event loop
    if s.key is None:
        raise Closing(401, "unauthorized", "a valid API key is required (a header, or \"key\" in the start message)")
    if not allows(s.key, task.role):
        raise Closing(403, "forbidden", f"this key has the {s.key.role} role; this stream needs {task.role}")
    s.live = LiveAudio(start["rate"], start.get("format", "s16le"), cfg.audio, max_bytes=cfg.live.max_session_bytes)
    ready = await task.begin(s, start)
    await s.send({"event": "ready", "rate": s.live.rate, "format": s.live.format, "max_bytes": s.live.max_bytes, **ready})
    detected_at = 0.0
    while True:
        message = await s.receive()
        if message["type"] == "websocket.disconnect":
            raise _Disconnected
        if message.get("bytes") is not None:
            s.live.add(message["bytes"])
            if s.live.received_s - detected_at < DETECT_EVERY_S:
                continue
            detected_at = s.live.received_s
            await infer(ws, s.live.detect)
            if await task.update(s, s.live.speech_s()):
                return  # enrollment reached 100 %
        else:
            doc = _json(message.get("text"))
            if doc.get("type") != "end" or len(doc) != 1:
                raise errors.MalformedStream('after the start message, send PCM frames and then {"type": "end"}')
            return


async def _start_message(s: Session, task) -> dict:
    message = await s.receive()
    if message["type"] == "websocket.disconnect":
        raise _Disconnected
    if message.get("text") is None:
        raise errors.MalformedStream('the first message is the JSON start message, e.g. {"type": "start", "rate": 16000, "format": "s16le"}')
    start = _json(message["text"])
    allowed = START_KEYS | task.extra
    if start.get("type") != "start" or "rate" not in start or set(start) - allowed:
        raise errors.MalformedStream(f'the start message is {{"type": "start", "rate": ...}} with any of {sorted(allowed - {"type", "rate"})}')
    return start


def _json(text: str | None) -> dict:
    try:
        doc = json.loads(text or "")
    except ValueError:
        raise errors.MalformedStream("a text message must be JSON") from None
    if not isinstance(doc, dict):
        raise errors.MalformedStream("a text message must be a JSON object")
    return doc


def _header_key(ws: WebSocket) -> str | None:
    bearer = ws.headers.get("authorization", "")
    if bearer.lower().startswith("bearer "):
        return bearer[7:].strip()
    return ws.headers.get("x-api-key")


def _gone(ws: WebSocket) -> bool:
    return ws.client_state == WebSocketState.DISCONNECTED or ws.application_state == WebSocketState.DISCONNECTED


async def _close(s: Session, code: int, error: str, message: str) -> None:
    """The error event, then the close frame (its reason cut to the 123 bytes a frame allows)."""
    if _gone(s.ws):
        return
    try:
        await s.send({"event": "error", "error": error, "message": message})
        await s.ws.close(code, error.encode()[:123].decode(errors="ignore"))
    except (RuntimeError, OSError, WebSocketDisconnect):
        pass  # the client left meanwhile
