"""Euler / DDIM in the sigma frame (Song et al. 2021, DDIM; Karras et al. 2022, Alg. 1 w/o 2nd order).

x_{i+1} = D_i + (sigma_{i+1} / sigma_i) (x_i - D_i), which equals the Euler step
x_i + (sigma_{i+1} - sigma_i) (x_i - D_i) / sigma_i of dx/dsigma = (x - D(x, sigma)) / sigma.
From ``sigma_0 = inf`` (noise-scaled state ``y_0``): ``x_1 = sigma_1 y_0 + D_0``, its limit.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """First-order DDIM steps along ``sigmas`` (N+1 values); returns the state at ``sigmas[-1]``."""
    sig = as_grid(sigmas, x)
    msig = None if model_sigmas is None else as_grid(model_sigmas, x)
    check_grid(sig, msig)
    inf0 = pure_noise(sig)
    for i in range(sig.shape[0] - 1):
        d = denoise(denoiser, x, sig[i] if msig is None else msig[i], cond)
        if i == 0 and inf0:
            x = from_noise_ddim(sig, x, d)  # x is noise-scaled at sigma = inf
        else:
            x = d + scalar(sig[i + 1] / sig[i], x) * (x - d)
        if callback is not None:
            callback({"i": i, "x": x, "denoised": d, "sigma": sig[i], "sigma_next": sig[i + 1]})
    return x


def euler_weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bound weights (see ``stepopt.solvers.linear``).

    x_{i+1}/sigma_{i+1} = x_i/sigma_i + (e^{lam_{i+1}} - e^{lam_i}) D_i.
    """
    n = lam.shape[1] - 1
    steps = np.zeros((lam.shape[0], n, n), dtype=lam.dtype)
    idx = np.arange(n)
    steps[:, idx, idx] = np.exp(lam[:, 1:]) - np.exp(lam[:, :-1])
    return steps, idx


SPEC = register(
    SolverSpec(
        name="euler",
        fn=euler,
        orders=(1,),
        default_order=1,
        linear_weights=euler_weights,
        summary="Euler / DDIM, first order, N evaluations",
    )
)
