"""Benchmark stepopt.batches: a teacher's throughput on builtin:unet-digits, serial vs batches side by side.

One process, the same seeds and teacher (Heun, 100 EDM steps; no cache) for each setting, so the
ratios are measured in one run: ``serial`` (``concurrent_batches`` off: one batch at a time on every
intra-op thread, what every model without the flag does) and ``side by side`` (the built-in UNet's
default: one batch per thread, each on one intra-op thread), at each batch size given. The outputs of
the two are compared (the largest absolute difference; 0 where every batch has the same size and
kernels do not depend on the thread count). Writes ``out/bench_batches.json`` and prints a table.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=cli python scripts/bench_batches.py [--seeds 1024] [--batch 256 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stepopt.models import load_model
from stepopt.teacher import teacher_outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--out", type=Path, default=Path("out/bench_batches.json"))
    args = ap.parse_args()
    model = load_model("builtin:unet-digits")
    seeds = range(7_000_000, 7_000_000 + args.seeds)
    rows = []
    for batch in args.batch:
        outs = {}
        for name, flag in (("serial", False), ("side by side", True)):
            model.concurrent_batches = flag
            t0 = time.perf_counter()
            _, outs[name] = teacher_outputs(model, seeds, batch_size=batch, cache=False)
            sec = time.perf_counter() - t0
            rows.append({"batch": batch, "setting": name, "seconds": sec, "evals_per_s": args.seeds * 199 / sec})
            print(f"batch {batch:4d} {name:12s} {sec:7.1f} s {rows[-1]['evals_per_s']:8.0f} evaluations/s", flush=True)
        rows[-1]["max_abs_diff_vs_serial"] = float((outs["serial"] - outs["side by side"]).abs().max())
    print(f"\n{torch.get_num_threads()} intra-op threads\n")
    print("| batch | setting | evaluations/s | vs serial |\n|---:|---|---:|---:|")
    for r in rows:
        base = next(q for q in rows if q["batch"] == r["batch"] and q["setting"] == "serial")
        ratio = r["evals_per_s"] / base["evals_per_s"]
        print(f"| {r['batch']} | {r['setting']} | {r['evals_per_s']:.0f} | {ratio:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
