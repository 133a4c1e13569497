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
* ``flow-default`` (flow models only, :data:`FLOW_BASELINES`): what a flow pipeline gives today
  (diffusers' ``FlowMatchEulerDiscreteScheduler`` in the SD3 / FLUX pipelines): ``u = linspace(1, 1/M,
  M)``, shifted (``t = s u / (1 + (s-1) u)``, FLUX: ``s = e^mu``), then t = 0. M = N + 1 evaluations:
  the N+1 points are ``sigma = s u / (1 - u)`` (the first ``inf``) and the jump to t = 0 is
  ``final_step: denoise``. Its last point is the pipeline's ``s / N``, not the model's sigma_min.

Models whose range includes pure noise (``sigma_max = inf``, flow models): ``time-uniform`` /
``time-quadratic`` are uniform / quadratic in the native flow time from t = 1 (sigma = inf) down,
and ``kl-optimal`` is its formula with ``atan(inf) = pi/2``; both begin at ``inf`` by themselves.
``edm`` and ``logsnr`` have no finite form there (``inf^(1/rho)``, ``log inf``): they are ``inf``
followed by their N-1 step grid from the largest finite training noise level of the frame,
``sigma_top`` (flow: ``t = shift(1 - 1/1000)``, ``sigma = 999 s``, where diffusers'
``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` starts), to sigma_min.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stepopt.errors import StepoptError
from stepopt.frames import Flow, NoiseFrame, VPDiscrete, VPLinear
from stepopt.registry import Registry


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


# (u in [0, 1] with N+1 points, sigma_max, sigma_min, frame, rho) -> N+1 sigmas (endpoints fixed later).
SigmasFn = Callable[[np.ndarray, float, float, NoiseFrame, float], np.ndarray]


@dataclass(frozen=True)
class BaselineSpec:
    """A hand-crafted schedule: its grid as a function of the step fraction u, and what a file records."""

    name: str
    sigmas: SigmasFn
    config: Callable[[NoiseFrame, float], dict[str, Any]] = lambda frame, rho: {}


def _edm(u: np.ndarray, smax: float, smin: float, frame: NoiseFrame, rho: float) -> np.ndarray:
    if not rho > 0:
        raise StepoptError(f"rho must be > 0, got {rho}")
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return (a + u * (b - a)) ** rho


def _logsnr(u: np.ndarray, smax: float, smin: float, frame: NoiseFrame, rho: float) -> np.ndarray:
    return np.exp(np.log(smax) + u * (np.log(smin) - np.log(smax)))


def _time(quadratic: bool) -> SigmasFn:
    def sigmas(u: np.ndarray, smax: float, smin: float, frame: NoiseFrame, rho: float) -> np.ndarray:
        f, _ = _native_frame(frame)
        t_hi = _to_continuous(f, np.asarray(f.time(smax)))
        t_lo = _to_continuous(f, np.asarray(f.time(smin)))
        if quadratic:
            t = (np.sqrt(t_hi) + u * (np.sqrt(t_lo) - np.sqrt(t_hi))) ** 2
        else:
            t = t_hi + u * (t_lo - t_hi)
        with np.errstate(divide="ignore"):  # flow: t = 1 is sigma = inf
            return np.asarray(f.sigma(_from_continuous(f, t)), dtype=np.float64)

    return sigmas


def _kl_optimal(u: np.ndarray, smax: float, smin: float, frame: NoiseFrame, rho: float) -> np.ndarray:
    return np.tan((1 - u) * math.atan(smax) + u * math.atan(smin))


def _time_config(frame: NoiseFrame, rho: float) -> dict[str, Any]:
    return {"time": _native_frame(frame)[1]}


BASELINE_SPECS: Registry[BaselineSpec] = Registry("baseline")


def register_baseline(spec: BaselineSpec) -> BaselineSpec:
    return BASELINE_SPECS.register(spec.name, spec)


register_baseline(BaselineSpec("edm", _edm, lambda frame, rho: {"rho": float(rho)}))
register_baseline(BaselineSpec("logsnr", _logsnr))
register_baseline(BaselineSpec("time-uniform", _time(quadratic=False), _time_config))
register_baseline(BaselineSpec("time-quadratic", _time(quadratic=True), _time_config))
register_baseline(BaselineSpec("kl-optimal", _kl_optimal, lambda frame, rho: {"c": 1.0}))
BASELINES: tuple[str, ...] = tuple(BASELINE_SPECS.names())
# Kinds only flow models have (not among the generic BASELINES that optimizers try on every model).
FLOW_BASELINES = ("flow-default",)
# Flow models' training steps (diffusers' num_train_timesteps): the largest finite t is shift(1 - 1/T).
FLOW_TRAIN_STEPS = 1000


def sigma_top(frame: NoiseFrame | None) -> float:
    """The largest finite noise level of a frame whose range includes pure noise (flow: 999 s)."""
    if isinstance(frame, Flow):
        return float(frame.sigma(frame.shift_time(1.0 - 1.0 / FLOW_TRAIN_STEPS)))
    raise StepoptError("a grid from sigma_max = inf needs a flow frame (its largest finite noise level)")


def flow_default_sigmas(frame: NoiseFrame | None, n_steps: int) -> np.ndarray:
    """The flow pipeline default for N + 1 evaluations: N + 1 points from inf (then ``final_step: denoise``)."""
    if not isinstance(frame, Flow):
        raise StepoptError("baseline 'flow-default' is for flow models (time: flow) only")
    m = n_steps + 1
    u = np.linspace(1.0, 1.0 / m, m)
    s = np.asarray(frame.sigma(frame.shift_time(u)), dtype=np.float64)
    s[0] = math.inf
    return s


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
    if kind == "flow-default":
        return flow_default_sigmas(frame, n_steps)
    spec = BASELINE_SPECS.get(kind)
    if math.isinf(sigma_max) and kind in ("edm", "logsnr"):
        # No finite form at inf: pure noise, then the kind's N-1 steps from the largest finite level.
        if n_steps == 1:
            return np.array([math.inf, sigma_min])
        top = sigma_top(frame)
        return np.concatenate([[math.inf], baseline_sigmas(kind, n_steps - 1, top, sigma_min, frame, rho)])
    u = np.linspace(0.0, 1.0, n_steps + 1)
    s = np.asarray(spec.sigmas(u, sigma_max, sigma_min, frame if frame is not None else VPLinear(), rho), np.float64)
    s[0], s[-1] = sigma_max, sigma_min
    if not np.all(np.diff(s) < 0):
        raise StepoptError(
            f"baseline '{kind}' with {n_steps} steps is not strictly decreasing on "
            f"[{sigma_min}, {sigma_max}] (too many steps for this time grid?)"
        )
    return s


class SigmaRange(Protocol):
    """What a start grid needs of a model: its sigma range and frame (a :class:`DiffusionModel` has them)."""

    sigma_max: float
    sigma_min: float
    frame: NoiseFrame


def start_sigmas(kind: str, model: SigmaRange, n_steps: int, rho: float = 7.0) -> np.ndarray:
    """The baseline ``kind`` with ``n_steps`` steps on ``model``'s own sigma range, in its frame.

    The one place where optimizers (trust-region, AYS, LD3, GITS/OSS candidates) and baseline
    schedules build their start grids.
    """
    return baseline_sigmas(kind, n_steps, model.sigma_max, model.sigma_min, model.frame, rho=rho)


def interpolate_loglinear(sigmas: Sequence[float] | np.ndarray, n_steps: int) -> np.ndarray:
    """Resample a descending grid to ``n_steps + 1`` values, log-linearly in the step index.

    A grid from pure noise (``sigma = inf`` first; log-linear has no finite form there) stays
    ``inf`` followed by its finite part resampled to ``n_steps - 1`` steps, as ``edm`` and ``logsnr``
    begin at inf.

    >>> interpolate_loglinear([100.0, 1.0], 2).tolist()
    [100.0, 10.0, 1.0]
    >>> interpolate_loglinear([float("inf"), 100.0, 1.0], 3).tolist()
    [inf, 100.0, 10.0, 1.0]
    """
    s = np.asarray(sigmas, dtype=np.float64)
    if s.ndim != 1 or len(s) < 2 or np.any(s <= 0) or np.any(np.isnan(s)) or np.any(np.isinf(s[1:])):
        raise StepoptError("interpolation needs a grid of at least 2 positive sigmas (only the first may be inf)")
    if n_steps < 1:
        raise StepoptError(f"a schedule needs at least 1 step, got {n_steps}")
    if math.isinf(s[0]):
        if n_steps == 1:
            return np.array([math.inf, s[-1]])
        if len(s) < 3:
            raise StepoptError("a grid from sigma = inf needs at least one finite step to interpolate")
        return np.concatenate([[math.inf], interpolate_loglinear(s[1:], n_steps - 1)])
    ys = np.log(s[::-1])
    xs = np.linspace(0.0, 1.0, len(s))
    out = np.exp(np.interp(np.linspace(0.0, 1.0, n_steps + 1), xs, ys))[::-1].copy()
    out[0], out[-1] = s[0], s[-1]
    return out


def baseline_config(kind: str, frame: NoiseFrame | None, rho: float) -> dict[str, Any]:
    """The resolved configuration a baseline schedule file records."""
    if kind == "flow-default" and isinstance(frame, Flow):
        return {"shift": frame.shift, "mu": frame.mu, "u": "linspace(1, 1/M, M), M = N + 1"}
    cfg = BASELINE_SPECS.get(kind).config(frame if frame is not None else VPLinear(), rho)
    if kind in ("edm", "logsnr") and frame is not None and math.isinf(frame.sigma_max):
        cfg = {**cfg, "from_pure_noise": f"inf, then {kind} from sigma_top = {sigma_top(frame)!r}"}
    return cfg
