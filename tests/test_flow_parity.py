"""``builtin:gmm-digits-flow`` against diffusers' flow schedulers stepping the same exact velocity.

diffusers' schedulers run the model in the flow frame (state ``x_t``, time ``t`` in [0, 1], model
output the velocity ``v``); stepopt runs ``D = x_t - t v`` in its sigma frame. Conventions bridged:

1. **Grid.** diffusers computes its flow times in float32; our grid is those t's mapped exactly to
   ``sigma = t / (1 - t)`` in float64 (t = 1 -> inf). The velocity is evaluated at the scheduler's own
   ``t = scheduler.sigmas[i]`` (the value its coefficients use), so both sides see the same model.
2. **Start.** FlowMatchEuler starts at t = 1: both sides start from the same noise, ours as the
   noise-scaled state at ``sigma = inf`` (README: Conventions). DPMSolverMultistep with
   ``use_flow_sigmas`` starts at ``t_0 = shift(1 - 1/1000)`` < 1 from the same noise taken as ``x_{t_0}``:
   our state is ``eps / (1 - t_0)`` at ``sigma_0 = t_0 / (1 - t_0)``.
3. **End.** Both schedulers end with a step to t = 0 that returns ``x_t - t v = D``: ``final_step: denoise``.
4. **2M orders.** diffusers' last step (to 0) is first order and every other step after the first is
   second order: stepopt's ``dpmpp-2m`` with ``lower_order_final: false`` on the N-1 steps before it.
5. **Precision.** Both schedulers keep the sample in float32; agreement is ~1e-7 (measured below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stepopt.baselines import baseline_sigmas
from stepopt.models import load_model
from stepopt.models.flow import GaussianMixtureFlow
from stepopt.sampling import unit_noise
from stepopt.solvers import get_solver, solve

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

TOL = 1e-6
SEEDS = list(range(8))


@pytest.fixture(scope="module")
def flow() -> GaussianMixtureFlow:
    m = load_model("builtin:gmm-digits-flow")
    assert isinstance(m, GaussianMixtureFlow)
    return m


def _diffusers_run(scheduler, model: GaussianMixtureFlow, eps: torch.Tensor) -> torch.Tensor:
    sample = eps.to(torch.float32)
    for i, ts in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].to(torch.float64).expand(sample.shape[0])
        v = model.velocity(sample.to(torch.float64), t).to(torch.float32)
        sample = scheduler.step(v, ts, sample).prev_sample
    return sample.to(torch.float64)


def _grid(ts: torch.Tensor) -> torch.Tensor:
    t = ts.to(torch.float64)
    return torch.where(t == 1.0, torch.full_like(t, math.inf), t / (1.0 - t))


@pytest.mark.parametrize("n", [4, 8, 12])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_equals_flow_match_euler(flow: GaussianMixtureFlow, n: int, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n).tolist())
    eps = unit_noise(flow.shape, SEEDS)
    ref = _diffusers_run(sch, flow, eps)
    t = sch.sigmas[:-1]
    assert float(t[0]) == 1.0 and float(sch.sigmas[-1]) == 0.0
    ours = solve(get_solver("euler").identity(), flow, eps, _grid(t), final_step="denoise")
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err < TOL, err
    # stepopt's own pipeline-default baseline is the same grid, in float64 (t differs by float32 rounding)
    frame = type(flow.frame)(shift=shift)
    own = baseline_sigmas("flow-default", n - 1, math.inf, flow.sigma_min, frame)
    assert own[0] == math.inf
    torch.testing.assert_close(torch.as_tensor(frame.time(own)), t.to(torch.float64), rtol=0, atol=1e-7)
    # and stepopt on it is as close to diffusers
    mine = solve(get_solver("euler").identity(), flow, eps, torch.as_tensor(own), final_step="denoise")
    assert float((mine - ref).abs().max() / ref.abs().max()) < TOL


@pytest.mark.parametrize("n", [5, 8, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpmpp_2m_equals_dpmsolver_flow_sigmas(flow: GaussianMixtureFlow, n: int, shift: float) -> None:
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction", solver_order=2
    )
    sch.set_timesteps(n)
    eps = unit_noise(flow.shape, SEEDS)
    ref = _diffusers_run(sch, flow, eps)
    t = sch.sigmas[:-1].to(torch.float64)
    assert float(sch.sigmas[-1]) == 0.0 and float(t[0]) < 1.0
    ident = get_solver("dpmpp-2m").identity(lower_order_final=False)
    ours = solve(ident, flow, eps / (1.0 - t[0]), _grid(t), final_step="denoise")
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err < TOL, err


def test_negative_control_lower_order_final_differs(flow: GaussianMixtureFlow) -> None:
    """The lower-order policy matters at this tolerance: with it on, the comparison fails."""
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    sch.set_timesteps(8)
    eps = unit_noise(flow.shape, SEEDS)
    ref = _diffusers_run(sch, flow, eps)
    t = sch.sigmas[:-1].to(torch.float64)
    ours = solve(get_solver("dpmpp-2m").identity(), flow, eps / (1.0 - t[0]), _grid(t), final_step="denoise")
    assert float((ours - ref).abs().max() / ref.abs().max()) > 100 * TOL


@pytest.mark.parametrize("model_id", ["builtin:gmm-digits-flow", "builtin:gmm-digits-flow:mu=0.8"])
def test_export_to_flow_match_euler_reproduces_any_euler_schedule(model_id: str) -> None:
    """``export --to diffusers`` of a flow schedule: FlowMatchEuler with the exported kwargs, ``sigmas=``
    (unshifted) and ``mu`` steps exactly through the schedule's times (a non-uniform grid here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepopt.build import baseline_schedule
    from stepopt.export import ExportRefused, diffusers_export

    model = load_model(model_id)
    assert isinstance(model, GaussianMixtureFlow)
    sched = baseline_schedule("kl-optimal", model, get_solver("euler").identity(), 6, final_step="denoise")
    d = diffusers_export(sched)
    assert d["exact"] and d["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    assert d["set_timesteps"]["sigmas"][0] == 1.0 and d["init_latents_scale"] == 1.0
    sch = FlowMatchEulerDiscreteScheduler(**d["scheduler"]["kwargs"])
    sch.set_timesteps(**d["set_timesteps"])
    eps = unit_noise(model.shape, SEEDS)
    ref = _diffusers_run(sch, model, eps)
    ours = solve(sched.solver, model, eps, sched.sigmas_tensor(), final_step="denoise")
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err < TOL, err
    with pytest.raises(ExportRefused, match="FlowMatchEuler"):
        diffusers_export(baseline_schedule("kl-optimal", model, get_solver("dpmpp-2m").identity(), 6))
