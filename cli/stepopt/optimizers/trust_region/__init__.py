"""trust-region: the time steps that minimize a multistep solver's error bound, without the network.

Xue, Liu, Chen, Zhang, Hu, Xie, Li, "Accelerating Diffusion Sampling with Optimized Time Steps",
CVPR 2024 (arXiv 2402.17376); the bound as the authors' code evaluates it
(``StepOptim.sel_lambdas_lof_obj`` in scxue/DM-NonUniform) and methods.md §1.

A multistep exponential integrator in data-prediction form (DPM-Solver++, UniPC) steps from lam_s
to lam_{s+1} = lam_s + h_s with order k_s: ``x_{s+1} / sigma_{s+1} = x_s / sigma_s + sum_j w_{s,j}
D_j`` (EDM frame), where the weight of node j is the exact integral of ``e^lam l_j(lam)`` over
[lam_s, lam_{s+1}], ``l_j`` the Lagrange basis on the k_s most recent nodes. With
``E_i = e^{lam_i}``, ``H0 = e^h - 1``, ``H1 = h e^h - H0``, ``H2 = h^2 e^h - 2 H1`` (h = h_s,
b = h_{s-1}, a = h_{s-2}):

* k=1: ``w_s = E_s H0 = E_{s+1} - E_s``;
* k=2: ``w_{s-1} = -E_s H1 / b``, ``w_s = E_s (H1 + b H0) / b``;
* k=3: ``w_{s-2} = E_s (H2 + b H1) / (a (a+b))``, ``w_{s-1} = -E_s (H2 + (a+b) H1) / (a b)``,
  ``w_s = E_s (H2 + (2b+a) H1 + b (a+b) H0) / (b (a+b))``.

The data-prediction error at lam is modelled as ``eps(lam) = sigma_t^p / alpha_t`` (VP notation,
``alpha_t = (1+e^{-2 lam})^{-1/2}``, ``sigma_t = (1+e^{2 lam})^{-1/2}``), and the bound, with tau
the truncation step, is

    J = sum_{k_s = 1} |eps_s w_s|
      + sum_{s < tau, k_s >= 2} sqrt(sum_j (eps_j w_{s,j})^2)
      + sum_i | sum_{s >= tau, k_s >= 2} eps_i w_{s,i} |.

It is minimized over the N-1 interior lam's (endpoints: the model's sigma_max and sigma_min) under
the linear constraint ``lam_{i+1} - lam_i >= min_gap`` (a ``LinearConstraint``).

How stepopt solves it (methods.md §1, "Traps"):

* endpoints from the model (the reference code hard-codes t = 1); step orders from the solver
  identity: max order K and ``k_s = min(s+1, K, N-s)`` when the solver lowers its order on the
  final steps, ``min(s+1, K)`` when it does not (the paper assumes the lowered order; the run
  says so and records the pattern). K = 2 (the 2M solvers) is an extension of the paper.
* exact analytic gradient (reverse pass through ``dH_q/dh = h^q e^h`` and
  ``d eps/d lam = -eps (p alpha_t^2 + sigma_t^2)``), evaluated in Python floats for N <= 24 and
  vectorized above; the Hessian is scipy's BFGS approximation (a Hessian from central
  differences of the analytic gradient was measured not to reduce trust-constr's iterations).
* non-smoothness: the first-order terms are positive and a step's root-sum-square never vanishes
  (its weights sum to ``E_{s+1} - E_s > 0``), so only the tail terms ``|c_i|`` have kinks, and
  only where two tail steps share a node. There ``|c|`` is smoothed as ``sqrt(c^2 + mu^2) - mu``
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
* model-aware selection (``select: true``): every (p, tau, init) of ``select_p`` x
  ``select_tau`` x {logsnr, time-uniform}, plus the logsnr baseline, is run by the solver from
  ``select_n`` teacher noises; the lowest RMSE against the teacher wins and every candidate's
  error is reported (the fixed error model can be wrong for a given network: methods.md §1,
  trap 4). tau = 0 is left out of the default grid (degenerate, and slow to optimize).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.optimize import BFGS, LinearConstraint, minimize

from stepopt.baselines import baseline_sigmas
from stepopt.errors import StepoptError
from stepopt.models.base import DiffusionModel
from stepopt.optimizers import OptimizeContext, OptimizeResult, OptimizerSpec, register
from stepopt.solvers import SolverIdentity

# Max solver order K of each supported solver (None: the identity's order). The bound holds for
# multistep exponential integrators in data-prediction form; DDIM/Euler is their first order.
SUPPORTED_SOLVERS: dict[str, int | None] = {"euler": 1, "dpmpp-2m": 2, "dpmpp-3m": 3, "unipc": None}
INITS = ("logsnr", "time-uniform", "edm")
OBJECTIVE_NAME = "xue2024-error-bound"
# Up to this many steps the objective is evaluated in Python floats (faster than numpy on tiny arrays).
SCALAR_MAX_STEPS = 24


Tau = int | Literal["auto", "paper", "all"]


@dataclass(frozen=True)
class TrustRegionConfig:
    """Options of the trust-region optimizer (documented defaults: configs/trust-region.yaml).

    p: exponent of the error model ``sigma_t^p / alpha_t``. Default 2.5, measured on gmm-digits
       (module docstring); "paper" = 1 for pixel models, 2 for latent ones (the paper's
       recommendation; its reference code hard-codes 2). A model is latent if ``model.latent``.
    tau: truncation step of the bound: steps s < tau use the root-sum-square term, the others
       the per-node sums. "auto" = N-2: only the final lowered-order steps form the tail (the
       paper's 3 at N = 5); "paper" = 3 for N <= 7 else 0 (the paper's rule, degenerate under a
       global optimizer for N > 7, see the module docstring); "all" = every step root-sum-square.
    init: the start whose objective is reported as "initial"; "auto" = logsnr (uniform lam) for
       pixel models, time-uniform for latent ones (the paper's recommendation).
    min_gap: minimum lam gap between consecutive nodes.
    multistart: also start from the other inits (logsnr, time-uniform, edm).
    perturbed_starts / perturb: extra starts: ``init`` plus seeded Gaussian noise of
       ``perturb`` x the mean lam gap.
    finalists / screen_maxiter: every start first runs at most ``screen_maxiter`` iterations;
       the ``finalists`` best then run to convergence and through the later stages.
    smoothing: continuation widths mu for the kinks ``|c|``, relative to J(start) / N.
    screen: "slsqp" screens every start with SLSQP and refines the best with trust-constr;
       "none" solves every start with trust-constr.
    maxiter: iteration cap of each solve; refine_maxiter: of the trust-constr refinement.
    ftol: SLSQP's tolerance; gtol, xtol: trust-constr's.
    select: choose p, tau and init by the RMSE of the solver against a teacher on
       ``select_n`` noises (seeds ``select_seed``, ...), among ``select_p`` x ``select_tau`` x
       both inits plus the logsnr baseline.
    """

    p: float | Literal["paper"] = 2.5
    tau: Tau = "auto"
    init: Literal["auto", "logsnr", "time-uniform", "edm"] = "auto"
    min_gap: float = 0.05
    multistart: bool = True
    perturbed_starts: int = 2
    perturb: float = 0.2
    finalists: int = 2
    screen_maxiter: int = 40
    smoothing: tuple[float, ...] = (1e-3, 1e-5)
    screen: Literal["slsqp", "none"] = "slsqp"
    maxiter: int = 200
    refine_maxiter: int = 20
    ftol: float = 1e-14
    gtol: float = 1e-10
    xtol: float = 1e-10
    select: bool = False
    select_p: tuple[float, ...] = (1.0, 2.0, 2.5, 3.0)
    select_tau: tuple[Tau, ...] = ("auto", 3, "all")
    select_n: int = 32
    select_seed: int = 10_000

    def __post_init__(self) -> None:
        for p in (self.p, *self.select_p):
            if p != "paper" and not (isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0):
                raise ValueError(f"p must be 'paper' or a number > 0, got {p!r}")
        for tau in (self.tau, *self.select_tau):
            if tau not in ("auto", "paper", "all") and not (
                isinstance(tau, int) and not isinstance(tau, bool) and tau >= 0
            ):
                raise ValueError(f"tau must be 'auto', 'paper', 'all' or an integer >= 0, got {tau!r}")
        if not self.min_gap > 0:
            raise ValueError(f"min_gap must be > 0 (in lam), got {self.min_gap!r}")
        if self.perturbed_starts < 0 or not self.perturb >= 0 or self.finalists < 1 or self.screen_maxiter < 1:
            raise ValueError("perturbed_starts and perturb must be >= 0, finalists and screen_maxiter >= 1")
        if not self.smoothing or any(not m > 0 for m in self.smoothing):
            raise ValueError(f"smoothing must be a non-empty list of numbers > 0, got {list(self.smoothing)!r}")
        if self.maxiter < 1 or self.refine_maxiter < 1 or not (self.ftol > 0 and self.gtol > 0 and self.xtol > 0):
            raise ValueError("maxiter and refine_maxiter must be >= 1 and ftol, gtol, xtol > 0")
        if not self.select_p or not self.select_tau:
            raise ValueError("select_p and select_tau must not be empty")
        if self.select_n < 1:
            raise ValueError(f"select_n must be >= 1, got {self.select_n}")


# --------------------------------------------------------------------------------------------
# The bound: step orders, solver weights, error model, objective and its gradient.


def step_orders(n_steps: int, max_order: int, lower_order_final: bool = True) -> np.ndarray:
    """Order k_s of each step: ``min(s+1, K, N-s)`` (lowered final order) or ``min(s+1, K)``.

    >>> step_orders(6, 3).tolist()
    [1, 2, 3, 3, 2, 1]
    >>> step_orders(4, 3, lower_order_final=False).tolist()
    [1, 2, 3, 3]
    """
    s = np.arange(n_steps)
    k = np.minimum(s + 1, max_order)
    if lower_order_final:
        k = np.minimum(k, n_steps - s)
    return k.astype(np.int64)


def _h_funcs(h: np.ndarray) -> tuple[np.ndarray, ...]:
    """H0, H1, H2 (module docstring) and their h-derivatives ``dH_q/dh = h^q e^h``."""
    eh = np.exp(h)
    h0 = np.expm1(h)
    h1 = h * eh - h0
    h2 = h * h * eh - 2.0 * h1
    return h0, h1, h2, eh, h * eh, h * h * eh


def _weight_factors(lam: np.ndarray, orders: np.ndarray, with_grad: bool = True) -> tuple[np.ndarray, ...]:
    """E_s and the factors f[s, m] = W[s, m] / E_s, with their partials w.r.t. (a, b, h).

    Every order's formula is evaluated on every step (dummy gaps a = b = 1 where a step does not
    look that far back) and each step's own order is selected by 0/1 masks: a fixed number of
    vector operations, whatever N.
    """
    n = len(lam) - 1
    k = orders
    m1, m2, m3 = (k == 1) * 1.0, (k == 2) * 1.0, (k == 3) * 1.0
    h = lam[1:] - lam[:-1]
    b = np.ones(n)
    a = np.ones(n)
    b[1:] = np.where(k[1:] >= 2, h[:-1], 1.0)
    a[2:] = np.where(k[2:] >= 3, h[:-2], 1.0)
    h0, h1, h2, dh0, dh1, dh2 = _h_funcs(h)
    ab = a + b
    # k = 3 (Lagrange quadratic): numerators N_m and denominators D_m of the three weights.
    n0, d0 = h2 + b * h1, a * ab
    n1, d1 = h2 + ab * h1, a * b
    n2, d2 = h2 + (2 * b + a) * h1 + b * ab * h0, b * ab
    q0, q1, q2 = m3 / d0, m3 / d1, m3 / d2
    h1b = m2 * h1 / b
    f = np.empty((n, 3))
    f[:, 0] = q0 * n0
    f[:, 1] = -q1 * n1 - h1b
    f[:, 2] = q2 * n2 + h1b + (m1 + m2) * h0
    if not with_grad:
        return np.exp(lam[:-1]), f
    fa = np.empty((n, 3))
    fb = np.empty((n, 3))
    fh = np.empty((n, 3))
    h1bb = h1b / b
    fa[:, 0] = -q0 * n0 * (2 * a + b) / d0
    fa[:, 1] = -q1 * (h1 - n1 * b / d1)
    fa[:, 2] = q2 * (h1 + b * h0 - n2 * b / d2)
    fb[:, 0] = q0 * (h1 - n0 * a / d0)
    fb[:, 1] = -q1 * (h1 - n1 * a / d1) + h1bb
    fb[:, 2] = q2 * (2 * h1 + (a + 2 * b) * h0 - n2 * (a + 2 * b) / d2) - h1bb
    dh1b = m2 * dh1 / b
    fh[:, 0] = q0 * (dh2 + b * dh1)
    fh[:, 1] = -q1 * (dh2 + ab * dh1) - dh1b
    fh[:, 2] = q2 * (dh2 + (2 * b + a) * dh1 + b * ab * dh0) + dh1b + (m1 + m2) * dh0
    return np.exp(lam[:-1]), f, fa, fb, fh


def _check_orders(orders: np.ndarray) -> np.ndarray:
    k = np.asarray(orders, dtype=np.int64)
    if k.size and (k.max() > 3 or k.min() < 1):
        raise ValueError(f"step orders must be 1, 2 or 3, got {sorted(set(k.tolist()))}")
    return k


def solver_weights(lam: np.ndarray, orders: np.ndarray, with_grad: bool = False) -> tuple[np.ndarray, ...]:
    """Weights of the nodes each step uses, and optionally their derivatives.

    ``lam``: (N+1,) increasing; ``orders``: (N,). Returns ``W`` of shape (N, 3) with ``W[s, m]``
    the weight of node ``s - 2 + m`` in step s (0 where unused), and with ``with_grad`` also
    ``dW`` of shape (N, 3, 4): the derivatives w.r.t. lam_{s-2}, lam_{s-1}, lam_s, lam_{s+1}.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if not with_grad:
        e, f = _weight_factors(lam, _check_orders(orders), with_grad=False)
        return (e[:, None] * f,)
    e, f, fa, fb, fh = _weight_factors(lam, _check_orders(orders))
    w = e[:, None] * f
    # a = lam_{s-1} - lam_{s-2}, b = lam_s - lam_{s-1}, h = lam_{s+1} - lam_s, E_s = e^{lam_s}.
    dw = np.empty((*w.shape, 4))
    dw[:, :, 0] = -e[:, None] * fa
    dw[:, :, 1] = e[:, None] * (fa - fb)
    dw[:, :, 2] = w + e[:, None] * (fb - fh)
    dw[:, :, 3] = e[:, None] * fh
    return w, dw


def error_model(lam: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """``eps = sigma_t^p / alpha_t`` (VP notation) and ``d eps / d lam = -eps (p alpha_t^2 + sigma_t^2)``."""
    lam = np.asarray(lam, dtype=np.float64)
    # log alpha_t = -log(1 + e^{-2 lam}) / 2, log sigma_t = -log(1 + e^{2 lam}) / 2 (stable forms).
    log_eps = -0.5 * p * np.logaddexp(0.0, 2 * lam) + 0.5 * np.logaddexp(0.0, -2 * lam)
    eps = np.exp(log_eps)
    alpha2 = 0.5 * (1.0 + np.tanh(lam))  # alpha_t^2 = 1 / (1 + e^{-2 lam})
    return eps, -eps * (p * alpha2 + (1.0 - alpha2))


def _shifted(v: np.ndarray, n: int) -> np.ndarray:
    """(N, 3): ``v[s - 2 + m]`` (0 where the index is negative) for a vector of N+1 node values."""
    vp = np.concatenate(([0.0, 0.0], v))
    return np.stack([vp[0:n], vp[1 : n + 1], vp[2 : n + 2]], axis=1)


@dataclass(frozen=True)
class ErrorBound:
    """The bound J of Eq. 14 on a grid of N steps between fixed endpoints ``lam_start < lam_end``.

    ``value(x)`` / ``value_and_grad(x, mu)`` take the N-1 interior lam's; ``mu > 0`` replaces each
    tail ``|c|`` by ``sqrt(c^2 + mu^2) - mu`` (smooth, within ``mu`` per node of the exact value).
    At ``mu = 0`` a kink ``c = 0`` gets the subgradient 0.
    """

    lam_start: float
    lam_end: float
    orders: tuple[int, ...]
    p: float
    tau: int

    def __post_init__(self) -> None:
        k = _check_orders(np.asarray(self.orders))
        s = np.arange(len(k))
        object.__setattr__(self, "_k", k)
        object.__setattr__(self, "_first", (k == 1).astype(np.float64))
        object.__setattr__(self, "_rss", ((k >= 2) & (s < self.tau)).astype(np.float64))
        object.__setattr__(self, "_tail", ((k >= 2) & (s >= self.tau)).astype(np.float64))

    @property
    def n_steps(self) -> int:
        return len(self.orders)

    @property
    def smooth(self) -> bool:
        """True when no tail step shares a node with another (no cancellation, no kinks)."""
        tail = np.nonzero(self._tail)[0]  # type: ignore[attr-defined]
        return len(tail) == 0 or bool(np.all(np.diff(tail) > 2))

    def full(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        return np.concatenate(([self.lam_start], np.asarray(x, dtype=np.float64), [self.lam_end]))

    def terms(self, lam: np.ndarray) -> np.ndarray:
        """T[s, m] = eps(node) * W[s, m] for node ``s - 2 + m``."""
        (w,) = solver_weights(lam, self._k)  # type: ignore[attr-defined]
        eps, _ = error_model(lam, self.p)
        return w * _shifted(eps, self.n_steps)

    def tail_sums(self, lam: np.ndarray) -> np.ndarray:
        """The per-node sums c_i of the tail steps (s >= tau, k_s >= 2) at nodes some tail step uses."""
        t = self.terms(np.asarray(lam, dtype=np.float64)) * self._tail[:, None]  # type: ignore[attr-defined]
        n = self.n_steps
        c = np.zeros(n + 3)
        used = np.zeros(n + 3, dtype=bool)
        for m in range(3):
            c[m : m + n] += t[:, m]
            used[m : m + n] |= t[:, m] != 0
        return c[2:][used[2:]]

    def value(self, x: Sequence[float] | np.ndarray, mu: float = 0.0) -> float:
        """J at interior lam's ``x`` (inf if they are not strictly increasing)."""
        lam = self.full(x)
        if np.any(np.diff(lam) <= 0):
            return math.inf
        return self._evaluate(lam, mu, False)[0]

    def value_and_grad(self, x: Sequence[float] | np.ndarray, mu: float = 0.0) -> tuple[float, np.ndarray]:
        """J and dJ/dx (exact; reverse-mode chain rule written out)."""
        val, grad = self._evaluate(self.full(x), mu, True)
        assert grad is not None
        return val, grad

    def gradient(self, x: Sequence[float] | np.ndarray, mu: float = 0.0) -> np.ndarray:
        return self.value_and_grad(x, mu)[1]

    def _evaluate(self, lam: np.ndarray, mu: float, with_grad: bool) -> tuple[float, np.ndarray | None]:
        if self.n_steps <= SCALAR_MAX_STEPS:
            return _evaluate_scalar(lam.tolist(), self.orders, self.p, self.tau, mu, with_grad)
        return self._evaluate_vector(lam, mu, with_grad)

    def _evaluate_vector(self, lam: np.ndarray, mu: float, with_grad: bool) -> tuple[float, np.ndarray | None]:
        n = self.n_steps
        first, rss, tail = self._first, self._rss, self._tail  # type: ignore[attr-defined]
        factors = _weight_factors(lam, self._k, with_grad)  # type: ignore[attr-defined]
        e, f = factors[0], factors[1]
        eps, deps = error_model(lam, self.p)
        ev = _shifted(eps, n)
        w = e[:, None] * f
        t = w * ev
        # First-order steps: |eps_s w_s| = eps_s w_s (both > 0).
        j_first = float(first @ t[:, 2])
        # Steps s < tau: root of the sum of squares (> 0: a step's weights sum to E_{s+1} - E_s).
        norms = np.sqrt((t * t).sum(axis=1))
        j_rss = float(rss @ norms)
        # Steps s >= tau: per-node sums c_i, then |c_i| (smoothed when mu > 0).
        tt = t * tail[:, None]
        c = np.zeros(n + 3)
        c[0:n] += tt[:, 0]
        c[1 : n + 1] += tt[:, 1]
        c[2 : n + 2] += tt[:, 2]
        if mu > 0:
            root = np.sqrt(c * c + mu * mu)
            absc, dc = root - mu, c / root
        else:
            absc, dc = np.abs(c), np.sign(c)
        val = j_first + j_rss + float(absc.sum())
        if not with_grad:
            return val, None
        # g[s, m] = dJ / dT[s, m].
        g = (rss / np.where(norms > 0, norms, 1.0))[:, None] * t
        g[:, 2] += first
        g += tail[:, None] * np.stack([dc[0:n], dc[1 : n + 1], dc[2 : n + 2]], axis=1)
        # dT[s, m] / dlam_{s-2+r} = eps_m dW[s, m, r] + [r == m] eps'_m W[s, m], contracted with g.
        ge = g * ev
        fa, fb, fh = factors[2:]
        ga, gb, gh = (ge * fa).sum(axis=1), (ge * fb).sum(axis=1), (ge * fh).sum(axis=1)
        gd = g * _shifted(deps, n) * w
        contrib = np.empty((n, 4))
        contrib[:, 0] = -e * ga + gd[:, 0]
        contrib[:, 1] = e * (ga - gb) + gd[:, 1]
        contrib[:, 2] = (ge * w).sum(axis=1) + e * (gb - gh) + gd[:, 2]
        contrib[:, 3] = e * gh
        # Step s touches lam_{s-2 .. s+1}; index i + 2 holds lam_i.
        grad = np.zeros(n + 3)
        for r in range(4):
            grad[r : r + n] += contrib[:, r]
        return val, grad[3:-1]


def _evaluate_scalar(
    lam: Sequence[float], orders: Sequence[int], p: float, tau: int, mu: float, with_grad: bool
) -> tuple[float, np.ndarray | None]:
    """J (and dJ/d interior lam) step by step in Python floats: the fast path for small N.

    The same formulas as :func:`solver_weights` / :func:`error_model`, scalar, with the gradient
    written as a reverse pass over the steps (tests check both paths against each other).
    """
    n = len(orders)
    lm = [float(v) for v in lam]
    # Error model at the nodes: with e2 = e^{2 lam}, alpha_t^2 = e2 / (1 + e2), sigma_t^2 =
    # 1 / (1 + e2), eps = sigma_t^p / alpha_t and eps' = -eps (p alpha_t^2 + sigma_t^2).
    eps = [0.0] * (n + 1)
    deps = [0.0] * (n + 1)
    half_p = 0.5 * p
    for i, l in enumerate(lm):
        e2 = math.exp(min(max(2.0 * l, -700.0), 700.0))
        s2 = 1.0 / (1.0 + e2)
        a2 = e2 * s2
        e = s2**half_p / math.sqrt(a2)
        eps[i] = e
        deps[i] = -e * (p * a2 + s2)
    big_e = [math.exp(l) for l in lm]
    # Forward pass. Step s uses nodes s-k+1..s; for each, f (W = E_s f) and df/da, df/db, df/dh
    # with a = lam_{s-1} - lam_{s-2}, b = lam_s - lam_{s-1}, h = lam_{s+1} - lam_s. kind: 0 first
    # order, 1 root-sum-square, 2 tail.
    steps: list[tuple[int, int, tuple[float, ...], tuple[float, ...], float]] = []
    c = [0.0] * (n + 1)
    val = 0.0
    for s in range(n):
        k = orders[s]
        e_s = big_e[s]
        h = lm[s + 1] - lm[s]
        eh = big_e[s + 1] / e_s
        h0 = math.expm1(h)
        h1 = h * eh - h0
        h2 = h * h * eh - 2.0 * h1
        if k == 1:
            val += eps[s] * e_s * h0  # first-order steps: |eps_s w_s| = eps_s w_s > 0
            steps.append((s, 0, (h0,), (0.0, 0.0, eh), 0.0))
            continue
        f: tuple[float, ...]
        fa: tuple[float, ...]
        fb: tuple[float, ...]
        fh: tuple[float, ...]
        if k == 2:
            b = lm[s] - lm[s - 1]
            f = (-h1 / b, h1 / b + h0)
            fa = (0.0, 0.0)
            fb = (h1 / (b * b), -h1 / (b * b))
            fh = (-h * eh / b, h * eh / b + eh)
        else:
            b = lm[s] - lm[s - 1]
            a = lm[s - 1] - lm[s - 2]
            ab = a + b
            n0, d0 = h2 + b * h1, a * ab
            n1, d1 = h2 + ab * h1, a * b
            n2, d2 = h2 + (2 * b + a) * h1 + b * ab * h0, b * ab
            dh1, dh2 = h * eh, h * h * eh
            f = (n0 / d0, -n1 / d1, n2 / d2)
            fa = (-n0 * (2 * a + b) / (d0 * d0), -(h1 - n1 * b / d1) / d1, (h1 + b * h0 - n2 * b / d2) / d2)
            fb = (
                (h1 - n0 * a / d0) / d0,
                -(h1 - n1 * a / d1) / d1,
                (2 * h1 + (a + 2 * b) * h0 - n2 * (a + 2 * b) / d2) / d2,
            )
            fh = ((dh2 + b * dh1) / d0, -(dh2 + ab * dh1) / d1, (dh2 + (2 * b + a) * dh1 + b * ab * eh) / d2)
        j0 = s - k + 1
        ts = [eps[j0 + m] * e_s * f[m] for m in range(k)]
        if s < tau:
            norm = math.sqrt(sum(t * t for t in ts))
            val += norm
            steps.append((s, 1, f, fa + fb + fh, norm))
        else:
            for m in range(k):
                c[j0 + m] += ts[m]
            steps.append((s, 2, f, fa + fb + fh, 0.0))
    if mu > 0:
        roots = [math.sqrt(ci * ci + mu * mu) for ci in c]
        val += sum(roots) - mu * len(c)
        dc = [ci / r for ci, r in zip(c, roots, strict=True)]
    else:
        val += sum(abs(ci) for ci in c)
        dc = [float((ci > 0) - (ci < 0)) for ci in c]
    if not with_grad:
        return val, None
    # Reverse pass: g = dJ/dT, then through W = E_s f(a, b, h) to lam_{s-2}, ..., lam_{s+1}
    # (dE_s/dlam_s = E_s).
    grad = [0.0] * (n + 1)
    for s, kind, f, d, norm in steps:
        e_s = big_e[s]
        if kind == 0:
            # T = eps_s E_s H0(h): dT/dlam_s = eps'_s E_s H0 + eps_s E_s (H0 - e^h), dT/dlam_{s+1} = eps_s E_s e^h.
            eh = d[2]
            grad[s] += deps[s] * e_s * f[0] + eps[s] * e_s * (f[0] - eh)
            grad[s + 1] += eps[s] * e_s * eh
            continue
        k = len(f)
        j0 = s - k + 1
        ga = gb = gh = gw = 0.0
        for m in range(k):
            j = j0 + m
            t = eps[j] * e_s * f[m]
            g = t / norm if kind == 1 else dc[j]
            ge = g * eps[j] * e_s
            ga += ge * d[m]
            gb += ge * d[k + m]
            gh += ge * d[2 * k + m]
            gw += g * t
            grad[j] += g * deps[j] * e_s * f[m]
        if k >= 3:
            grad[s - 2] -= ga
            grad[s - 1] += ga
        grad[s - 1] -= gb
        grad[s] += gb + gw - gh
        grad[s + 1] += gh
    return val, np.array(grad[1:-1])


# --------------------------------------------------------------------------------------------
# Solving: linear constraint, starts, multistart.


def monotone_constraint(n_steps: int, lam_start: float, lam_end: float, min_gap: float) -> LinearConstraint:
    """``lam_{i+1} - lam_i >= min_gap`` for i = 0..N-1, as a constraint on the N-1 interior lam's."""
    # Row i is lam_{i+1} - lam_i; the variables are x_j = lam_{j+1}, j = 0..N-2.
    a = np.zeros((n_steps, n_steps - 1))
    idx = np.arange(n_steps - 1)
    a[idx, idx] = 1.0
    a[idx + 1, idx] = -1.0
    lb = np.full(n_steps, float(min_gap))
    lb[0] += lam_start  # lam_1 >= lam_0 + gap
    lb[-1] -= lam_end  # -lam_{N-1} >= gap - lam_N
    return LinearConstraint(a, lb, np.full(n_steps, np.inf))


def project_gaps(lam: np.ndarray, min_gap: float) -> np.ndarray:
    """The grid with every gap at least ``min_gap``: excess gaps shrink proportionally, endpoints kept."""
    lam = np.asarray(lam, dtype=np.float64)
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
) -> Solution:
    """Minimize ``bound`` from every start (N+1 lam's each); keep the best exact objective.

    Each start is screened by SLSQP (same objective, analytic gradient, same linear constraint)
    when ``cfg.screen == "slsqp"``, else solved by trust-constr; the best screened grid is then
    refined by trust-constr. Kinked objectives are solved through the smoothing continuation of
    ``cfg.smoothing`` (relative to the mean term J(start)/N). Every start is itself a candidate,
    so the result is never worse than the best start.
    """
    n = bound.n_steps
    constraint = monotone_constraint(n, bound.lam_start, bound.lam_end, cfg.min_gap)
    first = next(iter(starts.values()))
    initial = bound.value(project_gaps(first, cfg.min_gap)[1:-1])

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
    starts_x = {name: project_gaps(lam0, cfg.min_gap)[1:-1] for name, lam0 in starts.items()}

    def score(x: np.ndarray) -> tuple[float, np.ndarray]:
        lam = project_gaps(bound.full(x), cfg.min_gap * (1 - 1e-9))
        return (bound.value(lam[1:-1]) if np.all(np.diff(lam) > 0) else math.inf), lam

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
        t0 = time.perf_counter()
        mu_last = widths(bound.value(starts_x[best[1]]))[-1]
        mu = mu_last if exact_stage_mu(best[2], mu_last) is None else 0.0
        x, it = _run_scipy(bound, best[2][1:-1], mu, constraint, "trust-constr", cfg, polish=True)
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
    return -np.log(baseline_sigmas(kind, n_steps, model.sigma_max, model.sigma_min, model.frame))


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
        gap = (base[-1] - base[0]) / n_steps
        for i in range(cfg.perturbed_starts):
            lam = base.copy()
            lam[1:-1] = np.sort(base[1:-1] + cfg.perturb * gap * rng.standard_normal(n_steps - 1))
            starts[f"{init}+perturbed{i}"] = project_gaps(np.clip(lam, base[0], base[-1]), cfg.min_gap)
    return starts


# --------------------------------------------------------------------------------------------
# The optimizer: solver identity -> step orders, hyperparameters, optional model-aware selection.


def _is_latent(model: DiffusionModel) -> bool:
    """Whether the model declares itself a latent-space model (``model.latent``; pixel otherwise)."""
    return bool(getattr(model, "latent", False))


def solver_orders(identity: SolverIdentity, n_steps: int) -> tuple[np.ndarray, bool]:
    """The step orders the bound uses for ``identity``, and whether the final order is lowered."""
    if identity.name not in SUPPORTED_SOLVERS:
        raise StepoptError(
            f"the trust-region bound is for multistep exponential integrators; solver '{identity.name}' is not one "
            f"(use one of {', '.join(SUPPORTED_SOLVERS)})"
        )
    k_max = SUPPORTED_SOLVERS[identity.name] or identity.order
    if not 1 <= k_max <= 3:
        raise StepoptError(f"the trust-region bound supports orders 1-3, got order {k_max} for '{identity.name}'")
    lowered = identity.lower_order_final is not False
    return step_orders(n_steps, k_max, lowered), lowered


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


def optimize_grid(
    model: DiffusionModel,
    identity: SolverIdentity,
    n_steps: int,
    cfg: TrustRegionConfig,
    resolved: Resolved,
    seed: int = 0,
) -> tuple[Solution, ErrorBound]:
    """The model-free part: minimize the bound for this solver, N and hyperparameters."""
    orders, _ = solver_orders(identity, n_steps)
    lam_start, lam_end = -math.log(model.sigma_max), -math.log(model.sigma_min)
    if n_steps * cfg.min_gap >= lam_end - lam_start:
        raise StepoptError(
            f"min_gap {cfg.min_gap} is too large for {n_steps} steps over lam in [{lam_start:.4g}, {lam_end:.4g}]; "
            f"use --set min_gap=X with X < {(lam_end - lam_start) / n_steps:.4g}"
        )
    bound = ErrorBound(lam_start, lam_end, tuple(int(k) for k in orders), resolved.p, resolved.tau_steps(n_steps))
    if n_steps == 1:
        lam = np.array([lam_start, lam_end])
        v = bound.value(np.empty(0))
        return Solution(lam, v, resolved.init, v, ()), bound
    starts = make_starts(model, n_steps, resolved.init, cfg, seed)
    return minimize_bound(bound, starts, cfg), bound


def _objective(sol: Solution, bound: ErrorBound, resolved: Resolved) -> dict[str, Any]:
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
    orders, lowered = solver_orders(ctx.solver, n)
    report: dict[str, Any] = {"orders": [int(k) for k in orders], "lower_order_final": lowered}
    if not lowered and n > 1 and orders[-1] > 1:
        note = (
            "the paper's bound assumes the solver lowers its order on the final steps; this solver keeps "
            f"order {int(orders[-1])} there, so the weights are built for that pattern (an extension)"
        )
        report["note"] = note
        ctx.report("log", message=f"trust-region: {note}")
    if cfg.select:
        return _run_select(ctx, cfg, report)
    resolved = resolve(cfg, ctx.model, n)
    t0 = time.perf_counter()
    sol, bound = optimize_grid(ctx.model, ctx.solver, n, cfg, resolved, ctx.seed)
    report.update(resolved=resolved.to_dict(), latent=_is_latent(ctx.model), runs=_runs_report(sol))
    ctx.report(
        "log",
        message=(
            f"trust-region: p={resolved.p:g} tau={resolved.tau} init={resolved.init}: bound "
            f"{sol.initial:.6g} -> {sol.value:.6g} (best start {sol.start}, {time.perf_counter() - t0:.2f} s)"
        ),
    )
    return OptimizeResult(sigmas=_sigmas(ctx, sol.lam), objective=_objective(sol, bound, resolved), report=report)


def _runs_report(sol: Solution) -> list[dict[str, Any]]:
    return [
        {k: (round(v, 6) if isinstance(v, float) and k == "seconds" else v) for k, v in r.items()} for r in sol.runs
    ]


def _sigmas(ctx: OptimizeContext, lam: np.ndarray) -> list[float]:
    """exp(-lam) with the model's endpoints exact."""
    s = np.exp(-np.asarray(lam, dtype=np.float64))
    s[0], s[-1] = ctx.model.sigma_max, ctx.model.sigma_min
    return [float(v) for v in s]


def _run_select(ctx: OptimizeContext, cfg: TrustRegionConfig, report: dict[str, Any]) -> OptimizeResult:
    """Model-aware selection: optimize every (p, tau, init) candidate, keep the lowest teacher RMSE."""
    import torch

    from stepopt.sampling import cond_for_seeds
    from stepopt.solvers import solve
    from stepopt.teacher import teacher_outputs

    n = ctx.n_steps
    seeds = list(range(cfg.select_seed, cfg.select_seed + cfg.select_n))
    x_t, x_ref = teacher_outputs(ctx.model, seeds, device=ctx.device)
    cond = cond_for_seeds(ctx.model, seeds)
    if ctx.final_step == "denoise":
        # The solver's output is D(x_N) at sigma_min, so the target is the denoised teacher state.
        with torch.no_grad():
            x_ref = ctx.model(x_ref, ctx.model.sigma_min)
    ctx.report("log", message=f"trust-region select: teacher on {len(seeds)} noises (seeds {seeds[0]}..{seeds[-1]})")

    def rmse(sigmas: list[float]) -> float:
        grid = torch.tensor(sigmas, dtype=torch.float64, device=x_t.device)
        with torch.no_grad():
            x = solve(ctx.solver, ctx.model, x_t, grid, cond=cond, final_step=ctx.final_step)
        return float(((x.to(torch.float64) - x_ref.to(torch.float64)) ** 2).mean().sqrt())

    cands: list[dict[str, Any]] = []
    best: tuple[float, list[float], dict[str, Any]] | None = None
    base = start_grid("logsnr", ctx.model, n)
    sig = _sigmas(ctx, base)
    err = rmse(sig)
    cands.append({"candidate": "logsnr baseline", "p": None, "tau": None, "init": None, "bound": None, "rmse": err})
    best = (err, sig, cands[-1])
    ctx.report("log", message=f"  {'logsnr baseline':<34} rmse {err:.6g}")
    seen: set[tuple[float, int | str, str]] = set()
    for p in cfg.select_p:
        for tau in cfg.select_tau:
            for init in ("logsnr", "time-uniform"):
                resolved = Resolved(float(p), resolve_tau(tau, n), init)
                key = (resolved.p, resolved.tau_steps(n), init)
                if key in seen:  # e.g. tau "auto" = 3 at N = 5: the same problem
                    continue
                seen.add(key)
                sol, bound = optimize_grid(ctx.model, ctx.solver, n, cfg, resolved, ctx.seed)
                sig = _sigmas(ctx, sol.lam)
                err = rmse(sig)
                tau_label = f"{tau}({resolved.tau})" if tau in ("auto", "paper") else str(tau)
                name = f"p={float(p):g} tau={tau_label} init={init}"
                cands.append(
                    {
                        "candidate": name,
                        **resolved.to_dict(),
                        "bound": sol.value,
                        "rmse": err,
                        "objective": _objective(sol, bound, resolved),
                    }
                )
                ctx.report("log", message=f"  {name:<34} bound {sol.value:<12.6g} rmse {err:.6g}")
                if err < best[0] * (1 - 1e-9):  # ties (same grid from both inits) keep the first
                    best = (err, sig, cands[-1])
    err, sigmas, chosen = best
    ctx.report("log", message=f"trust-region select: chose {chosen['candidate']} (rmse {err:.6g})")
    report.update(
        select={
            "teacher_seeds": [seeds[0], seeds[-1]],
            "teacher": "exact ODE" if _is_analytic(ctx.model) else "many-step solver (stepopt.teacher.TeacherConfig)",
            "metric": "rmse vs teacher",
            "candidates": [{k: v for k, v in c.items() if k != "objective"} for c in cands],
            "chosen": chosen["candidate"],
        },
        resolved={"p": chosen["p"], "tau": chosen["tau"], "init": chosen["init"]},
        latent=_is_latent(ctx.model),
    )
    objective = dict(chosen.get("objective") or {"name": OBJECTIVE_NAME, "initial": None, "final": None})
    objective["select_rmse"] = err
    return OptimizeResult(sigmas=sigmas, objective=objective, report=report)


def _is_analytic(model: DiffusionModel) -> bool:
    from stepopt.models.base import AnalyticModel

    return isinstance(model, AnalyticModel)


SPEC = register(
    OptimizerSpec(
        name="trust-region",
        config_cls=TrustRegionConfig,
        run=run,
        summary="Xue et al. 2024: minimize the multistep solver's error bound (model-free, about a second)",
    )
)
