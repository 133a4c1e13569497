"""GITS's cost with a multistep solver's history: local errors of teacher-forced steps, and their exact DP.

GITS (Chen et al., ICML 2024) scores a jump c_j -> c_t by the local error of one solver step from
the teacher state X_j. A multistep solver's step j -> t also uses the data predictions at the path's
previous nodes (2M: i, j; 3M and UniPC-3: h, i, j), so that local cost cannot see the higher-order
steps the solver actually takes. Here each step of the N-step path is the solver's real step s with
its real order (``step_order(s, N, ...)``: warm-up, ``lower_order_final``, UniPC's uncorrected last
step), *teacher-forced*: from the teacher state at its start node, with every data prediction the
denoiser's output at the teacher state of its node (cached: one evaluation per candidate and
trajectory, as the local cost). For these exponential integrators a step is

    x_t = (sigma_t / sigma_j) x_j + sigma_t sum_e W[s, e] D_e,

with W the solver's own linear weights (:mod:`stepopt.solvers.linear`, the solver's update function run
on coefficient vectors), so the local error of the window (nodes n_0 < ... < n_{k-1} = j, target t)
of a step of order k is, per trajectory p,

    l_p = (sigma_t / sigma_j) X_j - X_t + sigma_t sum_e W_e D(X_{n_e})   (UniPC's corrector: also D(X_t)),

and the cost is ``mean_p ||l_p||_2`` (GITS's norm). The norms come from Gram matrices (per trajectory:
``u = (sigma_t/sigma_j) X_j - X_t`` against every D, and the D's among themselves), so a window costs
O(k^2) per trajectory whatever the data size. A path's objective is the sum of its steps' costs; it
equals the sum of the local errors of the real solver run along the path with a denoiser that
returns the cached D at each node (``tests/test_dp_optimizers.py`` checks this, and the DP against
exhaustive search).

The DP is exact: its state after step s is the last q nodes of the path (q = the solver's largest
order, 3 for 3M), ``V_{s+1}(b, c, t) = min_a V_s(a, b, c) + C_{kind(s)}(a, b, c, t)``, O(N M^(q+1))
time after the cost tables (order k: all (k+1)-node windows, M^(k+1) / (k+1)! of them, stored dense:
(M+1)^(k+1) floats; 3M at M = 64: 143 MB). Grids from pure noise (sigma_max = inf) are not supported.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stepopt.errors import StepoptError
from stepopt.solvers import SolverIdentity
from stepopt.solvers._common import denoise, step_order
from stepopt.solvers.linear import step_weights

# Exponential integrators whose step s is x_{s+1}/sigma_{s+1} = x_s/sigma_s + sum_e W[s, e] D_e with
# D's at nodes s-k+1..s (+ s+1 for UniPC's corrector): the history cost is defined for these.
HISTORY_SOLVERS = frozenset({"euler", "dpmpp-2m", "dpmpp-3m", "unipc"})
# Dense cost tables above this size are refused (use fewer candidates or cost=local).
MAX_TABLE_BYTES = 1 << 30

Kind = tuple[int, bool]  # (order k, the step uses the evaluation at its target: UniPC's corrector)


def supports_history(identity: SolverIdentity) -> bool:
    return identity.name in HISTORY_SOLVERS


def _lof(identity: SolverIdentity) -> bool:
    return identity.lower_order_final is not False


def _uses_target(identity: SolverIdentity) -> bool:
    """Whether a (not last) step weighs the evaluation at its own target node (a corrector), read off the weights."""
    w, _ = step_weights(identity, np.array([[0.0, 1.0, 2.0, 3.0]]))
    return bool(w[0, 0, 1] != 0)


def step_kinds(identity: SolverIdentity, n_steps: int) -> list[Kind]:
    """The kind (order, corrected) of each step s of an N-step run, as the solver takes it."""
    corr = _uses_target(identity)
    return [(step_order(s, n_steps, identity.order, _lof(identity)), corr and s < n_steps - 1) for s in range(n_steps)]


def _template(identity: SolverIdentity, kind: Kind) -> int:
    """An N' whose step k-1 has ``kind``: the window's k+1 nodes are grid points 0..k of an N'-step grid."""
    k, corrected = kind
    uses = _uses_target(identity)
    for n in range(k, 2 * k + 3):
        if step_order(k - 1, n, identity.order, _lof(identity)) == k and (not uses or (k - 1 < n - 1) == corrected):
            return n
    raise StepoptError(f"solver {identity} has no step of order {k} (corrected: {corrected})")  # pragma: no cover


def window_weights(identity: SolverIdentity, kind: Kind, sig: np.ndarray) -> np.ndarray:
    """``sigma_t W_e`` (B, k+1): the D weights of a step of ``kind`` on windows ``sig`` (B, k+1) of sigmas.

    Column e is the weight of D at window node e (the last column, the target's, is nonzero only for a
    corrector). Computed by the solver's own weights on a grid whose step k-1 is of this kind.
    """
    k = kind[0]
    n = _template(identity, kind)
    lam = -np.log(sig)
    fill = lam[:, -1:] + np.arange(1, n - k + 1)[None, :]  # later grid points: never used by step k-1
    w, nodes = step_weights(identity, np.concatenate([lam, fill], axis=1))
    if not np.array_equal(nodes, np.arange(len(nodes))):  # pragma: no cover - every supported solver
        raise StepoptError(f"solver {identity}: evaluations are not one per grid node")
    out = w[:, k - 1, : k + 1] if w.shape[2] > k else np.concatenate([w[:, k - 1, :k], np.zeros((len(sig), 1))], 1)
    return out * sig[:, -1:]


def teacher_denoised(
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    cand: np.ndarray,
    cond: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """``D(X_m, c_m)`` for m = 0..M-1 (the endpoint's is never used): shape (P, M, *shape)."""
    with torch.no_grad():
        return torch.stack(
            [
                denoise(
                    denoiser, traj[:, m], torch.tensor(float(cand[m]), dtype=torch.float64, device=traj.device), cond
                )
                for m in range(len(cand) - 1)
            ],
            dim=1,
        )


@dataclass
class HistoryCosts:
    """Cost tables of a teacher-forced N-step run: ``tables[kind]`` has k+1 axes (window nodes, target
    last), ``inf`` outside strictly increasing windows; ``kinds[s]`` is step s's kind."""

    kinds: list[Kind]
    tables: dict[Kind, np.ndarray]

    def step_cost(self, s: int, path: Sequence[int]) -> float:
        k = self.kinds[s][0]
        return float(self.tables[self.kinds[s]][tuple(path[s + 1 - k : s + 2])])

    def order_counts(self) -> dict[str, int]:
        """How many steps of each order (the report's record of the pattern the cost followed)."""
        out: dict[str, int] = {}
        for k, corrected in self.kinds:
            key = f"order {k}" + (" corrected" if corrected else "")
            out[key] = out.get(key, 0) + 1
        return out


def history_costs(
    identity: SolverIdentity,
    traj: torch.Tensor,
    den: torch.Tensor,
    cand: np.ndarray,
    n_steps: int,
    batch: int = 8192,
    jacobians: Callable[[int], torch.Tensor] | None = None,
) -> HistoryCosts:
    """The cost tables of every step kind of an N-step run (module docstring), from the trajectories
    ``traj`` (P, M+1, ...) and the cached ``den`` = D(X_m, c_m) (P, M, ...).

    ``jacobians(t)`` (``propagate: linear``, :class:`stepopt.optimizers.dp_propagate.FlowJacobians`): the
    flow's Jacobian ``J_{t->M}`` (P, d, d) at X_t, called for t = M, ..., 1; each local error is then
    scored as ``||J_{t->M} l||``, its first-order contribution to the output (every vector of the Gram
    products mapped by J first)."""
    if not supports_history(identity):
        raise StepoptError(
            f"cost=history is defined for {', '.join(sorted(HISTORY_SOLVERS))}, not '{identity.name}'; use cost=local"
        )
    if not np.all(np.isfinite(cand)):
        raise StepoptError("cost=history does not support a candidate grid from sigma = inf; use cost=local")
    m = len(cand) - 1
    kinds = step_kinds(identity, n_steps)
    for kind in set(kinds):
        size = 8 * (m + 1) ** (kind[0] + 1)
        if size > MAX_TABLE_BYTES:
            raise StepoptError(
                f"cost=history with order-{kind[0]} steps on {m} candidates needs a {size / 2**30:.1f} GiB table; "
                "use fewer candidates or cost=local"
            )
    p = traj.shape[0]
    x = traj.reshape(p, m + 1, -1).to(torch.float64)
    d = den.reshape(p, m, -1).to(torch.float64)
    # Products are laid out (pair, trajectory): a window batch gathers whole contiguous rows.
    gram_d = torch.bmm(d, d.transpose(1, 2)).reshape(p, -1).T.contiguous()  # <D_a, D_b>: (M*M, P)
    sig = np.asarray(cand, dtype=np.float64)
    tables = {kind: np.full((m + 1,) * (kind[0] + 1), np.inf) for kind in sorted(set(kinds))}
    with torch.no_grad():
        for t in range(m, 0, -1):  # descending: the flow Jacobians chain from the end
            # u_j = (sigma_t / sigma_j) X_j - X_t for every j < t, its norms and products with every D.
            ratio = torch.as_tensor(sig[t] / sig[:t], dtype=torch.float64)
            u = ratio[None, :, None] * x[:, :t] - x[:, t : t + 1]
            dt = d
            if jacobians is not None:
                jac = jacobians(t)
                u = torch.einsum("pab,pjb->pja", jac, u)
                dt = torch.einsum("pab,pjb->pja", jac, d)
                gram_d = torch.bmm(dt, dt.transpose(1, 2)).reshape(p, -1).T.contiguous()
            uu = (u * u).sum(-1).T.contiguous()  # (t, P)
            ud = torch.bmm(u, dt.transpose(1, 2)).reshape(p, -1).T.contiguous()  # (t*M, P)
            for kind, table in tables.items():
                k, corrected = kind
                if t < k or (corrected and t == m):
                    continue  # a corrected step is never the last: its target is an inner node
                cols = k + 1 if corrected else k  # D nodes: the window's, and the target's for a corrector
                wins = np.array([(*c, t) for c in itertools.combinations(range(t), k)], dtype=np.int64)
                for lo in range(0, len(wins), batch):
                    win = wins[lo : lo + batch]
                    w = torch.as_tensor(window_weights(identity, kind, sig[win]))
                    j = torch.as_tensor(win[:, k - 1])
                    nodes = torch.as_tensor(win[:, :cols])
                    q = uu[j]  # (B, P)
                    for e in range(cols):
                        q += (2 * w[:, e, None]) * ud[j * m + nodes[:, e]]
                        for f in range(e, cols):
                            c = (1 if e == f else 2) * w[:, e] * w[:, f]
                            q += c[:, None] * gram_d[nodes[:, e] * m + nodes[:, f]]
                    table[tuple(win.T)] = torch.sqrt(q.clamp_min_(0)).mean(1).numpy()
    return HistoryCosts(kinds, tables)


def history_objective(costs: HistoryCosts, path: Sequence[int], coeff: float = 1.0) -> float:
    """``sum_s coeff^s l_s``: the path's teacher-forced local errors, step s weighted coeff^s (GITS's ``coeff``)."""
    return float(sum(coeff**s * costs.step_cost(s, path) for s in range(len(path) - 1)))


def history_dp(costs: HistoryCosts, m: int, coeff: float = 1.0) -> tuple[list[int], float]:
    """The N-step path 0 = p_0 < ... < p_N = M minimising :func:`history_objective`; exact.

    State after step s: the last q nodes (q = the largest order; the missing ones before p_0 are
    node 0, which no window of the warm-up reaches); ``V_{s+1}(b.., t) = min_a V_s(a, b..) + C(window, t)``.
    """
    n = len(costs.kinds)
    if not 1 <= n <= m:
        raise StepoptError(f"cannot choose {n} steps among {m} candidate intervals")
    q = max(k for k, _ in costs.kinds)
    v = np.full((m + 1,) * q, np.inf)
    v[(0,) * q] = 0.0
    back: list[np.ndarray] = []
    for s, kind in enumerate(costs.kinds):
        k = kind[0]
        c = costs.tables[kind].reshape((1,) * (q - k) + costs.tables[kind].shape)  # axes (a, b.., t)
        weight = coeff**s
        last = s == n - 1
        new = np.full((m + 1,) * q, np.inf)
        arg = np.zeros((m + 1,) * q, dtype=np.int64)
        for t in [m] if last else range(1, m):
            total = v + weight * c[..., t]  # (a, b..): broadcast over the nodes older than the window
            a = np.argmin(total, axis=0)
            new[..., t] = np.take_along_axis(total, a[None], axis=0)[0]
            arg[..., t] = a
        back.append(arg)
        v = new
    if not np.isfinite(v[..., m]).any():
        raise StepoptError("no finite path through the candidate grid (non-finite costs)")
    state = [int(i) for i in np.unravel_index(int(np.argmin(v)), v.shape)]
    value = float(v[tuple(state)])
    full = list(state)  # p_{N+1-q} .. p_N; each step back adds the node its state dropped
    for arg in reversed(back):
        a = int(arg[tuple(state)])
        state = [a, *state[:-1]]
        full.insert(0, a)
    path = full[q - 1 :]  # the entries before p_0 are the padding node 0
    path = [int(p) for p in path]
    if len(path) != n + 1 or path[0] != 0 or path[-1] != m or not all(a < b for a, b in itertools.pairwise(path)):
        raise StepoptError(f"history DP: inconsistent path {path}")  # pragma: no cover
    return path, value
