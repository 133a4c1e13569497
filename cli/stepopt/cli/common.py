"""Helpers shared by commands: default output paths and schedule summaries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.table import Table

from stepopt.schedule import Schedule

SCHEDULES_DIR = Path("schedules")


def model_slug(model_id: str) -> str:
    """A folder name for a model id: ``builtin:gmm-digits`` -> ``gmm-digits``, ``diffusers:/a/b`` -> ``diffusers-b``."""
    prefix, _, rest = model_id.partition(":")
    if prefix == "builtin":
        base = rest
    else:
        tail = Path(rest.rstrip("/")).name or rest
        base = f"{prefix}-{Path(tail).stem if prefix == 'edm' else tail}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def default_out(model_id: str, solver: str, nfe: int, method: str) -> Path:
    """``schedules/<model>/<solver>/nfe<N>/<method>.yaml`` (design.md §3)."""
    return SCHEDULES_DIR / model_slug(model_id) / solver / f"nfe{nfe}" / f"{method}.yaml"


def schedule_json(s: Schedule, path: Path | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if path is not None:
        d["path"] = str(path)
    d.update(
        {
            "model": s.model.id,
            "solver": s.solver.to_dict(),
            "nfe": s.nfe,
            "method": s.method.name,
            "sigmas": list(s.sigmas),
            "model_sigmas": None if s.model_sigmas is None else list(s.model_sigmas),
            "final_step": s.final_step,
            "objective": s.method.objective,
        }
    )
    return d


def schedule_table(s: Schedule, title: str | None = None) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("i", justify="right")
    t.add_column("sigma", justify="right")
    t.add_column("lam = -log sigma", justify="right")
    if s.model_sigmas is not None:
        t.add_column("model sigma", justify="right")
    if s.timesteps is not None:
        t.add_column(f"t ({s.model.time})", justify="right")
    import math

    for i, sig in enumerate(s.sigmas):
        row = [str(i), f"{sig:.6g}", f"{-math.log(sig):.4f}"]
        if s.model_sigmas is not None:
            row.append(f"{s.model_sigmas[i]:.6g}")
        if s.timesteps is not None:
            row.append(f"{s.timesteps[i]:.4f}")
        t.add_row(*row)
    return t


def schedule_header(s: Schedule) -> str:
    obj = ""
    if s.method.objective:
        o = s.method.objective
        obj = f"; objective {o.get('name', '')} {o.get('initial', '')} -> {o.get('final', '')}"
    return (
        f"{s.method.name} schedule for {s.model.id} ({s.model.fingerprint[:19]}…), solver {s.solver}, "
        f"NFE {s.nfe}, {s.n_steps} steps, final_step {s.final_step}{obj}"
    )
