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
