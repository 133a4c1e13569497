"""Grids for models trained at integer timesteps (``vp-discrete`` diffusers DDPM folders).

Every grid stepopt writes for such a model lies on its trained timesteps, with the sigmas of the
float32 table diffusers' schedulers use. Checked against diffusers itself (installed, offline, on a
tiny random UNet built here): its own ``linspace`` spacing, its ``sigmas`` for ``timesteps=`` from
the file (bit for bit), and its ``DPMSolverMultistepScheduler`` loop with ``timesteps=`` from the
file against ``stepopt sample`` (1e-5 relative).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_diffusers import make_tiny_diffusers
from stepopt.baselines import BASELINES
from stepopt.build import baseline_schedule
from stepopt.cli import app
from stepopt.models import load_model
from stepopt.sampling import unit_noise
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

RTOL = 1e-5
N_SAMPLES = 2
runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_diffusers(tmp_path_factory.mktemp("int-ddpm") / "ddpm")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(f"diffusers:{folder}", device="cpu")


def _dpm_scheduler(folder: Path, timesteps: list[int] | None = None, n: int | None = None, **kw):
    config = diffusers.DDPMScheduler.load_config(folder / "scheduler")
    sched = diffusers.DPMSolverMultistepScheduler.from_config(config, final_sigmas_type="sigma_min", **kw)
    if timesteps is not None:
        sched.set_timesteps(timesteps=timesteps)
    else:
        sched.set_timesteps(n)
    return sched


def test_every_baseline_lies_on_integer_timesteps(model):
    ident = get_solver("dpmpp-2m").identity()
    table = model.frame.sigma_table
    for kind in BASELINES:
        for n in (3, 7, 12):
            s = baseline_schedule(kind, model, ident, n)
            ts = np.asarray(s.timesteps)
            assert np.array_equal(ts, np.round(ts)) and ts[0] == 999 and ts[-1] == 0, (kind, n)
            assert np.all(np.diff(ts) < 0)
            assert np.array_equal(np.asarray(s.sigmas), table[ts.astype(int)])


@pytest.mark.parametrize("n", range(2, 13))
def test_time_uniform_is_diffusers_linspace_spacing(folder, model, n):
    """time-uniform on a DDPM model = diffusers' ``timestep_spacing="linspace"`` (ties: N = 2 gives 500)."""
    s = baseline_schedule("time-uniform", model, get_solver("dpmpp-2m").identity(), n)
    theirs = _dpm_scheduler(folder, n=n, timestep_spacing="linspace")
    assert [int(t) for t in s.timesteps[:-1]] == theirs.timesteps.tolist()
    assert np.array_equal(np.asarray(s.sigmas), theirs.sigmas.to(torch.float64).numpy())


def _diffusers_loop(folder: Path, s: Schedule, shape: tuple[int, ...]) -> np.ndarray:
    """diffusers' DPM-Solver++(2M) loop with ``timesteps=`` from the file, float32, from stepopt's noise."""
    ts = [int(t) for t in s.timesteps[:-1]]
    sched = _dpm_scheduler(folder, timesteps=ts)
    # The scheduler's grid is the file's, bit for bit (the same float32 table).
    assert np.array_equal(sched.sigmas.to(torch.float64).numpy(), np.asarray(s.sigmas))
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    s0, sn = s.sigmas[0], s.sigmas[-1]
    x = (unit_noise(shape, range(N_SAMPLES)) * s0 / (1 + s0 * s0) ** 0.5).to(torch.float32)  # VP state
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return (x.to(torch.float64) * (1 + sn * sn) ** 0.5).numpy()  # back to stepopt's x = x_t / a


@pytest.mark.parametrize("how", ["baseline", "optimized"])
def test_schedule_reproduces_in_diffusers_with_its_timesteps(folder, tmp_path, how):
    path = tmp_path / "s.yaml"
    common = ["--model", f"diffusers:{folder}", "--solver", "dpmpp-2m", "--nfe", "6", "--out", str(path)]
    if how == "baseline":
        r = runner.invoke(app, ["baseline", "edm", *common, "--trust-code"])
    else:
        r = runner.invoke(
            app, ["optimize", "-O", "trust-region", *common, "--device", "cpu", "--trust-code", "--set", "maxiter=50"]
        )
    assert r.exit_code == 0, r.output
    s = Schedule.load(path)
    ts = np.asarray(s.timesteps)
    assert np.array_equal(ts, np.round(ts)) and ts[-1] == 0
    rec = s.method.config.get("integer_timesteps")
    assert rec is not None and rec["max_abs_lam_shift"] > 0  # both grids were off the integers before projection
    out = tmp_path / "ours.npz"
    args = ["sample", "--schedule", str(path), "--n", str(N_SAMPLES), "--device", "cpu", "--out", str(out)]
    r = runner.invoke(app, [*args, "--trust-code"])
    assert r.exit_code == 0, r.output
    with np.load(out, allow_pickle=False) as z:
        ours = np.asarray(z["samples"], dtype=np.float64)
    theirs = _diffusers_loop(folder, s, ours.shape[1:])
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < RTOL


def test_decoupled_model_sigmas_are_left_alone(model):
    """A grid with model_sigmas (the network's time chosen on purpose, as LD3 does) is not projected."""
    from stepopt.build import make_schedule
    from stepopt.schedule import MethodInfo

    sig = np.geomspace(model.sigma_max, model.sigma_min, 6).tolist()
    s = make_schedule(model, get_solver("euler").identity(), sig, MethodInfo("x"), model_sigmas=sig)
    assert list(s.sigmas) == sig and "integer_timesteps" not in s.method.config
