"""Hand-crafted schedules in the same file format as optimized ones.

* ``edm``: Karras et al. (2022) Eq. 5, ``sigma_i = (smax^(1/rho) + i/N (smin^(1/rho) - smax^(1/rho)))^rho``;
* ``logsnr``: uniform in ``lam = -log sigma`` (DPM-Solver's "logSNR" steps);
* ``time-uniform`` / ``time-quadratic``: uniform / quadratic in the model's native time
  (DPM-Solver's ``time_uniform`` and ``time_quadratic``). Models that live in the sigma frame (EDM,
  the analytic built-ins) have no native diffusion time, so the VP-linear convention (beta 0.1-20)
  stands in for it, as DPM-Solver and the trust-region paper do; VP-discrete indices use
  DPM-Solver's continuous time ``t = (index + 1) / T``;
* ``kl-optimal``: Align Your Steps, Theorem 3.1 with c = 1,
  ``sigma_i = tan((1 - i/N) atan(smax) + (i/N) atan(smin))``;
* ``interpolate``: log-linear interpolation of an existing schedule to another step count
  (AYS Sec. 3.3: reverse to ascending, interpolate log sigma over linspace(0, 1), endpoints kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepopt.errors import StepoptError
from stepopt.frames import NoiseFrame, VPDiscrete, VPLinear

BASELINES = ("edm", "logsnr", "time-uniform", "time-quadratic", "kl-optimal")


@dataclass(frozen=True)
class BaselineParams:
    rho: float = 7.0


def _native_frame(frame: NoiseFrame) -> tuple[NoiseFrame, str]:
    """The frame whose time a ``time-*`` baseline is uniform in, and what the file should say."""
    if frame.time_domain == "sigma":
        return VPLinear(), "vp-linear (beta 0.1-20) time, standing in for a sigma-frame model"
    return frame, f"native {frame.time_domain} time"


def _to_continuous(frame: NoiseFrame, t: np.ndarray) -> np.ndarray:
    if isinstance(frame, VPDiscrete):
        return (t + 1.0) / frame.num_train_timesteps
    return t


def _from_continuous(frame: NoiseFrame, t: np.ndarray) -> np.ndarray:
    if isinstance(frame, VPDiscrete):
        return t * frame.num_train_timesteps - 1.0
    return t


def baseline_sigmas(
    kind: str,
    n_steps: int,
    sigma_max: float,
    sigma_min: float,
    frame: NoiseFrame | None = None,
    rho: float = 7.0,
) -> np.ndarray:
    """N+1 strictly decreasing sigmas from ``sigma_max`` to ``sigma_min`` (endpoints exact).

    >>> baseline_sigmas("logsnr", 2, 100.0, 1.0).tolist()
    [100.0, 10.0, 1.0]
    """
    if n_steps < 1:
        raise StepoptError(f"a schedule needs at least 1 step, got {n_steps}")
    if not 0 < sigma_min < sigma_max:
        raise StepoptError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    u = np.linspace(0.0, 1.0, n_steps + 1)
    if kind == "edm":
        if not rho > 0:
            raise StepoptError(f"rho must be > 0, got {rho}")
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        s = (a + u * (b - a)) ** rho
    elif kind == "logsnr":
        s = np.exp(np.log(sigma_max) + u * (np.log(sigma_min) - np.log(sigma_max)))
    elif kind in ("time-uniform", "time-quadratic"):
        f, _ = _native_frame(frame if frame is not None else VPLinear())
        t_hi = _to_continuous(f, np.asarray(f.time(sigma_max)))
        t_lo = _to_continuous(f, np.asarray(f.time(sigma_min)))
        if kind == "time-uniform":
            t = t_hi + u * (t_lo - t_hi)
        else:
            t = (np.sqrt(t_hi) + u * (np.sqrt(t_lo) - np.sqrt(t_hi))) ** 2
        s = np.asarray(f.sigma(_from_continuous(f, t)), dtype=np.float64)
    elif kind == "kl-optimal":
        s = np.tan((1 - u) * math.atan(sigma_max) + u * math.atan(sigma_min))
    else:
        raise StepoptError(f"unknown baseline '{kind}'; expected one of {', '.join(BASELINES)}")
    s = np.asarray(s, dtype=np.float64)
    s[0], s[-1] = sigma_max, sigma_min
    if not np.all(np.diff(s) < 0):
        raise StepoptError(
            f"baseline '{kind}' with {n_steps} steps is not strictly decreasing on "
            f"[{sigma_min}, {sigma_max}] (too many steps for this time grid?)"
        )
    return s


def interpolate_loglinear(sigmas: Sequence[float] | np.ndarray, n_steps: int) -> np.ndarray:
    """Resample a descending grid to ``n_steps + 1`` values, log-linearly in the step index.

    >>> interpolate_loglinear([100.0, 1.0], 2).tolist()
    [100.0, 10.0, 1.0]
    """
    s = np.asarray(sigmas, dtype=np.float64)
    if s.ndim != 1 or len(s) < 2 or np.any(s <= 0):
        raise StepoptError("interpolation needs a grid of at least 2 positive sigmas")
    if n_steps < 1:
        raise StepoptError(f"a schedule needs at least 1 step, got {n_steps}")
    ys = np.log(s[::-1])
    xs = np.linspace(0.0, 1.0, len(s))
    out = np.exp(np.interp(np.linspace(0.0, 1.0, n_steps + 1), xs, ys))[::-1].copy()
    out[0], out[-1] = s[0], s[-1]
    return out


def baseline_config(kind: str, frame: NoiseFrame | None, rho: float) -> dict[str, Any]:
    """The resolved configuration a baseline schedule file records."""
    cfg: dict[str, Any] = {}
    if kind == "edm":
        cfg["rho"] = float(rho)
    if kind in ("time-uniform", "time-quadratic"):
        cfg["time"] = _native_frame(frame if frame is not None else VPLinear())[1]
    if kind == "kl-optimal":
        cfg["c"] = 1.0
    return cfg
