"""The flow frame and pure noise (sigma = inf): frame maps, schedule files that begin at .inf,
the noise-scaled state at sigma = inf, and the analytic models' exact solutions from pure noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stepopt.errors import ScheduleValidationError, StepoptError
from stepopt.frames import Flow, frame_ref_fields
from stepopt.models import GaussianMixture, IsotropicGaussian
from stepopt.sampling import initial_noise, unit_noise
from stepopt.schedule import MethodInfo, ModelRef, Schedule
from stepopt.solvers import SolverIdentity

INF = math.inf
FLOW_REF = ModelRef("builtin:x", "sha256:abc", 0.001, INF, "flow", shift=3.0)
EDM_REF = ModelRef("builtin:x", "sha256:abc", 0.002, 80.0, "sigma")
EULER = SolverIdentity("euler", 1)


def make(sigmas, ref=FLOW_REF, **kw) -> Schedule:
    args = dict(model=ref, solver=EULER, nfe=len(sigmas) - 1, sigmas=sigmas, method=MethodInfo("x"))
    args.update(kw)
    return Schedule(**args)


# -- the frame ---------------------------------------------------------------------------------


def test_flow_frame_maps_t_to_sigma_and_back_with_pure_noise_at_t_1() -> None:
    f = Flow()
    t = np.array([1.0, 0.75, 0.5, 0.25, 1e-3])
    sig = f.sigma(t)
    assert sig[0] == INF and sig[1:].tolist() == pytest.approx([3.0, 1.0, 1 / 3, 1e-3 / (1 - 1e-3)], rel=1e-15)
    np.testing.assert_allclose(f.time(sig), t, rtol=1e-15, atol=0)
    assert float(f.time(INF)) == 1.0 and f.sigma_max == INF
    # torch path: the same values, t = 1 -> inf without a warning
    tt = torch.tensor(t, dtype=torch.float64)
    assert torch.equal(f.sigma(tt), torch.as_tensor(sig))
    np.testing.assert_allclose(np.asarray(f.alpha(t)), 1 - t, rtol=0, atol=0)


def test_shift_multiplies_sigma_and_mu_is_log_shift() -> None:
    u = np.linspace(0.05, 0.95, 7)
    f = Flow(shift=3.0)
    t = f.shift_time(u)
    np.testing.assert_allclose(f.sigma(t), 3.0 * u / (1 - u), rtol=1e-13)
    np.testing.assert_allclose(f.unshift_time(t), u, rtol=1e-14)
    assert f.shift_time(1.0) == 1.0  # pure noise stays pure noise
    g = Flow(mu=math.log(3.0))
    np.testing.assert_allclose(g.shift_time(u), t, rtol=1e-14)
    # diffusers' exponential time_shift with sigma = 1: e^mu / (e^mu + 1/u - 1)
    mu = 0.7
    np.testing.assert_allclose(Flow(mu=mu).shift_time(u), math.exp(mu) / (math.exp(mu) + 1 / u - 1), rtol=1e-14)
    assert frame_ref_fields(g) == {"shift": pytest.approx(3.0), "mu": math.log(3.0)}
    with pytest.raises(StepoptError, match="shift"):
        Flow(shift=0.0)


# -- schedule files ----------------------------------------------------------------------------


def test_a_flow_schedule_begins_at_inf_and_round_trips_exactly() -> None:
    s = make((INF, 3.0, 0.5, 0.001), final_step="denoise", nfe=4)
    text = s.to_yaml()
    assert "sigmas: [.inf, 3.0, 0.5, 0.001]" in text
    assert "sigma_max: .inf" in text and "shift: 3.0" in text and "mu:" not in text
    back = Schedule.from_yaml(text)
    assert back == s and back.to_yaml() == text and back.model.from_pure_noise


def test_other_models_files_do_not_change() -> None:
    text = make((80.0, 1.0, 0.002), ref=EDM_REF).to_yaml()
    assert "shift" not in text and "mu" not in text


@pytest.mark.parametrize(
    ("sigmas", "ref", "fragment"),
    [
        ((80.0, INF, 0.002), EDM_REF, "sigmas[1]"),  # inf only first
        ((INF, 1.0, 0.002), EDM_REF, "no pure-noise point"),  # only for models whose range includes it
        ((INF, INF, 0.002), FLOW_REF, "sigmas[1]"),
        ((3.0, -INF, 0.002), FLOW_REF, "sigmas[1]"),
        ((-INF, 1.0, 0.002), FLOW_REF, "sigmas[0]"),
        ((math.nan, 1.0, 0.002), FLOW_REF, "sigmas[0]"),
    ],
)
def test_inf_is_validated(sigmas, ref, fragment) -> None:
    with pytest.raises(ScheduleValidationError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        make(sigmas, ref=ref)


def test_inf_in_a_file_is_validated_on_load() -> None:
    text = make((INF, 3.0, 0.001)).to_yaml()
    with pytest.raises(ScheduleValidationError, match="sigmas"):
        Schedule.from_yaml(text.replace("[.inf, 3.0, 0.001]", "[3.0, .inf, 0.001]"))
    with pytest.raises(ScheduleValidationError, match=r"model\.sigma_max"):  # only flow models reach pure noise
        Schedule.from_yaml(text.replace("time: flow", "time: sigma").replace("  shift: 3.0\n", ""))
    with pytest.raises(ScheduleValidationError, match=r"model\.shift"):
        Schedule.from_yaml(text.replace("shift: 3.0", "shift: .inf"))
    with pytest.raises(ScheduleValidationError, match="model_sigmas"):
        make((INF, 3.0, 0.001), model_sigmas=(5.0, 3.0, 0.001))
    assert make((INF, 3.0, 0.001), model_sigmas=(INF, 2.0, 0.001)).model_sigmas[0] == INF
    with pytest.raises(ScheduleValidationError, match=r"model\.shift"):
        ModelRef("builtin:x", "sha256:abc", 0.002, 80.0, "sigma", shift=3.0)


def test_the_state_at_pure_noise_is_the_noise_itself(gmm: GaussianMixture) -> None:
    eps = unit_noise(gmm.shape, [3, 4])
    assert torch.equal(initial_noise(gmm, [3, 4], sigma=INF), eps.to(gmm.dtype))


# -- analytic models from pure noise -------------------------------------------------------------


def test_mixture_at_pure_noise_is_the_prior_mean_and_its_ode_from_inf_is_exact() -> None:
    d = 4
    mu = np.linspace(-0.5, 0.5, d)
    one = GaussianMixture(np.ones(1), mu[None], 0.49 * np.eye(d)[None], shape=(d,))
    iso = IsotropicGaussian(torch.tensor(mu), c=0.7)
    y = unit_noise((d,), range(3))
    for s in (10.0, 0.002):  # before and after the switch from rho to log sigma at sigma = 1
        torch.testing.assert_close(one.ode_solution(y, INF, s), iso.ode_solution(y, INF, s), rtol=0, atol=2e-12)
    torch.testing.assert_close(one(y, INF), iso(y, INF), rtol=0, atol=1e-15)


def test_mixture_denoiser_at_inf_in_a_mixed_batch(gmm: GaussianMixture) -> None:
    y = unit_noise(gmm.shape, range(4))
    sig = torch.tensor([INF, 2.0, INF, 0.5], dtype=torch.float64)
    out = gmm(y, sig)
    m, _ = gmm.mean_and_covariance()
    for i in (0, 2):
        torch.testing.assert_close(out[i].reshape(-1), m, rtol=0, atol=1e-12)
    for i in (1, 3):
        torch.testing.assert_close(out[i], gmm(y[i : i + 1], sig[i : i + 1])[0], rtol=0, atol=1e-15)
    # near pure noise the unscaled denoiser tends to the scaled one at rho = 0
    big = gmm(1e6 * y[:1], torch.tensor([1e6], dtype=torch.float64))
    torch.testing.assert_close(big, out[:1], rtol=0, atol=1e-5)


def test_mixture_ode_from_inf_is_converged(gmm: GaussianMixture) -> None:
    y = unit_noise(gmm.shape, [0])
    a = gmm.ode_solution(y, INF, 0.002)
    b = gmm.ode_solution(y, INF, 0.002, rtol=1e-10, atol=1e-10)
    assert float((a - b).abs().max()) < 1e-8
    # the ODE from a huge but finite sigma (state sigma * y) converges to it
    c = gmm.ode_solution(1e7 * y, 1e7, 0.002)
    assert float((a - c).abs().max()) < 1e-5
