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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from stepopt.errors import StepoptError
from stepopt.registry import Registry

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
    kind: Literal["ode-error", "fd-exact", "fidelity"]
    base: str | None = None
    extractor: str | None = None


METRICS: Registry[MetricRequest] = Registry("metric")


def register_metric(metric: MetricRequest) -> MetricRequest:
    return METRICS.register(metric.name, metric)


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
    "METRIC_NAMES",
    "ODE_ERROR",
    "MetricRequest",
    "parse_metrics",
    "register_metric",
]
