"""Classes by name, gathered from the modules of one package: the KV caches and the eviction scorers.

    CACHES = Registry("workers.caches", "cache")    # in the package's __init__.py
    @CACHES.register                                # in any module of the package
    class DynamicCache:
        name = "full"
    CACHES.get("full")                              # -> DynamicCache

Before it answers a name it does not hold, or lists its names, a registry imports every module of
its package (pkgutil over the package's ``__path__``, so a directory appended to ``__path__`` is
part of it): a new file is all a new entry takes, and nobody keeps a list of modules by hand.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable


class Registry:
    """Classes of one package by their ``name`` attribute; `check(cls)` raises for a class that does not fit."""

    def __init__(self, package: str, kind: str, check: Callable[[type], None] | None = None) -> None:
        self.package, self.kind, self.check = package, kind, check
        self._classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: file `cls` under ``cls.name``."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} {cls.__qualname__} needs a class attribute `name` (a non-empty str)")
        if self.check is not None:
            self.check(cls)
        old = self._classes.get(name)
        # The same class imported again (a reloaded module) replaces itself; another class may not.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"{self.kind} name {name!r} is taken by {old.__module__}.{old.__qualname__}")
        self._classes[name] = cls
        return cls

    def __contains__(self, name: object) -> bool:
        if name not in self._classes:
            self.discover()
        return name in self._classes

    def get(self, name: str) -> type:
        """The class registered as `name`; ValueError naming it and the known names if there is none."""
        if name not in self:
            raise ValueError(f"{self.kind} {name!r} is not one of {self.names()}")
        return self._classes[name]

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted (the same order in every process, however it was discovered)."""
        self.discover()
        return tuple(sorted(self._classes))

    def discover(self) -> None:
        """Import the package's modules not imported yet; their ``@register`` lines fill the registry."""
        package = importlib.import_module(self.package)
        importlib.invalidate_caches()  # a module file written since the last look is found too
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{self.package}."):
            if info.name not in sys.modules:
                importlib.import_module(info.name)
