"""Deterministic initial noise and batched sampling (design.md §1, "Determinism").

Sample ``i`` always starts from the noise of seed ``i``: one CPU generator per sample, so the
result does not depend on batch size, device or order of work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from stepopt.models.base import DiffusionModel
from stepopt.schedule import Schedule
from stepopt.solvers import SolverIdentity, solve


def unit_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal noise of shape ``(len(seeds), *shape)``; row i from ``manual_seed(seeds[i])``."""
    rows = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float64))
    if not rows:
        return torch.empty((0, *shape), dtype=dtype)
    return torch.stack(rows).to(dtype)


def initial_noise(
    model: DiffusionModel,
    seeds: Sequence[int],
    sigma: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x_T = sigma_T * eps (sigma_T defaults to the model's sigma_max), in the EDM frame."""
    s = model.sigma_max if sigma is None else sigma
    eps = unit_noise(model.shape, seeds)
    return (s * eps).to(device=device or model.device, dtype=dtype or model.dtype)


def run_schedule(
    model: DiffusionModel,
    schedule: Schedule,
    x: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Run exactly the schedule's solver and grid from ``x`` (noise at ``schedule.sigmas[0]``)."""
    return solve(
        schedule.solver,
        model,
        x,
        schedule.sigmas_tensor(x.device),
        model_sigmas=schedule.model_sigmas_tensor(x.device),
        cond=cond,
        callback=callback,
        final_step=schedule.final_step,
    )


def sample_grid(
    model: DiffusionModel,
    solver: SolverIdentity,
    sigmas: torch.Tensor | Sequence[float],
    seeds: Sequence[int],
    *,
    model_sigmas: torch.Tensor | Sequence[float] | None = None,
    final_step: str = "none",
    batch_size: int = 256,
    cond: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Samples for ``seeds`` (noise at ``sigmas[0]``), batched; identical for any batch size."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    outs = []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start : start + batch_size])
        x = initial_noise(model, chunk, sigma=float(sig[0]), device=device)
        outs.append(
            solve(solver, model, x, sig.to(x.device), model_sigmas=model_sigmas, cond=cond, final_step=final_step)
        )
    return torch.cat(outs) if outs else torch.empty((0, *model.shape))
