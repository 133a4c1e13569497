"""A schedule in other tools' conventions: diffusers, k-diffusion, ComfyUI, JSON and CSV.

Every export states the same thing as the schedule file, or refuses: where a tool cannot express
the schedule's solver identity exactly (for example stepopt's ``exact`` DPM++(3M) variant, or a
decoupled ``model_sigmas`` grid, which no diffusers scheduler can evaluate), :func:`export_text`
raises :class:`ExportRefused` with one sentence saying why. With ``force=True`` the nearest
expression is written instead and its ``differences`` list says what is not the same.

**diffusers** (DDPM-style pipelines, model time ``vp-discrete``). The network of a DDPM model is
only defined at integer timesteps, and diffusers' schedulers evaluate it there, so the grid must
lie on integer timesteps (the schedule's ``timesteps``, within :data:`INTEGER_TOL`). The grid's
N+1 sigmas become the scheduler's ``sigmas`` as follows:

- ``final_step: none``: the last grid point must be timestep 0, which diffusers reaches with
  ``final_sigmas_type="sigma_min"``; the call gets the other N timesteps.
- ``final_step: denoise``: the call gets all N+1 timesteps and ``final_sigmas_type="zero"``; the
  last step, from ``sigma_N`` to 0, is first order in diffusers, which is exactly ``D(x, sigma_N)``.

The step orders are then matched one by one: diffusers lowers the order on its last steps only
with ``lower_order_final`` and (DPM-Solver++) fewer than 15 steps, stepopt's policy does not depend
on N (``min(s+1, K, N-s)`` or ``min(s+1, K)``); an identity whose order sequence no setting
reproduces is refused. Scheduler keyword arguments are those that change the solver; the noise
table and ``prediction_type`` come from the pipeline's own scheduler config
(``Scheduler.from_config(pipe.scheduler.config, **kwargs)``). ``UniPCMultistepScheduler`` takes
no custom grid in ``set_timesteps`` (its ``sigmas=`` is for flow models only), so its export
carries an ``override`` (timesteps and sigmas to assign after ``set_timesteps(N)``).

States: diffusers' DPM-Solver++ and UniPC schedulers step the VP state ``x_t = x / sqrt(1 +
sigma^2)``, Euler steps stepopt's own ``x``; ``init_latents_scale`` is the factor that turns unit
noise into stepopt's initial state in the scheduler's frame, and ``output_scale`` turns the
scheduler's final sample into stepopt's sample.

**k-diffusion / ComfyUI**: the sigma list itself (k-diffusion's frame is stepopt's), with a
trailing 0 for ``final_step: denoise`` (their samplers' last step to sigma 0 returns the
denoiser's output).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepopt.errors import StepoptError
from stepopt.io import atomic_write_text
from stepopt.jsontext import json_text
from stepopt.schedule import Schedule

FORMATS = ("diffusers", "diffusers-python", "k-diffusion", "comfyui", "json", "csv")
EXPORT_FORMAT = "stepopt.export/v1"

# A native time within this of an integer counts as that integer timestep (schedule files store
# times computed in float64 from the sigmas, so integer grids come back as k +- 1e-9 at worst).
INTEGER_TOL = 1e-6
# DPMSolverMultistepScheduler lowers its final orders only for fewer timesteps than this.
DPM_LOF_MAX_STEPS = 15


class ExportRefused(StepoptError):
    """The target tool cannot express the schedule exactly (``force`` writes the nearest form)."""


def _refuse_or_note(reason: str, force: bool, differences: list[str]) -> None:
    if not force:
        raise ExportRefused(f"{reason} (`force` writes the nearest form and lists what differs)")
    differences.append(reason)


# -- order sequences --------------------------------------------------------------------------


def stepopt_orders(order: int, n_steps: int, lower_order_final: bool) -> list[int]:
    """Orders of stepopt's multistep steps: ``min(s+1, K, N-s)`` with lower_order_final, else ``min(s+1, K)``."""
    out = []
    for s in range(n_steps):
        k = min(s + 1, order)
        out.append(min(k, n_steps - s) if lower_order_final else k)
    return out


def dpm_orders(order: int, n_timesteps: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Orders of diffusers' DPMSolverMultistepScheduler steps (``euler_at_final=False``)."""
    lof = lower_order_final and n_timesteps < DPM_LOF_MAX_STEPS
    out = []
    for j in range(n_timesteps):
        k = min(j + 1, order)
        if j == n_timesteps - 1 and (lof or final_zero):
            k = 1
        elif j == n_timesteps - 2 and lof:
            k = min(k, 2)
        out.append(k)
    return out


def unipc_orders(order: int, n_timesteps: int, lower_order_final: bool) -> list[int]:
    """Orders of diffusers' UniPCMultistepScheduler steps: ``min(K, len - j)`` with the flag, then warm-up."""
    return [min(min(order, n_timesteps - j) if lower_order_final else order, j + 1) for j in range(n_timesteps)]


# -- diffusers -------------------------------------------------------------------------------


def _integer_timesteps(s: Schedule, force: bool, differences: list[str]) -> list[int]:
    if s.timesteps is None:
        raise ExportRefused("the schedule has no native timesteps; diffusers needs the model's integer timesteps")
    ts = [round(t) for t in s.timesteps]
    off = [(i, t) for i, t in enumerate(s.timesteps) if abs(t - round(t)) > INTEGER_TOL]
    if off:
        i, t = off[0]
        _refuse_or_note(
            f"timesteps[{i}] = {t!r} is not an integer timestep ({len(off)} of {len(ts)} are not); diffusers "
            "evaluates DDPM networks at integer timesteps only (make the grid with integer timesteps)",
            force,
            differences,
        )
    if any(b >= a for a, b in itertools.pairwise(ts)):
        raise ExportRefused(f"timesteps {ts} are not strictly decreasing after rounding to integers")
    return ts


def diffusers_export(s: Schedule, force: bool = False) -> dict[str, Any]:
    """The diffusers scheduler class, keyword arguments and call that reproduce ``s`` (JSON-ready)."""
    differences: list[str] = []
    ident = s.solver
    if s.model.time == "flow":
        return _flow_match_export(s, force, differences)
    if s.model.time != "vp-discrete":
        raise ExportRefused(
            f"the model's time domain is '{s.model.time}'; diffusers' DDPM-style schedulers need a model with "
            "integer DDPM timesteps (vp-discrete, e.g. diffusers:PATH); use k-diffusion or comfyui as `to`"
        )
    if s.model_sigmas is not None:
        _refuse_or_note(
            "the schedule has decoupled model_sigmas (the network sees other noise levels than the solver's);"
            " diffusers evaluates the network at the grid's own timesteps",
            force,
            differences,
        )
    ts = _integer_timesteps(s, force, differences)
    n = s.n_steps
    denoise = s.final_step == "denoise"
    if not denoise and ts[-1] != 0:
        _refuse_or_note(
            f"the grid ends at timestep {ts[-1]}, not 0; diffusers' last sigma is sigma(t=0) (final_sigmas_type"
            " 'sigma_min') or 0 (a final denoising step)",
            force,
            differences,
        )
    call_ts = ts if denoise else ts[:-1]
    final_sigmas_type = "zero" if denoise else "sigma_min"
    want = stepopt_orders(ident.order, n, bool(ident.lower_order_final)) + ([1] if denoise else [])
    kwargs: dict[str, Any]
    override: dict[str, Any] | None = None
    call: dict[str, Any] = {"timesteps": call_ts}
    state = "vp"
    name = ident.name

    def pick_lof(orders_for: Any) -> bool:
        for lof in (bool(ident.lower_order_final), not ident.lower_order_final):
            if orders_for(lof) == want:
                return lof
        got = orders_for(bool(ident.lower_order_final))
        _refuse_or_note(
            f"diffusers cannot reproduce the step orders of {ident} with final_step {s.final_step}"
            f" on {n} steps: stepopt {want}, diffusers {got}",
            force,
            differences,
        )
        return bool(ident.lower_order_final)

    if name == "euler":
        cls = "EulerDiscreteScheduler"
        kwargs = {"final_sigmas_type": final_sigmas_type, "timestep_spacing": "linspace", "use_karras_sigmas": False}
        state = "edm"
    elif name in ("dpmpp-2m", "dpmpp-3m"):
        if name == "dpmpp-3m" and ident.variant != "reference":
            variant = ident.variant or "exact (2 phi_3)"
            _refuse_or_note(
                f"solver dpmpp-3m variant {variant} is not diffusers' DPM-Solver++(3M), which integrates phi_3 once"
                " (variant 'reference')",
                force,
                differences,
            )
        lof = pick_lof(lambda lof: dpm_orders(ident.order, len(call_ts), lof, denoise))
        cls = "DPMSolverMultistepScheduler"
        kwargs = {
            "algorithm_type": "dpmsolver++",
            "solver_order": ident.order,
            "solver_type": "midpoint",
            "lower_order_final": lof,
            "euler_at_final": False,
            "final_sigmas_type": final_sigmas_type,
            "use_karras_sigmas": False,
            "use_lu_lambdas": False,
        }
    elif name == "unipc":
        lof = pick_lof(lambda lof: unipc_orders(ident.order, len(call_ts), lof))
        cls = "UniPCMultistepScheduler"
        kwargs = {
            "solver_order": ident.order,
            "solver_type": ident.variant,
            "predict_x0": True,
            "lower_order_final": lof,
            "disable_corrector": [],
            "final_sigmas_type": final_sigmas_type,
            "use_karras_sigmas": False,
        }
        call = {"num_inference_steps": len(call_ts)}
        override = {"timesteps": call_ts, "sigmas": [*s.sigmas, 0.0] if denoise else list(s.sigmas)}
    else:
        raise ExportRefused(
            f"solver '{name}' has no diffusers scheduler mapped (supported: euler, dpmpp-2m, dpmpp-3m, unipc)"
        )
    a0 = 1.0 / math.sqrt(1.0 + s.sigmas[0] ** 2)
    a_last = 1.0 / math.sqrt(1.0 + s.sigmas[-1] ** 2)
    return {
        "format": EXPORT_FORMAT,
        "to": "diffusers",
        "scheduler": {"class": cls, "kwargs": kwargs},
        "set_timesteps": call,
        "override": override,
        "init_latents_scale": s.sigmas[0] * (a0 if state == "vp" else 1.0),
        "output_scale": 1.0 if denoise or state == "edm" else 1.0 / a_last,
        "exact": not differences,
        "differences": differences,
        "schedule": _identity(s),
    }


def _flow_match_export(s: Schedule, force: bool, differences: list[str]) -> dict[str, Any]:
    """A flow schedule for diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3 / FLUX / Wan pipelines).

    Those pipelines take ``sigmas=``: *unshifted* times u that the scheduler shifts with its ``shift``
    (or ``mu``) and ends with t = 0. So the call gets ``u_i = unshift(t_i)`` for the N+1 grid times
    ``t_i = sigma_i / (1 + sigma_i)`` (sigma = inf: u = 1), with the shift (or mu) the file records,
    and the last jump to t = 0 is the schedule's ``final_step: denoise``. FlowMatchEuler is Euler,
    which in the flow frame equals stepopt's ``euler`` (DDIM) step for step.
    """
    if s.solver.name != "euler":
        raise ExportRefused(
            f"solver '{s.solver.name}': diffusers' flow pipelines step with FlowMatchEulerDiscreteScheduler"
            " (Euler); export an euler schedule, or use json as `to`"
        )
    if s.final_step != "denoise":
        _refuse_or_note(
            "FlowMatchEulerDiscreteScheduler always ends with a step to t = 0 (final_step: denoise)", force, differences
        )
    if s.model_sigmas is not None:
        _refuse_or_note(
            "the schedule has decoupled model_sigmas; the pipeline evaluates the network at the grid's own times",
            force,
            differences,
        )
    shift = s.model.shift if s.model.shift is not None else 1.0
    t = [1.0 if math.isinf(x) else x / (1.0 + x) for x in s.sigmas]
    u = [ti / (shift - (shift - 1.0) * ti) for ti in t]
    call: dict[str, Any] = {"sigmas": u}
    kwargs: dict[str, Any]
    if s.model.mu is not None:
        kwargs = {"use_dynamic_shifting": True, "time_shift_type": "exponential"}
        call["mu"] = s.model.mu
    else:
        kwargs = {"shift": shift, "use_dynamic_shifting": False}
    return {
        "format": EXPORT_FORMAT,
        "to": "diffusers",
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "kwargs": kwargs},
        "set_timesteps": call,
        "override": None,
        # The pipeline's initial latents are the noise at t_0 (t_0 = 1: pure noise, scale 1).
        "init_latents_scale": t[0],
        "output_scale": 1.0,
        "exact": not differences,
        "differences": differences,
        "schedule": _identity(s),
    }


def _identity(s: Schedule) -> dict[str, Any]:
    return {
        "model": s.model.id,
        "fingerprint": s.model.fingerprint,
        "solver": s.solver.to_dict(),
        "nfe": s.nfe,
        "final_step": s.final_step,
        "method": s.method.name,
    }


def diffusers_python(s: Schedule, force: bool = False) -> str:
    """A ready-to-run Python snippet that samples with ``s`` through a diffusers pipeline's UNet."""
    if s.model.time == "flow":
        raise ExportRefused(
            "no snippet for flow models yet: use diffusers as `to` (pipe(..., sigmas=..., mu=...) with its scheduler)"
        )
    d = diffusers_export(s, force)
    sch = d["scheduler"]
    model = s.model.id
    folder = model.split(":", 1)[1] if model.startswith("diffusers:") else "PATH/TO/PIPELINE"
    kw = ",\n    ".join(f"{k}={v!r}" for k, v in sch["kwargs"].items())
    lines = [f"# stepopt schedule: {s.method.name}, {s.solver}, NFE {s.nfe}, final_step {s.final_step}"]
    lines += [f"# NOT EXACT: {x}" for x in d["differences"]]
    lines += [
        "import torch",
        f"from diffusers import DiffusionPipeline, {sch['class']}",
        "",
        f"pipe = DiffusionPipeline.from_pretrained({folder!r})",
        f"scheduler = {sch['class']}.from_config(",
        f"    pipe.scheduler.config,\n    {kw},",
        ")",
    ]
    call = ", ".join(f"{k}={v!r}" for k, v in d["set_timesteps"].items())
    lines.append(f"scheduler.set_timesteps({call})")
    if d["override"] is not None:
        lines += [
            "# UniPCMultistepScheduler.set_timesteps takes no custom grid: assign it after set_timesteps.",
            f"scheduler.timesteps = torch.tensor({d['override']['timesteps']!r})",
            f"scheduler.sigmas = torch.tensor({d['override']['sigmas']!r}, dtype=torch.float32)",
        ]
    if d["override"] is None:
        lines.append(
            "# Pipelines whose __call__ takes timesteps= (e.g. text-to-image): pipe.scheduler = scheduler; "
            f"pipe(prompt, {call})"
        )
    lines += [
        "",
        "# stepopt's initial noise for seed i: float64 randn from torch.Generator().manual_seed(i), one sample each",
        "unet = pipe.unet",
        "shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)",
        "noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[None]",
        f"x = (noise * {d['init_latents_scale']!r}).to(unet.dtype)",
        "with torch.no_grad():",
        "    for t in scheduler.timesteps:",
        "        model_input = scheduler.scale_model_input(x, t)",
        "        x = scheduler.step(unet(model_input, t).sample, t, x).prev_sample",
        f"sample = x * {d['output_scale']!r}  # stepopt's sample (its frame x = x0 + sigma eps)",
        "",
    ]
    return "\n".join(lines)


# -- k-diffusion, ComfyUI, JSON, CSV ------------------------------------------------------------


def k_diffusion_sigmas(s: Schedule, force: bool = False, differences: list[str] | None = None) -> list[float]:
    """The sigma list in k-diffusion's convention: the grid, plus a trailing 0 for ``final_step: denoise``."""
    diffs = differences if differences is not None else []
    if math.isinf(s.sigmas[0]):
        # Not even with --force: there is no nearest finite form of a grid from pure noise.
        raise ExportRefused(
            "the grid starts at sigma = inf (pure noise, a flow model): k-diffusion samplers start from "
            "sigma_max * noise and ComfyUI's flow models take flow times t, not sigmas; use json or csv as `to` "
            "(their timesteps are the flow times t)"
        )
    if s.model_sigmas is not None:
        _refuse_or_note(
            "the schedule has decoupled model_sigmas; a sigma list gives the network the solver's own sigmas",
            force,
            diffs,
        )
    return [*s.sigmas, 0.0] if s.final_step == "denoise" else list(s.sigmas)


def k_diffusion_sampler(s: Schedule) -> str | None:
    """The k-diffusion sampler whose steps equal stepopt's on this schedule's sigma list, or None."""
    ident = s.solver
    if ident.name == "euler":
        return "sample_euler"
    if ident.name == "dpmpp-2m":
        # k-diffusion's 2M: first step first order, then second order except a last step into sigma 0.
        k_orders = [1] + [2] * (s.n_steps - 1)
        want = stepopt_orders(2, s.n_steps, bool(ident.lower_order_final))
        return "sample_dpmpp_2m" if want == k_orders else None
    return None


def k_diffusion_export(s: Schedule, force: bool = False) -> dict[str, Any]:
    diffs: list[str] = []
    sig = k_diffusion_sigmas(s, force, diffs)
    return {
        "format": EXPORT_FORMAT,
        "to": "k-diffusion",
        "sigmas": sig,
        "sampler": k_diffusion_sampler(s),
        "exact": not diffs,
        "differences": diffs,
        "schedule": _identity(s),
    }


def comfyui_string(s: Schedule, force: bool = False) -> str:
    """Comma-separated sigmas, as ComfyUI's custom-sigma nodes take them (trailing 0 for denoise)."""
    return ", ".join(repr(x) for x in k_diffusion_sigmas(s, force))


def grid_rows(s: Schedule) -> list[dict[str, Any]]:
    """One row per grid point: index, sigma, lam = -log sigma, native time and model sigma (or None)."""
    rows = []
    for i, sig in enumerate(s.sigmas):
        rows.append(
            {
                "i": i,
                "sigma": sig,
                "lam": -math.log(sig),
                "timestep": None if s.timesteps is None else s.timesteps[i],
                "model_sigma": None if s.model_sigmas is None else s.model_sigmas[i],
            }
        )
    return rows


def json_export(s: Schedule) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "to": "json",
        **_identity(s),
        "time": s.model.time,
        "sigmas": list(s.sigmas),
        "lam": [-math.log(x) for x in s.sigmas],
        "timesteps": None if s.timesteps is None else list(s.timesteps),
        "model_sigmas": None if s.model_sigmas is None else list(s.model_sigmas),
    }


def csv_text(s: Schedule) -> str:
    rows = grid_rows(s)
    cols = ["i", "sigma", "lam"]
    if s.timesteps is not None:
        cols.append("timestep")
    if s.model_sigmas is not None:
        cols.append("model_sigma")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in cols])
    return buf.getvalue()


def export_with_differences(s: Schedule, to: str, force: bool = False) -> tuple[str, list[str]]:
    """The text of ``s`` in format ``to`` and what it does not reproduce (empty unless ``force``)."""
    if to == "diffusers":
        d = diffusers_export(s, force)
        return json_text(d, indent=2) + "\n", d["differences"]
    if to == "diffusers-python":
        return diffusers_python(s, force), diffusers_export(s, force)["differences"]
    if to == "k-diffusion":
        d = k_diffusion_export(s, force)
        return json_text(d, indent=2) + "\n", d["differences"]
    if to == "comfyui":
        diffs: list[str] = []
        sig = k_diffusion_sigmas(s, force, diffs)
        return ", ".join(repr(x) for x in sig) + "\n", diffs
    if to == "json":
        return json_text(json_export(s), indent=2) + "\n", []
    if to == "csv":
        return csv_text(s), []
    raise StepoptError(f"unknown export format '{to}'; expected one of {', '.join(FORMATS)}")


def export_text(s: Schedule, to: str, force: bool = False) -> str:
    """The text of ``s`` in format ``to`` (one of :data:`FORMATS`); raises :class:`ExportRefused`."""
    return export_with_differences(s, to, force)[0]


def export_schedule(
    s: Schedule, to: str, out: str | os.PathLike[str] | None = None, *, force: bool = False
) -> str | Path:
    """Write ``s`` in format ``to`` to ``out`` atomically (returning the path), or return the text."""
    text = export_text(s, to, force)
    if out is None:
        return text
    return atomic_write_text(out, text)


def parse_sigmas(text: str) -> Sequence[float]:
    """Read back a ComfyUI sigma string (for tests and round trips)."""
    return [float(x) for x in text.replace("\n", " ").split(",") if x.strip()]
