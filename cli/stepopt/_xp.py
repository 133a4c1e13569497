"""Tiny helpers to write one formula for numpy arrays, Python floats and torch tensors."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import torch


def xp(x: Any) -> ModuleType:
    """Return the array namespace of ``x``: ``torch`` for tensors, else ``numpy``."""
    return torch if isinstance(x, torch.Tensor) else np


def as_f64(x: Any) -> Any:
    """Tensors stay tensors (promoted to float64); everything else becomes a float64 ndarray."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return np.asarray(x, dtype=np.float64)
