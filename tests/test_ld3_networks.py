"""LD3 on networks trained at integer timesteps (tiny diffusers UNets built here).

Where the numbers come from:
* The sampling model rounds the DDPM index; its ``differentiable_time`` twin passes the fractional
  index. At a trained timestep both see the same integer, so their outputs must agree exactly;
  between two timesteps they differ.
* The gradient of the student's loss with respect to the grid logits is compared with a central
  finite difference of the same loss on the continuous-time path (float64 network, so the
  difference quotient is accurate to ~1e-7), and with the gradient through the rounded path: the
  difference between the two is the time embedding's contribution, which must not vanish.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _tiny_diffusers import make_tiny_diffusers
from stepopt.models import load_model
from stepopt.optimizers import OptimizeContext, optimize
from stepopt.optimizers.ld3 import Ld3Config, Trainer
from stepopt.solvers import get_solver
from stepopt.teacher import TeacherConfig

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("error")

EULER = get_solver("euler").identity()
TEACHER = TeacherConfig(solver="euler", steps=8)


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPOPT_CACHE_DIR", str(tmp_path_factory.mktemp("ld3-net-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_diffusers(tmp_path_factory.mktemp("ld3-ddpm") / "ddpm")


@pytest.fixture(scope="module")
def model64(folder: Path) -> Any:
    return load_model(f"diffusers:{folder}", device="cpu", dtype=torch.float64)


def test_twin_equals_the_sampling_model_on_trained_timesteps(model64: Any) -> None:
    twin = model64.differentiable_time()
    assert twin is not model64 and twin.unet is model64.unet
    assert model64.integer_timesteps and not twin.integer_timesteps
    assert model64.time_gradient == "fractional-timestep"
    x = torch.randn(3, *model64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    on = model64.frame.sigma(torch.tensor([20.0, 400.0, 900.0], dtype=torch.float64))
    assert torch.equal(twin(x, on), model64(x, on))
    off = model64.frame.sigma(torch.tensor([20.4, 400.3, 900.2], dtype=torch.float64))
    assert not torch.allclose(twin(x, off), model64(x, off), rtol=1e-6, atol=0)
    # dD/dsigma: through the rounded index only the input scaling and the output conversion move; the
    # twin adds the time embedding's derivative, which at mid noise dominates (measured: 8 vs -89).
    grads = []
    for m in (model64, twin):
        sig = torch.full((3,), 0.5, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad((m(x * 1.5, sig) * x).sum(), sig)
        grads.append(float(g.sum()))
    assert abs(grads[1] - grads[0]) > 0.5 * abs(grads[0]), grads


def _trainer(model: Any, n_steps: int = 3) -> Trainer:
    ctx = OptimizeContext(model=model, solver=EULER, n_steps=n_steps)
    cfg = Ld3Config(n_train=2, n_valid=2, valid_batch_size=4, teacher=TEACHER, checkpoint=True)
    tr = Trainer(ctx, cfg)
    tr.load_pairs()
    return tr


def _grad_and_fd(loss: Any, p0: torch.Tensor, idx: range, h: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    p = p0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(p), p)
    fd = torch.zeros_like(p0)
    with torch.no_grad():
        for i in idx:
            e = torch.zeros_like(p0)
            e[i] = h
            fd[i] = (loss(p0 + e) - loss(p0 - e)) / (2 * h)
    return grad, fd


def test_grid_gradient_matches_a_finite_difference_through_the_time_embedding(model64: Any) -> None:
    tr = _trainer(model64, n_steps=4)
    x, target = tr.model.sigma_max * tr.eps_train, tr.y_train
    theta0 = torch.tensor([0.0, 0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    xi0 = torch.tensor([0.0, 0.05, -0.03, 0.02, 0.0], dtype=torch.float64)

    def loss(theta: torch.Tensor, xi: torch.Tensor, sampling: bool = False) -> torch.Tensor:
        return tr.distance(tr.student_from(x, theta, xi, sampling=sampling), target).mean()

    # The training path (the fractional-timestep twin, checkpointed) has the exact gradient of its loss,
    # for the grid logits (the first cancels: see ld3.grid) and for the model-time offsets.
    g_theta, fd_theta = _grad_and_fd(lambda th: loss(th, xi0), theta0, range(1, 5))
    torch.testing.assert_close(g_theta[1:], fd_theta[1:], rtol=2e-4, atol=1e-9)
    g_xi, fd_xi = _grad_and_fd(lambda xi: loss(theta0, xi), xi0, range(1, 4))
    torch.testing.assert_close(g_xi[1:4], fd_xi[1:4], rtol=2e-4, atol=1e-9)
    # xi moves only the time the network sees. Through the rounded (sampling) path that is only the input
    # scaling; the difference between the two paths is the time embedding's share, and it is not small.
    g_xi_rounded, _ = _grad_and_fd(lambda xi: loss(theta0, xi, sampling=True), xi0, range(0))
    # (On this untrained UNet it is 1-5 % of the gradient; far above the ~1e-5 agreement with the quotient.)
    share = (g_xi - g_xi_rounded)[1:4]
    assert float(share.norm()) > 0.01 * float(g_xi.norm()), (g_xi, g_xi_rounded)
    assert float((g_theta - _grad_and_fd(lambda th: loss(th, xi0, True), theta0, range(0))[0]).abs().max()) > 0


def test_ld3_on_a_diffusers_unet_trains_through_the_twin(folder: Path) -> None:
    model = load_model(f"diffusers:{folder}", device="cpu")
    cfg = Ld3Config(
        n_train=4, n_valid=4, grid_rounds=1, joint_rounds=1, teacher=TEACHER, init="uniform", keep_best="off"
    )
    s = optimize("ld3", model, EULER, 3, cfg)
    rep = s.method.config["report"]
    assert rep["time_gradient"] == "fractional-timestep" and rep["iterations"] == 4
    assert s.method.objective["final"] <= s.method.objective["initial"]
