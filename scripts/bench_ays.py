"""Benchmark ``--optimizer ays`` on gmm-digits: wall time and network evaluations per sweep.

1. A full default run (euler, NFE 10, seed 0): per-sweep seconds and evaluations, the kept sweep,
   and the result's error against the exact ODE on test noises 0..255 next to the baselines.
2. Candidate-sharing ablation at a fixed grid (the EDM start): one sweep's worth of candidate
   estimates (all 9 interior points, 11 candidates) with the ``shared`` and the ``independent``
   estimator on the same number of samples, repeated over ``--reps`` seeds: evaluations per sweep,
   the empirical variance of the candidate-minus-current differences (what the search compares)
   and the efficiency variance x evaluations (lower is better).
3. A full run with ``estimator: shared`` on a similar evaluation budget per sweep (1024 samples).

``--network`` profiles one run on a real network (default ``builtin:unet-digits``, dpmpp-3m NFE 5):
every denoiser call is attributed to the phase it runs in (data, teacher targets of the stopping and
held-out seeds, the start's baselines, each level's KLUB candidate sweeps and stopping measure, the
interpolation, the direct search, the held-out scores, the KLUB before/after), with its rows (network
evaluations), batch sizes and seconds; ``--profile`` adds cProfile's top functions. ``--before
FILE`` prints a side-by-side table against an earlier ``--network`` JSON (a run of older code).

``--table`` instead writes the README's AYS table: for each solver and NFE, the error against the
exact ODE on test noises 0..``--test-n``-1 (disjoint from AYS's stopping seeds 1000000... and its
held-out seeds 2000000...) of every baseline, of ``ays`` with its defaults (start: the best baseline
on the stopping measure; direct search of step counts outside the hierarchy) and, with
``--paper``, of the paper's setting (``init=auto``: EDM start, ``direct=false``), with what each run
chose, its own held-out ``stop_final`` and its wall time.

Writes JSON to ``out/bench_ays.json``. Run: ``OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_ays.py``
(``--table --solvers euler,dpmpp-3m --nfe 5,6,8,10 --paper`` for the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepopt.baselines import BASELINES, baseline_sigmas
from stepopt.io import atomic_write_text
from stepopt.models import load_model, resolve_device
from stepopt.optimizers import optimize
from stepopt.optimizers.ays import AYSConfig, candidate_values, load_data
from stepopt.optimizers.klub import KLUBEstimator
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator


def full_run(model: Any, solver: str, cfg: AYSConfig, device: torch.device, test: GridValidator) -> dict[str, Any]:
    ident = get_solver(solver).identity()
    t0, c0 = time.perf_counter(), time.process_time()
    s = optimize("ays", model, ident, 10, cfg, seed=0, device=device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep = s.method.config["report"]
    level = rep["levels"][0]
    test = test.with_solver(ident)
    errs = {"ays": test.rmse(np.array(s.sigmas))}
    for kind in ("edm", "logsnr", "kl-optimal"):
        errs[kind] = test.rmse(baseline_sigmas(kind, 10, model.sigma_max, model.sigma_min, model.frame))
    return {
        "solver": solver,
        "estimator": cfg.estimator,
        "samples": cfg.samples,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),  # process CPU time (all threads): the load-independent cost
        "sweeps_run": level["sweeps_run"],
        "sweep_kept": level["sweep_kept"],
        "per_sweep": [
            {"sweep": h["sweep"], "seconds": h["seconds"], "evals": h["evals"], "rmse_val": h["rmse"]}
            for h in level["history"][1:]
        ],
        "network_evals": rep["network_evals"],
        "klub": {k: s.method.objective.get(k) for k in ("initial", "final", "initial_stderr", "final_stderr")},
        "sigmas": list(s.sigmas),
        "test_rmse_vs_exact_ode": errs,
    }


def table(model: Any, solvers: list[str], nfes: list[int], paper: bool, test: GridValidator) -> list[dict[str, Any]]:
    """One row per (solver, NFE): test RMSE of every baseline and of ays (defaults; the paper's setting)."""
    configs = {"ays": AYSConfig()}
    if paper:
        configs["ays-paper"] = AYSConfig(init="auto", direct=False)
    rows = []
    for solver in solvers:
        ident = get_solver(solver).identity()
        scorer = test.with_solver(ident)
        for nfe in nfes:
            row: dict[str, Any] = {"solver": solver, "nfe": nfe}
            for kind in BASELINES:
                row[kind] = scorer.rmse(baseline_sigmas(kind, nfe, model.sigma_max, model.sigma_min, model.frame))
            for name, cfg in configs.items():
                t0 = time.perf_counter()
                s = optimize("ays", model, ident, nfe, cfg, seed=0)
                obj, rep = s.method.objective, s.method.config["report"]
                row[name] = scorer.rmse(np.array(s.sigmas))
                row[name + "_run"] = {
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "init": rep["init"],
                    "plan": rep["plan"],
                    "chosen": obj["chosen"],
                    "kept_start": obj["kept_start"],
                    "stop_final_holdout": obj["stop_final"],
                    "selection_final": obj["selection_final"],
                    "candidates": {
                        k: {m: v[m] for m in ("selection_rmse", "holdout_rmse")} for k, v in rep["candidates"].items()
                    },
                    "sigmas": list(s.sigmas),
                }
            rows.append(row)
            cells = " | ".join(f"{row[k]:.4f}" for k in (*BASELINES, *configs))
            print(f"| {solver} {nfe} | {cells} |", flush=True)
            for name in configs:
                r = row[name + "_run"]
                print(f"  {name}: init {r['init']}, chosen {r['chosen']}, {r['plan']}, {r['wall_s']} s", flush=True)
    return rows


def ablation(model: Any, device: torch.device, samples: int, reps: int) -> dict[str, Any]:
    data, _ = load_data(model, AYSConfig(), 0)
    grid = baseline_sigmas("edm", 10, model.sigma_max, model.sigma_min)
    out: dict[str, Any] = {"samples_per_point": samples, "reps": reps, "grid": "edm rho=7, 10 steps"}
    for mode in ("shared", "independent"):
        diffs, evals, secs, se2 = [], [], [], []
        for r in range(reps):
            est = KLUBEstimator(model, data, c=0.5, device=device, seed=100 + r)
            t0 = time.perf_counter()
            rows = []
            for parity in (1, 0):
                idx = [i for i in range(1, 10) if i % 2 == parity]
                cands = [candidate_values(grid, i, 11) for i in idx]
                res = est.candidates(grid, idx, [c[0] for c in cands], [c[1] for c in cands], samples, 1, mode)
                rows += [(x.mean - x.mean[x.ref])[:-1] for x in res]
                se2 += [float(np.mean(x.stderr_diff[:-1] ** 2)) for x in res]
            secs.append(time.perf_counter() - t0)
            evals.append(est.evals)
            diffs.append(np.stack(rows))  # (9 points, 10 candidates)
        d = np.stack(diffs)  # (reps, 9, 10)
        var = float(np.mean(d.var(0, ddof=1)))
        out[mode] = {
            "evals_per_sweep": int(np.mean(evals)),
            "seconds_per_sweep": round(float(np.mean(secs)), 3),
            "var_of_differences_empirical": var,
            "var_of_differences_reported": float(np.mean(se2)),
            "var_times_evals": var * float(np.mean(evals)),
        }
    out["efficiency_gain_shared"] = out["independent"]["var_times_evals"] / out["shared"]["var_times_evals"]
    return out


# -- --network: where a real-network run spends its evaluations and seconds -------------------------
class PhaseLog:
    """Attributes every denoiser call to the innermost active phase: calls, rows, batch sizes, seconds."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.phases: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []

    def entry(self, name: str) -> dict[str, Any]:
        if name not in self.phases:
            self.phases[name] = {"calls": 0, "evals": 0, "net_s": 0.0, "wall_s": 0.0, "batches": {}}
            self.order.append(name)
        return self.phases[name]

    def current(self) -> str:
        return self.stack[-1] if self.stack else "other"

    def enter(self, name: str) -> float:
        self.entry(name)
        self.stack.append(name)
        return time.perf_counter()

    def leave(self, t0: float) -> None:
        name = self.stack.pop()
        dt = time.perf_counter() - t0
        self.phases[name]["wall_s"] += dt
        if self.stack:  # the outer phase's own wall time excludes the inner one's
            self.phases[self.stack[-1]]["wall_s"] -= dt

    def network(self, rows: int, seconds: float) -> None:
        e = self.entry(self.current())
        e["calls"] += 1
        e["evals"] += rows
        e["net_s"] += seconds
        e["batches"][rows] = e["batches"].get(rows, 0) + 1


def _wrap(owner: Any, attr: str, label: Any, log: PhaseLog) -> None:
    """Replace ``owner.attr`` by a wrapper that runs it inside the phase ``label(*args)`` (skip if absent)."""
    fn = getattr(owner, attr, None)
    if fn is None:
        return

    def wrapped(*a: Any, **k: Any) -> Any:
        name = label(*a, **k)
        if name is None:
            return fn(*a, **k)
        t0 = log.enter(name)
        try:
            return fn(*a, **k)
        finally:
            log.leave(t0)

    setattr(owner, attr, wrapped)


def instrument(model: Any, log: PhaseLog) -> None:
    """Phases of ``stepopt.optimizers.ays.run`` by wrapping its module functions and the estimator's methods."""
    import stepopt.optimizers.ays as ays
    import stepopt.optimizers.klub as klub
    import stepopt.teacher as teacher

    direct = getattr(ays, "_DIRECT_LEVEL", 100_000)
    search_label: list[str] = []

    def level_name(level: int, steps: int) -> str:
        return f"direct search {steps} steps" if level >= direct else f"level {steps} steps"

    def search_phase(est: Any, sigmas: Any, free: Any, validate: Any, cfg: Any, ctx: Any, level: int) -> str:
        search_label.append(level_name(level, len(sigmas) - 1))
        return search_label[-1]

    _wrap(ays, "load_data_rows", lambda *a, **k: "data", log)
    _wrap(ays, "stop_validator", lambda *a, **k: "teacher targets (stopping / held-out seeds)", log)
    _wrap(ays, "choose_start", lambda model, n, *a, **k: f"start: baselines at {n} steps (stopping measure)", log)
    _wrap(ays, "search", search_phase, log)

    def in_search() -> str | None:
        cur = log.current()
        return cur if cur.startswith(("level ", "direct search")) else None

    def klub_phase(*a: Any, **k: Any) -> str:
        cur = in_search()
        return f"{cur}: KLUB candidates" if cur else "KLUB candidates"

    def rmse_phase(self: Any, *a: Any, **k: Any) -> str:
        cur = in_search()
        if cur:
            return f"{cur}: stopping measure"
        if log.current().startswith("start:"):
            return None  # type: ignore[return-value]
        if self.seeds and self.seeds[0] >= 2_000_000:
            return "held-out scores (report)"
        return "interpolated / chosen grid: stopping measure"

    _wrap(klub.KLUBEstimator, "candidates", klub_phase, log)
    _wrap(klub.KLUBEstimator, "interval_terms", lambda *a, **k: "KLUB before/after (klub_samples)", log)
    _wrap(teacher.GridValidator, "rmse", rmse_phase, log)
    inner = model.denoise

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = inner(x, sigma, **cond)
        log.network(int(x.shape[0]), time.perf_counter() - t0)
        return out

    model.denoise = denoise


def _value(default: Any, text: str) -> Any:
    """``text`` as the type of the option's default (bool: true/false)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    return type(default)(text) if default is not None else text


def network_run(args: argparse.Namespace) -> dict[str, Any]:
    import cProfile
    import io
    import pstats

    log = PhaseLog()
    model = load_model(args.model)
    instrument(model, log)
    ident = get_solver(args.solvers.split(",")[0]).identity()
    nfe = int(args.nfe.split(",")[0])
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = AYSConfig(**{k: _value(getattr(AYSConfig(), k), v) for k, v in overrides.items()})
    prof = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof is not None:
        prof.enable()
    s = optimize("ays", model, ident, nfe, cfg, seed=0)
    if prof is not None:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    obj, rep = s.method.objective, s.method.config["report"]
    phases = []
    for name in log.order:
        e = log.phases[name]
        sizes = sorted(e["batches"].items())
        phases.append(
            {
                "phase": name,
                "calls": e["calls"],
                "evals": e["evals"],
                "net_s": round(e["net_s"], 2),
                "wall_s": round(e["wall_s"], 2),
                "batch_sizes": {str(k): v for k, v in sizes},
            }
        )
    out: dict[str, Any] = {
        "model": model.id,
        "solver": ident.name,
        "nfe": nfe,
        "config": overrides,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "evals": sum(p["evals"] for p in phases),
        "report_evals": rep.get("network_evals"),
        "plan": rep.get("plan"),
        "chosen": obj.get("chosen"),
        "init": rep.get("init"),
        "selection_final": obj.get("selection_final"),
        "stop_initial": obj.get("stop_initial"),
        "stop_final": obj.get("stop_final"),
        "candidates": {k: {m: v[m] for m in ("selection_rmse", "holdout_rmse")} for k, v in rep["candidates"].items()},
        "levels": [
            {k: lv.get(k) for k in ("steps", "sweeps_run", "sweep_kept", "rmse_start", "rmse_kept", "seconds")}
            for lv in rep.get("levels", [])
        ],
        "sigmas": list(s.sigmas),
        "phases": phases,
    }
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        out["cprofile_top"] = buf.getvalue()
    return out


def network_table(run: dict[str, Any], before: dict[str, Any] | None) -> str:
    def batches(p: dict[str, Any]) -> str:
        sizes = {int(k): v for k, v in p["batch_sizes"].items()}
        if not sizes:
            return ""
        common = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:3]
        return ", ".join(f"{v}x{k}" for k, v in common) + (" ..." if len(sizes) > 3 else "")

    lines = [
        f"ays on {run['model']}, {run['solver']} NFE {run['nfe']}: {run['wall_s']} s wall,"
        f" {run['evals']:,} evaluations;"
        f" plan: {run['plan']}; chosen {run['chosen']} (held-out {run['stop_final']:.5f})"
    ]
    earlier = [p["phase"] for p in before["phases"]] if before else []
    names = list(dict.fromkeys([p["phase"] for p in run["phases"]] + earlier))
    by = {p["phase"]: p for p in run["phases"]}
    old = {p["phase"]: p for p in before["phases"]} if before else {}
    if before:
        lines.append("| phase | evals before | s before | evals | s | batches (calls x rows) |")
        lines.append("|---|---:|---:|---:|---:|---|")
    else:
        lines.append("| phase | evals | network s | wall s | batches (calls x rows) |")
        lines.append("|---|---:|---:|---:|---|")
    for name in names:
        p, q = by.get(name), old.get(name)
        if before:
            b_e = f"{q['evals']:,}" if q else ""
            b_s = f"{q['wall_s']:.1f}" if q else ""
            lines.append(
                f"| {name} | {b_e} | {b_s} | {p['evals']:,} | {p['wall_s']:.1f} | {batches(p)} |"
                if p
                else f"| {name} | {b_e} | {b_s} | | | |"
            )
        elif p:
            lines.append(f"| {name} | {p['evals']:,} | {p['net_s']:.1f} | {p['wall_s']:.1f} | {batches(p)} |")
    if before:
        lines.append(
            f"| **total** | {before['evals']:,} | {before['wall_s']:.1f} | {run['evals']:,} | {run['wall_s']:.1f} | |"
        )
    else:
        lines.append(f"| **total** | {run['evals']:,} | | {run['wall_s']:.1f} | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench_ays.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--ablation-samples", type=int, default=256)
    ap.add_argument("--skip-shared-run", action="store_true")
    ap.add_argument("--solvers", default="euler,dpmpp-2m")
    ap.add_argument("--table", action="store_true", help="the README table instead of the timing runs")
    ap.add_argument("--nfe", default="5,6,8,10", help="NFEs of --table")
    ap.add_argument("--paper", action="store_true", help="--table: also the paper's setting (edm start, no direct)")
    ap.add_argument("--test-n", type=int, default=256, help="test noises 0..N-1")
    ap.add_argument("--network", action="store_true", help="profile one run on a real network (see above)")
    ap.add_argument("--model", default="builtin:unet-digits", help="--network: the model")
    ap.add_argument("--set", action="append", default=[], help="--network: an ays option KEY=VALUE (repeatable)")
    ap.add_argument("--profile", action="store_true", help="--network: cProfile's top functions too")
    ap.add_argument("--before", type=Path, help="--network: an earlier --network JSON to compare with")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.network:
        if args.solvers == "euler,dpmpp-2m":
            args.solvers = "dpmpp-3m"
        if args.nfe == "5,6,8,10":
            args.nfe = "5"
        out_path = args.out if args.out != Path("out/bench_ays.json") else Path("out/bench_ays_network.json")
        run = network_run(args)
        before = json.loads(args.before.read_text()) if args.before else None
        print(network_table(run, before))
        if "cprofile_top" in run:
            print(run["cprofile_top"])
        atomic_write_text(out_path, json.dumps({"run": run, "before": before}, indent=1))
        print(f"wrote {out_path}")
        return 0
    device = resolve_device(args.device)
    model = load_model("builtin:gmm-digits", device=device)
    test = GridValidator(model, None, range(args.test_n), device=device)  # the exact ODE on the test noises (cached)
    if args.table:
        rows = table(model, args.solvers.split(","), [int(v) for v in args.nfe.split(",")], args.paper, test)
        out = {"model": model.id, "test_seeds": f"0..{args.test_n - 1}", "rows": rows}
        atomic_write_text(args.out, json.dumps(out, indent=1))
        print(f"wrote {args.out}")
        return 0
    result: dict[str, Any] = {
        "model": model.id,
        "load_average_at_start": list(os.getloadavg()),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "test_seeds": f"0..{args.test_n - 1}",
        "runs": [],
    }
    for solver in args.solvers.split(","):
        run = full_run(model, solver, AYSConfig(), device, test)
        result["runs"].append(run)
        print(f"{solver}: {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU, kept sweep {run['sweep_kept']}")
        print(f"  test rmse vs exact ODE: {run['test_rmse_vs_exact_ode']}")
    result["ablation"] = ablation(model, device, args.ablation_samples, args.reps)
    print(f"ablation: {json.dumps(result['ablation'])}")
    if not args.skip_shared_run:
        run = full_run(model, "euler", AYSConfig(estimator="shared", samples=1024), device, test)
        result["runs"].append(run)
        print(f"euler shared: {run['wall_s']:.1f} s, kept {run['sweep_kept']}, {run['test_rmse_vs_exact_ode']}")
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
