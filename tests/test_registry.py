"""One registry shape for every extension point; model loaders receive one options object."""

from __future__ import annotations

import doctest

import pytest
import torch

import stepopt.registry
from stepopt.baselines import BASELINE_SPECS, BASELINES
from stepopt.errors import StepoptError
from stepopt.metrics import (
    METRIC_KINDS,
    METRIC_NAMES,
    METRICS,
    EvalContext,
    MetricKind,
    MetricRequest,
    register_metric,
    register_metric_kind,
)
from stepopt.models import (
    BUILTINS,
    LOADERS,
    DiffusionModel,
    LoadOptions,
    builtin_names,
    load_model,
    register_loader,
)
from stepopt.optimizers import OPTIMIZERS, optimizer_names
from stepopt.registry import Registry
from stepopt.solvers import solver_names
from stepopt.solvers.registry import SOLVERS
from stepopt.trust import CODE_LOADERS


def test_registry_doctest() -> None:
    assert doctest.testmod(stepopt.registry).failed == 0


def test_registry_names_errors_and_duplicates() -> None:
    reg: Registry[int] = Registry("widget", sort=True)
    assert reg.names() == []
    with pytest.raises(StepoptError, match=r"unknown widget 'a'; expected one of \(none registered\)"):
        reg.get("a")
    reg.register("b", 2)
    reg.register("a", 1)
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert reg.items() == [("a", 1), ("b", 2)] and reg.values() == [1, 2]
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a", 3)
    with pytest.raises(StepoptError, match="unknown widget 'c'; expected one of a, b"):
        reg.get("c")
    assert reg.unregister("a") == 1 and "a" not in reg


def test_registry_imports_its_modules_on_first_lookup() -> None:
    reg: Registry[int] = Registry("thing", modules=["stepopt.no_such_module_for_this_test"])
    with pytest.raises(ModuleNotFoundError):
        reg.names()
    with pytest.raises(ModuleNotFoundError):  # a failed import is retried, not silently skipped
        reg.names()


def test_every_extension_point_is_a_registry() -> None:
    for reg in (SOLVERS, OPTIMIZERS, LOADERS, BUILTINS, METRICS, METRIC_KINDS, BASELINE_SPECS):
        assert isinstance(reg, Registry)
    assert solver_names() == SOLVERS.names() and "dpmpp-2m" in SOLVERS
    assert optimizer_names() == OPTIMIZERS.names() and {"ays", "ld3", "trust-region"} <= set(OPTIMIZERS.names())
    assert {"builtin", "edm", "diffusers", "python"} <= set(LOADERS.names())
    assert builtin_names() == [f"builtin:{n}" for n in BUILTINS.names()]
    assert METRIC_NAMES == tuple(METRICS.names()) and BASELINES == tuple(BASELINE_SPECS.names())
    assert {m.kind for m in METRICS.values()} == set(METRIC_KINDS.names())  # every metric has its kind
    assert set(CODE_LOADERS) <= set(LOADERS.names())  # the loaders the trust check names exist


class _Probe(DiffusionModel):
    parameterization = "edm"
    id = "probe:x"
    fingerprint = "probe"
    sigma_min, sigma_max, shape = 0.002, 80.0, (1, 2, 2)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: object) -> torch.Tensor:
        return x


def test_a_registered_loader_receives_one_options_object() -> None:
    seen: list[tuple[str, LoadOptions]] = []

    def load(arg: str, options: LoadOptions) -> DiffusionModel:
        seen.append((arg, options))
        return _Probe()

    register_loader("probe", load, "a test loader")
    try:
        assert isinstance(load_model("probe:abc", device="cpu", dtype=torch.float16, trust_code=True), _Probe)
        assert isinstance(load_model("probe:x", trust_pickle=True), _Probe)  # the old name of trust_code
    finally:
        LOADERS.unregister("probe")
    assert seen == [
        ("abc", LoadOptions(torch.device("cpu"), torch.float16, trust_code=True)),
        ("x", LoadOptions(torch.device("cpu"), None, trust_code=True)),
    ]
    with pytest.raises(StepoptError, match="unknown model loader 'probe' in 'probe:x'; expected one of builtin"):
        load_model("probe:x")


SEEN: list[str] = []


class _MeanAbs:
    """A metric kind for the test: the mean absolute sample; what it is asked is logged in SEEN."""

    def __init__(self, requests: list[MetricRequest], ctx: EvalContext) -> None:
        self.requests, self.n = requests, ctx.config.n
        SEEN.append(f"setup {len(ctx.schedules)}")

    def prepare(self) -> None:
        SEEN.append("prepare")

    def compute(self, schedule, samples):  # type: ignore[no-untyped-def]
        SEEN.append(f"compute {schedule.nfe}")
        return [(r.name, float(samples.abs().mean()), {"what": "mean |x|"}) for r in self.requests]


def test_eval_computes_a_registered_metric_kind(tmp_path) -> None:
    """``evaluate`` computes every metric through its kind's registry entry: a new kind is a new metric."""
    from stepopt.build import baseline_schedule
    from stepopt.evaluate import EvalConfig, evaluate
    from stepopt.models import IsotropicGaussian
    from stepopt.sampling import sample_schedule
    from stepopt.solvers import get_solver

    model = IsotropicGaussian(torch.zeros(1, 2, 2, dtype=torch.float64), c=0.5)
    items = []
    for nfe in (3, 2):
        s = baseline_schedule("logsnr", model, get_solver("euler").identity(), nfe)
        items.append((str(tmp_path / f"s{nfe}.yaml"), s))
    register_metric(MetricRequest("mean-abs", "test-mean-abs"))
    register_metric_kind(MetricKind("test-mean-abs", _MeanAbs))
    try:
        rows = evaluate(items, "mean-abs,ode-error", model, EvalConfig(n=4, cache=False))
    finally:
        METRICS.unregister("mean-abs")
        METRIC_KINDS.unregister("test-mean-abs")
    assert SEEN == ["setup 2", "prepare", "compute 2", "compute 3"]  # rows by NFE
    assert [r.schedule.nfe for r in rows] == [2, 3]
    for row in rows:
        want = float(sample_schedule(model, row.schedule, range(4)).abs().mean())
        assert list(row.metrics) == ["mean-abs", "ode-error"]  # in request order
        assert row.metrics["mean-abs"] == want
        assert row.settings["mean-abs"]["what"] == "mean |x|" and row.settings["mean-abs"]["n"] == 4
    assert "mean-abs" not in METRICS and "test-mean-abs" not in METRIC_KINDS
