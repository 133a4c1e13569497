"""The command line: a thin typer layer over the library (``stepopt --help``)."""

from __future__ import annotations

import sys

from stepopt.cli import commands as _commands  # noqa: F401  (registers the commands)
from stepopt.cli.app import app


def main() -> None:
    from stepopt.provenance import set_command

    if sys.argv[1:2] == ["--"]:  # `torchrun ... -m stepopt -- eval ...` passes the separator on
        del sys.argv[1]
    set_command(["stepopt", *sys.argv[1:]])
    app()


__all__ = ["app", "main"]
