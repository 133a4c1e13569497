"""Shared fixtures: the analytic models whose ODE solutions are known exactly."""

from __future__ import annotations

import pytest
import torch

from stepopt.models import GaussianMixture, IsotropicGaussian, PointMass, load_model


@pytest.fixture(scope="session")
def gmm() -> GaussianMixture:
    m = load_model("builtin:gmm-digits", device="cpu")
    assert isinstance(m, GaussianMixture)
    return m


@pytest.fixture(scope="session")
def gaussian() -> IsotropicGaussian:
    mu = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64).reshape(1, 4, 4)
    return IsotropicGaussian(mu, c=0.7)


@pytest.fixture(scope="session")
def point_mass() -> PointMass:
    x0 = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 4, 4)
    return PointMass(x0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Tests never read or write the user's teacher cache: each session gets a fresh one."""
    import os

    old = os.environ.get("STEPOPT_CACHE_DIR")
    os.environ["STEPOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("stepopt-cache"))
    yield
    if old is None:
        os.environ.pop("STEPOPT_CACHE_DIR", None)
    else:
        os.environ["STEPOPT_CACHE_DIR"] = old
