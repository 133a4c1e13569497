"""Flow-matching diffusers pipelines through ``diffusers:PATH``: SD3-style and FLUX-style folders (issue 14).

Where the numbers come from:

- Parity: ``stepopt baseline flow-default --final-step denoise`` then ``stepopt sample --no-decode``
  is run against diffusers' own ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (code nobody here
  wrote) on the same tiny random folder, with the same initial noise (``latents=``; FLUX packed),
  the same prompts per seed and ``sigmas=`` from ``stepopt export --to diffusers`` (FLUX also its
  ``mu``), ``output_type="latent"``. diffusers keeps its latents, sigmas and timesteps in float32
  and stepopt steps in the sigma frame in float64 coefficients on a float32 state, so the two
  agree to float32 rounding carried through 4 steps: measured 4.5e-7 (SD3, guidance 5) and 1.0e-7
  (FLUX, embedded guidance 3.5) relative to the largest latent value; RTOL = 1e-5 as the issue
  asks. The same comparison at another guidance scale differs by far more than RTOL (checked), so
  the test fails if the guidance is dropped or applied elsewhere.
- FLUX's ``mu`` is checked against diffusers' ``calculate_shift`` on the packed sequence length,
  and the shifted times against the scheduler's sigmas after ``set_timesteps(sigmas=, mu=)``.
- One evaluation: a forward hook counts transformer calls and their rows (SD3 with guidance: one
  call of 2B rows per evaluation; FLUX: one call of B rows carrying ``guidance``).
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

from _tiny_flow import make_tiny_flux, make_tiny_sd3
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.models import load_model
from stepopt.models.diffusers import DiffusersLatent, configure_conditioning
from stepopt.sampling import unit_noise
from stepopt.schedule import Schedule

diffusers = pytest.importorskip("diffusers")
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers (CLIP / T5 text encoders) is not installed", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

RTOL = 1e-5
PROMPTS = ["a photo of a cat", "the red dog"]
FLUX_RES = ":height=16,width=16"  # 8x8 latent, 16 packed tokens
runner = CliRunner()


def run(*args: Any):
    extra = ["--trust-code"] if args and args[0] in ("optimize", "sample", "eval", "baseline") else []
    return runner.invoke(app, [str(a) for a in args] + extra, catch_exceptions=False)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _stepopt_default_grid(tmp_path: Path, model: str, nfe: int, guidance: float) -> tuple[Schedule, np.ndarray]:
    """``baseline flow-default`` (euler, final denoise) and ``sample --no-decode`` of seeds 0..2 with PROMPTS."""
    s, out, pf = tmp_path / "s.yaml", tmp_path / "x.npz", tmp_path / "p.txt"
    pf.write_text("\n".join(PROMPTS) + "\n")
    r = run("baseline", "flow-default", "-m", model, "-s", "euler", "--nfe", nfe, "--final-step", "denoise", "-o", s)
    assert r.exit_code == 0, r.stderr
    r = run(
        "sample", "--schedule", s, "--n", 3, "--prompt-file", pf, "--guidance", guidance, "--force",
        "--no-decode", "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    with np.load(out, allow_pickle=False) as f:
        return Schedule.load(s), f["samples"]


def _export(s: Path | Schedule) -> dict[str, Any]:
    from stepopt.export import diffusers_export

    return diffusers_export(s if isinstance(s, Schedule) else Schedule.load(s))


def test_sd3_pipeline_default_grid_matches_stable_diffusion_3_pipeline(tmp_path: Path, sd3_folder: Path) -> None:
    sched, ours = _stepopt_default_grid(tmp_path, f"diffusers:{sd3_folder}", 5, 5.0)
    assert sched.model.time == "flow" and sched.model.shift == 3.0 and sched.model.mu is None
    assert sched.sigmas[0] == float("inf") and sched.nfe == 5 and sched.final_step == "denoise"
    call = _export(sched)["set_timesteps"]
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = unit_noise((4, 8, 8), [0, 1, 2]).float()

    def reference(guidance: float) -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                [PROMPTS[i % 2] for i in range(3)],
                sigmas=call["sigmas"],
                latents=noise,
                guidance_scale=guidance,
                output_type="latent",
            ).images

    ref = reference(5.0)
    assert _rel(torch.from_numpy(ours), ref) < RTOL
    assert _rel(torch.from_numpy(ours), reference(2.0)) > 100 * RTOL  # the guidance matters at this size


def test_flux_pipeline_default_grid_matches_flux_pipeline(tmp_path: Path, flux_folder: Path) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched, ours = _stepopt_default_grid(tmp_path, f"diffusers:{flux_folder}{FLUX_RES}", 5, 3.5)
    pipe = diffusers.FluxPipeline.from_pretrained(flux_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.scheduler.config
    mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert sched.model.mu == pytest.approx(mu, rel=1e-15) and sched.model.shift == pytest.approx(np.exp(mu))
    call = _export(sched)["set_timesteps"]
    assert call["mu"] == sched.model.mu
    model = load_model(f"diffusers:{flux_folder}{FLUX_RES}")
    assert isinstance(model, DiffusersLatent)
    net: Any = model.inner
    noise = unit_noise((4, 8, 8), [0, 1, 2]).float()

    def reference(guidance: float) -> torch.Tensor:
        with torch.no_grad():
            out = pipe(
                [PROMPTS[i % 2] for i in range(3)],
                sigmas=call["sigmas"],
                latents=net.pack(noise),
                guidance_scale=guidance,
                height=16,
                width=16,
                output_type="latent",
            ).images
        return net.unpack(out)

    ref = reference(3.5)
    # The scheduler's shifted times are the schedule's native times (then t = 0, the final denoise).
    times = torch.tensor(sched.timesteps, dtype=torch.float64)
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), times, rtol=1e-6, atol=0)
    assert _rel(torch.from_numpy(ours), ref) < RTOL
    assert _rel(torch.from_numpy(ours), reference(1.0)) > 100 * RTOL  # embedded guidance reaches the network
    assert torch.equal(net.unpack(net.pack(noise)), noise)


def test_prompt_encoding_matches_the_pipelines(tmp_path: Path, sd3_folder: Path, flux_folder: Path) -> None:
    sd3 = configure_conditioning(load_model(f"diffusers:{sd3_folder}"), PROMPTS, negative_prompt="blue", guidance=5.0)
    assert sd3 is not None
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_folder, local_files_only=True)
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, device="cpu", negative_prompt=["blue"] * 2
        )
    cond, uncond = sd3.model.conditions()
    assert isinstance(cond, dict) and isinstance(uncond, dict)
    assert torch.equal(cond["encoder_hidden_states"], emb) and torch.equal(cond["pooled_projections"], pooled)
    assert torch.equal(uncond["encoder_hidden_states"][0], neg[0]) and torch.equal(
        uncond["pooled_projections"][0], neg_pooled[0]
    )
    # Without a T5 encoder the pipeline (and stepopt) use zeros for its tokens.
    no_t5 = make_tiny_sd3(tmp_path / "sd3-no-t5", with_t5=False)
    m = configure_conditioning(load_model(f"diffusers:{no_t5}"), PROMPTS, guidance=5.0)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
        no_t5, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    with torch.no_grad():
        emb = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False)[0]
    assert m is not None and torch.equal(m.model.conditions()[0]["encoder_hidden_states"], emb)
    flux = configure_conditioning(load_model(f"diffusers:{flux_folder}{FLUX_RES}"), PROMPTS, guidance=2.0)
    assert flux is not None
    pipe = diffusers.FluxPipeline.from_pretrained(flux_folder, local_files_only=True)
    with torch.no_grad():
        emb, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    cond = flux.model.conditions()[0]
    assert torch.equal(cond["encoder_hidden_states"], emb) and torch.equal(cond["pooled_projections"], pooled)
    assert cond["guidance"].tolist() == [2.0, 2.0]
    assert flux.record["guidance"] == 2.0 and flux.record["guidance_input"] == "embedded"


def test_one_transformer_call_per_evaluation(sd3_folder: Path, flux_folder: Path) -> None:
    """SD3 with guidance: one call of 2B rows; FLUX: one call of B rows with the guidance input."""
    from stepopt.build import baseline_schedule
    from stepopt.sampling import sample_schedule
    from stepopt.solvers import get_solver

    for model_id, guidance, rows in (
        (f"diffusers:{sd3_folder}", 5.0, 6),
        (f"diffusers:{flux_folder}{FLUX_RES}", 3.5, 3),
    ):
        conditioned = configure_conditioning(load_model(model_id), PROMPTS, guidance=guidance)
        assert conditioned is not None
        m = conditioned.model
        calls: list[tuple[int, Any]] = []

        def hook(mod: Any, args: Any, kwargs: dict[str, Any], out: Any, calls: list[Any] = calls) -> None:
            calls.append((int(kwargs["hidden_states"].shape[0]), kwargs.get("guidance")))

        handle = m.network.register_forward_hook(hook, with_kwargs=True)
        sched = baseline_schedule("flow-default", m, get_solver("euler").identity(), 3, final_step="denoise")
        with torch.no_grad():
            sample_schedule(m, sched, [0, 1, 2], cond=m.cond_for_seeds([0, 1, 2]))
        handle.remove()
        assert len(calls) == sched.nfe == 4 and all(r == rows for r, _ in calls)
        if m.guidance_input == "embedded":
            assert all(g is not None and g.tolist() == [3.5] * 3 for _, g in calls)
        else:
            assert all(g is None for _, g in calls)


def test_cli_flux_optimize_sample_eval(tmp_path: Path, flux_folder: Path) -> None:
    model = f"diffusers:{flux_folder}{FLUX_RES}"
    s = tmp_path / "s.yaml"
    r = run("optimize", "-m", model, "--prompt", "a red cat", "-s", "euler", "-n", 6, "--device", "cpu", "-o", s)
    assert r.exit_code == 0, r.stderr
    sched = Schedule.load(s)
    assert sched.nfe == 6 and sched.sigmas[0] == float("inf") and sched.model.mu is not None
    cond = sched.method.config["conditioning"]
    assert cond["guidance"] == 3.5 and cond["guidance_input"] == "embedded" and cond["prompts"] == ["a red cat"]
    out = tmp_path / "x.npz"
    r = run("sample", "--schedule", s, "--n", 2, "--out", out, "--grid", tmp_path / "g.png")
    assert r.exit_code == 0, r.stderr
    with np.load(out, allow_pickle=False) as f:
        assert f["samples"].shape == (2, 3, 16, 16) and f["latents"].shape == (2, 4, 8, 8)
    r = run("eval", s, "--metrics", "ode-error", "--n", 2, "--json")
    assert r.exit_code == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    assert row["time"] == "flow" and row["mu"] == sched.model.mu and row["shift"] == sched.model.shift
    assert np.isfinite(row["metrics"]["ode-error"]["rmse"])
    # Another resolution is another mu: refused without --force; the negative prompt is refused too.
    r = run("sample", "--schedule", s, "--model", f"diffusers:{flux_folder}:height=32,width=32", "--n", 1)
    assert r.exit_code == 1 and "made for flow" in r.stderr and "mu" in r.stderr
    r = run("sample", "--schedule", s, "--n", 1, "--negative-prompt", "blue")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "--negative-prompt" in r.stderr


def test_flow_folder_errors(tmp_path: Path, flux_folder: Path) -> None:
    with pytest.raises(StepoptError, match="height 18 must be a multiple of 4"):
        load_model(f"diffusers:{flux_folder}:height=18,width=16")
    with pytest.raises(StepoptError, match="expected height=H,width=W"):
        load_model(f"diffusers:{flux_folder}:depth=16")
    cfg_path = flux_folder / "scheduler" / "scheduler_config.json"
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(flux_folder, bad)
    cfg = json.loads(cfg_path.read_text())
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "use_karras_sigmas": True}))
    with pytest.raises(StepoptError, match="use_karras_sigmas"):
        load_model(f"diffusers:{bad}")
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "time_shift_type": "linear"}))
    with pytest.raises(StepoptError, match="time_shift_type"):
        load_model(f"diffusers:{bad}")
    # A FLUX transformer without a guidance embedding (schnell-style) has no guidance to set.
    plain = make_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    m = load_model(f"diffusers:{plain}{FLUX_RES}")
    assert isinstance(m, DiffusersLatent) and m.guidance_input == "none"
    with pytest.raises(StepoptError, match="`guidance`"):
        configure_conditioning(m, guidance=3.5)
    assert configure_conditioning(m, PROMPTS) is not None
