"""GITS's cost variants (issue 18): the reference code's cost step and ``dev`` metric, and the local error
propagated to the output by the flow (``propagate: exact | linear``), each against an independent
computation, and the DP against exhaustive search on every new cost."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stepopt.config import resolve_config
from stepopt.errors import ConfigError, StepoptError
from stepopt.models import GaussianMixture
from stepopt.optimizers import optimize
from stepopt.optimizers.dp import (
    DPConfig,
    MemoDenoiser,
    candidate_grid,
    gits_costs,
    gits_dp,
    gits_objective,
    teacher_trajectories,
)
from stepopt.optimizers.dp_history import history_costs, history_dp, history_objective, teacher_denoised
from stepopt.optimizers.dp_propagate import FlowJacobians, Propagator
from stepopt.optimizers.gits import GITSConfig
from stepopt.solvers import get_solver, solve
from stepopt.teacher import TeacherConfig

SMALL = {"candidates": 7, "trajectories": 4}


def all_paths(m: int, n: int) -> list[list[int]]:
    return [[0, *inner, m] for inner in itertools.combinations(range(1, m), n - 1)]


@pytest.fixture(scope="module")
def setup(gmm: GaussianMixture) -> tuple[np.ndarray, torch.Tensor]:
    cfg = DPConfig(**SMALL)
    cand = candidate_grid(gmm, cfg, 3)
    traj, _ = teacher_trajectories(gmm, cand, cfg)
    return cand, traj


def _euler_jump(gmm: GaussianMixture, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The reference code's cost step, written out: x + (t_next - t_cur) (x - D(x, t_cur)) / t_cur."""
    den = gmm.denoise(x, torch.full((x.shape[0],), a, dtype=torch.float64))
    return x + (b - a) * (x - den) / a


def test_mixture_denoise_jacobian_is_the_autograd_jacobian(gmm: GaussianMixture) -> None:
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.7
    for sigma in (0.05, 0.5, 3.0):
        jac = gmm.denoise_jacobian(x, sigma)
        for b in range(3):

            def f(z: torch.Tensor, s: float = sigma) -> torch.Tensor:
                return gmm.denoise(z.reshape(1, 1, 8, 8), torch.tensor([s], dtype=torch.float64)).reshape(-1)

            ref = torch.autograd.functional.jacobian(f, x[b].reshape(-1))
            assert torch.allclose(jac[b], ref, rtol=0, atol=1e-11 * float(ref.abs().max()) + 1e-13)
    with pytest.raises(StepoptError, match="finite sigma"):
        gmm.denoise_jacobian(x, float("inf"))


def test_the_reference_euler_cost_is_the_multistep_solvers_first_step(
    gmm: GaussianMixture, setup: tuple[np.ndarray, torch.Tensor]
) -> None:
    """The reference code costs every target solver with an Euler jump; stepopt costs the target's own
    step started afresh. In the EDM frame DPM-Solver++'s (and UniPC's) first, first-order step is DDIM,
    which is Euler: the two costs agree to rounding for dpmpp-3m, dpmpp-2m and unipc; heun's differs."""
    cand, traj = setup
    memo = MemoDenoiser(gmm)
    m, p = len(cand) - 1, traj.shape[0]
    ref = np.full((m + 1, m + 1), np.inf)
    for i, j in itertools.combinations(range(m + 1), 2):
        jump = _euler_jump(gmm, traj[:, i], float(cand[i]), float(cand[j]))
        ref[i, j] = float(torch.linalg.vector_norm((jump - traj[:, j]).reshape(p, -1), dim=1).mean())
    upper = np.triu_indices(m + 1, 1)
    for name in ("euler", "dpmpp-3m", "dpmpp-2m", "unipc"):
        cost = gits_costs(get_solver(name).identity(), memo, traj, cand)
        assert cost[upper] == pytest.approx(ref[upper], rel=1e-10), name
    heun = gits_costs(get_solver("heun").identity(), memo, traj, cand)
    assert not np.allclose(heun[upper], ref[upper], rtol=1e-3)


def test_dev_metric_is_the_reference_deviation(gmm: GaussianMixture, setup: tuple[np.ndarray, torch.Tensor]) -> None:
    """metric=dev: mean over trajectories of dev(jump) - dev(X_j), dev the distance of a point from the
    straight line through the trajectory's start and end (recomputed here in numpy)."""
    cand, traj = setup
    m, p = len(cand) - 1, traj.shape[0]
    cost = gits_costs(get_solver("euler").identity(), MemoDenoiser(gmm), traj, cand, metric="dev")
    x = traj.reshape(p, m + 1, -1).numpy()

    def dev(y: np.ndarray) -> np.ndarray:
        out = []
        for q in range(p):
            line = x[q, -1] - x[q, 0]
            a = x[q, -1] - y[q]
            out.append(np.linalg.norm(a - (a @ line) / (line @ line) * line))
        return np.array(out)

    for i, j in [(0, 1), (0, m), (2, 5), (m - 1, m)]:
        jump = _euler_jump(gmm, traj[:, i], float(cand[i]), float(cand[j])).reshape(p, -1).numpy()
        assert cost[i, j] == pytest.approx(float((dev(jump) - dev(x[:, j])).mean()), rel=1e-9, abs=1e-12)
    assert np.isinf(cost[np.tril_indices(m + 1)]).all()
    with pytest.raises(StepoptError, match="metric"):
        gits_costs(get_solver("euler").identity(), MemoDenoiser(gmm), traj, cand, metric="l1")


def test_exact_propagation_is_a_direct_resolve(gmm: GaussianMixture, setup: tuple[np.ndarray, torch.Tensor]) -> None:
    """propagate=exact: C[i, j] = mean_p || Psi_{j->M}(jump_ij) - X_M ||, Psi the exact ODE; the batched
    computation (all i of one j together) equals a re-solve of each pair on its own."""
    cand, traj = setup
    m, p = len(cand) - 1, traj.shape[0]
    prop = Propagator("exact", gmm, traj, cand, teacher=TeacherConfig())
    cost = gits_costs(get_solver("euler").identity(), MemoDenoiser(gmm), traj, cand, score=prop)
    for i, j in itertools.combinations(range(m + 1), 2):
        jump = _euler_jump(gmm, traj[:, i], float(cand[i]), float(cand[j]))
        end = gmm.ode_solution(jump, float(cand[j]), float(cand[m])) if j < m else jump
        direct = float(torch.linalg.vector_norm((end - traj[:, m]).reshape(p, -1), dim=1).mean())
        assert cost[i, j] == pytest.approx(direct, rel=1e-7), (i, j)
    assert prop.evals == 0  # the exact ODE of an analytic model is no network evaluation


def test_linear_propagation_is_the_flow_jacobian(gmm: GaussianMixture, setup: tuple[np.ndarray, torch.Tensor]) -> None:
    """FlowJacobians' J_{t->M} (RK4 on the variational equation, chained over the candidate intervals)
    applied to a direction equals a central difference of the exact ODE solution; the linear cost agrees
    with the exact one where the local error is small (adjacent candidates on a fine grid)."""
    cand, traj = setup
    m, p = len(cand) - 1, traj.shape[0]
    jacs = FlowJacobians(gmm, traj, cand, substeps=64)  # 7 candidates: intervals of 1.5 in log sigma
    v = torch.randn(p, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in range(m, 0, -1):
        jac = jacs(t)
        if t in (m, m - 1, 3, 1):
            eps = 1e-5
            dx = (eps * v).reshape(traj[:, t].shape)
            fwd = gmm.ode_solution(traj[:, t] + dx, float(cand[t]), float(cand[m])) if t < m else traj[:, t] + dx
            bwd = gmm.ode_solution(traj[:, t] - dx, float(cand[t]), float(cand[m])) if t < m else traj[:, t] - dx
            fd = ((fwd - bwd) / (2 * eps)).reshape(p, -1)
            lin = torch.einsum("pab,pb->pa", jac, v)
            assert torch.allclose(lin, fd, rtol=0, atol=1e-5 * float(fd.abs().max())), t
    fine = DPConfig(candidates=24, trajectories=4)
    cf = candidate_grid(gmm, fine, 3)
    tf, _ = teacher_trajectories(gmm, cf, fine)
    euler, memo = get_solver("euler").identity(), MemoDenoiser(gmm)
    lin = gits_costs(euler, memo, tf, cf, score=Propagator("linear", gmm, tf, cf, teacher=TeacherConfig()))
    ex = gits_costs(euler, memo, tf, cf, score=Propagator("exact", gmm, tf, cf, teacher=TeacherConfig()))
    adjacent = (np.arange(24), np.arange(1, 25))
    ratio = lin[adjacent] / ex[adjacent]
    assert np.abs(ratio - 1).max() < 0.05 and abs(float(np.median(ratio)) - 1) < 0.01


@pytest.mark.parametrize("n", [2, 3, 4])
def test_dp_is_the_exhaustive_optimum_of_the_new_costs(
    gmm: GaussianMixture, setup: tuple[np.ndarray, torch.Tensor], n: int
) -> None:
    """The unchanged GITS DP on the propagated (exact, linear) and dev cost matrices returns the exhaustive
    minimum; the history DP with propagated tables too, and each of its table entries is the norm of the
    flow's Jacobian applied to the teacher-forced local error of the real solver's step."""
    cand, traj = setup
    m, p = len(cand) - 1, traj.shape[0]
    three, memo = get_solver("dpmpp-3m").identity(), MemoDenoiser(gmm)
    mats = {
        "exact": gits_costs(
            three, memo, traj, cand, score=Propagator("exact", gmm, traj, cand, teacher=TeacherConfig())
        ),
        "linear": gits_costs(
            three, memo, traj, cand, score=Propagator("linear", gmm, traj, cand, teacher=TeacherConfig())
        ),
        "dev": gits_costs(three, memo, traj, cand, metric="dev"),
    }
    for name, cost in mats.items():
        for coeff in (1.0, 1.15):
            path, value = gits_dp(cost, n, coeff)
            best = min(gits_objective(cost, q, coeff) for q in all_paths(m, n))
            assert value == pytest.approx(best, rel=1e-12, abs=1e-12), name
            assert gits_objective(cost, path, coeff) == pytest.approx(value, rel=1e-12, abs=1e-12), name
    den = teacher_denoised(gmm, traj, cand)
    jacs = FlowJacobians(gmm, traj, cand)
    stored = {t: jacs(t).clone() for t in range(m, 0, -1)}
    hist = history_costs(three, traj, den, cand, n, jacobians=FlowJacobians(gmm, traj, cand))
    path, value = history_dp(hist, m)
    objective = {tuple(q): history_objective(hist, q) for q in all_paths(m, n)}
    assert value == pytest.approx(min(objective.values()), rel=1e-12)
    node_of = {float(cand[i]): i for i in range(m + 1)}
    for q in all_paths(m, n):
        grid = [float(cand[i]) for i in q]
        states = [traj[:, 0]]
        solve(
            three,
            lambda x, sigma, **_: den[:, node_of[float(sigma[0])]],
            traj[:, 0],
            torch.tensor(grid, dtype=torch.float64),
            callback=lambda info, st=states: st.append(info["x"]),
        )
        for s in range(n):
            e0 = (states[s] - traj[:, q[s]]).reshape(p, -1)
            e1 = (states[s + 1] - traj[:, q[s + 1]]).reshape(p, -1)
            local = e1 - (grid[s + 1] / grid[s]) * e0
            want = float(torch.linalg.vector_norm(torch.einsum("pab,pb->pa", stored[q[s + 1]], local), dim=1).mean())
            assert hist.step_cost(s, q) == pytest.approx(want, rel=1e-8, abs=1e-12)


def test_gits_propagate_and_metric_options(gmm: GaussianMixture) -> None:
    """The options resolve, are recorded (report, departures, objective name) and bad values or
    combinations are one clear error."""
    three = get_solver("dpmpp-3m").identity()
    for opts in ({"propagate": "linear"}, {"propagate": "exact"}, {"metric": "dev"}):
        s = optimize("gits", gmm, three, 4, GITSConfig(**SMALL, keep_best=False, **opts))
        rep = s.method.config["report"]
        key, value = next(iter(opts.items()))
        assert rep[key] == value and s.method.config[key] == value
        assert any(d.startswith(f"{key}: {value}") for d in rep["departures"])
        assert len(s.sigmas) == 5
    hist = optimize("gits", gmm, three, 4, GITSConfig(**SMALL, keep_best=False, cost="history", propagate="linear"))
    assert hist.method.config["report"]["propagate"] == "linear"
    assert GITSConfig().propagate == "none" and GITSConfig().metric == "l2"
    with pytest.raises(ConfigError, match="propagate"):
        resolve_config(GITSConfig, None, ["propagate=quadratic"])
    with pytest.raises(ConfigError, match="metric"):
        resolve_config(GITSConfig, None, ["metric=l1"])
    with pytest.raises(ConfigError, match="history"):
        resolve_config(GITSConfig, None, ["cost=history", "propagate=exact"])
    with pytest.raises(ConfigError, match="metric"):
        resolve_config(GITSConfig, None, ["propagate=linear", "metric=dev"])
    with pytest.raises(StepoptError, match="last_node=sigma_min"):
        optimize("gits", gmm, three, 4, GITSConfig(**SMALL, propagate="linear"), final_step="denoise")
