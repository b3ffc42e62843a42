"""The only code that talks SQL, composed.

:class:`Store` opens one :class:`~voiceprint.storage.db.Database` (SQLite, the embedded default, or
PostgreSQL) and hands it to small repositories, one per concern; each returns the frozen
records of :mod:`voiceprint.storage.records`, and runs every public method in one managed session
that commits, rolls back and closes, and turns SQLAlchemy errors into the project's own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from sqlalchemy import func, select

from voiceprint.storage import models as m
from voiceprint.storage.checkpoints import Checkpoints
from voiceprint.storage.db import Database
from voiceprint.storage.diarizations import DiarizationJobs
from voiceprint.storage.embeddings import Embeddings
from voiceprint.storage.jobs import Jobs
from voiceprint.storage.keys import Keys
from voiceprint.storage.profiles import Profiles
from voiceprint.storage.registry import Registry
from voiceprint.storage.schema import Schema
from voiceprint.storage.scrub import Scrub
from voiceprint.storage.unlabeled import Unlabeled


class Store:
    """Speakers, utterances, embeddings, centroids and model versions in one database.

    Parameters
    ----------
    url
        SQLAlchemy URL, e.g. ``sqlite:////home/me/.voiceprint/voiceprint.db`` or
        ``postgresql+psycopg://user:pw@host/db``. The parent folder of a SQLite file
        must exist.
    echo
        Log every SQL statement (SQLAlchemy's ``echo``).

    Attributes
    ----------
    schema : Schema
        Alembic migrations: ``upgrade``, ``downgrade``, ``check_schema``, ...
    registry : Registry
        Model versions, aliases and their history, calibrations.
    checkpoints : Checkpoints
        The versions' weights, by sha256, in chunks.
    profiles : Profiles
        Speakers and utterances: enrollment, review, removal, erasure, centroids.
    embeddings : Embeddings
        Embeddings of a whole version, the score cohort, kept audio.
    jobs : Jobs
        Refresh and rollback jobs, and the scheduler's job store.
    keys : Keys
        API keys and the audit log.
    diarizations : DiarizationJobs
        Long uploads diarized in the background, their progress and results.
    unlabeled : Unlabeled
        Utterances stored without a speaker, their embeddings, their erasure.
    scrub : Scrub
        Whether erased data is also gone from the SQLite files, and the retried checkpoint.

    Raises
    ------
    StorageError
        The URL names an unsupported backend or the database cannot be opened.
    """

    def __init__(self, url: str, *, echo: bool = False):
        self._db = Database(url, echo=echo)
        self.schema = Schema(self._db)
        self.registry = Registry(self._db)
        self.checkpoints = Checkpoints(self._db)
        self.scrub = Scrub(self._db)
        self.profiles = Profiles(self._db, self.scrub)
        self.embeddings = Embeddings(self._db)
        self.jobs = Jobs(self._db)
        self.keys = Keys(self._db)
        self.unlabeled = Unlabeled(self._db, self.scrub)
        self.diarizations = DiarizationJobs(self._db)

    @property
    def url(self) -> str:
        """The database URL with its password masked."""
        return self._db.url

    @property
    def writes(self) -> int:
        """Write transactions this Store committed: an in-memory index of this process
        reads the change feed at once after its own writes, not only on its timer."""
        return self._db.writes

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection (a pending scrub is tried once more first)."""
        self.scrub.close()
        self._db.close()

    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """Hold the lock ``name`` across every process using this database, or raise
        :class:`RefreshBusy` at once if another holder has it (see
        :meth:`voiceprint.storage.db.Database.exclusive`)."""
        return self._db.exclusive(name)

    def counts(self) -> dict[str, int]:
        """Rows per table, by table name."""
        with self._db.session("count rows") as s:
            return {
                table.name: s.scalar(select(func.count()).select_from(table))
                for table in m.Base.metadata.sorted_tables
            }
