"""Rectified-flow models in the one noise frame, and ``builtin:gmm-digits-flow``.

A flow model predicts the velocity ``v = eps - x0`` of ``x_t = (1 - t) x0 + t eps`` (t in [0, 1]).
In stepopt's frame (README: Conventions) ``sigma = t / (1 - t)``, the state is ``x = x_t / (1 - t)``
and the denoiser is ``D = x_t - t v``. At ``t = 1`` (``sigma = inf``) the state is stored
noise-scaled, ``x / sigma``, which is exactly ``x_t = eps``: :func:`flow_input` gives the network's
``(x_t, t)`` for any sigma, pure noise included, with no infinite intermediate.

``builtin:gmm-digits-flow`` is the digits Gaussian mixture of ``builtin:gmm-digits`` served as a
velocity model: its exact velocity is computed in the noise-scaled frame (``y = x_t / t``,
``rho = (1 - t) / t``, finite at t = 1) and the denoiser goes through the same ``D = x_t - t v`` as
the diffusers flow loaders. Its exact ODE solution from t = 1 integrates ``dy/drho = D`` from
``rho = 0`` (see :meth:`stepopt.models.gmm.GaussianMixture.ode_solution`). ``shift`` (default 3,
SD3's) or ``mu`` set the pipeline-default grid it records; the network itself does not depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from stepopt.errors import StepoptError
from stepopt.fingerprint import fingerprint_arrays
from stepopt.frames import Flow
from stepopt.models.base import AnalyticModel
from stepopt.models.gmm import GaussianMixture, load_gmm_digits

FLOW_SIGMA_MIN = 0.002


def flow_input(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, t)`` for a state ``x`` at ``sigma`` (B,), float64 t; ``sigma = inf``: ``x`` is noise-scaled.

    ``x_t = x / (1 + sigma)`` and ``t = sigma / (1 + sigma)``; at inf, ``x_t = x`` (= eps) and ``t = 1``.
    """
    sig = sigma.to(torch.float64).reshape(-1)
    inf = torch.isinf(sig)
    safe = torch.where(inf, torch.zeros_like(sig), sig)
    scale = torch.where(inf, torch.ones_like(sig), 1.0 / (1.0 + safe))
    t = torch.where(inf, torch.ones_like(sig), safe / (1.0 + safe))
    return x * scale.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype), t


def denoised_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``D = x_t - t v`` (t of shape (B,))."""
    return x_t - t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * v


class GaussianMixtureFlow(AnalyticModel):
    """A Gaussian mixture served as a rectified-flow (velocity) model with an exact ODE solution."""

    parameterization = "flow"

    def __init__(
        self, mixture: GaussianMixture, shift: float = 3.0, mu: float | None = None, id: str = "builtin:gmm-digits-flow"
    ) -> None:
        super().__init__(FLOW_SIGMA_MIN, 80.0)
        self.mixture = mixture
        self.flow_frame = Flow(shift=shift, mu=mu, t_min=FLOW_SIGMA_MIN / (1.0 + FLOW_SIGMA_MIN))
        self.frame = self.flow_frame
        self.sigma_min = FLOW_SIGMA_MIN
        self.sigma_max = math.inf
        self.shape = mixture.shape
        self.id = id
        w, m, c = mixture._params
        self._fingerprint = fingerprint_arrays([w, m, c, np.frombuffer(b"flow-velocity", dtype=np.uint8)])

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact ``v = E[eps - x0 | x_t]`` = ``(x_t - D) / t``, with D from the noise-scaled frame."""
        t = t.to(torch.float64).reshape(-1)
        tb = t.reshape(-1, *([1] * (x_t.ndim - 1)))
        y = x_t.to(torch.float64) / tb  # x / sigma
        d = self.mixture.denoise_scaled(y, (1.0 - t) / t)
        return ((x_t.to(torch.float64) - d) / tb).to(x_t.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        x_t, t = flow_input(x, sigma)
        return denoised_from_velocity(x_t, t, self.velocity(x_t, t))

    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        return self.mixture.ode_solution(x, sigma_from, sigma_to)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mixture.sample(n, generator)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shift": self.flow_frame.shift, "mu": self.flow_frame.mu}


def parse_key_values(
    text: str, convert: Mapping[str, Callable[[str], Any]], expected: str, *, skip_empty: bool = True
) -> dict[str, Any]:
    """``key=value,...`` (each key of ``convert`` at most once) converted by ``convert[key]``.

    A converter raises ``ValueError("must be ...")``; the error names the text and the key.
    ``skip_empty=False`` refuses empty parts (a trailing comma).
    """
    out: dict[str, Any] = {}
    for part in text.split(","):
        if not part and skip_empty:
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in convert or key in out:
            raise StepoptError(f"'{text}': expected {expected}")
        try:
            out[key] = convert[key](value)
        except ValueError as e:
            raise StepoptError(f"'{text}': {key} {e}") from None
    return out


def _finite(positive: bool) -> Callable[[str], float]:
    def convert(value: str) -> float:
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"must be a number, got '{value}'") from None
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"must be finite{' and > 0' if positive else ''}")
        return v

    return convert


def parse_flow_options(text: str) -> dict[str, float]:
    """``shift=S`` or ``mu=M`` (the part after ``builtin:gmm-digits-flow:``)."""
    out = parse_key_values(
        text,
        {"shift": _finite(positive=True), "mu": _finite(positive=False)},
        "shift=S or mu=M (e.g. builtin:gmm-digits-flow:shift=3)",
    )
    if len(out) > 1:
        raise StepoptError(f"'{text}': give shift or mu, not both")
    return out


def load_gmm_digits_flow(options: str = "") -> GaussianMixtureFlow:
    """``builtin:gmm-digits-flow`` (shift 3), or ``builtin:gmm-digits-flow:shift=S`` / ``:mu=M``."""
    opts = parse_flow_options(options)
    ident = "builtin:gmm-digits-flow" + (f":{options}" if options else "")
    return GaussianMixtureFlow(load_gmm_digits(), shift=opts.get("shift", 3.0), mu=opts.get("mu"), id=ident)
