"""The HTTP routes: each one is a thin call into the app's :class:`voiceprint.engine.Engine`.

Speech work (decoding, VAD, the encoder) runs in Starlette's thread pool (:func:`infer`),
so the event loop keeps accepting requests while it runs; plain ``def`` routes (database
reads) run there anyway.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from voiceprint.engine import errors
from voiceprint.engine.bounds import MAX_ID
from voiceprint.engine.results import (
    Cluster, Diarization, EnrollmentResult, Identification, ProbeAnswer, UnlabeledResult, Verification, diarization_job_dict,
    utterance_dict,
)
from voiceprint.service.keys import GRANTS, allows
from voiceprint.service.uploads import receive_upload

router = APIRouter()


class ApiError(Exception):
    """An error of the HTTP layer itself (authentication, size, media type)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


class ErrorBody(BaseModel):
    error: str
    message: str


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 415, 422)}

# An id in a path: no stored id lies outside 1..MAX_ID, so any other number gets 422 here.
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


# -- authentication --------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (voiceprint keys create)")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key in an X-API-Key header instead")


def _live_key(request: Request, bearer: HTTPAuthorizationCredentials | None, header: str | None):
    """The live key the request carries (bearer or X-API-Key); 401 without one."""
    key = engine_of(request).authenticate(bearer.credentials if bearer else header)
    if key is None:
        raise ApiError(401, "unauthorized", "a valid API key is required", {"WWW-Authenticate": "Bearer"})
    return key


def require(role: str):
    """A dependency that lets the request through only with a live key allowed ``role``."""

    def check(
        request: Request,
        bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
        header: str | None = Depends(_header),
    ) -> None:
        key = _live_key(request, bearer, header)
        if not allows(key, role):
            raise ApiError(403, "forbidden", f"this key has the {key.role} role; this route needs {role}")
        request.state.key = key

    return Depends(check)


def any_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
    header: str | None = Depends(_header),
):
    """A dependency that lets the request through with any live key, whatever its role."""
    key = request.state.key = _live_key(request, bearer, header)
    return key


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
    """The uploaded audio and a name for it, from a raw body or a multipart form.

    Only a multipart form is told apart by its Content-Type. Otherwise the body is the
    audio whatever type it declares, or none: libsndfile tells the format from the bytes
    (FLAC sent as audio/wav is FLAC), and bytes it cannot decode are ``undecodable_audio`` (422).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "invalid_input", "the form needs a `file` field holding the audio")
        return await upload.read(), f"upload:{upload.filename or 'file'}"
    return await request.body(), "upload"


def _force_needs_admin(key, force: bool) -> None:
    """``force`` skips the consistency check, the one guard against a poisoned profile."""
    if force and not allows(key, "admin"):
        raise ApiError(403, "forbidden", f"force=true needs an admin key; this key has the {key.role} role")


def engine_of(request: Request):
    return request.app.state.engine


async def infer(request: Request, fn, *args, **kwargs):
    """Run speech work in the thread pool, with ``[service] torch_threads`` PyTorch threads
    (a per-thread OpenMP setting, so it is set in the pool thread itself)."""
    threads = engine_of(request).config.service.torch_threads

    def call():
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return fn(*args, **kwargs)

    return await run_in_threadpool(call)


# -- routes ----------------------------------------------------------------------------


@router.get("/healthz", tags=["service"])
def healthz() -> dict:
    """Liveness: the process answers HTTP. It checks nothing else; see ``/readyz``."""
    return {"status": "ok"}


@router.get("/readyz", tags=["service"], responses={503: {"description": "not ready: see `checks`"}})
def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers, the active checkpoint loads and verifies, and the
    disk takes a write; 503 when any fails, each check reported on its own."""
    report = engine_of(request).readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", tags=["service"], response_class=Response)
def prometheus(request: Request) -> Response:
    """Prometheus metrics of this process."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/whoami", tags=["service"], responses=ERRORS)
def whoami(key=Depends(any_key)) -> dict:
    """The key this request carries: its id, role and which roles' routes it may call
    (the console shows each view only to a key that may use it)."""
    return {"key": key.id, "role": key.role, "may": sorted(r for r in GRANTS if allows(key, r))}


@router.post(
    "/v1/speakers/{speaker}/utterances", tags=["enrollment"], status_code=201, response_model=EnrollmentResult,
    openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("enroll")],
)
async def enroll(request: Request, speaker: str, force: bool = False) -> EnrollmentResult:
    """Enroll one utterance of ``speaker`` (created on first use); returns the enrollment feedback.

    ``feedback`` is ``OK``, or ``INCONSISTENT_SPEAKER`` when the utterance was held for
    review. Audio that is too short, silent, clipped or noisy gets a 422 and nothing
    is stored. ``force`` skips the clipping, noise and consistency checks; the
    consistency check is the only guard against a poisoned profile, so forcing needs an
    admin key and is written to the audit log.
    """
    key = request.state.key
    _force_needs_admin(key, force)
    data, name = await audio_body(request)
    outcomes = request.app.state.metrics.enrollments
    try:
        result = await infer(request, engine_of(request).enroll, speaker, data, name=name, force=force, by=f"key:{key.id}")
    except errors.VoiceprintError as exc:
        outcomes.labels(exc.code).inc()
        raise
    outcomes.labels(result.feedback).inc()
    return result


@router.get("/v1/speakers", tags=["enrollment"], responses=ERRORS, dependencies=[require("enroll")])
def speakers(request: Request) -> list[dict]:
    """Every enrolled speaker: utterances in the profile, speech seconds, held for review."""
    return [asdict(s) for s in engine_of(request).speakers()]


# ``{speaker:path}``: a name stored before the name policy refused '/' stays reachable
# (and erasable). Routes under /v1/speakers/{speaker}/... must be declared above these.
@router.get("/v1/speakers/{speaker:path}", tags=["enrollment"], responses=ERRORS, dependencies=[require("enroll")])
def speaker(request: Request, speaker: str) -> dict:
    """One speaker's profile summary and the ids of utterances held for review."""
    engine = engine_of(request)
    summary = engine.speaker(speaker)
    held = [u.id for u in engine.utterances(speaker, status="pending")]
    return {**asdict(summary), "held_for_review": held}


@router.delete("/v1/speakers/{speaker:path}", tags=["enrollment"], responses=ERRORS, dependencies=[require("admin")])
def erase(request: Request, speaker: str) -> dict:
    """Erase everything stored about a speaker: audio or features, embeddings under every
    version, centroids, held utterances. The audit log keeps only that an erasure happened."""
    return engine_of(request).erase_speaker(speaker, by=f"key:{request.state.key.id}")


HELD = {"enrolled": "enrolled", "held_for_review": "pending", "all": None}  # the query's words -> the stored status


@router.get("/v1/utterances", tags=["enrollment"], responses=ERRORS, dependencies=[require("enroll")])
def utterances(request: Request, speaker: str, status: Literal["enrolled", "held_for_review", "all"] = "all") -> list[dict]:
    """One speaker's stored utterances, oldest first: id, source name, seconds of audio and
    of speech, quality report, and whether it is held for review (it did not sound like
    the speaker: accept or remove it). 404 for a speaker who is not enrolled."""
    return [utterance_dict(u) for u in engine_of(request).speaker_utterances(speaker, status=HELD[status])]


@router.post("/v1/utterances/{utterance_id}/accept", tags=["enrollment"], responses=ERRORS, dependencies=[require("admin")])
def accept(request: Request, utterance_id: Id) -> dict:
    """Move an utterance held for review into its speaker's profile (a person listened to
    it); 400 if it is not held, 404 if there is no such utterance."""
    return engine_of(request).accept_utterance(utterance_id)


FLAC = {200: {"content": {"audio/flac": {}}, "description": "the kept speech as FLAC"}}


@router.get("/v1/utterances/{utterance_id}/audio", tags=["enrollment"], response_class=Response,
            responses={**ERRORS, **FLAC}, dependencies=[require("admin")])
def utterance_audio(request: Request, utterance_id: Id) -> Response:
    """The kept speech of an utterance (after VAD, 16 kHz FLAC), to listen to before
    accepting or removing a held one. Voiceprints are biometric data: admin only, never
    cached. 409 ``no_audio_kept`` under ``[privacy] keep = "features"``."""
    data = engine_of(request).utterance_audio(utterance_id)
    return Response(data, media_type="audio/flac", headers={"Cache-Control": "no-store"})


@router.delete("/v1/utterances/{utterance_id}", tags=["enrollment"], responses=ERRORS, dependencies=[require("admin")])
def remove_utterance(request: Request, utterance_id: Id) -> dict:
    """Delete one utterance (its audio or features and embeddings) and take it out of its
    speaker's profile under every version, exactly; 404 if there is no such utterance."""
    return engine_of(request).remove_utterance(utterance_id)


@router.post(
    "/v1/unlabeled", tags=["unlabeled"], status_code=201, response_model=UnlabeledResult,
    openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("enroll")],
)
async def add_unlabeled(request: Request) -> UnlabeledResult:
    """Store one utterance whose speaker is not known: kept and embedded, in no profile,
    until a cluster holding it is named. The quality checks of an enrollment apply (422,
    nothing stored); the same bytes twice are a 409."""
    data, name = await audio_body(request)
    result = await infer(request, engine_of(request).add_unlabeled, data, name=name)
    request.app.state.metrics.enrollments.labels(result.feedback).inc()
    return result


@router.get("/v1/clusters", tags=["unlabeled"], response_model=list[Cluster], responses=ERRORS, dependencies=[require("enroll")])
async def clusters(request: Request) -> list[Cluster]:
    """The unlabeled utterances grouped into likely speakers by the active version, each
    ``proposed`` (a new speaker), ``known`` (decided for an enrolled speaker, ``candidate``)
    or ``small`` (too few utterances or too little speech yet)."""
    return await infer(request, engine_of(request).clusters)


@router.post("/v1/clusters/{number}/name", tags=["unlabeled"], responses=ERRORS, dependencies=[require("enroll")])
async def name_cluster(request: Request, number: Id, speaker: str, force: bool = False) -> dict:
    """Enroll cluster ``number``'s utterances under ``speaker`` by the normal enrollment
    path; says which were enrolled, held for review, or refused (those stay unlabeled).
    404 when no cluster has that number now. ``force`` needs an admin key, as for enroll."""
    key = request.state.key
    _force_needs_admin(key, force)
    return await infer(request, engine_of(request).name_cluster, number, speaker, force=force, by=f"key:{key.id}")


@router.delete("/v1/clusters/{number}", tags=["unlabeled"], responses=ERRORS, dependencies=[require("admin")])
def delete_cluster(request: Request, number: Id) -> dict:
    """Erase cluster ``number``'s utterances (kept speech and embeddings); counts, and
    whether the SQLite files are scrubbed yet (as for a speaker's erasure)."""
    return engine_of(request).delete_cluster(number, by=f"key:{request.state.key.id}")


@router.post(
    "/v1/identify", tags=["recognition"], response_model=Identification,
    openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("query")],
)
async def identify(request: Request, top: int | None = None) -> Identification:
    """Who is speaking (1:N, open set): candidates best first; ``decision`` is null for unknown.

    ``top`` (default 5) is at most ``[service] max_top`` (5 by default), so no key can
    list the enrolled names through this route.
    """
    top = _top(request, top)
    data, name = await audio_body(request)
    result = await infer(request, engine_of(request).identify, data, top=top, name=name)
    request.app.state.metrics.decisions.labels("identify", "known" if result.decision else "unknown").inc()
    return result


@router.post(
    "/v1/diarize", tags=["recognition"], response_model=Diarization,
    openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("query")],
)
async def diarize(request: Request, speakers: int | None = None) -> Diarization:
    """Who spoke when in one recording: segments named by enrolled speaker, or
    ``unknown-1``, ``unknown-2``, ... when no enrolled profile matches (the identify
    decision, with its threshold). ``speakers``: the number of speakers, when known.
    The upload is bounded by ``[service] max_request_bytes``; stores nothing."""
    data, name = await audio_body(request)
    return await infer(request, engine_of(request).diarize, data, speakers=speakers, name=name)


DIARIZE_JOBS = "/v1/diarize/jobs"
RAW_AUDIO_BODY = {"requestBody": {"required": True, "description": "an audio file (WAV, FLAC, OGG, MP3) as the raw body",
                                  "content": {"audio/*": AUDIO_BODY["requestBody"]["content"]["audio/*"]}}}


@router.post(DIARIZE_JOBS, tags=["recognition"], status_code=202, openapi_extra=RAW_AUDIO_BODY, responses=ERRORS,
             dependencies=[require("query")])
async def submit_diarization(request: Request, speakers: int | None = None) -> dict:
    """Diarize a long recording in the background: the raw body (up to ``[service]
    max_upload_bytes``, 2 GiB, and ``[diarization] max_duration_s``) is written to the
    server's disk as it arrives, its header checked (422 and nothing kept when it is not
    audio or too long), and the job queued: 202 with its id. Follow it with
    ``GET /v1/diarize/jobs/{id}``; the upload is deleted when the job ends."""
    engine = engine_of(request)
    partial = engine.new_upload()
    try:
        await receive_upload(request, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    job, upload = await run_in_threadpool(engine.submit_diarization, partial, speakers=speakers, name="upload")
    request.app.state.diarize.submit(job.id, upload)
    return diarization_job_dict(job)


@router.get(DIARIZE_JOBS + "/{job_id}", tags=["recognition"], responses=ERRORS, dependencies=[require("query")])
def diarization_job(request: Request, job_id: Id) -> dict:
    """A diarization job: ``queued``, ``running`` (``progress``: minutes of the recording
    embedded, of all), ``succeeded`` (``result``: the answer of ``POST /v1/diarize``) or
    ``failed`` (``result``: ``error`` and ``message``; ``interrupted`` when its server
    stopped). 404 for no such job."""
    try:
        return diarization_job_dict(engine_of(request).diarization_job(job_id))
    except errors.InvalidInput as exc:
        raise ApiError(404, "unknown_job", str(exc)) from None


def _top(request: Request, top: int | None) -> int:
    """The ``top`` asked for (default 5), within ``[service] max_top``."""
    most = engine_of(request).config.service.max_top
    top = min(5, most) if top is None else top
    if not 1 <= top <= most:
        raise ApiError(422, "invalid_request", f"top must be between 1 and {most} ([service] max_top), got {top}")
    return top


BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "a form with one `file` field per audio file (at most `[service] max_batch_files`)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object", "required": ["file"],
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
        },
    }
}


@router.post(
    "/v1/identify/batch", tags=["recognition"], response_model=list[ProbeAnswer],
    openapi_extra=BATCH_BODY, responses=ERRORS, dependencies=[require("query")],
)
async def identify_batch(request: Request, top: int | None = None) -> list[ProbeAnswer]:
    """Identify several files in one call: one answer per `file` field, in order.

    Each slot holds the file's identification (as ``POST /v1/identify``, the same ``top``
    bound), or, for a file whose audio is refused, its error code and message: one bad
    file does not fail the others. At most ``[service] max_batch_files`` files (413 for
    more), the whole body within ``[service] max_request_bytes``.
    """
    top, most = _top(request, top), engine_of(request).config.service.max_batch_files
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", f"send a multipart form with one `file` field per audio file, not {kind or 'no type'}")
    try:
        form = await request.form(max_files=most, max_fields=most + 4)
    except StarletteHTTPException as exc:  # starlette's words for a form it could not take
        if "Too many files" in str(exc.detail):
            raise ApiError(413, "too_many_files", f"at most {most} files per request ([service] max_batch_files)") from None
        raise
    uploads = form.getlist("file")
    if not uploads or any(isinstance(u, str) for u in uploads):
        raise ApiError(400, "invalid_input", "the form needs one or more `file` fields, each holding an audio file")
    names = [u.filename or f"file {i}" for i, u in enumerate(uploads, 1)]
    probes = [(await u.read(), f"upload:{name}") for u, name in zip(uploads, names)]
    results = await infer(request, lambda: list(engine_of(request).identify_each(probes, top=top)))
    answers = []
    for name, result in zip(names, results):
        if isinstance(result, errors.VoiceprintError):
            answers.append(ProbeAnswer(file=name, ok=False, error=result.code, message=str(result)))
            continue
        request.app.state.metrics.decisions.labels("identify", "known" if result.decision else "unknown").inc()
        answers.append(ProbeAnswer(file=name, ok=True, result=result))
    return answers


@router.post(
    "/v1/verify/{speaker}", tags=["recognition"], response_model=Verification,
    openapi_extra=AUDIO_BODY, responses=ERRORS, dependencies=[require("query")],
)
async def verify(request: Request, speaker: str) -> Verification:
    """Is this ``speaker`` (1:1)? ``accepted`` with the scores behind it.

    A query key gets the decision alone (scores null), and a name that is not enrolled
    is rejected like any other: a query key cannot test which names are enrolled. An
    admin key gets the scores, and 404 for a name that is not enrolled.
    """
    disclose = allows(request.state.key, "admin")
    data, name = await audio_body(request)
    result = await infer(request, engine_of(request).verify, speaker, data, name=name, disclose=disclose)
    request.app.state.metrics.decisions.labels("verify", "accepted" if result.accepted else "rejected").inc()
    return result
