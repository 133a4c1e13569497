"""Stratified teacher noises: the tail of the error measured in full, the bulk by a uniform sample.

The error of a few-step grid is heavy-tailed over the noise: on ``builtin:gmm-digits`` a few seeds,
whose trajectories end on another mixture component than the coarse solver's, carry much of the
squared error. A grid fitted to the mean squared error on a uniform sample of noises therefore
follows whichever tail seeds the sample happens to hold, and its training RMSE is optimistic
(measured with dpmpp-3m at NFE 10, 1024 noises from 5 disjoint seed ranges: training RMSE
0.0230-0.0294, held out on 8192 seeds 0.0270-0.0307; README).

:func:`stratified_seeds` is classical stratified sampling (Cochran, *Sampling Techniques*, ch. 5)
with a cheap screen. Every seed of a pool of ``pool`` noises is scored by a *proxy* of its error
that needs no teacher: the squared difference between the solver's output on the screening grid
and its output on that grid with every step subdivided ``subdivide`` times (each interval split
evenly in log-SNR; an interval from pure noise evenly in the frame's native time). The
``tail`` x ``n`` seeds with the largest proxy form one stratum, taken whole (weight 1); the other
seeds are represented by a uniform sample (without replacement, from ``rng_seed``) of the
remaining ``n`` - that many, each weighted ``(pool - k) / m``. The weighted mean of any per-seed
error over the ``n`` seeds is then an unbiased estimate of its mean over the pool, with the tail's
share exact instead of sampled. The teacher runs only on the ``n`` chosen seeds; the screen costs
``pool x (1 + subdivide) x steps`` network evaluations.

On gmm-digits (dpmpp-3m, NFE 10, trust-region grid) the log of the proxy correlates with the log of
the exact error at 0.99; the report records that correlation on the chosen seeds (one extra run of
the screening grid against their teacher), so a user can see whether the screen ranks their
model's noises.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stepopt.errors import StepoptError
from stepopt.models.base import DiffusionModel
from stepopt.sampling import cond_for_seeds, initial_noise, slice_cond
from stepopt.solvers import SolverIdentity, solve


def subdivided(sigmas: Sequence[float], k: int, frame: Any) -> list[float]:
    """``sigmas`` (decreasing) with every interval split into ``k`` equal parts in lam = -log sigma;
    an interval from sigma = inf (pure noise) is split evenly in the frame's native time."""
    s = np.asarray(sigmas, dtype=np.float64)
    out = [float(s[0])]
    frac = np.arange(1, k + 1) / k
    for a, b in itertools.pairwise(s):
        if math.isfinite(a) and a > 0 and b > 0:
            la, lb = -math.log(a), -math.log(b)
            part = np.exp(-(la + (lb - la) * frac))
        else:
            ta, tb = float(frame.time(a)), float(frame.time(b))
            part = np.asarray(frame.sigma(ta + (tb - ta) * frac), dtype=np.float64)
        part[-1] = b
        out += [float(v) for v in part]
    return out


def screen_errors(
    model: DiffusionModel,
    solver: SolverIdentity,
    sigmas: Sequence[float],
    seeds: Sequence[int],
    *,
    subdivide: int = 4,
    final_step: str = "none",
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, int]:
    """Each seed's proxy error of ``sigmas`` (mean square of the output minus the output on the grid
    subdivided ``subdivide`` times; no teacher) and the number of network evaluations spent."""
    fine = torch.as_tensor(subdivided(sigmas, subdivide, model.frame), dtype=torch.float64)
    grid = torch.as_tensor(list(sigmas), dtype=torch.float64)
    seeds = [int(s) for s in seeds]
    cond_all = cond_for_seeds(model, seeds)
    n = len(seeds)
    evals = [0]

    def counted(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        evals[0] += x.shape[0]
        return model(x, sigma, **cond)

    out = np.empty(n, dtype=np.float64)
    with torch.no_grad():
        for a in range(0, n, batch_size):
            b = min(a + batch_size, n)
            x = initial_noise(model, seeds[a:b], device=device)
            cond = slice_cond(cond_all, a, b, n)
            coarse = solve(solver, counted, x, grid.to(x.device), cond=cond, final_step=final_step)
            ref = solve(solver, counted, x, fine.to(x.device), cond=cond, final_step=final_step)
            d = (coarse.to(torch.float64) - ref.to(torch.float64)).flatten(1).square().mean(1)
            out[a:b] = d.cpu().numpy()
    return out, evals[0]


def tail_count(n: int, tail: float) -> int:
    """How many of ``n`` seeds the tail stratum takes: ``round(tail * n)``, leaving at least one to
    sample the rest (without it the estimate would ignore every other seed of the pool)."""
    return min(round(tail * n), n - 1)


def stratify(proxy: np.ndarray, n: int, tail: float, rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``n`` of the ``len(proxy)`` rows and their weights (mean 1): the :func:`tail_count`
    rows with the largest proxy (ties by index), then a uniform sample without replacement of the
    rest (increasing). With ``weights``, ``mean(weights * f[idx])`` is an unbiased estimate of
    ``mean(f)`` over all rows for any per-row ``f``, exact on the tail stratum."""
    size = len(proxy)
    if not 1 <= n < size:
        raise ValueError(f"stratified sampling needs 1 <= n < pool, got n={n}, pool={size}")
    if not 0.0 <= tail < 1.0:
        raise ValueError(f"tail must be in [0, 1), got {tail}")
    order = np.argsort(-np.asarray(proxy, dtype=np.float64), kind="stable")
    k = tail_count(n, tail)
    m = n - k
    rest = order[k:]
    picked = np.sort(np.random.default_rng(rng_seed).choice(rest, size=m, replace=False))
    w = np.concatenate([np.ones(k), np.full(m, (size - k) / m)])
    return np.concatenate([order[:k], picked]), w * (n / w.sum())


@dataclass(frozen=True)
class Strata:
    """The chosen seeds (tail first), their weights (mean 1), their proxy errors and a report."""

    seeds: list[int]
    weights: np.ndarray
    proxy: np.ndarray
    report: dict[str, Any]


def stratified_seeds(
    model: DiffusionModel,
    solver: SolverIdentity,
    sigmas: Sequence[float],
    pool: Sequence[int],
    n: int,
    *,
    tail: float = 0.5,
    subdivide: int = 4,
    rng_seed: int = 0,
    final_step: str = "none",
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Strata:
    """``n`` seeds of ``pool`` and their weights, stratified by the proxy error of ``sigmas``: the
    :func:`tail_count` largest whole, a uniform sample of the rest (report: pool, tail, sample,
    the tail's proxy threshold, evals, seconds)."""
    pool = [int(s) for s in pool]
    size = len(pool)
    if not 1 <= n < size or not 0.0 <= tail < 1.0:
        stratify(np.zeros(size), n, tail, rng_seed)  # the same clear error before any work
    t0 = time.perf_counter()
    proxy, evals = screen_errors(
        model, solver, sigmas, pool, subdivide=subdivide, final_step=final_step, batch_size=batch_size, device=device
    )
    if not np.all(np.isfinite(proxy)):
        bad = pool[int(np.flatnonzero(~np.isfinite(proxy))[0])]
        raise StepoptError(f"stratified noises: the screen grid's outputs are not finite (seed {bad})")
    idx, w = stratify(proxy, n, tail, rng_seed)
    k = tail_count(n, tail)
    order = idx[:k]
    report = {
        "pool": [pool[0], pool[-1]] if pool == list(range(pool[0], pool[0] + size)) else size,
        "pool_size": size,
        "n": n,
        "tail": k,
        "sample": n - k,
        "subdivide": subdivide,
        "tail_threshold": float(proxy[order[-1]]) if k else None,
        "proxy_rmse_pool": float(math.sqrt(proxy.mean())),
        "evals": int(evals),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Strata([pool[i] for i in idx], w, proxy[idx], report)
