"""``stepopt show``, ``stepopt validate`` and ``stepopt models``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from stepopt.cli.app import DebugOpt, JsonOpt, command, emit_json, err, fail
from stepopt.cli.common import schedule_header, schedule_table
from stepopt.cli.flags import FLAGS, cli_message
from stepopt.errors import StepoptError
from stepopt.schedule import PUBLISHED_PREFIX, Schedule, data_dir, dump_yaml, is_published, published_names
from stepopt.solvers import all_solvers
from stepopt.trust import file_model_risk

TRUST_FLAG = FLAGS["trust_code"]


@command("show")
def show(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A schedule file (or published:NAME).")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print a schedule file: its grid, solver, model and origin (a table on stdout)."""
    s = Schedule.load(file)
    risk = None if is_published(file) else file_model_risk(s.model.id)
    if json_out:
        emit_json({"path": str(file), **s.to_dict(), "needs_trust_code": risk is not None})
        return
    out = Console(highlight=False)
    out.print(schedule_header(s), markup=False)
    out.print(schedule_table(s))
    # Nested values (the optimizer's report, metrics with their settings) as indented YAML, not reprs.
    for title, value in (("method.config", s.method.config), ("metrics", s.metrics)):
        if value:
            text = dump_yaml({title: value}).rstrip("\n")
            out.print(text, markup=False, highlight=False, soft_wrap=True)
    if risk is not None:
        note = f"model {s.model.id}: sample/eval load it from this file only with {TRUST_FLAG} ({risk})"
        out.print(note, markup=False, soft_wrap=True)
    prov = s.provenance
    if prov:
        out.print(f"provenance: {', '.join(f'{k}={v}' for k, v in prov.items())}", markup=False)


@command("validate")
def validate(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", help="Schedule files (or published:NAME) to check.")],
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
                invalid = {"path": str(f), "error": cli_message(str(e))}
                emit_json({"valid": ok, "invalid": invalid, "needs_trust_code": trust})
            if debug:
                raise
            fail(str(e) if str(e).startswith(str(f)) else f"{f}: {e}")
        ok.append(str(f))
        risk = None if is_published(f) else file_model_risk(s.model.id)
        if risk is None:
            err.print(f"ok {f}", markup=False)
        else:
            trust[str(f)] = risk
            err.print(f"ok {f} (model {s.model.id}: sample/eval need {TRUST_FLAG} to load it; {risk})", markup=False)
    if json_out:
        emit_json({"valid": ok, "invalid": None, "needs_trust_code": trust})


@command("models")
def models(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List built-in models, model loaders, solvers, optimizers and the published schedules."""
    from stepopt.model_cards import BUILTIN_SUMMARIES, LOADER_SUMMARIES, OPTIMIZER_SUMMARIES, model_card

    # Described from the model cards and summaries (numpy only): listing loads no network and no torch.
    rows: list[dict[str, Any]] = []
    for name, summary in BUILTIN_SUMMARIES.items():
        card = model_card(f"builtin:{name}")
        if card is None:
            err.print(f"warning: builtin:{name} cannot be described (its packaged files are missing)", markup=False)
            continue
        rows.append({**card.describe(), "summary": summary})
    loaders = [{"prefix": f"{k}:", "summary": cli_message(v)} for k, v in LOADER_SUMMARIES.items() if k != "builtin"]
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
    optimizers = [{"name": n, "summary": s} for n, s in sorted(OPTIMIZER_SUMMARIES.items())]
    published = [f"{PUBLISHED_PREFIX}{n}" for n in published_names()]
    configs = data_dir("configs")
    if json_out:
        emit_json(
            {
                "builtins": rows,
                "loaders": loaders,
                "solvers": solvers,
                "optimizers": optimizers,
                "published": published,
                "configs": str(configs),
            }
        )
        return
    # Never cut ids: wide enough for a pipe or a file, and ids never wrap on a terminal.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    t = Table(title="built-in models", header_style="bold")
    t.add_column("id", no_wrap=True)
    for c in ("shape", "sigma range", "param.", "summary"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["id"],
            "x".join(map(str, r["shape"])),
            f"[{r['sigma_min']:g}, {r['sigma_max']:g}]",
            r["parameterization"],
            r["summary"],
        )
    out.print(t)
    if loaders:
        lt = Table(title="loaders (--model LOADER:ARG)", header_style="bold")
        lt.add_column("id", no_wrap=True)
        lt.add_column("summary")
        for r in loaders:
            lt.add_row(r["prefix"] + "...", r["summary"])
        out.print(lt)
    st = Table(title="solvers (--solver)", header_style="bold")
    st.add_column("name", no_wrap=True)
    for c in ("orders", "variants", "lower-order final", "summary"):
        st.add_column(c)
    for s in solvers:
        lof = s["lower_order_final"]
        st.add_row(
            s["name"],
            ",".join(map(str, s["orders"])),
            ",".join(s["variants"]) or "-",
            "-" if lof is None else ("yes" if lof else "no"),
            s["summary"],
        )
    out.print(st)
    ot = Table(title="optimizers (--optimizer / -O)", header_style="bold")
    ot.add_column("name", no_wrap=True)
    ot.add_column("summary")
    for o in optimizers:
        ot.add_row(o["name"], o["summary"])
    out.print(ot)
    out.print(f"published schedules (wherever a schedule file is accepted): {', '.join(published)}", markup=False)
    out.print(f"documented method options (--config FILE): {configs}", markup=False)
