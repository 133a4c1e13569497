"""Model loaders: ``builtin:NAME`` and the loader registry.

``load_model("builtin:gmm-digits")`` returns a :class:`DiffusionModel`. Later loaders
(``diffusers:PATH``, ``edm:PATH.pkl``, ``python:module:factory``) register here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stepopt._defaults import DEFAULT_MODEL
from stepopt.errors import StepoptError
from stepopt.models.base import AnalyticModel, DiffusionModel, IsotropicGaussian, PointMass
from stepopt.models.gmm import GaussianMixture, load_digits, load_gmm_digits
from stepopt.models.loaders import load_edm_pickle, load_python_factory

__all__ = [
    "DEFAULT_MODEL",
    "AnalyticModel",
    "DiffusionModel",
    "GaussianMixture",
    "IsotropicGaussian",
    "PointMass",
    "builtin_names",
    "load_digits",
    "load_model",
]


@dataclass(frozen=True)
class Builtin:
    name: str
    factory: Callable[[], DiffusionModel]
    summary: str


def _gaussian() -> DiffusionModel:
    return IsotropicGaussian(torch.zeros(1, 8, 8, dtype=torch.float64), c=0.5, id="builtin:gaussian")


def _unet_digits() -> DiffusionModel:
    from stepopt.models.unet import load_unet_digits

    return load_unet_digits()


def _point_mass() -> DiffusionModel:
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 8, 8)
    return PointMass(x0, id="builtin:point-mass")


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("gmm-digits", load_gmm_digits, "10-component GMM fit to the 8x8 digits; exact denoiser (default)"),
        Builtin("unet-digits", _unet_digits, "small EDM-preconditioned UNet trained on the 8x8 digits (safetensors)"),
        Builtin(
            "gaussian", _gaussian, "isotropic Gaussian N(0, 0.5^2 I) on 8x8; closed-form ODE (analytic test model)"
        ),
        Builtin("point-mass", _point_mass, "a single 8x8 point; closed-form ODE (analytic test model)"),
    )
}

LoaderFn = Callable[[str, torch.device, "torch.dtype | None"], DiffusionModel]
LOADERS: dict[str, tuple[LoaderFn, str]] = {}
# Shown by `stepopt models`; edm: is dispatched by load_model itself because it takes trust_pickle.
LOADER_SUMMARIES: dict[str, str] = {
    "edm": "NVIDIA EDM/EDM2 network pickle (dict with 'ema'); needs --trust-pickle",
}


def register_loader(prefix: str, fn: LoaderFn, summary: str) -> None:
    """Register ``prefix:...`` model ids (e.g. ``diffusers``); ``fn(rest, device, dtype)``."""
    LOADERS[prefix] = (fn, summary)
    LOADER_SUMMARIES[prefix] = summary


def builtin_names() -> list[str]:
    return [f"builtin:{k}" for k in BUILTINS]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when available, else CPU; validates explicit choices."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StepoptError(f"--device '{device}' is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StepoptError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def load_model(
    spec: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    *,
    trust_code: bool = False,
    trust_pickle: bool = False,
) -> DiffusionModel:
    """Load a model by id (``builtin:NAME`` or ``LOADER:ARG``); errors name the id and the choices.

    ``trust_code`` allows loaders that run code from a file (``edm:`` pickles); ``trust_pickle``
    is its old name.
    """
    spec = spec or DEFAULT_MODEL
    dev = resolve_device(device)
    prefix, sep, rest = spec.partition(":")
    if not sep:
        raise StepoptError(f"model '{spec}' has no loader prefix; expected e.g. {DEFAULT_MODEL}")
    if prefix == "builtin":
        if rest not in BUILTINS:
            raise StepoptError(f"unknown built-in model '{spec}'; expected one of {', '.join(builtin_names())}")
        model = BUILTINS[rest].factory()
        return model.to(dev, None if isinstance(model, AnalyticModel) else dtype)
    if prefix == "edm":
        return load_edm_pickle(rest, dev, dtype, trust_pickle=trust_code or trust_pickle)
    if prefix in LOADERS:
        return LOADERS[prefix][0](rest, dev, dtype)
    known = ", ".join(["builtin", "edm", *LOADERS])
    raise StepoptError(f"unknown model loader '{prefix}' in '{spec}'; expected one of {known}")


def _load_diffusers(rest: str, device: torch.device, dtype: torch.dtype | None) -> DiffusionModel:
    from stepopt.models.diffusers import load_diffusers  # imported on use: keeps `import stepopt` light

    return load_diffusers(rest, device, dtype)


register_loader(
    "diffusers",
    _load_diffusers,
    "local diffusers folder, offline: pixel UNet2DModel + DDPM-style scheduler (epsilon, v, sample), or a latent "
    "text-to-image pipeline (StableDiffusionPipeline layout: UNet2DConditionModel, AutoencoderKL, CLIP; prompts, "
    "classifier-free guidance, VAE decode; needs transformers)",
)
register_loader(
    "python", load_python_factory, "user code: python:MODULE:FACTORY or python:FILE.py:FACTORY returning a denoiser"
)
