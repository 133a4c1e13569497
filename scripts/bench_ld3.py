"""Benchmark LD3 on gmm-digits against the baselines, trust-region and a direct-search reference.

For each solver and NFE: the held-out RMSE against the exact ODE (seeds 0..n-1, never used for
training: LD3's teacher pairs come from seeds 2,000,000+) of

* the hand-crafted baselines (logsnr, edm, time-uniform, time-quadratic, kl-optimal);
* trust-region (Xue et al. 2024), when the optimizer is registered;
* LD3 with its defaults (start: the best of uniform and the baselines on the validation pairs),
  LD3 from the paper's uniform-lam start, and LD3 started from the trust-region schedule (--init);
* the paper's ablations (at the ablation NFEs): without the decoupled time xi, hard vs soft loss;
* the --init budget experiment (at the ablation NFEs): LD3 after one round (25 iterations) from the
  uniform start vs from the trust-region schedule;
* direct search: Nelder-Mead on the interior lam's (no ball, no xi) minimising the true RMSE on LD3's
  50 training pairs, started from uniform lam, time-quadratic and edm (best training RMSE kept):
  the best grid that this training set can identify, to show how close each method gets.

``--variant KEY=VALUE[,KEY=VALUE]`` (repeatable) adds a row "ld3 KEY=VALUE" (the defaults with those
options) at every solver and NFE, e.g. ``--variant noise_lr_rule=reference``; ``--only-default`` skips the
uniform-start and --init rows.

``--speed`` instead times the whole ``stepopt optimize -O ld3`` on ``builtin:unet-digits`` (dpmpp-3m,
NFE 5, cold teacher cache: a fresh ``STEPOPT_CACHE_DIR``) in a subprocess per thread setting --
torch's default (OpenMP threads spin while they wait), ``OMP_WAIT_POLICY=PASSIVE`` (what the CLI
sets unless the variable is set) and ``OMP_NUM_THREADS=1`` -- with where the time goes (teacher,
training, the keep_best check with its 2048 pairs' teacher) and the returned grid's RMSE against
the eval teacher (heun, 100 steps) on held-out seeds 0..511; writes ``out/bench_ld3_speed.json``.

Writes ``out/bench_ld3.json`` and prints markdown tables. ``--quick`` runs NFE 5 only on fewer
held-out seeds (about two minutes on two cores once the teacher cache is warm).

    .venv/bin/python scripts/bench_ld3.py [--quick] [--solvers dpmpp-3m unipc] [--nfe 5 6 8 10]
    .venv/bin/python scripts/bench_ld3.py --speed [--settings default passive one-thread]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.optimize import minimize

from stepopt.baselines import baseline_sigmas
from stepopt.errors import StepoptError
from stepopt.models import load_model
from stepopt.optimizers import get_optimizer, optimize
from stepopt.optimizers.ld3 import Ld3Config
from stepopt.sampling import NonFiniteError
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator

BASELINES = ("logsnr", "edm", "time-uniform", "time-quadratic", "kl-optimal")


def has_trust_region() -> bool:
    try:
        get_optimizer("trust-region")
        return True
    except StepoptError:
        pass
    try:  # written but not yet listed among the built-ins: importing registers it
        importlib.import_module("stepopt.optimizers.trust_region")
        get_optimizer("trust-region")
        return True
    except (ImportError, StepoptError):
        return False


def direct_search(model: Any, n: int, train: GridValidator) -> dict[str, Any]:
    """Nelder-Mead on the interior lam's minimising the training RMSE (multistart, best kept)."""
    l0, l1 = -math.log(model.sigma_max), -math.log(model.sigma_min)

    def grid(z: np.ndarray) -> np.ndarray:
        return np.exp(-np.concatenate([[l0], np.clip(np.sort(z), l0, l1), [l1]]))

    def f(z: np.ndarray) -> float:
        g = grid(z)
        if np.diff(np.log(g)).max() > -1e-4:  # merged nodes: singular solver coefficients
            return 1e3
        try:
            return train.rmse(g)
        except NonFiniteError:  # the search steps around it, as around any nan
            return math.nan

    t0 = time.perf_counter()
    best: Any = None
    for kind in ("logsnr", "time-quadratic", "edm"):
        start = -np.log(baseline_sigmas(kind, n, model.sigma_max, model.sigma_min, model.frame))[1:-1]
        r = minimize(
            f,
            start,
            method="Nelder-Mead",
            options={"maxfev": 200 * (n - 1), "xatol": 1e-4, "fatol": 1e-8, "adaptive": True},
        )
        if best is None or r.fun < best[0]:
            best = (float(r.fun), grid(r.x), kind, int(r.nfev))
    return {
        "nfev": best[3],
        "train_rmse": best[0],
        "sigmas": best[1].tolist(),
        "start": best[2],
        "seconds": time.perf_counter() - t0,
    }


SPEED_SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}
SPEED_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from stepopt.models import load_model
from stepopt.optimizers import optimize
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator
model = load_model("builtin:unet-digits")
ident = get_solver("dpmpp-3m").identity()
s = optimize("ld3", model, ident, 5, seed=0)
total = time.perf_counter() - t0
rep = s.method.config["report"]
import os
os.environ["STEPOPT_CACHE_DIR"] = os.environ["BENCH_HELDOUT_CACHE"]  # the held-out teacher: warm after the first run
test = GridValidator(model, ident, range(512))
kb = rep.get("keep_best") or {}
print(json.dumps({"seconds": total, "threads": torch.get_num_threads(),
    "seconds_teacher": rep["seconds_teacher"], "seconds_training": rep["seconds_training"],
    "seconds_check": kb.get("seconds", 0.0), "kept": kb.get("kept", "ld3"), "checkpoint": rep["checkpoint"],
    "iterations": rep["iterations"], "heldout_rmse": test.rmse(s.sigmas, s.model_sigmas)}))
"""


def bench_speed(settings: list[str], out: Path) -> None:
    """Whole ld3 runs on unet-digits with a cold teacher cache, one subprocess per thread setting."""
    import os
    import subprocess
    import sys
    import tempfile

    rows = []
    heldout_cache = tempfile.mkdtemp(prefix="stepopt-bench-heldout-")
    for name in settings:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        with tempfile.TemporaryDirectory() as cache:
            env.update(SPEED_SETTINGS[name], STEPOPT_CACHE_DIR=cache, BENCH_HELDOUT_CACHE=heldout_cache)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", SPEED_CHILD], env=env, capture_output=True, text=True, check=True
            )
            row = {"setting": name, "env": SPEED_SETTINGS[name], **json.loads(proc.stdout.strip().splitlines()[-1])}
        row["wall_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"{name:11s} {row['seconds']:7.1f} s (teacher {row['seconds_teacher']:.1f} s, training "
            f"{row['seconds_training']:.1f} s, {row['iterations']} iterations; keep_best check "
            f"{row['seconds_check']:.1f} s, kept {row['kept']}; {row['threads']} threads) "
            f"held-out RMSE {row['heldout_rmse']:.4f}",
            flush=True,
        )
    print(
        "\n| setting | whole optimize s | teacher s (all pairs) | training s | keep_best check s (its teacher "
        "included) | kept | held-out RMSE |\n|---|---:|---:|---:|---:|---|---:|"
    )
    for r in rows:
        print(
            f"| {r['setting']} | {r['seconds']:.0f} | {r['seconds_teacher']:.0f} | {r['seconds_training']:.0f} "
            f"| {r['seconds_check']:.0f} | {r['kept']} | {r['heldout_rmse']:.4f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solvers", nargs="+", default=["dpmpp-3m", "unipc"])
    ap.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10])
    ap.add_argument("--ablation-nfe", nargs="*", type=int, default=[5], help="NFEs for ablations and --init budget")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out seeds 0..n-1")
    ap.add_argument("--seed", type=int, default=0, help="LD3's seed")
    ap.add_argument("--quick", action="store_true", help="NFE 5 only, 300 held-out seeds")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct-search reference")
    ap.add_argument("--variant", action="append", default=[], help="KEY=VALUE: an extra LD3 row with that option")
    ap.add_argument("--only-default", action="store_true", help="skip the uniform-start and --init rows")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--speed", action="store_true", help="time whole ld3 runs on unet-digits (cold teacher cache)")
    ap.add_argument("--settings", nargs="+", choices=list(SPEED_SETTINGS), default=list(SPEED_SETTINGS))
    args = ap.parse_args()
    if args.speed:
        bench_speed(args.settings, args.out or Path("out/bench_ld3_speed.json"))
        return
    args.out = args.out or Path("out/bench_ld3.json")
    if args.quick:
        args.nfe, args.heldout = [5], min(args.heldout, 300)
    model = load_model("builtin:gmm-digits")
    tr_ok = has_trust_region()
    t0 = time.perf_counter()
    heldout = GridValidator(model, None, range(args.heldout))  # the exact ODE (cached on disk)
    print(f"held-out teacher: {args.heldout} seeds in {time.perf_counter() - t0:.1f} s", flush=True)
    cfg0 = Ld3Config()
    train_seeds = [cfg0.data_seed + i for i in range(cfg0.n_train)]
    train = GridValidator(model, None, train_seeds)
    rows: list[dict[str, Any]] = []

    def add(solver: str, nfe: int, method: str, sched_or_sig: Any, **extra: Any) -> dict[str, Any]:
        val = heldout.with_solver(get_solver(solver).identity())
        if isinstance(sched_or_sig, Schedule):
            sig, msig = list(sched_or_sig.sigmas), sched_or_sig.model_sigmas
        else:
            sig, msig = list(sched_or_sig), None
        e = val.errors(val.outputs(sig, None if msig is None else torch.tensor(msig)))
        row = {"solver": solver, "nfe": nfe, "method": method, "heldout_rmse": e["rmse"], "heldout_max": e["max"]}
        row.update(sigmas=sig, model_sigmas=None if msig is None else list(msig), **extra)
        rows.append(row)
        print(f"  {solver:9s} NFE {nfe:2d} {method:28s} held-out RMSE {e['rmse']:.5f}", flush=True)
        return row

    def ld3(solver: str, nfe: int, method: str, start: Schedule | None = None, **kw: Any) -> dict[str, Any]:
        ident = get_solver(solver).identity()
        s = optimize("ld3", model, ident, nfe, Ld3Config(**kw), seed=args.seed, init_schedule=start)
        rep = s.method.config["report"]
        return add(
            solver,
            nfe,
            method,
            s,
            seconds=s.method.seconds,
            seconds_training=rep["seconds_training"],
            iterations=rep["iterations"],
            start=rep["init"],
            lr_noise_final=rep.get("lr_noise_final"),
            validation=s.method.objective,
        )

    for solver in args.solvers:
        ident = get_solver(solver).identity()
        for nfe in args.nfe:
            print(f"{solver} NFE {nfe}", flush=True)
            for kind in BASELINES:
                add(solver, nfe, kind, baseline_sigmas(kind, nfe, model.sigma_max, model.sigma_min, model.frame))
            tr = None
            if tr_ok:
                t = time.perf_counter()
                tr = optimize("trust-region", model, ident, nfe)
                add(solver, nfe, "trust-region", tr, seconds=time.perf_counter() - t)
            default = ld3(solver, nfe, "ld3")
            for item in args.variant:  # KEY=VALUE[,KEY=VALUE...]
                kv = dict(x.partition("=")[::2] for x in item.split(","))
                ld3(solver, nfe, f"ld3 {item}", **{k: yaml.safe_load(v) for k, v in kv.items()})
            if not args.only_default:
                ld3(solver, nfe, "ld3 (uniform start)", init="uniform")
            if args.only_default:
                pass
            elif tr is not None and default["start"] == "trust-region":  # the same run: reuse it
                rows.append({**default, "method": "ld3 (--init trust-region)"})
            elif tr is not None:
                ld3(solver, nfe, "ld3 (--init trust-region)", start=tr)
            if nfe in args.ablation_nfe:
                ld3(solver, nfe, "ld3 without xi", decouple=False)
                ld3(solver, nfe, "ld3 hard loss", soft=False)
                ld3(solver, nfe, "ld3 uniform, 25 it", init="uniform", max_iterations=25)
                if tr is not None:
                    ld3(solver, nfe, "ld3 --init TR, 25 it", start=tr, max_iterations=25)
            if not args.no_direct:
                ds = direct_search(model, nfe, train.with_solver(ident))
                add(solver, nfe, "direct search (train)", ds.pop("sigmas"), **ds)

    # Markdown: methods x (solver, NFE).
    cols = [(s, n) for s in args.solvers for n in args.nfe]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    val = {(r["method"], r["solver"], r["nfe"]): r for r in rows}
    print(f"\n### Held-out RMSE vs the exact ODE (gmm-digits, {args.heldout} seeds)\n")
    print("| method | " + " | ".join(f"{s} {n}" for s, n in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for m in methods:
        cells = [f"{val[(m, s, n)]['heldout_rmse']:.4f}" if (m, s, n) in val else "" for s, n in cols]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\n### LD3 vs the direct-search reference and the best other method\n")
    print("| solver | NFE | ld3 | direct search | ld3 / direct | best baseline/TR | ld3 wall s (train s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s, n in cols:
        r = val.get(("ld3", s, n))
        d = val.get(("direct search (train)", s, n))
        others = [v for (m, s2, n2), v in val.items() if s2 == s and n2 == n and not m.startswith(("ld3", "direct"))]
        bo = min(others, key=lambda v: v["heldout_rmse"])
        ratio = f"{r['heldout_rmse'] / d['heldout_rmse']:.3f}" if r and d else ""
        dcell = f"{d['heldout_rmse']:.4f}" if d else ""
        print(
            f"| {s} | {n} | {r['heldout_rmse']:.4f} | {dcell} | {ratio} | "
            f"{bo['heldout_rmse']:.4f} ({bo['method']}) | {r['seconds']:.1f} ({r['seconds_training']:.1f}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model.id,
        "heldout_seeds": [0, args.heldout],
        "ld3_train_seeds": [train_seeds[0], train_seeds[-1] + 1],
        "ld3_config": Ld3Config().__dict__,
        "ld3_seed": args.seed,
        "trust_region": tr_ok,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
