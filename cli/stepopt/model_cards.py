"""What commands need to know about a built-in model, without loading it (numpy only, no torch).

``stepopt baseline`` on a built-in model needs only its id, sigma range, noise frame and
fingerprint, and ``stepopt models`` only its description; :func:`model_card` gives both for every
built-in model id (``builtin:NAME`` without options), computed with numpy from the packaged
parameter files, and None for every other id (callers then load the model). A card's ``ref()`` and
``describe()`` equal the loaded model's (a test compares them for every built-in), so a schedule
written from a card is the one written from the model.

:data:`BUILTIN_SUMMARIES`, :data:`LOADER_SUMMARIES` and :data:`OPTIMIZER_SUMMARIES` are the one
place the one-line descriptions live; the registries take theirs from here, so ``stepopt models``
can list everything without importing the modules that register it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from stepopt.fingerprint import fingerprint_arrays
from stepopt.frames import EDM, Flow, NoiseFrame, frame_ref_fields
from stepopt.schedule import ModelRef

BUILTIN_SUMMARIES: dict[str, str] = {
    "gmm-digits": "10-component GMM fit to the 8x8 digits; exact denoiser (default)",
    "gmm-digits-flow": "the same GMM as a rectified-flow velocity model from pure noise (sigma_max inf); shift 3 "
    "(builtin:gmm-digits-flow:shift=S or :mu=M for others); exact denoiser and ODE",
    "unet-digits": "small EDM-preconditioned UNet trained on the 8x8 digits (safetensors)",
    "gaussian": "isotropic Gaussian N(0, 0.5^2 I) on 8x8; closed-form ODE (analytic test model)",
    "point-mass": "a single 8x8 point; closed-form ODE (analytic test model)",
}

LOADER_SUMMARIES: dict[str, str] = {
    "builtin": "the built-in models: builtin:NAME",
    "edm": "NVIDIA EDM/EDM2 network pickle (dict with 'ema'); needs `trust_code`",
    "diffusers": "local diffusers folder, offline: pixel UNet2DModel + DDPM-style scheduler (epsilon, v, sample), "
    "or a latent text-to-image pipeline (StableDiffusionPipeline layout: UNet2DConditionModel, AutoencoderKL, CLIP; "
    "prompts, classifier-free guidance, VAE decode; needs transformers), or a flow-matching pipeline "
    "(FlowMatchEulerDiscreteScheduler: SD3-style SD3Transformer2DModel + CLIP x2 (+T5), classifier-free guidance; "
    "FLUX-style FluxTransformer2DModel + CLIP + T5, embedded guidance, shift mu from the resolution; "
    "diffusers:PATH:height=H,width=W)",
    "python": "user code: python:MODULE:FACTORY or python:FILE.py:FACTORY returning a denoiser; needs `trust_code`",
}

OPTIMIZER_SUMMARIES: dict[str, str] = {
    "ays": "Align Your Steps: KLUB coordinate search with early stopping on the target solver",
    "gits": "GITS (Chen et al. 2024): DP over a local-error cost matrix from teacher trajectories",
    "ld3": "LD3 (Tong et al. 2025): grid learned by backprop through the solver against a teacher",
    "oss": "Optimal Stepsize (Pei et al. 2025): DP over the student's own states against teacher trajectories",
    "trust-region": "Xue et al. 2024: minimize the multistep solver's error bound (model-free, about a second)",
}


@dataclass(frozen=True)
class ModelCard:
    """A model's metadata, standing in for the model where no network is evaluated."""

    id: str
    fingerprint: str
    sigma_min: float
    sigma_max: float
    frame: NoiseFrame
    shape: tuple[int, ...] = (1, 8, 8)
    parameterization: str = "exact"
    extra: dict[str, Any] = field(default_factory=dict)  # what the model's describe() adds
    device: str = "cpu"
    integer_timesteps: bool = False

    @property
    def time_domain(self) -> str:
        return self.frame.time_domain

    def ref(self) -> ModelRef:
        return ModelRef(
            self.id, self.fingerprint, self.sigma_min, self.sigma_max, self.time_domain, **frame_ref_fields(self.frame)
        )

    def describe(self) -> dict[str, Any]:
        """What the loaded model's ``describe()`` returns."""
        return {
            "id": self.id,
            "shape": list(self.shape),
            "parameterization": self.parameterization,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "frame": self.frame.describe(),
            "fingerprint": self.fingerprint,
            **self.extra,
        }


def _data(name: str) -> Any:
    return resources.files("stepopt.data").joinpath(name)


def _gmm_arrays() -> list[np.ndarray]:
    with _data("gmm_digits.npz").open("rb") as f:
        p = np.load(f)
        return [np.asarray(p[k], dtype=np.float64) for k in ("weights", "means", "covariances")]


def _gmm_digits() -> ModelCard:
    return ModelCard("builtin:gmm-digits", fingerprint_arrays(_gmm_arrays()), 0.002, 80.0, EDM(0.002, 80.0))


def _gmm_digits_flow() -> ModelCard:
    # stepopt.models.flow: sigma_min 0.002 (t_min = 0.002 / 1.002), shift 3, velocity-tagged fingerprint
    frame = Flow(shift=3.0, mu=None, t_min=0.002 / (1.0 + 0.002))
    tag = np.frombuffer(b"flow-velocity", dtype=np.uint8)
    return ModelCard(
        "builtin:gmm-digits-flow",
        fingerprint_arrays([*_gmm_arrays(), tag]),
        0.002,
        math.inf,
        frame,
        parameterization="flow",
        extra={"shift": 3.0, "mu": None},
    )


def _linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace`` in float64, bit for bit: the first half counts up from ``start``, the rest
    down from ``end``."""
    step = (end - start) / (steps - 1)
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    return np.where(i < half, start + step * i, end - step * (steps - 1 - i))


def _gaussian() -> ModelCard:
    arrays = [np.zeros((1, 8, 8), dtype=np.float64), np.array(0.5, dtype=np.float64)]
    return ModelCard("builtin:gaussian", fingerprint_arrays(arrays), 0.002, 80.0, EDM(0.002, 80.0))


def _point_mass() -> ModelCard:
    x0 = _linspace_like_torch(-1.0, 1.0, 64).reshape(1, 8, 8)
    return ModelCard("builtin:point-mass", fingerprint_arrays([x0]), 0.002, 80.0, EDM(0.002, 80.0))


def _unet_digits() -> ModelCard | None:
    from safetensors import safe_open

    with resources.as_file(_data("unet_digits.safetensors")) as p:
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = [f.get_tensor(k) for k in sorted(f.keys())]
        except Exception:  # missing or unreadable: loading the model gives the one-line reason
            return None
    in_channels = int(json.loads(meta.get("config", "{}")).get("in_channels", 1))
    return ModelCard(
        "builtin:unet-digits",
        fingerprint_arrays(arrays),
        0.002,
        80.0,
        EDM(0.002, 80.0),
        shape=(in_channels, 8, 8),
        parameterization="edm",
        extra={"network_dtype": "float32"},
    )


_CARDS = {
    "builtin:gmm-digits": _gmm_digits,
    "builtin:gmm-digits-flow": _gmm_digits_flow,
    "builtin:unet-digits": _unet_digits,
    "builtin:gaussian": _gaussian,
    "builtin:point-mass": _point_mass,
}


def builtin_card_ids() -> list[str]:
    """The ids of every built-in model, in the order ``stepopt models`` lists them."""
    return [f"builtin:{n}" for n in BUILTIN_SUMMARIES]


def model_card(model_id: str) -> ModelCard | None:
    """The card of a built-in model (no torch needed), else None."""
    fn = _CARDS.get(model_id)
    return fn() if fn is not None else None
