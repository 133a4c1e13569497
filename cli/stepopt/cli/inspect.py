"""``stepopt show``, ``stepopt validate`` and ``stepopt models``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from stepopt.cli.app import DebugOpt, JsonOpt, command, emit_json, err, fail
from stepopt.cli.common import schedule_header, schedule_table
from stepopt.errors import StepoptError
from stepopt.schedule import Schedule
from stepopt.solvers import all_solvers
from stepopt.trust import TRUST_FLAG, file_model_risk


@command("show")
def show(
    file: Annotated[Path, typer.Argument(help="A schedule file.")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print a schedule file: its grid, solver, model and origin (a table on stdout)."""
    s = Schedule.load(file)
    if json_out:
        emit_json({"path": str(file), **s.to_dict()})
        return
    out = Console(highlight=False)
    out.print(schedule_header(s), markup=False)
    out.print(schedule_table(s))
    if s.method.config:
        out.print("config: " + ", ".join(f"{k}={v}" for k, v in s.method.config.items()), markup=False)
    if s.metrics:
        out.print(f"metrics: {s.metrics}", markup=False)
    risk = None if str(file).startswith("published:") else file_model_risk(s.model.id)
    if risk is not None:
        note = f"model {s.model.id}: sample/eval load it from this file only with {TRUST_FLAG} ({risk})"
        out.print(note, markup=False)
    prov = s.provenance
    if prov:
        out.print(f"provenance: {', '.join(f'{k}={v}' for k, v in prov.items())}", markup=False)


@command("validate")
def validate(
    files: Annotated[list[Path], typer.Argument(help="Schedule files to check.")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Validate schedule files; exit 1 on the first invalid one, naming it."""
    ok: list[str] = []
    trust: dict[str, str] = {}  # files whose model id loads only with --trust-code, and why
    for f in files:
        try:
            s = Schedule.load(f)
        except StepoptError as e:
            if json_out:
                emit_json({"valid": ok, "invalid": {"path": str(f), "error": str(e)}, "needs_trust_code": trust})
            if debug:
                raise
            fail(str(e) if str(e).startswith(str(f)) else f"{f}: {e}")
        ok.append(str(f))
        risk = None if str(f).startswith("published:") else file_model_risk(s.model.id)
        if risk is None:
            err.print(f"ok {f}", markup=False)
        else:
            trust[str(f)] = risk
            err.print(f"ok {f} (model {s.model.id}: sample/eval need {TRUST_FLAG} to load it; {risk})", markup=False)
    if json_out:
        emit_json({"valid": ok, "invalid": None, "needs_trust_code": trust})


@command("models")
def models(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List built-in models, model loaders and solvers."""
    from stepopt.models import BUILTINS, LOADER_SUMMARIES, load_model

    rows: list[dict[str, Any]] = []
    for name, b in BUILTINS.items():
        m = load_model(f"builtin:{name}", device="cpu")
        rows.append({**m.describe(), "summary": b.summary})
    loaders = [{"prefix": f"{k}:", "summary": v} for k, v in LOADER_SUMMARIES.items()]
    solvers: list[dict[str, Any]] = [
        {
            "name": s.name,
            "orders": list(s.orders),
            "default_order": s.default_order,
            "variants": list(s.variants),
            "lower_order_final": s.default_lower_order_final,
            "summary": s.summary,
        }
        for s in all_solvers()
    ]
    if json_out:
        emit_json({"builtins": rows, "loaders": loaders, "solvers": solvers})
        return
    out = Console(highlight=False)
    t = Table(title="built-in models", header_style="bold")
    for c in ("id", "shape", "sigma range", "param.", "fingerprint", "summary"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["id"],
            "x".join(map(str, r["shape"])),
            f"[{r['sigma_min']:g}, {r['sigma_max']:g}]",
            r["parameterization"],
            r["fingerprint"][:19] + "…",
            r["summary"],
        )
    out.print(t)
    if loaders:
        lt = Table(title="loaders", header_style="bold")
        lt.add_column("id")
        lt.add_column("summary")
        for r in loaders:
            lt.add_row(r["prefix"] + "…", r["summary"])
        out.print(lt)
    st = Table(title="solvers", header_style="bold")
    for c in ("name", "orders", "variants", "lower_order_final", "summary"):
        st.add_column(c)
    for s in solvers:
        st.add_row(
            s["name"],
            ",".join(map(str, s["orders"])),
            ",".join(s["variants"]) or "-",
            str(s["lower_order_final"]),
            s["summary"],
        )
    out.print(st)
