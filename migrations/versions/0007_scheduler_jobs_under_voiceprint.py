"""Stored schedule entries name their function under the ``voiceprint`` package.

APScheduler keeps each scheduled job as a pickled state that names the function to run by
its import path. The package used to install ``engine`` as a top-level module, so the
stored path reads ``engine.scheduler:run_scheduled_refresh``; it is now
``voiceprint.engine.scheduler:...``. APScheduler drops, with only a log line, any job whose
function it cannot import, so without this step an upgrade would silently lose the
user's refresh schedule. The table is APScheduler's own and exists only once a schedule
was set.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import pickle

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

OLD = "engine.scheduler:"
NEW = "voiceprint.engine.scheduler:"


def _rewrite(old: str, new: str) -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("apscheduler_jobs"):
        return
    jobs = sa.table("apscheduler_jobs", sa.column("id", sa.String), sa.column("job_state", sa.LargeBinary))
    for job_id, blob in bind.execute(sa.select(jobs.c.id, jobs.c.job_state)).all():
        state = pickle.loads(blob)
        func = state.get("func")
        if isinstance(func, str) and func.startswith(old):
            state["func"] = new + func[len(old):]
            # APScheduler's own pickling protocol (SQLAlchemyJobStore's default).
            blob = pickle.dumps(state, pickle.HIGHEST_PROTOCOL)
            bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(job_state=blob))


def upgrade() -> None:
    _rewrite(OLD, NEW)


def downgrade() -> None:
    _rewrite(NEW, OLD)
