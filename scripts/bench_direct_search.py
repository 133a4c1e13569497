"""How close do stepopt's schedules come to the best grid there is? A direct search on gmm-digits.

On ``builtin:gmm-digits`` the exact ODE solution is known, so the best N-step grid for a solver is
well defined: the grid that minimizes the RMSE of the solver's output against the exact solution
over the noise distribution. A *direct search* approximates it by minimizing that RMSE on a finite
set of noises (L-BFGS on the interior log-SNR nodes, the gradient backpropagated through the solver:
:func:`stepopt.optimizers.trust_region.refine.refine_grid`).

The few-step error is heavy-tailed over the noise (a few seeds whose trajectory ends on another
mixture component carry much of the squared error), so a search on a few hundred noises overfits
them: scored on the same noises it looks far better than it is. This benchmark therefore measures
everything on one large evaluation set (``--eval-n`` seeds from ``--eval-seed0``) and reports:

1. the baselines and stepopt's optimizers (``--methods``, each ``name[:key=value;...]``) scored on it;
2. direct searches on disjoint training sets of increasing size (``--train``, seeds from
   ``--train-seed0``), from several starts (``--starts``: baseline names or ``trust-region``), scored
   on the evaluation set (held out) -- the search's generalization as the training set grows;
3. the *oracle*: a direct search on the evaluation set itself, from the same starts and from the
   best held-out grid of 2 (the lowest in-sample RMSE any grid reaches there), and that grid
   scored on the largest training set (how much of its advantage is fitted to the evaluation seeds).

Every schedule is compared with the oracle seed by seed (relative RMSE change with a 95 % paired
bootstrap interval, :mod:`stepopt.stats`). Prints a table and writes ``out/bench_direct_search.json``.
The README's table is this script's defaults (about 100 minutes on one thread of a shared 2-core
machine: the exact-ODE teacher for 8192 + 8192 seeds 4 minutes, each search on 8192 seeds 5-6):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_direct_search.py --solver dpmpp-3m --nfe 10
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
from stepopt.optimizers.trust_region.refine import refine_grid
from stepopt.solvers import get_solver
from stepopt.stats import paired_bootstrap
from stepopt.teacher import GridValidator

BASELINES = ("edm", "logsnr", "time-uniform", "time-quadratic", "kl-optimal")


def per_seed(val: GridValidator, sigmas: Any) -> np.ndarray:
    """Each seed's mean squared error against the exact ODE."""
    out = val.outputs(sigmas).to(torch.float64)
    return ((out - val.targets.to(torch.float64)) ** 2).reshape(out.shape[0], -1).mean(1).numpy()


def rmse(errs: np.ndarray) -> float:
    return float(errs.mean()) ** 0.5


def search(val: GridValidator, sigmas: Any, maxiter: int) -> tuple[list[float], dict[str, Any]]:
    """A direct search on ``val``'s seeds from ``sigmas``; the grid as sigmas and the search's report."""
    lam0 = -np.log(np.asarray(sigmas, dtype=np.float64))
    lam, rep = refine_grid(val, lam0, maxiter)
    return [float(v) for v in np.exp(-lam)], rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--solver", default="dpmpp-3m")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--eval-n", type=int, default=8192)
    ap.add_argument("--eval-seed0", type=int, default=0)
    ap.add_argument("--train", default="1024,4096,8192", help="training set sizes (comma-separated)")
    ap.add_argument("--train-seed0", type=int, default=200_000)
    ap.add_argument("--starts", default="time-quadratic,trust-region")
    ap.add_argument(
        "--methods",
        default=(
            "trust-region,trust-region:select=true,trust-region:teacher_refine=true,"
            "trust-region:teacher_refine=true;select_n=256,trust-region:teacher_refine=true;select_n=1024,"
            "trust-region:teacher_refine=true;select_n=4096,trust-region:teacher_refine=true;select_n=8192,"
            "trust-region:teacher_refine=true;select_n=1024;refine_pool=32768;refine_starts=8;teacher_refine_iters=300,"
            "trust-region:teacher_refine=true;select_n=2048;refine_pool=32768;refine_starts=2;teacher_refine_iters=300,"
            "ld3,oss"
        ),
        help="stepopt optimizers to score, comma-separated, each name[:key=value;key=value...]",
    )
    ap.add_argument("--maxiter", type=int, default=100, help="L-BFGS iterations of each search")
    ap.add_argument("--out", default="out/bench_direct_search.json")
    args = ap.parse_args()

    model = load_model("builtin:gmm-digits")
    solver = get_solver(args.solver)
    ident = solver.identity()
    n = solver.steps_for_nfe(ident, args.nfe)
    t0 = time.perf_counter()
    ev = GridValidator(model, ident, range(args.eval_seed0, args.eval_seed0 + args.eval_n))
    sizes = sorted(int(t) for t in args.train.split(",") if t)
    train_all = GridValidator(model, ident, range(args.train_seed0, args.train_seed0 + max(sizes))) if sizes else None
    print(f"teacher for {args.eval_n} + {max(sizes, default=0)} seeds: {time.perf_counter() - t0:.0f} s", flush=True)

    grids: dict[str, list[float]] = {}
    errs: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}

    def score(name: str, sigmas: Any, **extra: Any) -> None:
        grids[name] = [float(v) for v in sigmas]
        errs[name] = per_seed(ev, sigmas)
        info[name] = {"rmse": rmse(errs[name]), **extra}
        print(f"{name}: rmse {info[name]['rmse']:.5f} {extra if extra else ''}", flush=True)

    for b in BASELINES:
        score(b, baseline_sigmas(b, n, model.sigma_max, model.sigma_min, model.frame))
    for spec in [m for m in args.methods.split(",") if m]:
        name, _, sets = spec.partition(":")
        cfg = resolve_config(get_optimizer(name).config_cls, None, [v for v in sets.split(";") if v])
        t = time.perf_counter()
        s = optimize(name, model, ident, args.nfe, cfg, seed=0)
        rep = s.method.config.get("report") or {}
        score(spec, s.sigmas, seconds=round(time.perf_counter() - t, 1), evals=rep.get("network_evals"))

    def start_grid(start: str) -> list[float]:
        if start not in grids:
            raise SystemExit(f"--starts: {start!r} is neither a baseline nor one of --methods")
        return grids[start]

    starts = [s for s in args.starts.split(",") if s]
    for size in sizes:
        assert train_all is not None
        train = train_all.subset(0, size)
        for start in starts:
            sig, rep = search(train, start_grid(start), args.maxiter)
            score(
                f"search train {size} from {start}",
                sig,
                train_rmse=rep["rmse"],
                iterations=rep["iterations"],
                seconds=rep["seconds"],
            )
    held = [k for k in grids if k.startswith("search train")]
    oracle_starts = list(starts)
    if held:
        best_held = min(held, key=lambda k: info[k]["rmse"])
        oracle_starts.append(best_held)
    for start in oracle_starts:
        sig, rep = search(ev, start_grid(start), args.maxiter)
        extra: dict[str, Any] = {"iterations": rep["iterations"], "seconds": rep["seconds"]}
        if train_all is not None:
            extra["rmse_on_train"] = rmse(per_seed(train_all, sig))
        score(f"oracle from {start}", sig, **extra)

    oracle = min((k for k in grids if k.startswith("oracle")), key=lambda k: info[k]["rmse"])
    print(
        f"\n{args.solver} NFE {args.nfe}, RMSE vs the exact ODE on seeds {args.eval_seed0}.."
        f"{args.eval_seed0 + args.eval_n - 1}; reference: {oracle} ({info[oracle]['rmse']:.5f})"
    )
    print("| schedule | RMSE | vs reference, 95 % interval |\n|---|---:|---|")
    for k in grids:
        cmp = paired_bootstrap(errs[k], errs[oracle])
        info[k]["versus_reference"] = cmp.to_dict()
        print(f"| {k} | {info[k]['rmse']:.5f} | {cmp.describe()} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "reference": oracle, "schedules": info, "grids": grids}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
