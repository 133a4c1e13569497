"""``stepopt export``: each format's content, the solver-identity mapping to diffusers, refusals and --force."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from stepopt.cli import app
from stepopt.export import (
    ExportRefused,
    diffusers_export,
    dpm_orders,
    export_text,
    k_diffusion_export,
    parse_sigmas,
    stepopt_orders,
    unipc_orders,
)
from stepopt.frames import VPDiscrete
from stepopt.schedule import MethodInfo, ModelRef, Schedule
from stepopt.solvers import get_solver

runner = CliRunner()
FRAME = VPDiscrete()  # linear betas, T = 1000
TIMESTEPS = [999, 870, 720, 560, 410, 270, 150, 60, 0]


def ddpm_schedule(
    solver: str = "dpmpp-2m",
    timesteps=TIMESTEPS,
    final_step: str = "none",
    lof: bool | None = None,
    variant: str | None = None,
    model_sigmas: bool = False,
) -> Schedule:
    """A schedule for a DDPM model (vp-discrete) on the given native times, built without the model."""
    spec = get_solver(solver)
    ident = spec.identity(None, variant, lof)
    sig = [float(x) for x in FRAME.sigma(np.asarray(timesteps, dtype=np.float64))]
    ref = ModelRef("diffusers:/tmp/ddpm", "sha256:0", FRAME.sigma_min, FRAME.sigma_max, "vp-discrete")
    return Schedule(
        model=ref,
        solver=ident,
        nfe=spec.nfe(ident, len(sig) - 1, final_step),
        sigmas=tuple(sig),
        timesteps=tuple(float(t) for t in timesteps),
        model_sigmas=tuple(s * 1.01 for s in sig) if model_sigmas else None,
        final_step=final_step,
        method=MethodInfo("test"),
    )


def edm_schedule(final_step: str = "none") -> Schedule:
    sig = tuple(float(x) for x in np.geomspace(80.0, 0.002, 6))
    spec = get_solver("dpmpp-2m")
    ident = spec.identity(None, None, False)
    return Schedule(
        model=ModelRef("builtin:gmm-digits", "sha256:0", 0.002, 80.0, "sigma"),
        solver=ident,
        nfe=spec.nfe(ident, 5, final_step),
        sigmas=sig,
        final_step=final_step,
        method=MethodInfo("logsnr"),
    )


def test_order_rules_match_the_documented_examples():
    assert stepopt_orders(3, 5, True) == [1, 2, 3, 2, 1]
    assert stepopt_orders(3, 5, False) == [1, 2, 3, 3, 3]
    assert dpm_orders(3, 5, True, False) == [1, 2, 3, 2, 1]
    assert dpm_orders(3, 15, True, False) == [1, 2] + [3] * 13  # inert from 15 steps on
    assert dpm_orders(2, 5, False, True) == [1, 2, 2, 2, 1]  # final_sigmas_type zero
    assert unipc_orders(3, 6, True) == [1, 2, 3, 3, 2, 1]


@pytest.mark.parametrize("lof", [True, False])
def test_dpmpp_2m_none_maps_to_sigma_min_and_n_timesteps(lof):
    d = diffusers_export(ddpm_schedule("dpmpp-2m", lof=lof))
    assert d["exact"] and d["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    kw = d["scheduler"]["kwargs"]
    assert kw["algorithm_type"] == "dpmsolver++" and kw["solver_order"] == 2 and kw["solver_type"] == "midpoint"
    assert kw["final_sigmas_type"] == "sigma_min" and kw["lower_order_final"] is lof
    assert d["set_timesteps"] == {"timesteps": TIMESTEPS[:-1]}
    a0 = 1 / math.sqrt(1 + FRAME.sigma(999.0) ** 2)
    assert d["init_latents_scale"] == pytest.approx(float(FRAME.sigma(999.0)) * a0, rel=1e-12)


def test_final_denoise_passes_all_timesteps_and_zero_final_sigma():
    d = diffusers_export(ddpm_schedule("dpmpp-2m", final_step="denoise", lof=False))
    assert d["set_timesteps"] == {"timesteps": TIMESTEPS}
    assert d["scheduler"]["kwargs"]["final_sigmas_type"] == "zero" and d["output_scale"] == 1.0
    # With lower_order_final stepopt's last real step is first order; diffusers' would be second.
    with pytest.raises(ExportRefused, match="step orders"):
        diffusers_export(ddpm_schedule("dpmpp-2m", final_step="denoise", lof=True))


def test_long_grids_pick_an_equivalent_lower_order_final_setting():
    ts = [int(t) for t in np.linspace(999, 0, 17).round()]
    d = diffusers_export(ddpm_schedule("dpmpp-2m", timesteps=ts, lof=False))
    assert d["exact"]
    with pytest.raises(ExportRefused, match="step orders"):  # diffusers' flag is inert for >= 15 steps
        diffusers_export(ddpm_schedule("dpmpp-2m", timesteps=ts, lof=True))


def test_3m_exact_variant_is_refused_reference_is_exported():
    spec = get_solver("dpmpp-3m")
    if "reference" in spec.variants:
        d = diffusers_export(ddpm_schedule("dpmpp-3m", variant="reference"))
        assert d["exact"] and d["scheduler"]["kwargs"]["solver_order"] == 3
    exact = "exact" if "exact" in spec.variants else None
    with pytest.raises(ExportRefused, match="dpmpp-3m variant"):
        diffusers_export(ddpm_schedule("dpmpp-3m", variant=exact))
    forced = diffusers_export(ddpm_schedule("dpmpp-3m", variant=exact), force=True)
    assert not forced["exact"] and "phi_3" in forced["differences"][0]


def test_unipc_and_euler():
    u = diffusers_export(ddpm_schedule("unipc", variant="bh1"))
    assert u["scheduler"]["class"] == "UniPCMultistepScheduler" and u["scheduler"]["kwargs"]["solver_type"] == "bh1"
    assert u["set_timesteps"] == {"num_inference_steps": 8} and u["override"]["timesteps"] == TIMESTEPS[:-1]
    assert len(u["override"]["sigmas"]) == 9
    e = diffusers_export(ddpm_schedule("euler", final_step="denoise"))
    assert e["scheduler"]["class"] == "EulerDiscreteScheduler" and e["set_timesteps"]["timesteps"] == TIMESTEPS
    assert e["init_latents_scale"] == pytest.approx(float(FRAME.sigma(999.0)), rel=1e-12)


@pytest.mark.parametrize(
    ("schedule", "fragment"),
    [
        (lambda: ddpm_schedule(timesteps=[999.0, 500.5, 0.0]), "not an integer timestep"),
        (lambda: ddpm_schedule(timesteps=[999, 500, 3]), "ends at timestep 3"),
        (lambda: ddpm_schedule(model_sigmas=True), "model_sigmas"),
        (lambda: edm_schedule(), "time domain is 'sigma'"),
        (lambda: ddpm_schedule("heun"), "no diffusers scheduler"),
    ],
)
def test_refusals_are_one_sentence(schedule, fragment):
    with pytest.raises(ExportRefused, match=fragment) as e:
        diffusers_export(schedule())
    assert "\n" not in str(e.value)


def test_force_lists_what_differs():
    d = diffusers_export(ddpm_schedule(timesteps=[999.0, 500.5, 0.0]), force=True)
    assert not d["exact"] and d["set_timesteps"]["timesteps"] == [999, round(500.5)]
    assert "not an integer timestep" in d["differences"][0]


def test_k_diffusion_comfyui_json_csv():
    s = edm_schedule("denoise")
    k = k_diffusion_export(s)
    assert k["sigmas"] == [*s.sigmas, 0.0] and k["sampler"] == "sample_dpmpp_2m"
    assert parse_sigmas(export_text(s, "comfyui")) == [*s.sigmas, 0.0]
    assert parse_sigmas(export_text(edm_schedule(), "comfyui")) == list(edm_schedule().sigmas)
    j = json.loads(export_text(s, "json"))
    assert j["sigmas"] == list(s.sigmas) and j["lam"] == [-math.log(x) for x in s.sigmas]
    rows = list(csv.DictReader(io.StringIO(export_text(ddpm_schedule(), "csv"))))
    assert [float(r["sigma"]) for r in rows] == list(ddpm_schedule().sigmas)
    assert [float(r["timestep"]) for r in rows] == [float(t) for t in TIMESTEPS]
    with pytest.raises(ExportRefused, match="model_sigmas"):
        export_text(ddpm_schedule(model_sigmas=True), "k-diffusion")


def test_diffusers_python_snippet_compiles():
    text = export_text(ddpm_schedule("unipc"), "diffusers-python")
    compile(text, "snippet.py", "exec")
    assert "UniPCMultistepScheduler.from_config(" in text and "scheduler.timesteps = torch.tensor(" in text


def test_cli_export_writes_atomically_and_refuses_with_one_line(tmp_path):
    src = tmp_path / "s.yaml"
    ddpm_schedule().save(src)
    out = tmp_path / "sub" / "d.json"
    r = runner.invoke(app, ["export", str(src), "--to", "diffusers", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert [p.name for p in out.parent.iterdir()] == ["d.json"]
    r = runner.invoke(app, ["export", str(src), "--to", "comfyui"])
    assert r.exit_code == 0 and parse_sigmas(r.stdout) == list(ddpm_schedule().sigmas)
    bad = tmp_path / "bad.yaml"
    ddpm_schedule(model_sigmas=True).save(bad)
    out2 = tmp_path / "refused.json"
    r = runner.invoke(app, ["export", str(bad), "--to", "diffusers", "--out", str(out2)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "model_sigmas" in lines[0] and not out2.exists()
    r = runner.invoke(app, ["export", str(bad), "--to", "diffusers", "--out", str(out2), "--force"])
    assert r.exit_code == 0 and "warning: not exact" in r.stderr
    assert json.loads(out2.read_text())["differences"]
