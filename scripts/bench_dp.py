"""Benchmark GITS and OSS (and PFDiff) on gmm-digits against the baselines and the other optimizers.

For each solver and NFE: the RMSE against the exact ODE on held-out seeds seed0..seed0+n-1 (default
0..999; the optimizers' teacher trajectories use seeds 3,000,000+), with each optimizer's wall time,
the network evaluations it spent (teacher, search) and its paired bootstrap against the cell's best
baseline (``versus_best``: relative RMSE change with its 95 % interval over the held-out seeds).
``--pfdiff`` instead tabulates PFDiff against its base solvers at equal NFE on the logsnr and
time-quadratic grids (gmm-digits: exact ODE; unet-digits: the cached many-step teacher of ``stepopt eval``).

    .venv/bin/python scripts/bench_dp.py [--methods gits oss trust-region ays ld3] [--nfe 5 6 8 10] [--n 1000]
    .venv/bin/python scripts/bench_dp.py --methods gits:cost=local gits:cost=history --solvers dpmpp-3m euler

A method may carry ``--set`` items after a colon (``gits:cost=history,coeff=1.15``). For gits and oss
the row also records the DP's own path held out (``dp_rmse``) and what ``keep_best`` kept, so the
cells where keep_best replaced a DP path that was better held out can be counted (``keep_best``: the
rule, the baseline it was tested against and, for ``significant``, the bootstrap interval):
    .venv/bin/python scripts/bench_dp.py --methods gits:keep_best=off gits:keep_best=significant \
        gits:keep_best=lowest,check_trajectories=1024 --solvers euler dpmpp-3m unipc dpmpp-2m
    .venv/bin/python scripts/bench_dp.py --methods gits gits:propagate=linear gits:metric=dev oss --seed0 20000
    .venv/bin/python scripts/bench_dp.py --pfdiff [--models builtin:gmm-digits builtin:unet-digits]

Writes ``out/bench_dp.json`` (or ``out/bench_pfdiff.json``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepopt.baselines import baseline_sigmas
from stepopt.config import resolve_config
from stepopt.models import load_model
from stepopt.optimizers import get_optimizer, optimize
from stepopt.optimizers.dp import candidate_grid
from stepopt.solvers import get_solver
from stepopt.stats import paired_bootstrap
from stepopt.teacher import GridValidator

BASELINES = ("edm", "logsnr", "time-uniform", "time-quadratic", "kl-optimal")


def per_seed(test: GridValidator, sigmas: Any) -> np.ndarray:
    """Each held-out seed's mean squared error against the exact ODE (the rows of ``test.rmse``)."""
    out = test.outputs(sigmas).to(torch.float64)
    return ((out - test.targets.to(torch.float64)) ** 2).reshape(out.shape[0], -1).mean(1).numpy()


def bench_optimizers(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model("builtin:gmm-digits")
    # the exact ODE on seeds seed0..seed0+n-1 (cached)
    teacher = GridValidator(model, None, range(args.seed0, args.seed0 + args.n))
    rows = []
    for solver in args.solvers:
        ident = get_solver(solver).identity()
        test = teacher.with_solver(ident)
        for nfe in args.nfe:
            row: dict[str, Any] = {"solver": solver, "nfe": nfe, "rmse": {}, "seconds": {}, "evals": {}}
            n = get_solver(solver).steps_for_nfe(ident, nfe)
            errs: dict[str, np.ndarray] = {}
            for b in BASELINES:
                errs[b] = per_seed(test, baseline_sigmas(b, n, model.sigma_max, model.sigma_min, model.frame))
                row["rmse"][b] = float(errs[b].mean()) ** 0.5
            best = min(BASELINES, key=lambda b: row["rmse"][b])
            row["best_baseline"] = best
            for m in args.methods:
                name, _, sets = m.partition(":")
                if name == "trust-region" and solver not in ("euler", "dpmpp-2m", "dpmpp-3m", "unipc"):
                    continue
                cfg = resolve_config(get_optimizer(name).config_cls, None, [v for v in sets.split(",") if v])
                t0 = time.perf_counter()
                s = optimize(name, model, ident, nfe, cfg, seed=0)
                row["seconds"][m] = round(time.perf_counter() - t0, 2)
                errs[m] = per_seed(test, s.sigmas)
                row["rmse"][m] = float(errs[m].mean()) ** 0.5
                # relative RMSE change against the best baseline, paired over the held-out seeds
                row.setdefault("versus_best", {})[m] = paired_bootstrap(errs[m], errs[best]).to_dict()
                row.setdefault("sigmas", {})[m] = [float(v) for v in s.sigmas]
                rep = s.method.config.get("report") or {}
                row["evals"][m] = rep.get("network_evals")
                vb = {k: 100 * v for k, v in row["versus_best"][m].items() if k in ("change", "low", "high")}
                msg = (
                    f"{solver} nfe {nfe} {m}: rmse {row['rmse'][m]:.4f} in {row['seconds'][m]} s; vs {best}"
                    f" {row['rmse'][best]:.4f}: {vb['change']:+.2f} % [{vb['low']:+.2f}, {vb['high']:+.2f}]"
                )
                if name in ("gits", "oss"):
                    cand = candidate_grid(model, cfg, n)
                    dp_err = per_seed(test, [float(cand[i]) for i in rep["path"]])
                    row.setdefault("dp_rmse", {})[m] = float(dp_err.mean()) ** 0.5
                    row.setdefault("dp_versus_best", {})[m] = paired_bootstrap(dp_err, errs[best]).to_dict()
                    row.setdefault("kept", {})[m] = (rep.get("keep_best") or {}).get("kept", "dp")
                    row.setdefault("cost", {})[m] = rep.get("cost")
                    kb = {k: v for k, v in (rep.get("keep_best") or {}).items() if k != "rmse_on_trajectories"}
                    row.setdefault("keep_best", {})[m] = kb
                    msg += f" (DP path {row['dp_rmse'][m]:.4f}, kept {row['kept'][m]}, cost {rep.get('cost')})"
                print(msg, flush=True)
            rows.append(row)
    return {"n": args.n, "seed0": args.seed0, "rows": rows}


def bench_pfdiff(args: argparse.Namespace) -> dict[str, Any]:
    pairs = (("euler", "pfdiff-euler"), ("dpmpp-2m", "pfdiff-dpmpp-2m"))
    out = []
    for mid in args.models:
        model = load_model(mid)
        test = GridValidator(model, None, range(args.n))  # the teacher's targets, computed once (cached)
        for nfe in args.nfe:
            for grid in ("logsnr", "time-quadratic"):
                row: dict[str, Any] = {"model": mid, "nfe": nfe, "grid": grid, "rmse": {}}
                for base, wrapped in pairs:
                    for name in (base, wrapped):
                        spec = get_solver(name)
                        variants = spec.variants or (None,)
                        for v in variants if name == wrapped else (None,):
                            ident = spec.identity(variant=v)
                            n = spec.steps_for_nfe(ident, nfe)
                            sig = baseline_sigmas(grid, n, model.sigma_max, model.sigma_min, model.frame)
                            key = name if v is None else f"{name}:{v}"
                            row["rmse"][key] = test.with_solver(ident).rmse(sig)
                out.append(row)
                print(json.dumps(row), flush=True)
    return {"n": args.n, "rows": out}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["gits", "oss", "trust-region", "ays", "ld3"])
    p.add_argument("--solvers", nargs="+", default=["euler", "dpmpp-3m"])
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed0", type=int, default=0, help="held-out seeds seed0..seed0+n-1 (optimizers use 3,000,000+)")
    p.add_argument("--pfdiff", action="store_true")
    p.add_argument("--models", nargs="+", default=["builtin:gmm-digits", "builtin:unet-digits"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    res = bench_pfdiff(args) if args.pfdiff else bench_optimizers(args)
    path = Path(args.out or ("out/bench_pfdiff.json" if args.pfdiff else "out/bench_dp.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
