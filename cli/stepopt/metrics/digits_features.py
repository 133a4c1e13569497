"""FID-digits: a small CNN classifier of the 8x8 digits as a registered torch-fidelity feature extractor.

Inception-v3 features mean little on 8x8 one-channel digits, so the digits models get their own
extractor, in the spirit of the MNIST classifiers used for FID on small data (Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", Eq. 6 is the
Fréchet distance torch-fidelity computes). :class:`DigitsClassifier` is trained by
``scripts/train_digits_classifier.py`` on the shipped digits; its weights ship as
``stepopt/data/digits_classifier.safetensors``. The features are its penultimate layer (64 ReLU
units, the analogue of Inception's pool3), and its logits serve the Inception Score.

Input convention (torch-fidelity's): images are ``(B, C, H, W)`` tensors on the 0..255 scale.
``uint8`` tensors (an image folder read by torch-fidelity: grey digits saved as PNG come back as
three equal RGB channels) and floating tensors (samples, unrounded, so 17-level digits suffer no
8-bit quantization) are both accepted; three channels are averaged to one. A sample ``x`` in
[-1, 1] maps to ``(x + 1) * 127.5`` clamped to [0, 255] (:func:`to_image_scale`), the same value a
PNG of it holds before rounding. Inside, the network runs in float64 so that features, and hence
FID, do not depend on the batch size.

Importing this module registers the extractor ``stepopt-digits-cnn`` and the reference dataset
``stepopt-digits`` (all 1797 real digits) with torch-fidelity.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from stepopt.metrics import DIGITS_EXTRACTOR
from stepopt.models import load_digits

EXTRACTOR_NAME = DIGITS_EXTRACTOR
DATASET_NAME = "stepopt-digits"
WEIGHTS_FILE = "digits_classifier.safetensors"
FEATURE_PENULTIMATE = "penultimate"
FEATURE_LOGITS = "logits"
N_CLASSES = 10
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """conv3x3(32) - conv3x3(64) - maxpool2 - conv3x3(64) - fc(64) [penultimate] - fc(10), ReLU between.

    Input ``(B, 1, 8, 8)`` in [-1, 1]; :meth:`features` returns ``(penultimate (B, 64), logits (B, 10))``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, N_CLASSES)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        pen = F.relu(self.fc(h.flatten(1)))
        return pen, self.head(pen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]


def weights_path() -> Any:
    """The shipped classifier weights (a Traversable inside the package)."""
    return resources.files("stepopt.data").joinpath(WEIGHTS_FILE)


def load_classifier(path: str | None = None) -> DigitsClassifier:
    """The trained classifier in float64, eval mode (weights: ``path`` or the shipped file)."""
    net = DigitsClassifier()
    if path is None:
        with resources.as_file(weights_path()) as p:
            state = load_file(str(p))
    else:
        state = load_file(path)
    net.load_state_dict(state)
    return net.double().eval().requires_grad_(False)


def weights_fingerprint(path: str | None = None) -> str:
    """sha256 of the weights file (keys torch-fidelity's on-disk cache of reference statistics)."""
    if path is None:
        data = weights_path().read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def to_image_scale(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] -> float64 on torch-fidelity's 0..255 scale, clamped (not rounded)."""
    return ((x.detach().to(torch.float64) + 1.0) * 127.5).clamp(0.0, 255.0)


def from_image_scale(img: torch.Tensor) -> torch.Tensor:
    """0..255 images (uint8 or float, 1 or 3 channels) -> float64 ``(B, 1, H, W)`` in [-1, 1]."""
    if img.ndim != 4 or img.shape[1] not in (1, 3):
        raise ValueError(f"{EXTRACTOR_NAME} expects images of shape (B, 1 or 3, 8, 8), got {tuple(img.shape)}")
    if tuple(img.shape[-2:]) != (8, 8):
        raise ValueError(f"{EXTRACTOR_NAME} expects 8x8 images, got {img.shape[-2]}x{img.shape[-1]}")
    x = img.to(torch.float64)
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    return x / 127.5 - 1.0


class FeatureExtractorDigits(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity feature extractor: penultimate features and logits of :class:`DigitsClassifier`."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        self.net = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURE_PENULTIMATE, FEATURE_LOGITS)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return FEATURE_LOGITS if metric == "isc" else FEATURE_PENULTIMATE

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pen, logits = self.net.features(from_image_scale(x))
        out = {FEATURE_PENULTIMATE: pen, FEATURE_LOGITS: logits}
        return tuple(out[k] for k in self.features_list)


class ImageTensorDataset(Dataset):
    """A fixed set of images ``(N, C, H, W)`` (0..255 scale) served one by one to torch-fidelity."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def real_digits_images() -> torch.Tensor:
    """All 1797 shipped digits on the 0..255 scale, float64 ``(1797, 1, 8, 8)`` (exact: v/16*255)."""
    images, _ = load_digits(scaled=True)
    return to_image_scale(torch.from_numpy(np.ascontiguousarray(images)))


def _digits_dataset(root: str, download: bool) -> Dataset:
    return ImageTensorDataset(real_digits_images())


def register() -> None:
    """Register the extractor and the reference dataset with torch-fidelity (idempotent)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, FeatureExtractorDigits)
    if DATASET_NAME not in DATASETS_REGISTRY:
        torch_fidelity.register_dataset(DATASET_NAME, _digits_dataset)


register()
