"""The solver registry: each solver's identity, allowed options and exact NFE rule (see the README, "Solvers").

A solver is a pure function ``(denoiser, x, sigmas, *, model_sigmas=None, cond=None,
callback=None, **options) -> x`` in the sigma frame. Its *identity* (name, order, variant,
lower-order policy) is what a schedule is optimized for; a schedule file records it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepopt.errors import StepoptError
from stepopt.registry import Registry

FINAL_STEPS = ("none", "denoise")


@dataclass(frozen=True)
class SolverIdentity:
    """What a schedule is valid for: the registry name plus every option that changes the output."""

    name: str
    order: int
    variant: str | None = None
    lower_order_final: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "order": self.order,
            "variant": self.variant,
            "lower_order_final": self.lower_order_final,
        }

    def __str__(self) -> str:
        parts = [f"{self.name}", f"order={self.order}"]
        if self.variant is not None:
            parts.append(f"variant={self.variant}")
        if self.lower_order_final is not None:
            parts.append(f"lower_order_final={str(self.lower_order_final).lower()}")
        return " ".join(parts)


# (identity, number of steps N, final_step) -> exact number of network evaluations.
NfeRule = Callable[[SolverIdentity, int], int]


LinearWeightsFn = Callable[[SolverIdentity, np.ndarray], tuple[np.ndarray, np.ndarray]]


def nfe_one_per_step(identity: SolverIdentity, n_steps: int) -> int:
    """Single-step and multistep solvers: one evaluation per step (N)."""
    return n_steps


@dataclass(frozen=True)
class SolverSpec:
    """A registry entry: the function, the options it accepts and how many evaluations it makes."""

    name: str
    fn: Callable[..., Any]
    orders: tuple[int, ...]
    default_order: int
    variants: tuple[str, ...] = ()
    default_variant: str | None = None
    has_lower_order_final: bool = False
    default_lower_order_final: bool | None = None
    nfe_rule: NfeRule = nfe_one_per_step
    summary: str = ""
    # Global order of accuracy on smoothly varying grids, when it differs from ``identity.order``
    # (UniPC's corrector adds one; fixed-weight iPNDM is second order on non-uniform grids).
    convergence_order: Callable[[SolverIdentity], int] | None = None
    # The solver as a linear map of its evaluations (``stepopt.solvers.linear``): for a batch of
    # grids lam (B, N+1) the weight of each evaluation D_e in each step, (B, N, M), and the grid
    # node whose sigma each evaluation uses, (M,). Real or complex lam (complex-step derivatives).
    linear_weights: LinearWeightsFn | None = None
    # Where several step counts give one NFE (timestep skipping): the N to use for an NFE (without
    # the final denoise). None: the only N with that NFE.
    steps_rule: Callable[[SolverIdentity, int], int] | None = None
    # True for solvers that jump over grid points (no state there; the callback reports fewer steps).
    skips_points: bool = False

    def identity(
        self,
        order: int | None = None,
        variant: str | None = None,
        lower_order_final: bool | None = None,
    ) -> SolverIdentity:
        """Resolve options to a full identity, with a clear error for each invalid one."""
        order = self.default_order if order is None else int(order)
        if order not in self.orders:
            raise StepoptError(
                f"solver '{self.name}' does not support order {order}; "
                f"expected one of {', '.join(map(str, self.orders))}"
            )
        if self.variants:
            variant = self.default_variant if variant is None else variant
            if variant not in self.variants:
                raise StepoptError(
                    f"solver '{self.name}' has no variant '{variant}'; expected one of {', '.join(self.variants)}"
                )
        elif variant is not None:
            raise StepoptError(f"solver '{self.name}' takes no variant (got '{variant}')")
        if self.has_lower_order_final:
            lof = self.default_lower_order_final if lower_order_final is None else lower_order_final
        else:
            if lower_order_final is not None:
                raise StepoptError(
                    f"solver '{self.name}' has no lower-order-final policy (got lower_order_final={lower_order_final})"
                )
            lof = None
        return SolverIdentity(self.name, order, variant, lof)

    def global_order(self, identity: SolverIdentity) -> int:
        """The declared global convergence order of ``identity`` (what the contract suite measures)."""
        return identity.order if self.convergence_order is None else self.convergence_order(identity)

    def nfe(self, identity: SolverIdentity, n_steps: int, final_step: str = "none") -> int:
        """Exact evaluations for N steps, plus one for a final denoising jump."""
        if final_step not in FINAL_STEPS:
            raise StepoptError(f"final_step '{final_step}' is invalid; expected one of {', '.join(FINAL_STEPS)}")
        return self.nfe_rule(identity, n_steps) + (1 if final_step == "denoise" else 0)

    def steps_for_nfe(self, identity: SolverIdentity, nfe: int, final_step: str = "none") -> int:
        """The number of steps N whose NFE is exactly ``nfe``; an error naming the nearest ones."""
        if self.steps_rule is not None:
            extra = 1 if final_step == "denoise" else 0
            n = self.steps_rule(identity, nfe - extra) if nfe - extra >= 1 else 0
            if n >= 1 and self.nfe(identity, n, final_step) == nfe:
                return n
        for n in range(1, nfe + 1):
            if self.nfe(identity, n, final_step) == nfe:
                return n
        possible = [self.nfe(identity, n, final_step) for n in range(1, nfe + 2)]
        near = sorted({p for p in possible if abs(p - nfe) <= 2})
        raise StepoptError(
            f"solver '{self.name}' cannot make exactly NFE {nfe}"
            + (f"; nearest possible: {', '.join(map(str, near))}" if near else "")
        )


SOLVERS: Registry[SolverSpec] = Registry("solver", sort=True)


def register(spec: SolverSpec) -> SolverSpec:
    return SOLVERS.register(spec.name, spec)


def get_solver(name: str) -> SolverSpec:
    """The registry entry for ``name``; an error listing the known names otherwise."""
    return SOLVERS.get(name)


def solver_names() -> list[str]:
    return SOLVERS.names()


def all_solvers() -> list[SolverSpec]:
    return SOLVERS.values()
