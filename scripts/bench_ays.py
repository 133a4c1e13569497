"""Benchmark ``--optimizer ays`` on gmm-digits: wall time and network evaluations per sweep.

1. A full default run (euler, NFE 10, seed 0): per-sweep seconds and evaluations, the kept sweep,
   and the result's error against the exact ODE on test noises 0..255 next to the baselines.
2. Candidate-sharing ablation at a fixed grid (the EDM start): one sweep's worth of candidate
   estimates (all 9 interior points, 11 candidates) with the ``shared`` and the ``independent``
   estimator on the same number of samples, repeated over ``--reps`` seeds: evaluations per sweep,
   the empirical variance of the candidate-minus-current differences (what the search compares)
   and the efficiency variance x evaluations (lower is better).
3. A full run with ``estimator: shared`` on a similar evaluation budget per sweep (1024 samples).

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
