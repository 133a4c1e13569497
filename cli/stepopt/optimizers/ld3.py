"""ld3: learn the time steps by backpropagating through the few-step solver.

Tong, Liu, Hoang, Van den Broeck, Niepert, "Learning to Discretize Denoising Diffusion ODEs",
ICLR 2025 (arXiv 2405.15506). A student (the target solver on a learnable grid) is trained to land
where a teacher (the exact ODE for analytic models, a many-step solver for networks) lands from the
same noise; the gradient flows through every solver step and network call into the grid.

**Grid.** N+1 logits theta (equal at the start): the cumulated ``softmax(theta)``
``c_0 < ... < c_N`` is normalised, ``u_i = (c_i - c_0) / (c_N - c_0)`` (so the first logit cancels:
the increments are ``softmax(theta)_{1..N}`` up to a factor), and mapped affinely onto the grid
coordinate ``s_i = s_0 + u_i (s_N - s_0)``; both ends are fixed at the model's sigma_max and
sigma_min. The coordinate is ``lam = -log sigma`` for pixel-space models and normalised native
time ``(t_max - t) / (t_max - t_min)`` for latent models, as in the paper's two modes. The paper
starts from equal logits (uniform lam / uniform time: ``init: uniform``); by default stepopt starts
from whichever of that grid, the hand-crafted baselines and the trust-region schedule has the
lowest validation loss (``init: best``), or from a given schedule (``--init FILE``): on gmm-digits
the uniform-lam start lands in a poor local minimum for some seeds (see scripts/bench_ld3.py).

**Decoupled model time** (the paper's decoupled, "shifted" model timesteps). N+1 offsets xi (zero
at the start and always zero at both ends) shift the time fed to the network, ``s'_i = s_i +
clip(xi_i, -m, m)``, while the solver's coefficients use the plain grid; ``m = window * min_i
(s_{i+1} - s_i)`` is half the smallest gap *of the grid* in the same coordinate. (The authors' code
clamps with the gaps between the raw logits, which are all zero at the start, so xi cannot move
until the logits separate: a bug that stepopt does not reproduce.) The schedule stores
``sigma(s'_i)`` as ``model_sigmas``.

**Soft teacher loss** (the paper's relaxed, soft surrogate objective). For each training pair
``(x_T, Psi*(x_T))``, ``min over x'_T in B(x_T, r) of d(Psi_theta(x'_T), Psi*(x_T))`` with the
radius ``r = gamma D / N^2`` (gamma = 0.001, D the data dimension) on unit-variance noise (before
the factor sigma_max). One iteration on a batch (2 pairs): forward the student from the relaxed
noises with autograd, one backward to (theta, xi, x'_T); gradients of theta and of xi clipped to
norm 1; RMSprop on theta (lr 0.005, momentum 0.9), SGD on xi (lr 0.1/N in lam, 0.001/N in
normalised time) -- only after ``grid_rounds`` theta-only rounds, as the reference trainer does;
SGD on x'_T (lr 12/N), projected back onto the ball and kept for a pair only where it lowers that
pair's loss. ``soft: false`` is the hard loss (x'_T = x_T). After each iteration the validation
pairs are scored **from their original noise** with the current grid (the reference trainer also
relaxes the validation noises and scores those; stepopt validates what a user will get); the best
grid is kept,
``patience`` iterations without improvement restore it and decay the learning rates (x
``lr_decay``), each round starts from the best grid, and training stops after ``grid_rounds +
joint_rounds`` passes over the training pairs or when the learning rate has sat at its minimum
``min_lr_patience`` times. The validated start is a candidate, so the result is never worse than
the start on the validation pairs.

**Distance d**: ``l2`` (mean squared difference per sample; default), ``lpips`` (the paper's
choice; needs user-given VGG16 and LPIPS weights, never downloaded) or ``features`` (the digits
classifier of FID-digits); see :mod:`stepopt.optimizers.ld3_losses`. The reported objective is the
validation mean of d from the original noise.

**Teacher** (the paper's setup): ``n_train + n_valid`` pairs (50/50) from seeds ``data_seed,
data_seed+1, ...`` via :class:`stepopt.teacher.GridValidator` (exact ODE for analytic models; for
networks the ``teacher`` solver, cached on disk). With ``final_step: denoise`` the target is the
teacher's state at sigma_min passed through the same final denoising jump. The report also gives
``validation_rmse``: the RMSE of the learned grid against the teacher on the validation pairs, the
measure trust-region ``select`` and AYS's stopping use.

**Memory**: ``checkpoint`` wraps each network call in :func:`torch.utils.checkpoint.checkpoint`
(activations recomputed in the backward), so memory does not grow with the NFE.

**Robustness**: with ``ctx.state_path`` the full training state (see
:mod:`stepopt.optimizers.ld3_state`) is written atomically after each round and when training stops;
``ctx.resume`` continues from it exactly (the result equals an uninterrupted run with the same seed).
A non-finite loss, gradient or parameter stops the run with a :class:`StepoptError` naming the
iteration and the first solver step whose state was not finite.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from stepopt.baselines import baseline_sigmas
from stepopt.config import config_to_dict
from stepopt.errors import StepoptError
from stepopt.frames import NoiseFrame
from stepopt.models.base import AnalyticModel, DiffusionModel
from stepopt.optimizers import OptimizeContext, OptimizeResult, OptimizerSpec, register
from stepopt.optimizers.ld3_losses import Distance, make_distance
from stepopt.optimizers.ld3_state import Ld3State
from stepopt.sampling import unit_noise
from stepopt.solvers import solve
from stepopt.teacher import GridValidator, TeacherConfig

BASELINE_STARTS = ("logsnr", "edm", "time-uniform", "time-quadratic", "kl-optimal")
# Config keys that do not change the trajectory of a run: a resumed run may change them.
RESUMABLE_CHANGES = ("max_iterations", "checkpoint")


@dataclass(frozen=True)
class Ld3Config:
    """Options of LD3 (defaults: the paper's and its reference trainer's; see configs/ld3.yaml).

    loss: l2 | lpips | features (see :mod:`stepopt.optimizers.ld3_losses`); lpips needs
       ``vgg_weights`` and ``lpips_weights`` (paths; nothing is downloaded); ``lpips_resize``: the
       shorter image side LPIPS sees (smaller images are upsampled).
    n_train / n_valid: teacher pairs for training and validation, seeds ``data_seed + i``.
    batch_size: training pairs per iteration; valid_batch_size: pairs per validation (and teacher) forward.
    space: auto | lam | time: the coordinate of the grid (auto: time for models with a true
       ``latent`` attribute, else lam). init: the start grid: ``uniform`` in that coordinate (the
       paper's start), a baseline kind, ``trust-region`` (that optimizer's schedule for the same
       solver and NFE), or ``best``: whichever of uniform, the baselines and trust-region (where it
       supports the solver) has the lowest validation loss -- an extension (the reference code can
       likewise start from a prior schedule). An explicit ``--init FILE`` schedule overrides it.
    decouple: learn the decoupled model time xi; window: its clamp as a fraction of the smallest gap.
    soft / gamma: the soft loss and its ball radius ``gamma * D / N^2`` (soft: false = hard loss).
    lr_theta, momentum_theta: RMSprop on the logits; lr_xi: SGD on xi ("auto": 0.1/N in lam,
       0.001/N in normalised time); lr_noise: SGD on the relaxed noise ("auto": 12/N).
    clip_grad: gradient-norm clip of theta and of xi (each).
    grid_rounds: rounds training theta only; joint_rounds: rounds training theta and xi.
    patience, lr_decay, min_lr_theta, min_lr_xi, min_lr_patience: validation-based decay and early
       stop; noise_lr_decay: factor on lr_noise after a round in which no relaxed noise moved.
    max_iterations: stop after this many iterations (a budget; a resumed run may raise it).
    checkpoint: recompute each network call in the backward (auto: for non-analytic models).
    teacher: the many-step teacher for networks (analytic models use the exact ODE).
    """

    loss: Literal["l2", "lpips", "features"] = "l2"
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    lpips_resize: int = 32
    n_train: int = 50
    n_valid: int = 50
    data_seed: int = 2_000_000
    batch_size: int = 2
    valid_batch_size: int = 50
    space: Literal["auto", "lam", "time"] = "auto"
    init: Literal[
        "best", "uniform", "logsnr", "edm", "time-uniform", "time-quadratic", "kl-optimal", "trust-region"
    ] = "best"
    decouple: bool = True
    window: float = 0.5
    soft: bool = True
    gamma: float = 0.001
    lr_theta: float = 0.005
    momentum_theta: float = 0.9
    lr_xi: float | Literal["auto"] = "auto"
    lr_noise: float | Literal["auto"] = "auto"
    clip_grad: float = 1.0
    grid_rounds: int = 2
    joint_rounds: int = 5
    patience: int = 5
    lr_decay: float = 0.8
    min_lr_theta: float = 5e-5
    min_lr_xi: float = 1e-6
    min_lr_patience: int = 5
    noise_lr_decay: float = 0.5
    max_iterations: int | None = None
    checkpoint: bool | Literal["auto"] = "auto"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_valid < 1:
            raise ValueError("n_train and n_valid must be >= 1")
        if self.batch_size < 1 or self.valid_batch_size < 1:
            raise ValueError("batch_size and valid_batch_size must be >= 1")
        if not 0 < self.window <= 0.5:
            raise ValueError(f"window must be in (0, 0.5] (the offsets must not cross a neighbour), got {self.window}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        for name in ("lr_theta", "clip_grad", "min_lr_theta", "min_lr_xi"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_xi", "lr_noise"):
            v = getattr(self, name)
            if v != "auto" and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be 'auto' or a number >= 0, got {v!r}")
        if not 0 <= self.momentum_theta < 1:
            raise ValueError(f"momentum_theta must be in [0, 1), got {self.momentum_theta}")
        if not 0 < self.lr_decay <= 1 or not 0 < self.noise_lr_decay <= 1:
            raise ValueError("lr_decay and noise_lr_decay must be in (0, 1]")
        if self.grid_rounds < 0 or self.joint_rounds < 0 or self.grid_rounds + self.joint_rounds < 1:
            raise ValueError("grid_rounds and joint_rounds must be >= 0 with at least one round in all")
        if self.patience < 1 or self.min_lr_patience < 1:
            raise ValueError("patience and min_lr_patience must be >= 1")
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0 or null, got {self.max_iterations}")
        if self.teacher.steps < 2:
            raise ValueError(f"teacher steps must be >= 2, got {self.teacher.steps}")


# --------------------------------------------------------------------------------------------
# The grid: logits and offsets -> sigmas and model sigmas (differentiable, float64).


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
    theta: torch.Tensor, xi: torch.Tensor | None, space: GridSpace, window: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sigmas, model_sigmas) of the parameters; both ends exactly sigma_max and sigma_min."""
    s = grid_coordinates(theta, space)
    hi = theta.new_tensor([space.sigma_max])
    lo = theta.new_tensor([space.sigma_min])
    sig = torch.cat([hi, space.sigma(s[1:-1]), lo])
    if xi is None:
        return sig, None
    s_model = s + clamped_offsets(xi, s, window)
    return sig, torch.cat([hi, space.sigma(s_model[1:-1]), lo])


def params_from_sigmas(
    sigmas: Any, space: GridSpace, model_sigmas: Any = None, what: str = "start grid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta, xi) whose grid is ``sigmas`` (and whose model times are ``model_sigmas``), both (N+1,)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    for name, got, want in (
        ("sigmas[0]", float(sig[0]), space.sigma_max),
        (f"sigmas[{len(sig) - 1}]", float(sig[-1]), space.sigma_min),
    ):
        if abs(got - want) > 1e-6 * want:
            raise StepoptError(
                f"{what}: {name} = {got!r} differs from the model's {want!r}; "
                "LD3 keeps both ends fixed, so the start must span the model's sigma range"
            )
    s = space.s(sig)
    u = (s - s[0]) / (s[-1] - s[0])
    d = torch.diff(u)
    if not bool((d > 0).all()):
        raise StepoptError(f"{what}: the grid is not strictly monotone in the LD3 coordinate")
    # softmax(theta)_{1..N} proportional to the increments; theta_0 cancels out (set to 0).
    logd = torch.log(d)
    theta = torch.cat([logd.new_zeros(1), logd - logd.mean()])
    xi = torch.zeros_like(theta)
    if model_sigmas is not None:
        xi = space.s(torch.as_tensor(model_sigmas, dtype=torch.float64)) - s
        xi[0] = xi[-1] = 0.0
    return theta, xi


# --------------------------------------------------------------------------------------------
# Training.


class Recompute:
    """A denoiser whose calls are checkpointed: activations are recomputed in the backward pass."""

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.model(x, sigma, **cond)
        out: torch.Tensor = _checkpoint(self.model, x, sigma, use_reentrant=False, **cond)
        return out


def _space(cfg: Ld3Config, model: DiffusionModel) -> GridSpace:
    kind = cfg.space
    if kind == "auto":
        kind = "time" if model.latent else "lam"
    return GridSpace(kind, model.frame, float(model.sigma_max), float(model.sigma_min))  # type: ignore[arg-type]


def _run_key(ctx: OptimizeContext, cfg: Ld3Config) -> dict[str, Any]:
    conf = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {
        "optimizer": "ld3",
        "model": ctx.model.id,
        "fingerprint": ctx.model.fingerprint,
        "solver": ctx.solver.to_dict(),
        "n_steps": ctx.n_steps,
        "final_step": ctx.final_step,
        "seed": ctx.seed,
        "config": conf,
    }


class _Trainer:
    """One LD3 run: teacher pairs, the student forward, validation and the parameter updates."""

    def __init__(self, ctx: OptimizeContext, cfg: Ld3Config) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.model
        self.device = ctx.device
        self.n = ctx.n_steps
        self.space = _space(cfg, self.model)
        self.dim = math.prod(self.model.shape)
        self.radius = cfg.gamma * self.dim / self.n**2 if cfg.soft else 0.0
        auto_xi = (0.1 if self.space.kind == "lam" else 0.001) / self.n
        self.lr_xi = auto_xi if cfg.lr_xi == "auto" else float(cfg.lr_xi)
        self.lr_noise0 = 12.0 / self.n if cfg.lr_noise == "auto" else float(cfg.lr_noise)
        use_ckpt = not isinstance(self.model, AnalyticModel) if cfg.checkpoint == "auto" else bool(cfg.checkpoint)
        self.checkpointed = use_ckpt
        self.denoiser: Callable[..., torch.Tensor] = Recompute(self.model) if use_ckpt else self.model
        self.distance: Distance = make_distance(
            cfg.loss,
            tuple(self.model.shape),
            self.device,
            vgg_weights=cfg.vgg_weights,
            lpips_weights=cfg.lpips_weights,
            lpips_resize=cfg.lpips_resize,
        )

    # -- data ----------------------------------------------------------------------------------
    def load_pairs(self) -> None:
        cfg = self.cfg
        seeds = [cfg.data_seed + i for i in range(cfg.n_train + cfg.n_valid)]
        t0 = time.perf_counter()
        pairs = GridValidator(
            self.model,
            self.ctx.solver,
            seeds,
            cfg.teacher,
            final_step=self.ctx.final_step,
            batch_size=cfg.valid_batch_size,
            device=self.device,
        )
        self.teacher_seconds = time.perf_counter() - t0
        self.validator = pairs.subset(cfg.n_train, len(seeds))
        eps = unit_noise(self.model.shape, seeds).to(self.device)
        self.eps_train, self.eps_valid = eps[: cfg.n_train], eps[cfg.n_train :]
        self.y_train, self.y_valid = pairs.targets[: cfg.n_train], pairs.targets[cfg.n_train :]

    # -- the student ---------------------------------------------------------------------------
    def student(
        self,
        eps: torch.Tensor,
        theta: torch.Tensor,
        xi: torch.Tensor | None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> torch.Tensor:
        x = (self.model.sigma_max * eps).to(self.model.dtype)
        return self.student_from(x, theta, xi, callback)

    def student_from(
        self,
        x: torch.Tensor,
        theta: torch.Tensor,
        xi: torch.Tensor | None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> torch.Tensor:
        """The solver on the grid of ``(theta, xi)`` from the noise ``x`` at sigma_max."""
        sig, msig = ld3_grid(theta, xi, self.space, self.cfg.window)
        return solve(
            self.ctx.solver,
            self.denoiser,
            x,
            sig,
            model_sigmas=msig,
            callback=callback,
            final_step=self.ctx.final_step,
        )

    def validate(self, theta: torch.Tensor, xi: torch.Tensor | None) -> float:
        """Mean distance to the teacher on the validation pairs, from their original noise."""
        return self.validator.loss(self.distance, lambda x: self.student_from(x, theta, xi))

    def non_finite(self, what: str, iteration: int, eps: torch.Tensor, theta: torch.Tensor, xi: Any) -> StepoptError:
        """The error for a non-finite value, naming the iteration and the first bad solver step."""
        where = ""
        if not bool(torch.isfinite(theta).all()) or (xi is not None and not bool(torch.isfinite(xi).all())):
            where = "; the grid parameters are not finite"
        else:
            bad: list[dict[str, Any]] = []

            def cb(info: dict[str, Any]) -> None:
                if not bad and not bool(torch.isfinite(info["x"]).all()):
                    bad.append(info)

            with torch.no_grad():
                self.student(eps, theta, xi, callback=cb)
            if bad:
                b = bad[0]
                where = (
                    f"; the solver state is first non-finite after step {int(b['i'])} "
                    f"(sigma {float(b['sigma']):.6g} -> {float(b['sigma_next']):.6g})"
                )
        return StepoptError(
            f"ld3: {what} became non-finite at iteration {iteration}{where}; "
            "lower lr_theta / lr_xi / lr_noise, or check the model's outputs"
        )

    def trust_region_start(self, required: bool) -> list[float] | None:
        """The trust-region schedule for this solver and NFE (None where it does not apply, unless required)."""
        from stepopt.optimizers import get_optimizer, optimize
        from stepopt.solvers import get_solver

        ctx = self.ctx
        try:
            get_optimizer("trust-region")
            nfe = get_solver(ctx.solver.name).nfe(ctx.solver, self.n, ctx.final_step)
            sched = optimize(
                "trust-region",
                self.model,
                ctx.solver,
                nfe,
                final_step=ctx.final_step,
                seed=ctx.seed,
                device=self.device,
            )
        except StepoptError as e:
            if required:
                raise StepoptError(f"ld3: init trust-region is not available here: {e}") from None
            return None
        return list(sched.sigmas)

    # -- the run ---------------------------------------------------------------------------------
    def fresh_state(self, key: dict[str, Any]) -> Ld3State:
        n1 = self.n + 1
        theta = torch.zeros(n1, dtype=torch.float64)
        xi = torch.zeros(n1, dtype=torch.float64)
        init: str = self.cfg.init
        starts: dict[str, float] = {}
        if self.ctx.init_schedule is not None:
            if self.ctx.init_schedule.n_steps != self.n:
                raise StepoptError(
                    f"--init schedule has {self.ctx.init_schedule.n_steps} steps, this run needs {self.n} "
                    f"({self.ctx.solver.name} at this NFE)"
                )
            init_s = self.ctx.init_schedule
            theta, xi = params_from_sigmas(init_s.sigmas, self.space, init_s.model_sigmas, "--init schedule")
            init = f"schedule ({init_s.method.name})"
        elif init != "uniform":
            kinds = BASELINE_STARTS if init == "best" else (init,) if init in BASELINE_STARTS else ()
            cands = {"uniform": theta} if init == "best" else {}
            m = self.model
            uniform = ld3_grid(theta, None, self.space)[0].numpy()
            for kind in kinds:
                sig = baseline_sigmas(kind, self.n, m.sigma_max, m.sigma_min, m.frame)
                if init == "best" and np.allclose(sig, uniform, rtol=1e-9, atol=0):
                    continue  # the uniform start itself (logsnr in lam, time-uniform in time)
                cands[kind], _ = params_from_sigmas(sig, self.space, what=f"init {kind}")
            if init in ("best", "trust-region"):
                tr = self.trust_region_start(required=init == "trust-region")
                if tr is not None:
                    cands["trust-region"], _ = params_from_sigmas(tr, self.space, what="init trust-region")
            if len(cands) > 1:  # score every start on the validation pairs; the first best wins ties
                for kind, th in cands.items():
                    starts[kind] = self.validate(th.to(self.device), None)
                ok = {k: v for k, v in starts.items() if math.isfinite(v)}
                if not ok:
                    raise StepoptError("ld3: every start grid gives a non-finite validation loss")
                init = min(ok, key=ok.__getitem__)
            theta = cands[init]
        theta, xi = theta.to(self.device), xi.to(self.device)
        x = xi if self.cfg.decouple else None
        v0 = starts[init] if init in starts and self.ctx.init_schedule is None else self.validate(theta, x)
        if not math.isfinite(v0):
            raise StepoptError(f"ld3: the validation loss of the start grid is not finite ({v0})")
        gen = torch.Generator(device="cpu").manual_seed(int(self.ctx.seed))
        st = Ld3State(
            key=key,
            theta=theta,
            xi=xi,
            opt_theta={},
            opt_xi={},
            noise=self.eps_train.clone(),
            generator=gen.get_state(),
            lr_noise=self.lr_noise0,
            best_theta=theta.clone(),
            best_xi=xi.clone(),
            best_value=v0,
            initial_value=v0,
            history=[v0],
            init=init,
            starts=starts,
        )
        return st

    def run(self) -> OptimizeResult:
        ctx, cfg = self.ctx, self.cfg
        key = _run_key(ctx, cfg)
        state_path = Path(ctx.state_path) if ctx.state_path is not None else None
        self.load_pairs()
        if ctx.resume:
            if state_path is None:
                raise StepoptError("ld3: resume needs a state file path")
            st = Ld3State.load(state_path, key)
            for name in ("theta", "xi", "best_theta", "best_xi", "noise"):
                setattr(st, name, getattr(st, name).to(device=self.device, dtype=torch.float64))
            ctx.report("log", message=f"ld3: resuming at iteration {st.iteration} (round {st.round + 1})")
        else:
            if state_path is not None and state_path.exists():
                ctx.report(
                    "log", message=f"ld3: starting afresh; overwriting '{state_path}' (use --resume to continue)"
                )
            st = self.fresh_state(key)
        self.train(st, state_path)
        sig, msig = ld3_grid(st.best_theta, st.best_xi if cfg.decouple else None, self.space, cfg.window)
        sigmas = [float(v) for v in sig.detach().cpu()]
        model_sigmas = None if msig is None else [float(v) for v in msig.detach().cpu()]
        if model_sigmas is not None and model_sigmas == sigmas:
            model_sigmas = None
        if any(not b < a for a, b in itertools.pairwise(sigmas)):
            raise StepoptError(f"ld3: the learned grid is not strictly decreasing: {sigmas}")
        report = {
            "space": self.space.kind,
            "init": st.init,
            "starts": st.starts,
            "resumed": bool(ctx.resume),
            "n_train": cfg.n_train,
            "n_valid": cfg.n_valid,
            "radius": self.radius,
            "lr_xi": self.lr_xi,
            "lr_noise": self.lr_noise0,
            "iterations": st.iteration,
            "best_iteration": st.best_iteration,
            "rounds_done": st.round,
            "stop_reason": st.stop_reason,
            "checkpoint": self.checkpointed,
            "teacher": cfg.teacher.describe(self.model),
            "validation_rmse": self.validator.rmse(sigmas, model_sigmas),
            "seconds_teacher": round(self.teacher_seconds, 4),
            "seconds_training": round(st.seconds, 4),
        }
        objective = {"name": f"ld3-validation-{cfg.loss}", "initial": st.initial_value, "final": st.best_value}
        return OptimizeResult(sigmas=sigmas, objective=objective, model_sigmas=model_sigmas, report=report)

    def train(self, st: Ld3State, state_path: Path | None) -> None:
        ctx, cfg = self.ctx, self.cfg
        theta = st.theta.clone().requires_grad_(True)
        xi = st.xi.clone().requires_grad_(True)
        opt_theta = torch.optim.RMSprop([theta], lr=cfg.lr_theta, momentum=cfg.momentum_theta)
        opt_xi = torch.optim.SGD([xi], lr=self.lr_xi)
        if st.opt_theta:
            opt_theta.load_state_dict(st.opt_theta)
            opt_xi.load_state_dict(st.opt_xi)
        gen = torch.Generator(device="cpu")
        gen.set_state(st.generator)
        total_rounds = cfg.grid_rounds + cfg.joint_rounds
        n_batches = math.ceil(cfg.n_train / cfg.batch_size)
        t_start = time.perf_counter() - st.seconds

        def snapshot() -> None:
            st.theta, st.xi = theta.detach().clone(), xi.detach().clone()
            st.opt_theta, st.opt_xi = opt_theta.state_dict(), opt_xi.state_dict()
            st.generator = gen.get_state()
            st.seconds = time.perf_counter() - t_start
            if state_path is not None:
                st.save(state_path)

        while not st.done:
            if st.round >= total_rounds:
                st.done, st.stop_reason = True, "rounds"
                break
            joint = cfg.decouple and st.round >= cfg.grid_rounds
            if st.perm is None:
                if st.round > 0:  # each round starts from the best grid so far (reference trainer)
                    with torch.no_grad():
                        theta.copy_(st.best_theta)
                        xi.copy_(st.best_xi)
                    st.count_worse = 0
                st.perm = torch.randperm(cfg.n_train, generator=gen)
                st.pos, st.accepted_in_round = 0, False
            stopped = False
            while st.pos < n_batches:
                if cfg.max_iterations is not None and st.iteration >= cfg.max_iterations:
                    st.stop_reason, stopped = "max_iterations", True
                    break
                idx = st.perm[st.pos * cfg.batch_size : (st.pos + 1) * cfg.batch_size].to(self.device)
                loss = self.step(st, idx, theta, xi, opt_theta, opt_xi, joint)
                st.pos += 1
                st.iteration += 1
                x_cur = xi if cfg.decouple else None
                val = self.validate(theta.detach(), None if x_cur is None else x_cur.detach())
                if not math.isfinite(val):
                    raise self.non_finite(
                        "the validation loss", st.iteration, self.eps_valid[: cfg.valid_batch_size], theta, x_cur
                    )
                self.after_validation(st, val, theta, xi, opt_theta, opt_xi, joint)
                ctx.report(
                    "iteration",
                    iteration=st.iteration,
                    round=st.round,
                    loss=loss,
                    valid=val,
                    best=st.best_value,
                )
                if st.done:
                    break
            if st.done or stopped:
                break
            if self.radius > 0 and not st.accepted_in_round:
                st.lr_noise *= cfg.noise_lr_decay
            st.round += 1
            st.perm, st.pos = None, 0
            ctx.report(
                "log",
                message=f"ld3 round {st.round}/{total_rounds}: iteration {st.iteration}, "
                f"validation {st.history[-1]:.6g}, best {st.best_value:.6g} (iteration {st.best_iteration})",
            )
            snapshot()
        snapshot()

    def step(
        self,
        st: Ld3State,
        idx: torch.Tensor,
        theta: torch.Tensor,
        xi: torch.Tensor,
        opt_theta: torch.optim.Optimizer,
        opt_xi: torch.optim.Optimizer,
        joint: bool,
    ) -> float:
        """One iteration on the pairs ``idx``: backward to theta, xi and the relaxed noise; updates."""
        cfg = self.cfg
        soft = self.radius > 0
        eps = st.noise[idx].clone().requires_grad_(soft)
        target = self.y_train[idx]
        x_arg = xi if cfg.decouple else None
        xi.requires_grad_(joint)
        opt_theta.zero_grad(set_to_none=True)
        opt_xi.zero_grad(set_to_none=True)
        per = self.distance(self.student(eps, theta, x_arg), target)
        loss = per.mean()
        if not bool(torch.isfinite(loss)):
            raise self.non_finite("the training loss", st.iteration + 1, eps.detach(), theta.detach(), x_arg)
        loss.backward()
        grads = [g for g in (theta.grad, xi.grad if joint else None, eps.grad if soft else None) if g is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise StepoptError(
                f"ld3: a gradient became non-finite at iteration {st.iteration + 1}; "
                "lower lr_theta / lr_xi, or check the model's outputs"
            )
        torch.nn.utils.clip_grad_norm_([theta], cfg.clip_grad)
        opt_theta.step()
        if joint:
            torch.nn.utils.clip_grad_norm_([xi], cfg.clip_grad)
            opt_xi.step()
        if not bool(torch.isfinite(theta).all() and torch.isfinite(xi).all()):
            raise self.non_finite("a grid parameter", st.iteration + 1, eps.detach(), theta.detach(), x_arg)
        if soft and eps.grad is not None:
            with torch.no_grad():
                # SGD on the relaxed noise, projected back onto the ball around the original noise.
                orig = self.eps_train[idx]
                cand = eps - st.lr_noise * eps.grad
                diff = (cand - orig).flatten(1)
                norm = diff.norm(dim=1)
                scale = torch.where(norm > self.radius, self.radius / norm.clamp_min(1e-300), torch.ones_like(norm))
                cand = orig + (diff * scale[:, None]).reshape(cand.shape)
                # Keep a moved noise only where it lowers that pair's loss (with the updated grid).
                new = self.distance(self.student(cand, theta.detach(), None if x_arg is None else xi.detach()), target)
                ok = new < per.detach()
                if bool(ok.any()):
                    st.noise[idx[ok]] = cand[ok]
                    st.accepted_in_round = True
        return float(loss.detach())

    def after_validation(
        self,
        st: Ld3State,
        val: float,
        theta: torch.Tensor,
        xi: torch.Tensor,
        opt_theta: torch.optim.Optimizer,
        opt_xi: torch.optim.Optimizer,
        joint: bool,
    ) -> None:
        """Keep the best grid; after ``patience`` worse validations restore it and decay the rates."""
        cfg = self.cfg
        st.history.append(val)
        if val < st.best_value:
            st.best_value, st.best_iteration, st.count_worse = val, st.iteration, 0
            st.best_theta, st.best_xi = theta.detach().clone(), xi.detach().clone()
            return
        st.count_worse += 1
        if st.count_worse < cfg.patience:
            return
        st.count_worse = 0
        with torch.no_grad():
            theta.copy_(st.best_theta)
            xi.copy_(st.best_xi)
        g = opt_theta.param_groups[0]
        g["lr"] = max(g["lr"] * cfg.lr_decay, cfg.min_lr_theta)
        at_min = g["lr"] <= cfg.min_lr_theta
        if joint:
            g2 = opt_xi.param_groups[0]
            g2["lr"] = max(g2["lr"] * cfg.lr_decay, cfg.min_lr_xi)
            at_min = g2["lr"] <= cfg.min_lr_xi
        if at_min and (joint or not cfg.decouple):  # the theta-only phase never stops early (reference)
            st.min_lr_hits += 1
            if st.min_lr_hits >= cfg.min_lr_patience:
                st.done, st.stop_reason = True, "min_lr"


def run(ctx: OptimizeContext, cfg: Ld3Config) -> OptimizeResult:
    """Train LD3's grid for ``ctx`` (see the module docstring)."""
    return _Trainer(ctx, cfg).run()


SPEC = register(
    OptimizerSpec(
        name="ld3",
        config_cls=Ld3Config,
        run=run,
        summary="LD3 (Tong et al. 2025): grid learned by backprop through the solver against a teacher",
        takes_init=True,
        resumable=True,
    )
)
