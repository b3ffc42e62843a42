"""The HTTP service: FastAPI routes over one :class:`engine.Engine`, with the refresh
scheduler in the same process (``voiceprint serve``)."""

from service.app import create_app

__all__ = ["create_app"]
