"""Diarization jobs: long uploads diarized in the background by the server that holds them."""

from __future__ import annotations

from sqlalchemy import select, update

from voiceprint.engine.errors import InvalidInput
from voiceprint.storage import db, ids
from voiceprint.storage import models as m
from voiceprint.storage.records import DiarizationJob

J = m.DiarizationJob


class DiarizationJobs:
    def __init__(self, database: db.Database):
        self._db = database

    def submit(self, *, owner: str, source: str, speakers: int | None) -> DiarizationJob:
        with self._db.session("queue a diarization job", write=True) as s:
            row = J(status="queued", owner=owner, source=source, speakers=speakers, result={}, requested_at=db.now())
            s.add(row)
            s.flush()
            return _record(row)

    def get(self, job_id: int) -> DiarizationJob:
        with self._db.session(f"read diarization job {job_id}") as s:
            row = ids.get(s, J, job_id)
            if row is None:
                raise InvalidInput(f"no diarization job {job_id}")
            return _record(row)

    def start(self, job_id: int) -> bool:
        """Queued -> running; False when it was no longer queued (failed meanwhile)."""
        with self._db.session(f"start diarization job {job_id}", write=True) as s:
            moved = s.execute(
                update(J).where(J.id == job_id, J.status == "queued").values(status="running", started_at=db.now())
            ).rowcount
            return bool(moved)

    def progress(self, job_id: int, done: int, total: int) -> None:
        with self._db.session(f"record the progress of diarization job {job_id}", write=True) as s:
            s.execute(update(J).where(J.id == job_id, J.status == "running").values(done=done, total=total))

    def finish(self, job_id: int, *, status: str, result: dict) -> None:
        """Record the outcome: ``succeeded`` with the diarization, ``failed`` with the error."""
        if status not in ("succeeded", "failed"):
            raise ValueError(f"a diarization job finishes succeeded or failed, not {status!r}")
        with self._db.session(f"finish diarization job {job_id}", write=True) as s:
            s.execute(update(J).where(J.id == job_id).values(status=status, result=result, finished_at=db.now()))

    def unfinished(self) -> list[DiarizationJob]:
        """Queued and running jobs, oldest first (their owners decide whether they still live)."""
        with self._db.session("list unfinished diarization jobs") as s:
            return [_record(r) for r in s.scalars(select(J).where(J.status.in_(("queued", "running"))).order_by(J.id))]


def _record(row: m.DiarizationJob) -> DiarizationJob:
    return DiarizationJob(
        id=row.id, status=row.status, owner=row.owner, source=row.source, speakers=row.speakers,
        done=row.done, total=row.total, result=dict(row.result or {}), requested_at=row.requested_at,
        started_at=row.started_at, finished_at=row.finished_at,
    )
