"""stepopt: better few-step diffusion sampling by optimized time steps.

The public surface is :data:`__all__`; everything else is private by convention. Attributes load
on first use, so ``import stepopt`` imports neither torch nor any model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from stepopt.api import baseline, export_schedule, load_model, load_schedule, optimize, sample
    from stepopt.errors import ScheduleValidationError, StepoptError
    from stepopt.export import ExportRefused
    from stepopt.schedule import Schedule
    from stepopt.solvers.registry import SolverIdentity

_LAZY = {
    "load_schedule": "stepopt.api",
    "load_model": "stepopt.api",
    "optimize": "stepopt.api",
    "baseline": "stepopt.api",
    "sample": "stepopt.api",
    "export_schedule": "stepopt.api",
    "Schedule": "stepopt.schedule",
    "SolverIdentity": "stepopt.solvers.registry",
    "StepoptError": "stepopt.errors",
    "ScheduleValidationError": "stepopt.errors",
    "ExportRefused": "stepopt.export",
}

__all__ = [
    "ExportRefused",
    "Schedule",
    "ScheduleValidationError",
    "SolverIdentity",
    "StepoptError",
    "__version__",
    "baseline",
    "export_schedule",
    "load_model",
    "load_schedule",
    "optimize",
    "sample",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stepopt' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
