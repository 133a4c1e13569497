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
METRIC_NAMES: tuple[str, ...] = (
    ODE_ERROR,
    FD_EXACT,
    *FIDELITY_BASE,
    *(f"{b}{DIGITS_SUFFIX}" for b in FIDELITY_BASE),
)


@dataclass(frozen=True)
class MetricRequest:
    """One requested metric: its CLI name, its kind, and for torch-fidelity metrics the base and extractor.

    ``extractor`` None means the extractor chosen by ``--feature-extractor``.
    """

    name: str
    kind: Literal["ode-error", "fd-exact", "fidelity"]
    base: str | None = None
    extractor: str | None = None


def parse_metrics(spec: str | Sequence[str]) -> list[MetricRequest]:
    """``"ode-error,fid-digits"`` (or a list of such strings) -> requests, in order, without duplicates."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise StepoptError(f"--metrics is empty; expected some of {', '.join(METRIC_NAMES)}")
    out: list[MetricRequest] = []
    for n in dict.fromkeys(names):
        if n not in METRIC_NAMES:
            raise StepoptError(f"unknown metric '{n}'; expected some of {', '.join(METRIC_NAMES)}")
        if n in (ODE_ERROR, FD_EXACT):
            out.append(MetricRequest(n, n))  # type: ignore[arg-type]
        elif n.endswith(DIGITS_SUFFIX):
            out.append(MetricRequest(n, "fidelity", n.removesuffix(DIGITS_SUFFIX), DIGITS_EXTRACTOR))
        else:
            out.append(MetricRequest(n, "fidelity", n, None))
    return out


__all__ = [
    "DIGITS_EXTRACTOR",
    "FD_EXACT",
    "INCEPTION_EXTRACTOR",
    "MANAGED_FIDELITY_OPTIONS",
    "METRIC_NAMES",
    "ODE_ERROR",
    "MetricRequest",
    "parse_metrics",
]
