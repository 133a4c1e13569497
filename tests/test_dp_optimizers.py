"""GITS and OSS: their dynamic programs against exhaustive search, and the optimizer contract."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from _gaussian_net import GaussianNet
from stepopt.baselines import baseline_sigmas
from stepopt.config import config_to_dict, resolve_config
from stepopt.errors import ConfigError
from stepopt.models import GaussianMixture
from stepopt.optimizers import optimize
from stepopt.optimizers.dp import (
    DPConfig,
    MemoDenoiser,
    candidate_grid,
    final_error,
    gits_costs,
    gits_dp,
    gits_objective,
    keep_best_decision,
    keep_best_grid,
    oss_dp,
    teacher_trajectories,
)
from stepopt.optimizers.dp_history import (
    HistoryCosts,
    history_costs,
    history_dp,
    history_objective,
    teacher_denoised,
)
from stepopt.optimizers.gits import GITSConfig
from stepopt.optimizers.oss import OSSConfig
from stepopt.solvers import get_solver, solve
from stepopt.stats import paired_bootstrap
from stepopt.teacher import GridValidator, TeacherConfig

SMALL = {"candidates": 7, "trajectories": 4}


def all_paths(m: int, n: int) -> list[list[int]]:
    """Every N-step subset of the candidates 0..M that starts at 0 and ends at M."""
    return [[0, *inner, m] for inner in itertools.combinations(range(1, m), n - 1)]


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_gits_dp_is_the_exhaustive_optimum(coeff: float, n: int) -> None:
    rng = np.random.default_rng(n)
    m = 8
    cost = np.triu(rng.uniform(0.1, 2.0, (m + 1, m + 1)), 1)
    cost[cost == 0] = np.inf
    path, value = gits_dp(cost, n, coeff)
    best = min(all_paths(m, n), key=lambda p: gits_objective(cost, p, coeff))
    assert path == best
    assert value == pytest.approx(gits_objective(cost, best, coeff), rel=1e-12)


@pytest.fixture(scope="module")
def small_setup(gmm: GaussianMixture) -> tuple[np.ndarray, torch.Tensor]:
    cfg = DPConfig(**SMALL)
    cand = candidate_grid(gmm, cfg, 3)
    traj, _ = teacher_trajectories(gmm, cand, cfg)
    return cand, traj


@pytest.mark.parametrize("solver", ["euler", "dpmpp-3m", "heun"])
def test_oss_dp_against_exhaustive_search(
    gmm: GaussianMixture, small_setup: tuple[np.ndarray, torch.Tensor], solver: str
) -> None:
    """The DP's value is the real final error of its path, and no N-step subset does better.

    OSS is exact for its recursion; equality with the exhaustive optimum of the final error is the
    paper's optimal-substructure premise, which holds on this grid for these solvers.
    """
    cand, traj = small_setup
    ident = get_solver(solver).identity()
    n, m = 3, len(cand) - 1
    memo = MemoDenoiser(gmm)
    res = oss_dp(ident, memo, traj, cand, n)
    assert res.value == pytest.approx(final_error(ident, gmm, traj, [cand[p] for p in res.path]), rel=1e-12)
    errors = {tuple(p): final_error(ident, memo, traj, [cand[q] for q in p]) for p in all_paths(m, n)}
    assert res.value == pytest.approx(min(errors.values()), rel=1e-12)
    # Each level's table entry is the best one-step extension of the previous level's states.
    for k in range(1, n):
        for j in range(1, m):
            if np.isfinite(res.table[k, j]):
                assert res.back[k, j] >= 0


def test_oss_beam_widens_the_search_to_the_exhaustive_optimum(gmm: GaussianMixture) -> None:
    """The paper's recursion (beam 1) misses the exhaustive optimum here (dpmpp-3m: the best state at an
    intermediate node is not on the best 4-step path); beam 2 finds it, and a beam as wide as the
    number of paths is the exhaustive search by construction."""
    from stepopt.errors import StepoptError

    cfg = DPConfig(candidates=11, spacing="edm", trajectories=2)
    n = 4
    cand = candidate_grid(gmm, cfg, n)
    traj, _ = teacher_trajectories(gmm, cand, cfg, cache=False)
    ident = get_solver("dpmpp-3m").identity()
    memo = MemoDenoiser(gmm)
    paths = all_paths(len(cand) - 1, n)
    errors = {tuple(p): final_error(ident, memo, traj, [cand[q] for q in p]) for p in paths}
    best = min(errors.values())
    runs = {b: oss_dp(ident, memo, traj, cand, n, beam=b) for b in (1, 2, len(paths))}
    for res in runs.values():
        assert res.value == pytest.approx(errors[tuple(res.path)], rel=1e-12)  # the value is its path's error
    assert runs[1].value > best * 1.1
    assert runs[2].value == pytest.approx(best, rel=1e-12)
    assert runs[len(paths)].value == pytest.approx(best, rel=1e-12)
    assert runs[1].transitions < runs[2].transitions < runs[len(paths)].transitions
    with pytest.raises(StepoptError, match="beam"):
        oss_dp(ident, memo, traj, cand, n, beam=0)
    with pytest.raises(ValueError, match="beam"):
        OSSConfig(beam=0)


def test_oss_evaluations_are_cached(gmm: GaussianMixture, small_setup: tuple[np.ndarray, torch.Tensor]) -> None:
    """A one-evaluation solver pays at most one evaluation per (level, source) and trajectory."""
    cand, traj = small_setup
    memo = MemoDenoiser(gmm)
    n, m, p = 3, len(cand) - 1, traj.shape[0]
    oss_dp(get_solver("euler").identity(), memo, traj, cand, n)
    assert memo.evals <= n * m * p


def solver_teacher_forced_errors(ident, traj: torch.Tensor, den: torch.Tensor, cand: np.ndarray, path: list[int]):
    """Each step's teacher-forced local error along ``path`` (mean over trajectories of its L2 norm),
    from the real solver: run on the path's grid with a denoiser that returns the cached D(X_m) at node
    m whatever its input. Every step is affine in its state with slope sigma_{s+1}/sigma_s, so with
    e_s = x_s - X_{p_s} the step from the teacher state errs by e_{s+1} - (sigma_{s+1}/sigma_s) e_s."""
    grid = [float(cand[i]) for i in path]
    node = {float(cand[i]): i for i in path}
    states = [traj[:, 0]]
    solve(
        ident,
        lambda x, sigma, **_: den[:, node[float(sigma[0])]],
        traj[:, 0],
        torch.tensor(grid, dtype=torch.float64),
        callback=lambda info: states.append(info["x"]),
    )
    out = []
    for s in range(len(path) - 1):
        e0 = (states[s] - traj[:, path[s]]).flatten(1)
        e1 = (states[s + 1] - traj[:, path[s + 1]]).flatten(1)
        out.append(float(torch.linalg.vector_norm(e1 - (grid[s + 1] / grid[s]) * e0, dim=1).mean()))
    return out


HISTORY_SOLVERS = [
    ("dpmpp-3m", {}),
    ("dpmpp-3m", {"variant": "exact", "lower_order_final": False}),
    ("dpmpp-2m", {}),
    ("unipc", {}),
    ("unipc", {"variant": "bh1", "lower_order_final": False}),
    ("euler", {}),
]


@pytest.mark.parametrize("n", [2, 4, 5])
@pytest.mark.parametrize(("solver", "opts"), HISTORY_SOLVERS)
def test_gits_history_dp_against_the_real_solver_and_exhaustive_search(
    gmm: GaussianMixture, small_setup: tuple[np.ndarray, torch.Tensor], solver: str, opts: dict, n: int
) -> None:
    """cost=history: the objective of every N-step path equals the sum of the teacher-forced local
    errors of the real solver along it (warm-up, lower_order_final, UniPC's corrector and its
    uncorrected last step as the solver takes them), and the DP returns the exhaustive minimum."""
    cand, traj = small_setup
    ident = get_solver(solver).identity(**opts)
    m = len(cand) - 1
    den = teacher_denoised(gmm, traj, cand)
    costs = history_costs(ident, traj, den, cand, n)
    path, value = history_dp(costs, m)
    objective = {tuple(p): history_objective(costs, p) for p in all_paths(m, n)}
    assert value == pytest.approx(min(objective.values()), rel=1e-12)
    assert value == pytest.approx(objective[tuple(path)], rel=1e-12)
    for p in objective:
        steps = solver_teacher_forced_errors(ident, traj, den, cand, list(p))
        assert [costs.step_cost(s, p) for s in range(n)] == pytest.approx(steps, rel=1e-8, abs=1e-12)
    # coeff weighs step s by coeff^s, as the local cost's DP does.
    wpath, wvalue = history_dp(costs, m, 1.3)
    assert wvalue == pytest.approx(min(history_objective(costs, p, 1.3) for p in all_paths(m, n)), rel=1e-12)
    assert wvalue == pytest.approx(history_objective(costs, wpath, 1.3), rel=1e-12)


def test_gits_history_sees_the_higher_orders(
    gmm: GaussianMixture, small_setup: tuple[np.ndarray, torch.Tensor]
) -> None:
    """The order-1 table is the local cost (a first-order step from the teacher state is the solver
    started afresh); euler's history DP is the local DP; dpmpp-3m's order-2/3 steps cost less than
    first-order ones on the first short jumps (the history is exact under teacher forcing; at lower
    noise, where this mixture's denoiser turns fast in lam, the extrapolation costs more)."""
    cand, traj = small_setup
    m, memo = len(cand) - 1, MemoDenoiser(gmm)
    den = teacher_denoised(memo, traj, cand)
    assert memo.evals == m * traj.shape[0]  # one evaluation per candidate (but the last) and trajectory
    ident = get_solver("dpmpp-3m").identity()
    local = gits_costs(ident, memo, traj, cand)
    hist = history_costs(ident, traj, den, cand, 5)
    assert hist.kinds == [(1, False), (2, False), (3, False), (2, False), (1, False)]
    upper = np.triu_indices(m + 1, 1)
    assert hist.tables[(1, False)][upper] == pytest.approx(local[upper], rel=1e-9)
    euler = get_solver("euler").identity()
    for n in (2, 4):
        assert (
            history_dp(history_costs(euler, traj, den, cand, n), m)[0]
            == gits_dp(gits_costs(euler, memo, traj, cand), n)[0]
        )
    c2, c3 = hist.tables[(2, False)], hist.tables[(3, False)]
    assert c2[0, 1, 2] < local[1, 2] and c3[0, 1, 2, 3] < local[2, 3]


def test_gits_cost_option(gmm: GaussianMixture) -> None:
    """cost: local (default) or history; the report records the cost, the step orders and the
    departures; history is refused where it is not defined."""
    from stepopt.errors import StepoptError

    three = get_solver("dpmpp-3m").identity()
    assert GITSConfig().cost == "local" and [d.split(":")[0] for d in GITSConfig().departures()] == ["keep_best"]
    s = optimize("gits", gmm, three, 4, GITSConfig(**SMALL, cost="history", keep_best=False))
    rep = s.method.config["report"]
    assert s.method.config["cost"] == "history" and rep["cost"] == "history"
    assert rep["step_orders"] == {"order 1": 2, "order 2": 2}
    assert any(d.startswith("cost: history") for d in rep["departures"])
    assert "history" in s.method.objective["name"]
    local = optimize("gits", gmm, three, 4, GITSConfig(**SMALL, cost="local"))
    assert local.method.config["report"]["cost"] == "local" and "step_orders" not in local.method.config["report"]
    with pytest.raises(StepoptError, match="cost=history is defined for"):
        optimize("gits", gmm, get_solver("heun").identity(), 4, GITSConfig(**SMALL, cost="history"))
    with pytest.raises(StepoptError, match="GiB table"):
        history_costs(three, torch.zeros(1, 301, 2), torch.zeros(1, 300, 2), np.geomspace(80, 0.002, 301), 5)
    with pytest.raises(ConfigError, match="cost"):
        resolve_config(GITSConfig, None, ["cost=global"])
    assert isinstance(history_costs(three, *_tiny(gmm), 3), HistoryCosts)


def _tiny(gmm: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    cfg = DPConfig(candidates=4, trajectories=2)
    cand = candidate_grid(gmm, cfg, 3)
    traj, _ = teacher_trajectories(gmm, cand, cfg)
    return traj, teacher_denoised(gmm, traj, cand), cand


def test_gits_costs_are_local_errors(gmm: GaussianMixture, small_setup: tuple[np.ndarray, torch.Tensor]) -> None:
    cand, traj = small_setup
    cost = gits_costs(get_solver("euler").identity(), MemoDenoiser(gmm), traj, cand)
    m = len(cand) - 1
    assert np.all(np.isinf(cost[np.tril_indices(m + 1)]))  # only forward jumps i < j
    assert np.all(np.isfinite(cost[np.triu_indices(m + 1, 1)])) and np.all(cost[np.triu_indices(m + 1, 1)] > 0)


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("gits", GITSConfig(**SMALL, cost="local")),
        ("gits", GITSConfig(**SMALL, cost="history")),
        ("oss", OSSConfig(**SMALL)),
    ],
    ids=["gits-local", "gits-history", "oss"],
)
@pytest.mark.parametrize("solver", ["euler", "dpmpp-3m"])
def test_optimizer_contract(gmm: GaussianMixture, name: str, cfg: DPConfig, solver: str) -> None:
    ident = get_solver(solver).identity()
    a = optimize(name, gmm, ident, 3, cfg)
    b = optimize(name, gmm, ident, 3, cfg)
    assert a.sigmas == b.sigmas  # deterministic
    assert a.sigmas[0] == gmm.sigma_max and a.sigmas[-1] == gmm.sigma_min
    assert all(x > y for x, y in zip(a.sigmas[:-1], a.sigmas[1:], strict=True))
    obj = a.method.objective
    assert obj["final"] <= obj["initial"] + 1e-15  # never worse than the evenly spaced start
    rep = a.method.config["report"]
    assert rep["network_evals"]["search"] > 0 and len(rep["path"]) == 4
    assert a.method.config["candidates"] == SMALL["candidates"]
    # keep_best (default "lowest" on 1024 fresh trajectories, seeds data_seed + P ..., none of the
    # DP's): the returned grid's final error on those trajectories, recomputed here from the
    # trajectories themselves, is the one recorded for the kept grid; a baseline replaced the DP's
    # grid only with a lower mean there; the objective's final RMSE is on the DP's own trajectories.
    kept = rep["keep_best"]
    assert kept["rule"] == "lowest" == a.method.config["keep_best"] and cfg.check_trajectories == 1024
    own = SMALL["trajectories"]
    assert kept["trajectories"] == 1024 and kept["seeds"] == f"{cfg.data_seed + own}..+1023"
    assert set(kept["rmse_on_trajectories"]) == {"dp", "edm", "logsnr", "time-uniform", "time-quadratic", "kl-optimal"}
    cand = candidate_grid(gmm, cfg, 3)
    traj, _ = teacher_trajectories(gmm, cand, cfg)
    fresh, _ = teacher_trajectories(gmm, cand, replace(cfg, data_seed=cfg.data_seed + own, trajectories=1024))
    assert not set(range(cfg.data_seed, cfg.data_seed + own)) & set(
        range(cfg.data_seed + own, cfg.data_seed + own + 1024)
    )
    scores = kept["rmse_on_trajectories"]
    assert final_error(ident, gmm, fresh, a.sigmas) ** 0.5 == pytest.approx(scores[kept["kept"]], rel=1e-9)
    assert scores[kept["against"]] == min(v for k, v in scores.items() if k != "dp")
    if kept["kept"] == "dp":
        assert list(a.sigmas) == [float(cand[p]) for p in rep["path"]] and scores["dp"] <= scores[kept["against"]]
    else:
        assert kept["kept"] == kept["against"] and scores[kept["kept"]] < scores["dp"]
    assert obj["teacher_rmse_final"] == pytest.approx(final_error(ident, gmm, traj, a.sigmas) ** 0.5, rel=1e-9)


def test_keep_best_returns_a_baseline_that_beats_the_dp_grid(
    gmm: GaussianMixture, small_setup: tuple[np.ndarray, torch.Tensor]
) -> None:
    """A poor grid (every step crowded at high noise) is replaced by the best baseline; a grid better
    than every baseline is kept; ``keep_best=false`` returns the DP's grid."""
    cand, traj = small_setup
    ident = get_solver("euler").identity()
    poor = [float(cand[0]), float(cand[1]) * 1.01, float(cand[1]), float(cand[-1])]
    grid, info = keep_best_grid(gmm, ident, gmm, traj, poor, None)
    scores = info["rmse_on_trajectories"]
    assert info["kept"] != "dp" and scores[info["kept"]] == min(scores.values()) < scores["dp"]
    assert grid == [float(v) for v in baseline_sigmas(info["kept"], 3, gmm.sigma_max, gmm.sigma_min, gmm.frame)]
    same, again = keep_best_grid(gmm, ident, gmm, traj, grid, None)
    assert same == grid and again["kept"] == "dp"  # a tie keeps the DP's own grid
    off = optimize("gits", gmm, ident, 3, GITSConfig(**SMALL, keep_best=False))
    assert "keep_best" not in off.method.config["report"]


def test_keep_best_decides_on_fresh_trajectories(gmm: GaussianMixture) -> None:
    """The default check scores on 1024 trajectories the DP never saw. With 4 trajectories the DP's
    dpmpp-2m NFE-5 path is fitted to them: the rule before (``significant`` on those 4) keeps it, the
    default replaces it by time-quadratic, which is the better grid on 128 held-out noises (exact ODE,
    seeds 20000..; 0.097 vs 0.114, measured)."""
    ident = get_solver("dpmpp-2m").identity()
    before = optimize("gits", gmm, ident, 5, GITSConfig(**SMALL, keep_best="significant", check_trajectories=0))
    now = optimize("gits", gmm, ident, 5, GITSConfig(**SMALL))
    assert before.method.config["report"]["keep_best"]["kept"] == "dp"
    assert before.method.config["report"]["keep_best"]["seeds"] == "3000000..+3"
    kb = now.method.config["report"]["keep_best"]
    assert kb["kept"] == "time-quadratic" and kb["seeds"] == "3000004..+1023"
    assert list(now.sigmas) == [
        float(v) for v in baseline_sigmas("time-quadratic", 5, gmm.sigma_max, gmm.sigma_min, gmm.frame)
    ]
    held = GridValidator(gmm, None, range(20000, 20128)).with_solver(ident)
    assert held.rmse(now.sigmas) < 0.9 * held.rmse(before.sigmas)


def test_keep_best_significant_replaces_only_a_significantly_better_baseline() -> None:
    """Heavy-tailed per-trajectory errors (log-normal, as over the noises of a mixture): a baseline 3 %
    better in RMSE but with seed-to-seed scatter is NOT significant -> the DP's grid is kept (while
    "lowest" replaces it); one 15 % better on nearly every seed is -> replaced. The recorded interval
    is paired_bootstrap's (seed 0) of the baseline's errors against the DP's."""
    rng = np.random.default_rng(7)
    dp = np.exp(rng.normal(0.0, 1.5, 256))
    noisy = dp * np.exp(rng.normal(0.0, 0.5, 256))
    noisy *= 0.97**2 * dp.mean() / noisy.mean()  # RMSE exactly 3 % lower on average
    worse = dp * 1.1
    errors = {"dp": dp, "edm": worse, "logsnr": noisy}
    info = keep_best_decision(errors, "significant")
    ref = paired_bootstrap(noisy, dp, seed=0)
    assert ref.change == pytest.approx(-0.03, abs=1e-12) and ref.low < 0 < ref.high
    assert info["kept"] == "dp" and info["against"] == "logsnr" and info["interval"] == ref.to_dict()
    assert keep_best_decision(errors, "lowest")["kept"] == "logsnr"
    clear = dp * 0.85**2 * np.exp(rng.normal(0.0, 0.02, 256))
    info = keep_best_decision({"dp": dp, "edm": worse, "logsnr": noisy, "kl-optimal": clear}, "significant")
    assert info["kept"] == "kl-optimal" and info["interval"]["high"] < 0
    # A better DP grid is never replaced; a non-finite DP grid always is.
    assert keep_best_decision({"dp": dp, "edm": worse}, "significant")["kept"] == "dp"
    assert keep_best_decision({"dp": dp * np.inf, "edm": worse}, "significant")["kept"] == "edm"
    with pytest.raises(ValueError, match="rule"):
        keep_best_decision(errors, "off")


def test_keep_best_options(gmm: GaussianMixture) -> None:
    """true/false keep their meaning (the rule before / none) and are recorded by name; a bad rule is
    one clear error; check_trajectories scores on K separate trajectories (seeds after the DP's)."""
    assert GITSConfig(keep_best=True).keep_best == "lowest" and GITSConfig(keep_best=False).keep_best == "off"
    assert resolve_config(GITSConfig, None, ["keep_best=true"]).keep_best == "lowest"
    assert resolve_config(OSSConfig, None, ["keep_best=significant"]).keep_best == "significant"
    with pytest.raises((ConfigError, ValueError), match="keep_best"):
        resolve_config(GITSConfig, None, ["keep_best=sometimes"])
    with pytest.raises((ConfigError, ValueError), match="check_trajectories"):
        resolve_config(GITSConfig, None, ["check_trajectories=-1"])
    ident = get_solver("euler").identity()
    cfg = GITSConfig(**SMALL, keep_best="lowest", check_trajectories=6)
    s = optimize("gits", gmm, ident, 3, cfg)
    rep = s.method.config["report"]
    kb = rep["keep_best"]
    assert kb["trajectories"] == 6 and kb["seeds"] == f"{cfg.data_seed + 4}..+5"
    assert rep["network_evals"]["check_teacher"] == 0  # the exact ODE
    cand = candidate_grid(gmm, cfg, 3)
    check, _ = teacher_trajectories(gmm, cand, DPConfig(**{**SMALL, "trajectories": 6}, data_seed=cfg.data_seed + 4))
    assert final_error(ident, gmm, check, s.sigmas) ** 0.5 == pytest.approx(min(kb["rmse_on_trajectories"].values()))


def test_too_few_candidates_is_an_error(gmm: GaussianMixture) -> None:
    from stepopt.errors import StepoptError

    with pytest.raises(StepoptError, match="candidates"):
        optimize("oss", gmm, get_solver("euler").identity(), 8, OSSConfig(candidates=4, trajectories=2))


def test_oss_refuses_a_solver_that_skips_grid_points(gmm: GaussianMixture) -> None:
    from stepopt.errors import StepoptError

    with pytest.raises(StepoptError, match="jumps over grid points"):
        optimize("oss", gmm, get_solver("pfdiff-euler").identity(), 3, OSSConfig(**SMALL))


def test_gits_with_pfdiff(gmm: GaussianMixture) -> None:
    ident = get_solver("pfdiff-euler").identity()
    s = optimize("gits", gmm, ident, 3, GITSConfig(candidates=9, trajectories=4, check_trajectories=64))
    assert len(s.sigmas) == 6  # NFE 3 with K = 1: 2 * 3 - 1 = 5 steps


def test_dp_teacher_is_the_teacher_section_with_old_flat_keys() -> None:
    """gits/oss nest the one TeacherConfig (default: 4 Heun steps uniform in lam per interval);
    ``--set teacher.steps`` keeps the section's other defaults; old files' flat keys still read."""
    assert DPConfig().teacher == TeacherConfig(solver="heun", steps=4, grid="logsnr")
    assert resolve_config(GITSConfig, None, ["teacher.steps=8"]).teacher == TeacherConfig(steps=8, grid="logsnr")
    old = resolve_config(OSSConfig, None, ["teacher_solver=euler", "teacher_substeps=6", "teacher_order=1"])
    assert old.teacher == TeacherConfig(solver="euler", order=1, steps=6, grid="logsnr")
    assert config_to_dict(GITSConfig())["teacher"] == TeacherConfig(steps=4, grid="logsnr").to_dict()
    with pytest.raises(ConfigError, match="teacher steps must be >= 1"):
        resolve_config(GITSConfig, None, ["teacher.steps=0"])


def test_teacher_trajectories_log_only_what_they_compute(tmp_path: Path) -> None:
    """A first run on a network says how many trajectories it computes (minutes on unet-digits) and
    reports each quarter; once they are cached it says nothing."""
    from stepopt.cache import TeacherCache

    net = GaussianNet()
    cfg = GITSConfig(candidates=5, trajectories=4, batch_size=1, teacher=TeacherConfig(solver="heun", steps=2))
    cand = candidate_grid(net, cfg, 3)
    store = TeacherCache(tmp_path)
    first: list[str] = []
    traj, _ = teacher_trajectories(net, cand, cfg, cache=store, log=first.append)
    assert first[0] == (
        "computing the teacher trajectories of 4 of the 4 seeds 3000000..3000003 (6 candidates, 20 evaluations "
        "each; cached per seed, so once per model)"
    )
    assert [m.split(" after ")[0] for m in first[1:]] == [f"teacher trajectories: {k}/4" for k in (1, 2, 3, 4)]
    again: list[str] = []
    cached, _ = teacher_trajectories(net, cand, cfg, cache=store, log=again.append)
    assert again == [] and torch.equal(cached, traj)


def test_dp_network_teacher_runs_the_configured_solver_between_candidates() -> None:
    """For a network the trajectory's state at c_j is ``teacher.steps`` steps of ``teacher.solver``
    on a ``teacher.grid`` grid of [c_{j-1}, c_j] from the state at c_{j-1}; more steps approach
    the exact ODE (closed form for the Gaussian)."""
    net = GaussianNet()
    cfg = GITSConfig(candidates=5, trajectories=3, teacher=TeacherConfig(solver="heun", steps=2, grid="edm"))
    cand = candidate_grid(net, cfg, 3)
    traj, info = teacher_trajectories(net, cand, cfg, cache=False)
    heun = get_solver("heun").identity()
    x = traj[:, 0]
    for j in range(1, len(cand)):
        sub = baseline_sigmas("edm", 2, float(cand[j - 1]), float(cand[j]), net.frame)
        x = solve(heun, net, x, torch.as_tensor(sub))
        assert torch.equal(traj[:, j], x)
    assert info["network_evals"] == 3 * 5 * get_solver("heun").nfe(heun, 2)
    assert info["teacher"]["substeps_per_interval"] == 2 and info["teacher"]["grid"] == "edm"
    exact = net.inner.ode_solution(traj[:, 0], float(cand[0]), float(cand[-1]))
    fine, _ = teacher_trajectories(net, cand, GITSConfig(candidates=5, trajectories=3), cache=False)
    finer = GITSConfig(candidates=5, trajectories=3, teacher=TeacherConfig(steps=16, grid="logsnr"))
    err4 = float((fine[:, -1] - exact).abs().max())
    err16 = float((teacher_trajectories(net, cand, finer, cache=False)[0][:, -1] - exact).abs().max())
    assert err16 < err4 / 8  # Heun is second order: 4x the steps, about 16x less error
