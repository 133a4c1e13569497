"""One registry shape for every extension point; model loaders receive one options object."""

from __future__ import annotations

import doctest

import pytest
import torch

import stepopt.registry
from stepopt.baselines import BASELINE_SPECS, BASELINES
from stepopt.errors import StepoptError
from stepopt.metrics import METRIC_NAMES, METRICS
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
    for reg in (SOLVERS, OPTIMIZERS, LOADERS, BUILTINS, METRICS, BASELINE_SPECS):
        assert isinstance(reg, Registry)
    assert solver_names() == SOLVERS.names() and "dpmpp-2m" in SOLVERS
    assert optimizer_names() == OPTIMIZERS.names() and {"ays", "ld3", "trust-region"} <= set(OPTIMIZERS.names())
    assert {"builtin", "edm", "diffusers", "python"} <= set(LOADERS.names())
    assert builtin_names() == [f"builtin:{n}" for n in BUILTINS.names()]
    assert METRIC_NAMES == tuple(METRICS.names()) and BASELINES == tuple(BASELINE_SPECS.names())
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
