"""Heun's 2nd-order method in the sigma frame (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv 2206.00364, Algorithm 1: deterministic sampling).

With ``d(x, sigma) = (x - D(x, sigma)) / sigma`` (the probability-flow ODE dx/dsigma with sigma(t) = t), step i:

    d_i  = d(x_i, sigma_i)
    x'   = x_i + (sigma_{i+1} - sigma_i) d_i                              (Euler predictor)
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d(x', sigma_{i+1})) / 2   (trapezoidal corrector)

Algorithm 1 skips the corrector when sigma_{i+1} = 0. Schedules end at sigma_min > 0 (design.md §1),
so every step corrects and the exact NFE is 2N; a grid that does end at 0 gets the paper's Euler
last step here, but no schedule file can carry one.

Decoupled model time: the denoiser sees ``model_sigmas[i]`` at node i and ``model_sigmas[i+1]``
for the corrector's evaluation at the end of the step (the node it belongs to); every
coefficient, including the ``1/sigma`` inside ``d``, uses ``sigmas``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stepopt._lazy import lazy_module
from stepopt.solvers._common import Callback, Denoiser, as_grid, check_grid, denoise, scalar
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
    for i in range(sig.shape[0] - 1):
        s, s_next = sig[i], sig[i + 1]
        dt = s_next - s
        d = denoise(denoiser, x, msig[i], cond)
        # Euler predictor: x' = x + dt (x - D) / sigma_i.
        x_pred = x + scalar(dt / s, x) * (x - d)
        if s_next > 0:
            # Trapezoidal corrector with the slope at (x', sigma_{i+1}).
            d_pred = denoise(denoiser, x_pred, msig[i + 1], cond)
            x = x + scalar(dt / (2 * s), x) * (x - d) + scalar(dt / (2 * s_next), x) * (x_pred - d_pred)
        else:
            x = x_pred
        if callback is not None:
            callback({"i": i, "x": x, "denoised": d, "sigma": s, "sigma_next": s_next})
    return x


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
        summary="EDM Heun (Karras et al. 2022, Alg. 1), second order, 2N evaluations",
    )
)
