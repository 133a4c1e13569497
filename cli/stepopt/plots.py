"""PNG plots: schedules overlaid (sigma vs step, log scale) and metric-vs-NFE curves from an eval table.

Drawn with matplotlib's object API on an Agg canvas (no global backend state, no display needed)
and written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from stepopt import safeyaml
from stepopt.errors import StepoptError
from stepopt.io import atomic_path
from stepopt.schedule import Schedule

# The value a metric-vs-NFE curve shows for metrics with several numbers.
PRIMARY_KEY = {"ode-error": "rmse", "kid": "mean", "isc": "mean", "prc": "f_score"}
LINESTYLES = ("-", "--", ":", "-.")
EVAL_TABLE_MAX_BYTES = 64 << 20


class _Styles:
    """One colour per method and one line style per solver, the same in every panel."""

    def __init__(self, methods: Sequence[str], solvers: Sequence[str]) -> None:
        cmap = matplotlib.colormaps["tab10" if len(set(methods)) <= 10 else "tab20"]
        self.color = {m: cmap(i % cmap.N) for i, m in enumerate(dict.fromkeys(methods))}
        self.style = {s: LINESTYLES[i % len(LINESTYLES)] for i, s in enumerate(dict.fromkeys(solvers))}

    def __call__(self, method: str, solver: str) -> dict[str, Any]:
        return {"color": self.color.get(method), "linestyle": self.style.get(solver, "-")}


def schedule_label(s: Schedule) -> str:
    return f"{s.method.name} ({s.solver.name}, NFE {s.nfe})"


def plot_schedules(ax: Axes, schedules: Sequence[tuple[str, Schedule]], styles: _Styles | None = None) -> None:
    """Sigma against step index, log scale, one line per schedule."""
    st = styles or _Styles([s.method.name for _, s in schedules], [s.solver.name for _, s in schedules])
    for _, s in schedules:
        ax.plot(
            range(len(s.sigmas)),
            s.sigmas,
            marker="o",
            markersize=3,
            linewidth=1.2,
            label=schedule_label(s),
            **st(s.method.name, s.solver.name),
        )
    ax.set_yscale("log")
    ax.set_xlabel("step i")
    ax.set_ylabel("sigma_i")
    ax.set_title("schedules")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def metric_value(row: Mapping[str, Any], metric: str) -> float | None:
    """A row's number for ``metric`` (``name`` or ``name:key``; dict metrics use their primary key)."""
    name, _, key = metric.partition(":")
    v = row.get("metrics", {}).get(name)
    if v is None:
        return None
    if isinstance(v, Mapping):
        if not v:
            return None
        k = key or PRIMARY_KEY.get(name.removesuffix("-digits"), next(iter(v)))
        if k not in v:
            raise StepoptError(f"metric '{name}' has no value '{k}'; it has {', '.join(map(str, v))}")
        v = v[k]
    elif key:
        raise StepoptError(f"metric '{name}' is a single number; drop ':{key}'")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise StepoptError(f"row '{row.get('schedule', '?')}': metric '{metric}' = {shown} is not a number")
    return float(v)


def metric_label(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The y-axis label: the metric and which of its numbers is shown (``ode-error RMSE``)."""
    name, _, key = metric.partition(":")
    if not key:
        v = next((r.get("metrics", {}).get(name) for r in rows if r.get("metrics", {}).get(name) is not None), None)
        if isinstance(v, Mapping) and v:
            key = PRIMARY_KEY.get(name.removesuffix("-digits"), str(next(iter(v))))
    if not key:
        return name
    return f"{name} {key.upper() if key in ('rmse', 'mse') else key}"


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """All metric names present in the rows, in first-seen order."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r.get("metrics", {}):
            names[k] = None
    return list(names)


def plot_metric(ax: Axes, rows: Sequence[Mapping[str, Any]], metric: str, styles: _Styles | None = None) -> None:
    """``metric`` against NFE, one line per (method, solver)."""
    st = styles or _Styles([str(r.get("method")) for r in rows], [str(r.get("solver")) for r in rows])
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        v = metric_value(r, metric)
        if v is None:
            continue
        curves.setdefault((str(r.get("method")), str(r.get("solver"))), []).append((r["nfe"], v))
    if not curves:
        raise StepoptError(f"no row has metric '{metric}'; present: {', '.join(metric_names(rows)) or 'none'}")
    positive = True
    for (method, solver), pts in curves.items():
        pts.sort()
        positive &= all(y > 0 for _, y in pts)
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            markersize=4,
            label=f"{method} ({solver})",
            **st(method, solver),
        )
    lo = min(y for pts in curves.values() for _, y in pts)
    hi = max(y for pts in curves.values() for _, y in pts)
    if positive and hi > 5 * lo:  # log scale when the values span more than a factor of 5
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("NFE")
    label = metric_label(rows, metric)
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(curves) > 6 else 1)


def render(
    out: str | Path,
    schedules: Sequence[tuple[str, Schedule]] = (),
    eval_rows: Sequence[Mapping[str, Any]] = (),
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One PNG at ``out``: a schedule panel (if schedules) and one panel per metric (if eval rows)."""
    rows = eval_rows
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise StepoptError(f"`out` {p}: plots are written as PNG; use a .png file name")
    mets = list(metrics) if metrics else (metric_names(rows) if rows else [])
    if mets and not rows:
        raise StepoptError("metric curves need an eval table: pass its rows as `eval_rows`")
    n_panels = (1 if schedules else 0) + len(mets)
    if n_panels == 0:
        raise StepoptError("nothing to plot: pass `schedules` and/or `eval_rows`")
    cols = min(n_panels, 3)
    nrows = (n_panels + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 4.0 * nrows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, cols, i + 1) for i in range(n_panels)]
    methods = [s.method.name for _, s in schedules] + [str(r.get("method")) for r in rows]
    solvers = [s.solver.name for _, s in schedules] + [str(r.get("solver")) for r in rows]
    styles = _Styles(methods, solvers)
    k = 0
    if schedules:
        plot_schedules(axes[0], schedules, styles)
        k = 1
    for m in mets:
        plot_metric(axes[k], rows, m, styles)
        k += 1
    if title:
        fig.suptitle(title)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png")
    return p


def load_eval_json(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an ``eval --out X.json`` / ``eval --json`` file (for plots)."""
    p = Path(path)
    try:
        data = json.loads(safeyaml.read_text(p, max_bytes=EVAL_TABLE_MAX_BYTES))
    except safeyaml.InputFileError as e:
        raise StepoptError(f"{p}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise StepoptError(f"{p}: not a readable eval JSON file ({e.__class__.__name__})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("rows"), list):
        raise StepoptError(f"{p}: expected an object with a 'rows' list (a JSON table written by stepopt eval)")
    rows = list(data["rows"])
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or not isinstance(r.get("metrics", {}), Mapping):
            raise StepoptError(f"{p}: rows[{i}]: expected an object with a 'metrics' object")
        nfe = r.get("nfe")
        if isinstance(nfe, bool) or not isinstance(nfe, int):
            raise StepoptError(f"{p}: rows[{i}].nfe = {nfe!r}: expected an integer")
    return rows
