"""Heun's 2nd-order method in the sigma frame (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv 2206.00364, Algorithm 1: deterministic sampling).

With ``d(x, sigma) = (x - D(x, sigma)) / sigma`` (the probability-flow ODE dx/dsigma with sigma(t) = t), step i:

    d_i  = d(x_i, sigma_i)
    x'   = x_i + (sigma_{i+1} - sigma_i) d_i                              (Euler predictor)
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d(x', sigma_{i+1})) / 2   (trapezoidal corrector)

Algorithm 1 skips the corrector when sigma_{i+1} = 0. Schedules end at sigma_min > 0,
so every step corrects and the exact NFE is 2N; a grid that does end at 0 gets the paper's Euler
last step here, but no schedule file can carry one.

From pure noise (``sigmas[0] = inf``, noise-scaled state ``y_0``) the trapezoid in sigma has no
limit (its corrector weighs ``D_0 - D_1`` by ``(sigma_0 - sigma_1) / (2 sigma_1)``), so the first
step is Heun's rule on the noise-scaled ODE ``dy/drho = D`` (rho = 1/sigma): the Euler predictor
``sigma_1 y_0 + D_0`` (the same as EDM's) and the trapezoid ``x_1 = sigma_1 y_0 + (D_0 + D_1) / 2``.
Still two evaluations.

Decoupled model time: the denoiser sees ``model_sigmas[i]`` at node i and ``model_sigmas[i+1]``
for the corrector's evaluation at the end of the step (the node it belongs to); every
coefficient, including the ``1/sigma`` inside ``d``, uses ``sigmas``.
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
    from_noise_trapezoid,
    pure_noise,
)
from stepopt.solvers.registry import SolverIdentity, SolverSpec, register

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """EDM Heun steps along ``sigmas`` (N+1 values); returns the state at ``sigmas[-1]`` (2N evaluations)."""
    sig = as_grid(sigmas, x)
    msig = sig if model_sigmas is None else as_grid(model_sigmas, x)
    check_grid(sig, msig)
    dtype = x.dtype

    def mul(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return c.to(dtype) * v

    inf0 = pure_noise(sig)
    for i in range(sig.shape[0] - 1):
        s, s_next = sig[i], sig[i + 1]
        d = denoise(denoiser, x, msig[i], cond)
        if i == 0 and inf0:
            # From pure noise (x noise-scaled): Euler predictor, then the trapezoid in rho = 1/sigma.
            d_pred = denoise(denoiser, from_noise_ddim(sig, x, d), msig[1], cond)
            x = from_noise_trapezoid(sig, x, d, d_pred)
        elif s_next > 0:
            x = heun_step(sig, i, x, d, lambda x_pred: denoise(denoiser, x_pred, msig[i + 1], cond), mul)  # noqa: B023
        else:
            x = x + mul((s_next - s) / s, x - d)  # Euler last step to sigma = 0 (Alg. 1)
        if callback is not None:
            callback({"i": i, "x": x, "denoised": d, "sigma": s, "sigma_next": s_next})
    return x


def heun_step(sig: Any, i: int, x: Any, d: Any, d_at: Callable[[Any], Any], mul: Callable[[Any, Any], Any]) -> Any:
    """One Heun step: Euler predictor, then the trapezoidal corrector with ``d_at(x')`` = D(x', sigma_{i+1}).

    ``sig``: the grid (last axis; a torch vector for the solver, a batch of numpy grids for
    :func:`heun_weights`); ``mul(c, v)``: a coefficient times a state-like value. The solver and
    its bound weights both step through here.
    """
    s, s_next = sig[..., i], sig[..., i + 1]
    dt = s_next - s
    # Euler predictor: x' = x + dt (x - D) / sigma_i.
    x_pred = x + mul(dt / s, x - d)
    # Trapezoidal corrector with the slope at (x', sigma_{i+1}).
    return x + mul(dt / (2 * s), x - d) + mul(dt / (2 * s_next), x_pred - d_at(x_pred))


def heun_weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bound weights (see ``stepopt.solvers.linear``): evaluations 2i (at node i) and 2i+1 (the
    corrector's, at node i+1), by running the steps on coefficient vectors over (x_0, D_0, ..., D_{2N-1})."""
    b, n = lam.shape[0], lam.shape[1] - 1
    sig = np.exp(-lam)
    unit = np.eye(2 * n + 1)
    x = np.broadcast_to(unit[0], (b, 2 * n + 1)).astype(lam.dtype)
    steps = np.zeros((b, n, 2 * n), dtype=lam.dtype)
    for i in range(n):
        corrector = unit[2 + 2 * i]  # D_{2i+1}, the evaluation at the predicted point
        x_next = heun_step(sig, i, x, unit[1 + 2 * i], lambda _x: corrector, _mul)  # noqa: B023
        steps[:, i] = (x_next / sig[:, i + 1, None] - x / sig[:, i, None])[:, 1:]
        x = x_next
    return steps, np.repeat(np.arange(n + 1), 2)[1:-1]


def _mul(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    return c[:, None] * v


def nfe_heun(identity: SolverIdentity, n_steps: int) -> int:
    """Two evaluations per step: grids end at sigma_min > 0, so no step is a plain Euler step."""
    return 2 * n_steps


SPEC = register(
    SolverSpec(
        name="heun",
        fn=heun,
        orders=(2,),
        default_order=2,
        nfe_rule=nfe_heun,
        linear_weights=heun_weights,
        summary="EDM Heun (Karras et al. 2022, Alg. 1), second order, 2N evaluations",
    )
)
