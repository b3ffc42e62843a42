"""The HTTP API's app factory: one :class:`voiceprint.engine.Engine` per process, its job worker,
the size limits, the request metrics and the error handlers.

The routes are in :mod:`voiceprint.service.routes`, the worker that runs refreshes in
:mod:`voiceprint.service.worker`. Several processes may share one PostgreSQL database: enrollments
lock their speaker's row, and a refresh holds a database-wide lock, so only one process
refreshes at a time.

Errors are JSON ``{"error": code, "message": text}`` with a 4xx status for anything a
client sent; see :data:`voiceprint.service.statuses.STATUS_OF`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from voiceprint.engine import errors
from voiceprint.engine.config import Config
from voiceprint.engine.events import ACCESS, event, logfmt
from voiceprint.engine.home import load_home_config, resolve_db, resolve_home
from voiceprint.service.metrics import Metrics
from voiceprint.service.live import router as live_router
from voiceprint.service.model_routes import router as model_router
from voiceprint.service.routes import DIARIZE_JOBS, ApiError, router
from voiceprint.service.statuses import SAFE_MESSAGES, status_of
from voiceprint.service.uploads import DiarizationRunner
from voiceprint.service.worker import JobWorker, recover_jobs

log = logging.getLogger(__name__)

API_TITLE = "voiceprint"
DOCS_ASSETS = "/docs-assets"  # where /docs and /redoc load their scripts and styles from
MAX_HEADER_BYTES = 16 * 1024

class SizeLimits:
    """Refuse headers over :data:`MAX_HEADER_BYTES` (431) and bodies over ``max_bytes``
    (413): at once when Content-Length says so, else as soon as a streamed (chunked)
    body passes the limit. uvicorn's own header limit only applies to headers that
    arrive in pieces. ``larger`` names paths with a limit of their own (the long
    uploads, which go to disk, not memory)."""

    def __init__(self, app: Any, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes, self.larger = app, max_bytes, larger or {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            response = _error(431, "headers_too_large", f"request headers are limited to {MAX_HEADER_BYTES} bytes")
            return await response(scope, receive, send)
        most = self.larger.get(scope.get("path", ""), self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > most):
            response = _error(413, "request_too_large", f"request bodies are limited to {most} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > most:
                raise ApiError(413, "request_too_large", f"request bodies are limited to {most} bytes")
            return message

        await self.app(scope, limited, send)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def service_config(config: Config, home: Path) -> Config:
    """The engine's configuration as the service runs it: the upload limit
    (``[service] max_audio_s``) tightens the engine's own audio limit, and the home's
    ``uploads`` folder (long uploads for diarization, written by the service itself) is
    one of the ``[audio] roots`` when any are set."""
    limit = min(config.audio.max_duration_s, config.service.max_audio_s)
    roots = config.audio.roots
    if roots.strip():
        roots = os.pathsep.join([roots, str(home / "uploads")])
    return dataclasses.replace(config, audio=dataclasses.replace(config.audio, max_duration_s=limit, roots=roots))


def create_app(home: str | None = None, db: str | None = None, *, background: bool = True) -> FastAPI:
    """The service over the voiceprint home ``home`` and database ``db``.

    The engine is opened when the app starts (its lifespan), so building the app (e.g. to
    print the OpenAPI schema) touches nothing. ``background=False`` runs no job worker
    (queued refreshes and the schedule then wait for another process).
    """
    home_path = resolve_home(home)
    url = resolve_db(db, home_path)
    config = service_config(load_home_config(home_path), home_path)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from voiceprint.engine import Engine

        engine = await run_in_threadpool(lambda: Engine.open(home_path, url, config=config))
        app.state.engine = engine
        metrics.track_active_version(lambda: engine.active_version().number)
        worker = JobWorker(engine, str(home_path), url, config.service.refresh_check_s, metrics) if background else None
        app.state.worker = worker
        if worker is not None:
            await run_in_threadpool(recover_jobs, engine)
            worker.start()
        await run_in_threadpool(engine.recover_diarization_jobs)
        runner = app.state.diarize = DiarizationRunner(engine, config.service.diarize_threads)
        runner.start()
        # The active version's index is built now rather than by the first identify, which
        # would wait for it (minutes at a million speakers, with every cohort statistic).
        threading.Thread(target=_warm_index, args=(engine,), name="index-warm", daemon=True).start()
        event("server_started", pid=os.getpid(), active_version=engine.active_version().number, job_worker=worker is not None)
        try:
            yield
        finally:
            runner.stop()
            if worker is not None:
                worker.stop()
            engine.close()
            event("server_stopped", pid=os.getpid())

    app = FastAPI(
        title=API_TITLE,
        version="1",
        description="Incremental speaker recognition: enroll, identify (1:N), verify (1:1), refresh and roll back.",
        lifespan=lifespan,
        docs_url=None,  # served by _add_docs from installed files instead of a CDN
        redoc_url=None,
    )
    app.state.metrics = metrics
    app.state.db = url  # the unmasked URL, for the stored schedule that GET /v1/status lists
    app.add_middleware(SizeLimits, max_bytes=config.service.max_request_bytes,
                       larger={DIARIZE_JOBS: config.service.max_upload_bytes})
    _add_error_handlers(app)
    _add_request_metrics(app, metrics)
    app.include_router(router)
    app.include_router(model_router)
    app.include_router(live_router)
    app.state.live_sessions = 0
    _add_docs(app)
    _add_console(app)
    return app


CONSOLE = Path(__file__).resolve().parent / "console"  # the web console's files, shipped in the package


def _add_console(app: FastAPI) -> None:
    """The web console at /console: static, framework-free files (no CDN, works offline)
    that call the same HTTP and WebSocket routes with the key a person logs in with."""

    @app.get("/console", include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse("/console/")  # relative links in the page need the slash

    app.mount("/console", StaticFiles(directory=CONSOLE, html=True), name="console")


def _add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts and styles served from the
    fastapi-offline package (FastAPI's "self-hosting JavaScript and CSS for docs"), so
    they work on a host that cannot reach a CDN."""
    spec = importlib.util.find_spec("fastapi_offline")  # the files only: nothing is imported
    app.mount(DOCS_ASSETS, StaticFiles(directory=Path(spec.submodule_search_locations[0]) / "static"), name="docs-assets")
    favicon = f"{DOCS_ASSETS}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{API_TITLE} - Swagger UI", swagger_favicon_url=favicon,
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_ui_parameters={"validatorUrl": None},  # else the page asks validator.swagger.io about the schema
        )

    @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url, title=f"{API_TITLE} - ReDoc", redoc_favicon_url=favicon,
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js", with_google_fonts=False,
        )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.VoiceprintError)
    async def engine_error(request: Request, exc: errors.VoiceprintError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            # A server-side failure's text names database URLs and file paths: it goes to
            # the log, and the client gets the code and a message that names nothing.
            route = getattr(request.scope.get("route"), "path", "unmatched")  # a template: no names
            log.error("%s on %s %s: %s", exc.code, request.method, route, exc)
            return _error(status, exc.code, SAFE_MESSAGES.get(status, SAFE_MESSAGES[500]))
        return _error(status, exc.code, str(exc))

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
        route = getattr(request.scope.get("route"), "path", "unmatched")  # a template: no names
        log.exception("unhandled error on %s %s", request.method, route)
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
            elapsed = time.perf_counter() - started
            metrics.requests.labels(label, request.method, str(status)).inc()
            metrics.latency.labels(label, request.method).observe(elapsed)
            key = getattr(request.state, "key", None)  # set by routes.require once a key is accepted
            ACCESS.info(logfmt(method=request.method, route=label, status=status, ms=round(elapsed * 1000, 1),
                               key=key.id if key else None, role=key.role if key else None))


def _warm_index(engine) -> None:
    try:
        engine.index_status()
    except Exception as exc:  # the server may be stopping, or the store down: the first identify builds it
        log.info("the index was not built at start: %s", exc)
