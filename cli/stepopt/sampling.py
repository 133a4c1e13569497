"""Deterministic initial noise and batched sampling (README: Conventions, "Determinism").

Sample ``i`` always starts from the noise of seed ``i``: one CPU generator per sample, so the
result does not depend on batch size, device or order of work. :func:`sample_schedule` runs exactly
a schedule's solver and grid over a list of seeds, batched, reporting progress through a callback;
:func:`schedule_mismatches` says why a schedule may not belong to a model; :func:`save_samples`
writes the samples with the schedule's identity to an ``.npz`` file atomically.

Nothing here disables autograd: callers that only sample wrap the call in
``torch.inference_mode()`` (the CLI does), while optimizers may differentiate through it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepopt import distributed
from stepopt.errors import StepoptError
from stepopt.frames import frame_ref_fields
from stepopt.io import atomic_write
from stepopt.models.base import DiffusionModel
from stepopt.schedule import RANGE_RTOL, Schedule
from stepopt.solvers import SolverIdentity, get_solver, solve

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: samples finished so far, out of ``total``."""

NPZ_FORMAT = "stepopt.samples/v1"


def cond_for_seeds(model: DiffusionModel, seeds: Sequence[int]) -> dict[str, Any] | None:
    """Per-sample conditioning of a conditional model (e.g. which prompt each seed uses), else None."""
    return model.cond_for_seeds(seeds)


def unit_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal noise of shape ``(len(seeds), *shape)``; row i from ``manual_seed(seeds[i])``."""
    rows = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float64))
    if not rows:
        return torch.empty((0, *shape), dtype=dtype)
    return torch.stack(rows).to(dtype)


def initial_noise(
    model: DiffusionModel,
    seeds: Sequence[int],
    sigma: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x_T = sigma_T * eps (sigma_T defaults to the model's sigma_max), in the EDM frame.

    At ``sigma_T = inf`` (pure noise) the state is noise-scaled, ``x_T / sigma_T``: exactly ``eps``
    (README: Conventions).
    """
    s = model.sigma_max if sigma is None else sigma
    eps = unit_noise(model.shape, seeds)
    x = eps if math.isinf(s) else s * eps
    return x.to(device=device or model.device, dtype=dtype or model.dtype)


def run_schedule(
    model: DiffusionModel,
    schedule: Schedule,
    x: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Run exactly the schedule's solver and grid from ``x`` (noise at ``schedule.sigmas[0]``)."""
    return solve(
        schedule.solver,
        model,
        x,
        schedule.sigmas_tensor(x.device),
        model_sigmas=schedule.model_sigmas_tensor(x.device),
        cond=cond,
        callback=callback,
        final_step=schedule.final_step,
    )


def slice_cond(cond: Mapping[str, Any] | None, start: int, stop: int, n: int) -> dict[str, Any] | None:
    """The rows ``start:stop`` of per-sample conditioning for ``n`` samples (other values are passed whole)."""
    if cond is None:
        return None
    out: dict[str, Any] = {}
    for k, v in cond.items():
        per_sample = isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n
        out[k] = v[start:stop] if per_sample else v
    return out


def batched(
    model: DiffusionModel,
    seeds: Sequence[int],
    run: Callable[[torch.Tensor, dict[str, Any] | None], torch.Tensor],
    *,
    sigma: float,
    batch_size: int,
    device: torch.device | str | None = None,
    cond: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    to_cpu: bool = False,
    shard: bool = False,
) -> torch.Tensor:
    """The one batching loop: ``run(x, cond)`` per batch of seeds, results concatenated in seed order.

    ``x`` is each batch's initial noise at ``sigma`` (:func:`initial_noise`, so it does not depend on
    the batch size) and ``cond`` its rows of the per-sample conditioning: ``cond`` if given (tensors
    with one row per seed are sliced, anything else is passed to every batch), else the model's own
    :meth:`~stepopt.models.base.DiffusionModel.cond_for_seeds`. Each finished batch is reported as
    ``progress(done, n)`` (and moved to the CPU with ``to_cpu``).

    ``shard``: among several ``torch.distributed`` ranks each runs its share of the seeds and
    every rank gets all results (:func:`stepopt.distributed.map_rows`); no autograd through it.
    """
    if batch_size < 1:
        raise StepoptError(f"batch size {batch_size} is invalid; expected an integer >= 1")
    n = len(seeds)
    per_seed = cond_for_seeds(model, seeds) if cond is None else cond
    if shard and distributed.active():
        a, b = distributed.shard(n)
        share = max(b - a, 1)
        part = batched(
            model,
            seeds[a:b],
            run,
            sigma=sigma,
            batch_size=batch_size,
            device=device,
            cond=slice_cond(per_seed, a, b, n) if per_seed is not None else None,
            progress=None if progress is None else (lambda done, _t: progress(min(n, done * n // share), n)),
            to_cpu=to_cpu,
        )
        return distributed.gather_rows(part, n)
    outs = []
    if progress is not None:
        progress(0, n)
    for start in range(0, n, batch_size):
        chunk = list(seeds[start : start + batch_size])
        x = initial_noise(model, chunk, sigma=sigma, device=device)
        y = run(x, slice_cond(per_seed, start, start + len(chunk), n))
        outs.append(y.cpu() if to_cpu else y)
        if progress is not None:
            progress(start + len(chunk), n)
    return torch.cat(outs) if outs else torch.empty((0, *model.shape), dtype=model.dtype)


def sample_grid(
    model: DiffusionModel,
    solver: SolverIdentity,
    sigmas: torch.Tensor | Sequence[float],
    seeds: Sequence[int],
    *,
    model_sigmas: torch.Tensor | Sequence[float] | None = None,
    final_step: str = "none",
    batch_size: int = 256,
    cond: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Samples for ``seeds`` (noise at ``sigmas[0]``), batched; identical for any batch size."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64)

    def run(x: torch.Tensor, c: dict[str, Any] | None) -> torch.Tensor:
        return solve(solver, model, x, sig.to(x.device), model_sigmas=model_sigmas, cond=c, final_step=final_step)

    return batched(model, seeds, run, sigma=float(sig[0]), batch_size=batch_size, device=device, cond=cond)


def sample_schedule(
    model: DiffusionModel,
    schedule: Schedule,
    seeds: Sequence[int],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cond: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Samples for ``seeds`` with exactly the schedule's solver, grid and final step, shape ``(n, *shape)``.

    Sample ``i`` starts from ``sigmas[0] * eps_i`` with ``eps_i`` drawn on the CPU from
    ``manual_seed(seeds[i])`` and then moved to ``device`` (default: the model's), so its noise
    does not depend on ``batch_size``; the result depends on it only through the floating-point
    batching of the network (none for the default model's float32 samples on the CPU; ~1e-6
    relative for a float32 UNet). Each batch gets its seeds' rows of the conditioning (see
    :func:`batched`). Under ``torchrun`` the seeds are shared out over the ranks and every rank
    returns all samples. Each finished batch is moved to the CPU (in the model's dtype) and reported as
    ``progress(done, n)``.
    """
    dev = torch.device(device) if device is not None else model.device

    # Seeds of the batches run so far: batched() runs them in order (under torchrun, this rank's share).
    done = distributed.shard(len(seeds))[0] if distributed.active() else 0

    def run(x: torch.Tensor, c: dict[str, Any] | None) -> torch.Tensor:
        nonlocal done
        chunk = list(seeds[done : done + x.shape[0]])
        done += x.shape[0]
        y = run_schedule(model, schedule, x, cond=c)
        if not bool(torch.isfinite(y).all()):
            raise NonFiniteError(
                locate_non_finite(
                    model,
                    schedule.solver,
                    schedule.sigmas_tensor(x.device),
                    x,
                    chunk,
                    model_sigmas=schedule.model_sigmas_tensor(x.device),
                    cond=c,
                    final_step=schedule.final_step,
                )
            )
        return y

    return batched(
        model,
        seeds,
        run,
        sigma=schedule.sigmas[0],
        batch_size=batch_size,
        device=dev,
        cond=cond,
        progress=progress,
        to_cpu=True,
        shard=True,
    )


class NonFiniteError(StepoptError):
    """The model produced NaN or inf: the message names the seed and the step where it first appeared."""


def locate_non_finite(
    model: DiffusionModel,
    solver: SolverIdentity,
    sigmas: torch.Tensor,
    x: torch.Tensor,
    seeds: Sequence[int],
    *,
    model_sigmas: torch.Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    final_step: str = "none",
) -> str:
    """Rerun a batch whose output is not finite and say which seed went bad first, at which step."""
    first: dict[int, tuple[int, float]] = {}

    def watch(info: dict[str, Any]) -> None:
        d = info.get("denoised")
        if d is None:
            return
        bad = ~torch.isfinite(d.detach()).flatten(1).all(dim=1)
        for j in torch.nonzero(bad).flatten().tolist():
            first.setdefault(int(j), (int(info["i"]), float(info["sigma"])))

    with torch.no_grad():
        y = solve(solver, model, x, sigmas, model_sigmas=model_sigmas, cond=cond, callback=watch, final_step=final_step)
    rows = torch.nonzero(~torch.isfinite(y).flatten(1).all(dim=1)).flatten().tolist()
    where = sorted(first.items(), key=lambda kv: (kv[1][0], kv[0]))
    if where:
        j, (i, sigma) = where[0]
        return (
            f"the model returned non-finite values (NaN/inf) for seed {seeds[j]} at step {i} (sigma {sigma:.6g})"
            f"; {len(rows) or len(first)} of {len(seeds)} samples in its batch are affected; nothing was written"
        )
    j = rows[0] if rows else 0
    return (
        f"sampling produced non-finite values (NaN/inf) for seed {seeds[j]}"
        f"{' in the final denoising step' if final_step == 'denoise' else ''}; nothing was written"
    )


def schedule_mismatches(schedule: Schedule, model: DiffusionModel) -> list[str]:
    """Why ``schedule`` may not be valid for ``model`` (one sentence each; empty when it is).

    Checks the parameter fingerprint, the native time domain, the flow shift / mu the schedule was
    made for (flow models), that the grid lies inside the model's sigma range, and that the recorded
    solver identity is what the registry resolves it to.
    """
    ref = schedule.model
    problems = []
    if ref.fingerprint != model.fingerprint:
        problems.append(
            f"model fingerprint {model.fingerprint[:19]}... of {model.id} differs from the schedule's "
            f"{ref.fingerprint[:19]}... (made for {ref.id})"
        )
    if ref.time != model.time_domain:
        problems.append(f"the schedule's time domain '{ref.time}' is not the model's '{model.time_domain}'")
    made_for = {k: v for k, v in (("shift", ref.shift), ("mu", ref.mu)) if v is not None}
    has = {k: v for k, v in frame_ref_fields(model.frame).items() if v is not None}
    if made_for != has and (made_for or has):
        problems.append(
            f"the schedule was made for flow {_shift_text(made_for)}; the model uses {_shift_text(has)}"
            " (its pipeline default and resolution differ)"
        )
    hi, lo = schedule.sigmas[0], schedule.sigmas[-1]
    if hi > model.sigma_max * (1 + RANGE_RTOL) or lo < model.sigma_min * (1 - RANGE_RTOL):
        rng = f"[{model.sigma_min:.6g}, {model.sigma_max:.6g}]"
        problems.append(f"the grid [{lo:.6g}, {hi:.6g}] leaves the model's sigma range {rng}")
    ident = schedule.solver
    try:
        resolved = get_solver(ident.name).identity(ident.order, ident.variant, ident.lower_order_final)
    except StepoptError as e:
        problems.append(f"solver {ident}: {e}")
    else:
        if resolved != ident:
            problems.append(f"solver identity {ident} resolves to {resolved} in this stepopt")
    return problems


def _shift_text(fields: Mapping[str, float]) -> str:
    if not fields:
        return "no shift"
    return ", ".join(f"{k} {v:.6g}" for k, v in fields.items())


def save_samples(
    path: str | os.PathLike[str],
    samples: torch.Tensor,
    seeds: Sequence[int],
    schedule: Schedule,
    *,
    schedule_path: str | os.PathLike[str] | None = None,
    model_id: str | None = None,
    warnings: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``samples`` (stored as float32) and their origin to an ``.npz`` file atomically.

    Arrays: ``samples`` (n, *shape) float32, ``seeds`` (n,) int64, ``sigmas`` float64, ``nfe``;
    strings: ``model_id`` (the model sampled), ``fingerprint``, ``solver`` (JSON identity),
    ``method``, ``final_step``, ``schedule`` (the whole schedule as JSON), ``schedule_path``,
    ``warnings`` (JSON list, e.g. what ``--force`` overrode) and ``format``. Everything loads
    with ``np.load(path, allow_pickle=False)``. ``extra`` adds arrays under new names (e.g. a latent
    model's ``latents`` and ``conditioning``).
    """
    arrays: dict[str, Any] = {
        "format": np.array(NPZ_FORMAT),
        "samples": samples.detach().cpu().to(torch.float32).numpy(),
        "seeds": np.asarray(list(seeds), dtype=np.int64),
        "model_id": np.array(model_id or schedule.model.id),
        "fingerprint": np.array(schedule.model.fingerprint),
        "solver": np.array(json.dumps(schedule.solver.to_dict())),
        "nfe": np.array(schedule.nfe, dtype=np.int64),
        "sigmas": np.asarray(schedule.sigmas, dtype=np.float64),
        "method": np.array(schedule.method.name),
        "final_step": np.array(schedule.final_step),
        "schedule": np.array(json.dumps(schedule.to_dict(), default=str)),
        "schedule_path": np.array("" if schedule_path is None else str(schedule_path)),
        "warnings": np.array(json.dumps(list(warnings))),
    }
    for key, value in (extra or {}).items():
        if key in arrays:
            raise ValueError(f"extra array '{key}' would replace a standard one")
        arrays[key] = np.asarray(value)
    if arrays["samples"].shape[0] != arrays["seeds"].shape[0]:
        raise ValueError("samples and seeds disagree in length")
    return atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)
