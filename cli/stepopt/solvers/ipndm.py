"""iPNDM: improved pseudo numerical methods (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
Exponential Integrator" (DEIS), arXiv 2204.13902, which replaces PNDM's Runge-Kutta start by
lower-order multistep warm-up; in the sigma frame as used by Zhou et al. 2024, "Fast ODE-based
Sampling for Diffusion Models in Around 5 Steps", arXiv 2312.00094).

Adams-Bashforth multistep on the ODE ``dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma``:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_j w_j d_{i-j},   j = 0..k-1,  k = min(i+1, K)

(lower-order warm-up, no lower-order final steps: with K = 4, steps 3, 4, ... use AB-4).

* ``ipndm`` uses the fixed-step Adams-Bashforth weights whatever the grid, exactly as iPNDM does:
  k=1 (1), k=2 (3, -1)/2, k=3 (23, -16, 5)/12, k=4 (55, -59, 37, -9)/24. On a uniform grid in sigma
  this is AB-k of order k; on the non-uniform grids diffusion sampling uses (EDM, logSNR) the weights
  are off by O(step ratio - 1) = O(1/N), so for k >= 2 the global order is 2 (contract suite,
  ``convergence_order``); the method is used for its small error at few steps, not its order.
* ``ipndm-v`` (variable step, our extension in the spirit of DPM-bench's ``ipndm_v``) uses the exact
  variable-step Adams-Bashforth weights: the integral over [sigma_i, sigma_{i+1}] of the Lagrange
  polynomial through (sigma_{i-j}, d_{i-j}), from one small Vandermonde solve; order k on any
  smooth grid, and identical to ``ipndm`` on a uniform grid.

From pure noise (``sigmas[0] = inf``, noise-scaled state ``y_0``): step 0 is the Euler/DDIM limit
``x_1 = sigma_1 y_0 + D_0`` and the rest is iPNDM on ``sigmas[1:]`` (warm-up from order 1).

One evaluation per step (NFE = N). Decoupled model time: D is evaluated at ``model_sigmas[i]``; the
``1/sigma`` in ``d`` and every weight use ``sigmas``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stepopt._lazy import lazy_module
from stepopt.solvers._common import (
    Callback,
    Denoiser,
    as_grid,
    check_grid,
    denoise,
    from_noise_ddim,
    pure_noise,
    scalar,
)
from stepopt.solvers.registry import SolverIdentity, SolverSpec, register

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

# Fixed-step Adams-Bashforth weights for d_i, d_{i-1}, ... (Hairer, Norsett & Wanner, Solving ODEs I, III.1).
AB_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def variable_ab_weights(nodes: Any) -> Any:
    """Weights w with ``sum_j w_j p(tau_j) = integral_0^1 p`` for every polynomial of degree < k.

    ``nodes`` (last axis, torch or numpy, batched or not) are the k past nodes in units of the
    current step, ``tau_j = (sigma_{i-j} - sigma_i) / (sigma_{i+1} - sigma_i)`` (tau_0 = 0, the others
    negative); integer nodes 0, -1, -2, ... give ``AB_WEIGHTS``.
    """
    xp = np if isinstance(nodes, np.ndarray) else torch
    k = nodes.shape[-1]
    vander = xp.stack([nodes**p for p in range(k)], -2)  # row p: tau_j^p
    moments = xp.stack([xp.ones_like(nodes[..., 0]) / (p + 1) for p in range(k)], -1)
    return xp.linalg.solve(vander, moments[..., None])[..., 0]


def ipndm_increment(sig: Any, i: int, variable: bool, slopes: list[Any], mul: Callable[[Any, Any], Any]) -> Any:
    """``x_{i+1} - x_i``: the Adams-Bashforth combination of the slopes d_i, d_{i-1}, ... (newest first).

    ``sig``: the grid (last axis; a torch vector for the solver, a batch of numpy grids for
    :func:`ipndm_weights`); ``mul(c, v)``: a coefficient times a state-like value. The solver and
    its bound weights both step through here.
    """
    xp = np if isinstance(sig, np.ndarray) else torch
    k = len(slopes)
    dt = sig[..., i + 1] - sig[..., i]
    if variable and k > 1:
        w = variable_ab_weights(xp.stack([(sig[..., i - j] - sig[..., i]) / dt for j in range(k)], -1))
        coefs = [dt * w[..., j] for j in range(k)]
    else:
        coefs = [dt * c for c in AB_WEIGHTS[k]]
    inc = mul(coefs[0], slopes[0])
    for c, slope in zip(coefs[1:], slopes[1:], strict=True):
        inc = inc + mul(c, slope)
    return inc


def _ipndm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    order: int,
    variable: bool,
    model_sigmas: Any,
    cond: Mapping[str, Any] | None,
    callback: Callback | None,
) -> torch.Tensor:
    if order not in AB_WEIGHTS:
        raise ValueError(f"iPNDM supports orders 1-4, got {order}")
    sig = as_grid(sigmas, x)
    msig = sig if model_sigmas is None else as_grid(model_sigmas, x)
    check_grid(sig, msig)
    dtype = x.dtype

    def mul(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return c.to(dtype) * v

    inf0 = pure_noise(sig)
    slopes: list[torch.Tensor] = []  # d_i, d_{i-1}, ... (newest first)
    for i in range(sig.shape[0] - 1):
        den = denoise(denoiser, x, msig[i], cond)
        if i == 0 and inf0:
            # From pure noise: the DDIM (Euler) limit; the slope at sigma = inf enters no later step.
            x = from_noise_ddim(sig, x, den)
        else:
            slopes = [scalar(1 / sig[i], x) * (x - den), *slopes][:order]
            x = x + ipndm_increment(sig, i, variable, slopes, mul)
        if callback is not None:
            info = {"i": i, "x": x, "denoised": den, "sigma": sig[i], "sigma_next": sig[i + 1]}
            callback({**info, "order": max(1, len(slopes))})
    return x


def ipndm_weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bound weights (see ``stepopt.solvers.linear``), by running the steps on coefficient vectors
    over (x_0, D_0, ..., D_{N-1}): the slopes carry earlier states, so each step weighs every earlier D."""
    b, n = lam.shape[0], lam.shape[1] - 1
    sig = np.exp(-lam)
    unit = np.eye(n + 1)
    variable = identity.name == "ipndm-v"
    x = np.broadcast_to(unit[0], (b, n + 1)).astype(lam.dtype)
    steps = np.zeros((b, n, n), dtype=lam.dtype)
    slopes: list[np.ndarray] = []
    for i in range(n):
        slopes = [(x - unit[1 + i]) / sig[:, i, None], *slopes][: identity.order]
        x_next = x + ipndm_increment(sig, i, variable, slopes, _mul)
        steps[:, i] = (x_next / sig[:, i + 1, None] - x / sig[:, i, None])[:, 1:]
        x = x_next
    return steps, np.arange(n)


def _mul(c: Any, v: np.ndarray) -> np.ndarray:
    return c[:, None] * v if isinstance(c, np.ndarray) else c * v


def ipndm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """iPNDM with fixed-step AB weights, warm-up orders 1..``order``; N evaluations."""
    return _ipndm(
        denoiser, x, sigmas, order=order, variable=False, model_sigmas=model_sigmas, cond=cond, callback=callback
    )


def ipndm_v(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """iPNDM with exact variable-step AB weights, warm-up orders 1..``order``; N evaluations."""
    return _ipndm(
        denoiser, x, sigmas, order=order, variable=True, model_sigmas=model_sigmas, cond=cond, callback=callback
    )


def ipndm_global_order(identity: SolverIdentity) -> int:
    """Fixed-step AB weights on a non-uniform grid: local error O(h^3) from step-ratio mismatch, so order <= 2."""
    return min(identity.order, 2)


SPEC = register(
    SolverSpec(
        name="ipndm",
        fn=ipndm,
        orders=(1, 2, 3, 4),
        default_order=4,
        convergence_order=ipndm_global_order,
        linear_weights=ipndm_weights,
        summary="iPNDM (Zhang & Chen 2023): fixed-step Adams-Bashforth in sigma, orders 1-4, N evaluations",
    )
)

SPEC_V = register(
    SolverSpec(
        name="ipndm-v",
        fn=ipndm_v,
        orders=(1, 2, 3, 4),
        default_order=4,
        linear_weights=ipndm_weights,
        summary="iPNDM with variable-step Adams-Bashforth weights, orders 1-4, N evaluations",
    )
)
