"""Model loaders: ``builtin:NAME`` and the loader registry.

``load_model("builtin:gmm-digits")`` returns a :class:`DiffusionModel`. A model id is
``PREFIX:ARG``; each prefix (``builtin``, ``edm``, ``diffusers``, ``python``) is a
:class:`LoaderSpec` in :data:`LOADERS`, called as ``load(ARG, LoadOptions)``. Built-in models are
the entries of :data:`BUILTINS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stepopt._defaults import DEFAULT_MODEL
from stepopt.errors import StepoptError
from stepopt.model_cards import BUILTIN_SUMMARIES, LOADER_SUMMARIES
from stepopt.models.base import AnalyticModel, DiffusionModel, IsotropicGaussian, LoadOptions, PointMass
from stepopt.models.flow import GaussianMixtureFlow, load_gmm_digits_flow
from stepopt.models.gmm import GaussianMixture, load_digits, load_gmm_digits
from stepopt.models.loaders import load_edm_pickle, load_python_factory
from stepopt.registry import Registry
from stepopt.trust import check_code_loader, check_file_model, file_model_risk

__all__ = [
    "BUILTINS",
    "DEFAULT_MODEL",
    "LOADERS",
    "AnalyticModel",
    "DiffusionModel",
    "GaussianMixture",
    "GaussianMixtureFlow",
    "IsotropicGaussian",
    "LoadOptions",
    "LoaderSpec",
    "PointMass",
    "builtin_names",
    "check_file_model",
    "file_model_risk",
    "load_digits",
    "load_model",
    "register_builtin",
    "register_loader",
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


BUILTINS: Registry[Builtin] = Registry("built-in model")


def register_builtin(name: str, factory: Callable[[], DiffusionModel], summary: str) -> Builtin:
    """Register ``builtin:NAME``: ``factory()`` builds the model (the loader moves it to the device)."""
    return BUILTINS.register(name, Builtin(name, factory, summary))


register_builtin("gmm-digits", load_gmm_digits, BUILTIN_SUMMARIES["gmm-digits"])
register_builtin("gmm-digits-flow", load_gmm_digits_flow, BUILTIN_SUMMARIES["gmm-digits-flow"])
register_builtin("unet-digits", _unet_digits, BUILTIN_SUMMARIES["unet-digits"])
register_builtin("gaussian", _gaussian, BUILTIN_SUMMARIES["gaussian"])
register_builtin("point-mass", _point_mass, BUILTIN_SUMMARIES["point-mass"])


LoaderFn = Callable[[str, LoadOptions], DiffusionModel]


@dataclass(frozen=True)
class LoaderSpec:
    """A model-id prefix: ``load(ARG, options)`` for ids ``PREFIX:ARG``, and what ``stepopt models`` shows."""

    prefix: str
    load: LoaderFn
    summary: str


LOADERS: Registry[LoaderSpec] = Registry("model loader")


def register_loader(prefix: str, fn: LoaderFn, summary: str) -> LoaderSpec:
    """Register ``prefix:...`` model ids (e.g. ``diffusers``): ``fn(ARG, options)`` returns the model."""
    return LOADERS.register(prefix, LoaderSpec(prefix, fn, summary))


def builtin_names() -> list[str]:
    return [f"builtin:{k}" for k in BUILTINS]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when available, else CPU; validates explicit choices."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StepoptError(f"`device` '{device}' is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StepoptError(f"`device` {device}: CUDA is not available on this machine; use cpu")
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

    Loaders that run code (:data:`stepopt.trust.CODE_LOADERS`: ``python:``, ``edm:``) need ``trust_code=True``
    (``trust_pickle`` is its old name).
    """
    spec = spec or DEFAULT_MODEL
    options = LoadOptions(resolve_device(device), dtype, trust_code=trust_code or trust_pickle)
    prefix, sep, rest = spec.partition(":")
    if not sep:
        raise StepoptError(f"model '{spec}' has no loader prefix; expected e.g. {DEFAULT_MODEL}")
    if prefix not in LOADERS:
        raise StepoptError(f"unknown model loader '{prefix}' in '{spec}'; expected one of {', '.join(LOADERS.names())}")
    check_code_loader(spec, options.trust_code)
    try:
        return LOADERS.get(prefix).load(rest, options)
    except (StepoptError, OSError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # a malformed checkpoint or config the loader did not foresee
        msg = " ".join(str(e).split())[:300]
        raise StepoptError(f"model '{spec}': cannot load it ({e.__class__.__name__}: {msg})") from None


def _load_builtin(name: str, options: LoadOptions) -> DiffusionModel:
    base, osep, opts = name.partition(":")
    if osep and base == "gmm-digits-flow":  # the one built-in with options: shift=S or mu=M
        return load_gmm_digits_flow(opts).to(options.device, None)
    if name not in BUILTINS:
        raise StepoptError(f"unknown built-in model 'builtin:{name}'; expected one of {', '.join(builtin_names())}")
    model = BUILTINS.get(name).factory()
    return model.to(options.device, None if isinstance(model, AnalyticModel) else options.dtype)


def _load_diffusers(rest: str, options: LoadOptions) -> DiffusionModel:
    from stepopt.models.diffusers import load_diffusers  # imported on use: keeps `import stepopt` light

    return load_diffusers(rest, options.device, options.dtype)


LOADERS.register("builtin", LoaderSpec("builtin", _load_builtin, LOADER_SUMMARIES["builtin"]))
register_loader("edm", load_edm_pickle, LOADER_SUMMARIES["edm"])
register_loader("diffusers", _load_diffusers, LOADER_SUMMARIES["diffusers"])
register_loader("python", load_python_factory, LOADER_SUMMARIES["python"])
