"""The Python API: load, optimize, sample and export schedules from notebooks and scripts.

>>> import stepopt
>>> sorted(stepopt.__all__)[:3]
['ExportRefused', 'Schedule', 'StepoptError']

Everything here is what the command line does, as functions; ``import stepopt`` stays light (no
torch) until a function that needs a network is called.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepopt._defaults import DEFAULT_MODEL
from stepopt.errors import StepoptError
from stepopt.schedule import Schedule

if TYPE_CHECKING:
    import torch

    from stepopt.models.base import DiffusionModel

PathLike = str | os.PathLike[str]


def load_schedule(path: PathLike) -> Schedule:
    """Read and validate a schedule file (``stepopt.schedule/v1``); errors name the file and key."""
    return Schedule.load(path)


def load_model(model: str = DEFAULT_MODEL, *, device: str = "cpu", trust_code: bool = False) -> DiffusionModel:
    """A model by id (``builtin:NAME``, ``diffusers:PATH``, ...), as ``--model`` takes it."""
    from stepopt.models import load_model as _load

    return _load(model, device=device, trust_pickle=trust_code)


def _model(model: str | DiffusionModel | None, device: str, trust_code: bool = False) -> DiffusionModel:
    if model is None or isinstance(model, str):
        return load_model(model or DEFAULT_MODEL, device=device, trust_code=trust_code)
    return model


def optimize(
    model: str | DiffusionModel = DEFAULT_MODEL,
    *,
    solver: str = "dpmpp-3m",
    nfe: int = 6,
    optimizer: str = "trust-region",
    order: int | None = None,
    variant: str | None = None,
    lower_order_final: bool | None = None,
    final_step: str = "none",
    seed: int = 0,
    device: str = "cpu",
    trust_code: bool = False,
    **config: Any,
) -> Schedule:
    """Optimize the time steps for ``model`` and a solver at exactly ``nfe`` evaluations.

    ``config`` holds the optimizer's options (the keys of ``--set``; an unknown key is an error
    listing the valid ones). Returns the validated schedule; ``schedule.save(path)`` writes it.
    ``trust_code`` lets a model id whose loader runs code (``python:``, ``edm:``) load, as
    ``--trust-code`` does.
    """
    from stepopt.config import resolve_config
    from stepopt.optimizers import get_optimizer
    from stepopt.optimizers import optimize as _optimize
    from stepopt.solvers import get_solver

    spec = get_optimizer(optimizer)
    cfg: Any = resolve_config(spec.config_cls, None, (), config)
    ident = get_solver(solver).identity(order, variant, lower_order_final)
    m = _model(model, device, trust_code)
    return _optimize(optimizer, m, ident, nfe, cfg, final_step=final_step, seed=seed, device=device)


def baseline(
    kind: str,
    model: str | DiffusionModel = DEFAULT_MODEL,
    *,
    solver: str = "dpmpp-3m",
    nfe: int = 6,
    order: int | None = None,
    variant: str | None = None,
    lower_order_final: bool | None = None,
    final_step: str = "none",
    rho: float = 7.0,
    trust_code: bool = False,
) -> Schedule:
    """A hand-crafted schedule (edm, logsnr, time-uniform, time-quadratic, kl-optimal), as ``stepopt baseline``.

    The defaults are those of :func:`optimize` (and of the CLI); ``trust_code`` as in :func:`optimize`.
    """
    from stepopt.build import baseline_schedule
    from stepopt.model_cards import model_card
    from stepopt.solvers.registry import get_solver

    spec = get_solver(solver)
    ident = spec.identity(order, variant, lower_order_final)
    n_steps = spec.steps_for_nfe(ident, nfe, final_step)
    m: Any = (model_card(model) if isinstance(model, str) else None) or _model(model, "cpu", trust_code)
    return baseline_schedule(kind, m, ident, n_steps, final_step=final_step, rho=rho)


def sample(
    schedule: Schedule | PathLike,
    n: int = 16,
    *,
    seed: int = 0,
    seeds: Iterable[int] | None = None,
    model: str | DiffusionModel | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    force: bool = False,
    trust_code: bool = False,
) -> torch.Tensor:
    """Samples with exactly the schedule's solver and grid, shape ``(n, *model.shape)``.

    Sample i starts from the noise of seed ``seed + i`` (or ``seeds[i]``), as ``stepopt sample``
    does, so the same call gives the same samples. The model defaults to the schedule's own; a
    model whose fingerprint or range does not match the schedule is an error unless ``force``.
    A schedule's own model id loads only if it is built in, unless ``trust_code`` (a shared file
    must not run code or read arbitrary paths).
    """
    import torch

    from stepopt.sampling import sample_schedule, schedule_mismatches

    s = schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)
    if model is None:
        from stepopt.trust import check_file_model

        check_file_model(s.model.id, "schedule", trust_code, model_option=False)
    m = load_model(s.model.id, device=device, trust_code=trust_code) if model is None else _model(model, device)
    problems = schedule_mismatches(s, m)
    if problems and not force:
        raise StepoptError(f"schedule does not belong to {m.id}: {problems[0]} (pass force=True to sample anyway)")
    ids = list(seeds) if seeds is not None else list(range(seed, seed + n))
    with torch.inference_mode():
        return sample_schedule(m, s, ids, batch_size=batch_size, device=device)


def export_schedule(
    schedule: Schedule | PathLike, to: str, out: PathLike | None = None, *, force: bool = False
) -> str | Path:
    """The schedule in another tool's format (see :data:`stepopt.export.FORMATS`): text, or the written path."""
    from stepopt.export import export_schedule as _export

    s = schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)
    return _export(s, to, out, force=force)
