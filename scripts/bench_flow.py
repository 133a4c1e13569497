"""Flow table of the README: builtin:gmm-digits-flow (shift 3), euler / dpmpp-2m at NFE 5, 8, 10.

Every schedule uses ``final_step: denoise``; the error is the RMSE over seeds 0..199 against the
exact ODE's denoised endpoint at sigma 0.002 (the same target for every schedule, whatever its last
sigma). Usage: ``PYTHONPATH=cli python scripts/bench_flow.py [OPTIMIZERS]`` (default: ld3); one JSON
line per row.
"""

import json
import math
import sys
import time

import torch

from stepopt import api
from stepopt.build import baseline_schedule
from stepopt.models import load_model
from stepopt.sampling import unit_noise
from stepopt.solvers import get_solver, solve

m = load_model("builtin:gmm-digits-flow")
seeds = list(range(200))
y = unit_noise(m.shape, seeds)
t0 = time.time()
xs = m.ode_solution(y, math.inf, 0.002)
target = m(xs, torch.tensor(0.002, dtype=torch.float64))
print(f"exact ODE for {len(seeds)} seeds: {time.time() - t0:.1f} s", flush=True)


def rmse(s):
    out = solve(s.solver, m, y, s.sigmas_tensor(), model_sigmas=s.model_sigmas_tensor(), final_step=s.final_step)
    return float(((out - target) ** 2).mean().sqrt())


optimizers = sys.argv[1].split(",") if len(sys.argv) > 1 else ["ld3"]
rows = []
for solver in ("euler", "dpmpp-2m"):
    ident = get_solver(solver).identity()
    for nfe in (5, 8, 10):
        row = {"solver": solver, "nfe": nfe}
        n = get_solver(solver).steps_for_nfe(ident, nfe, "denoise")
        row["flow-default"] = rmse(baseline_schedule("flow-default", m, ident, n, final_step="denoise"))
        for k in ("time-uniform", "edm", "kl-optimal"):
            row[k] = rmse(baseline_schedule(k, m, ident, n, final_step="denoise"))
        for opt in optimizers:
            t = time.time()
            try:
                s = api.optimize(m, solver=solver, nfe=nfe, optimizer=opt, final_step="denoise")
                row[opt] = rmse(s)
                row[opt + "_s"] = round(time.time() - t, 1)
                row[opt + "_sigmas"] = [round(v, 5) for v in s.sigmas]
            except Exception as e:  # report and go on
                row[opt] = f"error: {type(e).__name__}: {str(e)[:120]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
