"""``builtin:gmm-digits-flow`` (the digits GMM as a velocity model from pure noise), flow baselines,
and the shift a schedule was made for (``sample`` refuses another without ``--force``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepopt.baselines import BASELINES, FLOW_BASELINES, baseline_sigmas, sigma_top
from stepopt.build import baseline_schedule
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.models import GaussianMixture, load_model
from stepopt.models.flow import GaussianMixtureFlow
from stepopt.sampling import schedule_mismatches, unit_noise
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver

INF = math.inf
runner = CliRunner()


@pytest.fixture(scope="module")
def flow() -> GaussianMixtureFlow:
    m = load_model("builtin:gmm-digits-flow")
    assert isinstance(m, GaussianMixtureFlow)
    return m


def test_it_is_the_digits_mixture_as_a_velocity_model(flow: GaussianMixtureFlow, gmm: GaussianMixture) -> None:
    assert flow.sigma_max == INF and flow.sigma_min == 0.002 and flow.time_domain == "flow"
    assert flow.frame.shift == 3.0 and flow.parameterization == "flow"
    x = 2.0 * unit_noise(gmm.shape, range(4))
    for s in (0.002, 0.3, 1.0, 7.0, 80.0):
        torch.testing.assert_close(flow(x, s), gmm(x, s), rtol=0, atol=1e-12)
    # at t = 1 the state is the noise and v = eps - E[x0]
    m, _ = gmm.mean_and_covariance()
    v = flow.velocity(x, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(v, x - m.reshape(1, *gmm.shape), rtol=0, atol=1e-12)
    torch.testing.assert_close(flow(x, INF), m.reshape(1, *gmm.shape).expand_as(x), rtol=0, atol=1e-12)
    assert flow.fingerprint != gmm.fingerprint


def test_shift_and_mu_options() -> None:
    a = load_model("builtin:gmm-digits-flow:shift=1.5")
    b = load_model("builtin:gmm-digits-flow:mu=0.5")
    assert a.ref().shift == 1.5 and a.ref().mu is None and a.id == "builtin:gmm-digits-flow:shift=1.5"
    assert b.ref().shift == pytest.approx(math.exp(0.5)) and b.ref().mu == 0.5
    assert a.fingerprint == b.fingerprint  # the network does not depend on the shift
    for bad in ("shift=0", "shift=x", "mu=1,shift=2", "steps=3", "shift=inf"):
        with pytest.raises(StepoptError):
            load_model(f"builtin:gmm-digits-flow:{bad}")


@pytest.mark.parametrize("kind", [*BASELINES, *FLOW_BASELINES])
def test_every_baseline_begins_at_pure_noise(flow: GaussianMixtureFlow, kind: str) -> None:
    for n in (1, 2, 5, 9):
        s = baseline_sigmas(kind, n, flow.sigma_max, flow.sigma_min, flow.frame)
        assert len(s) == n + 1 and s[0] == INF and np.all(np.diff(s) < 0) and np.all(np.isfinite(s[1:]))
        sched = baseline_schedule(kind, flow, get_solver("euler").identity(), n, final_step="denoise")
        assert Schedule.from_yaml(sched.to_yaml()) == sched
        assert sched.timesteps is not None and sched.timesteps[0] == 1.0
        if kind != "flow-default":
            assert s[-1] == flow.sigma_min


def test_flow_default_is_uniform_t_then_shift(flow: GaussianMixtureFlow) -> None:
    s = baseline_sigmas("flow-default", 4, INF, 0.002, flow.frame)
    u = np.linspace(1.0, 0.2, 5)
    np.testing.assert_allclose(s[1:], 3.0 * u[1:] / (1 - u[1:]), rtol=1e-14)
    assert sigma_top(flow.frame) == pytest.approx(3.0 * 999)
    s = baseline_sigmas("edm", 4, INF, 0.002, flow.frame)
    assert s[1] == pytest.approx(2997.0) and s[-1] == 0.002
    with pytest.raises(StepoptError, match="flow"):
        baseline_sigmas("flow-default", 4, 80.0, 0.002, None)


def test_schedule_records_the_shift_and_sample_refuses_another(tmp_path: Path, flow: GaussianMixtureFlow) -> None:
    sched = baseline_schedule("flow-default", flow, get_solver("euler").identity(), 5, final_step="denoise")
    other = load_model("builtin:gmm-digits-flow:shift=1")
    assert schedule_mismatches(sched, flow) == []
    (msg,) = schedule_mismatches(sched, other)
    assert "shift 3" in msg and "shift 1" in msg
    path = tmp_path / "s.yaml"
    r = runner.invoke(
        app,
        [
            *("baseline", "flow-default", "-m", "builtin:gmm-digits-flow", "-s", "euler", "--nfe", "6"),
            *("--final-step", "denoise", "--out", str(path)),
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert Schedule.load(path).sigmas[0] == INF and Schedule.load(path).model.shift == 3.0
    out = tmp_path / "x.npz"
    r = runner.invoke(app, ["sample", "--schedule", str(path), "--n", "3", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    with np.load(out) as f:
        assert np.isfinite(f["samples"]).all() and f["sigmas"][0] == INF
    r = runner.invoke(app, ["sample", "--schedule", str(path), "-m", "builtin:gmm-digits-flow:shift=1", "--n", "2"])
    assert r.exit_code == 1 and "shift" in r.stderr and "--force" in r.stderr
    r = runner.invoke(
        app,
        [
            *("sample", "--schedule", str(path), "-m", "builtin:gmm-digits-flow:shift=1", "--n", "2", "--force"),
            *("--json", "--out", str(tmp_path / "y.npz")),
        ],
    )
    assert r.exit_code == 0 and "shift" in json.loads(r.stdout)["warnings"][0]


def test_exact_sampling_from_pure_noise_matches_the_ode(flow: GaussianMixtureFlow) -> None:
    """A fine flow grid from t = 1 converges to the exact ODE (computed in the noise-scaled frame)."""
    y = unit_noise(flow.shape, [0, 1])
    exact = flow.ode_solution(y, INF, 0.002)
    errs = []
    for n in (100, 200):
        w = np.linspace(0.0, 0.002 ** (-1 / 7), n + 1)  # sigma^(-1/7) uniform from pure noise (contract suite)
        with np.errstate(divide="ignore"):
            grid = torch.as_tensor(w**-7.0)
        grid[-1] = 0.002
        errs.append(float((get_solver("unipc").fn(flow, y, grid) - exact).abs().max()))
    assert errs[1] < 1e-4 and errs[0] > 4 * errs[1], errs  # measured 2.1e-4, 3.0e-5: converging to the exact ODE


def test_eval_json_rows_carry_flow_time_and_shift(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    args = ["baseline", "time-uniform", "-m", "builtin:gmm-digits-flow:shift=2", "-s", "dpmpp-2m", "--nfe", "4"]
    assert runner.invoke(app, [*args, "--final-step", "denoise", "--out", str(path)]).exit_code == 0
    r = runner.invoke(app, ["eval", str(path), "--n", "2", "--json", "--no-cache"])
    assert r.exit_code == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["time"] == "flow" and row["shift"] == 2.0 and row["mu"] is None
    assert math.isfinite(row["metrics"]["ode-error"]["rmse"])


def test_export_of_a_grid_from_pure_noise(flow: GaussianMixtureFlow) -> None:
    """k-diffusion / ComfyUI sigma lists cannot start at inf (ComfyUI's flow models take t): refused, even forced."""
    from stepopt.export import ExportRefused, export_text

    sched = baseline_schedule("flow-default", flow, get_solver("euler").identity(), 4, final_step="denoise")
    for to in ("k-diffusion", "comfyui"):
        for force in (False, True):
            with pytest.raises(ExportRefused, match="pure noise"):
                export_text(sched, to, force=force)
    d = json.loads(export_text(sched, "json"))  # strict JSON: inf is the string "inf", lam = -inf "-inf"
    assert float(d["sigmas"][0]) == INF and d["lam"][0] == "-inf" and d["time"] == "flow" and d["timesteps"][0] == 1.0
    assert export_text(sched, "csv").splitlines()[1].startswith("0,inf,-inf,1.0")


def test_trust_region_refuses_pure_noise_for_heun_with_one_line(tmp_path: Path) -> None:
    """trust-region from pure noise for a solver whose limit is not derived: one line, no file, no traceback."""
    from typer.testing import CliRunner

    from stepopt.cli import app

    out = tmp_path / "s.yaml"
    argv = ["optimize", "-m", "builtin:gmm-digits-flow", "-s", "heun", "-n", "6", "-o", str(out)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "sigma_max = inf" in lines[0] and "ld3" in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()
