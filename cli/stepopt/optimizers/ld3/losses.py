"""Per-sample distances d(student, teacher) for LD3: ``l2``, ``lpips`` (VGG) and ``features`` (digits CNN).

Each distance maps two batches ``(B, *shape)`` to a ``(B,)`` float64 tensor and is differentiable
in its first argument.

* ``l2``: the mean squared difference per sample, ``sum_j (y_j - y*_j)^2 / D`` (the L2 distance of
  the LD3 reference implementation; the mean over samples of it is the squared ode-error RMSE).
* ``lpips``: LPIPS v0.1 with VGG16 features and learned linear weights (Zhang, Isola, Efros,
  Shechtman, Wang, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
  CVPR 2018, Eq. 1): ``sum_l mean_{h,w} || w_l * (f_l(x) - f_l(y)) ||^2`` over the relu1_2,
  relu2_2, relu3_3, relu4_3 and relu5_3 activations ``f_l``, each unit-normalised over channels.
  The LD3 paper's choice (Tong et al., ICLR 2025). Nothing is downloaded: the user gives
  the VGG16 weights (a torchvision ``vgg16`` state dict, ``.pth``/``.pt``/``.safetensors``) and the
  LPIPS linear-layer weights (the ``vgg.pth`` of LPIPS v0.1: keys ``lin{k}.model.1.weight`` or
  ``lin{k}.weight``, shapes ``(1, C_k, 1, 1)``). The network is torchvision's VGG16 feature stack.
  On a latent model both states are decoded by the model's VAE first (differentiably for the
  student; the reference trainer likewise compares decoded images), so LPIPS sees images.
* ``features``: the mean squared difference of the penultimate features of the digits classifier
  that FID-digits uses (:mod:`stepopt.metrics.digits_features`), for 8x8 one-channel models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stepopt.errors import StepoptError

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("l2", "lpips", "features")

# LPIPS's input normalisation (inputs in [-1, 1]) and the VGG16 layers it reads.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # up to relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_MIN_SIZE = 16  # relu5_3 follows four 2x2 poolings


def l2_distance(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample, ``(B,)`` float64."""
    d = y.to(torch.float64) - target.to(torch.float64)
    return d.flatten(1).square().mean(dim=1)


def _load_state(path: str, what: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise StepoptError(f"{what} weights file '{p}' does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: one clear line
        raise StepoptError(f"{what} weights file '{p}' cannot be read ({e.__class__.__name__}: {e})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StepoptError(f"{what} weights file '{p}' is not a state dict of tensors")
    return dict(state)


class LpipsVgg(nn.Module):
    """LPIPS v0.1 (VGG16, linear-calibrated): ``forward(x, y) -> (B,)``; inputs ``(B, 1|3, H, W)`` in [-1, 1].

    One-channel inputs are repeated to three; inputs whose shorter side is below ``resize`` pixels
    are upsampled bilinearly (aspect kept) so that it is ``resize`` (VGG's relu5_3 needs >= 16).
    """

    def __init__(self, vgg_state: Mapping[str, torch.Tensor], lin_state: Mapping[str, torch.Tensor], resize: int = 32):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        layers = make_layers(cfgs["D"], batch_norm=False)  # torchvision's VGG16 feature stack
        feats = {k.removeprefix("features."): v for k, v in vgg_state.items() if not k.startswith("classifier.")}
        missing = [k for k in layers.state_dict() if k not in feats]
        if missing:
            raise StepoptError(
                f"VGG16 weights lack {len(missing)} feature tensors (e.g. 'features.{missing[0]}'); "
                "expected a torchvision vgg16 state dict"
            )
        try:
            layers.load_state_dict({k: feats[k] for k in layers.state_dict()})
        except RuntimeError as e:
            raise StepoptError(f"VGG16 weights do not fit torchvision's vgg16: {str(e).splitlines()[0]}") from None
        self.slices = nn.ModuleList(nn.Sequential(*[layers[i] for i in range(a, b)]) for a, b in _VGG_SLICES)
        lins = []
        for k, c in enumerate(_VGG_CHANNELS):
            w = lin_state.get(f"lin{k}.model.1.weight", lin_state.get(f"lin{k}.weight"))
            if w is None:
                raise StepoptError(
                    f"LPIPS weights lack 'lin{k}.model.1.weight' (or 'lin{k}.weight'); expected LPIPS v0.1 vgg.pth"
                )
            if tuple(w.shape) != (1, c, 1, 1):
                raise StepoptError(f"LPIPS weight lin{k} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)")
            lins.append(w.detach().clone())
        self.lins = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in lins)
        self.shift: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.resize = int(resize)
        self.requires_grad_(False).eval()

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise StepoptError(f"LPIPS needs images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
        x = x.to(self.shift.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if min(h, w) < self.resize:
            f = self.resize / min(h, w)
            x = F.interpolate(x, size=(math.ceil(h * f), math.ceil(w * f)), mode="bilinear", align_corners=False)
        return (x - self.shift) / self.scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hx, hy = self._prep(x), self._prep(y)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for block, w in zip(self.slices, self.lins, strict=True):
            hx, hy = block(hx), block(hy)
            nx = hx / (hx.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((nx - ny).square(), w).mean(dim=(1, 2, 3)).to(torch.float64)
        return total


def load_lpips(vgg_weights: str, lpips_weights: str, resize: int = 32) -> LpipsVgg:
    """LPIPS-VGG from the two user-given weight files (nothing is downloaded)."""
    if resize < LPIPS_MIN_SIZE:
        raise StepoptError(f"lpips_resize must be at least {LPIPS_MIN_SIZE} (VGG16's relu5_3), got {resize}")
    return LpipsVgg(_load_state(vgg_weights, "VGG16"), _load_state(lpips_weights, "LPIPS"), resize=resize)


def make_distance(
    loss: str,
    shape: tuple[int, ...],
    device: torch.device,
    *,
    vgg_weights: str | None = None,
    lpips_weights: str | None = None,
    lpips_resize: int = 32,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    image_shape: tuple[int, ...] | None = None,
) -> Distance:
    """The per-sample distance named ``loss`` for states of shape ``shape``; clear errors otherwise.

    ``decode`` (with the decoded ``image_shape``): a differentiable map from states to images in
    [-1, 1] (a latent model's VAE decoder); ``lpips`` then compares ``decode(y)`` with ``decode(target)``
    (the target decoded without gradients).
    """
    if loss == "l2":
        return l2_distance
    if loss == "lpips":
        if not vgg_weights or not lpips_weights:
            raise StepoptError(
                "loss 'lpips' needs pretrained weights that stepopt never downloads: "
                "`vgg_weights=PATH` (torchvision vgg16 state dict) `lpips_weights=PATH` (LPIPS v0.1 vgg.pth); "
                "or choose `loss=l2` (or loss=features for the digits models)"
            )
        img = tuple(image_shape) if decode is not None and image_shape is not None else tuple(shape)
        if len(img) != 3 or img[0] not in (1, 3):
            what = "decoded images" if decode is not None else "states"
            raise StepoptError(
                f"loss 'lpips' needs images (1 or 3 channels, H, W); this model's {what} are {img}"
                + ("" if decode is not None else " and it has no decoder; choose `loss=l2`")
            )
        net = load_lpips(vgg_weights, lpips_weights, lpips_resize).to(device)
        if decode is None:
            return lambda y, t: net(y, t)
        dec = decode

        def decoded_lpips(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_img = dec(t)
            return net(dec(y), t_img)

        return decoded_lpips
    if loss == "features":
        if tuple(shape) != (1, 8, 8):
            raise StepoptError(
                f"loss 'features' uses the 8x8 digits classifier; this model's states are {tuple(shape)}; "
                "choose `loss=l2` or lpips"
            )
        from stepopt.metrics.digits_features import load_classifier

        clf = load_classifier().to(device)

        def features(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            fy, _ = clf.features(y.to(torch.float64))
            ft, _ = clf.features(t.to(torch.float64))
            return (fy - ft).square().mean(dim=1)

        return features
    raise StepoptError(f"unknown loss '{loss}'; expected one of {', '.join(LOSSES)}")
