"""Helpers shared by commands: loading a model with the shared options, output paths, schedule summaries."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from stepopt.cli.flags import cli_message
from stepopt.errors import StepoptError
from stepopt.schedule import Schedule

if TYPE_CHECKING:
    import torch

    from stepopt.models.base import DiffusionModel

SCHEDULES_DIR = Path("schedules")


def model_slug(model_id: str) -> str:
    """A folder name for a model id: ``builtin:gmm-digits`` -> ``gmm-digits``, ``diffusers:/a/b`` -> ``diffusers-b``."""
    prefix, _, rest = model_id.partition(":")
    if prefix == "builtin":
        base = rest
    else:
        tail = Path(rest.rstrip("/")).name or rest
        base = f"{prefix}-{Path(tail).stem if prefix == 'edm' else tail}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def default_out(model_id: str, solver: str, nfe: int, method: str) -> Path:
    """``schedules/<model>/<solver>/nfe<N>/<method>.yaml``."""
    return SCHEDULES_DIR / model_slug(model_id) / solver / f"nfe{nfe}" / f"{method}.yaml"


def check_writable(path: Path, option: str) -> None:
    """Fail before any work if ``path`` cannot be written (its nearest existing folder must be writable).

    Every command checks each of its output paths this way before it starts working, so a mistake
    in ``--out`` costs nothing (and leaves nothing behind).
    """
    real = Path(os.path.realpath(path))  # a symlink is written through: check its target
    if real.is_dir():
        raise StepoptError(f"{option} {path}: is a directory; expected a file path")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StepoptError(f"{option} {path}: '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StepoptError(f"{option} {path}: folder '{parent}' is not writable")


def schedule_json(s: Schedule, path: Path | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if path is not None:
        d["path"] = str(path)
    d.update(
        {
            "model": s.model.id,
            "solver": s.solver.to_dict(),
            "nfe": s.nfe,
            "method": s.method.name,
            "sigmas": list(s.sigmas),
            "model_sigmas": None if s.model_sigmas is None else list(s.model_sigmas),
            "final_step": s.final_step,
            "objective": s.method.objective,
        }
    )
    return d


def schedule_table(s: Schedule, title: str | None = None) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("i", justify="right")
    t.add_column("sigma", justify="right")
    t.add_column("lam = -log sigma", justify="right")
    if s.model_sigmas is not None:
        t.add_column("model sigma", justify="right")
    if s.timesteps is not None:
        t.add_column(f"t ({s.model.time})", justify="right")
    import math

    for i, sig in enumerate(s.sigmas):
        row = [str(i), f"{sig:.6g}", f"{-math.log(sig):.4f}"]
        if s.model_sigmas is not None:
            row.append(f"{s.model_sigmas[i]:.6g}")
        if s.timesteps is not None:
            row.append(f"{s.timesteps[i]:.4f}")
        t.add_row(*row)
    return t


def schedule_header(s: Schedule) -> str:
    obj = ""
    if s.method.objective:
        o = s.method.objective
        obj = f"; objective {o.get('name', '')} {o.get('initial', '')} -> {o.get('final', '')}"
    return (
        f"{s.method.name} schedule for {s.model.id} ({s.model.fingerprint[:19]}…), solver {s.solver}, "
        f"NFE {s.nfe}, {s.n_steps} steps, final_step {s.final_step}{obj}"
    )


@dataclass
class LoadedModel:
    """A model loaded with the shared model options, with its conditioning record and notes for stderr."""

    model: DiffusionModel
    device: torch.device
    conditioning: dict[str, Any] | None
    notes: list[str]


def load_with_options(
    model_id: str,
    *,
    device: str,
    dtype: str,
    trust_code: bool,
    prompts: Sequence[str] | None = None,
    prompt_file: Path | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    recorded: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load ``model_id`` with the options every model-loading command shares.

    ``--device`` (``cuda:LOCAL_RANK`` for each rank under torchrun, which also joins the process
    group here: :mod:`stepopt.distributed`), ``--dtype`` (the network's), ``--trust-code`` and the text conditioning
    (``--prompt``/``--prompt-file``/``--negative-prompt``/``--guidance``). ``recorded`` is the
    conditioning a schedule was made with: it supplies the defaults, and every option that
    overrides a recorded value is named in the notes.
    """
    import torch

    from stepopt import distributed
    from stepopt.models import load_model, resolve_device
    from stepopt.models.diffusers import configure_conditioning

    dev = distributed.local_device(resolve_device(device))
    distributed.init(dev)  # under torchrun: join the process group (NCCL on CUDA, gloo on the CPU)
    m = load_model(model_id, device=dev, dtype=getattr(torch, dtype), trust_code=trust_code)
    conditioning = configure_conditioning(m, prompts or (), prompt_file, negative_prompt, guidance, recorded=recorded)
    notes = [cli_message(n) for n in conditioning.notes] if conditioning else []
    rec = recorded if isinstance(recorded, Mapping) else None
    if rec is not None and conditioning is not None:
        used = conditioning.record
        if guidance is not None and rec.get("guidance") is not None and float(rec["guidance"]) != float(guidance):
            notes.append(f"--guidance {guidance} overrides the schedule's guidance {rec['guidance']}")
        if negative_prompt is not None and rec.get("negative_prompt") not in (None, negative_prompt):
            notes.append(f"--negative-prompt overrides the schedule's {rec['negative_prompt']!r}")
        if (prompts or prompt_file is not None) and rec.get("prompts_sha256") not in (None, used.get("prompts_sha256")):
            notes.append(f"--prompt/--prompt-file override the schedule's prompt set ({rec.get('n_prompts')} prompts)")
    if conditioning is None:
        return LoadedModel(m, dev, None, notes)
    return LoadedModel(conditioning.model, dev, conditioning.record, notes)
