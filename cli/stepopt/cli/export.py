"""``stepopt export FILE --to FORMAT``: a schedule in another tool's convention."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from stepopt.cli.app import DebugOpt, JsonOpt, command, emit_json, err


class ExportFormat(str, Enum):
    diffusers = "diffusers"
    diffusers_python = "diffusers-python"
    k_diffusion = "k-diffusion"
    comfyui = "comfyui"
    json = "json"
    csv = "csv"


@command("export")
def export_cmd(
    file: Annotated[Path, typer.Argument(help="A schedule file.")],
    to: Annotated[ExportFormat, typer.Option("--to", "-t", help="Target format.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file [default: stdout].")] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Write the nearest form where the target cannot express the schedule exactly."),
    ] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a schedule for diffusers, k-diffusion, ComfyUI, or as JSON/CSV; refuse where it would not be exact."""
    from stepopt.export import export_with_differences
    from stepopt.io import atomic_write_text
    from stepopt.schedule import Schedule

    s = Schedule.load(file)
    text, differences = export_with_differences(s, to.value, force=force)
    for d in differences:
        err.print(f"warning: not exact: {d}", markup=False)
    if out is None:
        if json_out:
            emit_json({"path": None, "to": to.value, "text": text, "differences": differences})
        else:
            sys.stdout.write(text)
        return
    atomic_write_text(out, text)
    if json_out:
        emit_json({"path": str(out), "to": to.value, "differences": differences})
    err.print(f"wrote {out} ({to.value})", markup=False)
