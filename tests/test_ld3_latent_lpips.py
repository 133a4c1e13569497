"""LD3's LPIPS loss on a latent model: both states decoded by the model's VAE, the student's differentiably.

Runs on the tiny latent text-to-image parts of ``_tiny_latent`` (a real diffusers UNet and VAE with
random weights) and random VGG16 / LPIPS weights saved in the published layouts (the real ones are
never downloaded). The reference value is LPIPS of the images that ``model.decode`` (the sampler's
own decoding, no gradients) gives, computed separately here.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from stepopt.errors import StepoptError
from stepopt.optimizers import OptimizeContext, optimize
from stepopt.optimizers.ld3 import Ld3Config, Trainer
from stepopt.optimizers.ld3.losses import load_lpips
from stepopt.solvers import get_solver
from stepopt.teacher import TeacherConfig

pytest.importorskip("diffusers")
EULER = get_solver("euler").identity()


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPOPT_CACHE_DIR", str(tmp_path_factory.mktemp("ld3-lpips-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Random VGG16 / LPIPS v0.1 weights in the published layouts."""
    from torchvision.models.vgg import cfgs, make_layers

    d = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "vgg.pth")
    return str(d / "vgg16.pth"), str(d / "vgg.pth")


@pytest.fixture(scope="module")
def latent() -> Any:
    from _tiny_latent import make_embedded_latent

    return make_embedded_latent()


def _trainer(model: Any, files: tuple[str, str], checkpoint: bool) -> Trainer:
    cfg = Ld3Config(
        loss="lpips",
        vgg_weights=files[0],
        lpips_weights=files[1],
        n_train=2,
        n_valid=2,
        init="uniform",
        checkpoint=checkpoint,
        teacher=TeacherConfig(steps=4),
    )
    tr = Trainer(OptimizeContext(model=model, solver=EULER, n_steps=3), cfg)
    tr.load_pairs()
    return tr


def _distance_and_grad(tr: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    theta = torch.zeros(tr.n + 1, dtype=torch.float64, requires_grad=True)
    idx = torch.arange(2)
    y = tr.student(tr.eps_train, theta, None, cond=tr.train_cond(idx))
    d = tr.distance(y, tr.y_train)
    d.sum().backward()
    assert theta.grad is not None
    return d.detach(), theta.grad, y.detach()


def test_latent_lpips_is_lpips_of_the_decoded_images(latent: Any, lpips_files: tuple[str, str]) -> None:
    tr = _trainer(latent, lpips_files, checkpoint=False)
    d, grad, y = _distance_and_grad(tr)
    net = load_lpips(*lpips_files)
    want = net(latent.decode(y), latent.decode(tr.y_train))  # the sampler's decoding, separately
    assert latent.image_shape == (3, 16, 16) and tuple(y.shape[1:]) == (4, 8, 8)
    torch.testing.assert_close(d, want, rtol=1e-5, atol=0)
    assert bool((d > 0).all())
    # the gradient reaches every increment of the grid (the first logit cancels out)
    assert float(grad[1:].abs().min()) > 0
    # checkpointing the decoder (and the network calls) recomputes the same values and gradients
    d2, grad2, _ = _distance_and_grad(_trainer(latent, lpips_files, checkpoint=True))
    torch.testing.assert_close(d2, d, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-12)


def test_latent_lpips_trains(latent: Any, lpips_files: tuple[str, str]) -> None:
    cfg = Ld3Config(
        loss="lpips",
        vgg_weights=lpips_files[0],
        lpips_weights=lpips_files[1],
        n_train=2,
        n_valid=2,
        init="uniform",
        max_iterations=2,
        teacher=TeacherConfig(steps=4),
        check_pairs=2,
    )
    s = optimize("ld3", latent, EULER, 3, cfg)
    assert s.method.objective["name"] == "ld3-validation-lpips"
    rep = s.method.config["report"]
    assert rep["iterations"] == 2
    # keep_best scores every candidate with the same distance (LPIPS on the decoded images)
    kb = rep["keep_best"]
    assert kb["pairs"] == 2 and all(math.isfinite(v) and v > 0 for v in kb["loss_on_pairs"].values())
    assert kb["kept"] == min(kb["loss_on_pairs"], key=lambda k: (kb["loss_on_pairs"][k], k != "ld3"))
    if kb["kept"] == "ld3":
        assert s.method.objective["final"] <= s.method.objective["initial"]


def test_latent_lpips_without_weights_says_how_to_give_them(latent: Any) -> None:
    with pytest.raises(StepoptError, match="vgg_weights=PATH") as e:
        optimize("ld3", latent, EULER, 3, Ld3Config(loss="lpips", n_train=2, n_valid=2, init="uniform"))
    assert "\n" not in str(e.value)
