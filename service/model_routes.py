"""The HTTP routes of model versions: refresh, rollback, jobs, calibration and status
(admin keys only). The enrollment and recognition routes are in
:mod:`voiceprint.service.routes`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.concurrency import run_in_threadpool

from voiceprint.engine import errors
from voiceprint.engine.bounds import MAX_ID
from voiceprint.engine.results import job_dict
from voiceprint.service.routes import ERRORS, ApiError, Id, engine_of, require

router = APIRouter()


class RefreshRequest(BaseModel):
    """The optional JSON body of ``POST /v1/refresh``; a key it does not name is a 422."""

    model_config = ConfigDict(extra="forbid")

    dry_run: StrictBool = False  # train and evaluate a candidate, store no version
    reason: StrictStr | None = None  # recorded with the job (instead of the query's)


@router.post("/v1/refresh", tags=["models"], status_code=202, responses=ERRORS, dependencies=[require("admin")])
def refresh(request: Request, body: RefreshRequest | None = None, reason: str = "requested over HTTP") -> dict:
    """Queue a refresh; poll ``GET /v1/jobs/{id}``. A job another refresh covered reads
    ``skipped`` with ``result.covered_by``.

    ``{"dry_run": true}`` queues a dry run: the candidate is trained and evaluated, and no
    version is stored (the job's ``dry_run`` says so, its result holds the gate metrics).
    A dry run and a real refresh never cover each other's requests.
    """
    body = body or RefreshRequest()
    job = engine_of(request).request_refresh((body.reason or reason)[:200], dry_run=body.dry_run)
    worker = request.app.state.worker
    if worker is not None:
        worker.wake.set()
    return job_dict(job)


@router.post("/v1/calibrate", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
async def calibrate(request: Request) -> dict:
    """Fit the active version's calibration again (as ``voiceprint calibrate``): the
    thresholds of every back-end, their fit, and how many trials they rest on."""
    return asdict(await run_in_threadpool(engine_of(request).calibrate))


PNG = {200: {"content": {"image/png": {}}, "description": "the DET curve and the score histograms"}}


@router.get("/v1/calibration/det.png", tags=["models"], response_class=Response,
            responses={**ERRORS, **PNG}, dependencies=[require("admin")])
async def calibration_det(request: Request, version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None) -> Response:
    """A version's (default: the active one's) DET curve and score histograms on its
    leave-one-out trials of the enrolled speakers (those a calibration is fitted on), on
    the back-end it decides with, the EER and the current thresholds' operating points
    marked. 409 ``not_enough_data`` before there are enough speakers to calibrate."""
    from voiceprint.engine.det import png

    engine = engine_of(request)
    image = await run_in_threadpool(lambda: png(engine.calibration_scores(version)))
    return Response(image, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/v1/status", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
def status(request: Request) -> dict:
    """The state of the home (as ``voiceprint status``): active version, new utterances
    since it was trained, held for review, queued / running / last job, calibration,
    scrub, and the stored refresh schedule."""
    from voiceprint.engine import scheduler

    return {**engine_of(request).status(), "schedule": scheduler.list_schedule(request.app.state.db)}


@router.get("/v1/index", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
async def index_status(request: Request) -> list[dict]:
    """The 1:N index this server process holds of each version (as ``voiceprint index
    status``): kind (exact or approximate), speakers, memory, the change-feed revision it
    is current to and how far the database has moved past it, whether a new index is being
    built, and an approximate index's recall@1 against exact search on stored utterances."""
    return await run_in_threadpool(engine_of(request).index_status)


@router.get("/v1/jobs", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
def jobs(request: Request, limit: Annotated[int, Query(ge=1, le=200)] = 20) -> list[dict]:
    """The newest refresh and rollback jobs, newest first, with their progress."""
    return [job_dict(j) for j in engine_of(request).jobs(limit=limit)]


@router.get("/v1/jobs/{job_id}", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
def job(request: Request, job_id: Id) -> dict:
    """A refresh or rollback job: queued, running, succeeded, rejected, failed or skipped."""
    try:
        return job_dict(engine_of(request).job(job_id))
    except errors.InvalidInput as exc:
        raise ApiError(404, "unknown_job", str(exc)) from None


@router.get("/v1/versions", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
def versions(request: Request) -> list[dict]:
    """Every model version, with status, gate metrics and which one is active."""
    return [_version(v) for v in engine_of(request).versions()]


@router.post("/v1/versions/{number}/activate", tags=["models"], responses=ERRORS, dependencies=[require("admin")])
def activate(request: Request, number: Id, reason: str = "rollback over HTTP", force: bool = False) -> dict:
    """Make a kept version active again (rollback); utterances it lacks are embedded first.
    A candidate whose refresh stopped before promoting it gets a 409 unless ``force``."""
    return engine_of(request).rollback(number, reason=reason[:200], force=force)


def _version(version) -> dict:
    out = asdict(version)
    out["created_at"] = version.created_at.isoformat()
    out.pop("config")  # large, and readable from the checkpoint's version in the CLI
    return out
