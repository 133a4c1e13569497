"""PFDiff: timestep skipping with past and future gradients (Wang, Cai, Li, Peng, Su, "PFDiff:
Training-free Acceleration of Diffusion Models Combining Past and Future Scores", ICLR 2025,
arXiv 2408.08822; reference code onefly123/PFDiff).

A wrapper around a base solver (``pfdiff-euler``: Euler/DDIM; ``pfdiff-dpmpp-2m``: DPM-Solver++(2M)).
On a grid of T steps ``s_0 > ... > s_T`` the base solver runs on the *anchors* ``a_0 = 0, a_1 = 1,
a_{m+1} = min(a_m + k + 1, T)``; at every anchor after the first, instead of evaluating the network
at ``(x_a, s_a)``:

1. *past*: a first-order (DDIM) step from ``x_a`` to the springboard node ``f = a + min(h, b - a - 1)``
   (b the next anchor) with the previous evaluation's gradient -- no network call;
2. *future*: one evaluation ``g = D(x_f, s_f)`` at the springboard;
3. the base solver's step from ``x_a`` to ``s_b`` uses ``g`` in place of the evaluation at ``a``.

The gradient that is reused and substituted is the base solver's own model output: the noise
prediction ``eps = (x - D) / sigma`` for Euler (as the reference's DDIM code does: the jump is
``x_b = x_a + (s_b - s_a) eps_f``), the data prediction ``D`` for DPM-Solver++ (its multistep history
is the substituted predictions at the previous anchors). The first step is a plain step, and a last
single step (b = a + 1) is a plain step with a fresh evaluation, as in the reference.

Variants ``kKhH`` are the paper's PFDiff-K_H: a jump covers K+1 grid steps, the springboard is H
steps ahead (H <= K). **Exact NFE** for T steps: ``1 + ceil((T - 1) / (K + 1))`` (one per anchor);
for a given NFE the grid has ``T = (K+1) NFE - K`` steps (the reference's rule, every jump full).
The solver evaluates only at anchors and springboards: it never visits the other grid points (no
state there; the callback reports the anchors), so methods that need the state at every grid point
(``oss``) refuse it.

From pure noise (``sigmas[0] = inf``): the first step is the base solver's DDIM limit from the
noise-scaled state; its evaluation (at ``lam = -inf``) is reused by no later step, so the next
anchor evaluates plainly (no springboard) and the 2M history starts there.

Reference code vs paper: the reference's DPM-Solver version (singlestep) moves the state to the
springboard and continues from there (the foresight jump from x_a is commented out); its DDIM
version and the paper jump from x_a with the future gradient. stepopt follows the paper for both
base solvers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

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
from stepopt.solvers.euler import euler
from stepopt.solvers.registry import SolverIdentity, SolverSpec, register

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

VARIANTS = ("k1h1", "k2h1", "k2h2", "k3h1", "k3h2", "k3h3")


def parse_variant(variant: str | None) -> tuple[int, int]:
    """``'kKhH'`` -> (K, H).

    >>> parse_variant("k2h1")
    (2, 1)
    """
    if variant not in VARIANTS:
        raise ValueError(f"pfdiff variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    assert variant is not None
    k, h = variant[1:].split("h")
    return int(k), int(h)


def anchors(n_steps: int, k: int) -> list[int]:
    """Grid indices where the wrapped solver stands: 0, 1, then every k+1 steps, ending at N.

    >>> anchors(9, 1)
    [0, 1, 3, 5, 7, 9]
    >>> anchors(6, 2)
    [0, 1, 4, 6]
    """
    out = [0]
    while out[-1] < n_steps:
        out.append(1 if out[-1] == 0 else min(out[-1] + k + 1, n_steps))
    return out


class _Foresight:
    """The denoiser the base solver sees on the anchor grid: past springboard, future evaluation."""

    def __init__(
        self,
        denoiser: Denoiser,
        sig: torch.Tensor,
        msig: torch.Tensor,
        nodes: list[int],
        h: int,
        reuse: str,
    ) -> None:
        self.denoiser, self.sig, self.msig, self.nodes, self.h, self.reuse = denoiser, sig, msig, nodes, h, reuse
        self.calls = 0
        self.past: torch.Tensor | None = None  # eps (reuse == "eps") or D of the last evaluation

    def _grad(self, x: torch.Tensor, d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return scalar(1 / s, x) * (x - d) if self.reuse == "eps" else d

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        m = self.calls
        self.calls += 1
        a, b = self.nodes[m], self.nodes[m + 1]
        sa = self.sig[a]
        if m == 0 or b - a == 1 or self.past is None:
            d = denoise(self.denoiser, x, self.msig[a], cond)
            # The gradient at sigma = inf is reused by no later step (the next anchor evaluates plainly).
            self.past = None if bool(torch.isinf(sa.detach())) else self._grad(x, d, sa)
            return d
        f = a + min(self.h, b - a - 1)
        sf = self.sig[f]
        # Past: the springboard x_f by a first-order step from x_a with the previous gradient.
        if self.reuse == "eps":
            x_f = x + scalar(sf - sa, x) * self.past
        else:
            x_f = self.past + scalar(sf / sa, x) * (x - self.past)
        # Future: one evaluation there; it stands in for the evaluation at the anchor.
        g = denoise(self.denoiser, x_f, self.msig[f], cond)
        self.past = self._grad(x_f, g, sf)
        if self.reuse == "eps":
            return x - scalar(sa, x) * self.past  # the D for which (x_a - D) / s_a = eps_f
        return g


def _pfdiff(
    base: Callable[..., torch.Tensor],
    reuse: str,
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    variant: str,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    **base_opts: Any,
) -> torch.Tensor:
    k, h = parse_variant(variant)
    sig = as_grid(sigmas, x)
    msig = sig if model_sigmas is None else as_grid(model_sigmas, x)
    check_grid(sig, msig)
    nodes = anchors(sig.shape[0] - 1, k)
    proxy = _Foresight(denoiser, sig, msig, nodes, h, reuse)
    idx = torch.tensor(nodes, device=sig.device)

    def relay(info: dict[str, Any]) -> None:
        if callback is not None:
            callback({**info, "i": nodes[info["i"] + 1] - 1})

    return base(proxy, x, sig[idx], cond=cond, callback=relay if callback is not None else None, **base_opts)


def pfdiff_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    variant: str = "k1h1",
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """PFDiff on Euler/DDIM (noise-prediction gradients), ``1 + ceil((T-1)/(K+1))`` evaluations."""
    return _pfdiff(
        euler, "eps", denoiser, x, sigmas, variant=variant, model_sigmas=model_sigmas, cond=cond, callback=callback
    )


def pfdiff_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Any,
    *,
    variant: str = "k1h1",
    lower_order_final: bool = True,
    model_sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """PFDiff on DPM-Solver++(2M), ``1 + ceil((T-1)/(K+1))`` evaluations.

    Algorithm 2 of DPM-Solver++ takes, for the step [lam_a, lam_b], the value at its middle of the
    line through the last two data predictions. Here those predictions sit where they were made
    (the springboards, not the anchors): ``D_eff = P(lam_a + h/2)`` with P the line through the last
    two evaluations at their own lam; without skipping this is exactly ``dpmpp-2m``. First-order
    steps (the first, and the last with ``lower_order_final``) use the newest evaluation.
    """
    k, hk = parse_variant(variant)
    sig = as_grid(sigmas, x)
    msig = sig if model_sigmas is None else as_grid(model_sigmas, x)
    check_grid(sig, msig)
    lam = -torch.log(sig)
    inf0 = pure_noise(sig)
    nodes = anchors(sig.shape[0] - 1, k)
    n = len(nodes) - 1
    evals: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lam, D) of the last two evaluations, newest first
    for s in range(n):
        a, b = nodes[s], nodes[s + 1]
        if s == 0 or b - a == 1 or not evals:
            node, x_e = a, x
        else:
            # Past: DDIM springboard with the newest prediction; future: evaluate there.
            node = a + min(hk, b - a - 1)
            d_past = evals[0][1]
            x_e = d_past + scalar(sig[node] / sig[a], x) * (x - d_past)
        d = denoise(denoiser, x_e, msig[node], cond)
        order = step_order(s, n, 2, lower_order_final, from_noise=inf0)
        if s == 0 and inf0:
            # From pure noise: the DDIM limit; the evaluation at lam = -inf enters no later step.
            x = from_noise_ddim(sig[[a, b]], x, d)
        else:
            evals = [(lam[node], d), *evals][:2]
            h = lam[b] - lam[a]
            d_eff = d
            if order == 2 and len(evals) == 2:
                (l0, d0), (l1, d1) = evals
                d_eff = d0 + scalar((lam[a] + h / 2 - l0) / (l0 - l1), x) * (d0 - d1)
            x = scalar(sig[b] / sig[a], x) * x - scalar(torch.expm1(-h), x) * d_eff
        if callback is not None:
            callback({"i": b - 1, "x": x, "denoised": d, "sigma": sig[a], "sigma_next": sig[b], "order": order})
    return x


def nfe_pfdiff(identity: SolverIdentity, n_steps: int) -> int:
    """One evaluation per anchor: ``1 + ceil((T - 1) / (K + 1))`` for T grid steps."""
    k, _ = parse_variant(identity.variant)
    return 1 + math.ceil((n_steps - 1) / (k + 1))


def steps_pfdiff(identity: SolverIdentity, nfe: int) -> int:
    """The grid for a given NFE: ``T = (K + 1) NFE - K`` steps (every jump full, as in the reference)."""
    k, _ = parse_variant(identity.variant)
    return (k + 1) * nfe - k


def _order_euler(identity: SolverIdentity) -> int:
    """Second order when the springboard is the middle of the jump (K1H1, K3H2: a midpoint rule), else first."""
    k, h = parse_variant(identity.variant)
    return 2 if 2 * h == k + 1 else 1


def _order_2m(identity: SolverIdentity) -> int:
    return 2


SPEC_EULER = register(
    SolverSpec(
        name="pfdiff-euler",
        fn=pfdiff_euler,
        orders=(1,),
        default_order=1,
        variants=VARIANTS,
        default_variant="k1h1",
        nfe_rule=nfe_pfdiff,
        steps_rule=steps_pfdiff,
        skips_points=True,
        convergence_order=_order_euler,
        summary="PFDiff on Euler/DDIM (Wang et al. 2024): past + future gradients, 1 + ceil((N-1)/(K+1)) evaluations",
    )
)

SPEC_2M = register(
    SolverSpec(
        name="pfdiff-dpmpp-2m",
        fn=pfdiff_dpmpp_2m,
        orders=(2,),
        default_order=2,
        variants=VARIANTS,
        default_variant="k1h1",
        has_lower_order_final=True,
        default_lower_order_final=True,
        nfe_rule=nfe_pfdiff,
        steps_rule=steps_pfdiff,
        skips_points=True,
        convergence_order=_order_2m,
        summary="PFDiff on DPM-Solver++(2M) (Wang et al. 2024): 1 + ceil((N-1)/(K+1)) evaluations",
    )
)
