"""Benchmark the solver zoo on ``builtin:gmm-digits`` against the exact ODE solution.

For each solver identity (every solver's default, plus UniPC bh1 and bh2), each baseline grid (logsnr,
edm rho=7) and each NFE budget, runs the solver from the noise of seeds 0..S-1 at sigma_max and
compares the state at sigma_min with ``model.ode_solution`` (DOP853, ~1e-10):

* ``rmse``: sqrt of the mean squared error over all samples and pixels;
* ``max``: the largest absolute error over all samples and pixels.

N is the number of steps whose exact NFE equals the budget (Heun: N = NFE/2, odd budgets are
skipped and shown as "-"). The solver's own overhead is the wall time of a run outside the
denoiser, as a fraction of the time spent inside it (a timing wrapper around the denoiser; the best
of 5 repeats, at the largest even budget on the logsnr grid).

Prints a markdown table and writes JSON (default ``out/bench_solvers.json``). Run:
``OMP_NUM_THREADS=1 python scripts/bench_solvers.py [--seeds 64] [--nfe 5 6 8 10] [--out F]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from stepopt.baselines import baseline_sigmas
from stepopt.errors import StepoptError
from stepopt.io import atomic_write_text
from stepopt.models import load_model
from stepopt.models.base import DiffusionModel
from stepopt.sampling import initial_noise
from stepopt.solvers import SolverIdentity, all_solvers, get_solver, solve

GRIDS = ("logsnr", "edm")


def identities() -> list[SolverIdentity]:
    out = []
    for spec in all_solvers():
        if spec.variants:
            out.extend(spec.identity(variant=v) for v in spec.variants)
        else:
            out.append(spec.identity())
    return out


def label(identity: SolverIdentity) -> str:
    parts = [identity.name, f"o{identity.order}"]
    if identity.variant is not None:
        parts.append(identity.variant)
    if identity.lower_order_final is not None:
        parts.append("lof" if identity.lower_order_final else "no-lof")
    return " ".join(parts)


class TimedDenoiser:
    """Wraps a denoiser and accumulates the wall time spent inside it."""

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.model(x, sigma, **cond)
        self.seconds += time.perf_counter() - t0
        return out


def overhead(identity: SolverIdentity, model: DiffusionModel, x: torch.Tensor, sigmas: torch.Tensor) -> float:
    """(run time - denoiser time) / denoiser time, best of 5 runs (the machine may be shared)."""
    best = float("inf")
    for _ in range(5):
        timed = TimedDenoiser(model)
        t0 = time.perf_counter()
        solve(identity, timed, x, sigmas)
        total = time.perf_counter() - t0
        best = min(best, (total - timed.seconds) / timed.seconds)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=64, help="number of samples (seeds 0..S-1)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10], help="NFE budgets")
    ap.add_argument("--out", type=Path, default=Path("out/bench_solvers.json"), help="JSON output")
    args = ap.parse_args()

    t_start = time.perf_counter()
    model = load_model("builtin:gmm-digits", device="cpu")
    x = initial_noise(model, list(range(args.seeds)), dtype=torch.float64)
    ref = model.ode_solution(x, model.sigma_max, model.sigma_min)
    rows: list[dict[str, Any]] = []
    for ident in identities():
        spec = get_solver(ident.name)
        for grid in GRIDS:
            for nfe in args.nfe:
                try:
                    n = spec.steps_for_nfe(ident, nfe)
                except StepoptError:
                    rows.append({"solver": ident.to_dict(), "grid": grid, "nfe": nfe, "steps": None})
                    continue
                sig = torch.tensor(baseline_sigmas(grid, n, model.sigma_max, model.sigma_min, model.frame))
                err = solve(ident, model, x, sig) - ref
                rows.append(
                    {
                        "solver": ident.to_dict(),
                        "grid": grid,
                        "nfe": nfe,
                        "steps": n,
                        "rmse": float(err.pow(2).mean().sqrt()),
                        "max": float(err.abs().max()),
                    }
                )
    nfe_t = max(args.nfe) - max(args.nfe) % 2  # even, so that Heun has it too
    overheads = {}
    for ident in identities():
        n = get_solver(ident.name).steps_for_nfe(ident, nfe_t)
        sig = torch.tensor(baseline_sigmas("logsnr", n, model.sigma_max, model.sigma_min, model.frame))
        overheads[label(ident)] = overhead(ident, model, x, sig)

    print(table(rows, args.nfe, overheads, args.seeds))
    result = {
        "model": model.id,
        "fingerprint": model.fingerprint,
        "seeds": args.seeds,
        "sigma_max": model.sigma_max,
        "sigma_min": model.sigma_min,
        "reference": "GaussianMixture.ode_solution (DOP853, rtol=atol=1e-12)",
        "metrics": {"rmse": "sqrt(mean squared error over samples and pixels)", "max": "max abs error"},
        "rows": rows,
        "overhead": {"nfe": nfe_t, "grid": "logsnr", "fraction_of_denoiser_time": overheads},
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']:.1f} s)")


def table(rows: list[dict[str, Any]], nfes: list[int], overheads: dict[str, float], seeds: int) -> str:
    """Markdown: one line per solver and grid, RMSE / max error per NFE, plus the overhead column."""
    head = ["solver", "grid", *[f"NFE {n} rmse / max" for n in nfes], "overhead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keyed = {(json.dumps(r["solver"], sort_keys=True), r["grid"], r["nfe"]): r for r in rows}
    for ident in identities():
        key = json.dumps(ident.to_dict(), sort_keys=True)
        for grid in GRIDS:
            cells = [label(ident), grid]
            for nfe in nfes:
                r = keyed[(key, grid, nfe)]
                cells.append("-" if r["steps"] is None else f"{r['rmse']:.4f} / {r['max']:.3f}")
            cells.append(f"{100 * overheads[label(ident)]:.1f}%" if grid == GRIDS[0] else "")
            lines.append("| " + " | ".join(cells) + " |")
    best = {}
    for nfe in nfes:
        cands = [r for r in rows if r["nfe"] == nfe and r["steps"] is not None]
        best[nfe] = min(cands, key=lambda r: r["rmse"]) if cands else None
    notes = [
        f"\nExact ODE reference on builtin:gmm-digits, {seeds} seeds; error at sigma_min (no final denoise).",
        "Best RMSE per NFE: "
        + ", ".join(
            f"{n}: {label(SolverIdentity(**b['solver']))} ({b['grid']}) {b['rmse']:.4f}"
            for n, b in best.items()
            if b is not None
        ),
    ]
    return "\n".join(lines + notes)


if __name__ == "__main__":
    main()
