"""Latent text-to-image diffusers pipelines, classifier-free guidance, ``--dtype`` (issue 6).

Where the numbers come from:

- The guided denoiser is checked against ``D_u + s (D_c - D_u)`` built here from two separate calls
  of an independent copy of the UNet (same seed) and the epsilon / v formulas of
  ``test_diffusers_parity`` (float64, so agreement is ~1e-15; RTOL_EXACT = 1e-12).
- The whole latent sampler is checked against diffusers' own ``DPMSolverMultistepScheduler`` loop
  with classifier-free guidance laid out as ``StableDiffusionPipeline`` does (``[uncond; cond]``,
  ``chunk(2)``), on a non-uniform integer-timestep grid; diffusers keeps its sigmas in float32, so
  the agreement is ~1e-7 relative (measured 1.7e-7 epsilon, 1.4e-7 v), and RTOL = 2e-6 as in
  ``test_diffusers_parity`` (see there); scaling the guided output by 1 + 1e-4 fails it.
  Bridged conventions: our state is ``z_t / a_t`` (pass ``x_T = z_T / a_0``, compare ``x_N a_N``);
  guidance is applied to the denoiser, which is affine in the network output with the same
  coefficients for both halves, hence equal to diffusers' guidance on the noise prediction.
- The command line (optimize -> sample with decoding, per-seed prompts, guidance records and
  refusals) runs on a ``python:`` factory with fixed prompt embeddings (``_tiny_latent``): the real
  diffusers UNet and VAE, no CLIP. Its samples must equal the library's, seed by seed.
- With ``transformers`` installed, the same holds against ``StableDiffusionPipeline`` itself (CLIP
  prompts, ``output_type="latent"``, fixed latents, custom timesteps) and the CLI runs on a saved
  pipeline folder; those tests are skipped without it.
- ``--dtype``: a bfloat16 / float16 network vs the float64 one on the tiny pixel model, 8 steps of
  DPM-Solver++(2M), 16 samples: measured max error relative to the largest value 1.5e-3 / 4.1e-3
  (bf16, epsilon / v) and 2.5e-4 / 7.0e-4 (fp16); float32 is at 3e-7. Tolerances: bf16 2e-2 (5
  units of its roundoff 2^-8 = 3.9e-3), fp16 5e-3 (10 units of 2^-11 = 4.9e-4; measured 1.4
  units). The lower bound 1e-5 fails if the network secretly ran in float32.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_diffusers import make_tiny_diffusers
from _tiny_latent import ddpm_scheduler, make_latent_folder_without_clip, make_tiny_sd, tiny_cond_unet, tiny_vae
from stepopt.build import baseline_schedule
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.models import load_model
from stepopt.models.diffusers import (
    DiffusersLatent,
    LatentUNet,
    PromptSet,
    conditioning_mismatches,
    configure_conditioning,
    read_prompts,
    scheduler_settings,
    unet_fingerprint,
)
from stepopt.models.guidance import ClassifierFreeGuidance
from stepopt.sampling import sample_schedule
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver, solve

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
HAS_CLIP = importlib.util.find_spec("transformers") is not None
needs_clip = pytest.mark.skipif(not HAS_CLIP, reason="transformers (CLIP text encoder) is not installed")

RTOL = 2e-6
RTOL_EXACT = 1e-12
CUSTOM_TIMESTEPS = [999, 870, 720, 560, 410, 270, 150, 60]
runner = CliRunner()


def run(*args: Any):
    # The models here are python: factories (code: --trust-code everywhere) and diffusers: folders (a
    # file's non-built-in model loads only with --trust-code).
    extra = ["--trust-code"] if args and args[0] in ("optimize", "sample", "eval", "baseline") else []
    return runner.invoke(app, [str(a) for a in args] + extra, catch_exceptions=False)


def _a(sigma: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.sqrt(1.0 + sigma * sigma)


def _embeddings(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in text embeddings (P, L, D) and (1, L, D), as a text encoder's output would be."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, 16, generator=g, dtype=torch.float64), torch.randn(
        1, 6, 16, generator=g, dtype=torch.float64
    )


def _latent(prediction: str = "epsilon", guidance: float = 5.0, n_prompts: int = 3, dtype=torch.float64):
    """A DiffusersLatent from a tiny UNet2DConditionModel + AutoencoderKL, with embeddings bound."""
    settings = scheduler_settings(dict(ddpm_scheduler(prediction).config), Path("scheduler_config.json"))
    unet = tiny_cond_unet()
    net = LatentUNet(unet, tiny_vae(), settings, id="latent:test", fingerprint=unet_fingerprint(unet, settings))
    net.to("cpu", dtype)
    cond, uncond = _embeddings(n_prompts)
    return DiffusersLatent.from_embeddings(net, cond, uncond, guidance), cond, uncond


def _configured(m: Any, prompts: Any, negative: str, guidance: float) -> DiffusersLatent:
    """The model configured like ``--prompt ... --negative-prompt NEG --guidance G``."""
    conditioning = configure_conditioning(m, prompts, None, negative, guidance)
    assert conditioning is not None
    return conditioning.model


def _reference_unet() -> Any:
    """An independent copy of the network (same seed), in float64."""
    return tiny_cond_unet().double().eval()


def _x(shape: tuple[int, ...], n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the guided denoiser ---------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [5.0, 1.0, 0.0])
def test_guided_denoiser_is_uncond_plus_s_times_difference(prediction: str, guidance: float) -> None:
    m, cond, uncond = _latent(prediction, guidance)
    unet = _reference_unet()
    t = torch.tensor([999.0, 500.0, 3.0], dtype=torch.float64)
    sigma = m.frame.sigma(t)
    a, s = _a(sigma).reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    x = _x(m.shape) * 2
    rows = torch.tensor([2, 0, 1])

    def d(emb: torch.Tensor) -> torch.Tensor:  # one separate UNet call, converted per parameterization
        f = unet(a * x, t, encoder_hidden_states=emb).sample
        return x - s * f if prediction == "epsilon" else a * (a * x - s * f)

    with torch.no_grad():
        d_u, d_c = d(uncond.expand(3, -1, -1)), d(cond[rows])
        want = d_u + guidance * (d_c - d_u)
        got = m(x, sigma, prompt_index=rows)
    assert torch.allclose(got, want, rtol=RTOL_EXACT, atol=RTOL_EXACT * float(want.abs().max()))
    if guidance != 1.0:  # the guidance really acts: the result is not the conditional denoiser
        assert not torch.allclose(got, d_c, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("guidance", "rows_per_call"), [(7.5, 4), (1.0, 2)])
def test_guidance_is_one_network_call_per_evaluation(guidance: float, rows_per_call: int) -> None:
    """CFG counts one evaluation per step; the 2B rows go through ONE UNet call."""
    m, _, _ = _latent(guidance=guidance)
    ident = get_solver("dpmpp-2m").identity()
    sched = baseline_schedule("time-uniform", m, ident, 5)
    calls: list[int] = []
    hook = m.unet.register_forward_hook(lambda mod, args, out: calls.append(int(args[0].shape[0])))
    try:
        with torch.no_grad():
            x = _x(m.shape, n=2) * sched.sigmas[0]
            solve(ident, m, x, sched.sigmas_tensor(), cond={"prompt_index": torch.tensor([0, 1])})
    finally:
        hook.remove()
    assert sched.nfe == 5 and len(calls) == sched.nfe
    assert calls == [rows_per_call] * 5


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_latent_dpmpp_2m_matches_diffusers_cfg_loop(prediction: str) -> None:
    """stepopt's dpmpp-2m on the latent == diffusers' scheduler loop with pipeline-style CFG."""
    guidance, n = 4.0, 3
    m, cond, uncond = _latent(prediction, guidance, n_prompts=n)
    unet = _reference_unet()
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="sigma_min",
    )
    sched.set_timesteps(timesteps=CUSTOM_TIMESTEPS)
    sigmas = sched.sigmas.to(torch.float64)
    z_T = _x(m.shape, n=n)
    emb = torch.cat([uncond.expand(n, -1, -1), cond])
    z = z_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out_u, out_c = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
            z = sched.step(out_u + guidance * (out_c - out_u), t, z).prev_sample
        ours = solve(
            get_solver("dpmpp-2m").identity(2, None, True),
            m,
            z_T / _a(sigmas[0]),
            sigmas,
            cond={"prompt_index": torch.arange(n)},
        ) * _a(sigmas[-1])
    assert float((ours - z).abs().max() / z.abs().max()) < RTOL


def test_guidance_is_a_wrapper_not_model_state() -> None:
    """A guidance scale is a wrapper's configuration: another scale is another model around the same network."""
    m, cond, uncond = _latent(guidance=5.0)
    x, sigma, rows = _x(m.shape), torch.full((3,), 2.0, dtype=torch.float64), torch.tensor([2, 0, 1])
    with torch.no_grad():
        before = m(x, sigma, prompt_index=rows)
        g2 = m.with_scale(2.0)
        assert g2 is not m and g2.inner is m.inner and (m.guidance, g2.guidance) == (5.0, 2.0)
        assert torch.equal(m(x, sigma, prompt_index=rows), before)  # the first model is unchanged
        generic = ClassifierFreeGuidance(m.inner, cond, uncond, 2.0)
        assert torch.equal(generic(x, sigma, prompt_index=rows), g2(x, sigma, prompt_index=rows))
        unguided = m.with_scale(1.0)(x, sigma, prompt_index=rows)  # s = 1: the conditional network alone
        assert torch.equal(unguided, m.inner(x, sigma, encoder_hidden_states=cond[rows]))
    configured = configure_conditioning(m, guidance=3.0)
    assert configured is not None and configured.model.guidance == 3.0 and m.guidance == 5.0
    assert configured.record == configured.model.conditioning_record() and configured.record["guidance"] == 3.0
    assert not hasattr(m, "set_guidance") and not hasattr(m, "set_prompts")


def test_prompt_rows_and_seed_assignment() -> None:
    m, _, _ = _latent(n_prompts=3)
    x, sigma = _x(m.shape, n=3), torch.full((3,), 2.0, dtype=torch.float64)
    with torch.no_grad():
        batch = m(x, sigma, prompt_index=torch.tensor([2, 0, 1]))
        for i, p in enumerate([2, 0, 1]):  # each row is its own prompt, whatever the batch holds
            single = m(x[i : i + 1], sigma[:1], prompt_index=torch.tensor([p]))
            assert torch.allclose(batch[i : i + 1], single, rtol=1e-12, atol=1e-12)
    assert m.cond_for_seeds([0, 1, 2, 3, 7])["prompt_index"].tolist() == [0, 1, 2, 0, 1]  # seed mod P
    with pytest.raises(StepoptError, match="3 prompts are bound but the caller passed no per-sample prompt_index"):
        m(x, sigma)
    with pytest.raises(StepoptError, match="prompt_index has 2 entries for a batch of 3"):
        m(x, sigma, prompt_index=torch.tensor([0, 1]))
    with pytest.raises(StepoptError, match="out of range for 3 prompts"):
        m(x, sigma, prompt_index=torch.tensor([0, 1, 3]))
    with pytest.raises(StepoptError, match=r"unknown conditioning \['class_labels'\]"):
        m(x, sigma, class_labels=torch.tensor([0, 1, 2]))
    one, _, _ = _latent(n_prompts=1)
    with torch.no_grad():  # a single prompt needs no index
        assert torch.equal(one(x, sigma), one(x, sigma, prompt_index=0))


def test_decode_and_shapes() -> None:
    m, _, _ = _latent()
    vae = tiny_vae().double().eval()
    x = _x(m.shape, n=2)
    with torch.no_grad():
        want = vae.decode(x / vae.config.scaling_factor).sample.float().clamp(-1, 1)
    img = m.decode(x, batch_size=1)
    assert m.shape == (4, 8, 8) and m.image_shape == (3, 16, 16)
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32
    assert torch.allclose(img, want, rtol=1e-6, atol=1e-6)
    assert m.describe()["latent"]["image_shape"] == [3, 16, 16] and m.latent


def test_half_precision_network_keeps_float32_state() -> None:
    m, _, _ = _latent(dtype=torch.bfloat16)
    assert m.net_dtype == torch.bfloat16 and m.dtype == torch.float32
    assert next(m.unet.parameters()).dtype == torch.bfloat16
    assert next(m.vae.parameters()).dtype == torch.float32  # the VAE always decodes in float32
    x = _x(m.shape).float()
    with torch.no_grad():
        d = m(x, torch.full((3,), 1.0, dtype=torch.float64), prompt_index=torch.tensor([0, 1, 2]))
        ref, _, _ = _latent()
        d64 = ref(x.double(), torch.full((3,), 1.0, dtype=torch.float64), prompt_index=torch.tensor([0, 1, 2]))
    assert d.dtype == torch.float32
    rel = float((d.double() - d64).abs().max() / d64.abs().max())
    # bf16 unit roundoff 2^-8 amplified by the guidance s = 5 is 2e-2 (measured 2.0e-2); bound 5 x that.
    assert 1e-5 < rel < 0.1


# -- --dtype on the pixel model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pixel")
    return {p: make_tiny_diffusers(root / p, prediction_type=p) for p in ("epsilon", "v_prediction")}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 2e-2), ("float16", 5e-3)])
def test_low_precision_network_close_to_float64(pixel_folders, prediction: str, dtype: str, tol: float) -> None:
    folder = pixel_folders[prediction]
    ref = load_model(f"diffusers:{folder}", dtype=torch.float64)
    low = load_model(f"diffusers:{folder}", dtype=getattr(torch, dtype))
    assert low.dtype == torch.float32 and low.net_dtype == getattr(torch, dtype)
    sched = baseline_schedule("edm", ref, get_solver("dpmpp-2m").identity(), 8)
    seeds = list(range(16))
    with torch.inference_mode():
        x64 = sample_schedule(ref, sched, seeds)
        x = sample_schedule(low, sched, seeds)
    assert x.dtype == torch.float32
    rel = float((x.double() - x64).abs().max() / x64.abs().max())
    assert 1e-5 < rel < tol


def test_cli_dtype_bfloat16_sample(tmp_path: Path, pixel_folders) -> None:
    model = f"diffusers:{pixel_folders['v_prediction']}"
    s = tmp_path / "s.yaml"
    assert run("baseline", "edm", "--model", model, "--solver", "dpmpp-2m", "--nfe", 6, "--out", s).exit_code == 0
    outs = {}
    for dt in ("float32", "bfloat16"):
        r = run("sample", "--schedule", s, "--n", 4, "--device", "cpu", "--dtype", dt, "--out", tmp_path / f"{dt}.npz")
        assert r.exit_code == 0, r.stderr
        with np.load(tmp_path / f"{dt}.npz", allow_pickle=False) as f:
            outs[dt] = f["samples"]
    rel = np.abs(outs["bfloat16"] - outs["float32"]).max() / np.abs(outs["float32"]).max()
    assert 1e-5 < rel < 2e-2  # see the module docstring
    r = run("sample", "--schedule", s, "--n", 2, "--dtype", "float8", "--out", tmp_path / "x.npz")
    assert r.exit_code == 2  # a usage error: not one of the choices


# -- prompts, records, options -------------------------------------------------------------------------


def test_prompt_set_and_records(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("a red cat\n\n  a blue dog  \n", encoding="utf-8")
    assert read_prompts(["first"], f) == ("first", "a red cat", "a blue dog")  # blank lines skipped
    ps = PromptSet(("a", "b"), "", 3.0)
    rec = ps.record()
    assert rec["n_prompts"] == 2 and rec["guidance"] == 3.0 and rec["negative_prompt"] == ""
    assert rec["prompts_sha256"] != PromptSet(("b", "a"), "", 3.0).record()["prompts_sha256"]  # order matters
    assert rec["prompts_sha256"].startswith("sha256:") and len(rec["prompts_sha256"]) == 71
    with pytest.raises(StepoptError, match=r"`guidance` -1\.0: expected a finite scale >= 0"):
        PromptSet(("a",), "", -1.0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(StepoptError, match="no prompts"):
        read_prompts((), empty)
    with pytest.raises(StepoptError, match=r"`prompt_file` .*missing\.txt: cannot read"):
        read_prompts((), tmp_path / "missing.txt")
    problems, notes = conditioning_mismatches(rec, PromptSet(("c",), "", 7.5).record())
    assert problems == ["guidance 7.5 differs from the schedule's 3.0 (it was optimized for that guided ODE)"]
    assert len(notes) == 1 and "prompt set" in notes[0]
    assert conditioning_mismatches(rec, dict(rec)) == ([], [])
    assert conditioning_mismatches(None, rec) == ([], [])


def test_non_text_models_refuse_prompt_options(tmp_path: Path) -> None:
    gmm = load_model("builtin:gmm-digits")
    assert configure_conditioning(gmm) is None
    with pytest.raises(StepoptError, match="`guidance`: builtin:gmm-digits takes no text conditioning"):
        configure_conditioning(gmm, guidance=2.0)
    r = run("optimize", "--prompt", "a cat", "--out", tmp_path / "s.yaml")
    assert r.exit_code == 1 and "--prompt: builtin:gmm-digits takes no text conditioning" in r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "s.yaml").exists()
    s = tmp_path / "b.yaml"
    assert run("baseline", "edm", "--nfe", 4, "--solver", "dpmpp-2m", "--out", s).exit_code == 0
    r = run("sample", "--schedule", s, "--decode", "--n", 2, "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "--decode: builtin:gmm-digits has no decoder" in r.stderr


def test_models_lists_the_diffusers_loader() -> None:
    r = run("models", "--json")
    assert r.exit_code == 0
    loaders = {d["prefix"]: d["summary"] for d in json.loads(r.stdout)["loaders"]}
    for word in ("UNet2DModel", "latent", "UNet2DConditionModel", "AutoencoderKL", "guidance"):
        assert word in loaders["diffusers:"]
    assert {"edm:", "python:", "diffusers:"} <= set(loaders)


# -- the CLI on a latent model (a python: factory with fixed embeddings; no CLIP needed) ---------------

EMBEDDED = "python:_tiny_latent:make_embedded_latent"  # 2 prompts, guidance 3.0


def test_cli_latent_optimize_sample_decode(tmp_path: Path) -> None:
    s = tmp_path / "s.yaml"
    r = run("optimize", "--model", EMBEDDED, "--solver", "dpmpp-2m", "--nfe", 4, "--guidance", 2.0, "--out", s)
    assert r.exit_code == 0, r.stderr
    sched = Schedule.load(s)
    cond = sched.method.config["conditioning"]
    assert cond["guidance"] == 2.0 and cond["n_prompts"] == 2 and sched.nfe == 4
    out, grid = tmp_path / "x.npz", tmp_path / "g.png"
    r = run("sample", "--schedule", s, "--n", 5, "--seed", 1, "--batch-size", 2, "--out", out, "--grid", grid, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["decoded"] and info["conditioning"]["guidance"] == 2.0  # the schedule's guidance by default
    with np.load(out, allow_pickle=False) as f:
        images, latents = f["samples"], f["latents"]
        assert images.shape == (5, 3, 16, 16) and latents.shape == (5, 4, 8, 8)
        assert f["prompt_index"].tolist() == [1, 0, 1, 0, 1]  # seed mod 2, seeds 1..5
        assert json.loads(str(f["conditioning"]))["guidance"] == 2.0
    assert grid.stat().st_size > 0
    # The same samples from the library: each seed's noise and prompt, guidance 2.
    m = load_model(EMBEDDED, trust_code=True)
    assert isinstance(m, DiffusersLatent)
    m = m.with_scale(2.0)
    with torch.inference_mode():
        want = torch.cat([sample_schedule(m, sched, [k], cond=m.cond_for_seeds([k])) for k in range(1, 6)])
        assert np.abs(latents - want.numpy()).max() <= 1e-5 * np.abs(want.numpy()).max()
        assert np.allclose(images, m.decode(torch.from_numpy(latents)).numpy(), atol=1e-5)
    r = run("sample", "--schedule", s, "--n", 2, "--guidance", 3.0, "--out", tmp_path / "y.npz")
    assert r.exit_code == 1 and "guidance 3.0 differs from the schedule's 2.0" in r.stderr
    assert "--force" in r.stderr and not (tmp_path / "y.npz").exists()
    r = run(
        "sample", "--schedule", s, "--n", 2, "--guidance", 3.0, "--force", "--no-decode", "--out", tmp_path / "y.npz"
    )
    assert r.exit_code == 0 and "warning: guidance 3.0 differs" in r.stderr
    with np.load(tmp_path / "y.npz", allow_pickle=False) as f:
        assert f["samples"].shape == (2, 4, 8, 8) and "latents" not in f.files
        assert json.loads(str(f["warnings"]))[0].startswith("guidance 3.0 differs")
    r = run(
        "sample", "--schedule", s, "--n", 2, "--no-decode", "--grid", tmp_path / "g2.png", "--out", tmp_path / "z.npz"
    )
    assert r.exit_code == 1 and "not images" in r.stderr and "--decode" in r.stderr
    r = run("sample", "--schedule", s, "--n", 2, "--prompt", "a cat", "--out", tmp_path / "z.npz")
    assert r.exit_code == 1 and "--prompt: python:_tiny_latent:make_embedded_latent has no text encoder" in r.stderr


def test_cli_several_prompts_teacher_based_selection(tmp_path: Path) -> None:
    """With two prompts, the teacher and the candidates use prompt seed mod 2 for each noise."""
    r = run(
        "optimize", "--model", EMBEDDED, "--nfe", 4, "--solver", "dpmpp-2m", "--select", "--out", tmp_path / "s.yaml"
    )
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "s.yaml").exists()


def test_model_without_prompt_indices_is_refused_with_one_line() -> None:
    """A caller that passes no per-sample prompt index to a two-prompt model gets one clear error."""
    model = load_model(EMBEDDED, trust_code=True)
    x = torch.zeros((2, *model.shape))
    with pytest.raises(StepoptError, match="2 prompts are bound but the caller passed no per-sample prompt_index"):
        model(x, torch.tensor([1.0, 1.0], dtype=torch.float64))


# -- loading pipeline folders ------------------------------------------------------------------------


def test_latent_folder_errors(tmp_path: Path) -> None:
    folder = make_latent_folder_without_clip(tmp_path / "sd")
    if not HAS_CLIP:  # everything but CLIP loads; the message says what to install
        with pytest.raises(StepoptError, match=r"StableDiffusionPipeline needs the 'transformers' package"):
            load_model(f"diffusers:{folder}")
        r = run("baseline", "edm", "--model", f"diffusers:{folder}", "--nfe", 4, "--out", tmp_path / "s.yaml")
        assert r.exit_code == 1 and "transformers" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    with pytest.raises(StepoptError, match="second text encoder"):
        load_model(f"diffusers:{folder}")
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "VQModel"]}))
    with pytest.raises(StepoptError, match="vae class 'VQModel' is not supported; expected AutoencoderKL"):
        load_model(f"diffusers:{folder}")
    (folder / "model_index.json").write_text(json.dumps(index))
    for w in (folder / "unet").glob("*.safetensors"):
        w.write_bytes(b"corrupt")
    with pytest.raises(StepoptError, match=r"sd/unet: cannot load UNet2DConditionModel weights"):
        load_model(f"diffusers:{folder}")
    r = run("baseline", "edm", "--model", f"diffusers:{folder}", "--nfe", 4, "--out", tmp_path / "s.yaml")
    assert r.exit_code == 1 and f"{folder / 'unet'}: cannot load" in r.stderr and "Traceback" not in r.output
    (folder / "model_index.json").unlink()
    with pytest.raises(StepoptError, match="UNet2DConditionModel is not supported outside a latent text-to-image"):
        load_model(f"diffusers:{folder}")
    r = run("baseline", "edm", "--model", f"diffusers:{tmp_path / 'nope'}", "--nfe", 4, "--out", tmp_path / "s.yaml")
    assert r.exit_code == 1 and "nope: no such folder" in r.stderr


# -- with CLIP (transformers): real pipeline folders -----------------------------------------------------


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_CLIP:
        pytest.skip("transformers (CLIP text encoder) is not installed")
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@needs_clip
def test_prompt_embeddings_match_the_pipeline(sd_folder: Path) -> None:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    m = load_model(f"diffusers:{sd_folder}")
    assert isinstance(m, DiffusersLatent)
    prompts = ("a photo of a cat", "the red dog")
    m = _configured(m, prompts, "blue", 3.0)
    with torch.no_grad():
        want, want_neg = pipe.encode_prompt(list(prompts), "cpu", 1, True, negative_prompt=["blue"] * 2)
    cond, uncond = m.conditions()
    assert torch.allclose(cond, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(uncond.expand(2, -1, -1), want_neg, rtol=1e-6, atol=1e-6)


@needs_clip
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_matches_stable_diffusion_pipeline(sd_folder: Path, guidance: float) -> None:
    """StableDiffusionPipeline + DPMSolverMultistepScheduler (2M), latents in, latents out == stepopt dpmpp-2m."""
    prompts = ["a photo of a cat", "the red dog"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="sigma_min",
    )
    pipe = pipe.to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    m = load_model(f"diffusers:{sd_folder}", dtype=torch.float64)
    z_T = _x(m.shape, n=2)
    with torch.no_grad():
        ref = pipe(
            prompt=prompts,
            negative_prompt=["blue"] * 2,
            timesteps=CUSTOM_TIMESTEPS,
            guidance_scale=guidance,
            latents=z_T.clone(),
            output_type="latent",
        ).images
    sigmas = pipe.scheduler.sigmas.to(torch.float64)
    m = _configured(m, prompts, "blue", guidance)
    with torch.no_grad():
        x = solve(
            get_solver("dpmpp-2m").identity(2, None, True),
            m,
            z_T / _a(sigmas[0]),
            sigmas,
            cond=m.cond_for_seeds([0, 1]),
        )
    assert float((x * _a(sigmas[-1]) - ref).abs().max() / ref.abs().max()) < RTOL


@needs_clip
def test_cli_optimize_then_sample_with_decode(tmp_path: Path, sd_folder: Path) -> None:
    model = f"diffusers:{sd_folder}"
    s = tmp_path / "s.yaml"
    pf = tmp_path / "p.txt"
    pf.write_text("a red cat\na blue dog\n")
    r = run(
        "optimize", "--model", model, "--solver", "dpmpp-2m", "--nfe", 4, "-O", "trust-region",
        "--prompt", "a cat", "--prompt-file", pf, "--guidance", 3.0, "--device", "cpu", "--out", s,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    sched = Schedule.load(s)
    cond = sched.method.config["conditioning"]
    assert cond["n_prompts"] == 3 and cond["guidance"] == 3.0 and cond["negative_prompt"] == ""
    assert cond["prompts_sha256"] == PromptSet(("a cat", "a red cat", "a blue dog"), "", 3.0).prompts_sha256
    assert sched.nfe == 4  # guidance does not change the NFE
    out, grid = tmp_path / "x.npz", tmp_path / "g.png"
    r = run("sample", "--schedule", s, "--n", 4, "--batch-size", 3, "--prompt-file", pf, "--out", out, "--grid", grid)
    assert r.exit_code == 0, r.stderr  # guidance defaults to the schedule's; another prompt set is only a note
    assert "note: the prompt set" in r.stderr
    with np.load(out, allow_pickle=False) as f:
        assert f["samples"].shape == (4, 3, 16, 16) and f["latents"].shape == (4, 4, 8, 8)
        assert float(np.abs(f["samples"]).max()) <= 1.0
        assert f["prompt_index"].tolist() == [0, 1, 0, 1]
        rec = json.loads(str(f["conditioning"]))
        assert rec["guidance"] == 3.0 and rec["prompts"] == ["a red cat", "a blue dog"]
    assert grid.stat().st_size > 0
    r = run("sample", "--schedule", s, "--n", 2, "--guidance", 7.5, "--out", tmp_path / "y.npz")
    assert r.exit_code == 1 and "guidance 7.5 differs from the schedule's 3.0" in r.stderr
    assert not (tmp_path / "y.npz").exists()
    r = run(
        "sample", "--schedule", s, "--n", 2, "--guidance", 7.5, "--force", "--no-decode", "--out", tmp_path / "y.npz"
    )
    assert r.exit_code == 0, r.stderr
    with np.load(tmp_path / "y.npz", allow_pickle=False) as f:
        assert f["samples"].shape == (2, 4, 8, 8) and "latents" not in f.files
    # Batch-size independence holds with per-seed prompts too (within float32 batching noise).
    r = run("sample", "--schedule", s, "--n", 4, "--batch-size", 4, "--prompt-file", pf, "--out", tmp_path / "z.npz")
    assert r.exit_code == 0, r.stderr
    with np.load(out, allow_pickle=False) as a, np.load(tmp_path / "z.npz", allow_pickle=False) as b:
        assert np.abs(a["latents"] - b["latents"]).max() <= 1e-5 * np.abs(b["latents"]).max()
