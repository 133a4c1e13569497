"""Noise frames: round trips, monotonicity, endpoints, and published sigma tables as independent facts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepopt.errors import StepoptError
from stepopt.frames import EDM, VE, VPCosine, VPDiscrete, VPLinear, ddpm_betas

FRAMES = [
    EDM(),
    VE(),
    VPLinear(),
    VPCosine(),
    VPDiscrete("linear"),
    VPDiscrete("scaled_linear", 1000, 0.00085, 0.012),
    VPDiscrete("squaredcos_cap_v2"),
]
IDS = [f"{f.kind}-{getattr(f, 'beta_schedule', '')}" for f in FRAMES]
AYS_JSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "ays_published.json"


@pytest.mark.parametrize("frame", FRAMES, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(u=st.floats(0.0, 1.0))
def test_round_trip_time_sigma_lam(frame, u):
    t = frame.t_min + u * (frame.t_max - frame.t_min)
    s = frame.sigma(t)
    assert float(frame.time(s)) == pytest.approx(t, rel=1e-9, abs=1e-9 * max(1.0, frame.t_max))
    assert float(frame.sigma(frame.time(s))) == pytest.approx(float(s), rel=1e-9)
    lam = frame.lam(t)
    assert float(lam) == pytest.approx(-math.log(float(s)), rel=1e-12, abs=1e-12)
    assert float(frame.time_from_lam(lam)) == pytest.approx(t, rel=1e-9, abs=1e-9 * max(1.0, frame.t_max))


@pytest.mark.parametrize("frame", FRAMES, ids=IDS)
def test_monotone_and_endpoints(frame):
    t = np.linspace(frame.t_min, frame.t_max, 2001)
    s = np.asarray(frame.sigma(t))
    assert np.all(np.diff(s) > 0), "sigma must increase with native time"
    assert frame.sigma_min == pytest.approx(float(s[0]), rel=1e-12)
    assert frame.sigma_max == pytest.approx(float(s[-1]), rel=1e-12)
    a = np.asarray(frame.alpha(t))
    # VP frames: alpha^2 (1 + sigma^2) = 1, i.e. alpha_t^2 + s_t^2 = 1 with s_t = alpha sigma.
    if frame.kind.startswith("vp"):
        np.testing.assert_allclose(a**2 * (1 + s**2), 1.0, rtol=1e-10)
    else:
        np.testing.assert_array_equal(a, 1.0)


@pytest.mark.parametrize("frame", FRAMES, ids=IDS)
def test_torch_matches_numpy_and_is_differentiable(frame):
    t = np.linspace(frame.t_min, frame.t_max, 37)[1:-1]
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    st_ = frame.sigma(tt)
    np.testing.assert_allclose(st_.detach().numpy(), frame.sigma(t), rtol=1e-12)
    np.testing.assert_allclose(frame.time(st_).detach().numpy(), t, rtol=1e-9, atol=1e-9)
    st_.sum().backward()
    assert tt.grad is not None and torch.all(tt.grad > 0)


def test_vp_linear_closed_forms():
    f = VPLinear()
    # alphabar(1) = exp(-(beta_0 + (beta_1 - beta_0)/2)) = exp(-10.05) (Song et al. 2021, VP SDE).
    assert f.sigma(1.0) == pytest.approx(math.sqrt(math.exp(10.05) - 1), rel=1e-13)
    assert f.alpha(1.0) == pytest.approx(math.exp(-10.05 / 2), rel=1e-13)


def test_ve_endpoints():
    f = VE(sigma_lo=0.01, sigma_hi=50.0)
    assert f.sigma(0.0) == pytest.approx(0.01, rel=1e-14)
    assert f.sigma(1.0) == pytest.approx(50.0, rel=1e-14)
    assert f.sigma(0.5) == pytest.approx(math.sqrt(0.01 * 50.0), rel=1e-14)


def test_vp_cosine_matches_nichol_dhariwal():
    f = VPCosine()
    for t in (0.1, 0.5, 0.9):
        abar = math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
        assert f.sigma(t) == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-12)


def test_betas_match_ddpm_definitions():
    np.testing.assert_allclose(ddpm_betas("linear")[[0, -1]], [1e-4, 0.02])
    b = ddpm_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
    assert np.max(ddpm_betas("squaredcos_cap_v2")) == pytest.approx(0.999)
    with pytest.raises(StepoptError, match="beta_schedule 'foo'"):
        ddpm_betas("foo")


def test_discrete_sigmas_reproduce_published_tables():
    """SD's scaled-linear table at the AYS timesteps gives ComfyUI's high-precision SD1 sigmas, and the
    cosine table at the DeepFloyd-IF timesteps gives the paper's IF list (facts from shared/data)."""
    data = json.loads(AYS_JSON.read_text()) if AYS_JSON.exists() else None
    sd_t = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0]
    sd_sig = [
        14.6146412293, 6.4745760956, 3.8636745985, 2.694615152, 1.8841921177, 1.3943805092,
        0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582,
    ]  # fmt: skip
    if data is not None:
        sd_sig = data["integration_copies"][1]["entries"]["SD1"]["values"]
    f = VPDiscrete("scaled_linear", 1000, 0.00085, 0.012)
    # ComfyUI computes the table in float64, stepopt as diffusers in float32 (its cumulative product
    # drifts by up to 1.3e-5 relative at t = 0).
    np.testing.assert_allclose(f.sigma(np.array(sd_t, dtype=float)), sd_sig, rtol=2e-5)
    if_t = [995, 920, 811, 686, 555, 418, 315, 174, 109, 12, 0]
    if_sig = [160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.03, 0.006]
    got = VPDiscrete("squaredcos_cap_v2").sigma(np.array(if_t, dtype=float))
    np.testing.assert_allclose(got, if_sig, rtol=0.08)  # the paper rounds to 3-4 significant digits
    np.testing.assert_allclose(got[:9], if_sig[:9], rtol=6e-3)


def test_discrete_interpolates_log_sigma_linearly():
    f = VPDiscrete("linear")
    s10, s11 = f.sigma(10.0), f.sigma(11.0)
    assert f.sigma(10.5) == pytest.approx(math.sqrt(s10 * s11), rel=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_discrete_table_is_diffusers_float32_table(kw):
    """The sigma table at integer timesteps is bit for bit the one diffusers' schedulers use."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, **kw)
    a = sched.alphas_cumprod
    theirs = (((1 - a) / a) ** 0.5).to(torch.float64).numpy()
    f = VPDiscrete(num_train_timesteps=1000, **kw)
    assert np.array_equal(f.sigma_table, theirs)
    t = np.array([999.0, 500.0, 3.0, 0.0])
    np.testing.assert_allclose(f.sigma(t), theirs[[999, 500, 3, 0]], rtol=1e-15)
    assert f.sigma_max == pytest.approx(theirs[-1], rel=1e-15) and f.sigma_min == pytest.approx(theirs[0], rel=1e-15)


def test_integer_grid_rounds_like_diffusers_and_keeps_nodes_apart():
    f = VPDiscrete("linear")
    tab = f.sigma_table
    # A node exactly between timesteps 499 and 500 in log sigma: ties to even (numpy's round, as
    # diffusers rounds its timesteps), so 500; 500.5 goes to 500 too.
    mid = lambda i: float(np.sqrt(tab[i] * tab[i + 1]))  # noqa: E731
    ts, sig = f.integer_grid([tab[999], mid(499), tab[0]])
    assert ts.tolist() == [999, 500, 0] and np.array_equal(sig, tab[[999, 500, 0]])
    assert f.integer_grid([tab[999], mid(500), tab[0]])[0].tolist() == [999, 500, 0]
    assert f.integer_grid([tab[999], mid(501), tab[0]])[0].tolist() == [999, 502, 0]
    # Collisions are pushed apart, the grid stays strictly decreasing and within [0, T-1].
    crowd = [tab[999], f.sigma(998.6), f.sigma(998.7), f.sigma(998.8), f.sigma(0.3), f.sigma(0.2), tab[0]]
    assert f.integer_grid(crowd)[0].tolist() == [999, 998, 997, 996, 2, 1, 0]
    with pytest.raises(StepoptError, match="integer timesteps"):
        f.integer_grid(np.geomspace(tab[-1], tab[0], 1001))
