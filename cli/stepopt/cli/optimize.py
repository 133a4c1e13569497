"""``stepopt optimize``: run a schedule optimizer and write the schedule file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from stepopt.cli.app import (
    DebugOpt,
    DeviceOpt,
    FinalStep,
    FinalStepOpt,
    JsonOpt,
    LofOpt,
    ModelOpt,
    NfeOpt,
    OrderOpt,
    SolverOpt,
    VariantOpt,
    command,
    emit_json,
    err,
)
from stepopt.cli.common import default_out, schedule_header, schedule_json
from stepopt.config import resolve_config
from stepopt.models import DEFAULT_MODEL, load_model, resolve_device
from stepopt.optimizers import get_optimizer, optimize
from stepopt.solvers import get_solver

DEFAULT_OPTIMIZER = "trust-region"


@command("optimize")
def optimize_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    solver: SolverOpt = "dpmpp-3m",
    nfe: NfeOpt = 6,
    optimizer: Annotated[
        str, typer.Option("--optimizer", "-O", help="trust-region, ays, ld3, ... (see `stepopt models`).")
    ] = DEFAULT_OPTIMIZER,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of method options.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override one method option: KEY=VALUE (repeatable).")
    ] = None,
    order: OrderOpt = None,
    variant: VariantOpt = None,
    lower_order_final: LofOpt = None,
    final_step: FinalStepOpt = FinalStep.none,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the optimizer.")] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file [default: schedules/<model>/<solver>/nfe<N>/<optimizer>.yaml]."),
    ] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Optimize the time steps for a model, solver and NFE; write a v1 schedule file."""
    spec = get_optimizer(optimizer)
    cfg: Any = resolve_config(spec.config_cls, config, set_ or ())
    ident = get_solver(solver).identity(order, variant, lower_order_final)
    dev = resolve_device(device)
    m = load_model(model, device=dev)

    def progress(event: str, data: Mapping[str, Any]) -> None:
        if event == "log":
            err.print(str(data.get("message", "")), markup=False)

    sched = optimize(
        optimizer, m, ident, nfe, cfg, final_step=final_step.value, seed=seed, device=dev, progress=progress
    )
    path = out if out is not None else default_out(m.id, ident.name, sched.nfe, optimizer)
    sched.save(path)
    if json_out:
        emit_json(schedule_json(sched, path))
    err.print(f"wrote {path}: {schedule_header(sched)} in {sched.method.seconds:.2f} s", markup=False)
