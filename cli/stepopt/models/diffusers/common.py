"""What the pixel and latent diffusers adapters share: the DDPM frame, scheduler settings and file loading.

**Noise levels.** A DDPM model with T steps has ``x_t = a_t x0 + s_t eps`` with
``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)`` at integer indices ``t = 0 .. T-1``. In
stepopt's EDM frame ``sigma_t = s_t / a_t`` and the state is ``x = x_t / a_t``, so
``a_t = 1 / sqrt(1 + sigma^2)`` and ``s_t = sigma a_t``. The frame is a
:class:`~stepopt.frames.VPDiscrete` built on the ``alphas_cumprod`` table that diffusers itself
computes from the config (float32, exactly the noise levels the network was trained at; a float64
recomputation differs by up to 3e-4 relative in sigma). Native time is the fractional DDPM index
(log sigma interpolated linearly between indices); the sigma range is ``[sigma(0), sigma(T-1)]``.

**Files** are read offline (``local_files_only=True``), weights from safetensors where present (a
``.bin`` file is read by diffusers with ``weights_only=True``); a ``.<variant>.safetensors`` file
(e.g. ``fp16``) is used when no plain one exists.

**Fingerprint**: sha256 over the UNet's state dict (names, float32 tensors as loaded, before any
dtype cast) and the denoiser-relevant scheduler settings (prediction type, betas, T), plus the
state dicts of extra modules that change the ODE (e.g. a text encoder).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepopt.errors import StepoptError
from stepopt.frames import VPDiscrete
from stepopt.models.base import fingerprint_arrays

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Scheduler settings that determine the denoiser (defaults are diffusers' DDPMScheduler defaults).
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class DiffusersDiscrete(VPDiscrete):
    """A :class:`VPDiscrete` frame on an explicit ``alphas_cumprod`` table (diffusers' float32 one)."""

    alphas_cumprod_table: np.ndarray | None = field(default=None, repr=False, compare=False)
    trained_betas: bool = False

    def __post_init__(self) -> None:
        if self.alphas_cumprod_table is None:
            super().__post_init__()
            return
        self._set_table(np.asarray(self.alphas_cumprod_table, dtype=np.float32))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["trained_betas"] = self.trained_betas
        d["alphas_cumprod"] = "float32, as diffusers computes it"
        return d


def scheduler_settings(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """The denoiser-relevant settings of a DDPM-style scheduler config, validated."""
    if "beta_schedule" not in config and "trained_betas" not in config:
        cls = config.get("_class_name", "?")
        raise StepoptError(
            f"{where}: scheduler {cls} is not DDPM-style; expected a config with beta_schedule or trained_betas"
        )
    s = {k: config.get(k, v) for k, v in _SCHEDULER_DEFAULTS.items()}
    if s["prediction_type"] not in PREDICTION_TYPES:
        raise StepoptError(
            f"{where}: prediction_type '{s['prediction_type']}' is not supported; "
            f"expected one of {', '.join(PREDICTION_TYPES)}"
        )
    if s["trained_betas"] is None and s["beta_schedule"] not in DIFFUSERS_BETA_SCHEDULES:
        raise StepoptError(
            f"{where}: beta_schedule '{s['beta_schedule']}' is not supported; "
            f"expected one of {', '.join(DIFFUSERS_BETA_SCHEDULES)} or trained_betas"
        )
    if config.get("rescale_betas_zero_snr"):
        raise StepoptError(f"{where}: rescale_betas_zero_snr (zero terminal SNR) is not supported yet")
    nt = s["num_train_timesteps"]
    if isinstance(nt, bool) or not isinstance(nt, int) or not 2 <= nt <= 1_000_000:
        raise StepoptError(f"{where}: num_train_timesteps = {nt!r}: expected an integer from 2 to 1000000")
    for k in ("beta_start", "beta_end"):
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise StepoptError(f"{where}: {k} = {v!r}: expected a number in (0, 1)")
    tb = s["trained_betas"]
    if tb is not None and (
        not isinstance(tb, list)
        or len(tb) < 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in tb)
    ):
        raise StepoptError(f"{where}: trained_betas: expected null or a list of at least 2 numbers in (0, 1)")
    return s


def diffusers_frame(settings: Mapping[str, Any]) -> DiffusersDiscrete:
    """The noise frame of a scheduler config, on diffusers' own ``alphas_cumprod`` table."""
    from diffusers import DDPMScheduler

    sched: Any = DDPMScheduler(
        num_train_timesteps=int(settings["num_train_timesteps"]),
        beta_start=float(settings["beta_start"]),
        beta_end=float(settings["beta_end"]),
        beta_schedule=str(settings["beta_schedule"]),
        trained_betas=settings["trained_betas"],
    )
    abar = sched.alphas_cumprod.detach().cpu().numpy().astype(np.float64)
    if not (np.all(np.isfinite(abar)) and np.all((abar > 0) & (abar < 1)) and np.all(np.diff(abar) < 0)):
        raise StepoptError("scheduler betas give alphas_cumprod outside (0, 1) or not decreasing")
    return DiffusersDiscrete(
        beta_schedule=str(settings["beta_schedule"]),
        num_train_timesteps=len(abar),
        beta_start=float(settings["beta_start"]),
        beta_end=float(settings["beta_end"]),
        alphas_cumprod_table=abar,
        trained_betas=settings["trained_betas"] is not None,
    )


HALF_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(net_dtype: torch.dtype) -> torch.dtype:
    """The solver-state dtype for a network in ``net_dtype``: float32 for half precision, else the same."""
    return torch.float32 if net_dtype in HALF_DTYPES else net_dtype


def output_to_denoised(
    parameterization: str, x64: torch.Tensor, a: torch.Tensor, s: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    """``D(x, sigma)`` from the network output ``F`` (float64; see the module docstring for each formula)."""
    if parameterization == "epsilon":
        return x64 - s * f
    if parameterization == "v_prediction":
        return a * (a * x64 - s * f)
    return f


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' advice-level log messages (accelerate, dtype casts) while loading."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def find_file(folder: Path, candidates: tuple[str, ...], what: str) -> Path:
    for c in candidates:
        if (folder / c).is_file():
            return folder / c
    raise StepoptError(f"{folder}: no {what}; expected one of {', '.join(candidates)} in the folder")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StepoptError(f"{path}: cannot read JSON config ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise StepoptError(f"{path}: expected a JSON object")
    return data


def unet_fingerprint(
    unet: torch.nn.Module, settings: Mapping[str, Any], extra: Mapping[str, torch.nn.Module] | None = None
) -> str:
    """sha256 over the state dict (sorted names + tensors) and the denoiser-relevant scheduler settings.

    ``extra`` modules (e.g. a text encoder) are hashed after the UNet, their names prefixed by the key.
    """
    arrays: list[Any] = []
    for name, tensor in sorted(unet.state_dict().items()):
        arrays.append(np.frombuffer(name.encode(), dtype=np.uint8))
        arrays.append(tensor)
    arrays.append(np.frombuffer(json.dumps(dict(settings), sort_keys=True).encode(), dtype=np.uint8))
    for key, module in sorted((extra or {}).items()):
        for name, tensor in sorted(module.state_dict().items()):
            arrays.append(np.frombuffer(f"{key}.{name}".encode(), dtype=np.uint8))
            arrays.append(tensor.float() if tensor.is_floating_point() else tensor)
    return fingerprint_arrays(arrays)


def weights_variant(folder: Path, stem: str) -> str | None:
    """The variant (e.g. ``fp16``) of ``stem.<variant>.safetensors`` weights when no plain ``stem.*`` file exists."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if any(n.startswith((f"{stem}.safetensors", f"{stem}.bin", f"{stem}-")) for n in names):
        return None
    for n in sorted(names):
        m = re.fullmatch(rf"{re.escape(stem)}\.([A-Za-z0-9_]+)\.(safetensors|bin)(\.index\.json)?", n)
        if m:
            return m.group(1)
    return None


def load_component(cls: Any, folder: Path, what: str, stem: str = "diffusion_pytorch_model") -> Any:
    """``cls.from_pretrained(folder)`` offline (safetensors when present); errors name the folder."""
    has_st = any(folder.glob("*.safetensors"))
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": has_st}
    variant = weights_variant(folder, stem)
    if variant is not None:
        kwargs["variant"] = variant
    try:
        with quiet_diffusers():
            return cls.from_pretrained(folder, low_cpu_mem_usage=False, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())[:300]
        raise StepoptError(f"{folder}: cannot load {what} weights ({msg})") from None
