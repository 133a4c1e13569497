"""LD3's resumable training state: everything the run needs to continue exactly where it stopped.

The state holds the grid logits theta, the decoupled times xi, both optimizers' states, the relaxed
noises, the shuffling generator, the position in the current round, the learning rates, the best
validated parameters and the early-stopping counters. It is written atomically (temporary file,
then rename) with ``torch.save`` and read back with ``weights_only=True``; a state written for
another run (model, solver, steps, seed or configuration) is refused with the differing keys named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from stepopt.errors import StepoptError
from stepopt.io import atomic_path

STATE_FORMAT = "stepopt.ld3-state/v1"


@dataclass
class Ld3State:
    """A snapshot of an LD3 run at an iteration boundary (tensors on the CPU)."""

    key: dict[str, Any]
    theta: torch.Tensor
    xi: torch.Tensor
    opt_theta: dict[str, Any]
    opt_xi: dict[str, Any]
    noise: torch.Tensor  # relaxed unit-variance noises of the training pairs, (n_train, *shape)
    generator: torch.Tensor  # state of the shuffling generator
    lr_noise: float
    best_theta: torch.Tensor
    best_xi: torch.Tensor
    best_value: float
    initial_value: float
    round: int = 0  # the round in progress (or the next one when ``perm`` is None)
    pos: int = 0  # batches of ``perm`` already done
    perm: torch.Tensor | None = None  # the current round's order of training pairs
    iteration: int = 0
    best_iteration: int = 0
    count_worse: int = 0
    min_lr_hits: int = 0
    accepted_in_round: bool = False
    done: bool = False
    stop_reason: str = ""
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # validation value after each iteration
    init: str = ""  # the start: uniform, a baseline kind, or the --init schedule
    starts: dict[str, float] = field(default_factory=dict)  # validation loss of each candidate start
    noise_valid: torch.Tensor | None = None  # relaxed noises of the validation pairs (noise_lr_rule: reference)
    start_theta: torch.Tensor | None = None  # the start grid's parameters (keep_best's candidate; None in older files)
    start_xi: torch.Tensor | None = None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a crash or Ctrl-C leaves the previous state file intact."""
        data = {"format": STATE_FORMAT, **{f.name: _cpu(getattr(self, f.name)) for f in fields(self)}}
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], key: Mapping[str, Any]) -> Ld3State:
        """Read a state file and check that it belongs to the run described by ``key``."""
        p = Path(path)
        if not p.is_file():
            raise StepoptError(f"no LD3 state file to resume at '{p}'; run without `resume` to start afresh")
        try:
            data = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable or truncated file: one clear line
            raise StepoptError(f"LD3 state file '{p}' cannot be read ({e.__class__.__name__}); delete it") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise StepoptError(f"'{p}' is not an LD3 state file ({STATE_FORMAT})")
        diff = key_differences(data.get("key", {}), key)
        if diff:
            raise StepoptError(
                f"LD3 state file '{p}' belongs to another run (differs in {', '.join(diff)}); "
                "run with the same options, or without `resume` to start afresh"
            )
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise StepoptError(f"LD3 state file '{p}' is incomplete ({e}); delete it") from None


def _cpu(v: Any) -> Any:
    """Tensors moved to the CPU, recursively through dicts and lists (optimizer states)."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_cpu(x) for x in v]
    return v


def key_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two run keys."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += key_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
