"""Assemble :class:`~stepopt.schedule.Schedule` values from a model, a solver and a grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stepopt.baselines import baseline_config, start_sigmas
from stepopt.frames import VPDiscrete
from stepopt.provenance import provenance
from stepopt.schedule import MethodInfo, Schedule
from stepopt.solvers.registry import SolverIdentity, get_solver

if TYPE_CHECKING:
    from stepopt.models.base import DiffusionModel


def native_timesteps(model: DiffusionModel, sigmas: Sequence[float]) -> list[float] | None:
    """The model-native times of a grid (None for models whose native time is sigma)."""
    if model.time_domain == "sigma":
        return None
    return [float(t) for t in np.asarray(model.frame.time(np.asarray(sigmas, dtype=np.float64)))]


def integer_grid(model: DiffusionModel, sigmas: Sequence[float]) -> tuple[list[float], dict[str, Any] | None]:
    """``sigmas`` projected onto the model's integer timesteps (the table's sigmas there), and a
    record of the projection (None when the grid was already on them)."""
    frame = model.frame
    if not isinstance(frame, VPDiscrete):
        return [float(s) for s in sigmas], None
    sig = np.asarray(sigmas, dtype=np.float64)
    _, proj = frame.integer_grid(sig)
    shift = np.abs(np.log(proj) - np.log(sig))
    if float(shift.max()) == 0.0:
        return [float(s) for s in proj], None
    note = {
        "projected": "nearest integer timestep (ties to even), sigmas from the model's float32 table",
        "max_abs_lam_shift": float(shift.max()),
    }
    return [float(s) for s in proj], note


def make_schedule(
    model: DiffusionModel,
    solver: SolverIdentity,
    sigmas: Sequence[float],
    method: MethodInfo,
    *,
    final_step: str = "none",
    model_sigmas: Sequence[float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    device: Any = None,
) -> Schedule:
    """A validated schedule whose ``nfe`` is computed from the solver's exact rule.

    For a model trained at integer timesteps (``model.integer_timesteps``) the grid is projected
    onto them (:func:`integer_grid`) unless ``model_sigmas`` deliberately decouples the network's
    time; ``method.config["integer_timesteps"]`` then records the projection.
    """
    sig = [float(s) for s in sigmas]
    if model_sigmas is None and model.integer_timesteps:
        sig, note = integer_grid(model, sig)
        if note is not None:
            method = MethodInfo(
                method.name, {**method.config, "integer_timesteps": note}, method.objective, method.seed, method.seconds
            )
    nfe = get_solver(solver.name).nfe(solver, len(sig) - 1, final_step)
    return Schedule(
        model=model.ref(),
        solver=solver,
        nfe=nfe,
        sigmas=tuple(sig),
        model_sigmas=None if model_sigmas is None else tuple(float(s) for s in model_sigmas),
        timesteps=None if native_timesteps(model, sig) is None else tuple(native_timesteps(model, sig) or ()),
        final_step=final_step,
        method=method,
        metrics=dict(metrics or {}),
        provenance=provenance(device=device if device is not None else model.device),
    )


def baseline_schedule(
    kind: str,
    model: DiffusionModel,
    solver: SolverIdentity,
    n_steps: int,
    *,
    final_step: str = "none",
    rho: float = 7.0,
) -> Schedule:
    """A hand-crafted baseline (see :mod:`stepopt.baselines`) as a schedule value."""
    sig = start_sigmas(kind, model, n_steps, rho=rho)
    method = MethodInfo(name=kind, config=baseline_config(kind, model.frame, rho))
    return make_schedule(model, solver, sig.tolist(), method, final_step=final_step)
