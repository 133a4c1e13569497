"""LD3's trainer: teacher pairs, the student forward, validation and the parameter updates.

See :mod:`stepopt.optimizers.ld3` ("Soft teacher loss", "Teacher", "Memory", "Robustness").
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from stepopt import distributed
from stepopt.baselines import flow_default_sigmas, start_sigmas
from stepopt.config import config_to_dict
from stepopt.errors import StepoptError
from stepopt.frames import Flow
from stepopt.models.base import AnalyticModel
from stepopt.optimizers import OptimizeContext, OptimizeResult
from stepopt.optimizers.ld3.config import BASELINE_STARTS, RESUMABLE_CHANGES, Ld3Config
from stepopt.optimizers.ld3.grid import grid_space, ld3_grid, params_from_sigmas
from stepopt.optimizers.ld3.losses import Distance, make_distance
from stepopt.optimizers.ld3.state import Ld3State
from stepopt.sampling import unit_noise
from stepopt.solvers import solve
from stepopt.teacher import GridValidator


class Recompute:
    """A denoiser whose calls are checkpointed: activations are recomputed in the backward pass."""

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.model(x, sigma, **cond)
        out: torch.Tensor = _checkpoint(self.model, x, sigma, use_reentrant=False, **cond)
        return out


def run_key(ctx: OptimizeContext, cfg: Ld3Config) -> dict[str, Any]:
    """What a state file must match to be resumed: the run's identity without the resumable options."""
    conf = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    conf["teacher"] = cfg.teacher.cache_key()  # an unset variant as before it existed: older states resume
    if ctx.final_step != "denoise":
        conf.pop("last_node", None)  # no effect without a final denoise (state files from before it resume)
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


# Samples with fewer elements are "small": checkpoint: auto does not recompute their network calls
# (a few megabytes of activations) and their training loop runs on one CPU thread.
SMALL_SAMPLE = 1024


class Trainer:
    """One LD3 run: teacher pairs, the student forward, validation and the parameter updates."""

    def __init__(self, ctx: OptimizeContext, cfg: Ld3Config) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.model = ctx.model
        self.device = ctx.device
        self.n = ctx.n_steps
        self.space = grid_space(cfg, self.model)
        # A final denoise follows the last node: it is learned like the others (theta has N+2 logits).
        self.free_end = ctx.final_step == "denoise" and cfg.last_node == "free"
        self.dim = math.prod(self.model.shape)
        self.radius = cfg.gamma * self.dim / self.n**2 if cfg.soft else 0.0
        auto_xi = (0.1 if self.space.kind == "lam" else 0.001) / self.n
        self.lr_xi = auto_xi if cfg.lr_xi == "auto" else float(cfg.lr_xi)
        self.lr_noise0 = 12.0 / self.n if cfg.lr_noise == "auto" else float(cfg.lr_noise)
        if cfg.checkpoint == "auto":
            use_ckpt = not isinstance(self.model, AnalyticModel) and self.dim >= SMALL_SAMPLE
        else:
            use_ckpt = bool(cfg.checkpoint)
        self.checkpointed = use_ckpt
        # Training backpropagates through the network's time: models trained at integer timesteps
        # train through their fractional-timestep twin; validation runs the model as it samples.
        self.grad_model = self.model.differentiable_time()
        self.denoiser: Callable[..., torch.Tensor] = Recompute(self.grad_model) if use_ckpt else self.grad_model
        self.distance: Distance = self.make_distance()

    def make_distance(self) -> Distance:
        """The configured distance; ``lpips`` on a model with a decoder (a latent model) compares the
        decoded images, the student's decode differentiable (checkpointed along with the network calls)."""
        cfg, m = self.cfg, self.model

        def differentiable_decode(y: torch.Tensor) -> torch.Tensor:
            return m.decode(y, grad=True).to(self.device)

        def decode(y: torch.Tensor) -> torch.Tensor:
            if self.checkpointed and torch.is_grad_enabled() and y.requires_grad:
                out: torch.Tensor = _checkpoint(differentiable_decode, y, use_reentrant=False)
                return out
            return differentiable_decode(y)

        return make_distance(
            cfg.loss,
            tuple(m.shape),
            self.device,
            vgg_weights=cfg.vgg_weights,
            lpips_weights=cfg.lpips_weights,
            lpips_resize=cfg.lpips_resize,
            decode=decode if cfg.loss == "lpips" and m.image_shape is not None else None,
            image_shape=m.image_shape,
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
            batch_size=self.check_batch_size(),  # the teacher's batches; validation keeps valid_batch_size
            device=self.device,
            progress=self.teacher_progress("training and validation pairs"),
        )
        self.teacher_seconds = time.perf_counter() - t0
        self.validator = pairs.subset(cfg.n_train, len(seeds))
        self.validator.batch_size = cfg.valid_batch_size
        eps = unit_noise(self.model.shape, seeds).to(self.device)
        self.eps_train, self.eps_valid = eps[: cfg.n_train], eps[cfg.n_train :]
        self.y_train, self.y_valid = pairs.targets[: cfg.n_train], pairs.targets[cfg.n_train :]

    def train_cond(self, idx: torch.Tensor) -> dict[str, Any] | None:
        """The conditioning of training pairs ``idx``: pair i is the sample of seed ``data_seed + i``, so a
        conditional model gives it that seed's condition (prompt ``seed mod P``), as ``sample`` and the
        teacher do."""
        return self.model.cond_for_seeds([self.cfg.data_seed + int(i) for i in idx.tolist()])

    # -- the student ---------------------------------------------------------------------------
    def student(
        self,
        eps: torch.Tensor,
        theta: torch.Tensor,
        xi: torch.Tensor | None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        cond: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        # From pure noise (sigma_max = inf) the state is the noise itself (noise-scaled; README: Conventions).
        x = (eps if math.isinf(self.model.sigma_max) else self.model.sigma_max * eps).to(self.model.dtype)
        return self.student_from(x, theta, xi, callback, cond=cond)

    def student_from(
        self,
        x: torch.Tensor,
        theta: torch.Tensor,
        xi: torch.Tensor | None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        *,
        sampling: bool = False,
        cond: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The solver on the grid of ``(theta, xi)`` from the noise ``x`` at sigma_max.

        ``sampling``: run the model as it samples (integer timesteps where it has them) instead of
        the differentiable training path. ``cond``: the rows' conditioning (:meth:`train_cond`).
        """
        sig, msig = ld3_grid(theta, xi, self.space, self.cfg.window, self.free_end)
        return solve(
            self.ctx.solver,
            self.model if sampling else self.denoiser,
            x,
            sig,
            model_sigmas=msig,
            cond=cond,
            callback=callback,
            final_step=self.ctx.final_step,
        )

    def validate(self, theta: torch.Tensor, xi: torch.Tensor | None) -> float:
        """Mean distance to the teacher on the validation pairs, from their original noise."""
        return self.validator.loss(
            self.distance, lambda x, cond: self.student_from(x, theta, xi, sampling=True, cond=cond)
        )

    def non_finite(
        self, what: str, iteration: int, eps: torch.Tensor, theta: torch.Tensor, xi: Any, cond: dict[str, Any] | None
    ) -> StepoptError:
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
                self.student(eps, theta, xi, callback=cb, cond=cond)
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
    def params(self, sigmas: Any, what: str, model_sigmas: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        return params_from_sigmas(sigmas, self.space, model_sigmas, what, free_end=self.free_end)

    def start_grids(self) -> dict[str, list[float]]:
        """The baseline starts of ``init: best``; with a free last node also each baseline's N+1-step grid
        without its last point (the denoise as the last step) and, on a flow model, the pipeline default."""
        m, out = self.model, {}
        for kind in BASELINE_STARTS:
            out[kind] = [float(v) for v in start_sigmas(kind, m, self.n)]
            if self.free_end:
                out[f"{kind} (N+1 steps, last dropped)"] = [float(v) for v in start_sigmas(kind, m, self.n + 1)[:-1]]
        if self.free_end and isinstance(m.frame, Flow):
            out["flow-default"] = [float(v) for v in flow_default_sigmas(m.frame, self.n)]
        return out

    def fresh_state(self, key: dict[str, Any]) -> Ld3State:
        n1 = self.n + 1
        theta = torch.zeros(n1 + int(self.free_end), dtype=torch.float64)
        xi = torch.zeros(n1, dtype=torch.float64)
        init: str = self.cfg.init
        starts: dict[str, float] = {}
        if self.ctx.init_schedule is not None:
            if self.ctx.init_schedule.n_steps != self.n:
                raise StepoptError(
                    f"`init_schedule` has {self.ctx.init_schedule.n_steps} steps, this run needs {self.n} "
                    f"({self.ctx.solver.name} at this NFE)"
                )
            init_s = self.ctx.init_schedule
            theta, xi = self.params(init_s.sigmas, "`init_schedule`", init_s.model_sigmas)
            init = f"schedule ({init_s.method.name})"
        elif init != "uniform":
            grids = self.start_grids()
            kinds = list(grids) if init == "best" else [init] if init in BASELINE_STARTS else []
            cands = {"uniform": theta} if init == "best" else {}
            uniform = ld3_grid(theta, None, self.space, free_end=self.free_end)[0].numpy()
            for kind in kinds:
                sig = grids[kind]
                if init == "best" and np.allclose(sig, uniform, rtol=1e-9, atol=0):
                    continue  # the uniform start itself (logsnr in lam, time-uniform in time)
                cands[kind], _ = self.params(sig, f"init {kind}")
            if init in ("best", "trust-region"):
                tr = self.trust_region_start(required=init == "trust-region")
                if tr is not None:
                    cands["trust-region"], _ = self.params(tr, "init trust-region")
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
            noise_valid=self.eps_valid.clone() if self.cfg.noise_lr_rule == "reference" else None,
            start_theta=theta.clone(),
            start_xi=xi.clone(),
        )
        return st

    def run(self) -> OptimizeResult:
        ctx, cfg = self.ctx, self.cfg
        key = run_key(ctx, cfg)
        state_path = Path(ctx.state_path) if ctx.state_path is not None else None
        self.load_pairs()
        if self.model.time_gradient == "none":
            ctx.report(
                "log",
                message=f"ld3: {self.model.id} cannot take a fractional timestep (learned embedding table): the grid "
                "is trained through the input scaling only, not the network's time embedding",
            )
        # Everything scored on the validation pairs runs as the training loop does (its threads).
        with self.training_threads():
            if ctx.resume:
                if state_path is None:
                    raise StepoptError("ld3: resume needs a state file path")
                st = Ld3State.load(state_path, key)
                for name in ("theta", "xi", "best_theta", "best_xi", "noise", "noise_valid", "start_theta", "start_xi"):
                    if getattr(st, name) is not None:
                        setattr(st, name, getattr(st, name).to(device=self.device, dtype=torch.float64))
                ctx.report("log", message=f"ld3: resuming at iteration {st.iteration} (round {st.round + 1})")
            else:
                if state_path is not None and state_path.exists():
                    ctx.report(
                        "log", message=f"ld3: starting afresh; overwriting '{state_path}' (use `resume` to continue)"
                    )
                st = self.fresh_state(key)
            self.train(st, state_path)
        sig, msig = ld3_grid(st.best_theta, st.best_xi if cfg.decouple else None, self.space, cfg.window, self.free_end)
        sigmas = [float(v) for v in sig.detach().cpu()]
        model_sigmas = None if msig is None else [float(v) for v in msig.detach().cpu()]
        if model_sigmas is not None and model_sigmas == sigmas:
            model_sigmas = None
        if any(not b < a for a, b in itertools.pairwise(sigmas)):
            raise StepoptError(f"ld3: the learned grid is not strictly decreasing: {sigmas}")
        objective = {"name": f"ld3-validation-{cfg.loss}", "initial": st.initial_value, "final": st.best_value}
        kept: dict[str, Any] | None = None
        if cfg.keep_best != "off":
            sigmas, model_sigmas, kept = self.keep_best(st, sigmas, model_sigmas)
            if kept["kept"] != "ld3":
                with self.training_threads():
                    objective["final"] = float(self.pair_losses(self.validator, sigmas, model_sigmas).mean())
        with self.training_threads():
            validation_rmse = self.validator.rmse(sigmas, model_sigmas)
        report = {
            "space": self.space.kind,
            "last_node": "free" if self.free_end else "sigma_min",
            "init": st.init,
            "starts": st.starts,
            "resumed": bool(ctx.resume),
            "n_train": cfg.n_train,
            "n_valid": cfg.n_valid,
            "radius": self.radius,
            "lr_xi": self.lr_xi,
            "lr_noise": self.lr_noise0,
            "lr_noise_final": st.lr_noise,
            "iterations": st.iteration,
            "best_iteration": st.best_iteration,
            "rounds_done": st.round,
            "stop_reason": st.stop_reason,
            "checkpoint": self.checkpointed,
            "training_threads": 1 if self.one_thread_training() else torch.get_num_threads(),
            "time_gradient": self.model.time_gradient,
            "teacher": cfg.teacher.describe(self.model),
            "departures": cfg.departures(exact_teacher=isinstance(self.model, AnalyticModel)),
            "validation_rmse": validation_rmse,
            "seconds_teacher": round(self.teacher_seconds, 4),
            "seconds_training": round(st.seconds, 4),
        }
        if kept is not None:
            report["keep_best"] = kept
        return OptimizeResult(sigmas=sigmas, objective=objective, model_sigmas=model_sigmas, report=report)

    # -- keep_best ------------------------------------------------------------------------------
    def pair_losses(self, validator: GridValidator, sigmas: Any, model_sigmas: Any = None) -> np.ndarray:
        """The distance to the teacher of each of ``validator``'s pairs, the model run as it samples."""
        out = validator.outputs(sigmas, model_sigmas)
        per = []
        bs = self.cfg.valid_batch_size
        with torch.no_grad():
            for a in range(0, out.shape[0], bs):
                per.append(self.distance(out[a : a + bs], validator.targets[a : a + bs]).detach())
        return torch.cat(per).to(torch.float64).cpu().numpy()

    def check_validator(self) -> tuple[GridValidator, str]:
        """The pairs keep_best decides on (``check_pairs`` separate ones, or the validation pairs)."""
        cfg = self.cfg
        if cfg.check_pairs == 0:
            first = cfg.data_seed + cfg.n_train
            return self.validator, f"{first}..{first + cfg.n_valid - 1} (the validation pairs)"
        first = cfg.data_seed + cfg.n_train + cfg.n_valid
        t0 = time.perf_counter()
        v = GridValidator(
            self.model,
            self.ctx.solver,
            range(first, first + cfg.check_pairs),
            cfg.teacher,
            final_step=self.ctx.final_step,
            batch_size=self.check_batch_size(),
            device=self.device,
            progress=self.teacher_progress("keep_best's check pairs"),
        )
        self.teacher_seconds += time.perf_counter() - t0
        return v, f"{first}..{first + cfg.check_pairs - 1}"

    @contextmanager
    def training_threads(self) -> Iterator[None]:
        """One CPU thread while :meth:`one_thread_training` says so, torch's count restored after."""
        threads = torch.get_num_threads()
        if self.one_thread_training():
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def one_thread_training(self) -> bool:
        """Whether the training loop runs on one CPU thread: a network's small samples on the CPU (below
        ``SMALL_SAMPLE`` elements), where a batch-2 forward is too small to share out and intra-op threads
        only add synchronisation (unet-digits, dpmpp-3m NFE 5: 39 s on one thread, 54 s on two). The
        teachers and the keep_best check keep every thread (batches of hundreds)."""
        small = self.dim < SMALL_SAMPLE and not isinstance(self.model, AnalyticModel)
        return small and torch.device(self.device).type == "cpu"

    def teacher_progress(self, what: str) -> Callable[[int, int], None]:
        """A teacher progress callback that logs only when outputs are computed (a first run on a model):
        how many, then each quarter, then the time taken; cached seeds cost nothing and say nothing."""
        t0 = time.perf_counter()
        state = {"quarter": -1}

        def cb(done: int, total: int) -> None:
            if state["quarter"] < 0:
                state["quarter"] = 4 * done // max(total, 1)
                if done < total:
                    t = self.cfg.teacher
                    kind = "exact ODE" if isinstance(self.model, AnalyticModel) else f"{t.solver}, {t.steps} steps"
                    self.ctx.report(
                        "log",
                        message=f"ld3: computing the teacher ({kind}) of {total - done} of the {total} {what}; "
                        "cached per seed, so once per model",
                    )
                return
            quarter = 4 * done // max(total, 1)
            if quarter > state["quarter"]:
                state["quarter"] = quarter
                took = time.perf_counter() - t0
                self.ctx.report("log", message=f"ld3: {what}' teacher: {done}/{total} after {took:.0f} s")

        return cb

    def check_batch_size(self) -> int:
        """Pairs per forward in the check (``check_batch_size``; see :class:`Ld3Config`)."""
        cfg = self.cfg
        if cfg.check_batch_size != "auto":
            return int(cfg.check_batch_size)
        if isinstance(self.model, AnalyticModel):  # its exact ODE integrates each batch as one system
            return cfg.valid_batch_size
        return max(cfg.valid_batch_size, min(512, 32768 // max(self.dim, 1)))

    def keep_best(
        self, st: Ld3State, sigmas: list[float], model_sigmas: list[float] | None
    ) -> tuple[list[float], list[float] | None, dict[str, Any]]:
        """The learned grid, or its start or a baseline start, by ``keep_best`` on the check pairs.

        The candidates: the learned grid ("ld3"), the start (when it is not one of the baselines: uniform,
        trust-region, an --init schedule) and every grid of :meth:`start_grids`; the decision is
        :func:`stepopt.optimizers.dp.keep_best_decision` on the per-pair distances.
        """
        from stepopt.optimizers.dp import keep_best_decision

        t0 = time.perf_counter()
        v, seeds = self.check_validator()
        grids: dict[str, tuple[list[float], list[float] | None]] = {"ld3": (sigmas, model_sigmas)}
        base = self.start_grids()
        if st.start_theta is not None and st.init not in base:
            xs = st.start_xi if self.cfg.decouple else None
            sig, msig = ld3_grid(st.start_theta, xs, self.space, self.cfg.window, self.free_end)
            s_list = [float(x) for x in sig.detach().cpu()]
            m_list = None if msig is None else [float(x) for x in msig.detach().cpu()]
            grids[f"start ({st.init})"] = (s_list, None if m_list == s_list else m_list)
        for kind, grid in base.items():
            grids[kind] = (grid, None)
        evals0 = v.evals
        errors = {k: self.pair_losses(v, g, m) for k, (g, m) in grids.items()}
        errors = {k: np.where(np.isfinite(e), e, np.inf) for k, e in errors.items()}
        info = keep_best_decision(errors, str(self.cfg.keep_best), own="ld3")
        info["pairs"] = int(v.x_t.shape[0])
        info["seeds"] = seeds
        info["loss_on_pairs"] = {k: float(np.mean(e)) for k, e in errors.items()}
        info["network_evals"] = v.evals - evals0
        info["seconds"] = round(time.perf_counter() - t0, 4)
        if info["kept"] != "ld3":
            iv = info.get("interval")
            why = f" ({100 * iv['change']:+.1f} % [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}])" if iv else ""
            self.ctx.report(
                "log",
                message=f"ld3: {info['kept']} beats the learned grid on the {info['pairs']} check pairs{why}; kept it",
            )
        out_s, out_m = grids[info["kept"]]
        return list(out_s), out_m, info

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
                    nv = min(cfg.valid_batch_size, cfg.n_valid)
                    raise self.non_finite(
                        "the validation loss",
                        st.iteration,
                        self.eps_valid[:nv],
                        theta,
                        x_cur,
                        self.train_cond(torch.arange(cfg.n_train, cfg.n_train + nv)),
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
            if self.radius > 0 and not self.noise_moved(st, theta, xi):
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
        """One iteration on the pairs ``idx``: backward to theta, xi and the relaxed noise; updates.

        Under ``torchrun`` the pairs are shared out over the ranks (data parallel): each rank
        backpropagates its pairs' share of the batch mean, the gradients of theta and xi are summed
        over the ranks, and each rank's relaxed noises are gathered, so every rank takes the same step
        one process would.
        """
        cfg = self.cfg
        soft = self.radius > 0
        parallel = distributed.active()
        batch = idx.shape[0]
        idx_all = idx
        if parallel:
            a, b = distributed.shard(batch)
            idx = idx_all[a:b]
        eps = st.noise[idx].clone().requires_grad_(soft)
        target = self.y_train[idx]
        cond = self.train_cond(idx)
        x_arg = xi if cfg.decouple else None
        xi.requires_grad_(joint)
        opt_theta.zero_grad(set_to_none=True)
        opt_xi.zero_grad(set_to_none=True)
        if idx.shape[0] > 0:
            per = self.distance(self.student(eps, theta, x_arg, cond=cond), target)
            loss = per.sum() / batch if parallel else per.mean()
            loss.backward()
        else:  # more ranks than pairs: this rank contributes nothing to the sums
            per = torch.zeros(0, dtype=torch.float64, device=self.device)
            loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if parallel:
            for p, on in ((theta, True), (xi, joint)):
                if on:
                    p.grad = distributed.all_sum(p.grad if p.grad is not None else torch.zeros_like(p)).to(p.dtype)
            loss = distributed.all_sum(loss.detach())
        if not bool(torch.isfinite(loss)):
            raise self.non_finite("the training loss", st.iteration + 1, eps.detach(), theta.detach(), x_arg, cond)
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
            raise self.non_finite("a grid parameter", st.iteration + 1, eps.detach(), theta.detach(), x_arg, cond)
        if soft and eps.grad is not None:
            with torch.no_grad():
                # SGD on the relaxed noise, projected back onto the ball around the original noise.
                cand = self.project(eps - st.lr_noise * eps.grad, self.eps_train[idx])
                # Keep a moved noise only where it lowers that pair's loss (with the updated grid).
                x_new = None if x_arg is None else xi.detach()
                new = self.distance(self.student(cand, theta.detach(), x_new, cond=cond), target)
                ok = new < per.detach()
                if bool(ok.any()):
                    st.noise[idx[ok]] = cand[ok]
                    st.accepted_in_round = True
        if parallel:  # every rank gets every rank's relaxed noises and acceptance
            st.noise[idx_all] = distributed.gather_rows(st.noise[idx], batch)
            accepted = torch.tensor(float(st.accepted_in_round), dtype=torch.float64)
            st.accepted_in_round = bool(distributed.all_sum(accepted) > 0)
        return float(loss.detach())

    def project(self, cand: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
        """``cand`` projected onto the ball of radius ``self.radius`` around ``orig`` (per sample)."""
        diff = (cand - orig).flatten(1)
        norm = diff.norm(dim=1)
        scale = torch.where(norm > self.radius, self.radius / norm.clamp_min(1e-300), torch.ones_like(norm))
        return orig + (diff * scale[:, None]).reshape(cand.shape)

    def noise_moved(self, st: Ld3State, theta: torch.Tensor, xi: torch.Tensor) -> bool:
        """Whether the round moved a relaxed noise, by ``noise_lr_rule`` (no move: lr_noise decays).

        ``accepted``: a training pair's relaxed noise was accepted during the round. ``reference`` (the
        reference trainer's rule): after the round, each validation pair's relaxed noise takes one
        projected SGD step on its loss (batches of ``batch_size``, the grid fixed), kept where it lowers
        that pair's loss; True when any was kept. Under ``torchrun`` every rank makes the whole pass
        and the answer is any rank's.
        """
        if self.cfg.noise_lr_rule == "accepted":
            return st.accepted_in_round
        cfg = self.cfg
        if st.noise_valid is None:
            raise StepoptError("ld3: the state has no relaxed validation noises (noise_lr_rule: reference)")
        theta_d = theta.detach()
        xi_d = xi.detach() if cfg.decouple else None
        moved = False
        for a in range(0, cfg.n_valid, cfg.batch_size):
            idx = torch.arange(a, min(a + cfg.batch_size, cfg.n_valid), device=self.device)
            cond = self.train_cond(idx + cfg.n_train)  # validation pair j is seed data_seed + n_train + j
            target = self.y_valid[idx]
            eps = st.noise_valid[idx].clone().requires_grad_(True)
            per = self.distance(self.student(eps, theta_d, xi_d, cond=cond), target)
            (grad,) = torch.autograd.grad(per.mean(), eps)
            with torch.no_grad():
                cand = self.project(eps - st.lr_noise * grad, self.eps_valid[idx])
                ok = self.distance(self.student(cand, theta_d, xi_d, cond=cond), target) < per
                if bool(ok.any()):
                    st.noise_valid[idx[ok]] = cand[ok]
                    moved = True
        if distributed.active():
            moved = bool(distributed.all_sum(torch.tensor(float(moved), dtype=torch.float64)) > 0)
        return moved

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
