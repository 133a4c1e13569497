"""trust-region: the time steps that minimize a solver's error bound, without the network.

Xue, Liu, Chen, Zhang, Hu, Xie, Li, "Accelerating Diffusion Sampling with Optimized Time Steps",
CVPR 2024 (arXiv 2402.17376); the bound's structure as the authors' code evaluates it
(``StepOptim.sel_lambdas_lof_obj`` in scxue/DM-NonUniform).

A solver linear in its evaluations moves ``x/sigma`` in step s by ``sum_e W[s, e] D_e``; the
paper bounds the effect of data-prediction errors ``eps(lam) = sigma_t^p / alpha_t`` (VP
notation) on the output by first-order steps ``|eps w|``, steps before the truncation tau by the
root of the sum of squares of their terms, and the rest by per-evaluation sums ``|sum_s eps_e
W[s, e]|``. The weights W are the solver's own (``stepopt.solvers.linear``: the exact
coefficients, for every registered solver identity; the paper derived Lagrange-integral weights
for DPM-Solver++'s exact third-order form, which ``dpmpp-3m`` ``variant: exact`` has on its
first- and third-order steps). Package layout: ``bound`` (the one evaluator of J and its
gradient), ``search`` (constraint, starts, multistart, scipy), ``refine`` (teacher-driven
refinement), this module (the optimizer: hyperparameters, model-aware selection, registration).

J is minimized over the N-1 interior lam's (endpoints: the model's sigma_max and sigma_min; with
a final denoise the last node may be free, below) under the linear constraint
``lam_{i+1} - lam_i >= min_gap`` (a ``LinearConstraint``).

How stepopt solves it (the traps of the paper's procedure):

* endpoints from the model (the reference code hard-codes t = 1); the step structure from the
  solver identity itself (its weights): warm-up and lower-order final steps, UniPC's corrector,
  the solver's lower-order policy (the paper assumes the lowered final order; without it the run
  says so). 2M solvers, UniPC's exact weights, and Heun / iPNDM (whose steps also carry earlier
  evaluations through earlier states) are extensions of the paper.
* exact gradient (``bound``: complex-step derivatives of the solver's weights, closed-form
  ``d eps/d lam``); the Hessian is scipy's BFGS approximation.
* non-smoothness: the one-evaluation terms are positive and a step's root-sum-square never
  vanishes, so only the tail terms ``|c_e|`` have kinks, and only where two tail steps weigh the
  same evaluation. There ``|c|`` is smoothed as ``sqrt(c^2 + mu^2) - mu``
  (``mu`` = ``smoothing`` x J(start) / N), followed by the exact objective when the minimizer is
  away from every kink (then it is exact to solver precision); every result is scored on the
  exact objective. At a kink the exact gradient uses the subgradient 0.
* multistart: logsnr, time-uniform, edm and seeded perturbations of the start are screened by
  SLSQP (same objective, gradient and linear constraint; ~1 ms per iteration), and the best is
  refined by ``scipy.optimize.minimize(method="trust-constr")``, the paper's solver, under the
  ``LinearConstraint``; a refinement that does not improve the objective is discarded. With
  ``screen: none`` every start is solved by trust-constr (slower, same optima on the benchmark).
  Each start is itself a candidate, so the result is never worse than its start.
* defaults, measured on gmm-digits with dpmpp-3m against the exact ODE (scripts/
  bench_trust_region.py): the paper's tau rule (3 up to NFE 7, else 0) is degenerate once the
  bound is minimized well: with tau = 0 the per-node sums cancel between steps and the best
  minima pile nodes at the ends (RMSE 0.28-0.45 at NFE 8-10, versus 0.07-0.13 for logsnr),
  whatever min_gap. The default tau = N-2 puts only the final lowered-order steps in the tail (no
  cancellation between steps; the paper's 3 at NFE 5); tau: paper restores the rule. The paper's
  p = 1 for pixel models loses to time-quadratic at NFE 5, 6, 8 on gmm-digits; p = 2.5 beats every
  baseline at NFE 5, 6, 8, 10 (p: paper restores 1 / 2).
* weights (``weights: paper``, the default, for euler, dpmpp-2m, dpmpp-3m and unipc): the paper's
  own objective, whose step of order k weighs the exact integrals of ``e^lam`` times the Lagrange
  basis through its k nodes, on the solver's own order pattern (warm-up, lowered final orders).
  That is the exact 3M's first- and third-order steps; DPM-Solver++'s second-order steps and UniPC
  (whose corrector the paper's bound does not model: its UniPC results use the same bound) differ.
  ``weights: solver`` builds the bound from the solver's exact weights (``stepopt.solvers.linear``:
  every evaluation in every step, UniPC's corrector included), the faithful linearization of
  what is sampled. Under the error model ``sigma^p/alpha`` per evaluation, a surrogate of
  discretization error, the paper's weights gave better or equal grids on gmm-digits for every
  one of these solvers at NFE 5-10 (much better for UniPC; README), so they are the default.
  Heun and iPNDM always use their exact weights (an extension).
* UniPC's first step (``corrector: first``, the default with ``weights: paper``). UniPC corrects every
  step but the last; the paper's bound models it by its predictor. The exact weights show where that
  matters: in step 0 the corrector (UniC-1) moves half of D_0's first-order weight onto D_1 (bh2: the
  trapezoid), and D_0, at sigma_max, carries the largest modelled error by far (``eps(lam_0)`` about
  sigma_max = 80 on EDM's range, 3.4 at the next kl-optimal node at NFE 6), so the predictor-only
  bound doubles the one term that sets the first node: with it the minimizer puts sigma_1 at 4.8
  (NFE 5) / 6.6 (NFE 6) where the teacher-refined grids have 2.7 / 2.4, and loses to kl-optimal at
  NFE 6 (+9 %). Weighing step 0 as the solver takes it (``bound.solver_first_step``) gives sigma_1
  2.9 / 4.0 and beats every unipc bh2 baseline at NFE 5-10 (README). The exact weights in every
  step (``weights: solver``) are worse still: UniC's interpolating weights are small and positive,
  the interior terms shrink 3-10x, and the two end terms (D_0's, and the uncorrected last step's
  ``(e^{lam_N} - e^{lam_{N-1}}) eps_{N-1}``) dominate J, pushing sigma_1 up to 7.8-10.7 and the last
  node down. ``corrector: none`` restores the paper's treatment. From pure noise (flow models) the
  option does nothing: there the velocity error model is bounded (``eps = 1`` at t = 1), D_0's term
  does not dominate, and modelling the corrected first steps (the trapezoid from inf, the sub-run's
  first step, or both) gave worse grids on gmm-digits-flow (unipc bh2, final denoise, seeds 0..199,
  NFE 5 / 8 / 10: 0.164-0.171 / 0.108-0.114 / 0.089-0.103 against 0.134 / 0.084 / 0.071 with the
  predictor's weights).
* from pure noise (``sigma_max = inf``: flow models, whose grids begin at ``lam_0 = -inf``). The
  paper's bound has no finite limit there. Its error model is ``eps = sigma_t^p / alpha_t =
  e^{-lam} sigma_t^{p-1}``, and the weight of D_0 in the first step, in the noise-scaled state
  ``y = x / sigma`` against ``rho = e^lam`` that the solvers step from inf (``y_1 = y_0 + (rho_1 -
  rho_0) D_0``), tends to ``rho_1``: the term ``eps_0 W[0, 0]`` grows like ``e^{lam_1 - lam_0}``,
  and the minimizer sends every node towards -inf (the lam-uniform spacing the model prefers at
  high noise has infinite gaps). The factor ``e^{-lam} = sigma_t / alpha_t`` is the
  noise-prediction parametrization: ``D = (x_t - sigma_t eps_hat) / alpha_t`` turns an output error
  delta into the data error ``(sigma_t / alpha_t) delta``, unbounded at ``alpha_t = 0``: a network
  that predicts the noise cannot give D at pure noise at all. A model whose range includes pure
  noise predicts the velocity (flow: ``D = x_t - t v``, ``v = eps - x0``), and the paper's
  assumption on the network's output error (``delta ~ sigma_t^{p-1}``) then gives the data error
  ``eps_v(lam) = t sigma_t^{p-1} = (1 - t) sigma_t^p / alpha_t`` with the flow time ``t = 1 / (1 +
  e^lam)``: the paper's model times ``1 - t``, equal to it at low noise and finite at pure noise
  (``eps_v(-inf) = 1``, ``d eps_v / d lam = 0`` there). The weights' limit
  (``bound.from_noise_weights``): D_0 weighs ``rho_1`` in step 0 (the DDIM step from inf; UniPC's
  exact weights: the trapezoid ``rho_1 (D_0 + D_1) / 2``) and nothing later (its Lagrange factor
  vanishes), the later steps are the solver's own from ``lam_1``, as the solvers step. With both,
  the bound from a finite ``lam_0 = -L`` (same N-step structure: single / root-sum-square / tail
  terms) converges to the bound from ``-inf`` as L grows (tested), whose first term is the closed
  form ``rho_1 = 1 / sigma_1``. A flow model's shift s enters the error model as its argument
  ``sigma / s`` (SD3's resolution shift: a model shifted by s at sigma is the base model at sigma /
  s). The first finite node stays at or below the model's largest finite training level (flow: 999
  s), the counterpart of min_gap next to a finite start (above it the search wastes an evaluation
  next to pure noise). Solvers that carry evaluations through earlier states (heun, ipndm, pfdiff)
  have no derived limit and are refused. This is an extension of the paper (its models are VP
  noise-prediction networks); the grids it gives on ``builtin:gmm-digits-flow`` are in the README.
* a free last node before ``final_step: denoise`` (an extension; ``last_node``, ``bound.FinalDenoise``).
  The output is then ``D(x_N, sigma_N)``, one more evaluation. Pinned at sigma_min (the paper's fixed
  end), that evaluation corrects almost nothing, while a flow pipeline's last node is ``s / N`` and
  its denoise is a real step. The paper's J cannot place lam_N by itself: it bounds the error of
  ``x / sigma`` carried by the exponential integrator's linear part alone (``sigma_N / sigma_s``,
  no feedback through D); at the exact jump to sigma = 0 that factor is 0 for every earlier
  evaluation, although ``dD/dx ~ I`` at small sigma carries their errors to the output. Two models
  of the jump, both keeping the paper's step terms: ``denoise_carry: linear`` (default) takes the
  jump as what it is to within the model's sigma_min, a first-order step from lam_N to
  ``lam_end = -log sigma_min``: ``J_den = J(lam_0..lam_N) + (e^{lam_end} - e^{lam_N}) eps(lam_N)``,
  the paper's own bound for the N steps plus that step (for euler exactly the paper's bound on N+1
  steps to sigma_min, tested), whose state-error carry is the paper's throughout. ``data`` carries
  step s's error as for Gaussian data of variance ``sigma_data^2``: through the ODE by
  ``sqrt((sd^2 + sigma_N^2) / (sd^2 + sigma_{s+1}^2))`` (the variational equation ``d delta / d sigma
  = (1 - a) delta / sigma``, ``a = sd^2 / (sd^2 + sigma^2)`` the denoiser's Jacobian), then through D
  by ``a(sigma_N)``, plus the jump's own ``eps(lam_N)``. Measured on gmm-digits-flow against the
  exact ODE (README): ``linear`` beats the flow default for euler and dpmpp-2m at NFE 5, 8, 10;
  ``data`` (sigma_data 0.1-2) puts the last node at 0.4-2.3 and loses to it. On gmm-digits (EDM,
  sigma_max = 80) the free node helps euler and costs dpmpp-2m/3m and unipc (the bound lifts the
  interior nodes), so ``last_node: auto`` frees it only on models that start from pure noise.
* teacher refinement (``teacher_refine: true``, an extension beyond the paper; module ``refine``): a
  model-free bound can lose to a baseline on a given model (UniPC on gmm-digits at NFE 6). This
  stage scores the bound's grid (or the selection's choice) and every baseline against the
  teacher on the selection's noises, starts from the best, and moves the nodes to minimize that
  error by backpropagating through the solver; it costs network evaluations (seconds on
  gmm-digits) and is never worse than its start or a baseline on those noises. With a final
  denoise the last node is one of its variables (unless ``last_node: sigma_min``) and, on flow
  models, the pipeline default is among its starts.
* model-aware selection (``select: true``): every (p, tau, init) of ``select_p`` x
  ``select_tau`` x {logsnr, time-uniform}, plus every baseline, is run by the solver from
  ``select_n`` teacher noises and every candidate's error is reported (the fixed error model can be
  wrong for a given network). tau = 0 is left out of the default grid (degenerate, and slow to
  optimize). The lowest bound candidate then faces the lowest baseline under ``select_rule``:
  "significant" (default) keeps the baseline unless a 95 % paired bootstrap interval of the
  bound's RMSE change is below 0 on ``select_confirm`` (512) fresh noises (only the two finalists are
  solved there). The minimum of ~30 noisy estimates is optimistic and the error over noises
  heavy-tailed (a few noises end on another mode): on unet-digits unipc NFE 8 the bound's best
  candidate is better on 90 % of the noises and significantly so on the 32 selection noises, and
  14 % worse on 2048 held-out seeds ([+3.9, +24.2]); on 480 fresh noises its interval is
  [-1.5, +35.5] %, so kl-optimal stays. The price: on gmm-digits dpmpp-3m NFE 5 a real 7.8 % gain is
  not provable there, and the baseline is returned (README).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from stepopt.baselines import BASELINES, FLOW_BASELINES, sigma_top
from stepopt.errors import StepoptError
from stepopt.frames import Flow
from stepopt.models.base import DiffusionModel
from stepopt.optimizers import OptimizeContext, OptimizeResult, OptimizerSpec, register
from stepopt.optimizers.trust_region.bound import (
    FIRST_STEP_CORRECTED,
    FROM_NOISE_SOLVERS,
    PAPER_WEIGHT_SOLVERS,
    ErrorBound,
    FinalDenoise,
    WeightFn,
    error_model,
    from_noise_weights,
    lagrange_weights,
    solver_first_step,
)
from stepopt.optimizers.trust_region.config import INITS, OBJECTIVE_NAME, Tau, TrustRegionConfig
from stepopt.optimizers.trust_region.refine import refine_grid
from stepopt.optimizers.trust_region.search import (
    Solution,
    make_starts,
    minimize_bound,
    monotone_constraint,
    project_gaps,
    start_grid,
)
from stepopt.solvers import SolverIdentity, get_solver
from stepopt.solvers._common import step_order
from stepopt.solvers.linear import has_linear_weights, step_weights

__all__ = [
    "INITS",
    "OBJECTIVE_NAME",
    "ErrorBound",
    "Resolved",
    "Solution",
    "Tau",
    "TrustRegionConfig",
    "error_model",
    "make_starts",
    "minimize_bound",
    "monotone_constraint",
    "optimize_grid",
    "project_gaps",
    "resolve",
    "run",
    "start_grid",
]

# --------------------------------------------------------------------------------------------
# The optimizer: solver identity -> step orders, hyperparameters, optional model-aware selection.


def _is_latent(model: DiffusionModel) -> bool:
    """Whether the model declares itself a latent-space model (``model.latent``; pixel otherwise)."""
    return model.latent


def solver_orders(
    identity: SolverIdentity, n_steps: int, from_noise: bool = False
) -> tuple[list[int] | None, bool | None]:
    """The step orders of a multistep solver with a lower-order policy (None otherwise), and that policy.

    The bound itself does not need them (it takes the solver's weights); they go into the report.
    """
    if not has_linear_weights(identity):
        raise StepoptError(
            f"the trust-region bound needs the solver's weights as a linear map of its evaluations; solver "
            f"'{identity.name}' does not declare them"
        )
    spec = get_solver(identity.name)
    if not spec.has_lower_order_final:
        return None, None
    lowered = identity.lower_order_final is not False
    return [step_order(s, n_steps, identity.order, lowered, from_noise) for s in range(n_steps)], lowered


@dataclass(frozen=True)
class Resolved:
    """The hyperparameters after resolving "paper" / "auto" (tau may stay "all")."""

    p: float
    tau: int | str
    init: str

    def tau_steps(self, n_steps: int) -> int:
        return n_steps if self.tau == "all" else int(self.tau)

    def to_dict(self) -> dict[str, Any]:
        return {"p": self.p, "tau": self.tau, "init": self.init}


def resolve_tau(tau: int | str, n_steps: int) -> int | str:
    """tau for N steps: auto = N-2 (the final lowered-order steps form the tail), paper = 3 / 0."""
    if tau == "auto":
        return max(n_steps - 2, 0)
    if tau == "paper":
        return 3 if n_steps <= 7 else 0
    return tau


def resolve(cfg: TrustRegionConfig, model: DiffusionModel, n_steps: int) -> Resolved:
    """Resolve p "paper" (2 latent, 1 pixel), tau "auto"/"paper" and init "auto" (time-uniform / logsnr)."""
    latent = _is_latent(model)
    p = (2.0 if latent else 1.0) if cfg.p == "paper" else float(cfg.p)
    init = ("time-uniform" if latent else "logsnr") if cfg.init == "auto" else cfg.init
    return Resolved(p, resolve_tau(cfg.tau, n_steps), init)


def noise_scale(model: DiffusionModel) -> float:
    """The scale at which a pure-noise model's error model is evaluated: its flow shift (1 otherwise)."""
    frame = model.frame
    return float(frame.shift) if isinstance(frame, Flow) else 1.0


def optimize_grid(
    model: DiffusionModel,
    identity: SolverIdentity,
    n_steps: int,
    cfg: TrustRegionConfig,
    resolved: Resolved,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    final_step: str = "none",
) -> tuple[Solution, ErrorBound]:
    """The model-free part: minimize the bound for this solver, N and hyperparameters.

    With ``final_step: denoise`` (and ``last_node: free``) the last node is a variable too and the
    bound is its denoise extension (:class:`~stepopt.optimizers.trust_region.bound.FinalDenoise`).
    """
    solver_orders(identity, n_steps)
    lam_start, lam_end = -math.log(model.sigma_max), -math.log(model.sigma_min)
    if not (lam_end - lam_start) / n_steps > 1e-6:
        raise StepoptError(
            f"the model's sigma range [{model.sigma_min:.6g}, {model.sigma_max:.6g}] is too narrow for {n_steps}"
            " steps: a model with (almost) a single noise level cannot be stepped through"
        )
    if n_steps * cfg.min_gap >= lam_end - lam_start:
        raise StepoptError(
            f"min_gap {cfg.min_gap} is too large for {n_steps} steps over lam in [{lam_start:.4g}, {lam_end:.4g}]; "
            f"use `min_gap=X` with X < {(lam_end - lam_start) / n_steps:.4g}"
        )
    paper = cfg.weights == "paper" and identity.name in PAPER_WEIGHT_SOLVERS
    weight_fn: WeightFn | None = lagrange_weights if paper else None
    # UniPC's corrected first step as the solver takes it (corrector: first; bound.solver_first_step),
    # from a finite sigma_max: from pure noise the velocity error model is bounded there and the
    # predictor's weights stay (module docstring).
    first = paper and cfg.corrector == "first" and identity.name in FIRST_STEP_CORRECTED
    if first and not math.isinf(lam_start):
        weight_fn = solver_first_step(lagrange_weights)
    error = "noise"
    if math.isinf(lam_start):
        # From pure noise: the weights' limit and the velocity error model (module docstring).
        if identity.name not in FROM_NOISE_SOLVERS:
            raise StepoptError(
                f"trust-region from pure noise (sigma_max = inf) supports {', '.join(FROM_NOISE_SOLVERS)}; "
                f"solver '{identity.name}' carries its evaluations through earlier states, whose limit is not "
                "derived; use the optimizer ld3, gits or oss"
            )
        weight_fn = from_noise_weights(weight_fn or step_weights, trapezoid=identity.name == "unipc" and not paper)
        error = "velocity"
    bound = ErrorBound(
        identity,
        n_steps,
        lam_start,
        lam_end,
        resolved.p,
        resolved.tau_steps(n_steps),
        weight_fn,
        error,
        noise_scale(model) if error == "velocity" else 1.0,
        -math.log(sigma_top(model.frame)) if math.isinf(lam_start) else -math.inf,
        final_denoise_model(cfg, model, final_step, lam_end),
    )
    if n_steps == 1 and not bound.free_end:
        lam = np.array([lam_start, lam_end])
        v = bound.value(np.empty(0))
        return Solution(lam, v, resolved.init, v, ()), bound
    starts = make_starts(model, n_steps, resolved.init, cfg, seed)
    return minimize_bound(bound, starts, cfg, log), bound


def free_last_node(cfg: TrustRegionConfig, model: DiffusionModel, final_step: str) -> bool:
    """Whether the bound's last node is a variable: ``final_step: denoise`` and ``last_node`` free, or
    auto on a model that samples from pure noise (config docstring)."""
    if final_step != "denoise":
        return False
    return cfg.last_node == "free" or (cfg.last_node == "auto" and math.isinf(model.sigma_max))


def final_denoise_model(
    cfg: TrustRegionConfig, model: DiffusionModel, final_step: str, lam_end: float
) -> FinalDenoise | None:
    """The bound's final-denoise extension when the last node is free (:func:`free_last_node`)."""
    if not free_last_node(cfg, model, final_step):
        return None
    return FinalDenoise(float(cfg.sigma_data), cfg.denoise_carry, lam_end)


def _logger(ctx: OptimizeContext) -> Callable[[str], None]:
    return lambda message: ctx.report("log", message=message)


def _objective(sol: Solution, resolved: Resolved) -> dict[str, Any]:
    return {
        "name": OBJECTIVE_NAME,
        "initial": sol.initial,
        "final": sol.value,
        "p": resolved.p,
        "tau": resolved.tau,
        "start": resolved.init,
        "best_start": sol.start,
    }


def run(ctx: OptimizeContext, cfg: TrustRegionConfig) -> OptimizeResult:
    """Optimize the grid for ``ctx`` (N = ctx.n_steps: the solver's NFE rule, N = NFE for multistep)."""
    n = ctx.n_steps
    from_noise = math.isinf(ctx.model.sigma_max)
    orders, lowered = solver_orders(ctx.solver, n, from_noise)
    report: dict[str, Any] = {
        "orders": orders,
        "lower_order_final": lowered,
        "last_node": "free" if free_last_node(cfg, ctx.model, ctx.final_step) else "sigma_min",
    }
    if from_noise:
        report["error_model"] = {"kind": "velocity", "noise_scale": noise_scale(ctx.model)}
    note = None
    if orders is None:
        note = (
            f"the paper's bound is for multistep exponential integrators; '{ctx.solver.name}' is not one, so the "
            "bound uses its exact weights, including what its steps carry through earlier states (an extension)"
        )
    elif not lowered and n > 1 and orders[-1] > 1:
        note = (
            "the paper's bound assumes the solver lowers its order on the final steps; this solver keeps "
            f"order {orders[-1]} there, so the weights are built for that pattern (an extension)"
        )
    if note is not None:
        report["note"] = note
        ctx.report("log", message=f"trust-region: {note}")
    if cfg.select:
        return _run_select(ctx, cfg, report)
    resolved = resolve(cfg, ctx.model, n)
    t0 = time.perf_counter()
    sol, bound = optimize_grid(
        ctx.model, ctx.solver, n, cfg, resolved, ctx.seed, log=_logger(ctx), final_step=ctx.final_step
    )
    report.update(
        resolved=resolved.to_dict(),
        latent=_is_latent(ctx.model),
        evaluations_per_step=bound.describe()["evaluations_per_step"],
        runs=_runs_report(sol),
    )
    ctx.report(
        "log",
        message=(
            f"trust-region: p={resolved.p:g} tau={resolved.tau} init={resolved.init}: bound "
            f"{sol.initial:.6g} -> {sol.value:.6g} (best start {sol.start}, {time.perf_counter() - t0:.2f} s)"
        ),
    )
    objective = _objective(sol, resolved)
    sigmas = _sigmas(ctx, sol.lam)
    if cfg.teacher_refine:
        sigmas, refined = _teacher_refine(ctx, cfg, None, {"trust-region": sigmas}, report)
        objective["teacher_refine_rmse"] = refined
    return OptimizeResult(sigmas=sigmas, objective=objective, report=report)


def _baseline_candidates(ctx: OptimizeContext) -> dict[str, list[float]]:
    """Every baseline the model's range and frame allow, as candidate grids (sigmas); with a final
    denoise on a flow model also the pipeline's default (its last node is not sigma_min)."""
    out: dict[str, list[float]] = {}
    kinds = list(BASELINES)
    if ctx.final_step == "denoise" and isinstance(ctx.model.frame, Flow):
        kinds += list(FLOW_BASELINES)
    for kind in kinds:
        try:
            out[f"{kind} baseline"] = _sigmas(ctx, start_grid(kind, ctx.model, ctx.n_steps))
        except StepoptError:
            continue
    return out


def _teacher_refine(
    ctx: OptimizeContext,
    cfg: TrustRegionConfig,
    validator: Any | None,
    cands: dict[str, list[float]],
    report: dict[str, Any],
) -> tuple[list[float], float]:
    """The best ``refine_starts`` of ``cands`` and every baseline by teacher RMSE, each refined by
    :func:`refine_grid`, the lowest result kept; on ``validator`` (None: the selection's noises), or
    with ``refine_pool`` on stratified noises screened with the first candidate."""
    strata: dict[str, Any] | None = None
    if cfg.refine_pool:
        validator, strata = _stratified_validator(ctx, cfg, next(iter(cands.values())))
    elif validator is None:
        validator = select_validator(ctx, cfg)
    scored = {name: (validator.rmse(sig), sig) for name, sig in cands.items()}
    for name, sig in _baseline_candidates(ctx).items():
        if name not in scored:
            scored[name] = (validator.rmse(sig), sig)
    order = sorted(scored, key=lambda k: scored[k][0])
    # With a final denoise the refinement measures, so the last node is free unless pinned explicitly.
    free = ctx.final_step == "denoise" and cfg.last_node != "sigma_min"
    free_at = -math.log(ctx.model.sigma_min) if free else None
    runs: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    for name in order[: cfg.refine_starts]:
        ctx.report("log", message=f"trust-region teacher_refine: start {name} (rmse {scored[name][0]:.6g})")
        lam0 = -np.log(np.asarray(scored[name][1], dtype=np.float64))
        runs[name] = refine_grid(validator, lam0, cfg.teacher_refine_iters, free_end_at=free_at)
        info = runs[name][1]
        ctx.report(
            "log",
            message=(
                f"trust-region teacher_refine: rmse {info['rmse_start']:.6g} -> {info['rmse']:.6g} "
                f"({info['iterations']} iterations, {info['seconds']:.1f} s)"
            ),
        )
    # The lowest refined RMSE wins; ties keep the better start (the order above).
    start = min(runs, key=lambda k: (runs[k][1]["rmse"], order.index(k)))
    lam, info = runs[start]
    info = {**info, "last_node": "free" if free else "sigma_min"}
    if len(runs) > 1:
        info["starts"] = {
            k: {f: v[1][f] for f in ("rmse_start", "rmse", "iterations", "seconds")} for k, v in runs.items()
        }
    report["teacher_refine"] = {
        "teacher_seeds": [validator.seeds[0], validator.seeds[-1]] if strata is None else "stratified",
        **({} if strata is None else {"strata": strata}),
        "teacher": cfg.teacher.describe(ctx.model),
        "metric": "rmse vs teacher",
        "start_candidates": {name: v[0] for name, v in scored.items()},
        "start": start,
        **info,
    }
    return _sigmas(ctx, lam), float(info["rmse"])


def _runs_report(sol: Solution) -> list[dict[str, Any]]:
    return [
        {k: (round(v, 6) if isinstance(v, float) and k == "seconds" else v) for k, v in r.items()} for r in sol.runs
    ]


def _sigmas(ctx: OptimizeContext, lam: np.ndarray) -> list[float]:
    """exp(-lam) with the model's endpoints exact (a free last node: exact when it is at sigma_min)."""
    s = np.exp(-np.asarray(lam, dtype=np.float64))
    s[0] = ctx.model.sigma_max
    lo = ctx.model.sigma_min
    if s[-1] <= lo * (1 + 1e-12):
        s[-1] = lo
    return [float(v) for v in s]


def _stratified_validator(
    ctx: OptimizeContext, cfg: TrustRegionConfig, screen: list[float]
) -> tuple[Any, dict[str, Any]]:
    """``select_n`` teacher noises drawn from the ``refine_pool`` seeds from ``select_seed``, stratified
    by the screen grid's proxy error (:mod:`stepopt.strata`), and a validator weighting them."""
    from stepopt.strata import stratified_seeds
    from stepopt.teacher import GridValidator

    pool = range(cfg.select_seed, cfg.select_seed + cfg.refine_pool)
    st = stratified_seeds(
        ctx.model,
        ctx.solver,
        screen,
        pool,
        cfg.select_n,
        tail=cfg.refine_tail,
        rng_seed=cfg.select_seed,
        final_step=ctx.final_step,
        device=ctx.device,
    )
    ctx.report(
        "log",
        message=(
            f"trust-region teacher_refine: screened {cfg.refine_pool} noises ({st.report['evals']} evaluations, "
            f"{st.report['seconds']:.1f} s); teacher on the {st.report['tail']} worst and {st.report['sample']} "
            "sampled from the rest"
        ),
    )
    validator = GridValidator(
        ctx.model, ctx.solver, st.seeds, cfg.teacher, final_step=ctx.final_step, device=ctx.device, weights=st.weights
    )
    # How well the screen ranks this model's noises: its proxy against the exact error of the screen grid.
    true = validator.squared_errors(screen)
    ok = (st.proxy > 0) & (true > 0)
    corr = float(np.corrcoef(np.log(st.proxy[ok]), np.log(true[ok]))[0, 1]) if ok.sum() > 2 else None
    return validator, {**st.report, "proxy_log_correlation": corr}


def select_validator(ctx: OptimizeContext, cfg: TrustRegionConfig) -> Any:
    """The selection measure: RMSE of the solver against the teacher on ``select_n`` noises."""
    from stepopt.teacher import GridValidator

    seeds = list(range(cfg.select_seed, cfg.select_seed + cfg.select_n))
    return GridValidator(ctx.model, ctx.solver, seeds, cfg.teacher, final_step=ctx.final_step, device=ctx.device)


def _run_select(ctx: OptimizeContext, cfg: TrustRegionConfig, report: dict[str, Any]) -> OptimizeResult:
    """Model-aware selection: optimize every (p, tau, init) candidate; the lowest teacher RMSE among
    them faces the lowest among the baselines under ``select_rule``."""
    n = ctx.n_steps
    validator = select_validator(ctx, cfg)
    seeds = validator.seeds
    ctx.report("log", message=f"trust-region select: teacher on {len(seeds)} noises (seeds {seeds[0]}..{seeds[-1]})")

    cands: list[dict[str, Any]] = []
    # per group ("baseline", "bound"): (rmse, sigmas, candidate record, per-seed squared errors)
    best: dict[str, tuple[float, list[float], dict[str, Any], np.ndarray]] = {}

    def score(group: str, sig: list[float], record: dict[str, Any]) -> float:
        sq = validator.squared_errors(sig)
        err = float(np.sqrt(sq.mean()))
        record["rmse"] = err
        cands.append(record)
        if group not in best or err < best[group][0] * (1 - 1e-9):  # ties (same grid from both inits) keep the first
            best[group] = (err, sig, record, sq)
        return err

    for name, sig in _baseline_candidates(ctx).items():
        err = score("baseline", sig, {"candidate": name, "p": None, "tau": None, "init": None, "bound": None})
        ctx.report("log", message=f"  {name:<34} rmse {err:.6g}")
    seen: set[tuple[float, int | str, str]] = set()
    for p in cfg.select_p:
        for tau in cfg.select_tau:
            for init in ("logsnr", "time-uniform"):
                resolved = Resolved(float(p), resolve_tau(tau, n), init)
                key = (resolved.p, resolved.tau_steps(n), init)
                if key in seen:  # e.g. tau "auto" = 3 at N = 5: the same problem
                    continue
                seen.add(key)
                sol, _ = optimize_grid(
                    ctx.model, ctx.solver, n, cfg, resolved, ctx.seed, log=_logger(ctx), final_step=ctx.final_step
                )
                tau_label = f"{tau}({resolved.tau})" if tau in ("auto", "paper") else str(tau)
                name = f"p={float(p):g} tau={tau_label} init={init}"
                record = {"candidate": name, **resolved.to_dict(), "bound": sol.value}
                err = score("bound", _sigmas(ctx, sol.lam), record)
                record["objective"] = _objective(sol, resolved)
                ctx.report("log", message=f"  {name:<34} bound {sol.value:<12.6g} rmse {err:.6g}")
    decision = _select_decision(best, cfg.select_rule)
    if cfg.select_rule == "significant" and cfg.select_confirm and decision.get("interval", {}).get("change", 0) < 0:
        decision = _select_confirm(ctx, cfg, best, decision)
    err, sigmas, chosen, _ = best[decision.pop("group")]
    ctx.report(
        "log", message=f"trust-region select: chose {chosen['candidate']} (rmse {err:.6g}; rule {cfg.select_rule})"
    )
    report.update(
        select={
            "teacher_seeds": [seeds[0], seeds[-1]],
            "teacher": cfg.teacher.describe(ctx.model),
            "metric": "rmse vs teacher",
            "candidates": [{k: v for k, v in c.items() if k != "objective"} for c in cands],
            "chosen": chosen["candidate"],
            **decision,
        },
        resolved={"p": chosen["p"], "tau": chosen["tau"], "init": chosen["init"]},
        latent=_is_latent(ctx.model),
    )
    objective = dict(chosen.get("objective") or {"name": OBJECTIVE_NAME, "initial": None, "final": None})
    objective["select_rmse"] = err
    if cfg.teacher_refine:
        sigmas, refined = _teacher_refine(ctx, cfg, validator, {str(chosen["candidate"]): sigmas}, report)
        objective["teacher_refine_rmse"] = refined
    return OptimizeResult(sigmas=sigmas, objective=objective, report=report)


def _select_confirm(
    ctx: OptimizeContext,
    cfg: TrustRegionConfig,
    best: dict[str, tuple[float, list[float], dict[str, Any], np.ndarray]],
    decision: dict[str, Any],
) -> dict[str, Any]:
    """The bound's best candidate is lower on the selection's noises: decide "significant" on
    ``select_confirm`` fresh noises (the seeds after the selection's), where only the two finalists
    run. The selection chose the minimum of ~30 noisy estimates on those noises, so only fresh ones
    give an unbiased comparison, and enough of them to hold the heavy tail of the error."""
    first = cfg.select_seed + cfg.select_n
    ctx.report("log", message=f"trust-region select: confirming on {cfg.select_confirm} fresh noises")
    validator = select_validator(ctx, replace(cfg, select_seed=first, select_n=cfg.select_confirm))
    trial = {g: (v[0], v[1], v[2], validator.squared_errors(v[1])) for g, v in best.items()}
    out = _select_decision(trial, "significant")
    out["selection_interval"] = decision["interval"]
    out["confirm_seeds"] = [first, first + cfg.select_confirm - 1]
    return out


def _select_decision(
    best: dict[str, tuple[float, list[float], dict[str, Any], np.ndarray]], rule: str
) -> dict[str, Any]:
    """Which group's best candidate ``--select`` returns: the best baseline stays unless the best bound
    candidate is lower ("lowest") or lower with a paired bootstrap interval below 0 ("significant", the
    rule of gits/oss ``keep_best`` with the roles swapped: the bound must prove itself on the noises)."""
    from stepopt.optimizers.dp import keep_best_decision

    if "bound" not in best or "baseline" not in best:
        return {"group": "bound" if "bound" in best else "baseline"}
    errors = {"baseline": best["baseline"][3], "bound": best["bound"][3]}
    info = keep_best_decision(errors, rule, own="baseline")
    out: dict[str, Any] = {"rule": rule, "group": info["kept"]}
    if "interval" in info:
        out["interval"] = info["interval"]  # the bound's RMSE change against the best baseline
    return out


SPEC = register(
    OptimizerSpec(
        name="trust-region",
        config_cls=TrustRegionConfig,
        run=run,
    )
)
