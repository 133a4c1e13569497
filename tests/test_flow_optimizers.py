"""Optimizers on a flow model that starts from pure noise (``builtin:gmm-digits-flow``)."""

from __future__ import annotations

import math

import pytest
import torch

from stepopt.errors import StepoptError
from stepopt.models import load_model
from stepopt.models.flow import GaussianMixtureFlow
from stepopt.optimizers import optimize
from stepopt.optimizers.ays import AYSConfig
from stepopt.optimizers.ld3 import Ld3Config, ld3_grid
from stepopt.optimizers.ld3.grid import grid_space
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver


@pytest.fixture(scope="module")
def flow() -> GaussianMixtureFlow:
    m = load_model("builtin:gmm-digits-flow")
    assert isinstance(m, GaussianMixtureFlow)
    return m


def test_ld3_grid_space_is_native_time_from_pure_noise(flow: GaussianMixtureFlow) -> None:
    space = grid_space(Ld3Config(), flow)
    assert space.kind == "time" and space.ends == (0.0, 1.0)
    theta = torch.zeros(6, dtype=torch.float64)
    sig, _ = ld3_grid(theta, None, space)
    assert float(sig[0]) == math.inf and float(sig[-1]) == flow.sigma_min
    t = flow.frame.time(sig[1:].numpy())  # uniform in flow time from t = 1
    assert abs((1.0 - t[0]) - (t[0] - t[1])) < 1e-12
    with pytest.raises(StepoptError, match="space 'lam'"):
        grid_space(Ld3Config(space="lam"), flow)


@pytest.mark.slow
def test_ld3_learns_a_grid_from_pure_noise(flow: GaussianMixtureFlow) -> None:
    """Native-time coordinate (t = 1 is finite), student from the noise itself, teacher the exact ODE from inf."""
    cfg = Ld3Config(n_train=4, n_valid=4, grid_rounds=1, joint_rounds=0, init="time-uniform")
    s = optimize("ld3", flow, get_solver("euler").identity(), 5, cfg, final_step="denoise")
    assert s.sigmas[0] == math.inf and s.sigmas[-1] == flow.sigma_min and s.model.shift == 3.0
    assert s.model_sigmas is None or s.model_sigmas[0] == math.inf
    obj = s.method.objective
    assert obj is not None and math.isfinite(obj["final"]) and obj["final"] <= obj["initial"]
    assert Schedule.from_yaml(s.to_yaml()) == s


def test_ays_says_it_cannot_start_from_pure_noise_yet(flow: GaussianMixtureFlow) -> None:
    with pytest.raises(StepoptError, match="pure noise"):
        optimize("ays", flow, get_solver("euler").identity(), 5, AYSConfig(), final_step="denoise")
