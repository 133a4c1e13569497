"""The optimizer registry and :func:`optimize`, which turns an optimizer run into a Schedule.

An optimizer module registers an :class:`OptimizerSpec`: its name (the CLI string), a config
dataclass (filled from ``--config``/``--set``) and ``run(ctx, config) -> OptimizeResult``.
Optimizers report progress through ``ctx.progress(event, data)``; they never print.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stepopt.build import make_schedule
from stepopt.config import config_to_dict
from stepopt.model_cards import OPTIMIZER_SUMMARIES
from stepopt.models.base import DiffusionModel
from stepopt.registry import Registry
from stepopt.schedule import MethodInfo, Schedule
from stepopt.solvers import SolverIdentity, get_solver

Progress = Callable[[str, Mapping[str, Any]], None]


@dataclass
class OptimizeContext:
    """Everything an optimizer may use besides its own config."""

    model: DiffusionModel
    solver: SolverIdentity
    n_steps: int
    final_step: str = "none"
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Progress | None = None
    init_schedule: Schedule | None = None  # a start grid (--init FILE), for optimizers that take one
    state_path: Path | None = None  # where a resumable optimizer keeps its training state
    resume: bool = False  # continue from the state at state_path

    def report(self, event: str, **data: Any) -> None:
        if self.progress is not None:
            self.progress(event, data)


@dataclass
class OptimizeResult:
    """An optimizer's output: the grid (N+1 sigmas) and what it minimized."""

    sigmas: list[float]
    objective: dict[str, Any]
    model_sigmas: list[float] | None = None
    report: dict[str, Any] = field(default_factory=dict)  # extra facts stored under method.config["report"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    config_cls: type
    run: Callable[[OptimizeContext, Any], OptimizeResult]
    summary: str = ""
    takes_init: bool = False  # uses OptimizeContext.init_schedule (--init FILE)
    resumable: bool = False  # keeps a state file at OptimizeContext.state_path (--resume)


# The built-in optimizers register when their modules are imported, on first lookup.
OPTIMIZERS: Registry[OptimizerSpec] = Registry(
    "optimizer", modules=[f"stepopt.optimizers.{m}" for m in ("ays", "gits", "ld3", "oss", "trust_region")], sort=True
)


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add an optimizer; a built-in one without ``summary`` takes the one-line description that
    :data:`stepopt.model_cards.OPTIMIZER_SUMMARIES` keeps for ``stepopt models``."""
    if not spec.summary and spec.name in OPTIMIZER_SUMMARIES:
        spec = replace(spec, summary=OPTIMIZER_SUMMARIES[spec.name])
    return OPTIMIZERS.register(spec.name, spec)


def optimizer_names() -> list[str]:
    return OPTIMIZERS.names()


def get_optimizer(name: str) -> OptimizerSpec:
    return OPTIMIZERS.get(name)


def optimize(
    name: str,
    model: DiffusionModel,
    solver: SolverIdentity,
    nfe: int,
    config: Any = None,
    *,
    final_step: str = "none",
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    init_schedule: Schedule | None = None,
    state_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> Schedule:
    """Run optimizer ``name`` for exactly ``nfe`` evaluations and return the validated schedule."""
    spec = get_optimizer(name)
    cfg = config if config is not None else spec.config_cls()
    if not isinstance(cfg, spec.config_cls):
        raise TypeError(f"optimizer '{name}' expects a {spec.config_cls.__name__}, got {type(cfg).__name__}")
    n_steps = get_solver(solver.name).steps_for_nfe(solver, nfe, final_step)
    ctx = OptimizeContext(
        model=model,
        solver=solver,
        n_steps=n_steps,
        final_step=final_step,
        seed=seed,
        device=torch.device(device) if device is not None else model.device,
        progress=progress,
        init_schedule=init_schedule,
        state_path=None if state_path is None else Path(state_path),
        resume=resume,
    )
    t0 = time.perf_counter()
    res = spec.run(ctx, cfg)
    seconds = time.perf_counter() - t0
    conf = config_to_dict(cfg)
    if res.report:
        conf["report"] = res.report
    method = MethodInfo(name=name, config=conf, objective=res.objective, seed=seed, seconds=round(seconds, 4))
    return make_schedule(
        model, solver, res.sigmas, method, final_step=final_step, model_sigmas=res.model_sigmas, device=ctx.device
    )
