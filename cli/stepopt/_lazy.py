"""Deferred imports, so that commands which never touch a tensor start without importing torch.

``torch = lazy_module("torch")`` binds a stand-in whose first attribute access imports the real
module; modules that only use torch inside functions import it this way. :func:`loaded` tells
whether a module is already imported (a value can only be a tensor if torch is).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__dict__["_lazy_name"]), attr)


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` that imports on first attribute access."""
    return sys.modules.get(name) or _LazyModule(name)


def loaded(name: str) -> types.ModuleType | None:
    """The module ``name`` if it is already imported, else None (never imports it)."""
    return sys.modules.get(name)


def is_tensor(x: Any) -> bool:
    """``isinstance(x, torch.Tensor)`` without importing torch (no tensor exists before torch does)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
