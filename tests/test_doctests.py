"""The docstring examples of the package, run as tests.

pytest's ``--doctest-modules`` would import ``engine/audio.py`` by its place on disk; with
the repository root being the package ``voiceprint`` (see pyproject.toml) that place is
under a folder named after wherever the clone lives, so the modules are imported here by
their installed names instead, and each module's examples run as one test.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import voiceprint

PACKAGES = ("voiceprint.engine", "voiceprint.storage", "voiceprint.service")


def _modules() -> list[str]:
    names = ["voiceprint"]
    for package in PACKAGES:
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}.")]
    return names


MODULES = _modules()


def test_the_walk_finds_the_package():
    # Guards the walk itself: an empty list would make every parametrised case vanish.
    assert {"voiceprint.engine.audio", "voiceprint.engine.losses.margins", "voiceprint.storage.store"} <= set(MODULES)
    assert voiceprint.__file__.endswith("__init__.py")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name} (see the output above)"
