"""A DDPM-style diffusers ``UNet2DModel`` as a denoiser in stepopt's EDM frame (``diffusers:PATH``, pixel space).

The folder is either a pipeline folder (``unet/`` and ``scheduler/scheduler_config.json``) or a
model folder holding the UNet's ``config.json`` and weights next to ``scheduler_config.json``. The
model id keeps ``PATH`` as given (a relative path resolves against the working directory, also when
a schedule file is reused). The frame (``x = x_t / a_t``, ``sigma = s_t / a_t``) is described in
:mod:`stepopt.models.diffusers.common`.

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

**Gradients** (optimizers that backpropagate into the grid: ld3, trust-region ``teacher_refine``).
A rounded index has zero derivative, so through the sampling model the grid sees the network's time
dependence only through the input scaling ``a`` and the output conversion (on the tiny test UNet
dD/dsigma was a third of its value with the fractional index). :meth:`DiffusersUNet.differentiable_time`
is a twin sharing the network that passes the fractional index ``t(sigma)`` to the sinusoidal time
embedding (the continuous function the integer embeddings are samples of; it equals the sampling
model at every trained timestep). The optimizers train through the twin and score grids with the
sampling model (what a user gets), so gradients are those of the continuous-time loss while every
reported number is the integer-timestep one. A learned embedding table (``time_embedding_type:
learned``) has no value between its rows: its twin is itself (``time_gradient: none``).

**Precision**: grid arithmetic stays float64 and the network runs in its own dtype.
``load_pixel_unet(..., dtype)`` runs the *network* in ``dtype`` (``float32``, ``float16``,
``bfloat16`` or ``float64``); the solver state stays float32 for the half-precision types
(``model.dtype``, what :func:`~stepopt.sampling.initial_noise` uses) and the input scaling, output
conversion and guidance are computed in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stepopt.errors import StepoptError
from stepopt.models.base import DiffusionModel
from stepopt.models.diffusers.common import (
    diffusers_frame,
    load_component,
    output_to_denoised,
    quiet_diffusers,
    state_dtype,
    unet_fingerprint,
)


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
        with quiet_diffusers():
            self.unet.to(device=self.device, dtype=self.net_dtype)
        return self

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The DDPM index the network sees for ``sigma`` (rounded when ``round_timesteps``)."""
        t = self.frame.time(sigma.to(torch.float64))
        return t.round() if self.round_timesteps else t

    @property
    def integer_timesteps(self) -> bool:
        return self.round_timesteps

    def differentiable_time(self) -> DiffusersUNet:
        """A twin (same network) that passes the fractional index: see the module docstring, "Gradients"."""
        if not self.round_timesteps or self._learned_time:
            return self
        twin = copy.copy(self)
        twin.round_timesteps = False
        return twin

    @property
    def time_gradient(self) -> str:
        if not self.round_timesteps:
            return "continuous"
        return "none" if self._learned_time else "fractional-timestep"

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


def load_pixel_unet(
    unet_dir: Path,
    path: str,
    settings: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    round_timesteps: bool = True,
) -> DiffusersUNet:
    """Load the ``UNet2DModel`` in ``unet_dir`` as ``diffusers:PATH`` onto ``device``, the network in ``dtype``."""
    unet_cfg_path = unet_dir / "config.json"
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
