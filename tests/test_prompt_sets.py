"""Several prompts in the optimizers that train or estimate on samples (ld3, ays) and on the command line.

The project's rule: the sample of seed ``s`` uses prompt ``s mod P`` (``cond_for_seeds``). LD3's
training pair i is the sample of seed ``data_seed + i``; AYS's KLUB pairs the data point of row j
(in the whole data set) with prompt ``j mod P``. The checks record the prompt index each network
row receives and compare it with the rule, computed here from the seeds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_latent import make_embedded_latent, make_tiny_sd
from stepopt.cli import app
from stepopt.models.guidance import ClassifierFreeGuidance
from stepopt.optimizers import OptimizeContext, optimize
from stepopt.optimizers.klub import Batcher, KLUBEstimator
from stepopt.optimizers.ld3 import Ld3Config, Trainer
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver
from stepopt.teacher import TeacherConfig

pytest.importorskip("diffusers")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers.*"),
]
HAS_CLIP = importlib.util.find_spec("transformers") is not None

EULER = get_solver("euler").identity()
TEACHER = TeacherConfig(solver="euler", steps=6)
P = 4
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPOPT_CACHE_DIR", str(tmp_path_factory.mktemp("prompt-cache")))
    yield
    mp.undo()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The prompt index of every row of every guided call, in call order."""
    calls: list[list[int]] = []
    real = ClassifierFreeGuidance._rows

    def rows(self: Any, cond: Any, batch: int, device: Any) -> torch.Tensor:
        out = real(self, cond, batch, device)
        calls.append(out.tolist())
        return out

    monkeypatch.setattr(ClassifierFreeGuidance, "_rows", rows)
    return calls


def test_ld3_trains_each_pair_with_its_own_prompt(spy: list[list[int]]) -> None:
    model = make_embedded_latent(n_prompts=P)
    cfg = Ld3Config(n_train=6, n_valid=5, valid_batch_size=8, teacher=TEACHER, data_seed=13, init="uniform")
    tr = Trainer(OptimizeContext(model=model, solver=EULER, n_steps=3), cfg)
    tr.load_pairs()
    st = tr.fresh_state({})
    theta, xi = st.theta.clone().requires_grad_(True), st.xi.clone().requires_grad_(True)
    opt_t, opt_x = torch.optim.RMSprop([theta], lr=0.005), torch.optim.SGD([xi], lr=0.01)
    spy.clear()
    idx = torch.tensor([4, 1])
    tr.step(st, idx, theta, xi, opt_t, opt_x, joint=True)
    want = [(13 + 4) % P, (13 + 1) % P]
    assert spy and all(rows == want for rows in spy), spy  # the training forward, backward and noise check
    spy.clear()
    tr.validate(theta.detach(), xi.detach())
    assert [r for rows in spy for r in rows][:5] == [(13 + 6 + j) % P for j in range(5)]
    # Its gradient reaches the grid through the time embedding too (the twin of the integer-timestep UNet).
    assert tr.model.time_gradient == "fractional-timestep"
    x = tr.model.sigma_max * tr.eps_train[:2]
    cond = tr.train_cond(torch.tensor([0, 1]))
    grads = []
    for sampling in (False, True):
        xi_g = torch.tensor([0.0, 0.03, -0.02, 0.0], dtype=torch.float64, requires_grad=True)
        out = tr.student_from(x, st.theta, xi_g, sampling=sampling, cond=cond)
        (g,) = torch.autograd.grad(tr.distance(out, tr.y_train[:2]).mean(), xi_g)
        grads.append(g)
    assert float((grads[0] - grads[1]).abs().max()) > 1e-3 * float(grads[0].abs().max()) > 0


def test_ld3_validation_loss_is_the_per_prompt_rmse() -> None:
    """LD3's validation (its objective) and the validator's RMSE (prompt seed mod P) agree: l2 is the MSE."""
    model = make_embedded_latent(n_prompts=P)
    cfg = Ld3Config(n_train=4, n_valid=4, grid_rounds=1, joint_rounds=0, teacher=TEACHER, init="uniform", check_pairs=4)
    s = optimize("ld3", model, EULER, 3, cfg)
    rep = s.method.config["report"]
    assert s.method.objective["final"] == pytest.approx(rep["validation_rmse"] ** 2, rel=1e-9)


def test_klub_rows_use_their_data_points_prompt(spy: list[list[int]]) -> None:
    model = make_embedded_latent(n_prompts=P)
    batcher = Batcher(model, batch_size=5, device=torch.device("cpu"))
    got: list[torch.Tensor] = []
    x = torch.zeros((7, *model.shape), dtype=torch.float64)
    rows = torch.tensor([0, 5, 6, 9, 2, 3, 11])
    batcher.add(x, torch.full((7,), 2.0, dtype=torch.float64), rows, got.append)
    batcher.flush()
    assert [r for call in spy for r in call] == (rows % P).tolist() and got[0].shape == x.shape
    # A data subset keeps each point's row in the whole data set.
    data = torch.randn((6, *model.shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    est = KLUBEstimator(model, data, rows=torch.tensor([7, 2, 9, 4, 0, 5]), seed=1)
    idx = torch.tensor([2, 0, 5])
    assert est._block(idx, 1)[4].tolist() == [9, 7, 5]


def test_ays_with_several_prompts_runs(tmp_path: Path) -> None:
    model = make_embedded_latent(n_prompts=P)
    data = tmp_path / "latents.npz"
    np.savez(data, z=np.random.default_rng(0).standard_normal((12, *model.shape)))
    from stepopt.optimizers.ays import AYSConfig

    cfg = AYSConfig(
        data=str(data), data_size=8, samples=8, candidates=3, max_sweeps=1, val_noises=4, klub_samples=8,
        teacher=TEACHER, hierarchy=False,
    )  # fmt: skip
    s = optimize("ays", model, EULER, 3, cfg)
    assert "prompt j mod P" in s.method.config["report"]["data"]["conditioning"]


@pytest.mark.skipif(not HAS_CLIP, reason="transformers (CLIP text encoder) is not installed")
def test_cli_prompt_file_works_for_every_optimizer(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("pf")
    folder = make_tiny_sd(tmp / "tiny-sd")
    pf = tmp / "prompts.txt"
    pf.write_text("a red cat\na blue dog\na photo of the cat\nthe dog\n")
    np.savez(tmp / "z.npz", z=np.random.default_rng(0).standard_normal((8, 4, 8, 8)))
    teacher = ["--set", "teacher.solver=euler", "--set", "teacher.steps=6"]
    options = {
        "trust-region": ["--set", "maxiter=30", "--set", "multistart=false"],
        "ld3": ["--set", "n_train=4", "--set", "n_valid=4", "--set", "grid_rounds=1", "--set", "joint_rounds=0",
                "--set", "init=uniform", "--set", "check_pairs=4", *teacher],
        "ays": ["--set", f"data={tmp / 'z.npz'}", "--set", "samples=8", "--set", "candidates=3",
                "--set", "max_sweeps=1", "--set", "val_noises=4", "--set", "klub_samples=0",
                "--set", "hierarchy=false", *teacher],
        "gits": ["--set", "candidates=6", "--set", "trajectories=4", "--set", "teacher_substeps=1"],
        "oss": ["--set", "candidates=6", "--set", "trajectories=4", "--set", "teacher_substeps=1"],
    }  # fmt: skip
    for name, opts in options.items():
        out = tmp / f"{name}.yaml"
        args = ["optimize", "-O", name, "--model", f"diffusers:{folder}", "--solver", "euler", "--nfe", "3",
                "--prompt-file", str(pf), "--guidance", "2.0", "--device", "cpu", "--out", str(out), *opts,
                "--trust-code"]  # fmt: skip
        r = runner.invoke(app, args, catch_exceptions=False)
        assert r.exit_code == 0, (name, r.stderr)
        assert Schedule.load(out).method.config["conditioning"]["n_prompts"] == P, name
