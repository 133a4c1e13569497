"""Stratified teacher noises (:mod:`stepopt.strata`) and weighted grid validation.

The sampling must be unbiased (the weighted mean over the chosen seeds estimates the pool's mean of
any per-seed value), the screen must rank noises by their real error (checked against the exact ODE
of gmm-digits), and a weight must mean exactly what repeating a seed means, in the validator's RMSE
and in the teacher refinement's objective.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from stepopt.baselines import baseline_sigmas
from stepopt.cli import app
from stepopt.frames import Flow
from stepopt.optimizers import optimize
from stepopt.optimizers.trust_region import TrustRegionConfig
from stepopt.optimizers.trust_region.refine import refine_grid
from stepopt.solvers import get_solver
from stepopt.strata import screen_errors, stratified_seeds, stratify, subdivided, tail_count
from stepopt.teacher import GridValidator

DPM3 = get_solver("dpmpp-3m").identity()
EULER = get_solver("euler").identity()


def test_subdivided_splits_every_step_evenly_in_lam_and_keeps_the_nodes() -> None:
    sig = [80.0, 10.0, 1.0, 0.002]
    fine = subdivided(sig, 4, frame=None)
    assert len(fine) == 13 and fine[::4] == sig
    lam = -np.log(fine)
    for i in range(3):
        step = np.diff(lam[4 * i : 4 * i + 5])
        assert np.allclose(step, step[0], rtol=1e-12)


def test_subdivided_splits_a_step_from_pure_noise_in_native_time() -> None:
    frame = Flow()
    sig = [math.inf, 1.0, 0.1]
    fine = subdivided(sig, 4, frame)
    assert fine[0] == math.inf and fine[4] == 1.0 and fine[8] == 0.1
    t = frame.time(np.asarray(fine[:5]))
    assert np.allclose(np.diff(t), -0.125, rtol=1e-12)  # t from 1 to 0.5 in four equal steps


def test_stratify_takes_the_tail_whole_and_is_unbiased_for_the_pool_mean() -> None:
    rng = np.random.default_rng(0)
    proxy = rng.lognormal(0.0, 2.0, size=400)  # heavy-tailed, like a few-step error
    f = proxy * rng.uniform(0.5, 1.5, size=400)  # a per-seed value the proxy only ranks roughly
    idx, w = stratify(proxy, 40, 0.5, rng_seed=1)
    assert len(set(idx.tolist())) == 40 and w.mean() == pytest.approx(1.0)
    assert set(idx[:20].tolist()) == set(np.argsort(-proxy)[:20].tolist())
    assert np.allclose(w[20:] / w[0], 380 / 20)  # each sampled seed stands for 19 of the rest
    # Unbiased: the average over sampling seeds of the weighted mean is the pool mean; the standard
    # error of that average decides the tolerance (4 of them cannot fail by chance in practice).
    est = np.array([np.mean(w * f[i]) for i, w in (stratify(proxy, 40, 0.5, s) for s in range(2000))])
    assert abs(est.mean() - f.mean()) < 4 * est.std() / math.sqrt(len(est))
    # And the tail stratum lowers the spread against a uniform sample of the same size.
    uni = np.array([np.mean(f[i]) for i, _ in (stratify(proxy, 40, 0.0, s) for s in range(2000))])
    assert est.std() < 0.5 * uni.std(), (est.std(), uni.std())


def test_stratify_always_samples_the_rest_and_refuses_bad_sizes() -> None:
    assert tail_count(8, 0.99) == 7 and tail_count(8, 0.5) == 4 and tail_count(8, 0.0) == 0
    with pytest.raises(ValueError, match="1 <= n < pool"):
        stratify(np.ones(10), 10, 0.5, 0)
    with pytest.raises(ValueError, match=r"tail must be in \[0, 1\)"):
        stratify(np.ones(10), 4, 1.0, 0)


def test_the_screen_ranks_noises_by_their_exact_error(gmm) -> None:
    """On gmm-digits the screen (the grid against itself with each step split in 4) tracks the error
    against the exact ODE: log-correlation above 0.95 over 128 seeds (measured 0.99 with dpmpp-3m at
    NFE 10 on 1024 seeds), and its worst quarter holds nearly all the exact squared error that the
    truly worst quarter holds."""
    sig = baseline_sigmas("time-quadratic", 10, gmm.sigma_max, gmm.sigma_min, gmm.frame)
    seeds = range(10_000, 10_128)
    proxy, evals = screen_errors(gmm, DPM3, sig, seeds)
    assert evals == 128 * (10 + 40)
    true = GridValidator(gmm, DPM3, seeds).squared_errors(sig)
    assert np.corrcoef(np.log(proxy), np.log(true))[0, 1] > 0.95
    share = true[np.argsort(-proxy)[:32]].sum() / np.sort(true)[-32:].sum()
    assert share > 0.9, share


def test_a_weight_means_what_repeating_the_seed_means(gmm) -> None:
    """Weights [1, 3, 1] on seeds [a, b, c] score and refine exactly as seeds [a, b, b, b, c] unweighted."""
    sig = baseline_sigmas("time-uniform", 6, gmm.sigma_max, gmm.sigma_min, gmm.frame)
    weighted = GridValidator(gmm, DPM3, [10_000, 10_001, 10_002], weights=[1.0, 3.0, 1.0])
    repeated = GridValidator(gmm, DPM3, [10_000, 10_001, 10_001, 10_001, 10_002])
    assert weighted.rmse(sig) == pytest.approx(repeated.rmse(sig), rel=1e-12)
    assert weighted.rmse(sig) != pytest.approx(GridValidator(gmm, DPM3, [10_000, 10_001, 10_002]).rmse(sig))
    lam0 = -np.log(np.asarray(sig))
    lam_w, rep_w = refine_grid(weighted, lam0, 10)
    lam_r, rep_r = refine_grid(repeated, lam0, 10)
    assert rep_w["accepted"] and rep_w["rmse"] == pytest.approx(rep_r["rmse"], rel=1e-9)
    assert np.allclose(lam_w, lam_r, rtol=0, atol=1e-8)
    sub = weighted.subset(1, 3)
    assert sub.weights is not None and np.allclose(sub.weights, [1.5, 0.5])
    with pytest.raises(ValueError, match="2 values for 3 seeds"):
        GridValidator(gmm, DPM3, [10_000, 10_001, 10_002], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        GridValidator(gmm, DPM3, [10_000, 10_001], weights=[1.0, 0.0])


def test_stratified_seeds_draws_from_the_pool_and_reports_the_screen(gmm) -> None:
    sig = baseline_sigmas("time-quadratic", 6, gmm.sigma_max, gmm.sigma_min, gmm.frame)
    st = stratified_seeds(gmm, EULER, sig, range(20_000, 20_064), 16, tail=0.25, rng_seed=3)
    assert len(st.seeds) == len(set(st.seeds)) == 16 and all(20_000 <= s < 20_064 for s in st.seeds)
    assert st.report["tail"] == 4 and st.report["sample"] == 12 and st.report["evals"] == 64 * 5 * 6
    assert np.all(st.proxy[:4] >= st.report["tail_threshold"]) and np.all(st.proxy[4:] <= st.report["tail_threshold"])
    assert st.weights[4] / st.weights[0] == pytest.approx(60 / 12)
    again = stratified_seeds(gmm, EULER, sig, range(20_000, 20_064), 16, tail=0.25, rng_seed=3)
    assert again.seeds == st.seeds  # deterministic


def test_teacher_refine_on_stratified_noises_reports_them_and_lowers_the_pool_estimate(gmm) -> None:
    cfg = TrustRegionConfig(teacher_refine=True, teacher_refine_iters=15, select_n=16, refine_pool=128)
    sched = optimize("trust-region", gmm, DPM3, 6, cfg)
    rep = sched.method.config["report"]["teacher_refine"]
    st = rep["strata"]
    assert st["pool"] == [10_000, 10_127] and st["tail"] == 8 and st["sample"] == 8
    assert st["proxy_log_correlation"] > 0.9
    assert rep["accepted"] and rep["rmse"] < rep["rmse_start"]
    assert np.all(np.diff(sched.sigmas) < 0) and sched.sigmas[-1] == gmm.sigma_min


def test_refine_pool_must_exceed_select_n() -> None:
    res = CliRunner().invoke(
        app,
        ["optimize", "--optimizer", "trust-region", "--set", "teacher_refine=true", "--set", "refine_pool=32"],
    )
    assert res.exit_code == 1 and "refine_pool must be 0 (off) or more than select_n (32)" in res.output
    assert "Traceback" not in res.output
