"""Hand-crafted baselines: each satisfies its defining property, computed independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepopt.baselines import BASELINES, baseline_sigmas, interpolate_loglinear, start_sigmas
from stepopt.build import baseline_schedule
from stepopt.errors import StepoptError
from stepopt.frames import EDM, VPDiscrete, VPLinear
from stepopt.models import load_model
from stepopt.solvers import get_solver

HI, LO = 80.0, 0.002


@pytest.mark.parametrize("kind", BASELINES)
@pytest.mark.parametrize("n", [1, 2, 5, 10, 40])
def test_endpoints_exact_and_strictly_decreasing(kind, n):
    s = baseline_sigmas(kind, n, HI, LO, EDM())
    assert len(s) == n + 1 and s[0] == HI and s[-1] == LO
    assert np.all(np.diff(s) < 0)


def test_defining_properties():
    n = 7
    lam = -np.log(baseline_sigmas("logsnr", n, HI, LO))
    np.testing.assert_allclose(np.diff(lam), (math.log(HI) - math.log(LO)) / n, rtol=1e-12)
    r = baseline_sigmas("edm", n, HI, LO, rho=7.0) ** (1 / 7)
    np.testing.assert_allclose(np.diff(r), (LO ** (1 / 7) - HI ** (1 / 7)) / n, rtol=1e-10)
    lin = baseline_sigmas("edm", n, HI, LO, rho=1.0)
    np.testing.assert_allclose(np.diff(lin), (LO - HI) / n, rtol=1e-12)
    at = np.arctan(baseline_sigmas("kl-optimal", n, HI, LO))
    np.testing.assert_allclose(np.diff(at), (math.atan(LO) - math.atan(HI)) / n, rtol=1e-10)
    vp = VPLinear()
    t = vp.time(baseline_sigmas("time-uniform", n, HI, LO, EDM()))
    np.testing.assert_allclose(np.diff(t), (vp.time(LO) - vp.time(HI)) / n, rtol=1e-8)
    tq = np.sqrt(vp.time(baseline_sigmas("time-quadratic", n, HI, LO, EDM())))
    np.testing.assert_allclose(np.diff(tq), (math.sqrt(vp.time(LO)) - math.sqrt(vp.time(HI))) / n, rtol=1e-8)


def test_time_uniform_in_discrete_time_follows_dpm_solver_convention():
    f = VPDiscrete("linear")
    s = baseline_sigmas("time-uniform", 4, f.sigma_max, f.sigma_min, f)
    t = (f.time(s) + 1) / 1000  # DPM-Solver's continuous time of a DDPM index
    np.testing.assert_allclose(np.diff(t), (1 / 1000 - 1.0) / 4, rtol=1e-8)


def test_interpolation():
    grid = baseline_sigmas("edm", 10, HI, LO)
    np.testing.assert_allclose(interpolate_loglinear(grid, 10), grid, rtol=1e-14)
    two = interpolate_loglinear([HI, LO], 4)
    np.testing.assert_allclose(two, baseline_sigmas("logsnr", 4, HI, LO), rtol=1e-12)
    fine = interpolate_loglinear(grid, 20)
    np.testing.assert_allclose(fine[::2], grid, rtol=1e-12)  # old nodes kept, new ones at geometric midpoints
    np.testing.assert_allclose(fine[1::2], np.sqrt(grid[:-1] * grid[1:]), rtol=1e-12)


def test_errors():
    with pytest.raises(StepoptError, match="unknown baseline 'zz'"):
        baseline_sigmas("zz", 3, HI, LO)
    with pytest.raises(StepoptError, match="at least 1 step"):
        baseline_sigmas("edm", 0, HI, LO)
    with pytest.raises(StepoptError, match="rho must be > 0"):
        baseline_sigmas("edm", 3, HI, LO, rho=0)


def test_baseline_schedule_records_identity_and_nfe():
    m = load_model("builtin:gmm-digits")
    ident = get_solver("euler").identity()
    s = baseline_schedule("edm", m, ident, 6, rho=5.0)
    assert s.nfe == 6 and s.method.config == {"rho": 5.0} and s.model.fingerprint == m.fingerprint
    d = baseline_schedule("edm", m, ident, 6, final_step="denoise")
    assert d.nfe == 7


@pytest.mark.parametrize("kind", BASELINES)
def test_start_sigmas_is_the_baseline_on_the_models_range(kind: str) -> None:
    gmm = load_model("builtin:gmm-digits")
    want = baseline_sigmas(kind, 6, gmm.sigma_max, gmm.sigma_min, gmm.frame, rho=5.0)
    assert np.array_equal(start_sigmas(kind, gmm, 6, rho=5.0), want)
