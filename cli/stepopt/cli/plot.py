"""``stepopt plot``: schedules overlaid and metric-vs-NFE curves, as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepopt.cli.app import DebugOpt, JsonOpt, command, emit_json, err
from stepopt.cli.common import check_writable
from stepopt.schedule import Schedule


@command("plot")
def plot_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG file.")],
    schedule: Annotated[
        list[Path] | None,
        typer.Option("--schedule", "-S", metavar="FILE", help="A schedule file to overlay (repeatable)."),
    ] = None,
    eval_table: Annotated[
        Path | None, typer.Option("--eval", help="An eval table (stepopt eval --out X.json) for metric-vs-NFE curves.")
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            metavar="NAME[:KEY]",
            help="Metric to plot, NAME or NAME:KEY, e.g. ode-error:max [default: all].",
        ),
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="Figure title.")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plot schedules (sigma vs step, log scale) and/or metrics against NFE from an eval table (PNG)."""
    from stepopt.plots import load_eval_json, render  # matplotlib loads only for this command

    check_writable(out, "--out")
    scheds = [(str(p), Schedule.load(p)) for p in schedule or ()]
    rows = load_eval_json(eval_table) if eval_table is not None else []
    path = render(out, scheds, rows, metric, title)
    if json_out:
        emit_json({"path": str(path)})
    err.print(f"wrote {path}", markup=False)
