"""Write the published Align Your Steps schedules as stepopt v1 files in ``schedules/published/``.

Sabour, Fidler, Kreis, "Align Your Steps" (ICML 2024, arXiv 2404.14507) published 10-step
schedules for four models we do not ship (paper Table 3, App. B.3; timestep indices on NVIDIA's
quickstart page https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html). The numbers
below are copied from those sources (collected in ``ays_published.json`` of the project's shared
data); when that JSON is present (``--check-json PATH``), the script verifies they agree.

Conventions for models stepopt does not have (documented in every file):

* ``model.id``: ``diffusers:<Hugging Face repo id>`` of the checkpoint the authors used, e.g.
  ``diffusers:runwayml/stable-diffusion-v1-5`` (what the quickstart loads); point ``--model`` at a
  local copy of it.
* ``model.fingerprint``: ``unknown:published-table`` (no weights were hashed; loading the file for a
  real model needs the usual fingerprint override).
* ``model.time``: ``vp-discrete`` with integer ``timesteps`` for SD 1.5, SDXL and DeepFloyd-IF
  (DDPM models with 1000 steps); ``sigma`` for SVD (a continuous-time EDM model).
* ``sigmas``: for the discrete models the exact sigma table of the model's beta schedule at the
  published timesteps, computed in float32 as diffusers does (what the quickstart's DPM-Solver++
  runs and the table stepopt's diffusers loader uses; ComfyUI's float64 table differs by up to
  1.3e-5 relative); the paper's 3-decimal values are kept in ``method.config.paper_sigmas``
  together with their largest difference. For SVD the paper's values.
* ``final_step: none``: the original lists end at sigma_min (timestep 0); several integrations
  replace that last sigma by 0 (a final jump with the last denoiser output); the file says so.
* ``solver``: ``dpmpp-2m`` for SD 1.5, SDXL and IF (the quickstart pipes the timesteps into
  diffusers' DPMSolverMultistepScheduler); ``euler`` for SVD (its pipeline's EulerDiscreteScheduler;
  the paper does not tie its SVD table to one solver).

Run: ``.venv/bin/python scripts/make_published_ays.py [--out schedules/published] [--check-json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stepopt.frames import EDM, NoiseFrame, VPDiscrete
from stepopt.provenance import provenance
from stepopt.schedule import MethodInfo, ModelRef, Schedule
from stepopt.solvers import get_solver

PAPER = (
    "Sabour, Fidler, Kreis. Align Your Steps: Optimizing Sampling Schedules in Diffusion Models. "
    "ICML 2024, arXiv 2404.14507"
)
QUICKSTART = "https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html"
FINGERPRINT = "unknown:published-table"

SD_FRAME = VPDiscrete(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
IF_FRAME = VPDiscrete(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)

# Values copied from the paper's Table 3 and the quickstart page (see the module docstring).
PUBLISHED: list[dict[str, Any]] = [
    {
        "file": "ays-sd15.yaml",
        "model": "Stable Diffusion 1.5",
        "id": "diffusers:runwayml/stable-diffusion-v1-5",
        "frame": SD_FRAME,
        "solver": "dpmpp-2m",
        "paper_sigmas": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
        "timesteps": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0],
        "timesteps_source": "NVIDIA AYS quickstart page (diffusers example); also diffusers AysSchedules",
    },
    {
        "file": "ays-sdxl.yaml",
        "model": "SDXL",
        "id": "diffusers:stabilityai/stable-diffusion-xl-base-1.0",
        "frame": SD_FRAME,
        "solver": "dpmpp-2m",
        "paper_sigmas": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.38, 0.234, 0.113, 0.029],
        "timesteps": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0],
        "timesteps_source": "NVIDIA AYS quickstart page, as quoted in huggingface/diffusers issue #7760",
    },
    {
        "file": "ays-deepfloyd-if-stage1.yaml",
        "model": "DeepFloyd-IF Stage 1",
        "id": "diffusers:DeepFloyd/IF-I-XL-v1.0",
        "frame": IF_FRAME,
        "solver": "dpmpp-2m",
        "paper_sigmas": [160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.03, 0.006],
        "timesteps": [995, 920, 811, 686, 555, 418, 315, 174, 109, 12, 0],
        "timesteps_source": "NVIDIA AYS quickstart page, as quoted in huggingface/diffusers issue #7760",
    },
    {
        "file": "ays-svd.yaml",
        "model": "Stable Video Diffusion (img2vid)",
        "id": "diffusers:stabilityai/stable-video-diffusion-img2vid",
        "frame": EDM(0.002, 700.0),
        "solver": "euler",
        "paper_sigmas": [700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
        "timesteps": None,
        "timesteps_source": None,
    },
]

INTEGRATIONS = (
    "the original list ends at sigma_min (timestep 0, sigma {last}) after 10 model evaluations; "
    "diffusers' AysSchedules sigma lists and ComfyUI replace that final sigma by 0 (a last jump with the "
    "previous denoiser output, no extra evaluation) and diffusers' timestep lists drop the trailing 0; "
    "A1111/Forge interpolate to n values and append 0. Other step counts: log-linear interpolation "
    "(stepopt baseline interpolate --from THIS_FILE --nfe N)."
)


def table_sigmas(frame: NoiseFrame, timesteps: list[int]) -> np.ndarray:
    """The model's discrete sigma table sqrt((1 - abar_t) / abar_t) at integer timesteps: diffusers'
    float32 table, the one stepopt's diffusers loader uses (``VPDiscrete.sigma_table``)."""
    assert isinstance(frame, VPDiscrete)
    return np.asarray(frame.sigma_table[np.asarray(timesteps, dtype=np.int64)], dtype=np.float64)


def build(entry: dict[str, Any]) -> tuple[Schedule, dict[str, Any]]:
    frame: NoiseFrame = entry["frame"]
    paper = np.asarray(entry["paper_sigmas"], dtype=np.float64)
    check: dict[str, Any] = {}
    if entry["timesteps"] is not None:
        sig = table_sigmas(frame, entry["timesteps"])
        diff = np.abs(sig - paper)
        # The paper's 3-decimal sigmas sit at fractional timesteps; do they round to the published integers?
        t_paper = np.asarray(frame.time(paper), dtype=np.float64)
        check = {
            "max_abs_diff_table_vs_paper": float(diff.max()),
            "within_paper_rounding": bool(np.all(diff <= 0.0005 + 1e-12)),
            "entries_off_rounding": [int(i) for i in np.nonzero(diff > 0.0005 + 1e-12)[0]],
            "paper_sigmas_as_timesteps": [round(float(t), 2) for t in t_paper],
            "paper_timesteps_round_to_published": bool(np.all(np.rint(t_paper) == np.asarray(entry["timesteps"]))),
        }
        time_domain = "vp-discrete"
        timesteps: tuple[float, ...] | None = tuple(float(t) for t in entry["timesteps"])
        assert isinstance(frame, VPDiscrete)
        smin, smax = float(frame.sigma_table[0]), float(frame.sigma_table[-1])
    else:
        sig = paper
        time_domain = "sigma"
        timesteps = None
        smin, smax = float(frame.t_min), float(frame.t_max)
    spec = get_solver(entry["solver"])
    ident = spec.identity()
    n_steps = len(sig) - 1
    config: dict[str, Any] = {
        "published": True,
        "model": entry["model"],
        "source": f"{PAPER}, Table 3 (App. B.3)",
        "paper_sigmas": paper.tolist(),
        "timesteps_source": entry["timesteps_source"],
        "frame": frame.describe(),
        "sigmas_are": (
            "the model's discrete sigma table at the published timesteps (diffusers' float32 table)"
            if entry["timesteps"] is not None
            else "the paper's values"
        ),
        "final_sigma_handling": INTEGRATIONS.format(last=float(sig[-1])),
        "solver_note": (
            "the quickstart runs these timesteps with diffusers' DPMSolverMultistepScheduler"
            if entry["solver"] == "dpmpp-2m"
            else "SVD's pipeline uses EulerDiscreteScheduler; the paper does not tie this table to one solver"
        ),
        "optimized_for": "stochastic-DDIM KLUB, early-stopped by the authors (solver and criterion not published)",
        **({"check": check} if check else {}),
    }
    sched = Schedule(
        model=ModelRef(entry["id"], FINGERPRINT, smin, smax, time_domain),
        solver=ident,
        nfe=spec.nfe(ident, n_steps, "none"),
        sigmas=tuple(float(s) for s in sig),
        timesteps=timesteps,
        final_step="none",
        method=MethodInfo(name="ays", config=config),
        provenance=provenance(paper=PAPER, quickstart=QUICKSTART),
    )
    return sched, check


def check_json(path: Path) -> list[str]:
    """Differences between the numbers above and the shared JSON (empty when they agree)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    by_model: dict[tuple[str, str], list[float]] = {
        (s["model"], s["kind"]): s["values"] for s in data["schedules"] if s["steps"] == 10
    }
    for e in PUBLISHED:
        if by_model.get((e["model"], "sigmas")) != e["paper_sigmas"]:
            problems.append(f"{e['model']}: sigmas differ from {path}")
        if e["timesteps"] is not None and by_model.get((e["model"], "discrete_timesteps")) != e["timesteps"]:
            problems.append(f"{e['model']}: timesteps differ from {path}")
    # ComfyUI's high-precision SD1/SDXL lists are the SD sigma table at the published timesteps,
    # computed in float64; ours is diffusers' float32 table (float32 cumprod: up to 1.3e-5 relative).
    comfy = next((c["entries"] for c in data.get("integration_copies", []) if "ComfyUI" in c["where"]), {})
    for name, entry in (("SD1", PUBLISHED[0]), ("SDXL", PUBLISHED[1])):
        if name in comfy:
            ours = table_sigmas(entry["frame"], entry["timesteps"])
            ref = np.asarray(comfy[name]["values"], dtype=np.float64)
            err = float(np.max(np.abs(ours / ref - 1)))
            print(
                f"{entry['model']}: SD sigma table at the published timesteps vs ComfyUI's list: "
                f"max relative diff {err:.1e}"
            )
            if err > 2e-5:
                problems.append(f"{entry['model']}: SD sigma table differs from ComfyUI's list by {err:.1e} relative")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("schedules/published"))
    ap.add_argument("--check-json", type=Path, default=None, help="ays_published.json to cross-check the numbers")
    args = ap.parse_args(argv)
    if args.check_json is not None:
        problems = check_json(args.check_json)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        print(f"numbers agree with {args.check_json}")
    for e in PUBLISHED:
        sched, check = build(e)
        path = sched.save(args.out / e["file"])
        note = f"; table vs paper max |diff| {check['max_abs_diff_table_vs_paper']:.2e}" if check else ""
        if check and check["entries_off_rounding"]:
            note += f" (entries {check['entries_off_rounding']} beyond 3-decimal rounding)"
        if check:
            note += f"; paper sigmas as timesteps {check['paper_sigmas_as_timesteps']}"
            note += f" round to the published ones: {check['paper_timesteps_round_to_published']}"
        print(f"wrote {path}: {e['model']}, {sched.solver.name}, {sched.n_steps} steps{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
