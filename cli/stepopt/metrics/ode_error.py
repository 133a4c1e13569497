"""``ode-error``: how far a schedule's output lands from the exact ODE solution from the same noise.

With ``y`` the few-step output and ``y*`` the teacher's (exact ODE for analytic models, a many-step
solver for networks) from the same initial noise (seed i -> sample i),

    rmse = sqrt(mean_{i, j} (y_ij - y*_ij)^2),    max = max_{i, j} |y_ij - y*_ij|,

over samples i and data coordinates j, in data units (the digits live in [-1, 1]). This is the
quantity the trust-region and LD3 papers drive down (Xue et al. 2024, arXiv 2402.17376, Sec. 3:
the global error bound; Tong et al. 2025, arXiv 2405.15506, Eq. 3 with an L2 distance).

In ``stepopt eval`` (the ``ode-error`` kind registered here) the targets come from
:class:`stepopt.teacher.GridValidator` over each schedule's own sigma range and final step, one
teacher per range computed before the first row and shared by the rows that have it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from stepopt.metrics import EvalContext, MetricKind, MetricRequest, register_metric_kind
from stepopt.schedule import Schedule
from stepopt.teacher import GridValidator

KEY_RMSE = "rmse"
KEY_MAX = "max"


def ode_error(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``{"rmse": ..., "max": ...}`` of ``outputs - targets`` (same shape), computed in float64."""
    if outputs.shape != targets.shape:
        raise ValueError(f"ode-error: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ")
    if outputs.numel() == 0:
        raise ValueError("ode-error needs at least one sample")
    d = outputs.detach().to(torch.float64).cpu() - targets.detach().to(torch.float64).cpu()
    return {KEY_RMSE: float(d.square().mean().sqrt()), KEY_MAX: float(d.abs().max())}


def seed_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared error over its coordinates (float64, on the CPU): the per-seed
    errors whose mean is ``rmse**2`` (``eval --versus`` compares schedules on them)."""
    if outputs.shape != targets.shape:
        raise ValueError(f"ode-error: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ")
    d = outputs.detach().to(torch.float64).cpu() - targets.detach().to(torch.float64).cpu()
    return d.square().flatten(1).mean(1)


class OdeErrorMetric:
    """The ``ode-error`` kind: one :class:`GridValidator` (the teacher's targets) per sigma range and
    final step, shared by the rows; the teachers are computed first, each reported on its own (a
    teacher can take longer than all the rows together and is part of no row's time)."""

    def __init__(self, requests: Sequence[MetricRequest], ctx: EvalContext) -> None:
        self.requests = list(requests)
        self.ctx = ctx
        self.validators: dict[tuple[float, float, str], GridValidator] = {}

    def _validator(self, schedule: Schedule, **kw: Any) -> GridValidator:
        key = (schedule.sigmas[0], schedule.sigmas[-1], schedule.final_step)
        if key not in self.validators:
            cfg = self.ctx.config
            self.validators[key] = GridValidator(
                self.ctx.model,
                None,
                cfg.seeds,
                cfg.teacher,
                final_step=schedule.final_step,
                sigma_from=schedule.sigmas[0],
                sigma_to=schedule.sigmas[-1],
                batch_size=cfg.batch_size,
                device=self.ctx.device,
                cache=cfg.cache,
                **kw,
            )
        return self.validators[key]

    def prepare(self) -> None:
        progress = self.ctx.progress
        for sched in self.ctx.schedules:
            if (sched.sigmas[0], sched.sigmas[-1], sched.final_step) in self.validators:
                continue
            t0 = time.perf_counter()
            info = {"sigma_from": sched.sigmas[0], "sigma_to": sched.sigmas[-1], "n": self.ctx.config.n}

            def report(done: int, total: int, info: dict[str, Any] = info) -> None:
                if progress:
                    progress("teacher", {**info, "done": done, "total": total})

            self._validator(sched, progress=report)
            if progress:
                progress("teacher-done", {**info, "seconds": time.perf_counter() - t0})

    def compute(self, schedule: Schedule, samples: torch.Tensor) -> list[tuple[str, Any, dict[str, Any]]]:
        v = self._validator(schedule)
        return [(r.name, v.errors(samples), v.describe()) for r in self.requests]

    def per_seed(self, schedule: Schedule, samples: torch.Tensor) -> tuple[tuple[float, float, str], torch.Tensor]:
        """Each seed's squared error and the key of its targets (rows with the same key share them)."""
        key = (schedule.sigmas[0], schedule.sigmas[-1], schedule.final_step)
        return key, seed_mse(samples, self._validator(schedule).targets)


register_metric_kind(MetricKind("ode-error", OdeErrorMetric))
