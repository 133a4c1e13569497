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

Step order: ``min(s+1, K, N-s)`` with ``lower_order_final`` (default), else ``min(s+1, K)``, the
same policy as ``dpmpp-*`` (see ``dpmpp.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from stepopt.solvers._common import Callback, Denoiser, as_grid, check_grid, denoise, scalar, step_order
from stepopt.solvers.registry import SolverIdentity, SolverSpec, register

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(
    h: torch.Tensor, rks: torch.Tensor, variant: str, predictor: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B(h), coefficients)`` of UniP (``predictor``, len(rks) unknowns) or UniC (rks plus r = 1).

    ``rks`` holds the r_m of the k-1 previous nodes (float64, possibly empty); returns B(h) and the
    vector a (predictor, length k-1) or c (corrector, length k).
    """
    hh = -h
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = torch.expm1(hh)
    else:
        raise ValueError(f"UniPC variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
    r = rks if predictor else torch.cat([rks, torch.ones_like(h).reshape(1)])
    n = r.shape[0]
    if n == 0:
        return b_h, r
    if n == 1:
        # The paper's choice for the 1x1 systems (UniP-2, UniC-1): a_1 = 1/2.
        return b_h, torch.full_like(r, 0.5)
    # Right-hand side b_i = i! hh phi_{i+1}(hh) / B(h) = (i! phi_i(hh) - 1) / B(h).
    phi = torch.expm1(hh) / hh  # phi_1
    rhs = []
    for i in range(1, n + 1):
        rhs.append((math.factorial(i) * phi - 1) / b_h)
        phi = (phi - 1 / math.factorial(i)) / hh  # phi_{i+1}
    vander = torch.stack([r**p for p in range(n)])  # row p: r_m^p
    return b_h, torch.linalg.solve(vander, torch.stack(rhs))


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
    d = denoise(denoiser, x, msig[0], cond)
    ds: list[torch.Tensor] = [d]  # D_s, D_{s-1}, ... (newest first)
    for s in range(n):
        k = step_order(s, n, order, lower_order_final)
        h = lam[s + 1] - lam[s]
        rks = torch.stack([(lam[s - m] - lam[s]) / h for m in range(1, k)]) if k > 1 else lam[:0]
        d1s = [scalar(1 / rks[m - 1], x) * (ds[m] - d) for m in range(1, k)]
        # The first-order (DDIM) part shared by predictor and corrector.
        x_base = scalar(sig[s + 1] / sig[s], x) * x - scalar(torch.expm1(-h), x) * d
        b_h, a = unipc_coefficients(h, rks, variant, predictor=True)
        x_pred = x_base
        for m, d1 in enumerate(d1s):
            x_pred = x_pred - scalar(b_h * a[m], x) * d1
        if s < n - 1:
            # UniC-k with the evaluation at the predicted point, which is also the next step's D.
            d_next = denoise(denoiser, x_pred, msig[s + 1], cond)
            _, c = unipc_coefficients(h, rks, variant, predictor=False)
            x_next = x_base - scalar(b_h * c[k - 1], x) * (d_next - d)
            for m, d1 in enumerate(d1s):
                x_next = x_next - scalar(b_h * c[m], x) * d1
        else:
            d_next, x_next = d, x_pred
        x = x_next
        if callback is not None:
            callback({"i": s, "x": x, "denoised": d, "sigma": sig[s], "sigma_next": sig[s + 1], "order": k})
        d = d_next
        ds = [d, *ds][:order]
    return x


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
        summary="UniPC predictor-corrector, data prediction (Zhao et al. 2023), bh1/bh2, N evaluations",
    )
)
