"""Scaling out with torchrun: ``sample`` throughput and ``eval`` wall time, world size 1 vs K, one run.

Each command runs under ``python -m torch.distributed.run --nproc-per-node K -m stepopt -- ...``
for every K of ``--world`` (default 1 2) on the same schedule, noise and settings, so the table's
ratios (time at K / time at 1) are measured in one run on this machine. On CPU the ranks use gloo
and share the machine's cores: the ratio says what splitting the work costs or gains here (on a
2-core machine with ``OMP_NUM_THREADS=1`` per rank, about 2x at best); on a GPU machine
(``--device cuda``) each rank gets its own device. The eval teacher cache is disabled so that each
world size does the same teacher work. Every world size's results are checked against world size 1
(samples to 1e-6, ode-error to 1e-9) before any time is reported.

Prints a markdown table and writes JSON (default ``out/bench_distributed.json``). Run:
``python scripts/bench_distributed.py [--world 1 2] [--n 2000] [--device cpu] [--out F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(k: int, argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), "--master-port", str(_port())]
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, "-m", "stepopt", "--", *argv], capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"world size {k}: {' '.join(argv)} failed ({p.returncode}): {p.stderr[-800:]}")
    return seconds, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n", type=int, default=2000, help="samples for sample and eval")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--model", default="builtin:gmm-digits")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    ap.add_argument("--out", type=Path, default=Path("out/bench_distributed.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sched = tmp / "s.yaml"
    make = ["baseline", "kl-optimal", "-m", args.model, "-s", "dpmpp-2m", "--nfe", str(args.nfe), "--out", str(sched)]
    subprocess.run(
        [sys.executable, "-m", "stepopt", *make],
        check=True,
        env=env,
    )
    common = ["--device", args.device, "--n", str(args.n)]
    rows: list[dict[str, Any]] = []
    ref_samples: np.ndarray | None = None
    ref_rmse: float | None = None
    for k in args.world:
        npz = tmp / f"w{k}.npz"
        t_sample, _ = torchrun(k, ["sample", "--schedule", str(sched), *common, "-o", str(npz)], env)
        t_eval, out = torchrun(k, ["eval", "-S", str(sched), *common, "--no-cache", "--json"], env)
        samples = np.load(npz)["samples"]
        rmse = float(json.loads(out)["rows"][0]["metrics"]["ode-error"]["rmse"])
        if ref_samples is None:
            ref_samples, ref_rmse = samples, rmse
        else:
            np.testing.assert_allclose(samples, ref_samples, rtol=1e-6, atol=1e-7)
            assert abs(rmse - float(ref_rmse)) <= 1e-9 * abs(float(ref_rmse)), (rmse, ref_rmse)
        rows.append({"world_size": k, "sample_s": t_sample, "samples_per_s": args.n / t_sample, "eval_s": t_eval})
    base = rows[0]
    for r in rows:
        r["sample_ratio"] = r["sample_s"] / base["sample_s"]
        r["eval_ratio"] = r["eval_s"] / base["eval_s"]
    print(
        f"\n{args.model}, dpmpp-2m NFE {args.nfe}, n = {args.n}, device {args.device}, {args.threads} thread(s)/rank\n"
    )
    print("| world size | sample s | samples/s | sample time / world 1 | eval s | eval time / world 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['world_size']} | {r['sample_s']:.2f} | {r['samples_per_s']:.1f} | {r['sample_ratio']:.2f} "
            f"| {r['eval_s']:.2f} | {r['eval_ratio']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "nfe": args.nfe, "n": args.n, "device": args.device, "threads": args.threads}
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
