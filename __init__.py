"""voiceprint: incremental speaker recognition with versioned models in SQL.

The repository's top level is this package (pyproject.toml maps ``voiceprint`` onto it),
so ``engine/`` installs as ``voiceprint.engine``, ``storage/`` as ``voiceprint.storage``
and so on, and nothing claims a generic top-level name in a user's environment.

>>> import voiceprint
>>> voiceprint.Engine.__name__
'Engine'
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["Engine", "VoiceprintError", "__version__"]

try:
    __version__ = version("voiceprint-engine")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    # Lazily, like voiceprint.engine: `import voiceprint` stays cheap (no torch, no SQLAlchemy).
    if name == "Engine":
        from voiceprint.engine import Engine

        return Engine
    if name == "VoiceprintError":
        from voiceprint.engine.errors import VoiceprintError

        return VoiceprintError
    raise AttributeError(f"module 'voiceprint' has no attribute {name!r}")
