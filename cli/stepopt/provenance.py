"""Provenance records written into every schedule file (design.md §2)."""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from typing import Any

import torch

from stepopt import __version__

_COMMAND: list[str] | None = None


def set_command(argv: list[str]) -> None:
    """The CLI records the command line it was started with."""
    global _COMMAND
    _COMMAND = list(argv)


def provenance(device: str | torch.device | None = None, **extra: Any) -> dict[str, Any]:
    argv = _COMMAND if _COMMAND is not None else ["python", *sys.argv]
    rec: dict[str, Any] = {
        "stepopt": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": shlex.join(argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device is not None else "cpu",
    }
    rec.update(extra)
    return rec
