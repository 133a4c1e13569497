"""``ays``: Align Your Steps (Sabour, Fidler, Kreis; ICML 2024; arXiv 2404.14507).

Minimises the KLUB (paper Sec. 3; estimator in :mod:`stepopt.optimizers.klub`) over the
interior sigmas of the grid by the paper's iterative coordinate search (Sec. 3.3):

* **Candidates.** For grid point ``i`` between its neighbours ``lo = sigma_{i+1}`` and
  ``hi = sigma_{i-1}``, ``candidates - 1`` values log-uniformly strictly inside ``(lo, hi)`` plus
  the current value (so the estimate never rises); the one with the smallest estimate of the two
  adjacent KLUB terms is kept. All candidates of a point share their random numbers.
* **Sweeps.** Odd indices are updated together (their terms do not overlap), then even ones;
  that is one sweep. Fresh random numbers every sweep.
* **Start** (``init``). ``best`` (the default, an extension): every closed-form and hand-crafted
  grid of the baselines registry (edm, logsnr, time-uniform, time-quadratic, kl-optimal) is scored
  on the stopping measure and the best one is the start; the report's ``start_candidates`` holds
  every score and ``init`` the winner. The paper's start is ``auto``: EDM rho = 7 for continuous
  models, uniform native time for discrete (``vp-discrete``) ones; any baseline can be named.
* **Early stopping** (the KLUB minimiser is not the KL minimiser; run to convergence the grid
  degenerates: one giant jump from sigma_max, steps piled near sigma_min). After every sweep the
  grid is scored by the real quality measure of the *target* solver: RMSE (over all elements)
  between its output and the teacher's (:class:`stepopt.teacher.GridValidator`: the exact ODE for
  analytic models) on ``val_noises`` fixed validation noises (the *stopping seeds* ``val_seed ...``,
  kept apart from ``stepopt eval``'s seeds 0, 1, ...). The best sweep (sweep 0 is the start) is kept;
  the search stops after ``patience`` sweeps without improvement or at ``max_sweeps``.
* **Hierarchy** (paper Sec. 3.3; ``hierarchy: true``, the default): optimise ``base_steps`` (10)
  steps, subdivide at geometric midpoints to 20 and 40 steps optimising only the new points, and
  reach any other step count by log-linear interpolation of the 40-step grid. Levels that cannot
  change that interpolation are not run (:func:`hierarchy_top`): when the step count divides 10 (or
  20), every node the interpolation takes is a node of the 10- (20-) step grid, which the finer levels
  keep, so 5 steps need only the 10-step level (the same grid, bit for bit, at a third of the
  evaluations). With ``direct: true``
  (the default, an extension) the requested step count is then also optimised directly when it is
  not in the hierarchy, or when the hierarchy's grid is not better than the start on the stopping
  measure; the direct search starts from the better of the two. With ``hierarchy: false`` only the
  requested step count is optimised.
* **The result** is the best, on the stopping measure, of the start and every searched grid at the
  requested step count (``chosen``; ``kept_start: true`` when the start won): AYS never returns a
  grid worse on its stopping measure than any baseline it started from (with ``init: best``: than
  every baseline). ``early_stopping: false`` returns the last sweep of the last search instead.
* **Reported error.** The stopping seeds chose the sweep, the level and the start, so their RMSE
  is optimistic: ``stop_initial`` / ``stop_final`` are measured on ``holdout_noises`` *held-out
  seeds* ``holdout_seed ...`` (disjoint from the stopping seeds, never used to choose anything);
  ``selection_initial`` / ``selection_final`` are the same on the stopping seeds.

**From pure noise** (``sigma_max = inf``, flow models): the grid keeps ``inf`` first. The top
interval's KLUB term is its limit to ``sigma = inf`` (derived in :mod:`stepopt.optimizers.klub`: the
frozen denoiser is ``D`` at pure noise given the noise itself); point 1's candidates span
log-uniformly from its lower neighbour up to the frame's largest finite training level
``sigma_top`` (or its current value if larger); the hierarchy's midpoint of ``[sigma_1, inf)`` is
the midpoint in the frame's native time (flow: ``sigma = 2 sigma_1 + 1``) and other step counts are
``inf`` followed by the finite part interpolated (:func:`stepopt.baselines.interpolate_loglinear`).

**Conditional models** (several prompts): the KLUB pairs data row j of the whole data set with
prompt ``j mod P`` (:mod:`stepopt.optimizers.klub`), the stopping measure each validation seed with
its own prompt (seed mod P), as ``sample`` does.

The result records the KLUB of the start and of the kept grid (same random numbers; computed once
when the start is kept), the kept sweep and the stopping measure of every sweep.

**Cost.** Nearly every network evaluation is the KLUB's Monte Carlo: ``samples x (3 x candidates + 1)``
per free point and sweep (``independent``; 8,704 at the defaults), in batches of ``batch_size`` rows
(512: on CPU a batch of 4096 rows was 1.5-2x slower per row for ``builtin:unet-digits``; the
estimates do not depend on it). The stopping measure remembers every grid it scored
(:class:`MemoValidator`). ``scripts/bench_ays.py --network`` attributes every evaluation and second
of a run to its phase.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stepopt.baselines import BASELINES, interpolate_loglinear, sigma_top, start_sigmas
from stepopt.errors import StepoptError
from stepopt.frames import NoiseFrame
from stepopt.models import AnalyticModel, DiffusionModel, load_digits
from stepopt.optimizers import OptimizeContext, OptimizeResult, OptimizerSpec, register
from stepopt.optimizers.klub import KLUBEstimator, klub_total
from stepopt.sampling import NonFiniteError
from stepopt.teacher import GridValidator, TeacherConfig

Init = Literal["best", "auto", "edm", "logsnr", "time-uniform", "time-quadratic", "kl-optimal"]
# Random-number tags of the direct search after the hierarchy (apart from the hierarchy's levels).
_DIRECT_LEVEL = 100_000


@dataclass(frozen=True)
class AYSConfig:
    """Options of ``--optimizer ays`` (``--config configs/ays.yaml``, ``--set KEY=VALUE``)."""

    data: str = "auto"  # auto | model | digits | PATH.npz (an image folder is not supported yet)
    data_key: str | None = None  # array name inside the .npz (needed when it holds several)
    data_size: int = 8192  # fixed data subset (capped to what exists)
    samples: int = 256  # Monte Carlo samples per grid point and sweep
    c: float = 0.5  # proposal scale c of pi(sigma)
    candidates: int = 11  # values tried per grid point, the current one included
    estimator: Literal["independent", "shared"] = "independent"
    max_sweeps: int = 10
    patience: int = 3  # sweeps without a better stopping measure before stopping
    early_stopping: bool = True  # false: keep the last sweep (to see the KLUB minimiser degenerate)
    val_noises: int = 64
    val_seed: int = 1_000_000
    holdout_noises: int = 128  # held-out seeds for the reported error (never used to choose anything)
    holdout_seed: int = 2_000_000
    init: Init = "best"  # best: the baseline with the lowest stopping measure; auto: the paper's (edm / time-uniform)
    rho: float = 7.0
    hierarchy: bool = True  # paper Sec. 3.3; false optimises the requested step count directly
    base_steps: int = 10
    direct: bool = True  # after the hierarchy, also optimise the requested count directly (see module doc)
    klub_samples: int = 1024  # samples per interval for the KLUB before/after (0: skip)
    batch_size: int = 512  # rows per network call (4096 was 1.5-2x slower per row on CPU: bench_ays.py --network)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # for networks (analytic: the exact ODE)

    def __post_init__(self) -> None:
        positive = ("data_size", "samples", "val_noises", "holdout_noises", "batch_size", "base_steps", "max_sweeps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.candidates < 2:
            raise ValueError(
                f"'candidates' must be >= 2 (the current value and at least one other), got {self.candidates}"
            )
        if self.patience < 1:
            raise ValueError(f"'patience' must be >= 1, got {self.patience}")
        if self.klub_samples < 0:
            raise ValueError(f"'klub_samples' must be >= 0, got {self.klub_samples}")
        if not (self.c > 0 and math.isfinite(self.c)):
            raise ValueError(f"'c' must be a positive number, got {self.c}")
        for name in ("val_seed", "holdout_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"'{name}' must be >= 0, got {getattr(self, name)}")
        stop, held = self.stop_seeds(), self.holdout_seeds()
        if stop.start < held.stop and held.start < stop.stop:
            raise ValueError(
                f"the held-out seeds {held.start}..{held.stop - 1} (holdout_seed, holdout_noises) overlap the "
                f"stopping seeds {stop.start}..{stop.stop - 1} (val_seed, val_noises); they must be disjoint"
            )

    def stop_seeds(self) -> range:
        """The seeds of the stopping measure (they choose the sweep, the level and the start)."""
        return range(self.val_seed, self.val_seed + self.val_noises)

    def holdout_seeds(self) -> range:
        """The held-out seeds of the reported error (disjoint from :meth:`stop_seeds`)."""
        return range(self.holdout_seed, self.holdout_seed + self.holdout_noises)


# -- data ----------------------------------------------------------------------------------------
def load_data(model: DiffusionModel, cfg: AYSConfig, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The fixed data subset ``(n, *model.shape)`` in float64 and a description for the report."""
    x, info, _ = load_data_rows(model, cfg, seed)
    return x, info


def load_data_rows(
    model: DiffusionModel, cfg: AYSConfig, seed: int
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """:func:`load_data` and each subset row's index in the full data (which condition it pairs with)."""
    source = cfg.data
    if source == "auto":
        if isinstance(model, AnalyticModel):
            source = "model"
        elif "digits" in model.id:
            source = "digits"
        else:
            raise StepoptError(
                f"ays needs training data for model '{model.id}': `data=PATH.npz` "
                "(an array of shape (n, *model shape) in the model's data range; image folders are not supported yet)"
            )
    g = torch.Generator().manual_seed(int(seed))
    if source == "model":
        if not isinstance(model, AnalyticModel):
            raise StepoptError(f"data=model needs an analytic model with exact samples; '{model.id}' is not one")
        x = model.sample(cfg.data_size, generator=g).to(torch.float64).cpu()
        return x, {"source": "model.sample (exact)", "size": int(x.shape[0])}, torch.arange(x.shape[0])
    if source == "digits":
        arr, _ = load_digits()
        x = torch.from_numpy(arr)
        desc = "shipped 8x8 digits in [-1, 1]"
    else:
        path = Path(source)
        if path.suffix != ".npz":
            raise StepoptError(f"data '{source}': expected auto, model, digits or a .npz file (image folders: not yet)")
        try:
            with np.load(path) as z:
                keys = list(z.keys())
                key = cfg.data_key if cfg.data_key is not None else (keys[0] if len(keys) == 1 else None)
                if key is None or key not in keys:
                    raise StepoptError(
                        f"data '{source}' holds arrays {', '.join(keys)}; choose one with `data_key=NAME`"
                    )
                x = torch.from_numpy(np.asarray(z[key], dtype=np.float64))
        except (OSError, ValueError) as e:
            raise StepoptError(f"data '{source}': cannot read it as .npz ({e.__class__.__name__})") from None
        desc = f"{source}[{key}]"
    if tuple(x.shape[1:]) != tuple(model.shape) or x.shape[0] < 1:
        shape = ", ".join(map(str, model.shape))
        raise StepoptError(f"data '{source}' has shape {tuple(x.shape)}; model '{model.id}' needs (n, {shape})")
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
    if bool(bad.any()):
        raise StepoptError(
            f"data '{source}' holds non-finite values (NaN/inf) in {int(bad.sum())} of {x.shape[0]} rows"
            f" (first: row {int(torch.nonzero(bad)[0])})"
        )
    n_all = x.shape[0]
    rows = torch.arange(n_all)
    if n_all > cfg.data_size:
        rows = torch.randperm(n_all, generator=g)[: cfg.data_size]
        x = x[rows]
    return x.contiguous(), {"source": desc, "size": int(x.shape[0]), "available": int(n_all)}, rows


# -- the search ----------------------------------------------------------------------------------
def initial_grid(model: DiffusionModel, n_steps: int, cfg: AYSConfig) -> tuple[np.ndarray, str]:
    """The named start (``init`` other than ``best``): ``auto`` is the paper's, edm or time-uniform."""
    kind = cfg.init
    if kind in ("auto", "best"):
        kind = "time-uniform" if model.time_domain == "vp-discrete" else "edm"
    return start_sigmas(kind, model, n_steps, rho=cfg.rho), kind


def choose_start(
    model: DiffusionModel, n_steps: int, cfg: AYSConfig, validate: GridValidator | MemoValidator
) -> tuple[np.ndarray, str, dict[str, float]]:
    """The start grid, its kind and the stopping measure of every grid tried.

    ``init: best``: every baseline of the registry that the model's range allows, scored on the
    stopping measure; the lowest wins (ties: the registry's order). Otherwise the named start.
    """
    if cfg.init != "best":
        grid, kind = initial_grid(model, n_steps, cfg)
        return grid, kind, {kind: validate.rmse(grid)}
    grids: dict[str, np.ndarray] = {}
    for kind in BASELINES:
        try:
            grids[kind] = start_sigmas(kind, model, n_steps, rho=cfg.rho)
        except StepoptError:  # e.g. not strictly decreasing at this many steps on this range
            continue
    scores = {kind: validate.rmse(grid) for kind, grid in grids.items()}
    best = min(scores, key=lambda k: scores[k])
    return grids[best], best, scores


def candidate_values(sigmas: np.ndarray, i: int, k: int, top: float | None = None) -> tuple[np.ndarray, int]:
    """``k - 1`` log-uniform values strictly between the neighbours of point i, then the current value.

    Below ``sigma = inf`` (point 1 of a grid from pure noise) log-uniform values have no upper end:
    they span up to ``top`` (the frame's largest finite training level) or the current value if larger.
    """
    upper = sigmas[i - 1]
    if math.isinf(upper):
        if top is None:
            raise StepoptError("a grid from sigma = inf needs the largest finite level (its first point's candidates)")
        upper = max(top, sigmas[i])
    lo, hi = math.log(sigmas[i + 1]), math.log(upper)
    grid = np.exp(lo + (hi - lo) * np.arange(1, k) / k)
    return np.append(grid, sigmas[i]), k - 1


def stop_validator(ctx: OptimizeContext, cfg: AYSConfig, seeds: range | None = None) -> GridValidator:
    """The stopping measure: RMSE of the target solver against the teacher on fixed noises
    (default: the stopping seeds; the held-out seeds give the reported error)."""
    return GridValidator(
        ctx.model,
        ctx.solver,
        list(cfg.stop_seeds() if seeds is None else seeds),
        cfg.teacher,
        final_step=ctx.final_step,
        batch_size=1024,
        device=ctx.device,
    )


def search(
    est: KLUBEstimator,
    sigmas: np.ndarray,
    free: list[int],
    validate: GridValidator | MemoValidator,
    cfg: AYSConfig,
    ctx: OptimizeContext,
    level: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinate search over the ``free`` interior points with early stopping; returns the kept grid."""
    sig = np.asarray(sigmas, dtype=np.float64).copy()
    top = sigma_top(est.model.frame) if math.isinf(sig[0]) else None  # from pure noise: see candidate_values
    t0 = time.perf_counter()
    m0 = validate.rmse(sig)
    history: list[dict[str, Any]] = [{"sweep": 0, "rmse": m0, "evals": 0, "seconds": 0.0, "sigmas": sig.tolist()}]
    best_m, best_sweep, best_sig = m0, 0, sig.copy()
    ctx.report("log", message=f"ays {len(sig) - 1} steps: start rmse {m0:.6g}")
    stale = 0
    for sweep in range(1, cfg.max_sweeps + 1):
        t_sweep, e_sweep = time.perf_counter(), est.evals
        moved = 0
        for parity in (1, 0):
            idx = [i for i in free if i % 2 == parity]
            if not idx:
                continue
            cands = [candidate_values(sig, i, cfg.candidates, top) for i in idx]
            tag = (level * 1000 + sweep) * 2 + parity
            res = est.candidates(
                sig, idx, [c[0] for c in cands], [c[1] for c in cands], cfg.samples, tag, cfg.estimator
            )
            for r in res:
                k = int(np.argmin(r.mean))
                if k != r.ref:
                    moved += 1
                sig[r.index] = r.candidates[k]
        m = validate.rmse(sig)
        rec = {
            "sweep": sweep,
            "rmse": m,
            "moved": moved,
            "evals": est.evals - e_sweep,
            "seconds": round(time.perf_counter() - t_sweep, 4),
            "sigmas": sig.tolist(),
        }
        history.append(rec)
        ctx.report("sweep", level=len(sig) - 1, **rec)
        ctx.report(
            "log",
            message=f"ays {len(sig) - 1} steps: sweep {sweep} rmse {m:.6g}"
            f" ({rec['evals']} evals, {rec['seconds']:.2f} s)",
        )
        if m < best_m:
            best_m, best_sweep, best_sig, stale = m, sweep, sig.copy(), 0
        else:
            stale += 1
            if cfg.early_stopping and stale >= cfg.patience:
                break
    if not cfg.early_stopping:
        best_m, best_sweep, best_sig = history[-1]["rmse"], history[-1]["sweep"], sig.copy()
    info = {
        "steps": len(sig) - 1,
        "sweep_kept": best_sweep,
        "sweeps_run": len(history) - 1,
        "rmse_start": m0,
        "rmse_kept": best_m,
        "seconds": round(time.perf_counter() - t0, 4),
        "history": history,
    }
    return best_sig, info


def subdivide(sigmas: np.ndarray, frame: NoiseFrame | None = None) -> np.ndarray:
    """Insert the geometric midpoint sqrt(s_i s_{i+1}) into every interval (N -> 2N steps).

    The interval from ``sigma = inf`` has no geometric midpoint; it gets the midpoint in the frame's
    native time, which is finite at pure noise (flow: ``t = (t_1 + 1) / 2``, i.e. ``sigma = 2 sigma_1 + 1``).
    """
    s = np.asarray(sigmas, dtype=np.float64)
    out = np.empty(2 * len(s) - 1)
    out[0::2] = s
    with np.errstate(invalid="ignore"):
        out[1::2] = np.sqrt(s[:-1] * s[1:])
    if math.isinf(s[0]):
        if frame is None:
            raise StepoptError("subdividing a grid from sigma = inf needs the model's frame (its native time)")
        out[1] = float(frame.sigma((float(frame.time(s[1])) + 1.0) / 2.0))
    return out


def hierarchy_top(n: int, base: int, from_inf: bool = False) -> int:
    """The finest hierarchy level the requested ``n`` steps need (``base``, ``2 base`` or ``4 base``).

    The paper interpolates the ``4 base``-step grid log-linearly to ``n`` steps. Its node ``k`` of ``n``
    sits at position ``4 base k / n`` of that grid; when ``n`` divides a coarser level ``L`` that position
    is the integer ``(4 base / L) (k L / n)``, i.e. node ``k L / n`` of the ``L``-step grid, which the finer
    levels keep unchanged (they only insert and move new points between the old ones). So the
    interpolation of the ``4 base``-step grid *is* the ``L``-step grid's every ``L/n``-th node and the
    levels above ``L`` cannot change the result: they are not run (``n = 5``: only the 10-step level).
    A grid from pure noise interpolates its finite part (``4 base - 1`` steps), whose positions do not
    line up this way: it always takes every level.
    """
    if n in (base, 2 * base, 4 * base):
        return n
    if not from_inf:
        for level in (base, 2 * base):
            if level % n == 0:
                return level
    return 4 * base


class MemoValidator:
    """A :class:`GridValidator` whose :meth:`rmse` remembers every grid it scored (the start, sweep 0 of
    every search and the kept grids are scored again otherwise); ``evals`` counts real evaluations."""

    def __init__(self, inner: GridValidator) -> None:
        self.inner = inner
        self._seen: dict[bytes, float] = {}

    @property
    def evals(self) -> int:
        return self.inner.evals

    def rmse(self, sigmas: Any) -> float:
        key = np.asarray(sigmas, dtype=np.float64).tobytes()
        if key not in self._seen:
            self._seen[key] = self.inner.rmse(sigmas)
        return self._seen[key]


def _seed_span(seeds: range) -> str:
    return f"{seeds.start}..{seeds.stop - 1}"


def run(ctx: OptimizeContext, cfg: AYSConfig) -> OptimizeResult:
    model, n = ctx.model, ctx.n_steps
    data, data_info, data_rows = load_data_rows(model, cfg, ctx.seed)
    est = KLUBEstimator(
        model, data, c=cfg.c, batch_size=cfg.batch_size, device=ctx.device, seed=ctx.seed, rows=data_rows
    )
    if model.cond_for_seeds([0]) is not None:
        data_info["conditioning"] = "data row j (of the whole data set) with the condition of seed j: prompt j mod P"
    validate = MemoValidator(stop_validator(ctx, cfg))
    holdout = MemoValidator(stop_validator(ctx, cfg, cfg.holdout_seeds()))
    start, init_kind, start_scores = choose_start(model, n, cfg, validate)
    ctx.report(
        "log",
        message=f"ays: {data_info['size']} data points ({data_info['source']}), start {init_kind} "
        f"(stopping rmse {start_scores[init_kind]:.6g})",
    )

    # Every grid at the requested step count, by its stopping measure: the start, the hierarchy's
    # (subdivided or interpolated) grid, the direct search's.
    grids: dict[str, np.ndarray] = {"start": np.asarray(start, dtype=np.float64)}
    selection: dict[str, float] = {"start": start_scores[init_kind]}
    searched: dict[str, dict[str, Any]] = {}
    levels: list[dict[str, Any]] = []
    b = cfg.base_steps
    if not cfg.hierarchy or n == b:
        sig, info = search(est, start, list(range(1, n)), validate, cfg, ctx, level=n)
        levels.append(info)
        grids["direct"], selection["direct"], searched["direct"] = sig, info["rmse_kept"], info
        plan = "direct"
    else:
        # Paper Sec. 3.3: 10 -> 20 -> 40 steps (new points only); other counts from the 40-step grid,
        # whose interpolation to n takes only nodes of a coarser level when n divides it (hierarchy_top).
        last = hierarchy_top(n, b, math.isinf(float(start[0])))
        base, base_kind, base_scores = choose_start(model, b, cfg, validate)
        sig, info = search(est, base, list(range(1, b)), validate, cfg, ctx, level=b)
        info.update(init=base_kind, start_candidates=base_scores)
        levels.append(info)
        while len(sig) - 1 < last:
            steps = 2 * (len(sig) - 1)
            sig, info = search(
                est, subdivide(sig, model.frame), list(range(1, steps, 2)), validate, cfg, ctx, level=steps
            )
            levels.append(info)
        plan = "hierarchy " + " -> ".join(str(lv["steps"]) for lv in levels)
        if last != n:
            sig = interpolate_loglinear(sig, n)
            plan += f", log-linear interpolation to {n}"
            if last < 4 * b:
                plan += f" (= the {4 * b}-step grid's: levels above {last} only insert points between these)"
        grids["hierarchy"], selection["hierarchy"], searched["hierarchy"] = sig, validate.rmse(sig), levels[-1]
        if cfg.direct and (last != n or selection["hierarchy"] >= selection["start"]):
            origin = "hierarchy" if selection["hierarchy"] < selection["start"] else "start"
            ctx.report("log", message=f"ays: optimizing {n} steps directly from the {origin} grid")
            sig, info = search(est, grids[origin], list(range(1, n)), validate, cfg, ctx, level=_DIRECT_LEVEL + n)
            info["from"] = origin
            levels.append(info)
            grids["direct"], selection["direct"], searched["direct"] = sig, info["rmse_kept"], info
            plan += f"; direct {n} steps from the {origin} grid"

    # The result: the best grid on the stopping measure (ties: the earlier, so the start when nothing
    # improved it); without early stopping, the last search's last sweep.
    if cfg.early_stopping:
        chosen = min(grids, key=lambda k: selection[k])
    else:
        chosen = list(grids)[-1]
    sig = grids[chosen]
    kept_start = chosen == "start"
    if kept_start and len(grids) > 1:
        ctx.report(
            "log",
            message=f"ays: no optimized {n}-step grid beats the {init_kind} start on the stopping measure "
            f"({min(v for k, v in selection.items() if k != 'start'):.4g} >= {selection['start']:.4g}); "
            "keeping the start",
        )
    held = {k: holdout.rmse(g) for k, g in grids.items()}

    objective: dict[str, Any] = {"name": "klub"}
    if cfg.klub_samples > 0 and n > 1:
        k0, se0 = klub_total(*est.interval_terms(start, cfg.klub_samples, tag=1))
        same = np.array_equal(np.asarray(sig, dtype=np.float64), np.asarray(start, dtype=np.float64))
        # The same grid on the same random numbers (tag 1) has the same estimate: not computed twice.
        k1, se1 = (k0, se0) if same else klub_total(*est.interval_terms(sig, cfg.klub_samples, tag=1))
        if not (math.isfinite(k0) and math.isfinite(k1)):
            raise NonFiniteError(
                f"ays: the KLUB is not finite ({k0} -> {k1}): the model returned NaN/inf on the training data"
            )
        objective.update({"initial": k0, "final": k1, "initial_stderr": se0, "final_stderr": se1})
    objective.update(
        {
            "stop_measure": f"rmse vs teacher, {cfg.holdout_noises} held-out noises "
            f"(seeds {_seed_span(cfg.holdout_seeds())})",
            "stop_initial": held["start"],
            "stop_final": held[chosen],
            "selection_measure": f"rmse vs teacher, {cfg.val_noises} stopping noises "
            f"(seeds {_seed_span(cfg.stop_seeds())})",
            "selection_initial": selection["start"],
            "selection_final": selection[chosen],
            "chosen": chosen,
            "sweep_kept": 0 if kept_start else searched[chosen]["sweep_kept"],
            "kept_start": kept_start,
        }
    )
    report = {
        "init": init_kind,
        "start_candidates": start_scores,
        "plan": plan,
        "data": data_info,
        "estimator": cfg.estimator,
        "validation": {
            "seeds": _seed_span(cfg.stop_seeds()),
            "teacher": cfg.teacher.describe(model),
            "measure": "rmse over all elements of solver output vs teacher output",
            "use": "stopping seeds: choose the start, the kept sweep of every level and the result",
        },
        "holdout": {
            "seeds": _seed_span(cfg.holdout_seeds()),
            "use": "held-out seeds: the reported stop_initial / stop_final only",
        },
        "candidates": {
            k: {"selection_rmse": selection[k], "holdout_rmse": held[k], "sigmas": [float(v) for v in g]}
            for k, g in grids.items()
        },
        "network_evals": {"klub": est.evals, "validation": validate.evals + holdout.evals},
        "levels": levels,
    }
    return OptimizeResult(sigmas=[float(s) for s in sig], objective=objective, report=report)


SPEC = register(
    OptimizerSpec(
        name="ays",
        config_cls=AYSConfig,
        run=run,
    )
)
