"""LD3's grid: logits theta and model-time offsets xi -> sigmas and model sigmas (differentiable, float64).

See :mod:`stepopt.optimizers.ld3` ("Grid", "Decoupled model time") for the parameterization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from stepopt.errors import StepoptError
from stepopt.frames import NoiseFrame
from stepopt.models.base import DiffusionModel
from stepopt.optimizers.ld3.config import Ld3Config


@dataclass(frozen=True)
class GridSpace:
    """The coordinate s of the grid: increasing along sampling, s_0 at sigma_max and s_N at sigma_min.

    ``lam``: s = -log sigma. ``time``: s = (t_max - t) / (t_max - t_min), t the model's native time.
    """

    kind: Literal["lam", "time"]
    frame: NoiseFrame
    sigma_max: float
    sigma_min: float

    @property
    def _t(self) -> tuple[float, float]:
        return float(self.frame.time(self.sigma_max)), float(self.frame.time(self.sigma_min))

    def s(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float64)
        if self.kind == "lam":
            return -torch.log(sigma)
        t_hi, t_lo = self._t
        return (t_hi - self.frame.time(sigma)) / (t_hi - t_lo)

    def sigma(self, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "lam":
            return torch.exp(-s)
        t_hi, t_lo = self._t
        return self.frame.sigma(t_hi - s * (t_hi - t_lo))

    @property
    def ends(self) -> tuple[float, float]:
        if self.kind == "lam":
            return -math.log(self.sigma_max), -math.log(self.sigma_min)
        return 0.0, 1.0


def grid_coordinates(theta: torch.Tensor, space: GridSpace) -> torch.Tensor:
    """s_i = s_0 + u_i (s_N - s_0) with u the normalised cumulated softmax of the logits, (N+1,)."""
    c = torch.cumsum(torch.softmax(theta, dim=0), dim=0)
    u = (c - c[0]) / (c[-1] - c[0])
    s0, s1 = space.ends
    return s0 + u * (s1 - s0)


def clamped_offsets(xi: torch.Tensor, s: torch.Tensor, window: float) -> torch.Tensor:
    """xi clipped to ``window`` x the smallest gap of the grid ``s`` (same coordinate), 0 at both ends."""
    m = window * torch.diff(s.detach()).min()
    inner = torch.clamp(xi[1:-1], min=-m, max=m)
    zero = xi.new_zeros(1)
    return torch.cat([zero, inner, zero])


def ld3_grid(
    theta: torch.Tensor, xi: torch.Tensor | None, space: GridSpace, window: float = 0.5, free_end: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sigmas, model_sigmas) of the parameters; both ends exactly sigma_max and sigma_min.

    ``free_end`` (a final denoise follows the last node): ``theta`` has N+2 logits, the last one the
    gap between the last node and sigma_min that the denoise skips; the grid is the first N+1 points,
    its last node free (its model time is its own, as at sigma_max).
    """
    s = grid_coordinates(theta, space)
    hi = theta.new_tensor([space.sigma_max])
    if free_end:
        s = s[:-1]
        last = space.sigma(s[-1:])
    else:
        last = theta.new_tensor([space.sigma_min])
    sig = torch.cat([hi, space.sigma(s[1:-1]), last])
    if xi is None:
        return sig, None
    s_model = s + clamped_offsets(xi, s, window)
    return sig, torch.cat([hi, space.sigma(s_model[1:-1]), last])


# With a free last node, a start whose last node is sigma_min gets this share of the coordinate
# range as its skipped gap (its logit must be finite to move).
FREE_END_SHARE = 0.01


def params_from_sigmas(
    sigmas: Any, space: GridSpace, model_sigmas: Any = None, what: str = "start grid", free_end: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta, xi) whose grid is ``sigmas`` (and whose model times are ``model_sigmas``), both (N+1,).

    ``free_end``: theta has N+2 logits (:func:`ld3_grid`); the last node may lie above sigma_min, and one
    at sigma_min is moved up by :data:`FREE_END_SHARE` of the coordinate range.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    ends = [("sigmas[0]", float(sig[0]), space.sigma_max)]
    if not free_end:
        ends.append((f"sigmas[{len(sig) - 1}]", float(sig[-1]), space.sigma_min))
    for name, got, want in ends:
        if abs(got - want) > 1e-6 * want:
            raise StepoptError(
                f"{what}: {name} = {got!r} differs from the model's {want!r}; "
                "LD3 keeps both ends fixed, so the start must span the model's sigma range"
            )
    s = space.s(sig)
    if free_end:
        s_end = space.s(sig.new_tensor([space.sigma_min]))
        skip = torch.clamp(s_end - s[-1], min=FREE_END_SHARE * (s_end - s[0]))
        s = torch.cat([s, s[-1:] + skip])
    u = (s - s[0]) / (s[-1] - s[0])
    d = torch.diff(u)
    if not bool((d > 0).all()):
        raise StepoptError(f"{what}: the grid is not strictly monotone in the LD3 coordinate")
    # softmax(theta)_{1..N} proportional to the increments; theta_0 cancels out (set to 0).
    logd = torch.log(d)
    theta = torch.cat([logd.new_zeros(1), logd - logd.mean()])
    xi = torch.zeros(len(sig), dtype=torch.float64)
    if model_sigmas is not None:
        xi = space.s(torch.as_tensor(model_sigmas, dtype=torch.float64)) - s[: len(sig)]
        xi[0] = xi[-1] = 0.0
    return theta, xi


def grid_space(cfg: Ld3Config, model: DiffusionModel) -> GridSpace:
    """The coordinate of ``cfg.space`` for ``model`` (auto: time for latent models and models that start
    from pure noise, whose ``lam`` has no finite end; else lam)."""
    kind = cfg.space
    pure_noise = math.isinf(model.sigma_max)
    if kind == "auto":
        kind = "time" if model.latent or pure_noise else "lam"
    if kind == "lam" and pure_noise:
        raise StepoptError(
            f"ld3: space 'lam' has no finite end at pure noise ({model.id} starts at sigma = inf); use space: time"
        )
    return GridSpace(kind, model.frame, float(model.sigma_max), float(model.sigma_min))  # type: ignore[arg-type]
