"""Build tiny, randomly initialised diffusers folders (UNet2DModel + DDPM scheduler) for tests.

The networks are untrained (fixed torch seed): good enough to compare two implementations of the
same sampler, and to exercise loading, batching and the CLI, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_unet(channels: int = 2, sample_size: int = 8, seed: int = 0, out_channels: int | None = None) -> Any:
    """A ~45k-parameter UNet2DModel (two levels, one attention level) with a fixed random init."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=out_channels or channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


def make_tiny_diffusers(
    folder: Path,
    *,
    prediction_type: str = "epsilon",
    beta_schedule: str = "linear",
    channels: int = 2,
    sample_size: int = 8,
    seed: int = 0,
    layout: str = "pipeline",
    safetensors: bool = True,
    out_channels: int | None = None,
    **scheduler_kw: Any,
) -> Path:
    """Save a tiny UNet2DModel and a DDPMScheduler config under ``folder``; returns ``folder``.

    ``layout='pipeline'`` writes ``unet/`` and ``scheduler/`` subfolders (a pipeline folder);
    ``layout='flat'`` writes the UNet files and ``scheduler_config.json`` into ``folder`` itself.
    """
    from diffusers import DDPMScheduler

    folder = Path(folder)
    unet = tiny_unet(channels, sample_size, seed, out_channels)
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type, **scheduler_kw
    )
    unet_dir = folder / "unet" if layout == "pipeline" else folder
    sched_dir = folder / "scheduler" if layout == "pipeline" else folder
    unet.save_pretrained(unet_dir, safe_serialization=safetensors)
    sched.save_pretrained(sched_dir)
    return folder
