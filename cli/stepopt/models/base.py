"""The model contract: a denoiser ``D(x, sigma, **cond) -> x0_hat`` in the EDM frame.

Every loader returns a :class:`DiffusionModel`: the denoiser plus its sigma range, noise frame
(native time), data shape, parameterization and a fingerprint of its weights. Analytic models
(:class:`AnalyticModel`) also know the exact solution of the probability-flow ODE, which makes
them the ground truth for solvers, optimizers and metrics.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stepopt.errors import StepoptError
from stepopt.fingerprint import fingerprint_arrays
from stepopt.frames import EDM, NoiseFrame, frame_ref_fields
from stepopt.schedule import ModelRef

__all__ = [
    "AnalyticModel",
    "DiffusionModel",
    "IsotropicGaussian",
    "LoadOptions",
    "PointMass",
    "fingerprint_arrays",
]


@dataclass(frozen=True)
class LoadOptions:
    """What every model loader receives besides its argument: where and in which precision to load,
    and ``trust_code``, without which loaders that run code named by a file (``edm:`` pickles) refuse."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # None: the model's own precision
    trust_code: bool = False


class DiffusionModel(ABC):
    """A denoiser with its metadata. Call it as ``model(x, sigma, **cond)``.

    ``x`` has shape ``(B, *shape)``; ``sigma`` is a scalar or a ``(B,)`` tensor (float64 is fine:
    the model casts to its own dtype). The output has the shape and dtype of ``x``.
    """

    id: str
    frame: NoiseFrame
    shape: tuple[int, ...]
    parameterization: str
    sigma_min: float
    sigma_max: float
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    # -- capabilities: explicit members with defaults; an adapter overrides what it has -------------
    latent: bool = False
    """A latent-space model (the state is an autoencoder's latent); optimizers whose defaults differ read it."""
    image_shape: tuple[int, ...] | None = None
    """The shape of one decoded image for a model with a decoder (:meth:`decode`); None without one."""
    concurrent_batches: bool = False
    """Its no-grad forward may run from several threads at once (a stateless network): on the CPU,
    independent batches of teachers and validators then run side by side (:mod:`stepopt.batches`)."""

    @property
    def net_dtype(self) -> torch.dtype:
        """The dtype the network runs in (half precision networks keep a float32 state); default: ``dtype``."""
        return self.__dict__.get("_net_dtype", self.dtype)

    @net_dtype.setter
    def net_dtype(self, value: torch.dtype) -> None:
        self.__dict__["_net_dtype"] = value

    def cond_for_seeds(self, seeds: Sequence[int]) -> dict[str, Any] | None:
        """Per-sample conditioning for the samples of ``seeds`` (e.g. which prompt each uses); None: unconditional."""
        return None

    def denoise_jacobian(self, x: torch.Tensor, sigma: float) -> torch.Tensor | None:
        """``dD/dx`` (B, d, d) at one finite sigma in closed form, or None where the model has none
        (gits ``propagate=linear`` then takes forward-mode JVPs of the denoiser)."""
        return None

    def conditioning_record(self) -> dict[str, Any] | None:
        """What changes every output besides the weights (prompts, guidance); part of the teacher cache key."""
        return None

    def conditioning_prompts(self) -> list[str]:
        """The prompts of a text-conditioned model, in prompt-index order; empty for other models."""
        return []

    def decode(self, x: torch.Tensor, batch_size: int = 8, *, grad: bool = False) -> torch.Tensor:
        """Images from final states, for models with a decoder (``image_shape`` is not None): float32 on the CPU,
        or with ``grad`` differentiable in ``x`` on the model's device (for losses on the image)."""
        raise StepoptError(f"{self.id} has no decoder (only latent models have one)")

    @abstractmethod
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The denoiser ``D(x, sigma) ~ E[x0 | x]``."""

    def __call__(self, x: torch.Tensor, sigma: Any, **cond: Any) -> torch.Tensor:
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.as_tensor(sigma, dtype=torch.float64)  # never via float32
        sigma = sigma.to(x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return self.denoise(x, sigma, **cond)

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """``sha256:...`` of the parameters; schedules record it and refuse a mismatch."""

    @property
    def time_domain(self) -> str:
        return self.frame.time_domain

    def ref(self) -> ModelRef:
        return ModelRef(
            self.id, self.fingerprint, self.sigma_min, self.sigma_max, self.time_domain, **frame_ref_fields(self.frame)
        )

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The sigma the network actually sees (identity for continuous models)."""
        return sigma

    @property
    def integer_timesteps(self) -> bool:
        """True for a network trained at integer timesteps only (a ``vp-discrete`` frame whose
        adapter rounds the timestep): every grid written for it lies on those timesteps."""
        return False

    def differentiable_time(self) -> DiffusionModel:
        """This denoiser with the network's time differentiable in sigma, for optimizers that
        backpropagate into the grid (ld3, trust-region ``teacher_refine``).

        A network trained at integer timesteps (``integer_timesteps``) gets its timestep rounded when
        sampling, and a rounded value has zero derivative: the grid would see the network's time
        dependence only through the input scaling. Such models return a twin sharing the weights
        whose time embedding is evaluated at the fractional timestep (equal to the model's output
        wherever sigma lies on a trained timestep). Models whose time is already continuous, and
        those that cannot take a fractional time (:attr:`time_gradient` says so), return themselves.
        """
        return self

    @property
    def time_gradient(self) -> str:
        """How the grid's gradient reaches the network's time: ``continuous`` (the time the network
        sees is a smooth function of sigma), ``fractional-timestep`` (via :meth:`differentiable_time`)
        or ``none`` (only through the input scaling, e.g. a learned embedding table)."""
        return "continuous"

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "shape": list(self.shape),
            "parameterization": self.parameterization,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "frame": self.frame.describe(),
            "fingerprint": self.fingerprint,
        }

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move to ``device`` / cast to ``dtype`` in place; returns self."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self


class AnalyticModel(DiffusionModel):
    """A model whose probability-flow ODE solution is known (closed form or to 1e-8)."""

    parameterization = "exact"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.frame = EDM(sigma_min, sigma_max)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.dtype = torch.float64

    @abstractmethod
    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact state at ``sigma_to`` of the ODE dx/dsigma = (x - D(x, sigma)) / sigma.

        ``sigma_from`` may be ``inf`` (pure noise): ``x`` is then the noise-scaled state ``x / sigma``.
        """

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples from the data distribution, shape ``(n, *shape)``, float64."""


class PointMass(AnalyticModel):
    """Data = one point ``x0``: D(x, sigma) = x0, and x(sigma) = x0 + sigma/sigma_T (x_T - x0)."""

    def __init__(
        self, x0: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, id: str = "builtin:point-mass"
    ) -> None:
        super().__init__(sigma_min, sigma_max)
        self.x0 = torch.as_tensor(x0, dtype=torch.float64)
        self.shape = tuple(self.x0.shape)
        self.id = id

    @property
    def fingerprint(self) -> str:
        return fingerprint_arrays([self.x0])

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.x0.to(device=x.device, dtype=x.dtype).expand_as(x) + 0 * x

    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        x0 = self.x0.to(device=x.device, dtype=x.dtype)
        if math.isinf(sigma_from):  # x = y noise-scaled: the limit of (sigma_to / sigma_from)(sigma_from y - x0)
            return x0 + sigma_to * x
        return x0 + (sigma_to / sigma_from) * (x - x0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.x0.expand(n, *self.shape).clone()


class IsotropicGaussian(AnalyticModel):
    """Data ~ N(mu, c^2 I): D = mu + c^2/(c^2+sigma^2) (x - mu); x(s) - mu = (x_T - mu) sqrt((c^2+s^2)/(c^2+s_T^2))."""

    def __init__(
        self,
        mu: torch.Tensor,
        c: float = 1.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        id: str = "builtin:gaussian",
    ) -> None:
        super().__init__(sigma_min, sigma_max)
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.c = float(c)
        self.shape = tuple(self.mu.shape)
        self.id = id

    @property
    def fingerprint(self) -> str:
        return fingerprint_arrays([self.mu, np.array(self.c, dtype=np.float64)])

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        mu = self.mu.to(device=x.device, dtype=x.dtype)
        s2 = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        gain = (self.c**2 / (self.c**2 + s2)).to(x.dtype)
        return mu + gain * (x - mu)

    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        mu = self.mu.to(device=x.device, dtype=x.dtype)
        if math.isinf(sigma_from):  # x = y noise-scaled: the limit sqrt(c^2 + sigma_to^2) y
            return mu + (self.c**2 + sigma_to**2) ** 0.5 * x
        ratio = ((self.c**2 + sigma_to**2) / (self.c**2 + sigma_from**2)) ** 0.5
        return mu + ratio * (x - mu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.mu + self.c * eps
