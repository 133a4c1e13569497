"""``ode-error``: how far a schedule's output lands from the exact ODE solution from the same noise.

With ``y`` the few-step output and ``y*`` the teacher's (exact ODE for analytic models, a many-step
solver for networks) from the same initial noise (seed i -> sample i),

    rmse = sqrt(mean_{i, j} (y_ij - y*_ij)^2),    max = max_{i, j} |y_ij - y*_ij|,

over samples i and data coordinates j, in data units (the digits live in [-1, 1]). This is the
quantity the trust-region and LD3 papers drive down (Xue et al. 2024, arXiv 2402.17376, Sec. 3:
the global error bound; Tong et al. 2025, arXiv 2405.15506, Eq. 3 with an L2 distance).
"""

from __future__ import annotations

import torch

KEY_RMSE = "rmse"
KEY_MAX = "max"


def ode_error(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``{"rmse": ..., "max": ...}`` of ``outputs - targets`` (same shape), computed in float64."""
    if outputs.shape != targets.shape:
        raise ValueError(f"ode-error: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ")
    if outputs.numel() == 0:
        raise ValueError("ode-error needs at least one sample")
    d = outputs.detach().to(torch.float64).cpu() - targets.detach().to(torch.float64).cpu()
    return {KEY_RMSE: float(d.square().mean().sqrt()), KEY_MAX: float(d.abs().max())}
