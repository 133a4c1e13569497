"""Flow table of the README: builtin:gmm-digits-flow (shift 3), euler / dpmpp-2m at NFE 5, 8, 10.

Every schedule uses ``final_step: denoise``; the error is the RMSE over seeds 0..199 against the
exact ODE's denoised endpoint at sigma 0.002 (the same target for every schedule, whatever its last
sigma). Usage: ``PYTHONPATH=cli python scripts/bench_flow.py [OPTIMIZERS]`` (default: ld3); one JSON
line per row.
"""

import json
import sys
import time

from stepopt import api
from stepopt.build import baseline_schedule
from stepopt.models import load_model
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator

m = load_model("builtin:gmm-digits-flow")
t0 = time.time()
# The exact ODE from pure noise to sigma 0.002 (the model's sigma_min), denoised: final_step denoise.
teacher = GridValidator(m, None, range(200), final_step="denoise", sigma_to=0.002)
print(f"exact ODE for {len(teacher.seeds)} seeds: {time.time() - t0:.1f} s", flush=True)


def rmse(s):
    return teacher.with_solver(s.solver).rmse(s.sigmas, s.model_sigmas)


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
