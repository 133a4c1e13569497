"""``stepopt baseline KIND``: write a hand-crafted schedule in the v1 format."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from stepopt._defaults import DEFAULT_MODEL
from stepopt.baselines import BASELINES, FLOW_BASELINES, interpolate_loglinear
from stepopt.cli.app import (
    DEFAULT_NFE,
    DEFAULT_SOLVER,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    FinalStep,
    FinalStepOpt,
    GuidanceOpt,
    JsonOpt,
    LofOpt,
    ModelOpt,
    NegativePromptOpt,
    NetDtype,
    NfeOpt,
    OrderOpt,
    PromptFileOpt,
    PromptOpt,
    SolverOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    VariantOpt,
    command,
    emit_json,
    err,
)
from stepopt.cli.common import check_writable, default_out, load_with_options, schedule_header, schedule_json
from stepopt.errors import StepoptError
from stepopt.provenance import provenance
from stepopt.schedule import MethodInfo, Schedule
from stepopt.solvers import get_solver

KINDS = (*BASELINES, *FLOW_BASELINES, "interpolate")


@command("baseline")
def baseline(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(KINDS)}.")],
    model: ModelOpt = DEFAULT_MODEL,
    solver: SolverOpt = DEFAULT_SOLVER,
    nfe: NfeOpt = DEFAULT_NFE,
    order: OrderOpt = None,
    variant: VariantOpt = None,
    lower_order_final: LofOpt = None,
    final_step: FinalStepOpt = FinalStep.none,
    rho: Annotated[float | None, typer.Option("--rho", help="EDM rho (kind edm only) [default: 7.0].")] = None,
    source: Annotated[Path | None, typer.Option("--from", help="Schedule file to resample (kind interpolate).")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file [default: schedules/<model>/<solver>/nfe<N>/<kind>.yaml]."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = NetDtype.float32,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: GuidanceOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a hand-crafted schedule (edm, logsnr, time-uniform, time-quadratic, kl-optimal, flow-default,
    interpolate)."""
    from stepopt.build import baseline_schedule
    from stepopt.model_cards import model_card

    if kind not in KINDS:
        raise StepoptError(f"unknown baseline '{kind}'; expected one of {', '.join(KINDS)}")
    if rho is not None and kind != "edm":
        raise StepoptError(f"--rho is only used by the 'edm' baseline, not '{kind}'")
    if out is not None:
        check_writable(out, "--out")  # before any work
    spec = get_solver(solver)
    ident = spec.identity(order, variant, lower_order_final)
    n_steps = spec.steps_for_nfe(ident, nfe, final_step.value)
    if kind == "interpolate":
        if source is None:
            raise StepoptError("baseline interpolate needs --from FILE (the schedule to resample)")
        src = Schedule.load(source)
        sig = interpolate_loglinear(src.sigmas, n_steps)
        sched = Schedule(
            model=src.model,
            solver=ident,
            nfe=nfe,
            sigmas=tuple(sig),
            method=MethodInfo(
                "interpolate",
                {"from": str(source), "from_method": src.method.name, "from_steps": src.n_steps, "rule": "log-linear"},
            ),
            final_step=final_step.value,
            provenance=provenance(),
        )
    else:
        if source is not None:
            raise StepoptError(f"--from is only for 'interpolate', not '{kind}'")
        # Built-ins described by a card need no torch (nor a device); other models are loaded.
        conditioned = bool(prompt) or prompt_file is not None or negative_prompt is not None or guidance is not None
        m: Any = None if conditioned else model_card(model)
        conditioning = None
        if m is None:
            loaded = load_with_options(
                model,
                device=device,
                dtype=dtype.value,
                trust_code=trust_code or trust_pickle,
                prompts=prompt,
                prompt_file=prompt_file,
                negative_prompt=negative_prompt,
                guidance=guidance,
            )
            for note in loaded.notes:
                err.print(f"note: {note}", markup=False)
            m, conditioning = loaded.model, loaded.conditioning
        sched = baseline_schedule(kind, m, ident, n_steps, final_step=final_step.value, rho=7.0 if rho is None else rho)
        if conditioning is not None:  # the guided ODE the schedule is meant for
            config = {**sched.method.config, "conditioning": conditioning}
            sched = sched.replace(method=dataclasses.replace(sched.method, config=config))
    path = out if out is not None else default_out(sched.model.id, ident.name, sched.nfe, kind)
    check_writable(path, "--out")
    sched.save(path)
    if json_out:
        emit_json(schedule_json(sched, path))
    err.print(f"wrote {path}: {schedule_header(sched)}", markup=False)
