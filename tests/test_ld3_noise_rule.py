"""LD3's ``noise_lr_rule``: which relaxed noises decide whether the noise learning rate decays.

``accepted`` (stepopt's default): a training pair's relaxed noise was accepted during the round.
``reference`` (the LD3 reference trainer, github.com/vinhsuhi/LD3 trainer.py: after the training
pass each round relaxes the validation latents one SGD step each and halves the rate when none
moved): checked here step by step -- a zero rate moves nothing, a moved noise stays in the ball and
lowers its pair's loss, a run's rate halves exactly on the rounds that moved nothing -- and a run
with it resumes exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stepopt.models import DiffusionModel
from stepopt.optimizers import OptimizeContext, optimize
from stepopt.optimizers.ld3 import Ld3Config, Trainer
from stepopt.optimizers.ld3.trainer import run_key
from stepopt.solvers import get_solver

DPM3 = get_solver("dpmpp-3m").identity()
OPTS = {
    "n_train": 6,
    "n_valid": 6,
    "grid_rounds": 1,
    "joint_rounds": 2,
    "init": "uniform",
    "noise_lr_rule": "reference",
    "keep_best": "off",
}


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPOPT_CACHE_DIR", str(tmp_path_factory.mktemp("ld3-noise-cache")))
    yield
    mp.undo()


def _trainer(model: DiffusionModel, **kw: Any) -> Trainer:
    ctx = OptimizeContext(model=model, solver=DPM3, n_steps=4, seed=1)
    tr = Trainer(ctx, Ld3Config(**{**OPTS, **kw}))
    tr.load_pairs()
    return tr


def _losses(tr: Trainer, noise: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tr.distance(tr.student(noise, theta, None), tr.y_valid)


def test_the_reference_rule_moves_validation_noises_within_the_ball(gmm: DiffusionModel) -> None:
    tr = _trainer(gmm)
    st = tr.fresh_state(run_key(tr.ctx, tr.cfg))
    assert st.noise_valid is not None and torch.equal(st.noise_valid, tr.eps_valid)
    theta, xi = st.theta.clone(), st.xi.clone()
    st.lr_noise = 0.0  # a zero step moves nothing: the rate would decay
    assert tr.noise_moved(st, theta, xi) is False and torch.equal(st.noise_valid, tr.eps_valid)
    st.lr_noise = tr.lr_noise0
    before = _losses(tr, tr.eps_valid, theta)
    assert tr.noise_moved(st, theta, xi) is True
    moved = (st.noise_valid != tr.eps_valid).flatten(1).any(dim=1)
    assert bool(moved.any())
    dist = (st.noise_valid - tr.eps_valid).flatten(1).norm(dim=1)
    assert float(dist.max()) <= tr.radius * (1 + 1e-12)
    after = _losses(tr, st.noise_valid, theta)
    assert bool((after[moved] < before[moved]).all()) and torch.equal(after[~moved], before[~moved])
    # the training pairs' acceptance does not enter this rule
    st.accepted_in_round = True
    st.lr_noise = 0.0
    assert tr.noise_moved(st, theta, xi) is False


def test_the_accepted_rule_is_the_rounds_acceptance(gmm: DiffusionModel) -> None:
    tr = _trainer(gmm, noise_lr_rule="accepted")
    st = tr.fresh_state(run_key(tr.ctx, tr.cfg))
    assert st.noise_valid is None
    for flag in (False, True):
        st.accepted_in_round = flag
        assert tr.noise_moved(st, st.theta, st.xi) is flag


def test_a_run_decays_the_rate_on_rounds_without_a_move(gmm: DiffusionModel) -> None:
    rates: list[float] = []
    tr = _trainer(gmm)
    rule = tr.noise_moved

    def spy(st: Any, theta: torch.Tensor, xi: torch.Tensor) -> bool:
        moved = rule(st, theta, xi)
        rates.append(0.0 if moved else 1.0)
        return moved

    tr.noise_moved = spy  # type: ignore[method-assign]
    st = tr.fresh_state(run_key(tr.ctx, tr.cfg))
    tr.train(st, None)
    assert len(rates) == 3  # one decision per round
    assert st.lr_noise == pytest.approx(tr.lr_noise0 * 0.5 ** sum(rates), rel=1e-15)
    assert st.noise_valid is not None and not torch.equal(st.noise_valid, tr.eps_valid)


def test_reference_rule_resumes_exactly(gmm: DiffusionModel, tmp_path: Path) -> None:
    ref = optimize("ld3", gmm, DPM3, 4, Ld3Config(**OPTS), seed=1)
    state = tmp_path / "run.state"
    part = optimize("ld3", gmm, DPM3, 4, Ld3Config(**OPTS, max_iterations=7), seed=1, state_path=state)
    assert part.method.config["report"]["stop_reason"] == "max_iterations"
    out = optimize("ld3", gmm, DPM3, 4, Ld3Config(**OPTS), seed=1, state_path=state, resume=True)
    assert out.sigmas == ref.sigmas and out.model_sigmas == ref.model_sigmas
    assert out.method.config["report"]["lr_noise_final"] == ref.method.config["report"]["lr_noise_final"]
    assert ref.method.config["noise_lr_rule"] == "reference"
