"""Helpers shared by the solvers: grid handling and the denoiser call."""

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


def step_order(s: int, n_steps: int, max_order: int, lower_order_final: bool) -> int:
    """Order of multistep step ``s`` (0-based) of ``n_steps``: warm-up, then optionally lower at the end.

    ``min(s+1, K, N-s)`` with ``lower_order_final`` (orders 1, 2, ..., K, ..., 2, 1: the pattern
    the trust-region objective assumes), else ``min(s+1, K)``.

    >>> [step_order(s, 5, 3, True) for s in range(5)]
    [1, 2, 3, 2, 1]
    >>> [step_order(s, 5, 3, False) for s in range(5)]
    [1, 2, 3, 3, 3]
    """
    k = min(s + 1, max_order)
    return min(k, n_steps - s) if lower_order_final else k
