"""Benchmark GITS and OSS (and PFDiff) on gmm-digits against the baselines and the other optimizers.

For each solver and NFE: the RMSE against the exact ODE on held-out seeds 0..n-1 (the optimizers'
teacher trajectories use seeds 3,000,000+), with each optimizer's wall time and the network
evaluations it spent (teacher, search). ``--pfdiff`` instead tabulates PFDiff against its base
solvers at equal NFE on the logsnr and time-quadratic grids (gmm-digits: exact ODE; unet-digits:
the cached many-step teacher of ``stepopt eval``).

    .venv/bin/python scripts/bench_dp.py [--methods gits oss trust-region ays ld3] [--nfe 5 6 8 10] [--n 1000]
    .venv/bin/python scripts/bench_dp.py --methods gits:cost=local gits:cost=history --solvers dpmpp-3m euler

A method may carry ``--set`` items after a colon (``gits:cost=history,coeff=1.15``). For gits and oss
the row also records the DP's own path held out (``dp_rmse``) and what ``keep_best`` kept, so the
cells where keep_best replaced a DP path that was better held out can be counted (``keep_best``: the
rule, the baseline it was tested against and, for ``significant``, the bootstrap interval):
    .venv/bin/python scripts/bench_dp.py --methods gits:keep_best=off gits:keep_best=significant \
        gits:keep_best=lowest,check_trajectories=1024 --solvers euler dpmpp-3m unipc dpmpp-2m
    .venv/bin/python scripts/bench_dp.py --pfdiff [--models builtin:gmm-digits builtin:unet-digits]

Writes ``out/bench_dp.json`` (or ``out/bench_pfdiff.json``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from stepopt.baselines import baseline_sigmas
from stepopt.config import resolve_config
from stepopt.models import load_model
from stepopt.optimizers import get_optimizer, optimize
from stepopt.optimizers.dp import candidate_grid
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator

BASELINES = ("edm", "logsnr", "time-uniform", "time-quadratic", "kl-optimal")


def bench_optimizers(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model("builtin:gmm-digits")
    teacher = GridValidator(model, None, range(args.n))  # the exact ODE on seeds 0..n-1 (cached)
    rows = []
    for solver in args.solvers:
        ident = get_solver(solver).identity()
        test = teacher.with_solver(ident)
        for nfe in args.nfe:
            row: dict[str, Any] = {"solver": solver, "nfe": nfe, "rmse": {}, "seconds": {}, "evals": {}}
            n = get_solver(solver).steps_for_nfe(ident, nfe)
            for b in BASELINES:
                row["rmse"][b] = test.rmse(baseline_sigmas(b, n, model.sigma_max, model.sigma_min, model.frame))
            for m in args.methods:
                name, _, sets = m.partition(":")
                if name == "trust-region" and solver not in ("euler", "dpmpp-2m", "dpmpp-3m", "unipc"):
                    continue
                cfg = resolve_config(get_optimizer(name).config_cls, None, [v for v in sets.split(",") if v])
                t0 = time.perf_counter()
                s = optimize(name, model, ident, nfe, cfg, seed=0)
                row["seconds"][m] = round(time.perf_counter() - t0, 2)
                row["rmse"][m] = test.rmse(s.sigmas)
                rep = s.method.config.get("report") or {}
                row["evals"][m] = rep.get("network_evals")
                msg = f"{solver} nfe {nfe} {m}: rmse {row['rmse'][m]:.4f} in {row['seconds'][m]} s"
                if name in ("gits", "oss"):
                    cand = candidate_grid(model, cfg, n)
                    row.setdefault("dp_rmse", {})[m] = test.rmse([float(cand[i]) for i in rep["path"]])
                    row.setdefault("kept", {})[m] = (rep.get("keep_best") or {}).get("kept", "dp")
                    row.setdefault("cost", {})[m] = rep.get("cost")
                    kb = {k: v for k, v in (rep.get("keep_best") or {}).items() if k != "rmse_on_trajectories"}
                    row.setdefault("keep_best", {})[m] = kb
                    msg += f" (DP path {row['dp_rmse'][m]:.4f}, kept {row['kept'][m]}, cost {rep.get('cost')})"
                print(msg, flush=True)
            rows.append(row)
    return {"n": args.n, "rows": rows}


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
