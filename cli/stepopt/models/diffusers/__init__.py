"""``diffusers:PATH``: local diffusers folders as stepopt models (pixel UNets and latent text-to-image pipelines).

The package has three modules, imported in this order and never back:

- :mod:`~stepopt.models.diffusers.common`: the DDPM frame on diffusers' ``alphas_cumprod`` table,
  the denoiser-relevant scheduler settings, the output parameterizations and offline file loading;
- :mod:`~stepopt.models.diffusers.pixel`: :class:`DiffusersUNet`, a ``UNet2DModel`` as an EDM-frame
  denoiser (the timestep convention and the parameterization formulas are documented there);
- :mod:`~stepopt.models.diffusers.latent`: :class:`LatentUNet`, the ``UNet2DConditionModel`` and VAE
  of a ``StableDiffusionPipeline`` layout as a conditional denoiser, and :class:`DiffusersLatent`,
  that network under classifier-free guidance (:mod:`stepopt.models.guidance`) for a prompt set
  encoded by the CLIP text encoder.

:func:`load_diffusers` reads the folder's scheduler and UNet configs and hands the folder to the
pixel or the latent loader according to the UNet class. ``diffusers`` (and, for latent pipelines,
``transformers``) are imported only when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stepopt.errors import StepoptError
from stepopt.models.diffusers.common import (
    DIFFUSERS_BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiffusersDiscrete,
    diffusers_frame,
    find_file,
    load_component,
    read_json,
    scheduler_settings,
    state_dtype,
    unet_fingerprint,
    weights_variant,
)
from stepopt.models.diffusers.latent import (
    DEFAULT_GUIDANCE,
    CLIPPromptEncoder,
    Conditioning,
    DiffusersLatent,
    LatentUNet,
    PromptSet,
    conditioning_mismatches,
    configure_conditioning,
    encode_prompts,
    load_latent_pipeline,
    read_prompts,
)
from stepopt.models.diffusers.pixel import DiffusersUNet, load_pixel_unet

__all__ = [
    "DEFAULT_GUIDANCE",
    "DIFFUSERS_BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "CLIPPromptEncoder",
    "Conditioning",
    "DiffusersDiscrete",
    "DiffusersLatent",
    "DiffusersUNet",
    "LatentUNet",
    "PromptSet",
    "conditioning_mismatches",
    "configure_conditioning",
    "diffusers_frame",
    "encode_prompts",
    "load_component",
    "load_diffusers",
    "load_latent_pipeline",
    "load_pixel_unet",
    "read_prompts",
    "scheduler_settings",
    "state_dtype",
    "unet_fingerprint",
    "weights_variant",
]


def load_diffusers(
    path: str, device: torch.device, dtype: torch.dtype | None = None, *, round_timesteps: bool = True
) -> DiffusersUNet | DiffusersLatent:
    """Load ``diffusers:PATH`` (see the module docstring) onto ``device``, the network in ``dtype`` (float32)."""
    folder = Path(path).expanduser()
    if not path or not folder.is_dir():
        raise StepoptError(f"diffusers:{path}: no such folder; expected a local diffusers model or pipeline folder")
    sched_path = find_file(folder, ("scheduler/scheduler_config.json", "scheduler_config.json"), "scheduler config")
    settings = scheduler_settings(read_json(sched_path), sched_path)
    unet_cfg_path = find_file(folder, ("unet/config.json", "config.json"), "UNet config")
    cls = read_json(unet_cfg_path).get("_class_name")
    if cls == "UNet2DConditionModel":
        return load_latent_pipeline(folder, path, settings, device, dtype, round_timesteps=round_timesteps)
    if cls != "UNet2DModel":
        raise StepoptError(
            f"{unet_cfg_path}: model class {cls!r} is not supported; expected 'UNet2DModel' (pixel-space "
            "DDPM-style pipelines) or 'UNet2DConditionModel' (latent text-to-image pipelines)"
        )
    return load_pixel_unet(unet_cfg_path.parent, path, settings, device, dtype, round_timesteps=round_timesteps)
