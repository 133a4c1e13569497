"""Evaluation metrics for schedules: names, parsing, and where each is computed.

This package module is light (no torch-fidelity import); the submodules do the work.

==============  ========================================================================  ===========
name            what                                                                      module
==============  ========================================================================  ===========
``ode-error``   RMSE and max abs error against the teacher from the same noise            ode_error
``fd-exact``    Fréchet distance to the exact marginal of an analytic model (gmm-digits)  exact
``fid``         FID by torch-fidelity with ``--feature-extractor`` (Inception default)    fidelity
``kid``         KID (mean, std) by torch-fidelity                                          fidelity
``isc``         Inception Score (mean, std) by torch-fidelity (no reference needed)        fidelity
``prc``         precision, recall, F-score by torch-fidelity                               fidelity
``*-digits``    ``fid-digits``, ``kid-digits``, ``isc-digits``, ``prc-digits``: the same,   fidelity
                with the digits classifier ``stepopt-digits-cnn`` and the real digits
==============  ========================================================================  ===========

A metric's ``kind`` names its entry in :data:`METRIC_KINDS` (one :class:`MetricKind` per kind,
registered by the kind's module: ``ode-error`` in :mod:`.ode_error`, ``fd-exact`` in :mod:`.exact`,
``fidelity`` in :mod:`.fidelity`), which is how ``stepopt eval`` computes it
(:func:`stepopt.evaluate.evaluate`): each requested kind's ``setup`` runs before any sampling (and
refuses what cannot be computed), its computer's ``prepare`` next (the teacher of ``ode-error``),
then ``compute`` once per schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from stepopt.errors import StepoptError
from stepopt.registry import Registry

if TYPE_CHECKING:
    import torch

    from stepopt.evaluate import EvalConfig
    from stepopt.models.base import DiffusionModel
    from stepopt.schedule import Schedule

ODE_ERROR = "ode-error"
FD_EXACT = "fd-exact"
FIDELITY_BASE = ("fid", "kid", "isc", "prc")
DIGITS_SUFFIX = "-digits"
DIGITS_EXTRACTOR = "stepopt-digits-cnn"
INCEPTION_EXTRACTOR = "inception-v3-compat"
# torch-fidelity options that ``stepopt eval`` sets from its own flags (not through --fidelity-set).
MANAGED_FIDELITY_OPTIONS = (
    "isc",
    "fid",
    "kid",
    "prc",
    "feature_extractor",
    "feature_extractor_weights_path",
    "batch_size",
    "cuda",
    "cache",
    "cache_root",
    "input2_cache_name",
)


@dataclass(frozen=True)
class MetricRequest:
    """A metric (an entry of :data:`METRICS`): its CLI name, its kind, and for torch-fidelity metrics
    the base metric and the feature extractor.

    ``extractor`` None means the extractor chosen by ``--feature-extractor``.
    """

    name: str
    kind: str
    base: str | None = None
    extractor: str | None = None


@dataclass
class EvalContext:
    """What a metric kind may use in one evaluation: the model, the evaluation's options, the
    device, every schedule in row order and the progress callback."""

    model: DiffusionModel
    config: EvalConfig
    device: torch.device
    schedules: Sequence[Schedule]
    progress: Callable[[str, Mapping[str, Any]], None] | None = None


class MetricComputer(Protocol):
    """One evaluation's computer of one kind's requested metrics."""

    def prepare(self) -> None:
        """Work shared by every row, after every kind's setup and before the first sample."""

    def compute(self, schedule: Schedule, samples: torch.Tensor) -> list[tuple[str, Any, dict[str, Any]]]:
        """``(metric name, value, settings)`` for each requested metric of one schedule's samples."""
        ...


@dataclass(frozen=True)
class MetricKind:
    """How one kind of metric is computed: ``setup(requests, context)`` checks the requests before
    any sampling and returns the computer. Kinds run in ``stage`` order (then in the order of their
    first request); ``main_rank_only`` kinds are computed on rank 0 only under ``torchrun``."""

    name: str
    setup: Callable[[Sequence[MetricRequest], EvalContext], MetricComputer]
    stage: int = 0
    main_rank_only: bool = False


METRICS: Registry[MetricRequest] = Registry("metric")
# The built-in kinds register when their modules are imported, on first lookup.
METRIC_KINDS: Registry[MetricKind] = Registry(
    "metric kind", modules=[f"stepopt.metrics.{m}" for m in ("ode_error", "exact", "fidelity")]
)


def register_metric(metric: MetricRequest) -> MetricRequest:
    return METRICS.register(metric.name, metric)


def register_metric_kind(kind: MetricKind) -> MetricKind:
    return METRIC_KINDS.register(kind.name, kind)


register_metric(MetricRequest(ODE_ERROR, "ode-error"))
register_metric(MetricRequest(FD_EXACT, "fd-exact"))
for _base in FIDELITY_BASE:
    register_metric(MetricRequest(_base, "fidelity", _base, None))
for _base in FIDELITY_BASE:
    register_metric(MetricRequest(f"{_base}{DIGITS_SUFFIX}", "fidelity", _base, DIGITS_EXTRACTOR))
METRIC_NAMES: tuple[str, ...] = tuple(METRICS.names())


def parse_metrics(spec: str | Sequence[str]) -> list[MetricRequest]:
    """``"ode-error,fid-digits"`` (or a list of such strings) -> requests, in order, without duplicates."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise StepoptError(f"`metrics` is empty; expected some of {', '.join(METRICS.names())}")
    for n in names:
        if n not in METRICS:
            raise StepoptError(f"unknown metric '{n}'; expected some of {', '.join(METRICS.names())}")
    return [METRICS.get(n) for n in dict.fromkeys(names)]


__all__ = [
    "DIGITS_EXTRACTOR",
    "FD_EXACT",
    "INCEPTION_EXTRACTOR",
    "MANAGED_FIDELITY_OPTIONS",
    "METRICS",
    "METRIC_KINDS",
    "METRIC_NAMES",
    "ODE_ERROR",
    "EvalContext",
    "MetricComputer",
    "MetricKind",
    "MetricRequest",
    "parse_metrics",
    "register_metric",
    "register_metric_kind",
]
