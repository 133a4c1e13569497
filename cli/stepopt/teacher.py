"""The teacher: where the ODE from a given noise really ends, and the error of a grid against it.

For analytic models the teacher is the exact ODE solution (closed form, or DOP853 to ~1e-10 for
the mixture); for networks it is a many-step solver run configured by :class:`TeacherConfig`,
which every optimizer config nests (``teacher: {solver: heun, steps: 100, ...}``) and ``eval``
takes (``--teacher-set``). :func:`teacher_outputs` is the one way to the teacher's outputs;
:class:`GridValidator` is the one way to score a grid against them (trust-region ``select``,
AYS's stopping measure, LD3's validation and ``eval``'s ode-error all use it). With
``final_step: denoise`` the sampler's output is ``D(x_N, sigma_N)``, so the target is the teacher's
state at ``sigma_N`` passed through the same denoising jump (:func:`denoised_target`).

Results are cached on disk per seed (:mod:`stepopt.cache`), keyed by the model fingerprint, the
teacher (``exact`` for analytic models, else the :class:`TeacherConfig`), the sigma range, dtype
and shape. Seed ``i``'s noise is always ``initial_noise(model, [i])``, so a cached output is valid
for any batch size and any subset of seeds. Models without a ``sha256:`` fingerprint (user code
with no parameters to hash) are never cached: their cached value could be stale.

Under ``torchrun`` the missing teacher outputs and the grid runs of :class:`GridValidator` are
shared out over the ranks by seed and gathered, so every rank holds what one process would
(:mod:`stepopt.distributed`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from stepopt import distributed
from stepopt.baselines import baseline_sigmas
from stepopt.batches import batch_workers, imap_batches, split_for_workers
from stepopt.cache import TeacherCache
from stepopt.errors import StepoptError
from stepopt.models.base import AnalyticModel, DiffusionModel
from stepopt.sampling import NonFiniteError, cond_for_seeds, initial_noise, locate_non_finite, slice_cond
from stepopt.solvers import SolverIdentity, solve
from stepopt.teacher_config import TeacherConfig

# Bump when the teacher's computation changes in a way the key does not capture.
CACHE_VERSION = 1


def teacher_key(
    model: DiffusionModel, config: TeacherConfig, sigma_from: float, sigma_to: float, dtype: torch.dtype
) -> dict[str, Any]:
    """Everything a teacher output depends on besides the seed (the cache key)."""
    teacher: Any = f"exact:{type(model).__name__}" if isinstance(model, AnalyticModel) else config.cache_key()
    return {
        "version": CACHE_VERSION,
        "model": model.id,
        "fingerprint": model.fingerprint,
        "teacher": teacher,
        "sigma_from": repr(float(sigma_from)),
        "sigma_to": repr(float(sigma_to)),
        "dtype": str(dtype).removeprefix("torch."),
        # The network's own precision (bf16/fp16 runs differ from fp32 ones with the same state dtype).
        "network_dtype": str(model.net_dtype).removeprefix("torch."),
        # Prompts, negative prompt and guidance of conditional models change every output.
        "conditioning": model.conditioning_record(),
        "shape": list(model.shape),
    }


def _compute(
    model: DiffusionModel, x: torch.Tensor, cfg: TeacherConfig, s_hi: float, s_lo: float, seeds: Sequence[int]
) -> torch.Tensor:
    if isinstance(model, AnalyticModel):
        # The exact ODE (DOP853 for the mixture) makes thousands of tiny right-hand-side calls, on
        # which intra-op threads only add synchronisation: it runs on one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return model.ode_solution(x, s_hi, s_lo)
        finally:
            torch.set_num_threads(threads)
    ident, grid = _teacher_grid(model, cfg, s_hi, s_lo)
    # Conditional models (several prompts) say which condition each seed's sample uses.
    cond = cond_for_seeds(model, seeds)
    with torch.no_grad():
        return solve(ident, model, x, grid.to(x.device), cond=cond)


def _teacher_grid(model: DiffusionModel, cfg: TeacherConfig, s_hi: float, s_lo: float) -> tuple[Any, torch.Tensor]:
    ident = cfg.identity()
    return ident, torch.as_tensor(baseline_sigmas(cfg.grid, cfg.steps, s_hi, s_lo, model.frame, rho=cfg.rho))


def _non_finite_message(
    model: DiffusionModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TeacherConfig,
    s_hi: float,
    s_lo: float,
    seeds: Sequence[int],
) -> str:
    """Which seed of a teacher batch went non-finite first, and at which of the teacher's steps."""
    span = f"from sigma {s_hi:.6g} to {s_lo:.6g}"
    if not isinstance(model, AnalyticModel):
        ident, grid = _teacher_grid(model, cfg, s_hi, s_lo)
        where = locate_non_finite(model, ident, grid.to(x.device), x, seeds, cond=cond_for_seeds(model, seeds))
        if " at step " in where:
            where = where.removesuffix("; nothing was written")
            return f"teacher ({cfg.solver}, {cfg.steps} steps {span}): {where}; its batch was not cached"
    bad = (~torch.isfinite(y).flatten(1).all(dim=1)).nonzero().flatten().tolist()
    seed = seeds[bad[0]] if bad else seeds[0]
    return (
        f"the model returned non-finite values (NaN/inf) in the teacher solution for seed {seed} ({span});"
        " its batch was not cached"
    )


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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x_end) for the given seeds: noise at ``sigma_from`` and the ODE state at ``sigma_to``.

    Defaults: from the model's sigma_max to its sigma_min. ``cache``: True uses the default
    on-disk cache, False computes everything, a :class:`TeacherCache` uses that one.
    ``progress(done, total)`` is called once the cache is read and after every computed batch
    (``done`` counts cached seeds too); each batch is cached as soon as it is computed.
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
    missing = torch.tensor([s not in found for s in seeds], dtype=torch.float64)
    if distributed.active():  # every rank computes what any rank lacks (node-local caches may differ)
        missing = distributed.all_sum(missing)
    todo = [i for i in range(len(seeds)) if missing[i] > 0]
    y_all = torch.empty_like(x_all)
    for i, s in enumerate(seeds):
        if s in found:
            y_all[i] = found[s].to(device=x_all.device)
    done0 = len(seeds) - len(todo)
    if progress is not None:
        progress(done0, len(seeds))

    def compute(idx_share: list[int]) -> torch.Tensor:
        parts = []
        workers = batch_workers(model, x_all.device, len(idx_share))
        size = split_for_workers(len(idx_share), batch_size, workers)
        batches = [idx_share[start : start + size] for start in range(0, len(idx_share), size)]
        workers = min(workers, len(batches))

        def one(idx: list[int]) -> torch.Tensor:
            return _compute(model, x_all[idx], cfg, s_hi, s_lo, [seeds[i] for i in idx])

        start = 0
        for idx, y in zip(batches, imap_batches(one, batches, workers), strict=True):
            if not bool(torch.isfinite(y).all()):
                chunk = [seeds[i] for i in idx]
                raise NonFiniteError(_non_finite_message(model, x_all[idx], y, cfg, s_hi, s_lo, chunk))
            y = y.to(y_all.dtype)
            if store is not None:  # under torchrun each rank caches the entries it computed
                store.store(key, [seeds[i] for i in idx], y)
            parts.append(y)
            start += len(idx)
            if progress is not None:  # this rank's share, scaled to the whole (rank 0 prints)
                progress(done0 + start * len(todo) // max(len(idx_share), 1), len(seeds))
        return torch.cat(parts) if parts else x_all[:0].clone()

    if todo:  # under torchrun the missing seeds are shared out over the ranks
        y_all[todo] = distributed.map_rows(todo, compute).to(y_all.device)
    return x_all, y_all


def denoised_target(model: DiffusionModel, y: torch.Tensor, sigma: float, batch_size: int = 256) -> torch.Tensor:
    """``D(y, sigma)`` in batches: the target of a sampler whose final step jumps to sigma = 0."""
    with torch.no_grad():
        parts = [model(y[i : i + batch_size], sigma) for i in range(0, y.shape[0], batch_size)]
    return torch.cat(parts) if parts else y


class GridValidator:
    """The error of grids against the teacher on fixed seeds; the teacher's targets are built once.

    ``x_t`` is the noise of ``seeds`` at ``sigma_from`` (default: the model's sigma_max) and
    ``targets`` the teacher's end states at ``sigma_to`` (default: sigma_min), denoised once when
    ``final_step`` is ``denoise``. :meth:`outputs` runs ``solver`` on a grid from ``x_t`` (batched,
    each batch with its seeds' conditioning), :meth:`rmse` scores it, :meth:`errors` gives rmse and
    max of given outputs (``eval``'s ode-error), :meth:`loss` the mean of any per-sample distance
    (LD3). ``evals`` counts the network evaluations (rows) spent in :meth:`outputs`. ``progress``
    reports the teacher's work as in :func:`teacher_outputs`.

    ``weights`` (one positive number per seed; default: all equal) make :meth:`rmse`, :meth:`loss`
    and the teacher refinement weighted means over the seeds, e.g. the stratified noises of
    :func:`stepopt.strata.stratified_seeds`; :meth:`squared_errors` stays per seed, unweighted.
    """

    def __init__(
        self,
        model: DiffusionModel,
        solver: SolverIdentity | None,
        seeds: Sequence[int],
        teacher: TeacherConfig | None = None,
        *,
        final_step: str = "none",
        sigma_from: float | None = None,
        sigma_to: float | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        cache: bool | TeacherCache = True,
        progress: Callable[[int, int], None] | None = None,
        weights: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        self.model = model
        self.solver = solver
        self.seeds = [int(s) for s in seeds]
        self.weights = _mean_one(weights, len(self.seeds))
        self.teacher = teacher or TeacherConfig()
        self.final_step = final_step
        self.batch_size = int(batch_size)
        self.sigma_from = float(model.sigma_max if sigma_from is None else sigma_from)
        self.sigma_to = float(model.sigma_min if sigma_to is None else sigma_to)
        x_t, y = teacher_outputs(
            model,
            self.seeds,
            self.teacher,
            sigma_from=self.sigma_from,
            sigma_to=self.sigma_to,
            batch_size=self.batch_size,
            device=device,
            cache=cache,
            progress=progress,
        )
        if final_step == "denoise":
            y = denoised_target(model, y, self.sigma_to, self.batch_size)
        self.x_t, self.targets = x_t, y
        self.cond = cond_for_seeds(model, self.seeds)
        self.evals = 0

    def _copy(self) -> GridValidator:
        other = object.__new__(GridValidator)
        other.__dict__.update(self.__dict__)
        other.evals = 0
        return other

    def subset(self, start: int, stop: int) -> GridValidator:
        """The same validator restricted to seeds ``start:stop`` (no teacher work)."""
        sub = self._copy()
        n = len(self.seeds)
        sub.seeds = self.seeds[start:stop]
        sub.x_t, sub.targets = self.x_t[start:stop], self.targets[start:stop]
        if self.weights is not None:
            sub.weights = _mean_one(self.weights[start:stop], len(sub.seeds))
        sub.cond = slice_cond(self.cond, start, stop, n)
        return sub

    def with_solver(self, solver: SolverIdentity) -> GridValidator:
        """The same seeds and targets, scoring grids of ``solver`` (no teacher work)."""
        other = self._copy()
        other.solver = solver
        return other

    def describe(self) -> dict[str, Any]:
        """The settings a report records: the teacher, the sigma range and the target."""
        return {
            "teacher": self.teacher.describe(self.model),
            "sigma_from": self.sigma_from,
            "sigma_to": self.sigma_to,
            "target": "D(teacher, sigma_N)" if self.final_step == "denoise" else "teacher state at sigma_N",
        }

    def outputs(
        self,
        sigmas: torch.Tensor | Sequence[float] | np.ndarray,
        model_sigmas: torch.Tensor | Sequence[float] | None = None,
        *,
        denoiser: Callable[..., torch.Tensor] | None = None,
        x_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The solver's outputs on ``sigmas`` from the validation noise (or ``x_t``), without gradients."""
        if self.solver is None:
            raise StepoptError("this validator has no solver; it only scores given outputs")
        solver = self.solver
        x_all = self.x_t if x_t is None else x_t
        grid = torch.as_tensor(sigmas, dtype=torch.float64).to(x_all.device)
        counted = _Counting(denoiser or self.model)
        n = x_all.shape[0]

        def one(ab: tuple[int, int]) -> torch.Tensor:
            a, b = ab
            with torch.no_grad():  # per batch: no_grad is per thread
                return solve(
                    solver,
                    counted,
                    x_all[a:b],
                    grid,
                    model_sigmas=model_sigmas,
                    cond=slice_cond(self.cond, a, b, n),
                    final_step=self.final_step,
                )

        def run(rows: list[int]) -> torch.Tensor:
            # A caller's own denoiser (e.g. LD3's differentiable-time twin) is never run concurrently.
            workers = batch_workers(self.model if denoiser is None else None, x_all.device, len(rows))
            size = split_for_workers(len(rows), self.batch_size, workers)
            spans = [(rows[i], rows[min(i + size, len(rows)) - 1] + 1) for i in range(0, len(rows), size)]
            outs = list(imap_batches(one, spans, min(workers, len(spans))))
            return torch.cat(outs) if outs else x_all[:0].clone()

        out = distributed.map_rows(range(n), run).to(x_all.device)  # shared out under torchrun
        self.evals += int(distributed.all_sum(torch.tensor(float(counted.evals))))
        return out

    def rmse(self, sigmas: torch.Tensor | Sequence[float] | np.ndarray, model_sigmas: Any = None) -> float:
        """Root mean square of ``outputs - targets`` over every sample and coordinate (float64; the
        samples weighted by ``weights`` when given).

        Non-finite outputs (the model returned NaN/inf) are an error naming the seed and the step.
        """
        return float(np.sqrt(self.mean(self.squared_errors(sigmas, model_sigmas))))

    def mean(self, per_seed: np.ndarray) -> float:
        """The (weighted) mean over the seeds of per-seed values."""
        per_seed = np.asarray(per_seed, dtype=np.float64)
        return float(per_seed.mean() if self.weights is None else (self.weights * per_seed).mean())

    def squared_errors(
        self, sigmas: torch.Tensor | Sequence[float] | np.ndarray, model_sigmas: Any = None
    ) -> np.ndarray:
        """Each seed's mean square of ``outputs - targets`` over its coordinates, ``(len(seeds),)``
        float64 (the per-seed errors a paired comparison resamples; :meth:`rmse` is the root of their mean)."""
        out = self.outputs(sigmas, model_sigmas)
        if not bool(torch.isfinite(out).all()):
            self._refuse_non_finite(sigmas, model_sigmas)
        d = out.to(torch.float64) - self.targets.to(torch.float64)
        return d.flatten(1).square().mean(dim=1).cpu().numpy()

    def _refuse_non_finite(self, sigmas: Any, model_sigmas: Any) -> None:
        assert self.solver is not None
        grid = torch.as_tensor(sigmas, dtype=torch.float64).to(self.x_t.device)
        ms = None if model_sigmas is None else torch.as_tensor(model_sigmas, dtype=torch.float64).to(grid.device)
        for start in range(0, len(self.seeds), self.batch_size):
            stop = min(start + self.batch_size, len(self.seeds))
            x = self.x_t[start:stop]
            cond = slice_cond(self.cond, start, stop, len(self.seeds))
            with torch.no_grad():
                y = solve(self.solver, self.model, x, grid, model_sigmas=ms, cond=cond, final_step=self.final_step)
            if not bool(torch.isfinite(y).all()):
                where = locate_non_finite(
                    self.model,
                    self.solver,
                    grid,
                    x,
                    self.seeds[start:stop],
                    model_sigmas=ms,
                    cond=cond,
                    final_step=self.final_step,
                )
                raise NonFiniteError(f"validation against the teacher: {where.removesuffix('; nothing was written')}")
        raise NonFiniteError("validation against the teacher: the solver's outputs are not finite (NaN/inf)")

    def errors(self, outputs: torch.Tensor) -> dict[str, float]:
        """``{"rmse", "max"}`` of given outputs (one row per seed) against the targets (``eval``'s ode-error)."""
        from stepopt.metrics.ode_error import ode_error

        return ode_error(outputs, self.targets)

    def loss(
        self,
        distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        run: Callable[[torch.Tensor, dict[str, Any] | None], torch.Tensor],
    ) -> float:
        """Mean over the seeds of ``distance(run(x_t, cond), target)`` (per-sample values; weighted by
        ``weights`` when given), batch by batch; ``cond`` is the batch's rows of the seeds'
        conditioning (None for unconditional models)."""
        n = self.x_t.shape[0]
        a, b = distributed.shard(n) if distributed.active() else (0, n)
        total = 0.0
        with torch.no_grad():
            for start in range(a, b, self.batch_size):
                stop = min(start + self.batch_size, b)
                cond = slice_cond(self.cond, start, stop, n)
                d = distance(run(self.x_t[start:stop], cond), self.targets[start:stop])
                if self.weights is not None:
                    d = d.to(torch.float64) * torch.as_tensor(self.weights[start:stop], device=d.device)
                total += float(d.sum())
        if distributed.active():  # each rank's share of the seeds, summed in float64
            total = float(distributed.all_sum(torch.tensor(total, dtype=torch.float64)))
        return total / n


def _mean_one(weights: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray | None:
    """Per-seed weights scaled to mean 1 (None: unweighted); a wrong length or a weight that is not
    a finite positive number is an error."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"weights: {w.shape[0]} values for {n} seeds")
    if not bool(np.all(np.isfinite(w) & (w > 0))):
        raise ValueError("weights must be finite and > 0")
    return w * (n / w.sum()) if n else w


class _Counting:
    """A denoiser wrapper that counts evaluated rows (thread-safe: batches may run concurrently)."""

    def __init__(self, net: Callable[..., torch.Tensor]) -> None:
        self.net = net
        self.evals = 0
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        with self._lock:
            self.evals += x.shape[0]
        return self.net(x, sigma, **cond)
