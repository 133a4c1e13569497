"""Evaluate schedules side by side: samples, metrics, and the table (``stepopt eval``).

Every schedule in one evaluation belongs to the same model and is run on the same noise: sample
``i`` starts from seed ``seed + i`` (:func:`stepopt.sampling.initial_noise`), so rows differ only
by their grid and solver, and no number depends on the batch size. Metrics (:mod:`stepopt.metrics`,
each computed by its kind's entry in ``METRIC_KINDS``):

* ``ode-error``: against :func:`stepopt.teacher.teacher_outputs` from the same noise over the
  schedule's own sigma range (cached on disk); with ``final_step: denoise`` the target is the
  denoiser applied to the teacher's state at the last sigma, the same final jump the schedule makes;
* ``fd-exact``: :func:`stepopt.metrics.exact.fd_exact` at the schedule's last sigma (0 after a
  final denoising step);
* torch-fidelity metrics, one ``calculate_metrics`` call per feature extractor per schedule.

Under ``torchrun`` samples and teacher outputs are generated share by share over the ranks and
gathered (:mod:`stepopt.distributed`), so every number equals the one-process table.

Rows are grouped by solver and NFE (stable, otherwise in the order given). Tables are written by
extension (.md, .csv, .json), atomically.

``versus`` (``eval --versus FILE``) compares every row's ``ode-error`` with one reference row seed by
seed: the relative RMSE change with a 95 % paired bootstrap interval and the share of seeds on which
the row is better (:mod:`stepopt.stats`). Rows whose targets differ from the reference's (another
sigma range or final step) are marked not comparable.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stepopt import __version__, distributed
from stepopt.errors import StepoptError
from stepopt.io import atomic_write_text
from stepopt.jsontext import json_text
from stepopt.metrics import INCEPTION_EXTRACTOR, METRIC_KINDS, EvalContext, MetricRequest, parse_metrics
from stepopt.metrics.fidelity import FidelityOptions
from stepopt.models.base import DiffusionModel
from stepopt.sampling import NonFiniteError, sample_schedule
from stepopt.schedule import Schedule
from stepopt.stats import DEFAULT_RESAMPLES, paired_bootstrap
from stepopt.teacher import TeacherConfig

Progress = Callable[[str, Mapping[str, Any]], None]
TABLE_FORMATS = (".md", ".csv", ".json")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: sample count and seeds, teacher, torch-fidelity options and reference."""

    n: int = 1000
    seed: int = 0
    batch_size: int = 256
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: bool = True
    feature_extractor: str = INCEPTION_EXTRACTOR
    feature_weights: str | None = None
    reference: str | None = None
    fidelity: FidelityOptions = field(default_factory=FidelityOptions)
    versus: str | None = None
    resamples: int = DEFAULT_RESAMPLES

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise StepoptError(f"`resamples` {self.resamples}: expected an integer >= 1")
        if self.n < 2:
            raise StepoptError(f"`n` {self.n}: expected at least 2 samples")
        if self.batch_size < 1:
            raise StepoptError(f"`batch_size` {self.batch_size}: expected an integer >= 1")
        if self.seed < 0:
            raise StepoptError(f"`seed` {self.seed}: expected an integer >= 0")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n))


@dataclass
class EvalRow:
    """One evaluated schedule: identity, metric values, the settings each was computed with, timings."""

    path: str
    schedule: Schedule
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # ode-error per seed and the key of its targets (for ``versus``; not written anywhere)
    seed_errors: tuple[Any, torch.Tensor] | None = None
    versus: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "schedule": self.path,
            "model": s.model.id,
            "solver": s.solver.name,
            "solver_identity": s.solver.to_dict(),
            "nfe": s.nfe,
            "method": s.method.name,
            "final_step": s.final_step,
            # Flow models: the native time and the pipeline shift (mu) the schedule was made for.
            **({"time": s.model.time, "shift": s.model.shift, "mu": s.model.mu} if s.model.shift is not None else {}),
            "metrics": self.metrics,
            "settings": self.settings,
            "seconds": self.seconds,
            **({"versus": self.versus} if self.versus is not None else {}),
        }

    def metric_entries(self) -> dict[str, dict[str, Any]]:
        """What ``--write-back`` stores: each metric's value(s) with its settings."""
        out = {}
        for name, v in self.metrics.items():
            entry = dict(v) if isinstance(v, Mapping) else {"value": v}
            entry["settings"] = self.settings.get(name, {})
            out[name] = entry
        return out


def check_same_model(items: Sequence[tuple[str, Schedule]]) -> None:
    """All schedules of one evaluation must name the same model id and fingerprint."""
    if not items:
        raise StepoptError("no `schedules` to evaluate")
    p0, s0 = items[0]
    for p, s in items[1:]:
        if (s.model.id, s.model.fingerprint) != (s0.model.id, s0.model.fingerprint):
            raise StepoptError(
                f"{p} is for model {s.model.id} ({s.model.fingerprint[:19]}…) but {p0} is for"
                f" {s0.model.id} ({s0.model.fingerprint[:19]}…); evaluate one model at a time"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    model: DiffusionModel, schedule: Schedule, seeds: Sequence[int], batch_size: int, device: torch.device
) -> torch.Tensor:
    """The schedule's outputs for ``seeds`` (noise at ``sigmas[0]``), batched, on the CPU."""
    with torch.no_grad():
        return sample_schedule(model, schedule, seeds, batch_size=batch_size, device=device)


def evaluate(
    items: Sequence[tuple[str, Schedule]],
    metrics: str | Sequence[str] | Sequence[MetricRequest],
    model: DiffusionModel,
    config: EvalConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> list[EvalRow]:
    """Evaluate ``(path, schedule)`` pairs on ``model``; rows grouped by solver and NFE.

    Each requested metric is computed by its kind in :data:`stepopt.metrics.METRIC_KINDS`: every
    kind's setup first (its refusals come before any sampling), then its shared work (the teacher),
    then one computation per row; a row's metrics are in the kinds' order.
    """
    cfg = config or EvalConfig()
    dev = torch.device(device) if device is not None else model.device
    reqs: list[MetricRequest]
    if not isinstance(metrics, str) and metrics and all(isinstance(m, MetricRequest) for m in metrics):
        reqs = [m for m in metrics if isinstance(m, MetricRequest)]
    else:
        reqs = parse_metrics([m for m in metrics if isinstance(m, str)] if not isinstance(metrics, str) else metrics)
    check_same_model(items)
    if cfg.versus is not None:
        if "ode-error" not in {r.kind for r in reqs}:
            raise StepoptError("`versus` compares the ode-error of each seed; add ode-error to the metrics")
        if cfg.versus not in [p for p, _ in items]:
            names = ", ".join(p for p, _ in items)
            raise StepoptError(f"`versus` {cfg.versus}: not one of the evaluated schedules ({names})")
    s0 = items[0][1]
    if s0.model.fingerprint != model.fingerprint:
        raise StepoptError(
            f"{items[0][0]} was made for {s0.model.id} with fingerprint {s0.model.fingerprint[:19]}…,"
            f" but the loaded model has {model.fingerprint[:19]}…"
        )

    order = sorted(range(len(items)), key=lambda i: (items[i][1].solver.name, items[i][1].nfe, i))
    ctx = EvalContext(model, cfg, dev, [items[i][1] for i in order], progress)
    by_kind: dict[str, list[MetricRequest]] = {}
    for r in reqs:
        by_kind.setdefault(r.kind, []).append(r)
    kinds = sorted((METRIC_KINDS.get(k) for k in by_kind), key=lambda k: k.stage)  # stable: request order
    computers = [(kind, kind.setup(by_kind[kind.name], ctx)) for kind in kinds]
    for _, computer in computers:
        computer.prepare()
    rows: list[EvalRow] = []
    for k, i in enumerate(order):
        path, sched = items[i]
        if progress:
            progress("schedule", {"index": k, "total": len(items), "path": path, "schedule": sched})
        row = EvalRow(path, sched)
        t0 = time.perf_counter()
        try:
            samples = generate(model, sched, cfg.seeds, cfg.batch_size, dev)
        except NonFiniteError as e:  # name the schedule too
            raise StepoptError(f"{path}: {e}") from None
        _sync(dev)
        row.seconds["sample"] = time.perf_counter() - t0
        if not torch.isfinite(samples).all():
            raise StepoptError(f"{path}: the schedule produced non-finite samples (NaN/inf)")
        t1 = time.perf_counter()
        common = {"n": cfg.n, "seed": cfg.seed}
        for kind, computer in computers:
            # Under torchrun every rank holds all samples (sharded generation); main-rank kinds
            # (torch-fidelity) run on rank 0 only, whose rows are the ones printed and written.
            if kind.main_rank_only and not distributed.is_main():
                continue
            for name, value, settings in computer.compute(sched, samples):
                row.metrics[name] = value
                row.settings[name] = {**common, **settings}
            if cfg.versus is not None and kind.name == "ode-error":
                row.seed_errors = computer.per_seed(sched, samples)  # type: ignore[attr-defined]
        row.seconds["metrics"] = time.perf_counter() - t1
        for st in row.settings.values():
            st["stepopt"] = __version__
        rows.append(row)
        if progress:
            progress("row", {"index": k, "total": len(items), "row": row})
    if cfg.versus is not None:
        compare_rows(rows, cfg.versus, cfg.resamples)
    return rows


def compare_rows(rows: Sequence[EvalRow], versus: str, resamples: int = DEFAULT_RESAMPLES) -> None:
    """Set each row's ``versus``: its ode-error against the row of schedule ``versus``, seed by seed."""
    ref = next((r for r in rows if r.path == versus), None)
    if ref is None or ref.seed_errors is None:
        raise StepoptError(f"`versus` {versus}: no ode-error per seed for it")
    ref_key, ref_err = ref.seed_errors
    for r in rows:
        if r is ref:
            r.versus = {"schedule": versus, "reference": True}
        elif r.seed_errors is None or r.seed_errors[0] != ref_key:
            r.versus = {
                "schedule": versus,
                "comparable": False,
                "reason": "another sigma range or final step than the reference: other ode-error targets",
            }
        else:
            cmp = paired_bootstrap(r.seed_errors[1].numpy(), ref_err.numpy(), resamples=resamples)
            r.versus = {"schedule": versus, "metric": "ode-error rmse", **cmp.to_dict()}


def write_back(row: EvalRow) -> Schedule:
    """Store the row's metrics (with settings) in its schedule file, atomically; returns the new schedule."""
    merged = {**row.schedule.metrics, **row.metric_entries()}
    new = row.schedule.replace(metrics=merged)
    new.save(row.path)
    row.schedule = new
    return new


# -- tables -----------------------------------------------------------------------------------------------


def _flat_metric(name: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(f"{name} {k}", v) for k, v in value.items()]
    return [(name, value)]


def table_records(rows: Sequence[EvalRow]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flat columns (solver, NFE, method, schedule, metric columns..., seconds) and one record per row."""
    metric_cols: list[str] = []
    records = []
    for r in rows:
        rec: dict[str, Any] = {
            "solver": str(r.schedule.solver),
            "nfe": r.schedule.nfe,
            "method": r.schedule.method.name,
            "schedule": r.path,
        }
        for name, v in r.metrics.items():
            for col, x in _flat_metric(name, v):
                rec[col] = x
                if col not in metric_cols:
                    metric_cols.append(col)
        v = r.versus or {}
        if "change" in v:
            rec.update({c: 100 * v[k] for c, k in zip(VERSUS_COLS, ("change", "low", "high", "better"), strict=True)})
        rec["sample s"] = r.seconds.get("sample")
        rec["metrics s"] = r.seconds.get("metrics")
        records.append(rec)
    versus = list(VERSUS_COLS) if any(r.versus is not None for r in rows) else []
    return ["solver", "nfe", "method", "schedule", *metric_cols, *versus, "sample s", "metrics s"], records


# eval --versus: the row's rmse vs the reference's (%), the 95 % paired bootstrap interval, the share of
# seeds on which the row is better (%); empty for the reference row and rows not comparable with it.
VERSUS_COLS = ("vs ref %", "95% low", "95% high", "better on %")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def render_markdown(rows: Sequence[EvalRow]) -> str:
    cols, recs = table_records(rows)
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if c not in ("solver", "method", "schedule") else "---" for c in cols) + "|",
    ]
    for rec in recs:
        lines.append("| " + " | ".join(_fmt(rec.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: Sequence[EvalRow]) -> str:
    cols, recs = table_records(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for rec in recs:
        w.writerow(
            {c: ("" if rec.get(c) is None else repr(rec[c]) if isinstance(rec[c], float) else rec[c]) for c in cols}
        )
    return buf.getvalue()


def rows_json(rows: Sequence[EvalRow]) -> dict[str, Any]:
    return {"rows": [r.to_json() for r in rows]}


def write_table(rows: Sequence[EvalRow], path: str | Path) -> Path:
    """Write the table in the format given by the extension (.md, .csv, .json), atomically."""
    p = Path(path)
    if p.suffix not in TABLE_FORMATS:
        raise StepoptError(f"`out` {p}: unknown table format '{p.suffix}'; expected one of {', '.join(TABLE_FORMATS)}")
    if p.suffix == ".md":
        text = render_markdown(rows)
    elif p.suffix == ".csv":
        text = render_csv(rows)
    else:
        text = json_text(rows_json(rows), indent=1) + "\n"
    return atomic_write_text(p, text)
