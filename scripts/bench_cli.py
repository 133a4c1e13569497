"""Startup time of each ``stepopt`` command, against ``python -c pass`` and ``python -c "import torch"``.

Every command runs as a fresh process (``python -m stepopt ...``), ``--repeat`` times; the table
shows the median wall time, its ratio to an empty interpreter (``python -c pass``: the floor any
command pays) and how many times faster it is than importing torch alone, all measured in this
one run on this machine. Commands run on files made here first (a logsnr baseline of the default
model and its export) and on ``schedules/published/*.yaml`` when present.

Prints a markdown table and writes JSON (default ``out/bench_cli.json``). Run:
``python scripts/bench_cli.py [--repeat 5] [--out F]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def wall(argv: list[str], repeat: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.decode()[-500:]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("out/bench_cli.json"))
    args = ap.parse_args()
    py = sys.executable
    env = dict(os.environ)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    sched = tmp / "s.yaml"
    stepopt = [py, "-m", "stepopt"]
    subprocess.run([*stepopt, "baseline", "logsnr", "--nfe", "6", "--out", str(sched)], check=True, env=env)
    published = sorted(glob.glob("schedules/published/*.yaml"))
    commands: dict[str, list[str]] = {
        "python -c pass": [py, "-c", "pass"],
        'python -c "import torch"': [py, "-c", "import torch"],
        "stepopt --help": [*stepopt, "--help"],
        "stepopt --version": [*stepopt, "--version"],
        "stepopt validate FILE": [*stepopt, "validate", str(sched)],
        "stepopt show FILE": [*stepopt, "show", str(sched)],
        "stepopt export FILE --to k-diffusion": [*stepopt, "export", str(sched), "--to", "k-diffusion"],
        "stepopt export FILE --to csv": [*stepopt, "export", str(sched), "--to", "csv"],
        "stepopt baseline edm (gmm-digits)": [*stepopt, "baseline", "edm", "--out", str(tmp / "b.yaml")],
        "stepopt models": [*stepopt, "models"],
        "stepopt sample --help": [*stepopt, "sample", "--help"],
    }
    if published:
        commands["stepopt validate schedules/published/*.yaml"] = [*stepopt, "validate", *published]
    rows: list[dict[str, Any]] = []
    for name, argv in commands.items():
        rows.append({"command": name, "seconds": statistics.median(wall(argv, args.repeat, env))})
    base = rows[0]["seconds"]
    torch_s = rows[1]["seconds"]
    for r in rows:
        r["x_python"] = r["seconds"] / base
        r["faster_than_import_torch"] = torch_s / r["seconds"]
    print(f"| command | median s ({args.repeat} runs) | / python -c pass | import torch / this |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['command']}` | {r['seconds']:.3f} | {r['x_python']:.2f} | {r['faster_than_import_torch']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeat": args.repeat, "python": py, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
