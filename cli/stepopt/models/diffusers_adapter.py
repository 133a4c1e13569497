"""``diffusers:PATH``: a local diffusers folder holding a pixel-space ``UNet2DModel`` and a DDPM-style scheduler.

The folder is either a pipeline folder (``unet/`` and ``scheduler/scheduler_config.json``) or a
model folder holding the UNet's ``config.json`` and weights next to ``scheduler_config.json``.
It is loaded offline (``local_files_only=True``), weights from safetensors where present (a
``.bin`` file is read by diffusers with ``weights_only=True``). The model id keeps ``PATH`` as given
(a relative path resolves against the working directory, also when a schedule file is reused).

**Noise levels.** A DDPM model with T steps has ``x_t = a_t x0 + s_t eps`` with
``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)`` at integer indices ``t = 0 .. T-1``. In the
EDM frame of design.md §1, ``sigma_t = s_t / a_t`` and the state is ``x = x_t / a_t``, so
``a_t = 1 / sqrt(1 + sigma^2)`` and ``s_t = sigma a_t``. The frame is a
:class:`~stepopt.frames.VPDiscrete` built on the ``alphas_cumprod`` table that diffusers itself
computes from the config (float32, exactly the noise levels the network was trained at; a float64
recomputation differs by up to 3e-4 relative in sigma). Native time is the fractional DDPM index
(log sigma interpolated linearly between indices); the sigma range is ``[sigma(0), sigma(T-1)]``.

**Parameterizations** (network output ``F = unet(a x, t)``, computed in float64):

- ``epsilon``: ``F = eps``, so ``x0 = (x_t - s_t F) / a_t`` and ``D(x, sigma) = x - sigma F``.
- ``v_prediction`` (Salimans & Ho 2022, §4 and App. D; ``v = a_t eps - s_t x0``): since
  ``a_t^2 + s_t^2 = 1``, ``x0 = a_t x_t - s_t v``, so with ``x_t = a_t x`` and ``s_t = sigma a_t``:
  ``D(x, sigma) = a_t (a_t x - sigma F) = x / (1 + sigma^2) - sigma F / sqrt(1 + sigma^2)``.
- ``sample``: ``F = x0`` and ``D(x, sigma) = F``.

A UNet with twice as many output as input channels predicts a variance too (improved DDPM);
the ODE uses only the first half, as diffusers' schedulers do.

**Timestep convention** (``round_timesteps``, on by default; EDM's iDDPM convention): the network
was trained at integer indices only, so it gets the nearest integer index ``t* = round(t(sigma))``
as its timestep, while the input scaling ``a`` and the output conversion above use the ``sigma`` the
state actually has. ``round_sigma(sigma) = sigma(t*)`` is the hook that tells a sampler which sigmas
the network truly supports (EDM snaps its grid with it); on such grids, e.g. diffusers' own
integer-timestep grids, the rounding is exact. Rounding only the index keeps ``D = x0 + sigma
(eps - F)`` consistent for an off-grid sigma, where converting with ``sigma(t*)`` instead would add
``(sigma - sigma(t*)) eps``, up to several percent of sigma near t = 0. With
``round_timesteps=False`` the fractional index is passed (positional embeddings accept it).

**Fingerprint**: sha256 over the UNet's state dict (names, float32 tensors as loaded, before any
dtype cast) and the denoiser-relevant scheduler settings (prediction type, betas, T).

**Precision** (design.md §1): ``load_diffusers(..., dtype)`` runs the *network* in ``dtype``
(``float32``, ``float16``, ``bfloat16`` or ``float64``); the solver state stays float32 for the
half-precision types (``model.dtype``, what :func:`~stepopt.sampling.initial_noise` uses) and the
input scaling, output conversion and guidance are computed in float64.

**Latent text-to-image pipelines** (a ``UNet2DConditionModel`` in ``unet/``, with ``vae/``,
``text_encoder/``, ``tokenizer/``): :func:`load_diffusers` detects them from the UNet class and
hands them to :mod:`stepopt.models.diffusers_latent`, which reuses this module's frame, timestep
convention and parameterizations on the VAE latent.
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
from stepopt.models import register_loader
from stepopt.models.base import DiffusionModel, fingerprint_arrays

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
        abar = np.asarray(self.alphas_cumprod_table, dtype=np.float64)
        object.__setattr__(self, "log_sigmas", 0.5 * np.log((1.0 - abar) / abar))

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


class DiffusersUNet(DiffusionModel):
    """A diffusers ``UNet2DModel`` with its DDPM noise schedule, as a denoiser in the EDM frame."""

    def __init__(
        self,
        unet: Any,
        settings: Mapping[str, Any],
        *,
        id: str,
        fingerprint: str,
        round_timesteps: bool = True,
    ) -> None:
        cfg: Any = unet.config
        size = cfg.sample_size
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        self.unet = unet.eval().requires_grad_(False)
        self.id = id
        self.settings = dict(settings)
        self.parameterization = str(settings["prediction_type"])
        self.frame = diffusers_frame(settings)
        self.sigma_min = self.frame.sigma_min
        self.sigma_max = self.frame.sigma_max
        self.shape = (int(cfg.in_channels), *hw)
        self.round_timesteps = round_timesteps
        self._learned_time = cfg.time_embedding_type == "learned"
        self._fingerprint = fingerprint
        self.device = next(unet.parameters()).device
        self.net_dtype = next(unet.parameters()).dtype
        self.dtype = state_dtype(self.net_dtype)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusersUNet:
        """Move to ``device``; run the network in ``dtype`` (the state dtype follows :func:`state_dtype`)."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.net_dtype = dtype
            self.dtype = state_dtype(dtype)
        with _quiet_diffusers():
            self.unet.to(device=self.device, dtype=self.net_dtype)
        return self

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The DDPM index the network sees for ``sigma`` (rounded when ``round_timesteps``)."""
        t = self.frame.time(sigma.to(torch.float64))
        return t.round() if self.round_timesteps else t

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        if not self.round_timesteps:
            return sigma
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return self.frame.sigma(self.model_time(s))

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """The network's prediction ``F`` (first ``C`` channels, float64) for the VP input ``x_t`` at index ``t``."""
        unknown = set(cond) - {"class_labels"}
        if unknown:
            raise StepoptError(f"{self.id}: unknown conditioning {sorted(unknown)}; this UNet takes class_labels")
        out = self.unet(x_t, t, class_labels=cond.get("class_labels")).sample
        return out[:, : self.shape[0]].to(torch.float64)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = sigma.to(device=x.device, dtype=torch.float64)
        t = self.model_time(sigma)  # only the timestep is rounded (see the module docstring)
        view = (-1, *([1] * (x.ndim - 1)))
        a = (1.0 / torch.sqrt(1.0 + sigma * sigma)).reshape(view)
        s = sigma.reshape(view)
        x64 = x.to(torch.float64)
        x_t = (a * x64).to(self.net_dtype)
        f = self.network_output(x_t, t.long() if self._learned_time else t, cond)
        return output_to_denoised(self.parameterization, x64, a, s, f).to(x.dtype)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["round_timesteps"] = self.round_timesteps
        d["network_dtype"] = str(self.net_dtype).removeprefix("torch.")
        return d


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' advice-level log messages (accelerate, dtype casts) while loading."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _find(folder: Path, candidates: tuple[str, ...], what: str) -> Path:
    for c in candidates:
        if (folder / c).is_file():
            return folder / c
    raise StepoptError(f"{folder}: no {what}; expected one of {', '.join(candidates)} in the folder")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
        with _quiet_diffusers():
            return cls.from_pretrained(folder, low_cpu_mem_usage=False, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())[:300]
        raise StepoptError(f"{folder}: cannot load {what} weights ({msg})") from None


def load_diffusers(
    path: str, device: torch.device, dtype: torch.dtype | None = None, *, round_timesteps: bool = True
) -> DiffusersUNet:
    """Load ``diffusers:PATH`` (see the module docstring) onto ``device`` in ``dtype`` (default float32)."""
    folder = Path(path).expanduser()
    if not path or not folder.is_dir():
        raise StepoptError(f"diffusers:{path}: no such folder; expected a local diffusers model or pipeline folder")
    sched_path = _find(folder, ("scheduler/scheduler_config.json", "scheduler_config.json"), "scheduler config")
    settings = scheduler_settings(_read_json(sched_path), sched_path)
    unet_cfg_path = _find(folder, ("unet/config.json", "config.json"), "UNet config")
    unet_dir = unet_cfg_path.parent
    cls = _read_json(unet_cfg_path).get("_class_name")
    if cls == "UNet2DConditionModel":
        from stepopt.models.diffusers_latent import load_latent_pipeline

        return load_latent_pipeline(folder, path, settings, device, dtype, round_timesteps=round_timesteps)
    if cls != "UNet2DModel":
        raise StepoptError(
            f"{unet_cfg_path}: model class {cls!r} is not supported; expected 'UNet2DModel' (pixel-space "
            "DDPM-style pipelines) or 'UNet2DConditionModel' (latent text-to-image pipelines)"
        )
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise StepoptError(
            "diffusers:PATH models need the 'diffusers' package (pip install 'stepopt[diffusers]')"
        ) from None
    unet = load_component(UNet2DModel, unet_dir, "UNet2DModel")
    c = unet.config
    if c.time_embedding_type == "fourier":
        raise StepoptError(f"{unet_cfg_path}: a Fourier-embedding (VE score) UNet is not a DDPM-style model")
    if c.sample_size is None:
        raise StepoptError(f"{unet_cfg_path}: sample_size is missing; expected the image size the UNet was trained at")
    if c.out_channels not in (c.in_channels, 2 * c.in_channels):
        raise StepoptError(
            f"{unet_cfg_path}: out_channels {c.out_channels} must equal in_channels {c.in_channels}"
            " (or twice it, for a learned variance)"
        )
    if c.time_embedding_type == "learned" and not round_timesteps:
        raise StepoptError(f"{unet_cfg_path}: a learned timestep embedding needs integer timesteps (round_timesteps)")
    fp = unet_fingerprint(unet.float(), settings)
    model = DiffusersUNet(unet, settings, id=f"diffusers:{path}", fingerprint=fp, round_timesteps=round_timesteps)
    return model.to(device, dtype or torch.float32)


def _loader(rest: str, device: torch.device, dtype: torch.dtype | None) -> DiffusionModel:
    return load_diffusers(rest, device, dtype)


register_loader(
    "diffusers",
    _loader,
    "local diffusers folder, offline: pixel UNet2DModel + DDPM-style scheduler (epsilon, v, sample), or a latent "
    "text-to-image pipeline (StableDiffusionPipeline layout: UNet2DConditionModel, AutoencoderKL, CLIP; prompts, "
    "classifier-free guidance, VAE decode; needs transformers)",
)
