"""GITS's local errors carried to the output by the teacher flow (an extension: ``--set propagate=...``).

GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024, arXiv
2405.11326) scores a jump c_i -> c_j by its local error ``e_ij = Phi(X_i; c_i -> c_j) - X_j`` at c_j and
adds the errors of the path's steps. An error made at c_j is not what reaches the output: the rest of
the sampling carries it through the flow from c_j to c_M, which contracts some directions (the
mixture's low-variance ones at high noise) and leaves the last steps' errors almost undamped. With
``Psi_{j->M}`` the teacher's map from c_j to c_M (the exact ODE on analytic models), the output error
of a student path ``p_0 .. p_N`` with states ``x_s`` splits exactly into propagated local errors (the
"Lady Windermere's fan" of ODE numerics):

    x_N - Psi_{0->M}(x_0) = sum_s [ Psi_{p_{s+1}->M}(x_{s+1}) - Psi_{p_s->M}(x_s) ]
                          = sum_s [ Psi_{p_{s+1}->M}(Phi(x_s)) - Psi_{p_{s+1}->M}(Psi_{p_s->p_{s+1}}(x_s)) ],

so its norm is at most the sum of the terms' norms. Evaluated at the teacher's states (GITS's
teacher forcing: ``x_s = X_{p_s}``), the term of a jump i -> j is ``Psi_{j->M}(X_j + e_ij) - X_M``, and the
cost is its mean norm over the trajectories:

* ``propagate: exact`` -- ``C[i, j] = mean_p || Psi_{j->M}(Phi(X_i; c_i -> c_j)) - X_M ||``: every jump's end
  state re-solved to c_M by the teacher, all i < j of one j in one batch (analytic models: the exact
  ODE, DOP853 at the model's tolerance, 1e-12 on the mixture; networks: the teacher solver over the
  candidate intervals j..M). Work: sum_j j (M - j) P = P M^3 / 6 teacher interval solves (networks:
  times the teacher's NFE per interval, counted), against P M for the trajectories themselves: on
  gmm-digits with P = 256 and M = 64 an hour or more on one core (estimated from P = 16, M = 16: 3.5 s),
  so it serves as the reference the linear form is checked against.
* ``propagate: linear`` -- ``C[i, j] = mean_p || J_{j->M}(X_j) e_ij ||`` with ``J_{j->M}`` the Jacobian of the
  teacher flow from c_j to c_M at the teacher state (first order in e_ij). ``J_{j->M} = J_{j+1->M}
  J_{j->j+1}``: each interval's Jacobian is the variational equation ``dJ/ds = (I - dD/dx) J`` (s = log
  sigma, ``dx/ds = x - D``) integrated by RK4 with ``propagate_substeps`` steps from X_j, and the chain
  runs from j = M - 1 down. ``dD/dx``: the model's ``denoise_jacobian`` where it has one (the Gaussian
  mixture: its posterior covariance / sigma^2, closed form), else d forward-mode JVPs of the denoiser (a
  network: d network-JVP rows per sample and RK4 stage, counted). Work: 4 S M Jacobian evaluations
  and M d^3 products per trajectory, then M^2 / 2 products of a d x d matrix with the local errors.

The cost matrix replaces GITS's, and :func:`stepopt.optimizers.dp.gits_dp` is unchanged (exact). The
jump is still the solver started afresh (a multistep solver's first-order step): the propagation
weighs where an error is made, not which order the solver takes there. Neither form is defined with a
final denoise from a free last node (the output is then not the state at c_M); such runs are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch

from stepopt.baselines import baseline_sigmas
from stepopt.errors import StepoptError
from stepopt.models.base import AnalyticModel, DiffusionModel
from stepopt.solvers import solve
from stepopt.teacher import TeacherConfig

Propagate = Literal["none", "linear", "exact"]
PROPAGATE_MODES = ("none", "linear", "exact")
# d x d Jacobians per trajectory: refused above this data dimension (use propagate=exact or none).
MAX_LINEAR_DIM = 1024


class _Counting:
    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model = model
        self.evals = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.evals += int(x.shape[0])
        return self.model(x, sigma, **cond)


def denoiser_jacobian(model: DiffusionModel, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, int]:
    """``dD/dx`` (B, d, d) at ``x`` (B, *shape) and one finite sigma, and the network-JVP rows it cost.

    The model's closed form (``denoise_jacobian``) where it has one, else one forward-mode JVP per
    input direction, batched (B d rows).
    """
    closed = model.denoise_jacobian(x, sigma)
    if closed is not None:
        return closed, 0
    b, d = x.shape[0], math.prod(x.shape[1:])
    rep = x.reshape(b, 1, d).expand(b, d, d).reshape(b * d, *x.shape[1:])
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand(b, d, d).reshape(b * d, *x.shape[1:])
    sig = torch.full((b * d,), sigma, dtype=torch.float64, device=x.device)
    tangent = torch.func.jvp(lambda z: model(z, sig), (rep,), (eye,))[1]
    # Row (p, k) of the output tangent is column k of sample p's Jacobian.
    return tangent.reshape(b, d, d).transpose(1, 2).to(torch.float64), b * d


def interval_jacobian(
    model: DiffusionModel, x: torch.Tensor, sigma_from: float, sigma_to: float, substeps: int
) -> tuple[torch.Tensor, int]:
    """``d x(sigma_to) / d x(sigma_from)`` of the probability-flow ODE at ``x`` (B, *shape): (B, d, d).

    RK4 in s = log sigma on the state and the variational equation ``dJ/ds = (I - dD/dx) J`` together,
    ``substeps`` uniform steps. Returns the Jacobian and the network-JVP rows spent.
    """
    b, d = x.shape[0], math.prod(x.shape[1:])
    shape = x.shape
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    s0, s1 = math.log(sigma_from), math.log(sigma_to)
    h = (s1 - s0) / substeps
    y = x.reshape(b, d).to(torch.float64)
    jac = eye.expand(b, d, d).clone()
    rows = 0

    def rhs(s: float, yv: torch.Tensor, jv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal rows
        sig = math.exp(s)
        xs = yv.reshape(shape).to(x.dtype)
        den = model(xs, torch.full((b,), sig, dtype=torch.float64, device=x.device)).reshape(b, d).to(torch.float64)
        a, r = denoiser_jacobian(model, xs, sig)
        rows += r
        return yv - den, jv - a @ jv

    with torch.no_grad():
        for k in range(substeps):
            s = s0 + k * h
            k1 = rhs(s, y, jac)
            k2 = rhs(s + h / 2, y + h / 2 * k1[0], jac + h / 2 * k1[1])
            k3 = rhs(s + h / 2, y + h / 2 * k2[0], jac + h / 2 * k2[1])
            k4 = rhs(s + h, y + h * k3[0], jac + h * k3[1])
            y = y + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            jac = jac + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return jac, rows


def flow_to_end(
    model: DiffusionModel,
    x: torch.Tensor,
    cand: np.ndarray,
    j: int,
    teacher: TeacherConfig,
    cond: Mapping[str, Any] | None = None,
    counter: _Counting | None = None,
) -> torch.Tensor:
    """The teacher's state at c_M from ``x`` at c_j: the exact ODE (analytic models: their ``ode_solution``)
    or ``teacher.steps`` steps of the teacher solver on each candidate interval j..M (networks)."""
    m = len(cand) - 1
    if j == m:
        return x
    if isinstance(model, AnalyticModel):
        return model.ode_solution(x, float(cand[j]), float(cand[m]))
    ident = teacher.identity()
    net = counter if counter is not None else model
    out = x
    with torch.no_grad():
        for a, b in zip(cand[j:-1], cand[j + 1 :], strict=True):
            sub = baseline_sigmas(teacher.grid, teacher.steps, float(a), float(b), model.frame, rho=teacher.rho)
            out = solve(ident, net, out, torch.as_tensor(sub).to(x.device), cond=cond)
    return out


class FlowJacobians:
    """``J_{t->M}`` (P, d, d) at the teacher states X_t, for t = M, M-1, ..., 1 in that order (the chain
    ``J_{t->M} = J_{t+1->M} J_{t->t+1}``, each interval by :func:`interval_jacobian`)."""

    def __init__(self, model: DiffusionModel, traj: torch.Tensor, cand: np.ndarray, substeps: int = 4) -> None:
        self.model, self.traj, self.cand, self.substeps = model, traj, cand, substeps
        self.p = traj.shape[0]
        self.d = math.prod(traj.shape[2:])
        if self.d > MAX_LINEAR_DIM:
            raise StepoptError(
                f"propagate=linear keeps a {self.d}x{self.d} Jacobian per trajectory (at most "
                f"{MAX_LINEAR_DIM}); use propagate=exact or propagate=none"
            )
        self.jvp_rows = 0
        self._jac: torch.Tensor | None = None
        self._next = len(cand) - 1

    def __call__(self, t: int) -> torch.Tensor:
        if t != self._next:
            raise RuntimeError(f"FlowJacobians: expected t = {self._next}, got {t}")  # pragma: no cover
        self._next = t - 1
        if self._jac is None:
            self._jac = torch.eye(self.d, dtype=torch.float64).expand(self.p, self.d, self.d)
        else:
            step, rows = interval_jacobian(
                self.model, self.traj[:, t], float(self.cand[t]), float(self.cand[t + 1]), self.substeps
            )
            self.jvp_rows += rows
            self._jac = self._jac @ step
        return self._jac


class Propagator:
    """Scores GITS's jumps into c_j by their propagated output error; called for j = M, M-1, ..., 1.

    ``__call__(j, jumps)`` with ``jumps`` (j, P, d): the end states of the jumps from every i < j returns
    the j costs ``C[0..j-1, j]``. ``evals`` counts the network evaluations (or JVP rows) it spent.
    """

    def __init__(
        self,
        mode: str,
        model: DiffusionModel,
        traj: torch.Tensor,
        cand: np.ndarray,
        *,
        teacher: TeacherConfig,
        substeps: int = 4,
        cond: Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in ("linear", "exact"):
            raise StepoptError(f"propagate must be one of {', '.join(PROPAGATE_MODES)}, got {mode!r}")
        if not math.isfinite(float(cand[1])):
            raise StepoptError("propagate: candidate c_1 is not finite")  # pragma: no cover
        self.mode, self.model, self.traj, self.cand = mode, model, traj, cand
        self.teacher, self.substeps, self.cond = teacher, substeps, cond
        self.p = traj.shape[0]
        self.d = math.prod(traj.shape[2:])
        self.flat = traj.reshape(self.p, traj.shape[1], self.d).to(torch.float64)
        self.jacobians: FlowJacobians | None = None
        if mode == "linear":
            if cond and not isinstance(model, AnalyticModel):
                raise StepoptError("propagate=linear needs an unconditional model; use propagate=exact")
            self.jacobians = FlowJacobians(model, traj, cand, substeps)
        self.counter = _Counting(model)

    @property
    def evals(self) -> int:
        return self.counter.evals + (self.jacobians.jvp_rows if self.jacobians is not None else 0)

    def __call__(self, j: int, jumps: torch.Tensor) -> torch.Tensor:
        if self.jacobians is not None:
            jac = self.jacobians(j)
            out = torch.einsum("pab,ipb->ipa", jac, jumps - self.flat[None, :, j])
            return torch.linalg.vector_norm(out, dim=2).mean(1)
        # exact: every jump's end state re-solved to c_M by the teacher
        shape = self.traj.shape[2:]
        if isinstance(self.model, AnalyticModel):
            states = jumps.reshape(j * self.p, *shape).to(self.traj.dtype)
            ends = flow_to_end(self.model, states, self.cand, j, self.teacher)
            ends = ends.reshape(j, self.p, self.d).to(torch.float64)
        else:  # per source, with the trajectories' conditioning
            ends = torch.stack(
                [
                    flow_to_end(
                        self.model,
                        jumps[i].reshape(self.p, *shape).to(self.traj.dtype),
                        self.cand,
                        j,
                        self.teacher,
                        self.cond,
                        self.counter,
                    )
                    .reshape(self.p, self.d)
                    .to(torch.float64)
                    for i in range(j)
                ]
            )
        return torch.linalg.vector_norm(ends - self.flat[None, :, -1], dim=2).mean(1)
