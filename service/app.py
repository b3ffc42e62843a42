"""The HTTP API: FastAPI routes over one :class:`engine.Engine` per process.

Speech work (decoding, VAD, the encoder) and database calls run in Starlette's thread
pool, so the event loop keeps accepting requests while they run. Refreshes run in a
background thread of their own: ``POST /v1/refresh`` queues a job and wakes it, and the
stored schedule (``voiceprint schedule``) runs beside it. Several processes may share
one PostgreSQL database: enrollments lock their speaker's row, and a refresh holds a
database-wide lock, so only one process refreshes at a time.

Errors are JSON ``{"error": code, "message": text}`` with a 4xx status for anything a
client sent; see :data:`STATUS_OF`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import torch

from engine import errors
from engine.config import load_config
from engine.engine import CONFIG_FILE, EnrollmentResult, Identification, Verification, job_dict, resolve_db, resolve_home
from service.keys import allows, authenticate
from service.metrics import Metrics

log = logging.getLogger(__name__)

API_TITLE = "voiceprint"
AUDIO_TYPES = ("audio/", "application/octet-stream")
MAX_HEADER_BYTES = 16 * 1024

# The HTTP status of each error the engine raises on purpose (most specific class first).
STATUS_OF: tuple[tuple[type[errors.VoiceprintError], int], ...] = (
    (errors.TooLong, 413),
    (errors.PathNotAllowed, 403),
    (errors.AudioError, 422),
    (errors.UnknownSpeaker, 404),
    (errors.UnknownVersion, 404),
    (errors.DuplicateUtterance, 409),
    (errors.RefreshBusy, 409),
    (errors.NotEnoughData, 409),
    (errors.InvalidInput, 400),
    (errors.CheckpointError, 500),
    (errors.StorageError, 503),
    (errors.VoiceprintError, 400),
)


class ApiError(Exception):
    """An error of the HTTP layer itself (authentication, size, media type)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


class ErrorBody(BaseModel):
    error: str
    message: str


class SizeLimits:
    """Refuse headers over :data:`MAX_HEADER_BYTES` (431) and bodies over ``max_bytes``
    (413): at once when Content-Length says so, else as soon as a streamed (chunked)
    body passes the limit. uvicorn's own header limit only applies to headers that
    arrive in pieces."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            response = _error(431, "headers_too_large", f"request headers are limited to {MAX_HEADER_BYTES} bytes")
            return await response(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = _error(413, "request_too_large", f"request bodies are limited to {self.max_bytes} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, "request_too_large", f"request bodies are limited to {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def status_of(exc: errors.VoiceprintError) -> int:
    return next(status for cls, status in STATUS_OF if isinstance(exc, cls))


# -- authentication --------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (voiceprint keys create)")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key in an X-API-Key header instead")


def require(role: str):
    """A dependency that lets the request through only with a live key allowed ``role``."""

    def check(
        request: Request,
        bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
        header: str | None = Depends(_header),
    ) -> None:
        key = authenticate(request.app.state.engine.store, bearer.credentials if bearer else header)
        if key is None:
            raise ApiError(401, "unauthorized", "a valid API key is required", {"WWW-Authenticate": "Bearer"})
        if not allows(key, role):
            raise ApiError(403, "forbidden", f"this key has the {key.role} role; this route needs {role}")
        request.state.key = key

    return Depends(check)


# -- request bodies --------------------------------------------------------------------

AUDIO_BODY = {
    "requestBody": {
        "required": True,
        "description": "an audio file (WAV, FLAC, OGG, MP3) as the body, or as the `file` field of a form",
        "content": {
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
            },
        },
    }
}


async def audio_body(request: Request) -> tuple[bytes, str]:
    """The uploaded audio and a name for it, from a raw body or a multipart form."""
    kind = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "invalid_input", "the form needs a `file` field holding the audio")
        return await upload.read(), f"upload:{upload.filename or 'file'}"
    if not kind.startswith(AUDIO_TYPES):
        raise ApiError(415, "unsupported_media_type", f"send audio/* or application/octet-stream or a multipart form, not {kind}")
    return await request.body(), "upload"


# -- the app ---------------------------------------------------------------------------

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 415, 422)}


def create_app(home: str | None = None, db: str | None = None, *, background: bool = True) -> FastAPI:
    """The service over the voiceprint home ``home`` and database ``db``.

    The engine is opened when the app starts (its lifespan), so building the app (e.g. to
    print the OpenAPI schema) touches nothing. ``background=False`` runs neither the
    scheduler nor the refresh worker (queued refreshes then wait for another process).
    """
    home_path = resolve_home(home)
    url = resolve_db(db, home_path)
    limits = load_config(home_path / CONFIG_FILE).service
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from engine import Engine

        engine = await run_in_threadpool(Engine.open, home_path, url)
        cfg = engine.config
        # The service's upload limit tightens the engine's own audio limit.
        engine.config = dataclasses.replace(
            cfg, audio=dataclasses.replace(cfg.audio, max_duration_s=min(cfg.audio.max_duration_s, cfg.service.max_audio_s))
        )
        app.state.engine = engine
        metrics.track_active_version(lambda: engine.active_version().number)
        worker = RefreshWorker(engine.store, str(home_path), url, cfg.service.refresh_check_s, metrics) if background else None
        app.state.worker = worker
        if worker is not None:
            await run_in_threadpool(recover_jobs, engine)
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
            engine.close()

    app = FastAPI(
        title=API_TITLE,
        version="1",
        description="Incremental speaker recognition: enroll, identify (1:N), verify (1:1), refresh and roll back.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.add_middleware(SizeLimits, max_bytes=limits.max_request_bytes)
    _add_error_handlers(app)
    _add_request_metrics(app, metrics)
    _add_routes(app)
    return app


def recover_jobs(engine) -> None:
    """Mark jobs a killed process left running as failed, unless a live process holds
    the refresh lock (then its running job is real)."""
    try:
        with engine.store.exclusive("refresh"):
            for job in engine.store.recover_interrupted_jobs():
                log.warning("job %d (%s) was interrupted by a stopped process: marked failed", job.id, job.kind)
    except errors.RefreshBusy:
        pass


class RefreshWorker:
    """Runs queued refreshes (``POST /v1/refresh``) and the stored schedule, off the event loop."""

    def __init__(self, store, home: str, db: str, check_s: float, metrics: Metrics) -> None:
        self.store, self.home, self.db, self.check_s, self.metrics = store, home, db, check_s, metrics
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, name="voiceprint-refresh", daemon=True),
            threading.Thread(target=self._schedule, name="voiceprint-scheduler", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        # A refresh in progress is not waited for: its job stays "running" and the next
        # process to start marks it failed, exactly as after a crash.
        self.stopping.set()
        self.wake.set()

    def _loop(self) -> None:
        from engine.scheduler import run_scheduled_refresh

        while not self.stopping.is_set():
            self.wake.wait(self.check_s)
            self.wake.clear()
            if self.stopping.is_set():
                break
            # Asked on the service's own store: run_scheduled_refresh opens an Engine (a new
            # connection pool) to refresh, too much to do every few seconds just to look.
            try:
                if not self.store.list_jobs(limit=1, status="queued"):
                    continue
            except errors.StorageError as exc:  # the database is away: look again next time
                log.warning("refresh worker: cannot read queued jobs: %s", exc)
                continue
            outcome = run_scheduled_refresh(self.home, self.db, None, "requested over HTTP")
            if outcome != "not due":  # "refreshed: promoted", "busy", "failed: why", ...
                label = "failed" if outcome.startswith("failed") else outcome.removeprefix("refreshed: ")
                self.metrics.refreshes.labels(label).inc()

    def _schedule(self) -> None:
        from engine import scheduler

        scheduler.run(self.db, self.stopping)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.VoiceprintError)
    async def engine_error(request: Request, exc: errors.VoiceprintError) -> JSONResponse:
        return _error(status_of(exc), exc.code, str(exc))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return _error(422, "invalid_request", where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "internal error; the server log has the details")


def _add_request_metrics(app: FastAPI, metrics: Metrics) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            # The route template, not the path: speaker names must not become label values.
            label = getattr(route, "path", "unmatched")
            metrics.requests.labels(label, request.method, str(status)).inc()
            metrics.latency.labels(label, request.method).observe(time.perf_counter() - started)


def _engine(request: Request):
    return request.app.state.engine


async def _infer(request: Request, fn, *args, **kwargs):
    """Run speech work in the thread pool, with ``[service] torch_threads`` PyTorch threads
    (a per-thread OpenMP setting, so it is set in the pool thread itself)."""
    threads = _engine(request).config.service.torch_threads

    def call():
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return fn(*args, **kwargs)

    return await run_in_threadpool(call)


def _add_routes(app: FastAPI) -> None:
    metrics: Metrics = app.state.metrics

    @app.get("/healthz", tags=["service"])
    def healthz(request: Request) -> dict:
        """Liveness and readiness: the database answers and a version is active."""
        return {"status": "ok", "active_version": _engine(request).active_version().number}

    @app.get("/metrics", tags=["service"], response_class=Response)
    def prometheus() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/speakers/{speaker}/utterances", tags=["enrollment"], status_code=201, response_model=EnrollmentResult,
        openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("enroll")],
    )
    async def enroll(request: Request, speaker: str, force: bool = False) -> EnrollmentResult:
        """Enroll one utterance of ``speaker`` (created on first use); returns the enrollment feedback.

        ``feedback`` is ``OK``, or ``INCONSISTENT_SPEAKER`` when the utterance was held for
        review. Audio that is too short, silent, clipped or noisy gets a 422 and nothing
        is stored. ``force`` skips the clipping, noise and consistency checks.
        """
        data, name = await audio_body(request)
        try:
            result = await _infer(request, _engine(request).enroll, speaker, data, name=name, force=force)
        except errors.VoiceprintError as exc:
            metrics.enrollments.labels(exc.code).inc()
            raise
        metrics.enrollments.labels(result.feedback).inc()
        return result

    @app.get("/v1/speakers", tags=["enrollment"], responses=ERRORS, dependencies=[require("enroll")])
    def speakers(request: Request) -> list[dict]:
        """Every enrolled speaker: utterances in the profile, speech seconds, held for review."""
        return [asdict(s) for s in _engine(request).speakers()]

    @app.get("/v1/speakers/{speaker}", tags=["enrollment"], responses=ERRORS, dependencies=[require("enroll")])
    def speaker(request: Request, speaker: str) -> dict:
        """One speaker's profile summary and the ids of utterances held for review."""
        engine = _engine(request)
        found = engine.store.speakers(name=speaker)
        if not found:
            raise errors.UnknownSpeaker(f"speaker {speaker!r} is not enrolled")
        held = [u.id for u in engine.store.utterances(speaker, status="pending")]
        return {**asdict(found[0]), "held_for_review": held}

    @app.delete("/v1/speakers/{speaker}", tags=["enrollment"], responses=ERRORS, dependencies=[require("admin")])
    def erase(request: Request, speaker: str) -> dict:
        """Erase everything stored about a speaker: audio or features, embeddings under every
        version, centroids, held utterances. The audit log keeps only that an erasure happened."""
        return _engine(request).erase_speaker(speaker, by=f"key:{request.state.key.id}")

    @app.post(
        "/v1/identify", tags=["recognition"], response_model=Identification,
        openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("query")],
    )
    async def identify(request: Request, top: int = 5) -> Identification:
        """Who is speaking (1:N, open set): candidates best first; ``decision`` is null for unknown."""
        data, name = await audio_body(request)
        result = await _infer(request, _engine(request).identify, data, top=top, name=name)
        metrics.decisions.labels("identify", "known" if result.decision else "unknown").inc()
        return result

    @app.post(
        "/v1/verify/{speaker}", tags=["recognition"], response_model=Verification,
        openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("query")],
    )
    async def verify(request: Request, speaker: str) -> Verification:
        """Is this ``speaker`` (1:1)? ``accepted`` with the scores behind it."""
        data, name = await audio_body(request)
        result = await _infer(request, _engine(request).verify, speaker, data, name=name)
        metrics.decisions.labels("verify", "accepted" if result.accepted else "rejected").inc()
        return result

    @app.post("/v1/refresh", tags=["models"], status_code=202, responses=ERRORS, dependencies=[require("admin")])
    def refresh(request: Request, reason: str = "requested over HTTP") -> dict:
        """Queue a refresh; poll ``GET /v1/jobs/{id}``. A job another refresh covered reads
        ``skipped`` with ``result.covered_by``."""
        job = _engine(request).request_refresh(reason[:200])
        worker = request.app.state.worker
        if worker is not None:
            worker.wake.set()
        return job_dict(job)

    @app.get("/v1/jobs/{job_id}", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
    def job(request: Request, job_id: int) -> dict:
        """A refresh or rollback job: queued, running, succeeded, rejected, failed or skipped."""
        try:
            return job_dict(_engine(request).store.get_job(job_id))
        except errors.InvalidInput as exc:
            raise ApiError(404, "unknown_job", str(exc)) from None

    @app.get("/v1/versions", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
    def versions(request: Request) -> list[dict]:
        """Every model version, with status, gate metrics and which one is active."""
        return [_version(v) for v in _engine(request).versions()]

    @app.post("/v1/versions/{number}/activate", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
    def activate(request: Request, number: int, reason: str = "rollback over HTTP") -> dict:
        """Make a kept version active again (rollback); utterances it lacks are embedded first."""
        return _engine(request).rollback(number, reason=reason[:200])


def _version(version) -> dict:
    out = asdict(version)
    out["created_at"] = version.created_at.isoformat()
    out.pop("config")  # large, and readable from the checkpoint's version in the CLI
    return out
