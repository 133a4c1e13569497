"""Teacher outputs: where the ODE from a given noise really ends (design.md §4; methods.md §3).

For analytic models the teacher is the exact ODE solution (closed form, or DOP853 to ~1e-10 for
the mixture); for networks it is a many-step solver run (configurable). ``teacher_outputs`` is the
one entry point used by ``eval``, the optimizers' model-aware selection and LD3.

Results are cached on disk per seed (:mod:`stepopt.cache`), keyed by the model fingerprint, the
teacher (``exact`` for analytic models, else the :class:`TeacherConfig`), the sigma range, dtype
and shape. Seed ``i``'s noise is always ``initial_noise(model, [i])``, so a cached output is valid
for any batch size and any subset of seeds. Models without a ``sha256:`` fingerprint (user code
with no parameters to hash) are never cached: their cached value could be stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from stepopt.baselines import baseline_sigmas
from stepopt.cache import TeacherCache
from stepopt.models.base import AnalyticModel, DiffusionModel
from stepopt.sampling import cond_for_seeds, initial_noise
from stepopt.solvers import get_solver, solve

# Bump when the teacher's computation changes in a way the key does not capture.
CACHE_VERSION = 1


@dataclass(frozen=True)
class TeacherConfig:
    """Many-step teacher for networks (ignored for analytic models, whose teacher is exact)."""

    solver: str = "heun"
    order: int | None = None
    steps: int = 100
    grid: str = "edm"
    rho: float = 7.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def teacher_key(
    model: DiffusionModel, config: TeacherConfig, sigma_from: float, sigma_to: float, dtype: torch.dtype
) -> dict[str, Any]:
    """Everything a teacher output depends on besides the seed (the cache key)."""
    teacher: Any = f"exact:{type(model).__name__}" if isinstance(model, AnalyticModel) else config.to_dict()
    return {
        "version": CACHE_VERSION,
        "model": model.id,
        "fingerprint": model.fingerprint,
        "teacher": teacher,
        "sigma_from": repr(float(sigma_from)),
        "sigma_to": repr(float(sigma_to)),
        "dtype": str(dtype).removeprefix("torch."),
        # The network's own precision (bf16/fp16 runs differ from fp32 ones with the same state dtype).
        "network_dtype": str(getattr(model, "net_dtype", dtype)).removeprefix("torch."),
        # Prompts, negative prompt and guidance of conditional models change every output.
        "conditioning": model.conditioning_record() if hasattr(model, "conditioning_record") else None,
        "shape": list(model.shape),
    }


def _compute(
    model: DiffusionModel, x: torch.Tensor, cfg: TeacherConfig, s_hi: float, s_lo: float, seeds: Sequence[int]
) -> torch.Tensor:
    if isinstance(model, AnalyticModel):
        # The exact ODE (DOP853 for the mixture) makes thousands of tiny right-hand-side calls:
        # intra-op threads only add synchronisation (measured 13 s with one thread, 200 s with two
        # on a loaded 2-core machine, 1000 seeds), so it runs on one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return model.ode_solution(x, s_hi, s_lo)
        finally:
            torch.set_num_threads(threads)
    spec = get_solver(cfg.solver)
    ident = spec.identity(cfg.order)
    grid = torch.as_tensor(baseline_sigmas(cfg.grid, cfg.steps, s_hi, s_lo, model.frame, rho=cfg.rho))
    # Conditional models (several prompts) say which condition each seed's sample uses.
    cond = cond_for_seeds(model, seeds)
    with torch.no_grad():
        return solve(ident, model, x, grid.to(x.device), cond=cond)


def teacher_outputs(
    model: DiffusionModel,
    seeds: Sequence[int],
    config: TeacherConfig | None = None,
    *,
    sigma_from: float | None = None,
    sigma_to: float | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    cache: bool | TeacherCache = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x_end) for the given seeds: noise at ``sigma_from`` and the ODE state at ``sigma_to``.

    Defaults: from the model's sigma_max to its sigma_min. ``cache``: True uses the default
    on-disk cache, False computes everything, a :class:`TeacherCache` uses that one.
    """
    cfg = config or TeacherConfig()
    s_hi = float(model.sigma_max if sigma_from is None else sigma_from)
    s_lo = float(model.sigma_min if sigma_to is None else sigma_to)
    seeds = [int(s) for s in seeds]
    x_all = initial_noise(model, seeds, sigma=s_hi, device=device)
    store = cache if isinstance(cache, TeacherCache) else (TeacherCache() if cache else None)
    if not model.fingerprint.startswith("sha256:"):
        store = None  # no content fingerprint (e.g. "unknown:python:..."): a cached value could be stale
    key = teacher_key(model, cfg, s_hi, s_lo, x_all.dtype)
    found = store.load(key, seeds, model.shape, x_all.dtype) if store is not None else {}
    todo = [i for i, s in enumerate(seeds) if s not in found]
    y_all = torch.empty_like(x_all)
    for i, s in enumerate(seeds):
        if s in found:
            y_all[i] = found[s].to(device=x_all.device)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        y = _compute(model, x_all[idx], cfg, s_hi, s_lo, [seeds[i] for i in idx])
        y_all[idx] = y.to(y_all.dtype)
        if store is not None:
            store.store(key, [seeds[i] for i in idx], y)
    return x_all, y_all
