"""Provenance records written into every schedule file."""

from __future__ import annotations

import datetime as _dt
import importlib.util
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepopt import __version__

if TYPE_CHECKING:
    import torch

_COMMAND: list[str] | None = None


def set_command(argv: list[str]) -> None:
    """The CLI records the command line it was started with."""
    global _COMMAND
    _COMMAND = list(argv)


def torch_version() -> str:
    """torch's ``__version__`` (with its local tag, e.g. ``+cu130``), without importing torch."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return str(mod.__version__)
    try:
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.origin is not None:
            text = Path(spec.origin).with_name("version.py").read_text(encoding="utf-8")
            m = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
            if m:
                return m.group(1)
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "unknown"


def provenance(device: str | torch.device | None = None, **extra: Any) -> dict[str, Any]:
    argv = _COMMAND if _COMMAND is not None else ["python", *sys.argv]
    rec: dict[str, Any] = {
        "stepopt": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": shlex.join(argv),
        "torch": torch_version(),
        "python": platform.python_version(),
        "device": str(device) if device is not None else "cpu",
    }
    from stepopt import distributed

    if distributed.active():  # torchrun: the result is the same for any world size; say which made it
        rec["world_size"] = distributed.world_size()
    rec.update(extra)
    return rec
