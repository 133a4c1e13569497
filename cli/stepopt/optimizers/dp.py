"""What GITS and OSS share: a candidate grid, cached teacher trajectories on it, and exact DPs.

Both methods pick the N+1 grid points among M+1 *candidate* sigmas ``c_0 = sigma_max > c_1 > ... >
c_M = sigma_min`` (``candidates = M``; spacing uniform in ``lam = -log sigma``, in the model's
native time, or EDM rho) by dynamic programming against *teacher trajectories*: the states
``X[p, m]`` of P ODE solutions (seeds ``data_seed ...``) at every candidate (the exact ODE for
analytic models; for networks ``teacher.steps`` steps of the teacher solver on a ``teacher.grid``
grid of each interval between neighbouring candidates). Trajectories are cached on disk like the
teacher outputs of ``eval`` (keyed by the model fingerprint, the candidate grid and the teacher
settings; one file per seed).

* :func:`gits_dp` -- the shortest weighted path over a cost matrix ``C[i, j]``, exact, O(N M^2).
* :func:`oss_dp` -- the OSS recursion over the student's own states, exact for that recursion,
  O(B N M^2) solver transitions with a beam of B paths per node (B = 1: the paper's); each
  transition is the real solver (see its docstring).

**A free last node** (``final_step: denoise``, ``last_node: free``, the default): the output is
``D(x_N, c_{p_N})``, one evaluation, so the last node p_N is chosen like the others instead of being
c_M = sigma_min (where that evaluation would correct almost nothing). The target is the teacher's
state at c_M denoised, ``Y = D(X_M, c_M)``, as every validator's with a final denoise. GITS adds the
jump's local cost ``C_den[j] = E || D(X_j, c_j) - Y ||`` as a last transition to a virtual node
(:func:`gits_dp_denoise`); OSS lets the N-th level end at any candidate and denoises the kept
student states there, one evaluation each (:func:`oss_dp`). ``last_node: sigma_min`` pins p_N = M.

The transitions run the target solver itself (:func:`stepopt.solvers.solve`) through
:class:`MemoDenoiser`, a content-addressed cache: a network evaluation whose input (x, sigma) was
seen before is not repeated, so replaying a known prefix of a path costs no evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from stepopt.baselines import BASELINES, FLOW_BASELINES, baseline_sigmas, start_sigmas
from stepopt.batches import batch_workers, imap_batches, split_for_workers
from stepopt.cache import TeacherCache
from stepopt.errors import StepoptError
from stepopt.frames import Flow
from stepopt.models.base import AnalyticModel, DiffusionModel
from stepopt.optimizers import OptimizeContext, OptimizeResult
from stepopt.sampling import cond_for_seeds, initial_noise
from stepopt.solvers import SolverIdentity, denoise, get_solver, solve
from stepopt.stats import paired_bootstrap
from stepopt.teacher import TeacherConfig, teacher_key

Spacing = Literal["lam", "time", "edm"]
TRAJECTORY_VERSION = 1
KEEP_BEST_RULES = ("significant", "lowest", "off")


@dataclass(frozen=True)
class DPConfig:
    """Options shared by ``gits`` and ``oss`` (``--set KEY=VALUE``).

    candidates: M, the number of intervals of the candidate grid (M+1 sigmas, both ends included).
    spacing: lam (uniform in lam = -log sigma) | time (uniform in the model's native time) | edm (rho).
    trajectories: P, teacher trajectories the costs are averaged over (seeds data_seed ...).
    keep_best: what replaces the DP's grid by a baseline grid (edm, logsnr, time-uniform, time-quadratic,
       kl-optimal; every grid scored by the solver's final error on the check trajectories, below).
       "lowest" (default; = ``true``): the baseline with the lowest mean replaces it when that mean is
       lower than the DP grid's; "significant": only when a paired bootstrap interval excludes 0
       (:func:`keep_best_decision`; the final error over noises is heavy-tailed, so a lower mean on a
       few hundred trajectories often does not rank two grids); "off" (= ``false``): the DP's grid
       whatever it scores. An extension beyond both papers: a path fitted under the method's own
       objective can lose to a closed form.
    check_trajectories: the trajectories keep_best scores on: K > 0 (default 1024) K fresh ones, seeds
       data_seed + P ... (disjoint from the DP's; for networks they cost K x M x the teacher's NFE per
       interval teacher evaluations, counted as ``check_teacher``); 0 the DP's own P, on which the DP's
       path, fitted to them, looks better than it is held out (the rule before: on gmm-digits it kept
       gits's dpmpp-3m path at NFE 5 / 6, 9 % worse than time-quadratic on 1000 held-out noises;
       README, issue 18).
    teacher: for networks, the teacher between neighbouring candidates: ``steps`` steps of ``solver``
       (``order``) on a ``grid`` grid of each interval (default 4 Heun steps uniform in lam per
       interval); analytic models use the exact ODE. Files from before the nesting: the flat
       ``teacher_solver``, ``teacher_order`` and ``teacher_substeps`` (= ``teacher.steps``).
    batch_size: trajectories per teacher batch.
    last_node: with ``final_step: denoise``, "free" (default): the last evaluated node is chosen among the
       candidates like the others (module docstring); "sigma_min": pinned at c_M.
    """

    # Flat keys of files written before the teacher section (stepopt.config reads them).
    RENAMED_KEYS: ClassVar[Mapping[str, str]] = {"teacher_substeps": "teacher.steps"}

    candidates: int = 64
    spacing: Spacing = "lam"
    rho: float = 7.0
    trajectories: int = 64
    data_seed: int = 3_000_000
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(steps=4, grid="logsnr"))
    batch_size: int = 256
    keep_best: bool | Literal["significant", "lowest", "off"] = "lowest"
    check_trajectories: int = 1024
    last_node: Literal["free", "sigma_min"] = "free"

    def __post_init__(self) -> None:
        for name in ("candidates", "trajectories", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise ValueError(f"'rho' must be a positive number, got {self.rho}")
        if self.data_seed < 0:
            raise ValueError(f"'data_seed' must be >= 0, got {self.data_seed}")
        if self.check_trajectories < 0:
            raise ValueError(f"'check_trajectories' must be >= 0, got {self.check_trajectories}")
        # true/false as before: "lowest" / "off" (the record names the rule).
        if isinstance(self.keep_best, bool):
            object.__setattr__(self, "keep_best", "lowest" if self.keep_best else "off")
        if self.keep_best not in KEEP_BEST_RULES:
            raise ValueError(
                f"'keep_best' must be one of {', '.join(KEEP_BEST_RULES)} (or true/false), got {self.keep_best!r}"
            )
        if self.last_node not in ("free", "sigma_min"):
            raise ValueError(f"'last_node' must be 'free' or 'sigma_min', got {self.last_node!r}")


def free_last_node(ctx: OptimizeContext, cfg: DPConfig) -> bool:
    """Whether the last evaluated node is chosen (a final denoise follows it and it is not pinned)."""
    return ctx.final_step == "denoise" and cfg.last_node == "free"


def denoised_target(
    denoiser: Callable[..., torch.Tensor], traj: torch.Tensor, cand: np.ndarray, cond: Mapping[str, Any] | None
) -> torch.Tensor:
    """``Y = D(X_M, c_M)``: the teacher's end state denoised, the target of a sampler with a final denoise."""
    with torch.no_grad():
        return denoise(denoiser, traj[:, -1], torch.tensor(float(cand[-1]), dtype=torch.float64), cond)


def candidate_grid(model: DiffusionModel, cfg: DPConfig, n_steps: int) -> np.ndarray:
    """The M+1 candidate sigmas, strictly decreasing from sigma_max to sigma_min."""
    if cfg.candidates < n_steps:
        raise StepoptError(
            f"candidates = {cfg.candidates} cannot hold {n_steps} steps; use `candidates={n_steps}` or more"
        )
    kind = {"lam": "logsnr", "time": "time-uniform", "edm": "edm"}[cfg.spacing]
    return start_sigmas(kind, model, cfg.candidates, rho=cfg.rho)


# -- teacher trajectories -------------------------------------------------------------------------
def _trajectory_key(model: DiffusionModel, cfg: DPConfig, cand: np.ndarray, dtype: torch.dtype) -> dict[str, Any]:
    key = teacher_key(model, cfg.teacher, float(cand[0]), float(cand[-1]), dtype)
    key["trajectory"] = {
        "version": TRAJECTORY_VERSION,
        "candidates": hashlib.sha256(np.asarray(cand, dtype=np.float64).tobytes()).hexdigest()[:24],
        "points": len(cand),
        "substeps_per_interval": cfg.teacher.steps,
    }
    return key


def _compute_trajectories(
    model: DiffusionModel, x: torch.Tensor, cand: np.ndarray, cfg: DPConfig, seeds: Sequence[int]
) -> torch.Tensor:
    out = [x]
    if isinstance(model, AnalyticModel):
        # DOP853 between neighbouring candidates; one thread (see stepopt.teacher on why).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for a, b in itertools.pairwise(cand):
                out.append(model.ode_solution(out[-1], float(a), float(b)))
        finally:
            torch.set_num_threads(threads)
    else:
        tc = cfg.teacher
        ident = tc.identity()
        cond = cond_for_seeds(model, seeds)
        with torch.no_grad():
            for a, b in itertools.pairwise(cand):
                sub = torch.as_tensor(baseline_sigmas(tc.grid, tc.steps, float(a), float(b), model.frame, rho=tc.rho))
                out.append(solve(ident, model, out[-1], sub.to(x.device), cond=cond))
    return torch.stack(out, dim=1)


def teacher_trajectories(
    model: DiffusionModel,
    cand: np.ndarray,
    cfg: DPConfig,
    *,
    device: torch.device | str | None = None,
    cache: bool | TeacherCache = True,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``X`` of shape ``(P, M+1, *model.shape)``: the teacher's state at every candidate, per seed.

    ``X[:, 0]`` is the initial noise of seed ``data_seed + p`` at sigma_max. Cached per seed.
    ``log`` hears, only when trajectories must be computed, how many and after each quarter.
    """
    t0 = time.perf_counter()
    seeds = list(range(cfg.data_seed, cfg.data_seed + cfg.trajectories))
    x_all = initial_noise(model, seeds, sigma=float(cand[0]), device=device)
    store = cache if isinstance(cache, TeacherCache) else (TeacherCache() if cache else None)
    if not model.fingerprint.startswith("sha256:"):
        store = None
    key = _trajectory_key(model, cfg, cand, x_all.dtype)
    shape = (len(cand), *model.shape)
    found = store.load(key, seeds, shape, x_all.dtype) if store is not None else {}
    traj = torch.empty((len(seeds), *shape), dtype=x_all.dtype, device=x_all.device)
    todo = [i for i, s in enumerate(seeds) if s not in found]
    for i, s in enumerate(seeds):
        if s in found:
            traj[i] = found[s].to(traj.device)
    if todo and log is not None:
        per = "exact ODE" if isinstance(model, AnalyticModel) else f"{(len(cand) - 1) * _teacher_nfe(cfg)} evaluations"
        log(
            f"computing the teacher trajectories of {len(todo)} of the {len(seeds)} seeds {seeds[0]}..{seeds[-1]} "
            f"({len(cand)} candidates, {per} each; cached per seed, so once per model)"
        )
    quarter, done = 0, 0
    workers = batch_workers(model, x_all.device, len(todo))  # a small network's batches side by side
    size = split_for_workers(len(todo), cfg.batch_size, workers)
    batches = [todo[start : start + size] for start in range(0, len(todo), size)]

    def one(idx: list[int]) -> torch.Tensor:
        return _compute_trajectories(model, x_all[idx], cand, cfg, [seeds[i] for i in idx])

    for idx, t in zip(batches, imap_batches(one, batches, min(workers, len(batches))), strict=True):
        traj[idx] = t.to(traj.dtype)
        if store is not None:
            store.store(key, [seeds[i] for i in idx], t)
        done += len(idx)
        if log is not None and 4 * done // len(todo) > quarter:
            quarter = 4 * done // len(todo)
            log(f"teacher trajectories: {done}/{len(todo)} after {time.perf_counter() - t0:.0f} s")
    info = {
        "seeds": f"{seeds[0]}..{seeds[-1]}",
        "teacher": "exact ODE"
        if isinstance(model, AnalyticModel)
        else {**cfg.teacher.to_dict(), "substeps_per_interval": cfg.teacher.steps},
        "cached": len(seeds) - len(todo),
        "computed": len(todo),
        "network_evals": 0 if isinstance(model, AnalyticModel) else len(todo) * (len(cand) - 1) * _teacher_nfe(cfg),
        "seconds": round(time.perf_counter() - t0, 4),
    }
    return traj, info


def _teacher_nfe(cfg: DPConfig) -> int:
    ident = cfg.teacher.identity()
    return get_solver(ident.name).nfe(ident, cfg.teacher.steps)


# -- the solver as a transition --------------------------------------------------------------------
class MemoDenoiser:
    """A denoiser that never evaluates the same input twice (key: sigma and the bytes of x).

    ``evals`` counts real network evaluations (one per sample). Solvers are deterministic, so
    replaying a path prefix reproduces the same inputs bit for bit and costs nothing.
    """

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model = model
        self.evals = 0
        self.store: dict[tuple[bytes, bytes], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        key = (
            hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=20).digest(),
            sigma.detach().cpu().numpy().tobytes(),
        )
        hit = self.store.get(key)
        if hit is None:
            hit = self.model(x, sigma, **cond)
            self.evals += int(x.shape[0])
            self.store[key] = hit
        return hit


class _Stop(Exception):
    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x


def state_after(
    identity: SolverIdentity,
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    grid: Sequence[float],
    step: int,
    cond: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The solver's state at ``grid[step + 1]`` on the full grid ``grid`` (stops there)."""

    def cb(info: dict[str, Any]) -> None:
        if info["i"] == step:
            raise _Stop(info["x"])

    try:
        with torch.no_grad():
            solve(identity, denoiser, x, torch.as_tensor(np.asarray(grid, dtype=np.float64)), cond=cond, callback=cb)
    except _Stop as stop:
        return stop.x
    raise RuntimeError(f"solver {identity} never reported step {step}")  # pragma: no cover


# -- GITS ------------------------------------------------------------------------------------------
def gits_jumps(
    identity: SolverIdentity,
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    cand: np.ndarray,
    j: int,
    cond: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """``(j, P, d)`` float64: one solver step from the teacher state X_i at c_i to c_j, for every i < j.

    The step is the solver started afresh on the two-point grid ``[c_i, c_j]`` (a multistep solver's
    first, first-order step: in the EDM frame DDIM's, which is Euler's, the reference code's cost step).
    """
    p = traj.shape[0]
    outs = []
    with torch.no_grad():
        for i in range(j):
            grid = torch.tensor([cand[i], cand[j]], dtype=torch.float64)
            outs.append(solve(identity, denoiser, traj[:, i], grid, cond=cond).reshape(p, -1).to(torch.float64))
    return torch.stack(outs)


def trajectory_deviation(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The distance of ``x`` (..., P, d) from the line through each trajectory's ``start`` and ``end`` (P, d):
    the norm of ``end - x`` without its component along ``end - start`` (the reference code's ``dev``)."""
    u = end - start
    u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    a = end - x
    return torch.linalg.vector_norm(a - (a * u).sum(-1, keepdim=True) * u, dim=-1)


def gits_costs(
    identity: SolverIdentity,
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    cand: np.ndarray,
    cond: Mapping[str, Any] | None = None,
    *,
    metric: str = "l2",
    score: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """``C[i, j]`` (i < j): the mean over trajectories of a distance between the jump i -> j
    (:func:`gits_jumps`) and the teacher state X_j; ``inf`` elsewhere.

    ``metric``: ``l2`` (default) ``||jump - X_j||_2``; ``dev`` (the reference code's default) the signed
    ``dev(jump) - dev(X_j)`` of :func:`trajectory_deviation` against each trajectory's start and end.
    ``score(j, jumps)`` replaces the metric (:class:`stepopt.optimizers.dp_propagate.Propagator`); it
    is called for j = M, M-1, ..., 1 and returns the j costs of the column.
    """
    if metric not in ("l2", "dev"):
        raise StepoptError(f"metric must be 'l2' or 'dev', got {metric!r}")
    m = len(cand) - 1
    cost = np.full((m + 1, m + 1), np.inf)
    flat = traj.reshape(traj.shape[0], traj.shape[1], -1).to(torch.float64)
    for j in range(m, 0, -1):
        jumps = gits_jumps(identity, denoiser, traj, cand, j, cond)
        with torch.no_grad():
            if score is not None:
                col = score(j, jumps)
            elif metric == "l2":
                col = torch.linalg.vector_norm(jumps - flat[None, :, j], dim=2).mean(1)
            else:
                start, end = flat[:, 0], flat[:, -1]
                dev = trajectory_deviation(jumps, start, end) - trajectory_deviation(flat[:, j], start, end)[None]
                col = dev.mean(1)
        cost[:j, j] = col.cpu().numpy()
    return cost


def gits_objective(cost: np.ndarray, path: Sequence[int], coeff: float) -> float:
    """``sum_s coeff^s C[p_s, p_{s+1}]``: later steps weigh ``coeff`` times more per step."""
    return float(sum(coeff**s * cost[a, b] for s, (a, b) in enumerate(itertools.pairwise(path))))


def gits_dp(cost: np.ndarray, n_steps: int, coeff: float = 1.0) -> tuple[list[int], float]:
    """The N-step path 0 = p_0 < ... < p_N = M minimising :func:`gits_objective`; exact, O(N M^2).

    ``V_k[i]`` = the cheapest k-step cost-to-go from candidate i to M, the first of those steps
    weighted 1 and each later one ``coeff`` more: ``V_1[i] = C[i, M]``,
    ``V_k[i] = min_{i < j < M} C[i, j] + coeff V_{k-1}[j]``.

    >>> c = np.full((3, 3), np.inf); c[0, 1], c[1, 2], c[0, 2] = 1.0, 1.0, 5.0
    >>> gits_dp(c, 2)
    ([0, 1, 2], 2.0)
    """
    m = cost.shape[0] - 1
    if not 1 <= n_steps <= m:
        raise StepoptError(f"cannot choose {n_steps} steps among {m} candidate intervals")
    v = cost[:, m].copy()
    v[m] = np.inf
    choice: list[np.ndarray] = []
    inner = cost.copy()
    inner[:, m] = np.inf  # intermediate nodes are never the end point
    for _ in range(2, n_steps + 1):
        total = inner + coeff * v[None, :]
        arg = np.argmin(total, axis=1)
        v = total[np.arange(m + 1), arg]
        choice.append(arg)
    path = [0]
    for arg in reversed(choice):
        path.append(int(arg[path[-1]]))
    path.append(m)
    if not np.isfinite(v[0]):
        raise StepoptError("no finite path through the candidate grid (non-finite costs)")
    return path, float(v[0])


def gits_denoise_costs(
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    cand: np.ndarray,
    target: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """``C_den[j]`` (j >= 1): mean over trajectories of ``|| D(X_j, c_j) - Y ||_2``, the local error of
    the final denoise from the teacher state at c_j (``C_den[M] = 0``); ``inf`` at j = 0."""
    flat_y = target.reshape(target.shape[0], -1).to(torch.float64)
    out = np.full(len(cand), np.inf)
    with torch.no_grad():
        for j in range(1, len(cand)):
            d = denoise(denoiser, traj[:, j], torch.tensor(float(cand[j]), dtype=torch.float64), cond)
            out[j] = float(torch.linalg.vector_norm(d.reshape(flat_y.shape).to(torch.float64) - flat_y, dim=1).mean())
    return out


def gits_dp_denoise(cost: np.ndarray, den: np.ndarray, n_steps: int, coeff: float = 1.0) -> tuple[list[int], float]:
    """The N-step path ``0 = p_0 < ... < p_N <= M`` followed by the final denoise from c_{p_N}, minimising
    ``sum_{s<N} coeff^s C[p_s, p_{s+1}] + coeff^N C_den[p_N]``: :func:`gits_dp` on the cost matrix with a
    virtual node M+1 (sigma = 0) reached from c_j at the cost ``C_den[j]``; exact, O(N M^2).

    >>> c = np.full((3, 3), np.inf); c[0, 1], c[1, 2], c[0, 2] = 1.0, 1.0, 5.0
    >>> gits_dp_denoise(c, np.array([np.inf, 0.5, 0.0]), 1)
    ([0, 1], 1.5)
    """
    m = cost.shape[0] - 1
    aug = np.full((m + 2, m + 2), np.inf)
    aug[: m + 1, : m + 1] = cost
    aug[: m + 1, m + 1] = den
    path, value = gits_dp(aug, n_steps + 1, coeff)
    return path[:-1], value


# -- OSS -------------------------------------------------------------------------------------------
@dataclass
class OSSResult:
    path: list[int]
    value: float
    table: np.ndarray  # V[k, j]: the best mean squared error at candidate j after k steps (inf: unreachable)
    back: np.ndarray  # the predecessor i of (k, j) on its best path (-1: none)
    transitions: int
    beam: int = 1
    # With a free last node: the best mean squared error after the final denoise from each candidate.
    denoised: np.ndarray | None = None


def _tail(sigma: float, n: int) -> list[float]:
    # Placeholder points below ``sigma`` so that a prefix has the full grid length (the solver's
    # order pattern depends on N); the solver is stopped before it reaches them.
    return [sigma * 0.5**t for t in range(1, n + 1)]


def oss_dp(
    identity: SolverIdentity,
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    cand: np.ndarray,
    n_steps: int,
    cond: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    beam: int = 1,
    target: torch.Tensor | None = None,
) -> OSSResult:
    """OSS (Pei, Hu, Gu 2025, Sec. 3.2): the best student state reachable at each candidate in k steps.

    ``z_k(j)`` is the student's state at c_j after k steps along the path chosen for (k, j);
    ``V_k(j) = min_i E_p || Phi(z_{k-1}(i); c_i -> c_j) - X_j ||^2`` (mean over trajectories and
    elements), ``z_k(j)`` the minimiser's state; the schedule is the path of ``(N, M)``. The
    transition ``Phi`` is one step of the real solver on the real N-step grid, with the solver's full
    state: a multistep solver carries the data predictions of the path's own earlier nodes (its
    history), Heun makes its corrector evaluation at c_j, the order pattern (warm-up, lower order at
    the end) is that of step k of N. It is computed by running the solver along the stored path
    ``p_0..p_{k-1}, i, j`` (placeholders after j) and stopping after step k; the prefix's evaluations
    are cached, so each (k, i) costs one new evaluation per trajectory (two-evaluation solvers: one
    more per (k, i, j)). States at (k, j) from which the remaining N - k steps cannot reach c_M are
    skipped. Transitions: sum_k |sources| x |targets| <= N M^2 / 2 solver runs.

    ``beam = B`` keeps the B best k-step paths into each candidate instead of one (B = 1 is the
    paper's recursion, bit for bit). The best state at c_j need not lie on the best N-step path: a
    multistep solver's history and the later steps' error cancellation make the premise of optimal
    substructure approximate; a wider beam searches more of the path space at B times the
    transitions and evaluations, and B = the number of paths is the exhaustive search.

    ``target`` (a final denoise with a free last node, ``Y = D(X_M, c_M)``): level N may end at any
    candidate j, and each of its kept paths is finished by the denoise from its student state at c_j
    (one evaluation per path); the schedule is the path with the lowest error to ``target`` after it.
    """
    m = len(cand) - 1
    if not 1 <= n_steps <= m:
        raise StepoptError(f"cannot choose {n_steps} steps among {m} candidate intervals")
    if beam < 1:
        raise StepoptError(f"beam must be >= 1, got {beam}; use `beam=1` for the paper's recursion")
    # kept[j]: up to ``beam`` (error, path) pairs of the current level ending at candidate j, best first.
    kept: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(m + 1)]
    kept[0] = [(0.0, (0,))]
    table = np.full((n_steps + 1, m + 1), np.inf)
    back = np.full((n_steps + 1, m + 1), -1, dtype=np.int64)
    table[0, 0] = 0.0
    x0 = traj[:, 0]
    flat = traj.reshape(traj.shape[0], traj.shape[1], -1).to(torch.float64)
    runs = 0
    free_end = target is not None
    for k in range(1, n_steps + 1):
        last = m if k == n_steps else m - (n_steps - k)
        found: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(m + 1)]
        for i in range(m + 1):
            for _, path in kept[i]:
                prefix = [float(cand[p]) for p in path]
                lo = i + 1 if k < n_steps or free_end else m
                for j in range(lo, last + 1):
                    grid = [*prefix, float(cand[j]), *_tail(float(cand[j]), n_steps - k)]
                    x = state_after(identity, denoiser, x0, grid, k - 1, cond)
                    runs += 1
                    err = float(((x.reshape(x.shape[0], -1).to(torch.float64) - flat[:, j]) ** 2).mean())
                    if math.isfinite(err):
                        found[j].append((err, (*path, j)))
        for j in range(m + 1):
            # A stable sort: among equal errors the first path found wins, as in the paper's recursion.
            found[j].sort(key=lambda entry: entry[0])
            found[j] = found[j][:beam]
            if found[j]:
                table[k, j] = found[j][0][0]
                back[k, j] = found[j][0][1][-2]
        kept = found
        if progress is not None:
            progress(k)
    if target is not None:
        flat_y = target.reshape(target.shape[0], -1).to(torch.float64)
        denoised = np.full(m + 1, np.inf)
        finals: list[tuple[float, tuple[int, ...]]] = []
        for j in range(m + 1):
            for _, path in kept[j]:
                path_grid = torch.as_tensor(np.asarray([cand[p] for p in path], dtype=np.float64))
                with torch.no_grad():
                    out = solve(identity, denoiser, x0, path_grid, cond=cond, final_step="denoise")
                runs += 1
                err = float(((out.reshape(flat_y.shape).to(torch.float64) - flat_y) ** 2).mean())
                if math.isfinite(err):
                    finals.append((err, path))
                    denoised[j] = min(denoised[j], err)
        if not finals:
            raise StepoptError("oss: no finite path through the candidate grid (non-finite student states)")
        value, path = min(finals, key=lambda entry: entry[0])  # the first found wins ties
        return OSSResult(list(path), float(value), table, back, runs, beam, denoised)
    if not kept[m]:
        raise StepoptError("oss: no finite path through the candidate grid (non-finite student states)")
    value, path = kept[m][0]
    return OSSResult(list(path), float(value), table, back, runs, beam)


def final_errors(
    identity: SolverIdentity,
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    sigmas: Sequence[float],
    cond: Mapping[str, Any] | None = None,
    target: torch.Tensor | None = None,
) -> np.ndarray:
    """Per trajectory, the mean squared error (over its elements) of the solver's output on ``sigmas``
    vs the teacher at sigma_min (``target``: the output after a final denoise vs that target,
    :func:`denoised_target`)."""
    final_step = "none" if target is None else "denoise"
    grid = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    with torch.no_grad():
        out = solve(identity, denoiser, traj[:, 0], grid, cond=cond, final_step=final_step)
    y = (traj[:, -1] if target is None else target).reshape(traj.shape[0], -1).to(torch.float64)
    return ((out.reshape(out.shape[0], -1).to(torch.float64) - y) ** 2).mean(1).cpu().numpy()


def final_error(
    identity: SolverIdentity,
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    sigmas: Sequence[float],
    cond: Mapping[str, Any] | None = None,
    target: torch.Tensor | None = None,
) -> float:
    """The mean over trajectories of :func:`final_errors` (the squared RMSE)."""
    return float(final_errors(identity, denoiser, traj, sigmas, cond, target).mean())


def keep_best_decision(
    errors: Mapping[str, np.ndarray], rule: str = "significant", seed: int = 0, own: str = "dp"
) -> dict[str, Any]:
    """Which grid keep_best returns, from per-trajectory squared errors ``errors[name]`` (``own``: the
    optimizer's grid, "dp" for the DP's; every other key a baseline).

    The candidate is the baseline with the lowest mean. "lowest": it replaces the optimizer's grid when
    its mean is lower. "significant": only when :func:`stepopt.stats.paired_bootstrap` of its errors
    against the optimizer's (the same trajectories, resampled together; ``seed``) gives a 95 % interval
    of the relative RMSE change entirely below 0. An optimizer grid with a non-finite error is replaced
    by any finite baseline. Returns ``kept``, ``against`` (the candidate) and, for "significant",
    ``interval``. Also trust-region ``--select``'s rule between its best bound candidate and the best
    baseline (with the roles swapped: the baseline is kept unless the bound is significantly better).
    """
    if rule not in ("significant", "lowest"):
        raise ValueError(f"keep_best_decision: rule must be 'significant' or 'lowest', got {rule!r}")
    means = {k: float(np.mean(v)) for k, v in errors.items()}
    finite = [k for k in means if k != own and math.isfinite(means[k])]
    info: dict[str, Any] = {"rule": rule, "kept": own}
    if not finite:
        return info
    best = min(finite, key=lambda k: means[k])  # the first listed wins ties
    info["against"] = best
    if not math.isfinite(means[own]):
        info["kept"] = best
    elif rule == "lowest":
        if means[best] < means[own]:
            info["kept"] = best
    else:
        cmp = paired_bootstrap(errors[best], errors[own], seed=seed)
        info["interval"] = cmp.to_dict()
        if cmp.high < 0:
            info["kept"] = best
    return info


def keep_best_grid(
    model: DiffusionModel,
    identity: SolverIdentity,
    denoiser: Callable[..., torch.Tensor],
    traj: torch.Tensor,
    sigmas: Sequence[float],
    cond: Mapping[str, Any] | None = None,
    target: torch.Tensor | None = None,
    rule: str = "lowest",
) -> tuple[list[float], dict[str, Any]]:
    """``sigmas`` or a baseline grid, by :func:`keep_best_decision` (``rule``) on the trajectories' errors.

    Every baseline of :data:`stepopt.baselines.BASELINES` the model's range allows, with the same
    number of steps, from c_0 = sigma_max to c_M = sigma_min (the trajectories' ends); with a final
    denoise (``target``) on a flow model also the pipeline default (:data:`FLOW_BASELINES`).
    """
    n = len(sigmas) - 1
    errors = {"dp": final_errors(identity, denoiser, traj, sigmas, cond, target)}
    grids: dict[str, list[float]] = {"dp": [float(v) for v in sigmas]}
    kinds = list(BASELINES) + (list(FLOW_BASELINES) if target is not None and isinstance(model.frame, Flow) else [])
    for kind in kinds:
        try:
            grid = [float(v) for v in start_sigmas(kind, model, n)]
        except StepoptError:
            continue
        grids[kind] = grid
        errors[kind] = final_errors(identity, denoiser, traj, grid, cond, target)
    info = keep_best_decision(errors, rule)
    info["trajectories"] = int(traj.shape[0])
    info["rmse_on_trajectories"] = {k: float(np.mean(v)) ** 0.5 for k, v in errors.items()}
    return grids[info["kept"]], info


def finish(
    ctx: OptimizeContext,
    method: str,
    cfg: DPConfig,
    memo: MemoDenoiser,
    traj: torch.Tensor,
    sigmas: list[float],
    cond: Mapping[str, Any] | None,
    objective: dict[str, Any],
    report: dict[str, Any],
    search_evals: int,
    target: torch.Tensor | None = None,
) -> OptimizeResult:
    """The result of gits/oss: ``keep_best`` applied (unless off), the check's evaluations counted
    (with ``check_trajectories``: on separate trajectories, their teacher evaluations too)."""
    if cfg.keep_best != "off":
        ctraj, ccond, ctarget = traj, cond, target
        if cfg.check_trajectories > 0:
            ccfg = dataclasses.replace(
                cfg, data_seed=cfg.data_seed + cfg.trajectories, trajectories=cfg.check_trajectories
            )
            cand = candidate_grid(ctx.model, cfg, ctx.n_steps)

            def log(message: str) -> None:
                ctx.report("log", message=f"{method} check: {message}")

            ctraj, cinfo = teacher_trajectories(ctx.model, cand, ccfg, device=ctx.device, log=log)
            report["network_evals"]["check_teacher"] = cinfo["network_evals"]
            ccond = cond_for_seeds(ctx.model, list(range(ccfg.data_seed, ccfg.data_seed + ccfg.trajectories)))
            if target is not None:
                ctarget = denoised_target(memo, ctraj, cand, ccond)
        with torch.no_grad():
            rule = str(cfg.keep_best)
            sigmas, kept = keep_best_grid(ctx.model, ctx.solver, memo, ctraj, sigmas, ccond, ctarget, rule)
        kept["seeds"] = f"{cfg.data_seed + (cfg.trajectories if ctraj is not traj else 0)}..+{ctraj.shape[0] - 1}"
        report["keep_best"] = kept
        if ctraj is traj:
            objective["teacher_rmse_final"] = kept["rmse_on_trajectories"][kept["kept"]]
        else:
            objective["teacher_rmse_final"] = final_error(ctx.solver, memo, traj, sigmas, cond, target) ** 0.5
        if kept["kept"] != "dp":
            why = ""
            if "interval" in kept:
                iv = kept["interval"]
                why = f" ({100 * iv['change']:+.1f} % [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}])"
            ctx.report("log", message=f"{method}: the {kept['kept']} baseline beats the DP's grid{why}; kept it")
    report["network_evals"]["check"] = memo.evals - search_evals
    return OptimizeResult(sigmas=sigmas, objective=objective, report=report)


def even_path(m: int, n_steps: int) -> list[int]:
    """The N-step subset evenly spaced in candidate index (the start a DP result is compared with)."""
    return [round(float(v)) for v in np.linspace(0, m, n_steps + 1)]
