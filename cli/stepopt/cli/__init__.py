"""The command line: a thin typer layer over the library (``stepopt --help``)."""

from __future__ import annotations

import os
import sys

from stepopt.cli import commands as _commands  # noqa: F401  (registers the commands)
from stepopt.cli.app import app


def passive_openmp_wait() -> None:
    """Let torch's OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``).

    Set before torch is imported, and only when the user has not set the variable. On a machine
    whose cores are shared with other work, spinning threads wait for each other's time slices at
    every small operation: a whole ``optimize -O ld3`` on builtin:unet-digits (dpmpp-3m, NFE 5, cold
    teacher cache; ``scripts/bench_ld3.py --speed``) took 734 s with torch's default policy and 112 s
    with PASSIVE on a loaded 2-core machine (179 s and 76 s at a lighter load), with the same grid.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    from stepopt.provenance import set_command

    passive_openmp_wait()
    if sys.argv[1:2] == ["--"]:  # `torchrun ... -m stepopt -- eval ...` passes the separator on
        del sys.argv[1]
    set_command(["stepopt", *sys.argv[1:]])
    app()


__all__ = ["app", "main"]
