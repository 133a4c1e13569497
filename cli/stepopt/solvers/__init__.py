"""Solvers: pure, differentiable functions ``(denoiser, x, sigmas, ...) -> x`` in the sigma frame.

Importing this package registers every solver. :func:`solve` runs a solver by its identity and
applies an optional final denoising jump (``final_step: denoise``, one more evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stepopt._lazy import lazy_module
from stepopt.solvers import dpmpp as _dpmpp  # noqa: F401  (registers)
from stepopt.solvers import euler as _euler  # noqa: F401  (registers)
from stepopt.solvers import heun as _heun  # noqa: F401  (registers)
from stepopt.solvers import ipndm as _ipndm  # noqa: F401  (registers)
from stepopt.solvers import pfdiff as _pfdiff  # noqa: F401  (registers)
from stepopt.solvers import unipc as _unipc  # noqa: F401  (registers)
from stepopt.solvers._common import Callback, Denoiser, as_grid, denoise
from stepopt.solvers.registry import (
    FINAL_STEPS,
    SolverIdentity,
    SolverSpec,
    all_solvers,
    get_solver,
    solver_names,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

__all__ = [
    "FINAL_STEPS",
    "SolverIdentity",
    "SolverSpec",
    "all_solvers",
    "get_solver",
    "solve",
    "solver_names",
]


def solve(
    identity: SolverIdentity,
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    final_step: str = "none",
) -> torch.Tensor:
    """Run the solver ``identity`` along ``sigmas``; with ``final_step='denoise'`` return D(x, sigma_N)."""
    spec = get_solver(identity.name)
    opts: dict[str, Any] = {}
    if len(spec.orders) > 1:
        opts["order"] = identity.order
    if spec.variants:
        opts["variant"] = identity.variant
    if spec.has_lower_order_final:
        opts["lower_order_final"] = identity.lower_order_final
    x = spec.fn(denoiser, x, sigmas, model_sigmas=model_sigmas, cond=cond, callback=callback, **opts)
    if final_step == "denoise":
        sig = as_grid(sigmas if model_sigmas is None else model_sigmas, x)
        x = denoise(denoiser, x, sig[-1], cond)
    return x
