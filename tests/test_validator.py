"""One teacher, one grid validator: trust-region select, AYS stopping, LD3 validation and eval agree.

Every place that scores a grid against the teacher goes through :class:`stepopt.teacher.GridValidator`;
these tests give each of them the same grid and the same seeds and require the same error, with and
without the final denoising jump (whose target, D(teacher, sigma_min), is built in one place).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stepopt.baselines import baseline_sigmas
from stepopt.build import baseline_schedule
from stepopt.config import config_to_dict, resolve_config
from stepopt.errors import ConfigError
from stepopt.evaluate import EvalConfig, evaluate
from stepopt.models import IsotropicGaussian
from stepopt.optimizers import OptimizeContext, optimize
from stepopt.optimizers.ays import AYSConfig, stop_validator
from stepopt.optimizers.ld3 import Ld3Config, Trainer, grid_space, params_from_sigmas
from stepopt.optimizers.trust_region import TrustRegionConfig, select_validator
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator, TeacherConfig

SEED, N = 500, 6
DPM2 = get_solver("dpmpp-2m").identity(2)


@pytest.fixture(scope="module")
def model() -> IsotropicGaussian:
    mu = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64).reshape(1, 4, 4)
    return IsotropicGaussian(mu, c=0.5)


@pytest.mark.parametrize("final_step", ["none", "denoise"])
def test_select_ays_ld3_and_eval_report_the_same_error(model, tmp_path: Path, final_step: str) -> None:
    n_steps = get_solver("dpmpp-2m").steps_for_nfe(DPM2, 5, final_step)
    grid = baseline_sigmas("logsnr", n_steps, model.sigma_max, model.sigma_min, model.frame)
    ctx = OptimizeContext(model=model, solver=DPM2, n_steps=n_steps, final_step=final_step)

    tr = select_validator(ctx, TrustRegionConfig(select_seed=SEED, select_n=N)).rmse(grid)
    ays = stop_validator(ctx, AYSConfig(val_seed=SEED, val_noises=N)).rmse(grid)
    # The grid itself (a free last node would move a start that ends at sigma_min: test_last_node.py).
    ld3_cfg = Ld3Config(data_seed=SEED - 3, n_train=3, n_valid=N, loss="l2", last_node="sigma_min")
    trainer = Trainer(ctx, ld3_cfg)
    trainer.load_pairs()
    theta, _ = params_from_sigmas(grid, grid_space(ld3_cfg, model))
    ld3_l2 = trainer.validate(theta, None)  # LD3's l2 loss: per-sample mean square, so rmse^2
    ld3_rmse = trainer.validator.rmse(grid)

    sched = baseline_schedule("logsnr", model, DPM2, n_steps, final_step=final_step)
    assert list(sched.sigmas) == [float(v) for v in grid]
    path = tmp_path / "s.yaml"
    sched.save(path)
    (row,) = evaluate([(str(path), sched)], "ode-error", model, EvalConfig(n=N, seed=SEED, cache=False))
    ev = row.metrics["ode-error"]["rmse"]

    assert tr > 0
    assert ays == tr and ld3_rmse == tr
    assert ev == pytest.approx(tr, rel=1e-12)
    assert math.sqrt(ld3_l2) == pytest.approx(tr, rel=1e-12)


def test_select_report_scores_the_baseline_with_the_validator(model) -> None:
    """The rmse trust-region --select reports for the logsnr baseline is the validator's."""
    cfg = {"select": True, "select_p": (2.5,), "select_tau": ("auto",), "select_seed": SEED, "select_n": N}
    s = optimize("trust-region", model, DPM2, 5, TrustRegionConfig(**cfg))
    cands = s.method.config["report"]["select"]["candidates"]
    base = next(c for c in cands if c["candidate"] == "logsnr baseline")
    ctx = OptimizeContext(model=model, solver=DPM2, n_steps=5)
    grid = baseline_sigmas("logsnr", 5, model.sigma_max, model.sigma_min, model.frame)
    grid[0], grid[-1] = model.sigma_max, model.sigma_min
    assert base["rmse"] == pytest.approx(select_validator(ctx, TrustRegionConfig(**cfg)).rmse(grid), rel=1e-12)


def test_validator_subset_and_counts(model) -> None:
    v = GridValidator(model, DPM2, range(10, 16), cache=False, batch_size=4)
    grid = baseline_sigmas("edm", 5, model.sigma_max, model.sigma_min, model.frame)
    full = v.outputs(grid)
    assert v.evals == 6 * 5  # dpmpp-2m: one evaluation per step and sample
    sub = v.subset(2, 5)
    assert sub.seeds == [12, 13, 14]
    assert torch.equal(sub.outputs(grid), full[2:5])
    assert v.errors(full)["rmse"] == pytest.approx(v.rmse(grid), rel=1e-12)


def test_teacher_config_nests_in_optimizer_configs(tmp_path: Path) -> None:
    assert resolve_config(AYSConfig, None, ["teacher.steps=20"]).teacher == TeacherConfig(steps=20)
    # files from before the nesting: flat teacher_* keys
    assert resolve_config(Ld3Config, None, ["teacher_steps=30", "teacher_grid=logsnr"]).teacher == TeacherConfig(
        steps=30, grid="logsnr"
    )
    f = tmp_path / "c.yaml"
    f.write_text("teacher: {solver: euler}\n", encoding="utf-8")
    got = resolve_config(TrustRegionConfig, f, ["teacher.steps=50"]).teacher
    assert got == TeacherConfig(solver="euler", steps=50)
    assert config_to_dict(AYSConfig())["teacher"] == TeacherConfig().to_dict()
    with pytest.raises(ConfigError, match=r"unknown option 'teacher.nope' for TeacherConfig"):
        resolve_config(AYSConfig, None, ["teacher.nope=1"])
    with pytest.raises(ConfigError, match="teacher steps must be >= 2"):
        resolve_config(Ld3Config, None, ["teacher.steps=1"])
