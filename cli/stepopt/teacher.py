"""Teacher outputs: where the ODE from a given noise really ends (design.md §4; methods.md §3).

For analytic models the teacher is the exact ODE solution (closed form, or DOP853 to ~1e-10 for
the mixture); for networks it is a many-step solver run (configurable). ``teacher_outputs`` is the
one entry point used by ``eval``, the optimizers' model-aware selection and LD3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from stepopt.baselines import baseline_sigmas
from stepopt.models.base import AnalyticModel, DiffusionModel
from stepopt.sampling import initial_noise
from stepopt.solvers import get_solver, solve


@dataclass(frozen=True)
class TeacherConfig:
    """Many-step teacher for networks (ignored for analytic models, whose teacher is exact)."""

    solver: str = "heun"
    order: int | None = None
    steps: int = 100
    grid: str = "edm"
    rho: float = 7.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def teacher_outputs(
    model: DiffusionModel,
    seeds: Sequence[int],
    config: TeacherConfig | None = None,
    *,
    sigma_from: float | None = None,
    sigma_to: float | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x_end) for the given seeds: noise at ``sigma_from`` and the ODE state at ``sigma_to``.

    Defaults: from the model's sigma_max to its sigma_min.
    """
    cfg = config or TeacherConfig()
    s_hi = model.sigma_max if sigma_from is None else sigma_from
    s_lo = model.sigma_min if sigma_to is None else sigma_to
    xs, ys = [], []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start : start + batch_size])
        x = initial_noise(model, chunk, sigma=s_hi, device=device)
        if isinstance(model, AnalyticModel):
            y = model.ode_solution(x, s_hi, s_lo)
        else:
            spec = get_solver(cfg.solver)
            ident = spec.identity(cfg.order)
            grid = torch.as_tensor(baseline_sigmas(cfg.grid, cfg.steps, s_hi, s_lo, model.frame, rho=cfg.rho))
            with torch.no_grad():
                y = solve(ident, model, x, grid.to(x.device))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
