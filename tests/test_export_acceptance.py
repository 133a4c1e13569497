"""Acceptance of ``stepopt export``: the exported schedule, run by diffusers' own schedulers or by an
independent k-diffusion-style loop, gives the samples ``stepopt sample`` writes.

diffusers side: a tiny random ``UNet2DModel`` + DDPM scheduler folder (built here, offline), and a
trust-region schedule optimized for it, which stepopt writes on the model's integer timesteps
(diffusers runs DDPM networks at integer timesteps only); the
scheduler class, keyword arguments and ``set_timesteps`` call come from ``--to diffusers`` only,
the noise table and ``prediction_type`` from the folder's scheduler config
(``from_config(config, **kwargs)``), and the loop is the one diffusers' pipelines run
(``scale_model_input``, ``unet``, ``step``), all float32 as ``stepopt sample`` runs the network.
Sample i starts from stepopt's noise of seed i times the export's ``init_latents_scale``; the
result times ``output_scale`` must equal the ``.npz`` samples to ``RTOL`` relative to their largest
entry. 1e-5 is the issue's tolerance; float32 networks on slightly different float32 inputs
(diffusers keeps the VP state, stepopt ``x / a``) agree to ~1e-6.

k-diffusion side: Euler and DPM++(2M) loops written below from Karras et al. (2022) Alg. 1 (no
churn) and Lu et al. (2022) DPM-Solver++(2M) as k-diffusion states them (first step and a step
into sigma 0 first order), on the exported sigma list with its trailing 0 for ``final_step: denoise``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_diffusers import make_tiny_diffusers
from stepopt.cli import app
from stepopt.models import load_model
from stepopt.sampling import unit_noise
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

runner = CliRunner()
RTOL = 1e-5
N_SAMPLES = 2


def _has_variant(solver: str, variant: str) -> bool:
    return variant in get_solver(solver).variants


CASES = [
    pytest.param("euler", None, None, "none", id="euler"),
    pytest.param("euler", None, None, "denoise", id="euler-denoise"),
    pytest.param("dpmpp-2m", None, True, "none", id="dpmpp-2m"),
    pytest.param("dpmpp-2m", None, False, "denoise", id="dpmpp-2m-nolof-denoise"),
    pytest.param(
        "dpmpp-3m",
        "reference",
        True,
        "none",
        id="dpmpp-3m-reference",
        marks=pytest.mark.skipif(
            not _has_variant("dpmpp-3m", "reference"), reason="dpmpp-3m has no 'reference' variant in this stepopt"
        ),
    ),
    pytest.param("unipc", "bh2", True, "none", id="unipc-bh2"),
    pytest.param("unipc", "bh1", True, "none", id="unipc-bh1"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_diffusers(tmp_path_factory.mktemp("export-ddpm") / "ddpm")


def _stepopt_sample(schedule_path: Path, out: Path) -> np.ndarray:
    # --trust-code: the schedule names a diffusers folder, not a built-in model
    args = ["sample", "--schedule", str(schedule_path), "--n", str(N_SAMPLES), "--device", "cpu", "--out", str(out)]
    r = runner.invoke(app, [*args, "--trust-code"])
    assert r.exit_code == 0, r.output
    with np.load(out, allow_pickle=False) as z:
        return np.asarray(z["samples"], dtype=np.float64)


def _export(schedule_path: Path, to: str, tmp_path: Path) -> dict:
    out = tmp_path / f"export-{to}.json"
    r = runner.invoke(app, ["export", str(schedule_path), "--to", to, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def _diffusers_samples(folder: Path, exp: dict, shape: tuple[int, ...]) -> np.ndarray:
    """diffusers' scheduler loop, configured only from the export (plus the folder's own scheduler config)."""
    config = diffusers.DDPMScheduler.load_config(folder / "scheduler")
    cls = getattr(diffusers, exp["scheduler"]["class"])
    sched = cls.from_config(config, **exp["scheduler"]["kwargs"])
    sched.set_timesteps(**exp["set_timesteps"])
    if exp["override"] is not None:
        sched.timesteps = torch.tensor(exp["override"]["timesteps"])
        sched.sigmas = torch.tensor(exp["override"]["sigmas"], dtype=torch.float32)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    noise = unit_noise(shape, range(N_SAMPLES))
    x = (noise * exp["init_latents_scale"]).to(torch.float32)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return (x.to(torch.float64) * exp["output_scale"]).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _optimized_integer_schedule(folder: Path, solver: str, variant, lof, final_step: str) -> Schedule:
    """A trust-region schedule for the tiny DDPM model, as ``stepopt.optimize`` writes it: on the
    model's integer timesteps (the optimizer's continuous grid projected by ``make_schedule``)."""
    import stepopt

    nfe = 7 + (final_step == "denoise")
    opt = stepopt.optimize(
        f"diffusers:{folder}",
        solver=solver,
        nfe=nfe,
        optimizer="trust-region",
        variant=variant,
        lower_order_final=lof,
        final_step=final_step,
        multistart=False,
        maxiter=50,
    )
    ts = np.asarray(opt.timesteps, dtype=np.float64)
    assert np.array_equal(ts, np.round(ts)) and ts[0] == 999.0 and ts[-1] == 0.0
    return opt


@pytest.mark.parametrize(("solver", "variant", "lof", "final_step"), CASES)
def test_diffusers_export_reproduces_stepopt_sample(folder, tmp_path, solver, variant, lof, final_step):
    s = _optimized_integer_schedule(folder, solver, variant, lof, final_step)
    assert np.abs(np.asarray(s.timesteps) - np.round(s.timesteps)).max() < 1e-9  # on integer timesteps
    path = tmp_path / "s.yaml"
    s.save(path)
    ours = _stepopt_sample(path, tmp_path / "ours.npz")
    exp = _export(path, "diffusers", tmp_path)
    assert exp["exact"], exp["differences"]
    theirs = _diffusers_samples(folder, exp, (2, 8, 8))
    assert _rel(ours, theirs) < RTOL
    if final_step == "none":  # a negative control: the state conversion matters at this tolerance
        assert _rel(ours, theirs / exp["output_scale"]) > RTOL or exp["output_scale"] == 1.0


# -- k-diffusion -------------------------------------------------------------------------------


def _k_euler(model, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def _k_dpmpp_2m(model, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    old = None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            x = den
        else:
            h = math.log(s) - math.log(s_next)
            if old is None:
                d = den
            else:
                r = (math.log(sigmas[i - 1]) - math.log(s)) / h
                d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
        old = den
    return x


@pytest.mark.parametrize(
    ("solver", "lof", "final_step", "loop"),
    [
        pytest.param("euler", None, "none", _k_euler, id="euler"),
        pytest.param("euler", None, "denoise", _k_euler, id="euler-denoise"),
        pytest.param("dpmpp-2m", False, "none", _k_dpmpp_2m, id="2m"),
        pytest.param("dpmpp-2m", False, "denoise", _k_dpmpp_2m, id="2m-denoise"),
    ],
)
def test_k_diffusion_export_reproduces_stepopt_sample(tmp_path, solver, lof, final_step, loop):
    flags = [] if lof is None else ["--no-lower-order-final"]
    path = tmp_path / "s.yaml"
    nfe = "6" if final_step == "none" else "7"
    r = runner.invoke(
        app,
        ["baseline", "edm", "--solver", solver, "--nfe", nfe, "--final-step", final_step, "--out", str(path), *flags],
    )
    assert r.exit_code == 0, r.output
    ours = _stepopt_sample(path, tmp_path / "ours.npz")
    exp = _export(path, "k-diffusion", tmp_path)
    assert exp["sampler"] == ("sample_euler" if solver == "euler" else "sample_dpmpp_2m")
    sigmas = exp["sigmas"]
    assert (sigmas[-1] == 0.0) == (final_step == "denoise")
    s = Schedule.load(path)
    model = load_model(s.model.id, device="cpu")
    x = (unit_noise(model.shape, range(N_SAMPLES)) * sigmas[0]).to(model.dtype)
    with torch.no_grad():
        theirs = loop(model, x, sigmas).to(torch.float64).numpy()
    assert _rel(ours, theirs) < RTOL


@pytest.mark.parametrize("solver", ["dpmpp-2m", "unipc"])
def test_diffusers_python_snippet_runs_and_reproduces_stepopt_sample(folder, tmp_path, solver):
    """The ``--to diffusers-python`` snippet, executed as written on a DDPMPipeline folder, gives sample 0."""
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    s = _optimized_integer_schedule(folder, solver, None, None, "none")
    path = tmp_path / "s.yaml"
    s.save(path)
    ours = _stepopt_sample(path, tmp_path / "ours.npz")[:1]
    r = runner.invoke(app, ["export", str(path), "--to", "diffusers-python"])
    assert r.exit_code == 0, r.output
    ns: dict = {}
    exec(compile(r.stdout, "snippet.py", "exec"), ns)
    assert _rel(ours, ns["sample"].to(torch.float64).numpy()) < RTOL


# -- the latent Stable Diffusion path ---------------------------------------------------------------


def test_latent_export_reproduces_stepopt_sample(tmp_path: Path) -> None:
    """An optimized schedule of a tiny SD folder, exported --to diffusers and given to
    StableDiffusionPipeline (its own prompt encoding and classifier-free guidance, latents in and out)
    with the same initial noise, gives stepopt sample's latents to 1e-5 relative."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers (CLIP text encoder) is not installed")
    import diffusers

    from _tiny_latent import make_tiny_sd

    folder = make_tiny_sd(tmp_path / "tiny-sd")
    path = tmp_path / "s.yaml"
    cond = ["--prompt", "a red cat", "--guidance", "5"]
    args = ["optimize", "-m", f"diffusers:{folder}", "-s", "dpmpp-2m", "-n", "5", *cond, "-o", str(path)]
    r = runner.invoke(app, [*args, "--set", "multistart=false", "--set", "maxiter=50"])
    assert r.exit_code == 0, r.output
    s = Schedule.load(path)
    assert np.array_equal(np.asarray(s.timesteps), np.round(s.timesteps))  # on the integer timesteps
    out = tmp_path / "ours.npz"
    r = runner.invoke(app, ["sample", "-S", str(path), "--n", "2", "--no-decode", "--trust-code", "-o", str(out)])
    assert r.exit_code == 0, r.output
    with np.load(out, allow_pickle=False) as z:
        ours = np.asarray(z["samples"], dtype=np.float64)
    exp = _export(path, "diffusers", tmp_path)
    assert exp["exact"] and exp["override"] is None, exp
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    cls = getattr(diffusers, exp["scheduler"]["class"])
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **exp["scheduler"]["kwargs"])
    pipe.set_progress_bar_config(disable=True)
    shape = tuple(load_model(f"diffusers:{folder}").shape)
    latents = (unit_noise(shape, range(2)) * exp["init_latents_scale"]).to(torch.float32)
    with torch.no_grad():
        theirs = pipe(
            prompt=["a red cat"] * 2,
            guidance_scale=5.0,
            latents=latents,
            output_type="latent",
            **exp["set_timesteps"],
        ).images
    theirs_np = theirs.to(torch.float64).numpy() * exp["output_scale"]
    assert _rel(ours, theirs_np) < RTOL
