"""The teacher's configuration, importable without torch (optimizer configs nest it).

:class:`TeacherConfig` is re-exported by :mod:`stepopt.teacher`, which computes the teacher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from stepopt.baselines import BASELINES

if TYPE_CHECKING:
    from stepopt.models.base import DiffusionModel
    from stepopt.solvers import SolverIdentity


@dataclass(frozen=True)
class TeacherConfig:
    """Many-step teacher for networks (ignored for analytic models, whose teacher is exact).

    solver, order, variant: the teacher's solver identity (``None``: the solver's default order /
    variant; e.g. ``variant: bh1`` for the UniPC-B(h)=h teacher of LD3's CIFAR-10 configuration).
    steps, grid, rho: its grid, from the range's sigma_max to sigma_min.
    """

    solver: str = "heun"
    order: int | None = None
    steps: int = 100
    grid: str = "edm"
    rho: float = 7.0
    variant: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"teacher steps must be >= 1, got {self.steps}")
        if self.grid not in BASELINES:
            raise ValueError(f"teacher grid '{self.grid}' is not one of {', '.join(BASELINES)}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def cache_key(self) -> dict[str, object]:
        """The settings as the teacher cache keys them: ``variant`` only when set, so the entries cached
        before it existed (the solver's default variant) stay valid."""
        d = self.to_dict()
        if d["variant"] is None:
            del d["variant"]
        return d

    def identity(self) -> SolverIdentity:
        """The teacher's solver identity (an unknown solver, order or variant is a clear error)."""
        from stepopt.solvers import get_solver

        return get_solver(self.solver).identity(self.order, self.variant)

    def describe(self, model: DiffusionModel) -> Any:
        """What a report records as the teacher of ``model`` (analytic models use their exact ODE)."""
        from stepopt.models.base import AnalyticModel

        return "exact ODE" if isinstance(model, AnalyticModel) else self.to_dict()
