"""A free last node before ``final_step: denoise`` (issue 14): the bound's extension and the optimizers.

Where the numbers come from:
* The ``linear`` extension of the trust-region bound is, for euler, the paper's own bound on N+1
  steps whose last step goes to sigma_min (the denoise modelled as that first-order step): checked
  against that bound built independently (``ErrorBound`` without the extension, N+1 steps).
* Gradients: central differences of the same objective.
* Accuracy: the exact ODE of ``builtin:gmm-digits-flow`` (``GridValidator``, denoised endpoint at
  sigma_min) on seeds 0..199, which no optimizer sees; the margins are the measured ones (README).
* NFE: a denoiser that counts its rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from stepopt.build import baseline_schedule
from stepopt.models import load_model
from stepopt.optimizers import optimize
from stepopt.optimizers.dp import (
    DPConfig,
    MemoDenoiser,
    candidate_grid,
    denoised_target,
    final_error,
    gits_dp_denoise,
    gits_objective,
    oss_dp,
    teacher_trajectories,
)
from stepopt.optimizers.gits import GITSConfig
from stepopt.optimizers.oss import OSSConfig
from stepopt.optimizers.trust_region import TrustRegionConfig
from stepopt.optimizers.trust_region.bound import ErrorBound, FinalDenoise, from_noise_weights, lagrange_weights
from stepopt.sampling import initial_noise
from stepopt.solvers import get_solver, solve
from stepopt.teacher import GridValidator

LAM_END = -math.log(0.002)


def _bounds(name: str, n: int, start: float, fd: FinalDenoise | None) -> ErrorBound:
    ident = get_solver(name).identity()
    noise = math.isinf(start)
    wf = from_noise_weights(lagrange_weights, False) if noise else lagrange_weights
    return ErrorBound(
        ident,
        n,
        start,
        LAM_END,
        2.5,
        max(n - 2, 0),
        wf,
        "velocity" if noise else "noise",
        3.0 if noise else 1.0,
        -8.0 if noise else -math.inf,
        fd,
    )


@pytest.mark.parametrize("start", [-math.inf, -math.log(80.0)])
def test_linear_extension_is_the_papers_bound_with_a_last_euler_step_to_sigma_min(start: float) -> None:
    free = _bounds("euler", 4, start, FinalDenoise(carry="linear", lam_end=LAM_END))
    pinned = _bounds("euler", 5, start, None)  # five euler steps, the last one to sigma_min
    lam = np.array([start, -1.2, 0.4, 1.7, 3.1])
    assert free.value(free.variables(lam)) == pytest.approx(pinned.value(lam[1:]), rel=1e-12)
    assert free.variables(lam).shape == (4,) and np.array_equal(free.full(free.variables(lam)), lam)
    # lam_N above lam_end (sigma below sigma_min) is outside the domain.
    assert free.value(np.array([-1.2, 0.4, 1.7, LAM_END + 0.1])) == math.inf


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m", "dpmpp-3m", "unipc"])
@pytest.mark.parametrize("start", [-math.inf, -math.log(80.0)])
@pytest.mark.parametrize("fd", [FinalDenoise(carry="linear", lam_end=LAM_END), FinalDenoise(0.5, "data")])
def test_free_end_gradient_matches_central_differences(name: str, start: float, fd: FinalDenoise) -> None:
    bound = _bounds(name, 5, start, fd)
    x = np.array([-0.5, 0.7, 1.9, 3.0, 4.1])
    h = 1e-6
    for mu in (0.0, 1e-4):
        num = np.array([(bound.value(x + h * e, mu) - bound.value(x - h * e, mu)) / (2 * h) for e in np.eye(5)])
        np.testing.assert_allclose(bound.gradient(x, mu), num, rtol=1e-5, atol=1e-7 * np.abs(num).max())


@pytest.fixture(scope="module")
def flow() -> object:
    return load_model("builtin:gmm-digits-flow")


@pytest.fixture(scope="module")
def exact_flow(flow: object) -> GridValidator:
    return GridValidator(flow, None, range(200), final_step="denoise", cache=False)  # type: ignore[arg-type]


class Counting:
    def __init__(self, model: object) -> None:
        self.model, self.rows = model, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: object) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x, sigma, **cond)  # type: ignore[operator]


# Measured on seeds 0..199 (README flow table): trust-region / flow-default RMSE.
FLOW_CELLS = [("euler", 5), ("euler", 8), ("euler", 10), ("dpmpp-2m", 5), ("dpmpp-2m", 8), ("dpmpp-2m", 10)]


@pytest.mark.parametrize(("solver", "nfe"), FLOW_CELLS)
def test_trust_region_frees_the_last_node_and_beats_the_flow_default(
    flow: object, exact_flow: GridValidator, solver: str, nfe: int
) -> None:
    """Pinned at sigma_min the final denoise is wasted and trust-region lost to the pipeline default at
    euler 5 and dpmpp-2m 5 / 8; free, it beats it in every cell (ratios 0.80-0.94 measured)."""
    ident = get_solver(solver).identity()
    s = optimize("trust-region", flow, ident, nfe, final_step="denoise")  # type: ignore[arg-type]
    assert s.nfe == nfe and s.final_step == "denoise" and s.sigmas[-1] > 10 * flow.sigma_min  # type: ignore[attr-defined]
    assert s.method.config["report"]["last_node"] == "free"
    counter = Counting(flow)
    x = initial_noise(flow, [0, 1], sigma=math.inf)  # type: ignore[arg-type]
    solve(ident, counter, x, torch.as_tensor(s.sigmas), final_step="denoise")
    assert counter.rows == 2 * nfe  # NFE exact: N multistep evaluations + the denoise
    scorer = exact_flow.with_solver(ident)
    n = get_solver(solver).steps_for_nfe(ident, nfe, "denoise")
    default = scorer.rmse(baseline_schedule("flow-default", flow, ident, n, final_step="denoise").sigmas)  # type: ignore[arg-type]
    free = scorer.rmse(s.sigmas)
    assert free < 0.96 * default
    pinned = optimize(  # the same bound with the node pinned again: the evaluation is wasted
        "trust-region",
        flow,  # type: ignore[arg-type]
        ident,
        nfe,
        TrustRegionConfig(last_node="sigma_min"),
        final_step="denoise",
    )
    assert pinned.sigmas[-1] == flow.sigma_min and free < scorer.rmse(pinned.sigmas)  # type: ignore[attr-defined]


def test_last_node_only_moves_with_a_final_denoise() -> None:
    """Without final_step denoise nothing changes; on a model that does not start from pure noise
    ``auto`` keeps sigma_min (measured: README) and ``free`` frees it."""
    gmm = load_model("builtin:gmm-digits")
    ident = get_solver("dpmpp-2m").identity()
    plain = optimize("trust-region", gmm, ident, 6)
    for last in ("free", "sigma_min"):
        assert optimize("trust-region", gmm, ident, 6, TrustRegionConfig(last_node=last)).sigmas == plain.sigmas
    auto = optimize("trust-region", gmm, ident, 6, final_step="denoise")
    assert auto.sigmas[-1] == gmm.sigma_min and auto.method.config["report"]["last_node"] == "sigma_min"
    free = optimize("trust-region", gmm, ident, 6, TrustRegionConfig(last_node="free"), final_step="denoise")
    assert free.sigmas[-1] > gmm.sigma_min and free.nfe == 6


# -- gits / oss: the final transition is the denoise from the chosen candidate -----------------------
def _free_paths(m: int, n: int) -> list[list[int]]:
    """Every N-step path 0 = p_0 < ... < p_N <= M (the denoise follows p_N)."""
    return [[0, *rest] for rest in itertools.combinations(range(1, m + 1), n)]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gits_dp_with_a_final_denoise_is_the_exhaustive_optimum(n: int) -> None:
    rng = np.random.default_rng(n)
    m, coeff = 8, 1.15
    cost = np.triu(rng.uniform(0.1, 2.0, (m + 1, m + 1)), 1)
    cost[cost == 0] = np.inf
    den = np.concatenate([[np.inf], rng.uniform(0.0, 2.0, m)])

    def total(p: list[int]) -> float:
        return gits_objective(cost, p, coeff) + coeff ** len(p[1:]) * den[p[-1]]

    path, value = gits_dp_denoise(cost, den, n, coeff)
    best = min(_free_paths(m, n), key=total)
    assert path == best and value == pytest.approx(total(best), rel=1e-12)


@pytest.mark.parametrize("solver", ["euler", "dpmpp-2m"])
def test_oss_with_a_final_denoise_against_exhaustive_search(flow: object, solver: str) -> None:
    """With a beam as wide as the paths, OSS's free-end result is the exhaustive optimum of the denoised
    error over every N-step path ending anywhere; its value is its path's real error; beam 2 is never
    worse than the pinned path (which ends at c_M) on the same trajectories."""
    cfg = DPConfig(candidates=8, trajectories=6)
    n = 3
    cand = candidate_grid(flow, cfg, n)  # type: ignore[arg-type]
    traj, _ = teacher_trajectories(flow, cand, cfg, cache=False)  # type: ignore[arg-type]
    ident = get_solver(solver).identity()
    memo = MemoDenoiser(flow)  # type: ignore[arg-type]
    y = denoised_target(memo, traj, cand, None)
    paths = _free_paths(len(cand) - 1, n)
    errors = {tuple(p): final_error(ident, memo, traj, [cand[q] for q in p], None, y) for p in paths}
    wide = oss_dp(ident, memo, traj, cand, n, beam=len(paths), target=y)
    assert wide.value == pytest.approx(min(errors.values()), rel=1e-12)
    assert wide.value == pytest.approx(errors[tuple(wide.path)], rel=1e-12)
    assert wide.path[-1] < len(cand) - 1  # the best path does not end at sigma_min
    pinned = oss_dp(ident, memo, traj, cand, n, beam=2)
    free = oss_dp(ident, memo, traj, cand, n, beam=2, target=y)
    assert free.value <= errors[tuple(pinned.path)] + 1e-15


@pytest.mark.parametrize("name", ["gits", "oss"])
def test_dp_optimizers_free_the_last_node(flow: object, exact_flow: GridValidator, name: str) -> None:
    """Default options: the last node is a candidate above sigma_min, NFE exact, never worse than
    flow-default on keep_best's check trajectories (keep_best compares with it; 128 fresh ones here, the
    default's 1024 exact-ODE flow trajectories cost 40 s)."""
    ident = get_solver("dpmpp-2m").identity()
    cfg = (GITSConfig if name == "gits" else OSSConfig)(candidates=24, trajectories=32, check_trajectories=128)
    s = optimize(name, flow, ident, 5, cfg, final_step="denoise")  # type: ignore[arg-type]
    rep = s.method.config["report"]
    assert rep["last_node"] == "free" and s.nfe == 5 and s.sigmas[-1] > flow.sigma_min  # type: ignore[attr-defined]
    kb = rep["keep_best"]
    scores = kb["rmse_on_trajectories"]
    assert "flow-default" in scores and scores[kb["kept"]] <= scores["flow-default"] and kb["trajectories"] == 128
    pinned = optimize(name, flow, ident, 5, replace(cfg, last_node="sigma_min"), final_step="denoise")  # type: ignore[arg-type]
    assert pinned.sigmas[-1] == flow.sigma_min  # type: ignore[attr-defined]


def test_ld3_learns_the_last_node(flow: object) -> None:
    """LD3 with a final denoise: theta has N+2 logits (the skipped gap), the start is the best of the
    baselines, their N+1-step grids without the last point and flow-default; the learned last node is
    not sigma_min; NFE exact."""
    from stepopt.optimizers.ld3 import Ld3Config

    cfg = Ld3Config(n_train=4, n_valid=8, grid_rounds=1, joint_rounds=0, keep_best="off")
    s = optimize("ld3", flow, get_solver("euler").identity(), 5, cfg, final_step="denoise")  # type: ignore[arg-type]
    rep = s.method.config["report"]
    assert rep["last_node"] == "free" and s.nfe == 5 and s.sigmas[-1] > 10 * flow.sigma_min  # type: ignore[attr-defined]
    assert "flow-default" in rep["starts"] and "kl-optimal (N+1 steps, last dropped)" in rep["starts"]
    assert s.method.objective["final"] <= min(rep["starts"].values())
