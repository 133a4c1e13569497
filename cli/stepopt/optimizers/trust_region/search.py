"""Minimizing the bound: the linear monotonicity constraint, starts, multistart with SLSQP screening and
the trust-constr refinement (the module docstring of :mod:`stepopt.optimizers.trust_region`)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import BFGS, LinearConstraint, minimize

from stepopt.baselines import sigma_top, start_sigmas
from stepopt.errors import StepoptError
from stepopt.models.base import DiffusionModel
from stepopt.optimizers.trust_region.bound import ErrorBound
from stepopt.optimizers.trust_region.config import INITS, TrustRegionConfig

# A long search (large N) says how far it is, at most once every PROGRESS_SECONDS (nothing for short runs).
PROGRESS_SECONDS = 5.0

# --------------------------------------------------------------------------------------------
# Solving: linear constraint, starts, multistart.


def monotone_constraint(
    n_steps: int,
    lam_start: float,
    lam_end: float,
    min_gap: float,
    lam_floor: float = -math.inf,
    free_end: bool = False,
) -> LinearConstraint:
    """``lam_{i+1} - lam_i >= min_gap`` for i = 0..N-1, as a constraint on the N-1 interior lam's.

    From pure noise (``lam_start = -inf``) the first gap is infinite whatever lam_1 is; row 0 is
    then ``lam_1 >= lam_floor`` (the model's largest finite noise level: a node above it would be
    an evaluation wasted next to pure noise, as min_gap keeps nodes off a finite start).
    ``free_end`` (a final denoise follows lam_N): the variables are lam_1..lam_N, the gaps are those
    of lam_0..lam_N, and a last row keeps ``lam_N <= lam_end`` (the model's sigma_min).
    """
    if free_end:
        # The same rows on N variables, with lam_N in place of the fixed end, then lam_N <= lam_end.
        base = monotone_constraint(n_steps + 1, lam_start, math.inf, min_gap, lam_floor)
        a, lb = base.A[:-1], np.asarray(base.lb, dtype=np.float64)[:-1]
        last = np.zeros((1, n_steps))
        last[0, -1] = -1.0
        a = np.vstack([a, last])
        lb = np.concatenate([lb, [-lam_end]])
        return LinearConstraint(a, lb, np.full(len(lb), np.inf))
    # Row i is lam_{i+1} - lam_i; the variables are x_j = lam_{j+1}, j = 0..N-2.
    a = np.zeros((n_steps, n_steps - 1))
    idx = np.arange(n_steps - 1)
    a[idx, idx] = 1.0
    a[idx + 1, idx] = -1.0
    lb = np.full(n_steps, float(min_gap))
    lb[0] += lam_start  # lam_1 >= lam_0 + gap
    lb[-1] -= lam_end  # -lam_{N-1} >= gap - lam_N
    if lam_start == -math.inf:
        lb[0] = lam_floor
        keep = slice(None) if math.isfinite(lam_floor) else slice(1, None)
        return LinearConstraint(a[keep], lb[keep], np.full(n_steps, np.inf)[keep])
    return LinearConstraint(a, lb, np.full(n_steps, np.inf))


def project_gaps(lam: np.ndarray, min_gap: float) -> np.ndarray:
    """The grid with every gap at least ``min_gap``: excess gaps shrink proportionally, endpoints kept.

    A grid from pure noise (``lam[0] = -inf``, an infinite first gap) keeps ``-inf`` and projects
    ``lam[1:]``, lowering ``lam[1]`` first if the finite part is too short for its gaps.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if lam[0] == -math.inf and len(lam) > 2:
        rest = lam[1:].copy()
        rest[0] = min(rest[0], rest[-1] - (len(rest) - 1) * min_gap * (1 + 1e-9))
        return np.concatenate(([-math.inf], project_gaps(rest, min_gap)))
    gaps = np.diff(lam)
    total = lam[-1] - lam[0]
    if np.all(gaps >= min_gap):
        return lam.copy()
    excess = np.maximum(gaps - min_gap, 0.0)
    room = total - len(gaps) * min_gap
    gaps = min_gap + (excess * room / excess.sum() if excess.sum() > 0 else np.full(len(gaps), room / len(gaps)))
    out = lam[0] + np.concatenate(([0.0], np.cumsum(gaps)))
    out[-1] = lam[-1]
    return out


@dataclass(frozen=True)
class Solution:
    """Best grid found (N+1 lam's), its exact objective, the start it came from and the run's log."""

    lam: np.ndarray
    value: float
    start: str
    initial: float
    runs: tuple[dict[str, Any], ...]


def _run_scipy(
    bound: ErrorBound,
    x: np.ndarray,
    mu: float,
    constraint: LinearConstraint,
    method: str,
    cfg: TrustRegionConfig,
    polish: bool = False,
    maxiter: int | None = None,
) -> tuple[np.ndarray, int]:
    fun = lambda y: bound.value_and_grad(y, mu)  # noqa: E731
    maxiter = maxiter or (cfg.refine_maxiter if polish else cfg.maxiter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "delta_grad == 0" and bound-clipping notices of scipy
        if method == "SLSQP":
            res = minimize(
                fun,
                x,
                jac=True,
                method="SLSQP",
                constraints=[constraint],
                options={"maxiter": maxiter, "ftol": cfg.ftol},
            )
        else:
            res = minimize(
                fun,
                x,
                jac=True,
                hess=BFGS(),
                method="trust-constr",
                constraints=[constraint],
                options={
                    "maxiter": maxiter,
                    "gtol": cfg.gtol,
                    "xtol": cfg.xtol,
                    # A small barrier from the start: the gap constraints are rarely active, and a
                    # large initial barrier only adds subproblems (scipy's default is 0.1).
                    "initial_barrier_parameter": 1e-8,
                    "initial_barrier_tolerance": 1e-8,
                    "initial_tr_radius": 0.1 if polish else 1.0,
                },
            )
    xr = np.asarray(res.x, dtype=np.float64)
    return xr, int(getattr(res, "nit", 0) or 0)


def minimize_bound(
    bound: ErrorBound,
    starts: dict[str, np.ndarray],
    cfg: TrustRegionConfig,
    log: Callable[[str], None] | None = None,
) -> Solution:
    """Minimize ``bound`` from every start (N+1 lam's each); keep the best exact objective.

    Each start is screened by SLSQP (same objective, analytic gradient, same linear constraint)
    when ``cfg.screen == "slsqp"``, else solved by trust-constr; the best screened grid is then
    refined by trust-constr. Kinked objectives are solved through the smoothing continuation of
    ``cfg.smoothing`` (relative to the mean term J(start)/N). Every start is itself a candidate,
    so the result is never worse than the best start. ``log(message)`` hears how far a long search
    is (after :data:`PROGRESS_SECONDS`, then at most that often).
    """
    t_start = time.perf_counter()
    last_note = [t_start]

    def note(message: str) -> None:
        now = time.perf_counter()
        if log is not None and now - last_note[0] >= PROGRESS_SECONDS:
            last_note[0] = now
            log(f"trust-region: {message} ({now - t_start:.0f} s)")

    n = bound.n_steps
    constraint = monotone_constraint(
        n, bound.lam_start, bound.lam_end, cfg.min_gap, bound.lam_floor, free_end=bound.free_end
    )
    first = next(iter(starts.values()))
    initial = bound.value(bound.variables(project_gaps(first, cfg.min_gap)))

    def widths(j0: float) -> tuple[float, ...]:
        # Continuation through the smoothed kinks (widths relative to the start's mean term), then
        # the exact objective where the minimizer is away from every kink (as for N <= 6 with
        # tau = 3): that stage makes it exact to solver precision. Next to an active kink the
        # smoothed result stands (always scored on the exact objective).
        scale = j0 / n if math.isfinite(j0) and j0 > 0 else 1.0
        return (0.0,) if bound.smooth else tuple(r * scale for r in cfg.smoothing)

    def exact_stage_mu(lam: np.ndarray, mu_last: float) -> float | None:
        if mu_last == 0.0:
            return None
        c = bound.tail_sums(lam)
        return 0.0 if c.size == 0 or np.abs(c).min() > 10 * mu_last else None

    screen = "SLSQP" if cfg.screen == "slsqp" else "trust-constr"
    cands: list[tuple[float, str, np.ndarray]] = []
    runs: list[dict[str, Any]] = []
    starts_x = {name: bound.variables(project_gaps(lam0, cfg.min_gap)) for name, lam0 in starts.items()}

    def score(x: np.ndarray) -> tuple[float, np.ndarray]:
        full = bound.full(x)
        full[-1] = min(full[-1], bound.lam_end)  # a free lam_N a rounding above sigma_min's lam
        lam = project_gaps(full, cfg.min_gap * (1 - 1e-9))
        return (bound.value(bound.variables(lam)) if np.all(np.diff(lam) > 0) else math.inf), lam

    # Every start runs the first stage; only the best ``finalists`` continue through the
    # remaining smoothing stages and the exact stage (successive halving of the multistart).
    state: dict[str, dict[str, Any]] = {}
    for name, x in starts_x.items():
        v0 = bound.value(x)
        state[name] = {"x": x, "best": (v0, name, bound.full(x)), "v0": v0, "mus": widths(v0), "nit": 0, "sec": 0.0}
    # Pass 0: every start, first width, at most ``screen_maxiter`` iterations. Then the
    # finalists: the first width to convergence, the other widths, and the exact stage.
    n_stages = max(len(st["mus"]) for st in state.values())
    for stage in range(-1, n_stages + 1):
        active = list(state)
        if stage >= 0:
            active = sorted(active, key=lambda k: state[k]["best"][0])[: cfg.finalists]
        for name in active:
            st = state[name]
            t0 = time.perf_counter()
            if stage < len(st["mus"]):
                mu: float | None = st["mus"][max(stage, 0)]
            elif stage == len(st["mus"]):
                mu = exact_stage_mu(bound.full(st["x"]), st["mus"][-1])
            else:
                mu = None
            if mu is not None:
                cap = min(cfg.screen_maxiter, cfg.maxiter) if stage < 0 else cfg.maxiter
                st["x"], it = _run_scipy(bound, st["x"], mu, constraint, screen, cfg, maxiter=cap)
                st["nit"] += it
                v, lam = score(st["x"])
                if v < st["best"][0]:
                    st["best"] = (v, name, lam)
            st["sec"] += time.perf_counter() - t0
            best_now = min(x["best"][0] for x in state.values())
            what = "screening every start" if stage < 0 else f"stage {stage + 1}/{n_stages + 1} of the finalists"
            note(f"N={n}, {what}: start {name} done, best bound so far {best_now:.6g}")
    for name, st in state.items():
        cands.append(st["best"])
        runs.append(
            {
                "start": name,
                "initial": st["v0"],
                "final": st["best"][0],
                "iterations": st["nit"],
                "method": screen,
                "seconds": st["sec"],
            }
        )
    best = min(cands, key=lambda c: c[0])
    if screen == "SLSQP":
        # The solver of record: trust-constr under the linear constraint, from the best screened
        # grid, on the exact objective unless a kink is (nearly) active there.
        note(f"N={n}: refining the best grid (start {best[1]}, bound {best[0]:.6g}) with trust-constr")
        t0 = time.perf_counter()
        mu_last = widths(bound.value(starts_x[best[1]]))[-1]
        mu = mu_last if exact_stage_mu(best[2], mu_last) is None else 0.0
        x, it = _run_scipy(bound, bound.variables(best[2]), mu, constraint, "trust-constr", cfg, polish=True)
        v, lam = score(x)
        runs.append(
            {
                "start": f"{best[1]} (refine)",
                "initial": best[0],
                "final": v,
                "iterations": it,
                "method": "trust-constr",
                "seconds": time.perf_counter() - t0,
            }
        )
        if v <= best[0] + 1e-12 * abs(best[0]):
            best = (v, best[1], lam)
    return Solution(lam=best[2], value=float(best[0]), start=best[1], initial=float(initial), runs=tuple(runs))


def start_grid(kind: str, model: DiffusionModel, n_steps: int) -> np.ndarray:
    """A start (N+1 increasing lam's) from the baseline ``kind`` on the model's own sigma range."""
    return -np.log(start_sigmas(kind, model, n_steps))


def make_starts(
    model: DiffusionModel, n_steps: int, init: str, cfg: TrustRegionConfig, seed: int
) -> dict[str, np.ndarray]:
    """``init`` first, then the other inits (multistart) and seeded perturbations of ``init``."""
    kinds = [init] + ([k for k in INITS if k != init] if cfg.multistart else [])
    starts: dict[str, np.ndarray] = {}
    for kind in kinds:
        try:
            starts[kind] = start_grid(kind, model, n_steps)
        except StepoptError:
            if kind == init:
                raise
    if n_steps >= 2 and cfg.perturbed_starts and cfg.perturb > 0:
        rng = np.random.default_rng(seed)
        base = starts[init]
        # The mean gap (from pure noise: of the finite nodes lam_1..lam_N).
        gap = (base[-1] - base[1]) / (n_steps - 1) if base[0] == -math.inf else (base[-1] - base[0]) / n_steps
        for i in range(cfg.perturbed_starts):
            lam = base.copy()
            lam[1:-1] = np.sort(base[1:-1] + cfg.perturb * gap * rng.standard_normal(n_steps - 1))
            low = base[0] if math.isfinite(base[0]) else -math.log(sigma_top(model.frame))
            lam[1:] = np.clip(lam[1:], low, base[-1])
            starts[f"{init}+perturbed{i}"] = project_gaps(lam, cfg.min_gap)
    return starts
