"""Flow table of the README: builtin:gmm-digits-flow (shift 3), euler / dpmpp-2m at NFE 5, 8, 10.

Every schedule uses ``final_step: denoise``; the error is the RMSE over the test seeds 0..199 against
the exact ODE's denoised endpoint at sigma 0.002 (the same target for every schedule, whatever its
last sigma). The test seeds are held out from every optimizer: ays stops on seeds 1000000... (and
reports on 2000000...), ld3 trains on 2000000..., gits / oss follow trajectories from 3000000...;
trust-region uses no noise (``trust-region-refine``, its ``teacher_refine``, fits seeds 10000...). Each
optimizer runs with its defaults; one that refuses gets its one-line refusal in the table. With a final
denoise the optimizers' last evaluated node is free (issue 14): the second table gives it (sigma_N), and
``--pinned`` adds each optimizer with ``last_node: sigma_min`` (the grids before) as ``NAME@sigma_min``.

Usage: ``PYTHONPATH=cli python scripts/bench_flow.py [--optimizers trust-region,trust-region-refine,ays,ld3,
gits,oss] [--solvers euler,dpmpp-2m] [--nfe 5,8,10] [--pinned] [--out out/bench_flow.json]``: one JSON line
per row while running, then the markdown tables; the JSON file holds every row (errors, wall times, grids).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from stepopt import api
from stepopt.build import baseline_schedule
from stepopt.errors import StepoptError
from stepopt.io import atomic_write_text
from stepopt.jsontext import json_text
from stepopt.models import load_model
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator

BASELINE_COLUMNS = ("flow-default", "time-uniform", "kl-optimal", "edm")
OPTIMIZERS = ("trust-region", "trust-region-refine", "ays", "ld3", "gits", "oss")
# Columns that are an optimizer with options: name -> (optimizer, options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"trust-region-refine": ("trust-region", {"teacher_refine": True})}
# Optimizers with a last_node option (ays keeps sigma_min).
FREE_NODE = ("trust-region", "trust-region-refine", "ld3", "gits", "oss")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--solvers", default="euler,dpmpp-2m")
    ap.add_argument("--nfe", default="5,8,10")
    ap.add_argument("--model", default="builtin:gmm-digits-flow")
    ap.add_argument("--test-n", type=int, default=200)
    ap.add_argument("--pinned", action="store_true", help="also every optimizer with last_node: sigma_min")
    ap.add_argument("--out", type=Path, default=Path("out/bench_flow.json"))
    args = ap.parse_args()
    m = load_model(args.model)
    t0 = time.time()
    # The exact ODE from pure noise to sigma 0.002 (the model's sigma_min), denoised: final_step denoise.
    teacher = GridValidator(m, None, range(args.test_n), final_step="denoise", sigma_to=m.sigma_min)
    print(f"exact ODE for {len(teacher.seeds)} seeds: {time.time() - t0:.1f} s", flush=True)
    optimizers = [o for o in args.optimizers.split(",") if o]
    if args.pinned:
        optimizers += [f"{o}@sigma_min" for o in optimizers if o in FREE_NODE]
    rows: list[dict[str, Any]] = []
    for solver in args.solvers.split(","):
        ident = get_solver(solver).identity()
        scorer = teacher.with_solver(ident)
        for nfe in (int(v) for v in args.nfe.split(",")):
            row: dict[str, Any] = {"solver": solver, "nfe": nfe}
            n = get_solver(solver).steps_for_nfe(ident, nfe, "denoise")
            for kind in BASELINE_COLUMNS:
                b = baseline_schedule(kind, m, ident, n, final_step="denoise")
                row[kind] = scorer.rmse(b.sigmas)
                row[kind + "_sigmas"] = list(b.sigmas)
            for opt in optimizers:
                base, _, pin = opt.partition("@")
                name, options = VARIANTS.get(base, (base, {}))
                if pin:
                    options = {**options, "last_node": pin}
                t = time.time()
                try:
                    s = api.optimize(m, solver=solver, nfe=nfe, optimizer=name, final_step="denoise", **options)
                except StepoptError as e:  # a refusal: its one line goes in the table
                    row[opt] = f"refused: {e}"
                    continue
                row[opt + "_s"] = round(time.time() - t, 1)
                row[opt] = scorer.rmse(s.sigmas, s.model_sigmas)
                row[opt + "_sigmas"] = list(s.sigmas)
                assert s.nfe == nfe and s.final_step == "denoise"
                if opt == "ays":
                    rep = s.method.config["report"]
                    row["ays_run"] = {"init": rep["init"], "plan": rep["plan"], "chosen": s.method.objective["chosen"]}
            print(json_text(row), flush=True)
            rows.append(row)
    atomic_write_text(args.out, json_text({"model": m.id, "test_seeds": f"0..{args.test_n - 1}", "rows": rows}, 1))
    print(table(rows, optimizers))
    print()
    print(last_nodes(rows, [*optimizers, "flow-default"], m.sigma_min))
    print(f"wrote {args.out}")
    return 0


def table(rows: list[dict[str, Any]], optimizers: list[str]) -> str:
    """Markdown: one row per (solver, NFE), the best number in bold; refusals as a footnote mark."""
    cols = [*BASELINE_COLUMNS, *optimizers]
    lines = ["| solver, NFE | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    notes: list[str] = []
    for r in rows:
        nums = [r[c] for c in cols if isinstance(r[c], float)]
        best = min(nums) if nums else None
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append(f"**{v:.4f}**" if v == best else f"{v:.4f}")
            else:
                if v not in notes:
                    notes.append(v)
                cells.append(f"({notes.index(v) + 1})")
        lines.append(f"| {r['solver']} {r['nfe']} | " + " | ".join(cells) + " |")
    lines += [f"\n({i + 1}) {v}" for i, v in enumerate(notes)]
    return "\n".join(lines)


def last_nodes(rows: list[dict[str, Any]], cols: list[str], sigma_min: float) -> str:
    """Markdown: each schedule's last evaluated node sigma_N (where the final denoise jumps from)."""
    lines = ["| solver, NFE | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            sig = r.get(c + "_sigmas")
            cells.append("" if sig is None else ("sigma_min" if sig[-1] == sigma_min else f"{sig[-1]:.3g}"))
        lines.append(f"| {r['solver']} {r['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
