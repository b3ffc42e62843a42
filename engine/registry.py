"""Name -> factory registries for encoders, front ends and losses.

Registries replace if/elif chains: a new architecture is one decorated class in its own
file, and a wrong name is an error that lists every valid one.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from voiceprint.engine.errors import UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one kind.

    >>> shapes = Registry("shape")
    >>> @shapes.register("square")
    ... class Square:
    ...     pass
    >>> shapes.names()
    ['square']
    >>> shapes.get("circle")
    Traceback (most recent call last):
    ...
    voiceprint.engine.errors.UnknownName: unknown shape 'circle'; valid names: square
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(factory: T) -> T:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return add

    def get(self, name: str) -> T:
        try:
            return self._factories[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none)"
            raise UnknownName(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._factories)


# The registries of the two plug-in families. They live here, not in their packages'
# __init__, so that a plug-in module registering itself does not import the package
# that imports it (an import circle).
ENCODERS: Registry = Registry("encoder")
LOSSES: Registry = Registry("loss")
