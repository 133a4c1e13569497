"""UniPC, data prediction (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", arXiv 2302.04867; the data-prediction form with B(h) variants).

In the sigma frame (alpha = 1, ``lam = -log sigma``), step s goes from lam_s to lam_{s+1},
``h = lam_{s+1} - lam_s``, ``hh = -h`` (data prediction integrates e^{-h}), and uses the
data predictions at the k most recent nodes. With ``r_m = (lam_{s-m} - lam_s) / h`` (m = 1..k-1,
negative) and the scaled differences ``D1_m = (D_{s-m} - D_s) / r_m``:

    UniP-k:  x~_{s+1} = (sigma_{s+1}/sigma_s) x_s - (e^{hh} - 1) D_s - B(h) sum_m a_m D1_m
    UniC-k:  x_{s+1}  = (sigma_{s+1}/sigma_s) x_s - (e^{hh} - 1) D_s - B(h) (sum_m c_m D1_m + c_k (D~_{s+1} - D_s))

where ``D~_{s+1} = D(x~_{s+1}, sigma_{s+1})`` is the model evaluation of the *next* step (the corrector
costs no evaluation; it is not run after the last step, so NFE = N), ``B(h) = hh`` (``bh1``) or
``e^{hh} - 1`` (``bh2``), and the coefficients solve the paper's order conditions (the r_k
Vandermonde system with right-hand side built from the phi functions and B(h)), one small linear
system for any order:

    sum_m a_m r_m^{i-1} = b_i  (i = 1..k-1),    sum_m c_m r_m^{i-1} = b_i  (i = 1..k, r_k = 1),
    b_i = i! hh phi_{i+1}(hh) / B(h),  phi_1(z) = (e^z - 1)/z,  phi_{i+1}(z) = (phi_i(z) - 1/i!)/z.

For the two 1x1 systems (UniP-2 and UniC-1) the authors' implementation uses ``a_1 = 1/2``,
which satisfies the condition up to O(h) and keeps the order; we do the same, so results match the
reference UniPC (tests compare with the diffusers port to 1e-11). UniC-k raises the order of UniP-k
by one: UniPC of order p converges with order p+1 (measured by the contract suite).

From pure noise (``sigmas[0] = inf``, noise-scaled state ``y_0``; ``stepopt.solvers._common``):
step 0 predicts ``sigma_1 y_0 + D_0`` (the DDIM limit) and corrects with the trapezoid in rho = 1/sigma,
``x_1 = sigma_1 y_0 + (D_0 + D_1) / 2`` (bh2's limit with the paper's c_1 = 1/2; bh1's ``B(h) = -h``
has no limit at h = inf, so both variants take it); the rest is UniPC on ``sigmas[1:]`` with D_1.

Step order: ``min(s+1, K, N-s)`` with ``lower_order_final`` (default), else ``min(s+1, K)``, the
same policy as ``dpmpp-*`` (see ``dpmpp.py``).
"""

from __future__ import annotations

import math
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
    scalar,
    step_order,
)
from stepopt.solvers.registry import SolverIdentity, SolverSpec, register

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(h: Any, rks: Any, variant: str, predictor: bool) -> tuple[Any, Any]:
    """``(B(h), coefficients)`` of UniP (``predictor``, len(rks) unknowns) or UniC (rks plus r = 1).

    ``h``: the step (a torch scalar, or a numpy batch (B,)); ``rks``: the r_m of the k-1 previous
    nodes along the last axis (float64 or complex, possibly empty). Returns B(h) and the vector a
    (predictor, length k-1) or c (corrector, length k) along the last axis.
    """
    xp = np if isinstance(h, np.ndarray) else torch
    hh = -h
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = xp.expm1(hh)
    else:
        raise ValueError(f"UniPC variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
    r = rks if predictor else xp.concatenate([rks, xp.ones_like(rks[..., :1] if rks.shape[-1] else h[..., None])], -1)
    n = r.shape[-1]
    if n == 0:
        return b_h, r
    if n == 1:
        # The paper's choice for the 1x1 systems (UniP-2, UniC-1): a_1 = 1/2.
        return b_h, 0.5 * xp.ones_like(r)
    # Right-hand side b_i = i! hh phi_{i+1}(hh) / B(h) = (i! phi_i(hh) - 1) / B(h).
    phi = xp.expm1(hh) / hh  # phi_1
    rhs = []
    for i in range(1, n + 1):
        rhs.append((math.factorial(i) * phi - 1) / b_h)
        phi = (phi - 1 / math.factorial(i)) / hh  # phi_{i+1}
    vander = xp.stack([r**p for p in range(n)], -2)  # row p: r_m^p
    return b_h, xp.linalg.solve(vander, xp.stack(rhs, -1)[..., None])[..., 0]


def unipc_update(
    lam: Any, s: Any, k: int, variant: str, ds: list[Any], d_next: Any, mul: Callable[[Any, Any], Any]
) -> Any:
    """The data-prediction part of UniP-k (``d_next`` None) or UniC-k for step s:
    ``x_{s+1} = (sigma_{s+1}/sigma_s) x_s + this``.

    ``lam``: the grid's lam's (last axis; a torch vector for the solver, a batch of numpy grids for
    :func:`unipc_weights`, where ``s`` may be an array of steps of the same kind); ``ds``: D_s,
    D_{s-1}, ... (newest first); ``d_next``: the evaluation at the predicted point; ``mul(c, v)``:
    a coefficient times a D-like value. The solver and its bound weights both step through here.
    """
    xp = np if isinstance(lam, np.ndarray) else torch
    h = lam[..., s + 1] - lam[..., s]
    if k > 1:
        rks = xp.stack([(lam[..., s - m] - lam[..., s]) / h for m in range(1, k)], -1)
    else:
        rks = h[..., None][..., :0]
    d = ds[0]
    d1s = [mul(1 / rks[..., m - 1], ds[m] - d) for m in range(1, k)]
    # The first-order (DDIM) part shared by predictor and corrector.
    out = mul(-xp.expm1(-h), d)
    b_h, coef = unipc_coefficients(h, rks, variant, predictor=d_next is None)
    if d_next is not None:
        # UniC-k with the evaluation at the predicted point, which is also the next step's D.
        out = out - mul(b_h * coef[..., k - 1], d_next - d)
    for m, d1 in enumerate(d1s):
        out = out - mul(b_h * coef[..., m], d1)
    return out


def unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    order: int = 3,
    variant: str = "bh2",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC-``order`` (UniP + UniC) along ``sigmas``; returns the state at ``sigmas[-1]`` (N evaluations)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC supports orders 1-3, got {order}")
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
    sig = as_grid(sigmas, x)
    msig = sig if model_sigmas is None else as_grid(model_sigmas, x)
    check_grid(sig, msig)
    lam = -torch.log(sig)
    n = sig.shape[0] - 1

    dtype = x.dtype

    def mul(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return c.to(dtype) * v

    inf0 = pure_noise(sig)
    d = denoise(denoiser, x, msig[0], cond)
    ds: list[torch.Tensor] = [d]  # D_s, D_{s-1}, ... (newest first)
    for s in range(n):
        k = step_order(s, n, order, lower_order_final, from_noise=inf0)
        if s == 0 and inf0:
            # From pure noise (x noise-scaled): UniP-1 is the DDIM limit; UniC-1 with B(h) c_1 -> -1/2
            # (bh2's limit; bh1's B(h) = -h has none) is the trapezoid in rho = 1/sigma.
            x_pred = from_noise_ddim(sig, x, d)
            d_next = denoise(denoiser, x_pred, msig[1], cond) if n > 1 else d
            x_next = from_noise_trapezoid(sig, x, d, d_next) if n > 1 else x_pred
        else:
            ratio = scalar(sig[s + 1] / sig[s], x)
            x_pred = ratio * x + unipc_update(lam, s, k, variant, ds, None, mul)
            if s < n - 1:
                # The corrector reuses the evaluation at the predicted point as the next step's D.
                d_next = denoise(denoiser, x_pred, msig[s + 1], cond)
                x_next = ratio * x + unipc_update(lam, s, k, variant, ds, d_next, mul)
            else:
                d_next, x_next = d, x_pred
        x = x_next
        if callback is not None:
            callback({"i": s, "x": x, "denoised": d, "sigma": sig[s], "sigma_next": sig[s + 1], "order": k})
        # The evaluation at sigma = inf enters no later step.
        ds = [d_next] if (s == 0 and inf0) else [d_next, *ds][:order]
        d = d_next
    return x


def unipc_weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bound weights (see ``stepopt.solvers.linear``): evaluation e is at node e; step s < N-1
    (corrected) weighs D_{s-k+1}, ..., D_s and D_{s+1}, the last (predictor only) D_{N-k}, ..., D_{N-1}.

    The corrected steps of each order go through :func:`unipc_update` together (``s`` an index
    array, the D's the local unit vectors of D_{s+1}, D_s, D_{s-1}, D_{s-2}).
    """
    b, n = lam.shape[0], lam.shape[1] - 1
    steps = np.zeros((b, n, n), dtype=lam.dtype)
    lof = identity.lower_order_final is not False
    variant = identity.variant or "bh2"
    orders = np.array([step_order(s, n, identity.order, lof) for s in range(n)])
    kind = np.where(np.arange(n) < n - 1, orders, -orders)  # negative: the last, uncorrected step
    local = list(np.eye(4))  # D_{s+1}, D_s, D_{s-1}, D_{s-2}
    for key in np.unique(kind):
        s = np.nonzero(kind == key)[0]
        k = abs(int(key))
        upd = unipc_update(lam, s, k, variant, local[1:], local[0] if key > 0 else None, _mul)
        upd = upd * np.exp(lam[:, s + 1])[..., None]
        for m in range(-1, k):
            if m >= 0 or key > 0:
                steps[:, s, s - m] = upd[..., m + 1]
    return steps, np.arange(n)


def _mul(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    return c[..., None] * v


def unipc_global_order(identity: SolverIdentity) -> int:
    """UniC-k raises the order of UniP-k by one: UniPC of order p converges with order p+1."""
    return identity.order + 1


SPEC = register(
    SolverSpec(
        name="unipc",
        fn=unipc,
        orders=(1, 2, 3),
        default_order=3,
        variants=VARIANTS,
        default_variant="bh2",
        has_lower_order_final=True,
        default_lower_order_final=True,
        convergence_order=unipc_global_order,
        linear_weights=unipc_weights,
        summary="UniPC predictor-corrector, data prediction (Zhao et al. 2023), bh1/bh2, N evaluations",
    )
)
