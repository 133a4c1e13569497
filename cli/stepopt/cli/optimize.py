"""``stepopt optimize``: run a schedule optimizer and write the schedule file."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from stepopt._defaults import DEFAULT_MODEL
from stepopt.cli.app import (
    DEFAULT_NFE,
    DEFAULT_SOLVER,
    SEED_MAX,
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
from stepopt.cli.flags import cli_message
from stepopt.config import resolve_config
from stepopt.errors import StepoptError
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver

DEFAULT_OPTIMIZER = "trust-region"


def state_file(out: Path) -> Path:
    """Where a resumable optimizer keeps its training state for the schedule ``out``."""
    return out.with_name(out.name + ".state")


@command("optimize")
def optimize_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    solver: SolverOpt = DEFAULT_SOLVER,
    nfe: NfeOpt = DEFAULT_NFE,
    optimizer: Annotated[
        str, typer.Option("--optimizer", "-O", help="trust-region, ays, ld3, ... (see `stepopt models`).")
    ] = DEFAULT_OPTIMIZER,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of method options.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override one method option: KEY=VALUE (repeatable)."),
    ] = None,
    order: OrderOpt = None,
    variant: VariantOpt = None,
    lower_order_final: LofOpt = None,
    final_step: FinalStepOpt = FinalStep.none,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed of the optimizer.")] = 0,
    device: DeviceOpt = "auto",
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start from this schedule file's grid (optimizers that take a start: ld3)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run from its state file <out>.state (ld3)."),
    ] = False,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = NetDtype.float32,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: GuidanceOpt = None,
    select: Annotated[
        bool,
        typer.Option(
            "--select",
            help="Choose the method's hyperparameters by the error against a teacher (= --set select=true).",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file [default: schedules/<model>/<solver>/nfe<N>/<optimizer>.yaml]."),
    ] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Optimize the time steps for a model, solver and NFE; write a v1 schedule file."""
    from stepopt.trust import check_code_loader

    # Checks that need no model or optimizer first (before the heavy imports).
    check_code_loader(model, trust_code or trust_pickle)
    if out is not None:
        check_writable(out, "--out")

    from stepopt.optimizers import get_optimizer, optimize

    spec = get_optimizer(optimizer)
    if init is not None and not spec.takes_init:
        raise StepoptError(f"--init: optimizer '{optimizer}' does not take a start schedule (ld3 does)")
    if resume and not spec.resumable:
        raise StepoptError(f"--resume: optimizer '{optimizer}' keeps no resumable state (ld3 does)")
    if select and "select" not in {f.name for f in dataclasses.fields(spec.config_cls)}:
        raise StepoptError(f"--select: optimizer '{optimizer}' has no model-aware selection")
    cfg: Any = resolve_config(spec.config_cls, config, set_ or (), {"select": True} if select else None)
    ident = get_solver(solver).identity(order, variant, lower_order_final)
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
    m, dev = loaded.model, loaded.device
    for note in loaded.notes:
        err.print(f"note: {note}", markup=False)

    def progress(event: str, data: Mapping[str, Any]) -> None:
        if event == "log":
            err.print(cli_message(str(data.get("message", ""))), markup=False)

    path = out if out is not None else default_out(m.id, ident.name, nfe, optimizer)
    state = state_file(path)
    check_writable(path, "--out")  # before any work: a bad --out must cost nothing and leave nothing
    if spec.resumable:
        check_writable(state, "--out (its state file)")
    if resume and not state.exists():
        raise StepoptError(f"--resume: no state file '{state}' (only optimizers that keep one, e.g. ld3, can resume)")
    start = Schedule.load(init) if init is not None else None
    try:
        sched = optimize(
            optimizer,
            m,
            ident,
            nfe,
            cfg,
            final_step=final_step.value,
            seed=seed,
            device=dev,
            progress=progress,
            init_schedule=start,
            state_path=state,
            resume=resume,
        )
    except KeyboardInterrupt:
        if state.exists():
            err.print(f"interrupted: rerun the same command with --resume to continue from '{state}'", markup=False)
        raise
    if loaded.conditioning is not None:  # the prompt set and guidance the schedule was optimized for
        method = dataclasses.replace(sched.method, config={**sched.method.config, "conditioning": loaded.conditioning})
        sched = sched.replace(method=method)
    sched.save(path)
    state.unlink(missing_ok=True)  # the run is complete: its schedule is written
    if json_out:
        emit_json(schedule_json(sched, path))
    err.print(f"wrote {path}: {schedule_header(sched)} in {sched.method.seconds:.2f} s", markup=False)
