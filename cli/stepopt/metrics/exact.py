"""``fd-exact``: the Fréchet distance of the samples to the exact marginal of an analytic model.

For the mixture (``builtin:gmm-digits``) the data distribution is known, and so is the marginal the
probability-flow ODE transports the noise to at the schedule's last sigma: ``p_sigma = p_0 * N(0,
sigma^2 I)``, with mean ``m`` and covariance ``C + sigma^2 I`` (``m, C`` from
``GaussianMixture.mean_and_covariance()``; sigma = 0 for ``final_step: denoise``). ``fd-exact`` is
the Fréchet distance (Dowson & Landau 1982; the formula of FID, Heusel et al. 2017 Eq. 6) between
the Gaussian with the samples' mean and covariance (unbiased, as ``np.cov``) and that Gaussian,

    FD = |m_s - m|^2 + tr(C_s) + tr(C) - 2 tr((C^{1/2} C_s C^{1/2})^{1/2}),

in pixel space (64 dimensions for the digits), in float64, with no feature extractor between
the samples and the truth. It is zero only when the first two moments match; exact samples give
a small positive value that shrinks like O(d / n) with the number of samples n.

In ``stepopt eval`` (the ``fd-exact`` kind registered here) the target sigma is the schedule's
last one, 0 after a final denoising step; a model without known moments is refused before any
sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stepopt.errors import StepoptError
from stepopt.metrics import EvalContext, MetricKind, MetricRequest, register_metric_kind
from stepopt.models.base import DiffusionModel, IsotropicGaussian, PointMass
from stepopt.models.gmm import GaussianMixture
from stepopt.schedule import Schedule


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    w, v = torch.linalg.eigh(0.5 * (c + c.T))
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(m1: torch.Tensor, c1: torch.Tensor, m2: torch.Tensor, c2: torch.Tensor) -> float:
    """Fréchet distance between N(m1, c1) and N(m2, c2) (float64; ``m`` of shape (d,), ``c`` (d, d))."""
    m1, c1, m2, c2 = (t.detach().to(torch.float64).cpu() for t in (m1, c1, m2, c2))
    if m1.shape != m2.shape or c1.shape != c2.shape or c1.shape != (m1.numel(), m1.numel()):
        raise ValueError(f"frechet_distance: shapes {m1.shape}, {c1.shape}, {m2.shape}, {c2.shape} disagree")
    s2 = _psd_sqrt(c2)
    cross = torch.linalg.eigvalsh(s2 @ c1 @ s2).clamp_min(0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + torch.trace(c1) + torch.trace(c2) - 2 * cross)


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of samples ``(n, *shape)``, float64."""
    f = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()
    if f.shape[0] < 2:
        raise ValueError("sample moments need at least 2 samples")
    return f.mean(0), torch.cov(f.T, correction=1)


def exact_moments(model: DiffusionModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The data distribution's exact mean (d,) and covariance (d, d) for the analytic built-ins."""
    if isinstance(model, GaussianMixture):
        return model.mean_and_covariance()
    if isinstance(model, IsotropicGaussian):
        d = model.mu.numel()
        return model.mu.reshape(-1), model.c**2 * torch.eye(d, dtype=torch.float64)
    if isinstance(model, PointMass):
        d = model.x0.numel()
        return model.x0.reshape(-1), torch.zeros(d, d, dtype=torch.float64)
    raise StepoptError(
        f"fd-exact needs a model with known data moments (builtin:gmm-digits, builtin:gaussian,"
        f" builtin:point-mass); '{model.id}' has none"
    )


def fd_exact(samples: torch.Tensor, model: DiffusionModel, sigma: float = 0.0) -> float:
    """FD between the samples and the model's exact marginal at noise level ``sigma`` (0: the data)."""
    m, c = exact_moments(model)
    c = c + float(sigma) ** 2 * torch.eye(c.shape[0], dtype=torch.float64)
    ms, cs = sample_moments(samples)
    return frechet_distance(ms, cs, m, c)


class FdExactMetric:
    """The ``fd-exact`` kind (checks at setup that the model's moments are known)."""

    def __init__(self, requests: Sequence[MetricRequest], ctx: EvalContext) -> None:
        self.requests = list(requests)
        self.model = ctx.model
        exact_moments(ctx.model)  # fail before any sampling when the model has no known moments

    def prepare(self) -> None:
        pass

    def compute(self, schedule: Schedule, samples: torch.Tensor) -> list[tuple[str, Any, dict[str, Any]]]:
        sigma = 0.0 if schedule.final_step == "denoise" else schedule.sigmas[-1]
        value = fd_exact(samples, self.model, sigma)
        return [(r.name, value, {"space": "pixels", "target_sigma": sigma}) for r in self.requests]


register_metric_kind(MetricKind("fd-exact", FdExactMetric))
