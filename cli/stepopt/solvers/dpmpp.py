"""DPM-Solver++ multistep, data prediction (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", arXiv 2211.01095).

In the sigma frame (alpha = 1, ``lam = -log sigma``) the exact solution of the ODE in data-prediction form is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lam_s}^{lam_t} e^lam D(x_lam, lam) dlam,

and a K-step multistep solver replaces D by a polynomial through the last k data predictions.
With ``h = lam_{s+1} - lam_s`` and ``phi_1 = e^{-h} - 1``, ``phi_2 = phi_1 / h + 1``,
``phi_3 = phi_2 / h - 1/2`` (all float64):

* order 1 (DDIM): ``x_{s+1} = (sigma_{s+1}/sigma_s) x_s - phi_1 D_s``;
* order 2, Algorithm 2 (2M, the "midpoint" form): ``r = h_{s-1} / h``,
  ``x_{s+1} = (sigma_{s+1}/sigma_s) x_s - phi_1 ((1 + 1/(2r)) D_s - 1/(2r) D_{s-1})``;
  the "taylor" form (DPM-Solver's ``solver_type='taylor'``, diffusers' ``'heun'``) adds
  ``phi_2 (D_s - D_{s-1}) / r`` instead of ``-phi_1/(2r) (D_s - D_{s-1})``;
* order 3 (3M): with ``r0 = h_{s-1}/h``, ``r1 = h_{s-2}/h``, ``D1_0 = (D_s - D_{s-1})/r0``,
  ``D1_1 = (D_{s-1} - D_{s-2})/r1``, ``D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1)``,
  ``D2 = (D1_0 - D1_1)/(r0+r1)`` (the interpolating quadratic is ``D_s + u D1 + u^2 D2`` in
  ``u = (lam - lam_s)/h``), ``x_{s+1} = (sigma_{s+1}/sigma_s) x_s - phi_1 D_s + phi_2 D1 - c phi_3 D2``.

``dpmpp-3m`` has three variants (part of the solver identity a schedule records):

* ``reference`` (default): ``c = 1`` and midpoint order-2 steps, as the authors' reference
  ``multistep_dpm_solver_third_update`` (default ``solver_type='dpmsolver'``) and diffusers'
  ``DPMSolverMultistepScheduler(solver_order=3)`` (default ``solver_type='midpoint'``). ``c = 1``
  integrates only half of the quadratic's ``u^2`` term, so the method is second order globally
  (measured on the Gaussian model), but at few steps it is what every published number uses.
* ``taylor``: ``c = 1`` with taylor order-2 steps: k-diffusion's ``sample_dpmpp_3m_sde`` with
  ``eta = 0`` (which never lowers the final order: use it with ``lower_order_final: false``) and
  diffusers with ``solver_type='heun'``.
* ``exact``: ``c = 2``, the exact integral of the quadratic (third order globally; the node
  weights of the paper's bound), with midpoint order-2 steps. Schedule files written before the
  variants existed (``variant: null``) mean this one.

Step order: step 0 is first order, step 1 at most second (warm-up). With ``lower_order_final``
(the default) step s has order ``min(s+1, K, N-s)`` -- orders 1, 2, 3, ..., 3, 2, 1 for 3M and
1, 2, ..., 2, 1 for 2M -- the pattern the trust-region objective assumes (the paper's bound). The
DPM-Solver reference lowers the final orders only when N < 10 (diffusers: N < 15; k-diffusion
never); here the policy does not depend on N: it is part of the solver identity a schedule
records. Without it, ``min(s+1, K)``. One evaluation per step (N); any N >= 1 works (short grids
simply never reach order K).

From pure noise (``sigmas[0] = inf``, noise-scaled state ``y_0``; ``stepopt.solvers._common``): step 0
is ``x_1 = sigma_1 y_0 + D_0`` (h = inf, phi_1 = -1), and the rest is the solver on ``sigmas[1:]``.
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
    step_order,
)
from stepopt.solvers.registry import SolverIdentity, SolverSpec, register

# dpmpp-3m variants (module docstring): reference (phi_3, midpoint order 2), taylor (phi_3, taylor
# order 2), exact (2 phi_3, midpoint order 2).
VARIANTS_3M = ("reference", "taylor", "exact")
# A schedule file whose dpmpp-3m identity has no variant was written before the variants existed,
# when dpmpp-3m was the exact form.
LEGACY_VARIANT_3M = "exact"

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def dpmpp_multistep(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    order: int,
    variant: str = "reference",
    lower_order_final: bool = True,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(KM) with K = ``order`` in {1, 2, 3} along ``sigmas``; returns the state at ``sigmas[-1]``.

    ``variant`` (module docstring) sets the order-2 form (taylor or midpoint) and the factor of the
    quadratic term of order-3 steps (exact: 2 phi_3, else phi_3).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ multistep supports orders 1-3, got {order}")
    if variant not in VARIANTS_3M:
        raise ValueError(f"DPM-Solver++ variant must be one of {', '.join(VARIANTS_3M)}, got '{variant}'")
    sig = as_grid(sigmas, x)
    msig = sig if model_sigmas is None else as_grid(model_sigmas, x)
    check_grid(sig, msig)
    lam = -torch.log(sig)
    n = sig.shape[0] - 1
    dtype = x.dtype

    def mul(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return c.to(dtype) * v

    inf0 = pure_noise(sig)
    ds: list[torch.Tensor] = []  # data predictions D_s, D_{s-1}, ... (newest first)
    for s in range(n):
        d = denoise(denoiser, x, msig[s], cond)
        k = step_order(s, n, order, lower_order_final, from_noise=inf0)
        if s == 0 and inf0:
            # From pure noise: the DDIM limit; D_0 (at lam = -inf) enters no later step.
            x = from_noise_ddim(sig, x, d)
        else:
            ds = [d, *ds][:order]
            x = scalar(sig[s + 1] / sig[s], x) * x + dpmpp_update(lam, s, k, variant, ds, mul)
        if callback is not None:
            callback({"i": s, "x": x, "denoised": d, "sigma": sig[s], "sigma_next": sig[s + 1], "order": k})
    return x


def dpmpp_update(lam: Any, s: Any, k: int, variant: str, ds: list[Any], mul: Callable[[Any, Any], Any]) -> Any:
    """The data-prediction part of step s of order k: ``x_{s+1} = (sigma_{s+1}/sigma_s) x_s + this``.

    ``lam``: the grid's lam's (last axis; a torch vector for the solver, a batch of numpy grids for
    :func:`dpmpp_weights`, where ``s`` may be an array of steps of the same order); ``ds``: D_s,
    D_{s-1}, D_{s-2} (newest first); ``mul(c, v)``: a
    coefficient times a D-like value. The solver and its bound weights both step through here.
    """
    expm1 = np.expm1 if isinstance(lam, np.ndarray) else torch.expm1
    h = lam[..., s + 1] - lam[..., s]
    phi_1 = expm1(-h)
    # First-order (DDIM) part, shared by every order.
    out = mul(-phi_1, ds[0])
    if k == 2:
        r = (lam[..., s] - lam[..., s - 1]) / h
        if variant == "taylor":
            # Taylor form: add phi_2 (D_s - D_{s-1}) / r.
            out = out + mul((phi_1 / h + 1) / r, ds[0] - ds[1])
        else:
            # Algorithm 2: D = (1 + 1/(2r)) D_s - 1/(2r) D_{s-1}, i.e. add -phi_1/(2r) (D_s - D_{s-1}).
            out = out - mul(phi_1 / (2 * r), ds[0] - ds[1])
    elif k == 3:
        r0 = (lam[..., s] - lam[..., s - 1]) / h
        r1 = (lam[..., s - 1] - lam[..., s - 2]) / h
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        d1_0 = mul(1 / r0, ds[0] - ds[1])
        d1_1 = mul(1 / r1, ds[1] - ds[2])
        d2 = mul(1 / (r0 + r1), d1_0 - d1_1)
        d1 = d1_0 + mul(r0, d2)
        # exact: the whole integral of the interpolating quadratic (2 phi_3); else the reference codes' phi_3.
        quad = 2.0 if variant == "exact" else 1.0
        out = out + mul(phi_2, d1) - mul(quad * phi_3, d2)
    return out


def dpmpp_weights(identity: SolverIdentity, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bound weights (see ``stepopt.solvers.linear``): step s adds ``e^{lam_{s+1}}`` x its D part to x/sigma.

    The steps of each order go through :func:`dpmpp_update` together (``s`` an index array, the D's
    the local unit vectors of D_s, D_{s-1}, D_{s-2}).
    """
    b, n = lam.shape[0], lam.shape[1] - 1
    steps = np.zeros((b, n, n), dtype=lam.dtype)
    variant = identity.variant or "reference"  # dpmpp-2m has no variant: its order-2 steps are Alg. 2
    lof = identity.lower_order_final is not False
    orders = np.array([step_order(s, n, identity.order, lof) for s in range(n)])
    local = list(np.eye(3))
    for k in np.unique(orders):
        s = np.nonzero(orders == k)[0]
        upd = dpmpp_update(lam, s, int(k), variant, local, _mul)  # (B, S, 3): D_s, D_{s-1}, D_{s-2}
        upd = upd * np.exp(lam[:, s + 1])[..., None]
        for m in range(int(k)):
            steps[:, s, s - m] = upd[..., m]
    return steps, np.arange(n)


def _mul(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Coefficients (B, S) times local coefficient vectors (3,) or (B, S, 3)."""
    return c[..., None] * v


def dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Algorithm 2), N evaluations."""
    return dpmpp_multistep(
        denoiser,
        x,
        sigmas,
        order=2,
        lower_order_final=lower_order_final,
        model_sigmas=model_sigmas,
        cond=cond,
        callback=callback,
    )


def dpmpp_3m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    variant: str = "reference",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(3M) in the form ``variant`` (reference, taylor or exact), N evaluations."""
    return dpmpp_multistep(
        denoiser,
        x,
        sigmas,
        order=3,
        variant=variant,
        lower_order_final=lower_order_final,
        model_sigmas=model_sigmas,
        cond=cond,
        callback=callback,
    )


def dpmpp_3m_global_order(identity: SolverIdentity) -> int:
    """The exact quadratic term makes 3M third order; the reference codes' half term, second order."""
    return 3 if identity.variant == "exact" else 2


SPEC_2M = register(
    SolverSpec(
        name="dpmpp-2m",
        fn=dpmpp_2m,
        orders=(2,),
        default_order=2,
        linear_weights=dpmpp_weights,
        has_lower_order_final=True,
        default_lower_order_final=True,
        summary="DPM-Solver++(2M), data prediction multistep (Lu et al. 2022, Alg. 2), N evaluations",
    )
)

SPEC_3M = register(
    SolverSpec(
        name="dpmpp-3m",
        fn=dpmpp_3m,
        orders=(3,),
        default_order=3,
        variants=VARIANTS_3M,
        default_variant="reference",
        linear_weights=dpmpp_weights,
        has_lower_order_final=True,
        default_lower_order_final=True,
        convergence_order=dpmpp_3m_global_order,
        summary="DPM-Solver++(3M), data prediction multistep (Lu et al. 2022); reference/taylor/exact, N evaluations",
    )
)
