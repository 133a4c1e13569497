"""The trust-region error bound (Xue et al. 2024, Eq. 14), built from the solver's own weights.

A solver linear in its network evaluations moves ``x/sigma`` in step s by ``sum_e W[s, e] D_e``
(:mod:`stepopt.solvers.linear`: the exact coefficients, from the solver's own update functions).
The data-prediction error of evaluation e is modelled as ``eps(lam_e) = sigma_t^p / alpha_t`` (VP
notation, ``alpha_t = (1+e^{-2 lam})^{-1/2}``, ``sigma_t = (1+e^{2 lam})^{-1/2}``, lam_e the node
whose sigma the evaluation uses). With ``T[s, e] = eps_e W[s, e]`` and tau the truncation step:

    J = sum_{steps with one evaluation} |T[s, e]|
      + sum_{s < tau, more than one} sqrt(sum_e T[s, e]^2)
      + sum_e | sum_{s >= tau, more than one} T[s, e] |,

the paper's structure (a first-order step weighs one evaluation; the reference code's k-th order
steps weigh k). For DPM-Solver++ with the exact quadratic term its k = 1 and 3 weights are the
paper's Lagrange integrals; every other solver (the reference 3M, 2M, UniPC with its corrector,
iPNDM, Heun) gets its own exact weights (for Heun and iPNDM an extension: their steps also carry
earlier evaluations through earlier states).

From pure noise (``lam_0 = -inf``) the error model is the velocity network's ``t sigma_t^(p-1)``
and the weights are their limit (:func:`from_noise_weights`; the derivation is in the docstring of
:mod:`stepopt.optimizers.trust_region`).

Derivatives w.r.t. the grid: the weights by complex-step differentiation (one batched run of the
weight function on ``lam + i 1e-30 e_k`` for every interior node k: exact to rounding, since the
weights are analytic in lam), the error model in closed form (``d eps/d lam = -eps (p alpha_t^2 +
sigma_t^2)``), and J's own chain rule written out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepopt.solvers import SolverIdentity
from stepopt.solvers.linear import step_weights

# Complex-step size: far below rounding of lam, far above underflow.
_CSTEP = 1e-30

# (identity, batch of grids) -> (W, nodes), as ``stepopt.solvers.linear.step_weights``.
WeightFn = Callable[[SolverIdentity, np.ndarray], tuple[np.ndarray, np.ndarray]]


# Multistep exponential integrators (data prediction), for which ``weights: paper`` applies.
PAPER_WEIGHT_SOLVERS = ("euler", "dpmpp-2m", "dpmpp-3m", "unipc")


def lagrange_weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's weights for a multistep exponential integrator (``weights: paper``).

    Step s of order k (the solver's own order pattern: warm-up, lowered final orders) integrates
    ``e^lam`` times the Lagrange interpolant of D through the nodes s-k+1, ..., s exactly:
    ``W[s, j] = int_{lam_s}^{lam_{s+1}} e^lam l_j(lam) dlam`` (Xue et al. 2024, Sec. 3, for
    k = 1, 2, 3). With ``u = lam - lam_s`` and the nodes ``u_i = lam_{s-i} - lam_s``, the weights
    solve ``V^T w = e^{lam_s} M`` (V[i, m] = u_i^m, M_m = int_0^h e^u u^m du, ``M_0 = e^h - 1``,
    ``M_m = h^m e^h - m M_{m-1}``). Evaluation e is at node e, as for every multistep solver here.
    """
    from stepopt.solvers import get_solver
    from stepopt.solvers._common import step_order

    b, n = lam.shape[0], lam.shape[1] - 1
    spec = get_solver(identity.name)
    lof = identity.lower_order_final is not False if spec.has_lower_order_final else False
    w = np.zeros((b, n, n), dtype=lam.dtype)
    for s in range(n):
        k = step_order(s, n, identity.order or 1, lof)
        h = lam[:, s + 1] - lam[:, s]
        eh = np.exp(h)
        moments = [np.expm1(h)]
        for m in range(1, k):
            moments.append(h**m * eh - m * moments[-1])
        u = np.stack([lam[:, s - i] - lam[:, s] for i in range(k)], -1)  # (B, k)
        vt = np.stack([u**m for m in range(k)], -2)  # row m: u_i^m
        rhs = np.stack(moments, -1)[..., None]
        wk = np.linalg.solve(vt, rhs)[..., 0] * np.exp(lam[:, s])[:, None]
        for i in range(k):
            w[:, s, s - i] = wk[:, i]
    return w, np.arange(n)


# Solvers whose first step corrects (UniC-1 after UniP-1): ``corrector: first`` applies to them.
FIRST_STEP_CORRECTED = ("unipc",)


def solver_first_step(weight_fn: WeightFn) -> WeightFn:
    """``weight_fn`` with step 0 as the solver takes it (``corrector: first``; the exact weights of
    :mod:`stepopt.solvers.linear`).

    UniPC corrects its first step: UniP-1 (DDIM) predicts x~_1, the evaluation D_1 = D(x~_1) is made,
    and UniC-1 moves x_0 by ``W[0, 0] D_0 + W[0, 1] D_1`` (bh2: the trapezoid, each half of the
    first-order weight ``e^{lam_1} - e^{lam_0}``; bh1: ``B(h) = -h`` moves more onto D_1). The paper's
    bound, which models UniPC by its predictor, gives D_0 the whole first-order weight. D_0 is the
    evaluation at sigma_max, whose modelled error ``eps(lam_0)`` (about sigma_max: 80 on EDM's range)
    exceeds every other node's by an order of magnitude, so that one weight sets the first node
    (README, trust-region). Later steps keep ``weight_fn``'s (predictor) weights: there the corrector
    moves weight between evaluations of comparable error, and its interpolating weights lose the
    extrapolation growth with the step ratio that the paper's bound measures (``weights: solver``,
    measured worse). A one-step grid is the last step, which is not corrected.
    """

    def weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, nodes = weight_fn(identity, lam)
        if lam.shape[1] < 3:
            return w, nodes
        exact, _ = step_weights(identity, lam[:, :3])  # step 0 of any N >= 2 is step 0 of this 2-step grid
        w = np.array(w, dtype=np.result_type(w.dtype, exact.dtype))
        w[:, 0, :] = 0.0
        w[:, 0, :2] = exact[:, 0, :2]
        return w, nodes

    return weights


# The two error models: a network that predicts the noise (the paper's) or the flow velocity.
ERROR_MODELS = ("noise", "velocity")


def error_model(lam: np.ndarray, p: float, kind: str = "noise") -> tuple[np.ndarray, np.ndarray]:
    """The data-prediction error per node and its derivative in lam.

    ``noise`` (the paper's): ``eps = sigma_t^p / alpha_t`` (VP notation), ``d eps / d lam =
    -eps (p alpha_t^2 + sigma_t^2)``. ``velocity`` (models from pure noise, module docstring):
    ``eps = t sigma_t^(p-1)`` with the flow time ``t = 1 / (1 + e^lam)``, i.e. the paper's times
    ``1 - t``; ``d eps / d lam = eps (t - 1 - (p - 1) alpha_t^2)``; finite at ``lam = -inf`` (eps 1,
    derivative 0).
    """
    lam = np.asarray(lam, dtype=np.float64)
    alpha2 = 0.5 * (1.0 + np.tanh(lam))  # alpha_t^2 = 1 / (1 + e^{-2 lam})
    if kind == "velocity":
        # log sigma_t = -log(1 + e^{2 lam}) / 2, log t = -log(1 + e^lam) (stable forms, exact at -inf).
        eps = np.exp(-0.5 * (p - 1.0) * np.logaddexp(0.0, 2 * lam) - np.logaddexp(0.0, lam))
        t = 0.5 * (1.0 - np.tanh(0.5 * lam))  # 1 / (1 + e^lam)
        return eps, eps * (t - 1.0 - (p - 1.0) * alpha2)
    if kind != "noise":
        raise ValueError(f"error model must be one of {', '.join(ERROR_MODELS)}, got {kind!r}")
    # log alpha_t = -log(1 + e^{-2 lam}) / 2, log sigma_t = -log(1 + e^{2 lam}) / 2 (stable forms).
    log_eps = -0.5 * p * np.logaddexp(0.0, 2 * lam) + 0.5 * np.logaddexp(0.0, -2 * lam)
    eps = np.exp(log_eps)
    return eps, -eps * (p * alpha2 + (1.0 - alpha2))


# Solvers whose weights have the pure-noise limit below (one evaluation per node, state y only).
FROM_NOISE_SOLVERS = ("euler", "dpmpp-2m", "dpmpp-3m", "unipc")


def from_noise_weights(weight_fn: WeightFn, trapezoid: bool) -> WeightFn:
    """The limit ``lam_0 -> -inf`` of ``weight_fn`` for a grid that begins at ``lam_0 = -inf``.

    Step 0 (from pure noise, in the noise-scaled state ``y = x / sigma``, ``rho = e^lam``) moves y
    by ``rho_1 D_0`` (DDIM) or, for a solver whose first step corrects (``trapezoid``: unipc's exact
    weights), by ``rho_1 (D_0 + D_1) / 2``; steps 1.. are ``weight_fn`` on ``lam[1:]`` (N-1 steps, as
    if the solver started there), their evaluation e at node e + 1. That is the limit of every
    multistep exponential integrator's weights: a Lagrange basis polynomial through a node at
    ``-inf`` vanishes on finite lam and the others lose that factor, so D_0 enters no later step
    (README: Conventions; the solvers step the same way). Nothing touches ``lam_0``, so complex-step
    derivatives w.r.t. the finite nodes stay exact. Grids with a finite ``lam_0`` get ``weight_fn``
    itself.
    """

    def weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = np.isneginf(np.real(lam[:, 0]))
        if not start.any():
            return weight_fn(identity, lam)  # a finite start: the weights themselves
        if not start.all():
            raise ValueError("a batch of grids must all begin at lam = -inf or all be finite")
        b, n = lam.shape[0], lam.shape[1] - 1
        rho1 = np.exp(lam[:, 1])
        if n == 1:
            w = rho1.reshape(b, 1, 1).astype(lam.dtype)
            return w, np.array([0])
        sub, sub_nodes = weight_fn(identity, lam[:, 1:])
        m = 1 + sub.shape[2]
        w = np.zeros((b, n, m), dtype=np.result_type(lam.dtype, sub.dtype))
        if trapezoid:
            w[:, 0, 0] = w[:, 0, 1] = 0.5 * rho1
        else:
            w[:, 0, 0] = rho1
        w[:, 1:, 1:] = sub
        return w, np.concatenate(([0], np.asarray(sub_nodes) + 1))

    return weights


@dataclass(frozen=True)
class FinalDenoise:
    """The bound's extension to ``final_step: denoise`` (an extension of the paper; derivation in the
    module docstring of :mod:`stepopt.optimizers.trust_region`). The output is ``D(x_N, sigma_N)`` and
    lam_N is free, so the error that step s leaves in the state (``sigma_{s+1} T[s, e]`` in ``x``) is
    carried to the output as it is for data of variance ``sigma_data^2``: through the ODE to sigma_N by
    ``sqrt((sigma_data^2 + sigma_N^2) / (sigma_data^2 + sigma_{s+1}^2))``, then through D by its Jacobian
    ``a(sigma_N) = sigma_data^2 / (sigma_data^2 + sigma_N^2)``; the final jump adds its own term
    ``eps(lam_N)`` (weight 1). In all, step s's terms are scaled by

        F_s = sigma_{s+1} / sqrt((1 + sigma_{s+1}^2 / sigma_data^2) (1 + sigma_N^2 / sigma_data^2))

    and ``J_den = J(F T) + eps(lam_N)`` (``sigma_data = inf``: ``F_s = sigma_{s+1}``, errors in x kept).
    """

    sigma_data: float = 1.0
    carry: str = "linear"
    lam_end: float = math.inf

    def jump(self, lam_n: float, eps: float, deps: float) -> tuple[float, float]:
        """The final jump's term and its derivative in lam_N."""
        if self.carry == "linear":
            # A first-order step from lam_N to lam_end in x / sigma: weight e^{lam_end} - e^{lam_N}.
            w = math.exp(self.lam_end) - math.exp(lam_n)
            return w * eps, -math.exp(lam_n) * eps + w * deps
        return eps, deps

    def factors(self, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``F`` (N,) and ``d log F_s / d lam_k`` (N, N+1) on the full grid ``lam`` (N+1 values)."""
        n = len(lam) - 1
        if self.carry == "linear":
            return np.ones(n), np.zeros((n, n + 1))
        sig = np.exp(-np.asarray(lam[1:], dtype=np.float64))  # sigma_1..sigma_N
        a = 1.0 / (1.0 + (sig / self.sigma_data) ** 2)  # a(sigma) = sd^2 / (sd^2 + sigma^2)
        f = sig * np.sqrt(a * a[-1])
        dlog = np.zeros((n, n + 1))
        # d log(sigma sqrt(a(sigma))) / d lam = -a(sigma); d log sqrt(a(sigma_N)) / d lam_N = 1 - a_N.
        dlog[np.arange(n), np.arange(1, n + 1)] = -a
        dlog[:, n] += 1.0 - a[-1]
        return f, dlog

    def describe(self) -> dict[str, Any]:
        return {
            "extension": "J(F T) + eps(lam_N), F_s: the carry for data of variance sigma_data^2",
            "sigma_data": self.sigma_data,
        }


class ErrorBound:
    """J on a grid of N steps between fixed endpoints ``lam_start < lam_end``, for one solver identity.

    ``value(x)`` / ``value_and_grad(x, mu)`` take the N-1 interior lam's; ``mu > 0`` replaces each
    tail ``|c|`` by ``sqrt(c^2 + mu^2) - mu`` (smooth, within ``mu`` per evaluation of the exact
    value). At ``mu = 0`` a kink ``c = 0`` gets the subgradient 0.
    """

    def __init__(
        self,
        identity: SolverIdentity,
        n_steps: int,
        lam_start: float,
        lam_end: float,
        p: float,
        tau: int,
        weight_fn: WeightFn | None = None,
        error: str = "noise",
        noise_scale: float = 1.0,
        lam_floor: float = -math.inf,
        final_denoise: FinalDenoise | None = None,
    ) -> None:
        self.identity = identity
        # ``final_step: denoise``: the last node lam_N is free (at most lam_end) and J is the denoise
        # extension (:class:`FinalDenoise`); otherwise lam_N = lam_end and J is the paper's.
        self.final_denoise = final_denoise
        self._weight_fn: WeightFn = weight_fn or step_weights
        self.lam_start, self.lam_end = float(lam_start), float(lam_end)
        self.p, self.tau = float(p), int(tau)
        self.error = error
        # The error model is evaluated at sigma / noise_scale (lam + log noise_scale): a flow model's shift.
        self.noise_scale = float(noise_scale)
        self.lam_offset = math.log(self.noise_scale)
        # From pure noise: the lowest lam_1 the search may take (the model's largest finite level).
        self.lam_floor = float(lam_floor)
        # Which evaluations each step uses: read off the weights on a uniform grid (from pure noise, a
        # finite one with unit gaps: the bound's structure is the paper's for N steps, and its value
        # from lam_0 = -inf is the limit of the finite-lam_0 bound).
        if self.from_noise:
            probe = self.lam_end - np.arange(n_steps + 1)[::-1].astype(np.float64)
        else:
            probe = np.linspace(self.lam_start, self.lam_end, n_steps + 1)
        w, nodes = self._weight_fn(identity, probe[None])
        used = w[0] != 0
        s = np.arange(n_steps)
        self.used = used
        self.nodes = np.asarray(nodes)
        self.single = used.sum(axis=1) == 1
        self.rss = ~self.single & (s < self.tau)
        self.tail = ~self.single & (s >= self.tau)
        # Complex-step directions: row k perturbs variable node k + 1 (interior, and lam_N when free).
        self._dirs = np.eye(n_steps + 1)[1 : n_steps + 1 if self.free_end else -1] * (1j * _CSTEP)

    @property
    def n_steps(self) -> int:
        return len(self.single)

    @property
    def from_noise(self) -> bool:
        """The grid begins at pure noise, ``lam_0 = -inf``."""
        return self.lam_start == -math.inf

    @property
    def smooth(self) -> bool:
        """True when no evaluation is weighed by two tail steps (no cancellation, no kinks)."""
        return bool((self.used & self.tail[:, None]).sum(axis=0).max(initial=0) <= 1)

    @property
    def free_end(self) -> bool:
        """The last node lam_N is a variable (a final denoise follows it), bounded above by lam_end."""
        return self.final_denoise is not None

    def full(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        """The N+1 lam's of the variables ``x`` (interior lam's, then lam_N when it is free)."""
        tail = [] if self.free_end else [self.lam_end]
        return np.concatenate(([self.lam_start], np.asarray(x, dtype=np.float64), tail))

    def variables(self, lam: np.ndarray) -> np.ndarray:
        """The variables of the full grid ``lam``: the inverse of :meth:`full`."""
        lam = np.asarray(lam, dtype=np.float64)
        return lam[1:].copy() if self.free_end else lam[1:-1].copy()

    def weights(self, lam: np.ndarray) -> np.ndarray:
        """W (N, M) of the solver on the full grid ``lam``."""
        return self._weight_fn(self.identity, np.asarray(lam, dtype=np.float64)[None])[0][0]

    def terms(self, lam: np.ndarray) -> np.ndarray:
        """T[s, e] = eps(lam of evaluation e) W[s, e]."""
        eps, _ = error_model(lam + self.lam_offset, self.p, self.error)
        t = self.weights(lam) * eps[self.nodes]
        if self.final_denoise is not None:
            t = t * self.final_denoise.factors(lam)[0][:, None]
        return t

    def tail_sums(self, lam: np.ndarray) -> np.ndarray:
        """The per-evaluation sums c_e of the tail steps at the evaluations some tail step uses."""
        t = self.terms(np.asarray(lam, dtype=np.float64))
        cols = (self.used & self.tail[:, None]).any(axis=0)
        return (t * self.tail[:, None]).sum(axis=0)[cols]

    def value(self, x: Sequence[float] | np.ndarray, mu: float = 0.0) -> float:
        """J at interior lam's ``x`` (inf if they are not strictly increasing)."""
        lam = self.full(x)
        if np.any(np.diff(lam) <= 0) or lam[-1] > self.lam_end:
            return math.inf
        return self.evaluate(lam, mu, False)[0]

    def value_and_grad(self, x: Sequence[float] | np.ndarray, mu: float = 0.0) -> tuple[float, np.ndarray]:
        """J and dJ/dx."""
        val, grad = self.evaluate(self.full(x), mu, True)
        assert grad is not None
        return val, grad

    def gradient(self, x: Sequence[float] | np.ndarray, mu: float = 0.0) -> np.ndarray:
        return self.value_and_grad(x, mu)[1]

    def evaluate(self, lam: np.ndarray, mu: float, with_grad: bool) -> tuple[float, np.ndarray | None]:
        """J (and dJ/d variables) on the full grid ``lam``: the one evaluator of the bound."""
        n = self.n_steps
        if with_grad and len(self._dirs):
            wc = self._weight_fn(self.identity, lam[None] + self._dirs)[0]
            w, dw = wc[0].real, wc.imag / _CSTEP  # dw[k]: dW / d lam_{k+1}
        else:
            w, dw = self.weights(lam), None
        eps_n, deps_n = error_model(lam + self.lam_offset, self.p, self.error)
        eps = eps_n[self.nodes]
        fd = self.final_denoise
        # Per-step factors: 1 (the paper's), or the final denoise's carry F_s.
        f, dlogf = fd.factors(lam) if fd is not None else (np.ones(n), None)
        t = w * eps * f[:, None]
        # One-evaluation steps: |T|; steps s < tau: root of the sum of squares; the others: per-evaluation sums.
        j_single = float(np.abs(t[self.single]).sum())
        norms = np.sqrt((t * t).sum(axis=1))
        j_rss = float(norms[self.rss].sum())
        c = (t * self.tail[:, None]).sum(axis=0)
        if mu > 0:
            root = np.sqrt(c * c + mu * mu)
            absc, dc = root - mu, c / root
        else:
            absc, dc = np.abs(c), np.sign(c)
        val = j_single + j_rss + float(absc.sum())
        if fd is not None:  # the final jump's own term
            jv, jd = fd.jump(float(lam[-1]), float(eps_n[-1]), float(deps_n[-1]))
            val += jv
        if not with_grad:
            return val, None
        if dw is None:
            return val, np.zeros(0)
        # g = dJ/dT, then dT[s, e]/dlam_k = F_s (eps_e dW[k, s, e] + [node(e) == k] eps'_e W[s, e])
        # + T[s, e] d log F_s / d lam_k.
        g = np.zeros_like(t)
        g[self.single] = np.sign(t[self.single])
        g[self.rss] = t[self.rss] / np.where(norms[self.rss] > 0, norms[self.rss], 1.0)[:, None]
        g[self.tail] = dc
        gf = g * f[:, None]
        grad = np.einsum("kse,se->k", dw, gf * eps)
        node_grad = np.bincount(self.nodes, weights=(gf * w).sum(axis=0) * deps_n[self.nodes], minlength=n + 1)
        if dlogf is not None:
            node_grad += (g * t).sum(axis=1) @ dlogf
            node_grad[-1] += jd
        return val, grad + node_grad[1 : n + 1 if self.free_end else -1]

    def describe(self) -> dict[str, Any]:
        """The step structure the bound uses (for the run's report)."""
        out: dict[str, Any] = {
            "evaluations_per_step": [int(k) for k in self.used.sum(axis=1)],
            "tau": self.tau,
            "error_model": self.error,
            "noise_scale": self.noise_scale,
        }
        if self.final_denoise is not None:
            out["final_denoise"] = self.final_denoise.describe()
        return out
