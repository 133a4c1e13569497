"""Optimizers on a flow model that starts from pure noise (``builtin:gmm-digits-flow``)."""

from __future__ import annotations

import math

import numpy as np
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
    cfg = Ld3Config(n_train=4, n_valid=4, grid_rounds=1, joint_rounds=0, init="time-uniform", keep_best="off")
    s = optimize("ld3", flow, get_solver("euler").identity(), 5, cfg, final_step="denoise")
    # final_step denoise: the last node is learned (tests/test_last_node.py), at or above sigma_min.
    assert s.sigmas[0] == math.inf and s.sigmas[-1] >= flow.sigma_min and s.model.shift == 3.0
    assert s.method.config["report"]["last_node"] == "free"
    assert s.model_sigmas is None or s.model_sigmas[0] == math.inf
    obj = s.method.objective
    assert obj is not None and math.isfinite(obj["final"]) and obj["final"] <= obj["initial"]
    assert Schedule.from_yaml(s.to_yaml()) == s


AYS_FAST = {"samples": 64, "klub_samples": 128, "val_noises": 16, "data_size": 512, "candidates": 5}


def test_ays_from_pure_noise_keeps_inf_and_lowers_the_klub(flow: GaussianMixtureFlow) -> None:
    """The KLUB's top term to sigma = inf (stepopt.optimizers.klub), candidates for sigma_1 up to sigma_top."""
    euler = get_solver("euler").identity()
    # The paper's EDM start (inf, then edm from sigma_top), no early stopping: the KLUB search moves sigma_1.
    cfg = AYSConfig(**AYS_FAST, init="auto", hierarchy=False, early_stopping=False, max_sweeps=1)
    s = optimize("ays", flow, euler, 5, cfg, final_step="denoise")
    assert s.sigmas[0] == math.inf and s.sigmas[-1] == flow.sigma_min and s.final_step == "denoise"
    start = s.method.config["report"]["candidates"]["start"]["sigmas"]
    assert start[0] == math.inf and start[1] == pytest.approx(999 * 3.0)  # edm from inf: sigma_top = 999 s
    assert math.isfinite(s.sigmas[1]) and s.sigmas[1] < start[1]
    obj = s.method.objective
    assert math.isfinite(obj["initial"]) and obj["final"] < obj["initial"]
    assert Schedule.from_yaml(s.to_yaml()) == s
    # Defaults (best start, early stopping): never worse than any baseline on the stopping measure.
    s = optimize("ays", flow, euler, 5, AYSConfig(**AYS_FAST, max_sweeps=1, hierarchy=False), final_step="denoise")
    rep = s.method.config["report"]
    assert s.sigmas[0] == math.inf and rep["init"] == min(rep["start_candidates"], key=rep["start_candidates"].get)
    assert s.method.objective["selection_final"] <= min(rep["start_candidates"].values())


def test_ays_hierarchy_from_pure_noise(flow: GaussianMixtureFlow) -> None:
    """Subdividing [sigma_1, inf) takes the midpoint in flow time (sigma = 2 sigma_1 + 1); other step counts are
    inf followed by the finite part interpolated."""
    from stepopt.baselines import interpolate_loglinear
    from stepopt.optimizers.ays import subdivide

    grid = subdivide(np.array([math.inf, 3.0, 0.5]), flow.frame)
    np.testing.assert_allclose(grid, [math.inf, 7.0, 3.0, math.sqrt(1.5), 0.5], rtol=1e-15)
    assert flow.frame.time(7.0) == pytest.approx((flow.frame.time(3.0) + 1) / 2, rel=1e-15)
    cfg = AYSConfig(**AYS_FAST, max_sweeps=1, direct=False)
    s = optimize("ays", flow, get_solver("euler").identity(), 7, cfg, final_step="denoise")
    rep = s.method.config["report"]
    assert [lv["steps"] for lv in rep["levels"]] == [10, 20, 40]
    kept40 = rep["levels"][-1]["history"][rep["levels"][-1]["sweep_kept"]]["sigmas"]
    assert kept40[0] == math.inf
    hier = rep["candidates"]["hierarchy"]["sigmas"]
    np.testing.assert_allclose(hier, interpolate_loglinear(kept40, 6), rtol=1e-15)  # 7 NFE = 6 steps + denoise
    assert hier[0] == math.inf and np.all(np.diff(hier[1:]) < 0)


@pytest.mark.slow
def test_ays_beats_the_flow_default_against_the_exact_ode(flow: GaussianMixtureFlow) -> None:
    """Default config, euler, NFE 10 (9 steps + denoise) on gmm-digits-flow (shift 3): RMSE against the exact ODE's
    denoised endpoint on seeds 0..199 (disjoint from the stopping and held-out seeds). Measured: ays 0.1015 (its
    start, time-uniform from inf: the KLUB search found no better grid on the stopping seeds) vs flow-default 0.1207."""
    from stepopt.build import baseline_schedule
    from stepopt.teacher import GridValidator

    euler = get_solver("euler").identity()
    s = optimize("ays", flow, euler, 10, AYSConfig(), final_step="denoise")
    test = GridValidator(flow, euler, range(200), final_step="denoise", sigma_to=flow.sigma_min)
    default = baseline_schedule("flow-default", flow, euler, 9, final_step="denoise")
    assert test.rmse(s.sigmas) < 0.9 * test.rmse(default.sigmas), s.method.objective


# trust-region from pure noise ----------------------------------------------------------------------
# Where the numbers come from: the torch solvers' own coefficients on grids from inf
# (``measured_step_weights``), the velocity error model written out here from t and sigma_t, and the
# bound with a finite lam_0 = -L (the paper's construction, no limit taken) as L grows.

FROM_NOISE_IDS = [
    get_solver("euler").identity(),
    get_solver("dpmpp-2m").identity(),
    get_solver("dpmpp-3m").identity(),
    get_solver("dpmpp-3m").identity(variant="exact"),
    get_solver("dpmpp-3m").identity(lower_order_final=False),
    get_solver("unipc").identity(),
    get_solver("unipc").identity(order=2, variant="bh1"),
]


@pytest.mark.parametrize("ident", FROM_NOISE_IDS, ids=lambda i: f"{i.name}-{i.order}-{i.variant}-{i.lower_order_final}")
def test_from_noise_weights_are_the_solvers_measured_coefficients(ident) -> None:
    """weights: solver from pure noise = the torch solver's coefficient of each evaluation on a grid from inf."""
    from stepopt.optimizers.trust_region.bound import from_noise_weights
    from stepopt.solvers.linear import measured_step_weights, step_weights

    sig = np.array([math.inf, 40.0, 9.0, 2.5, 0.8, 0.2, 0.03])
    lam = -np.log(sig)
    w, nodes = from_noise_weights(step_weights, trapezoid=ident.name == "unipc")(ident, lam[None])
    wm, nodes_m = measured_step_weights(ident, sig)
    assert list(nodes) == list(nodes_m)
    np.testing.assert_allclose(w[0], wm, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m", "dpmpp-3m", "unipc"])
def test_paper_weights_converge_to_their_pure_noise_limit(name: str) -> None:
    """The paper's Lagrange weights with lam_0 = -L tend to the limit (D_0 weighs rho_1 in step 0, nothing after)."""
    from stepopt.optimizers.trust_region.bound import from_noise_weights, lagrange_weights

    ident = get_solver(name).identity()
    finite = -np.log(np.array([30.0, 6.0, 1.5, 0.4, 0.05, 0.002]))
    lim, _ = from_noise_weights(lagrange_weights, trapezoid=False)(ident, np.concatenate(([-math.inf], finite))[None])
    errs = []
    for big in (10.0, 20.0, 30.0):
        w, _ = lagrange_weights(ident, np.concatenate(([-big], finite))[None])
        errs.append(np.abs(w[0] - lim[0]).max())
    # The vanishing Lagrange factors go like 1/L; the DDIM part exactly like e^{-L}.
    assert errs[2] < errs[1] < errs[0] and errs[2] < 0.5 * np.abs(lim).max() * 30.0 / 30.0**2


def test_velocity_error_model_and_its_limit() -> None:
    """eps = t sigma_t^(p-1) = (1 - t) x the paper's sigma_t^p / alpha_t; finite (1) at lam = -inf."""
    from stepopt.optimizers.trust_region import error_model

    lam = np.array([-30.0, -3.0, -0.5, 0.0, 1.0, 4.0])
    for p in (1.0, 2.5):
        t = 1.0 / (1.0 + np.exp(lam))
        alpha = 1.0 / np.sqrt(1.0 + np.exp(-2 * lam))
        sigma_t = 1.0 / np.sqrt(1.0 + np.exp(2 * lam))
        eps, deps = error_model(lam, p, "velocity")
        np.testing.assert_allclose(eps, t * sigma_t ** (p - 1), rtol=1e-12)
        one_minus_t = np.exp(lam) / (1.0 + np.exp(lam))
        np.testing.assert_allclose(eps, one_minus_t * sigma_t**p / alpha, rtol=1e-12)
        h = 1e-6
        fd = (error_model(lam + h, p, "velocity")[0] - error_model(lam - h, p, "velocity")[0]) / (2 * h)
        np.testing.assert_allclose(deps, fd, rtol=1e-6, atol=1e-12)
        e_inf, d_inf = error_model(np.array([-math.inf]), p, "velocity")
        assert e_inf[0] == 1.0 and d_inf[0] == 0.0
        assert math.isinf(error_model(np.array([-math.inf]), p, "noise")[0][0])  # the paper's has no limit


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m", "dpmpp-3m"])
def test_bound_with_finite_start_converges_to_the_pure_noise_bound(name: str) -> None:
    """J and dJ with lam_0 = -L (the paper's bound, velocity error model) converge to the bound from inf."""
    from stepopt.optimizers.trust_region import ErrorBound
    from stepopt.optimizers.trust_region.bound import from_noise_weights, lagrange_weights

    ident = get_solver(name).identity()
    n, lam_end = 6, -math.log(0.002)
    x = -np.log(np.array([8.0, 2.0, 0.7, 0.2, 0.04]))
    for tau in (n - 2, 0):
        limit_weights = from_noise_weights(lagrange_weights, False)
        lim = ErrorBound(ident, n, -math.inf, lam_end, 2.5, tau, limit_weights, "velocity")
        j_inf, g_inf = lim.value_and_grad(x)
        assert math.isfinite(j_inf) and np.all(np.isfinite(g_inf))
        gaps = []
        for big in (10.0, 20.0, 40.0):
            b = ErrorBound(ident, n, -big, lam_end, 2.5, tau, lagrange_weights, "velocity")
            j, g = b.value_and_grad(x)
            gaps.append(abs(j - j_inf) + np.abs(g - g_inf).max())
        assert gaps[2] < gaps[1] < gaps[0] and gaps[2] < 0.05 * j_inf


def test_trust_region_from_pure_noise_gives_a_grid_from_inf(flow: GaussianMixtureFlow) -> None:
    """The default optimizer on a flow model: .inf first, finite decreasing rest, deterministic, file round-trips."""
    from stepopt.optimizers.trust_region import TrustRegionConfig

    for name in ("euler", "dpmpp-2m"):
        ident = get_solver(name).identity()
        s = optimize("trust-region", flow, ident, 6, TrustRegionConfig(), final_step="denoise")
        # final_step denoise: the last evaluated node is free, and the bound moves it off sigma_min.
        assert s.sigmas[0] == math.inf and s.sigmas[-1] > 5 * flow.sigma_min
        assert all(math.isfinite(v) for v in s.sigmas[1:]) and bool(np.all(np.diff(s.sigmas) < 0))
        top = flow.frame.sigma(flow.frame.shift_time(1.0 - 1.0 / 1000))
        assert s.sigmas[1] <= top * (1 + 1e-9)  # the first finite node is a real training level
        obj = s.method.objective
        assert obj is not None and obj["final"] <= obj["initial"]
        assert s.method.config["report"]["error_model"] == {"kind": "velocity", "noise_scale": 3.0}
        assert Schedule.from_yaml(s.to_yaml()) == s
        again = optimize("trust-region", flow, ident, 6, TrustRegionConfig(), final_step="denoise")
        assert again.sigmas == s.sigmas
