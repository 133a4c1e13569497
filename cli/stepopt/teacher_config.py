"""The teacher's configuration, importable without torch (optimizer configs nest it).

:class:`TeacherConfig` is re-exported by :mod:`stepopt.teacher`, which computes the teacher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from stepopt.baselines import BASELINES

if TYPE_CHECKING:
    from stepopt.models.base import DiffusionModel


@dataclass(frozen=True)
class TeacherConfig:
    """Many-step teacher for networks (ignored for analytic models, whose teacher is exact)."""

    solver: str = "heun"
    order: int | None = None
    steps: int = 100
    grid: str = "edm"
    rho: float = 7.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"teacher steps must be >= 1, got {self.steps}")
        if self.grid not in BASELINES:
            raise ValueError(f"teacher grid '{self.grid}' is not one of {', '.join(BASELINES)}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self, model: DiffusionModel) -> Any:
        """What a report records as the teacher of ``model`` (analytic models use their exact ODE)."""
        from stepopt.models.base import AnalyticModel

        return "exact ODE" if isinstance(model, AnalyticModel) else self.to_dict()
