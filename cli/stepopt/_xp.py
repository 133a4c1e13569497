"""Tiny helpers to write one formula for numpy arrays, Python floats and torch tensors.

Nothing here imports torch: a value can only be a tensor once torch is imported.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

from stepopt._lazy import is_tensor


def xp(x: Any) -> ModuleType:
    """Return the array namespace of ``x``: ``torch`` for tensors, else ``numpy``."""
    return sys.modules["torch"] if is_tensor(x) else np


def as_f64(x: Any) -> Any:
    """Tensors stay tensors (promoted to float64); everything else becomes a float64 ndarray."""
    if is_tensor(x):
        return x.to(sys.modules["torch"].float64)
    return np.asarray(x, dtype=np.float64)
