"""The HTTP service: FastAPI routes over one :class:`voiceprint.engine.Engine`, with the job worker
that runs refreshes and the refresh schedule in the same process (``voiceprint serve``)."""

from voiceprint.service.app import create_app

__all__ = ["create_app"]
