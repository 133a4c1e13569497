"""Noise frames: a model's native time <-> sigma <-> lam, with explicit inverses, in float64.

Inside stepopt every state lives in the EDM / k-diffusion frame ``x = x0 + sigma * eps``
(README: Conventions). A VP model with ``x_t = alpha_t x0 + s_t eps`` has ``sigma = s_t / alpha_t`` and
its state ``x_t / alpha_t``; ``lam = -log(sigma)`` is half the log-SNR. A rectified-flow model
(:class:`Flow`, ``x_t = (1 - t) x0 + t eps``) has ``sigma = t / (1 - t)``; its ``t = 1`` is pure
noise, ``sigma = inf`` (``lam = -inf``), where a state is stored noise-scaled (``x / sigma``, which is
the noise itself; README: Conventions). The model's native time (continuous ``t``, or a DDPM index)
exists only here and in adapters.

Every frame maps ``time -> sigma`` increasingly, so ``t_min`` <-> ``sigma_min`` and
``t_max`` <-> ``sigma_max``. All formulas accept Python floats, numpy arrays and torch tensors
(the tensor path stays differentiable) and compute in float64.

>>> f = VPLinear()
>>> float(f.time(f.sigma(0.5)))  # doctest: +ELLIPSIS
0.5...
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, ClassVar

import numpy as np

from stepopt._lazy import is_tensor
from stepopt._xp import as_f64, xp
from stepopt.errors import StepoptError

TIME_DOMAINS = ("sigma", "vp-continuous", "vp-discrete", "ve-continuous", "flow")
# Time domains that include pure noise (sigma = inf): only their grids may begin at ``sigma = inf``.
PURE_NOISE_DOMAINS = ("flow",)


class NoiseFrame(ABC):
    """A bijection between native time and sigma (increasing), plus the VP scale alpha."""

    kind: ClassVar[str]
    time_domain: ClassVar[str]
    t_min: float
    t_max: float

    @abstractmethod
    def sigma(self, t: Any) -> Any:
        """Noise level in the EDM frame at native time ``t``."""

    @abstractmethod
    def time(self, sigma: Any) -> Any:
        """Inverse of :meth:`sigma`."""

    def alpha(self, t: Any) -> Any:
        """The VP scale ``alpha_t`` (1 for variance-exploding frames)."""
        t = as_f64(t)
        return xp(t).ones_like(t)

    def lam(self, t: Any) -> Any:
        """Half log-SNR ``-log sigma(t)``."""
        return -xp(t).log(self.sigma(t)) if is_tensor(t) else -np.log(self.sigma(t))

    def time_from_lam(self, lam: Any) -> Any:
        lam = as_f64(lam)
        return self.time(xp(lam).exp(-lam))

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_max))

    def describe(self) -> dict[str, Any]:
        """A plain-data description (for schedule files and ``stepopt models``)."""
        fields: dict[str, Any] = asdict(self) if is_dataclass(self) else {}  # type: ignore[call-overload]
        return {"kind": self.kind, "time": self.time_domain, **fields}


@dataclass(frozen=True)
class EDM(NoiseFrame):
    """Karras et al. (2022): native time is sigma itself; x = x0 + sigma eps."""

    t_min: float = 0.002
    t_max: float = 80.0
    kind: ClassVar[str] = "edm"
    time_domain: ClassVar[str] = "sigma"

    def sigma(self, t: Any) -> Any:
        return as_f64(t)

    def time(self, sigma: Any) -> Any:
        return as_f64(sigma)


@dataclass(frozen=True)
class VE(NoiseFrame):
    """Song et al. (2021) VE SDE: sigma(t) = sigma_lo (sigma_hi / sigma_lo)^t, t in [t_min, 1]."""

    sigma_lo: float = 0.01
    sigma_hi: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0
    kind: ClassVar[str] = "ve"
    time_domain: ClassVar[str] = "ve-continuous"

    def sigma(self, t: Any) -> Any:
        t = as_f64(t)
        return self.sigma_lo * xp(t).exp(t * math.log(self.sigma_hi / self.sigma_lo))

    def time(self, sigma: Any) -> Any:
        sigma = as_f64(sigma)
        return xp(sigma).log(sigma / self.sigma_lo) / math.log(self.sigma_hi / self.sigma_lo)


@dataclass(frozen=True)
class VPLinear(NoiseFrame):
    """Song et al. (2021) VP SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0).

    log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2, so
    sigma(t)^2 = exp((beta_1 - beta_0) t^2 / 2 + beta_0 t) - 1.
    """

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    kind: ClassVar[str] = "vp-linear"
    time_domain: ClassVar[str] = "vp-continuous"

    def _u(self, t: Any) -> Any:  # -2 log alpha_t = log(1 + sigma^2)
        return 0.5 * (self.beta_1 - self.beta_0) * t * t + self.beta_0 * t

    def sigma(self, t: Any) -> Any:
        t = as_f64(t)
        return xp(t).sqrt(xp(t).expm1(self._u(t)))

    def alpha(self, t: Any) -> Any:
        t = as_f64(t)
        return xp(t).exp(-0.5 * self._u(t))

    def time(self, sigma: Any) -> Any:
        sigma = as_f64(sigma)
        u = xp(sigma).log1p(sigma * sigma)
        db = self.beta_1 - self.beta_0
        # Stable root of db/2 t^2 + beta_0 t - u = 0.
        return 2.0 * u / (self.beta_0 + xp(sigma).sqrt(self.beta_0**2 + 2.0 * db * u))


@dataclass(frozen=True)
class VPCosine(NoiseFrame):
    """Nichol & Dhariwal (2021) cosine schedule in continuous time.

    alphabar(t) = cos^2(pi/2 (t+s)/(1+s)) / cos^2(pi/2 s/(1+s)); t_max < 1 because sigma -> inf at
    t = 1 (DPM-Solver uses 0.9946).
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946
    kind: ClassVar[str] = "vp-cosine"
    time_domain: ClassVar[str] = "vp-continuous"

    def _c0(self) -> float:
        return math.cos(math.pi / 2 * self.s / (1 + self.s))

    def alpha(self, t: Any) -> Any:
        t = as_f64(t)
        return xp(t).cos(math.pi / 2 * (t + self.s) / (1 + self.s)) / self._c0()

    def sigma(self, t: Any) -> Any:
        a = self.alpha(t)
        return xp(a).sqrt(1.0 / (a * a) - 1.0)

    def time(self, sigma: Any) -> Any:
        sigma = as_f64(sigma)
        a = 1.0 / xp(sigma).sqrt(1.0 + sigma * sigma)
        return (1 + self.s) * 2 / math.pi * xp(sigma).arccos(a * self._c0()) - self.s


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def ddpm_betas(kind: str, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM betas as diffusers builds them (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``)."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise StepoptError(f"beta_schedule '{kind}' is not supported; expected one of {', '.join(BETA_SCHEDULES)}")


def sigma_table_float32(alphas_cumprod: Any) -> np.ndarray:
    """The sigmas of a DDPM table at its integer timesteps, as diffusers' schedulers compute them:
    ``sqrt((1 - abar) / abar)`` in float32 from the float32 ``alphas_cumprod`` (returned as float64
    numbers that are exactly those float32 values)."""
    import torch

    a = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float32)
    return (((1 - a) / a) ** 0.5).numpy().astype(np.float64)


def alphas_cumprod_float32(betas: Any) -> np.ndarray:
    """``cumprod(1 - betas)`` in float32 (diffusers' ``alphas_cumprod``), from float32 betas."""
    import torch

    b = torch.as_tensor(np.asarray(betas), dtype=torch.float32)
    return torch.cumprod(1.0 - b, dim=0).numpy()


def ddpm_betas_float32(kind: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
    """The float32 betas a diffusers scheduler builds for ``beta_schedule`` ``kind`` (float32
    ``linspace`` for the linear ones, float64 formula cast to float32 for the cosine one)."""
    import torch

    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32).numpy()
    if kind == "scaled_linear":
        return (torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2).numpy()
    return torch.as_tensor(ddpm_betas(kind, n, beta_start, beta_end), dtype=torch.float32).numpy()


@dataclass(frozen=True)
class VPDiscrete(NoiseFrame):
    """A DDPM model with T discrete steps; native time is the (fractional) index in [0, T-1].

    The sigma table at the integer timesteps is the one diffusers' schedulers use (float32 betas,
    float32 ``alphas_cumprod``, ``sigma_i = sqrt((1 - abar_i) / abar_i)`` in float32:
    :attr:`sigma_table`); between integer indices log sigma is interpolated linearly (as
    k-diffusion's DiscreteSchedule and diffusers' ``_sigma_to_t`` do), which makes time <-> sigma a
    bijection. :meth:`integer_grid` projects any grid onto the integer timesteps.
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    log_sigmas: np.ndarray = field(init=False, repr=False, compare=False)
    sigma_table: np.ndarray = field(init=False, repr=False, compare=False)
    kind: ClassVar[str] = "vp-discrete"
    time_domain: ClassVar[str] = "vp-discrete"

    def __post_init__(self) -> None:
        betas = ddpm_betas_float32(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        self._set_table(alphas_cumprod_float32(betas))

    def _set_table(self, alphas_cumprod: Any) -> None:
        table = sigma_table_float32(alphas_cumprod)
        object.__setattr__(self, "sigma_table", table)
        object.__setattr__(self, "log_sigmas", np.log(table))

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> VPDiscrete:
        """A frame from an explicit beta table (trained_betas)."""
        f = cls(beta_schedule="linear", num_train_timesteps=len(betas))
        f._set_table(alphas_cumprod_float32(np.asarray(betas, dtype=np.float32)))
        return f

    def integer_grid(self, sigmas: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps, sigmas)``: the grid projected onto the trained integer timesteps.

        Each sigma goes to its native time (log-sigma interpolation), which is rounded to the
        nearest integer, ties to even as numpy's and diffusers' ``round()``; the sigmas are then
        the table's. Nodes that round to the same timestep are pushed apart by one timestep at a
        time (later nodes downwards, then, at timestep 0, earlier ones upwards), keeping the grid
        strictly decreasing; more nodes than timesteps is an error.
        """
        sig = np.asarray(sigmas, dtype=np.float64)
        n_t = len(self.sigma_table)
        if sig.size > n_t:
            raise StepoptError(f"{sig.size} grid points do not fit on {n_t} integer timesteps")
        # Times are first snapped to 1e-9 so that a tie computed through sigma (499.4999999999) is
        # still a tie (then 500, as diffusers rounds np.linspace(0, 999, 3)).
        t = np.round(np.asarray(self.time(sig), dtype=np.float64), 9)
        ts = np.clip(np.round(t), 0, n_t - 1).astype(np.int64)
        for i in range(1, len(ts)):
            if ts[i] >= ts[i - 1]:
                ts[i] = ts[i - 1] - 1
        for i in range(len(ts) - 1, -1, -1):
            low = 0 if i == len(ts) - 1 else ts[i + 1] + 1
            ts[i] = max(ts[i], low)
        return ts, self.sigma_table[ts]

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 0.0

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.num_train_timesteps - 1)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(2.0 * self.log_sigmas))

    def sigma(self, t: Any) -> Any:
        t = as_f64(t)
        if is_tensor(t):
            import torch

            ls = torch.as_tensor(self.log_sigmas, dtype=torch.float64, device=t.device)
            tc = t.clamp(0.0, self.t_max)
            lo = tc.floor().long().clamp(max=len(ls) - 2)
            w = tc - lo
            return torch.exp((1 - w) * ls[lo] + w * ls[lo + 1])
        grid = np.arange(len(self.log_sigmas), dtype=np.float64)
        return np.exp(np.interp(t, grid, self.log_sigmas))

    def time(self, sigma: Any) -> Any:
        sigma = as_f64(sigma)
        grid = np.arange(len(self.log_sigmas), dtype=np.float64)
        if is_tensor(sigma):
            import torch

            ls = torch.as_tensor(self.log_sigmas, dtype=torch.float64, device=sigma.device)
            lsig = torch.log(sigma).clamp(float(ls[0]), float(ls[-1]))
            hi = torch.searchsorted(ls, lsig.detach().contiguous()).clamp(1, len(ls) - 1)
            lo = hi - 1
            w = (lsig - ls[lo]) / (ls[hi] - ls[lo])
            return lo.to(torch.float64) + w
        return np.interp(np.log(sigma), self.log_sigmas, grid)

    def alpha(self, t: Any) -> Any:
        s = self.sigma(t)
        return 1.0 / xp(s).sqrt(1.0 + s * s)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": self.time_domain,
            "beta_schedule": self.beta_schedule,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }


@dataclass(frozen=True)
class Flow(NoiseFrame):
    """Rectified flow (SD3, FLUX, Wan): ``x_t = (1 - t) x0 + t eps``, native time ``t`` in [0, 1].

    In the one noise frame ``sigma = t / (1 - t)``, ``alpha = 1 - t`` (the state is ``x_t / (1 - t)``)
    and ``t = sigma / (1 + sigma)``; ``t = 1`` is pure noise, ``sigma = inf`` (README: Conventions).
    The native time is the ``t`` the network sees (diffusers passes ``1000 t`` as its timestep).

    ``shift`` is the pipeline's time warp of a uniform ``u`` in (0, 1]: ``t = s u / (1 + (s - 1) u)``
    (SD3: s = 3), which is ``sigma = s * u / (1 - u)``: a shift multiplies every sigma by s. A dynamic,
    resolution-dependent shift (FLUX) is ``mu`` with ``s = exp(mu)`` (diffusers' exponential
    ``time_shift``: ``t = e^mu / (e^mu + 1/u - 1)``). The shift is not part of the network; it is the
    default grid a pipeline uses, and a schedule file records the one it was made for.
    """

    shift: float = 1.0
    mu: float | None = None
    t_min: float = 1e-3
    t_max: float = 1.0
    kind: ClassVar[str] = "flow"
    time_domain: ClassVar[str] = "flow"

    def __post_init__(self) -> None:
        if self.mu is not None:
            if not math.isfinite(self.mu):
                raise StepoptError(f"flow mu must be finite, got {self.mu}")
            object.__setattr__(self, "shift", math.exp(self.mu))
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise StepoptError(f"flow shift must be a finite number > 0, got {self.shift}")
        if not 0 < self.t_min < self.t_max <= 1:
            raise StepoptError(f"flow times need 0 < t_min < t_max <= 1, got {self.t_min}, {self.t_max}")

    def sigma(self, t: Any) -> Any:
        t = as_f64(t)
        if is_tensor(t):
            return t / (1.0 - t)  # t = 1 -> inf
        with np.errstate(divide="ignore"):
            return t / (1.0 - t)

    def time(self, sigma: Any) -> Any:
        sigma = as_f64(sigma)
        if is_tensor(sigma):
            return 1.0 / (1.0 + 1.0 / sigma)  # sigma = inf -> 1
        with np.errstate(divide="ignore"):
            return 1.0 / (1.0 + 1.0 / sigma)

    def alpha(self, t: Any) -> Any:
        return 1.0 - as_f64(t)

    def shift_time(self, u: Any) -> Any:
        """The pipeline's warp of an unshifted time ``u`` in [0, 1]: ``s u / (1 + (s - 1) u)``."""
        u = as_f64(u)
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)

    def unshift_time(self, t: Any) -> Any:
        """Inverse of :meth:`shift_time` (what diffusers' flow pipelines take as ``sigmas=``)."""
        t = as_f64(t)
        return t / (self.shift - (self.shift - 1.0) * t)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": self.time_domain,
            "shift": self.shift,
            "mu": self.mu,
            "t_min": self.t_min,
            "t_max": self.t_max,
        }


def frame_ref_fields(frame: NoiseFrame) -> dict[str, Any]:
    """What a schedule file's ``model`` section records about the frame besides its time domain.

    Flow frames: the ``shift`` (and a dynamic shift's ``mu``) the pipeline default uses; else nothing.
    """
    if isinstance(frame, Flow):
        return {"shift": frame.shift, "mu": frame.mu}
    return {}


FRAMES: dict[str, type[NoiseFrame]] = {
    "edm": EDM,
    "ve": VE,
    "vp-linear": VPLinear,
    "vp-cosine": VPCosine,
    "vp-discrete": VPDiscrete,
    "flow": Flow,
}
