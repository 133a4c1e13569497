"""Solvers as linear maps of their network evaluations: the exact weights an error bound needs.

Every registered solver is linear in the outputs of its denoiser: on a grid of N steps with M
evaluations D_0, ..., D_{M-1} (in call order), the state after step s satisfies

    x_{s+1} / sigma_{s+1} = x_s / sigma_s + sum_e W[s, e] D_e  (+ a multiple of x_0 for non-exponential
                                                              integrators such as Heun and iPNDM),

so an error delta_e in evaluation e moves the output by ``sigma_N sum_s W[s, e] delta_e`` exactly
(the paper's bound in Xue et al. 2024, Eq. 14, is built from these W). For multistep exponential
integrators (euler, dpmpp-*, unipc) W[s, e] is the coefficient of D_e in step s's update; for Heun
and iPNDM, whose steps also reuse earlier states, it includes what reaches step s through them.

Each solver module provides ``linear_weights`` (registered on its :class:`SolverSpec`): it runs the
solver's own update function (the one the solver steps with) on coefficient vectors instead of
tensors, for a batch of grids, in numpy; with complex grids it gives complex-step derivatives.
:func:`measured_step_weights` reads the same weights off the torch solver itself with probe
evaluations (tests check the two agree to 1e-10).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepopt.errors import StepoptError
from stepopt.solvers.registry import SolverIdentity, get_solver


def step_weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W, nodes)`` for a batch of increasing grids ``lam`` (B, N+1), real or complex.

    ``W`` (B, N, M): weight of evaluation e in step s (see the module docstring); ``nodes`` (M,):
    the grid node whose sigma evaluation e uses.
    """
    spec = get_solver(identity.name)
    if spec.linear_weights is None:
        raise StepoptError(f"solver '{identity.name}' does not declare its weights as a linear map of its evaluations")
    lam = np.asarray(lam)
    if lam.ndim != 2 or lam.shape[1] < 2:
        raise ValueError(f"lam must be a batch of grids (B, N+1) with N >= 1, got shape {lam.shape}")
    return spec.linear_weights(identity, lam)


def has_linear_weights(identity: SolverIdentity) -> bool:
    return get_solver(identity.name).linear_weights is not None


class _Probe:
    """A denoiser whose e-th call returns the unit vector of evaluation e (column 1 + e), whatever x is."""

    def __init__(self, n_evals: int, grid: Any) -> None:
        self.n_evals = n_evals
        self.grid = grid
        self.nodes: list[int] = []

    def __call__(self, x: Any, sigma: Any, **cond: Any) -> Any:
        import torch

        out = torch.zeros_like(x)
        out[:, 1 + len(self.nodes)] = 1.0
        self.nodes.append(int(torch.argmin((self.grid - sigma[0]).abs())))
        return out


def measured_step_weights(identity: SolverIdentity, sigmas: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(W, nodes)`` (N, M) and (M,) read off the torch solver itself: x_0 = e_0, evaluation e returns e_{1+e}.

    The solver is linear in (x_0, D_0, ...), so its states are exactly these coefficient vectors; W[s]
    is the D part of ``x_{s+1}/sigma_{s+1} - x_s/sigma_s`` (the callback's states).
    """
    import torch

    from stepopt.solvers import solve

    grid = torch.as_tensor(sigmas, dtype=torch.float64)
    n = grid.shape[0] - 1
    m = get_solver(identity.name).nfe(identity, n)
    probe = _Probe(m, grid)
    x0 = torch.zeros(1, 1 + m, dtype=torch.float64)
    x0[0, 0] = 1.0
    rows: list[Any] = []
    prev = [x0[0] / grid[0]]

    def cb(info: dict[str, Any]) -> None:
        cur = info["x"][0] / info["sigma_next"]
        rows.append(cur - prev[0])
        prev[0] = cur

    with torch.no_grad():
        solve(identity, probe, x0, grid, callback=cb)
    return torch.stack(rows)[:, 1:].numpy(), np.asarray(probe.nodes)
