"""LD3's keep_best: the learned grid against its start and the baseline starts on separate check pairs.

Where the numbers come from: every candidate's per-pair distance is recomputed here from the exact ODE
teacher of gmm-digits (``teacher_outputs`` on the check seeds ``data_seed + n_train + n_valid + i``)
and the solver run on the candidate grid (``solve``), and the decision from those numbers by the rule's
definition (the lowest mean; for ``significant`` :func:`stepopt.stats.paired_bootstrap`). A run with
``max_iterations: 0`` and ``--init`` a poor grid (logsnr: about twice the error of the best baseline at
dpmpp-3m NFE 4 on gmm-digits) makes the learned grid that start, so a working keep_best must replace it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from stepopt.build import baseline_schedule
from stepopt.config import resolve_config
from stepopt.models import DiffusionModel
from stepopt.optimizers import optimize
from stepopt.optimizers.dp import keep_best_decision
from stepopt.optimizers.ld3 import Ld3Config
from stepopt.optimizers.ld3.config import BASELINE_STARTS, RESUMABLE_CHANGES
from stepopt.optimizers.ld3.losses import l2_distance
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver, solve
from stepopt.stats import paired_bootstrap
from stepopt.teacher import teacher_outputs

DPM3 = get_solver("dpmpp-3m").identity()
SMALL = {"n_train": 8, "n_valid": 8, "grid_rounds": 1, "joint_rounds": 1, "check_pairs": 16}
CHECK_SEEDS = [2_000_000 + 16 + i for i in range(16)]


def run_ld3(model: DiffusionModel, **kw: Any) -> Schedule:
    opts = {**SMALL, **{k: v for k, v in kw.items() if k in Ld3Config.__dataclass_fields__}}
    rest = {k: v for k, v in kw.items() if k not in Ld3Config.__dataclass_fields__}
    return optimize("ld3", model, DPM3, 4, Ld3Config(**opts), **rest)


def losses(model: DiffusionModel, seeds: list[int], sigmas: Any, model_sigmas: Any = None) -> np.ndarray:
    """Per-pair mean squared difference to the exact ODE's endpoint, recomputed from scratch."""
    x, y = teacher_outputs(model, seeds)
    grid = torch.as_tensor(sigmas, dtype=torch.float64)
    msig = None if model_sigmas is None else torch.as_tensor(model_sigmas, dtype=torch.float64)
    out = solve(DPM3, model, x, grid, model_sigmas=msig)
    return l2_distance(out, y).double().numpy()


@pytest.fixture(scope="module")
def poor_start(gmm: DiffusionModel) -> Schedule:
    return baseline_schedule("logsnr", gmm, DPM3, 4)


def test_lowest_replaces_a_worse_learned_grid_by_the_best_candidate(gmm: DiffusionModel, poor_start: Schedule) -> None:
    s = run_ld3(gmm, max_iterations=0, init_schedule=poor_start)
    kb = s.method.config["report"]["keep_best"]
    assert kb["rule"] == "lowest" and kb["pairs"] == 16 and kb["seeds"] == "2000016..2000031"
    # the candidates: the learned grid, its start (an --init schedule) and every baseline start
    assert set(kb["loss_on_pairs"]) == {"ld3", "start (schedule (logsnr))", *BASELINE_STARTS}
    # each candidate's loss recomputed on the check seeds
    own = losses(gmm, CHECK_SEEDS, poor_start.sigmas)
    assert kb["loss_on_pairs"]["ld3"] == pytest.approx(float(own.mean()), rel=1e-9)
    base = {k: losses(gmm, CHECK_SEEDS, baseline_schedule(k, gmm, DPM3, 4).sigmas) for k in BASELINE_STARTS}
    for k, v in base.items():
        assert kb["loss_on_pairs"][k] == pytest.approx(float(v.mean()), rel=1e-9), k
    best = min(base, key=lambda k: float(base[k].mean()))
    assert float(base[best].mean()) < 0.7 * float(own.mean())  # the start is clearly worse
    assert kb["kept"] == best and kb["against"] == best
    np.testing.assert_allclose(s.sigmas, baseline_schedule(best, gmm, DPM3, 4).sigmas, rtol=1e-12)
    assert s.model_sigmas is None
    # the reported objective is the returned grid's validation loss (validation seeds 2000008..15)
    valid = losses(gmm, [2_000_008 + i for i in range(8)], s.sigmas)
    assert s.method.objective is not None
    assert s.method.objective["final"] == pytest.approx(float(valid.mean()), rel=1e-9)
    assert s.method.config["report"]["validation_rmse"] == pytest.approx(float(valid.mean()) ** 0.5, rel=1e-9)


def test_off_returns_the_learned_grid(gmm: DiffusionModel, poor_start: Schedule) -> None:
    s = run_ld3(gmm, max_iterations=0, init_schedule=poor_start, keep_best="off")
    assert "keep_best" not in s.method.config["report"]
    np.testing.assert_allclose(s.sigmas, poor_start.sigmas, rtol=1e-12)
    assert s.method.config["keep_best"] == "off"


def test_significant_follows_the_paired_bootstrap(gmm: DiffusionModel, poor_start: Schedule) -> None:
    s = run_ld3(gmm, max_iterations=0, init_schedule=poor_start, keep_best="significant")
    kb = s.method.config["report"]["keep_best"]
    own = losses(gmm, CHECK_SEEDS, poor_start.sigmas)
    other = losses(gmm, CHECK_SEEDS, baseline_schedule(kb["against"], gmm, DPM3, 4).sigmas)
    cmp = paired_bootstrap(other, own)
    assert kb["interval"]["low"] == pytest.approx(cmp.low) and kb["interval"]["high"] == pytest.approx(cmp.high)
    assert kb["kept"] == (kb["against"] if cmp.high < 0 else "ld3")
    assert kb["kept"] != "ld3"  # logsnr loses clearly, so even the cautious rule replaces it


def test_the_start_is_a_candidate_and_a_trained_grid_is_kept_when_it_is_best(gmm: DiffusionModel) -> None:
    """A start that is not a baseline (here trust-region, an --init schedule) is a candidate; a trained grid
    that beats every candidate on the check pairs is returned unchanged, as with keep_best off."""
    tr = optimize("trust-region", gmm, DPM3, 4)
    on = run_ld3(gmm, init_schedule=tr, seed=2)
    off = run_ld3(gmm, init_schedule=tr, seed=2, keep_best="off")
    kb = on.method.config["report"]["keep_best"]
    assert "start (schedule (trust-region))" in kb["loss_on_pairs"]
    learned = losses(gmm, CHECK_SEEDS, off.sigmas, off.model_sigmas)
    assert kb["loss_on_pairs"]["ld3"] == pytest.approx(float(learned.mean()), rel=1e-9)
    start = losses(gmm, CHECK_SEEDS, tr.sigmas)
    assert kb["loss_on_pairs"]["start (schedule (trust-region))"] == pytest.approx(float(start.mean()), rel=1e-6)
    if kb["kept"] == "ld3":
        assert on.sigmas == off.sigmas and on.model_sigmas == off.model_sigmas
    assert kb["kept"] == min(kb["loss_on_pairs"], key=lambda k: (kb["loss_on_pairs"][k], k != "ld3"))


def test_zero_check_pairs_decide_on_the_validation_pairs(gmm: DiffusionModel) -> None:
    s = run_ld3(gmm, check_pairs=0, seed=1)
    kb = s.method.config["report"]["keep_best"]
    assert kb["pairs"] == 8 and kb["seeds"].startswith("2000008..2000015")
    if kb["kept"] == "ld3":  # the validated best grid: its check loss is the validation objective
        assert s.method.objective is not None
        assert kb["loss_on_pairs"]["ld3"] == pytest.approx(s.method.objective["final"], rel=1e-9)


def test_decision_names_the_optimizer_grid() -> None:
    own = np.array([1.0, 1.0, 1.0, 1.0])
    assert keep_best_decision({"ld3": own, "edm": own * 0.5}, "lowest", own="ld3")["kept"] == "edm"
    assert keep_best_decision({"ld3": own, "edm": own * 2.0}, "lowest", own="ld3")["kept"] == "ld3"
    assert keep_best_decision({"ld3": own, "edm": own.copy()}, "lowest", own="ld3")["kept"] == "ld3"  # ties: ld3


def test_options_are_checked_and_act_after_training() -> None:
    assert Ld3Config(keep_best=True).keep_best == "lowest" and Ld3Config(keep_best=False).keep_best == "off"
    with pytest.raises(ValueError, match="keep_best"):
        Ld3Config(keep_best="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="check_pairs"):
        Ld3Config(check_pairs=-1)
    assert {"keep_best", "check_pairs"} <= set(RESUMABLE_CHANGES)  # a resumed run may change them
    assert resolve_config(Ld3Config, None, (), {"preset": "paper"}).keep_best == "off"  # not in the paper
    assert resolve_config(Ld3Config, None, (), {"preset": "paper-sd"}).keep_best == "off"
    assert any(line.startswith("keep_best: 'lowest'") for line in Ld3Config().departures(exact_teacher=True))
