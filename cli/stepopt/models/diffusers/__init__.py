"""``diffusers:PATH``: local diffusers folders as stepopt models (pixel UNets and latent text-to-image pipelines).

The package has three modules, imported in this order and never back:

- :mod:`~stepopt.models.diffusers.common`: the DDPM frame on diffusers' ``alphas_cumprod`` table,
  the denoiser-relevant scheduler settings, the output parameterizations and offline file loading;
- :mod:`~stepopt.models.diffusers.pixel`: :class:`DiffusersUNet`, a ``UNet2DModel`` as an EDM-frame
  denoiser (the timestep convention and the parameterization formulas are documented there);
- :mod:`~stepopt.models.diffusers.latent`: :class:`LatentUNet`, the ``UNet2DConditionModel`` and VAE
  of a ``StableDiffusionPipeline`` layout as a conditional denoiser, and :class:`DiffusersLatent`,
  a text-to-image network under guidance (:mod:`stepopt.models.guidance`) for a prompt set
  encoded by its text encoders;
- :mod:`~stepopt.models.diffusers.flow`: flow-matching pipelines (``FlowMatchEulerDiscreteScheduler``):
  SD3-style (``SD3Transformer2DModel``, CLIP x2 + T5, classifier-free guidance) and FLUX-style
  (``FluxTransformer2DModel``, packed latents, embedded guidance, dynamic shift ``mu``).

:func:`load_diffusers` reads the folder's scheduler config: a flow-matching scheduler goes to the
flow loader, else the UNet config's class picks the pixel or the latent loader. ``diffusers:PATH``
may end in ``:height=H,width=W`` (pixels) for flow pipelines, whose shift ``mu`` depends on the
resolution. ``diffusers`` (and, for text-to-image pipelines, ``transformers``) are imported only
when a model is loaded.
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
from stepopt.models.diffusers.flow import (
    FLOW_SCHEDULERS,
    FlowTransformer,
    FluxNetwork,
    SD3Network,
    load_flow_pipeline,
    parse_resolution,
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
    "FlowTransformer",
    "FluxNetwork",
    "LatentUNet",
    "PromptSet",
    "SD3Network",
    "conditioning_mismatches",
    "configure_conditioning",
    "diffusers_frame",
    "encode_prompts",
    "load_component",
    "load_diffusers",
    "load_flow_pipeline",
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
    resolution: dict[str, int] = {}
    head, sep, tail = path.rpartition(":")
    if path and not folder.is_dir() and sep and "=" in tail and Path(head).expanduser().is_dir():
        folder, resolution = Path(head).expanduser(), parse_resolution(tail)
    if not path or not folder.is_dir():
        raise StepoptError(f"diffusers:{path}: no such folder; expected a local diffusers model or pipeline folder")
    sched_path = find_file(folder, ("scheduler/scheduler_config.json", "scheduler_config.json"), "scheduler config")
    sched_cfg = read_json(sched_path)
    if sched_cfg.get("_class_name") in FLOW_SCHEDULERS:
        return load_flow_pipeline(folder, path, sched_cfg, sched_path, device, dtype, resolution)
    if resolution:
        raise StepoptError(
            f"diffusers:{path}: height/width are options of flow-matching pipelines (SD3, FLUX); this folder's "
            "networks have a fixed sample size"
        )
    settings = scheduler_settings(sched_cfg, sched_path)
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
