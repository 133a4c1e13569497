"""One registry shape for every extension point: solvers, optimizers, model loaders, built-in models,
metrics (and the kinds that compute them) and baselines.

A :class:`Registry` maps a name (the CLI string) to an entry of one kind. Registering a name twice
is a programming error (``ValueError``); looking up an unknown name is a user error
(:class:`StepoptError` listing the known names). Entries that live in modules importing heavy
libraries can be registered on first use: ``Registry("optimizer", modules=(...))`` imports those
modules before the first lookup. This module imports no torch.

>>> colours = Registry[int]("colour")
>>> colours.register("red", 1)
1
>>> colours.get("red"), colours.names(), "blue" in colours
(1, ['red'], False)
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from stepopt.errors import StepoptError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one ``kind``; ``names()`` in registration order, or sorted with ``sort=True``."""

    def __init__(self, kind: str, *, modules: Sequence[str] = (), sort: bool = False) -> None:
        self.kind = kind
        self._modules = tuple(modules)
        self._loaded = not self._modules
        self._loading = False
        self._sort = sort
        self._entries: dict[str, T] = {}

    def _load(self) -> None:
        if self._loaded or self._loading:  # the modules register into this registry while importing
            return
        self._loading = True
        try:
            for mod in self._modules:
                importlib.import_module(mod)
            self._loaded = True
        finally:
            self._loading = False

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; returns it (usable as ``SPEC = REG.register(name, spec)``)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (for tests and plug-ins that replace one)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry ``name``; an error naming the known ones otherwise."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none registered)"
            raise StepoptError(f"unknown {self.kind} '{name}'; expected one of {known}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries) if self._sort else list(self._entries)

    def values(self) -> list[T]:
        return [self._entries[k] for k in self.names()]

    def items(self) -> list[tuple[str, T]]:
        return [(k, self._entries[k]) for k in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
