"""The isotropic Gaussian's denoiser presented as a network (no ODE solution): teachers run a solver.

``inner`` is the analytic model, whose closed-form ODE solution is the ground truth.
"""

from __future__ import annotations

from typing import Any

import torch

from stepopt.models import IsotropicGaussian
from stepopt.models.base import DiffusionModel


class GaussianNet(DiffusionModel):
    """The Gaussian's denoiser presented as a network (no ODE solution): the teacher runs a solver."""

    def __init__(self) -> None:
        self.inner = IsotropicGaussian(torch.zeros(1, 4, 4, dtype=torch.float64), c=0.5)
        self.id, self.frame, self.shape = "python:gaussian-net", self.inner.frame, self.inner.shape
        self.parameterization, self.sigma_min, self.sigma_max = "x0", 0.002, 80.0
        self.dtype = torch.float64

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.inner.denoise(x, sigma)

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint
