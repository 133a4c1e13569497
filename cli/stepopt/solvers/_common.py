"""Helpers shared by the solvers: grid handling and the denoiser call.

Pure noise (README: Conventions): a grid may begin at ``sigma = inf`` (``lam = -inf``); the state
there is noise-scaled, ``x / sigma`` (the noise itself), and so is the state the denoiser is called
with at ``sigma = inf``. Every solver takes the step from ``sigma = inf`` in the noise-scaled state
``y = x / sigma`` against ``rho = 1 / sigma = e^lam`` (``dy/drho = D``), where every coefficient is
finite: the DDIM step ``x_1 = sigma_1 y_0 + D_0`` (the limit of each solver's first-order step), or
for the solvers whose first step corrects (heun, unipc) the trapezoid ``x_1 = sigma_1 y_0 + (D_0 +
D_1) / 2`` in rho. The evaluation at ``sigma = inf`` enters no later step: after the first step the
solver runs on ``sigmas[1:]`` as if it started there (multistep methods warm up again), which is
the limit of their interpolation when a node moves to ``lam = -inf`` (its weight vanishes) and keeps
every gradient with respect to the finite grid free of ``inf - inf``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from stepopt._lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


Denoiser = Callable[..., "torch.Tensor"]
Callback = Callable[[dict[str, Any]], None]


def as_grid(sigmas: Any, x: torch.Tensor) -> torch.Tensor:
    """The grid as a float64 tensor on ``x``'s device (keeps autograd history if it has any)."""
    return torch.as_tensor(sigmas, dtype=torch.float64, device=x.device)


def check_grid(sigmas: torch.Tensor, model_sigmas: torch.Tensor | None) -> None:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values, got shape {tuple(sigmas.shape)}")
    if model_sigmas is not None and model_sigmas.shape != sigmas.shape:
        raise ValueError(
            f"model_sigmas must have the shape of sigmas {tuple(sigmas.shape)}, got {tuple(model_sigmas.shape)}"
        )
    for name, grid in (("sigmas", sigmas), ("model_sigmas", model_sigmas)):
        if grid is None:
            continue
        g = grid.detach()
        if bool(torch.isnan(g).any()) or bool(torch.isinf(g[1:]).any()) or bool(g[0] == -torch.inf):
            raise ValueError(f"{name} must be finite except a first entry inf (pure noise), got {g.tolist()}")
    if model_sigmas is not None and pure_noise(sigmas) != pure_noise(model_sigmas):
        raise ValueError("model_sigmas[0] must be inf exactly when sigmas[0] is (the state there is noise-scaled)")


def pure_noise(sigmas: torch.Tensor) -> bool:
    """The grid begins at ``sigma = inf``: the state passed in is noise-scaled (``x / sigma``, the noise)."""
    return bool(torch.isinf(sigmas[0].detach()))


def from_noise_ddim(sig: torch.Tensor, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The DDIM step from ``sigma_0 = inf``: ``sigma_1 y_0 + D_0`` with ``x`` = ``y_0`` noise-scaled.

    The limit of ``D_0 + (sigma_1 / sigma_0) (x_0 - D_0)`` for ``x_0 = sigma_0 y_0``, sigma_0 -> inf.
    """
    return d + scalar(sig[1], x) * x


def from_noise_trapezoid(sig: torch.Tensor, x: torch.Tensor, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """The corrected step from ``sigma_0 = inf``: trapezoid in rho, ``sigma_1 (y_0 + rho_1 (D_0 + D_1) / 2)``."""
    return scalar(sig[1], x) * x + 0.5 * (d0 + d1)


def denoise(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Mapping[str, Any] | None,
) -> torch.Tensor:
    """Call ``D(x, sigma, **cond)`` with sigma broadcast to one value per sample (float64)."""
    s = sigma.reshape(()).expand(x.shape[0])
    return denoiser(x, s, **(cond or {}))


def scalar(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 coefficient cast to the state's dtype for the update."""
    return c.to(x.dtype)


def step_order(s: int, n_steps: int, max_order: int, lower_order_final: bool, from_noise: bool = False) -> int:
    """Order of multistep step ``s`` (0-based) of ``n_steps``: warm-up, then optionally lower at the end.

    ``min(s+1, K, N-s)`` with ``lower_order_final`` (orders 1, 2, ..., K, ..., 2, 1: the pattern
    the trust-region objective assumes), else ``min(s+1, K)``.

    >>> [step_order(s, 5, 3, True) for s in range(5)]
    [1, 2, 3, 2, 1]
    >>> [step_order(s, 5, 3, False) for s in range(5)]
    [1, 2, 3, 3, 3]

    From pure noise (``from_noise``: the grid begins at ``sigma = inf``) step 0 is first order and
    steps 1.. are the solver's own run on ``sigmas[1:]``, warm-up included:

    >>> [step_order(s, 5, 3, True, from_noise=True) for s in range(5)]
    [1, 1, 2, 2, 1]
    """
    if from_noise and s > 0:
        return step_order(s - 1, n_steps - 1, max_order, lower_order_final)
    k = min(s + 1, max_order)
    return min(k, n_steps - s) if lower_order_final else k
