"""voiceprint's learning engine: audio, features, encoders, scoring and the Engine facade.

``from engine import Engine`` is the entry point. The facade is imported lazily so that
``import engine.audio`` (or a registry) does not pull in SQLAlchemy and the storage layer.
"""

__all__ = ["Engine"]


def __getattr__(name: str):
    if name == "Engine":
        from voiceprint.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
