"""Loaders for foreign checkpoints: ``edm:PATH.pkl`` (NVIDIA EDM/EDM2 pickles) and ``python:module:factory``.

**EDM pickles** (Karras et al. 2022 ``NVlabs/edm``; 2024 ``NVlabs/edm2``) are Python pickles of a
dict whose ``"ema"`` entry is the network (``EDMPrecond``-style: ``net(x, sigma, class_labels)``
returns ``D(x, sigma)`` directly, with attributes ``sigma_min``, ``sigma_max``, ``sigma_data``,
``img_resolution``, ``img_channels``, ``label_dim``). Unpickling runs code that the file names, so
it needs an explicit ``trust_code=True`` (``--trust-code``). The classes it names must be
importable: for NVIDIA's pickles that is EDM's ``dnnlib`` and ``torch_utils`` packages (put a
checkout of NVlabs/edm or edm2 on ``PYTHONPATH``); their ``torch_utils.persistence`` rebuilds the
network classes from source embedded in the pickle.

**Python factories**: ``python:package.module:factory`` or ``python:path/to/file.py:factory``
calls ``factory()`` and uses what it returns: a :class:`DiffusionModel`, or any object with
``__call__(x, sigma) -> x0_hat`` (EDM frame), ``sigma_min``, ``sigma_max`` and ``shape``
(optionally ``fingerprint``, ``id``); the contract is checked on load.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from stepopt.errors import StepoptError
from stepopt.frames import EDM
from stepopt.models.base import DiffusionModel, LoadOptions, fingerprint_arrays

TRUST_PICKLE_HELP = (
    "unpickling runs code named by the file; pass `trust_code` only for checkpoints from a source you trust"
)


class EDMNetwork(DiffusionModel):
    """An EDM-preconditioned network from a pickle: ``D(x, sigma) = net(x, sigma, class_labels)``."""

    parameterization = "edm"

    def __init__(self, net: torch.nn.Module, id: str, fingerprint: str) -> None:
        self.net = net.eval().requires_grad_(False)
        self.id = id
        self._fingerprint = fingerprint
        self.sigma_min = float(getattr(net, "sigma_min", 0.002))
        self.sigma_max = float(getattr(net, "sigma_max", 80.0))
        if not 0 < self.sigma_min < self.sigma_max or self.sigma_max == float("inf"):
            self.sigma_min, self.sigma_max = 0.002, 80.0  # EDM2 nets carry no finite range: EDM's defaults
        self.frame = EDM(self.sigma_min, self.sigma_max)
        res = int(getattr(net, "img_resolution"))  # noqa: B009  (nn.Module attributes are untyped)
        self.shape = (int(getattr(net, "img_channels")), res, res)  # noqa: B009
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)
        self.dtype = torch.float32  # solver state; the network may run in half precision (net_dtype)
        self.net_dtype = next((p.dtype for p in net.parameters()), torch.float32)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EDMNetwork:
        """Move the network; ``dtype`` is the network's precision (the solver state stays float32 or float64)."""
        super().to(device, None)
        if dtype is not None:
            self.net_dtype = dtype
            self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self.net.to(dtype=dtype)
        self.net.to(self.device)
        return self

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        rs = getattr(self.net, "round_sigma", None)
        return rs(sigma) if callable(rs) else sigma

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        labels = cond.get("class_labels")
        if self.label_dim and labels is None:
            raise StepoptError(
                f"{self.id} is class-conditional ({self.label_dim} classes): "
                "pass class_labels (one-hot) as conditioning"
            )
        out = self.net(x.to(self.net_dtype), sigma.to(self.net_dtype), labels)
        return out.to(x.dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "label_dim": self.label_dim, "class": type(self.net).__name__}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_edm_pickle(path: str, options: LoadOptions) -> DiffusionModel:
    """Load ``edm:PATH.pkl``; requires ``options.trust_code`` because unpickling executes code."""
    p = Path(path).expanduser()
    if not options.trust_code:
        raise StepoptError(f"edm:{path}: refusing to unpickle without `trust_code` ({TRUST_PICKLE_HELP})")
    if not p.is_file():
        raise StepoptError(f"edm:{path}: no such checkpoint file")
    try:
        with open(p, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as e:
        raise StepoptError(
            f"edm:{path}: the pickle needs module '{e.name}', which is not importable; for NVIDIA EDM/EDM2 "
            "checkpoints put a checkout of NVlabs/edm (dnnlib, torch_utils) on PYTHONPATH"
        ) from None
    except Exception as e:
        raise StepoptError(f"edm:{path}: not a readable EDM pickle ({e.__class__.__name__}: {e})") from None
    net = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(net, torch.nn.Module):
        raise StepoptError(f"edm:{path}: expected a dict with an 'ema' network (EDM/EDM2 format)")
    missing = [a for a in ("img_resolution", "img_channels") if not hasattr(net, a)]
    if missing:
        raise StepoptError(f"edm:{path}: the 'ema' network lacks {', '.join(missing)} (not an EDM network?)")
    fp = _sha256_file(p)
    return EDMNetwork(net, f"edm:{path}", fp).to(options.device)  # the network keeps the pickle's precision


class PythonModel(DiffusionModel):
    """Wraps a user object with the denoiser contract (``obj(x, sigma)``)."""

    parameterization = "user"

    def __init__(self, obj: Any, id: str) -> None:
        self.obj = obj
        self.id = str(getattr(obj, "id", id))
        self.sigma_min = float(obj.sigma_min)
        self.sigma_max = float(obj.sigma_max)
        self.shape = tuple(int(s) for s in obj.shape)
        self.frame = getattr(obj, "frame", None) or EDM(self.sigma_min, self.sigma_max)
        fp = getattr(obj, "fingerprint", None)
        if fp is None and isinstance(obj, torch.nn.Module):
            fp = fingerprint_arrays(v for _, v in sorted(obj.state_dict().items()))
        self._fingerprint = str(fp) if fp is not None else "unknown:" + self.id
        self.dtype = getattr(obj, "dtype", torch.float32)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.obj(x, sigma, **cond)


def _import_factory(spec: str) -> Any:
    mod_name, sep, factory = spec.rpartition(":")
    if not sep or not mod_name or not factory:
        raise StepoptError(f"python:{spec}: expected python:MODULE:FACTORY or python:FILE.py:FACTORY")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise StepoptError(f"python:{spec}: no such file {path}")
            name = f"stepopt_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise StepoptError(f"python:{spec}: cannot import {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except StepoptError:
        raise
    except ModuleNotFoundError as e:
        raise StepoptError(f"python:{spec}: module '{e.name}' is not importable (check PYTHONPATH)") from None
    except Exception as e:
        raise StepoptError(f"python:{spec}: importing failed ({e.__class__.__name__}: {e})") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise StepoptError(f"python:{spec}: '{factory}' is not a callable in {mod_name}")
    return fn


def load_python_factory(spec: str, options: LoadOptions) -> DiffusionModel:
    """Load ``python:module:factory``; checks the denoiser contract with a clear error."""
    fn = _import_factory(spec)
    try:
        obj = fn()
    except StepoptError:
        raise
    except Exception as e:
        raise StepoptError(f"python:{spec}: calling the factory failed ({e.__class__.__name__}: {e})") from None
    try:
        return _checked_python_model(spec, obj, options)
    except StepoptError:
        raise
    except Exception as e:
        raise StepoptError(
            f"python:{spec}: the factory's object does not work as a denoiser ({e.__class__.__name__}: {e})"
        ) from None


def _checked_python_model(spec: str, obj: Any, options: LoadOptions) -> DiffusionModel:
    if isinstance(obj, DiffusionModel):
        return obj.to(options.device, options.dtype)
    missing = [a for a in ("sigma_min", "sigma_max", "shape") if not hasattr(obj, a)]
    if not callable(obj):
        missing.insert(0, "__call__(x, sigma)")
    if missing:
        raise StepoptError(
            f"python:{spec}: the factory's object lacks {', '.join(missing)} "
            "(a denoiser needs __call__(x, sigma) -> x0_hat, sigma_min, sigma_max and shape)"
        )
    model = PythonModel(obj, f"python:{spec}")
    if not 0 < model.sigma_min < model.sigma_max:
        raise StepoptError(f"python:{spec}: need 0 < sigma_min < sigma_max, got {model.sigma_min}, {model.sigma_max}")
    probe = torch.zeros((1, *model.shape), dtype=model.dtype)
    with torch.no_grad():
        out = model(probe, torch.tensor([model.sigma_max], dtype=torch.float64))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probe.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StepoptError(f"python:{spec}: denoiser returned {got} for input of shape {tuple(probe.shape)}")
    return model.to(options.device, options.dtype)
