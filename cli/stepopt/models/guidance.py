"""Classifier-free guidance as a denoiser that wraps a conditional one.

Ho & Salimans (2022), eq. 6, written for the denoiser: ``D = D_u + s (D_c - D_u)``, where
``D_c = inner(x, sigma, **{key: c})`` uses the sample's conditioning ``c`` and ``D_u`` the
unconditional (negative) one. The wrapper holds the guidance scale ``s`` and the embeddings and
never changes the model it wraps; a different scale or prompt set is a different wrapper
(:meth:`ClassifierFreeGuidance.with_scale`). Both halves come from ONE call of the inner model on
``2B`` rows (``[uncond; cond]``, the layout of diffusers' pipelines and k-diffusion's
``CFGDenoiser``), so a guided evaluation counts as one network evaluation; ``s = 1`` calls the inner
model once on ``B`` rows (conditional only). ``D`` is affine in the network's output with the same
coefficients for both halves (same ``x`` and ``sigma``), so combining the denoised halves in float64
equals diffusers' combination of the noise predictions up to float64 rounding.

Row ``b`` of a batch uses condition ``prompt_index[b]`` (``cond={"prompt_index": ...}``);
:meth:`ClassifierFreeGuidance.cond_for_seeds` gives the sample of seed ``seed`` condition
``seed mod P``, so a sample's condition depends only on its seed. With a single condition the
index may be omitted.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stepopt.errors import StepoptError
from stepopt.models.base import DiffusionModel


def check_guidance(scale: float) -> float:
    """The guidance scale as a float; an error naming the parameter for a negative or non-finite one."""
    g = float(scale)
    if not math.isfinite(g) or g < 0:
        raise StepoptError(f"`guidance` {scale}: expected a finite scale >= 0 (1.0 = no guidance)")
    return g


class ClassifierFreeGuidance(DiffusionModel):
    """``D = D_u + s (D_c - D_u)`` around ``inner`` (see the module docstring).

    ``cond`` ``(P, ...)`` holds one condition per prompt, ``uncond`` ``(1, ...)`` the unconditional
    one; both are passed to ``inner`` as the keyword ``key``. Call as ``model(x, sigma,
    prompt_index=idx)`` with ``idx`` a ``(B,)`` index into ``cond``.
    """

    def __init__(
        self,
        inner: DiffusionModel,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        scale: float,
        *,
        key: str = "encoder_hidden_states",
    ) -> None:
        cond = torch.as_tensor(cond).detach()
        if cond.ndim < 2 or cond.shape[0] < 1:
            raise StepoptError(f"{inner.id}: conditions must have shape (P, ...), got {tuple(cond.shape)}")
        self.inner = inner
        self.scale = check_guidance(scale)
        self.key = key
        self._master = (cond, torch.as_tensor(uncond).detach().reshape(1, *cond.shape[1:]))
        self._placed: tuple[tuple[torch.device, torch.dtype], torch.Tensor, torch.Tensor] | None = None
        self.id = inner.id
        self._sync()

    def _sync(self) -> None:
        """Take the wrapped model's description (frame, shape, device, dtypes, decoder)."""
        m = self.inner
        self.frame, self.shape, self.parameterization = m.frame, m.shape, m.parameterization
        self.sigma_min, self.sigma_max = m.sigma_min, m.sigma_max
        self.device, self.dtype, self.net_dtype = m.device, m.dtype, m.net_dtype
        self.latent, self.image_shape = m.latent, m.image_shape

    def with_scale(self, scale: float) -> ClassifierFreeGuidance:
        """The same conditions at guidance ``scale`` (a new wrapper around the same model)."""
        return ClassifierFreeGuidance(self.inner, *self._master, scale, key=self.key)

    # -- the wrapped model's description ---------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    @property
    def integer_timesteps(self) -> bool:
        """The wrapped network's: grids for it lie on its trained timesteps (``stepopt.build``)."""
        return self.inner.integer_timesteps

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.inner.round_sigma(sigma)

    def differentiable_time(self) -> ClassifierFreeGuidance:
        """The same guidance around the wrapped network's differentiable-time twin (itself if it has none)."""
        inner = self.inner.differentiable_time()
        if inner is self.inner:
            return self
        twin = copy.copy(self)
        twin.inner = inner
        return twin

    @property
    def time_gradient(self) -> str:
        return self.inner.time_gradient

    def decode(self, x: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        return self.inner.decode(x, batch_size)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ClassifierFreeGuidance:
        """Move the wrapped model (in place); the conditions follow it on the next call."""
        self.inner.to(device, dtype)
        self._sync()
        return self

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "guidance": self.scale, "n_prompts": self.n_prompts}

    # -- conditions ------------------------------------------------------------------------------------

    @property
    def n_prompts(self) -> int:
        return int(self._master[0].shape[0])

    def master_conditions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond, uncond)`` as given (before moving them to the network's device and dtype)."""
        return self._master

    def conditions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond, uncond)`` on the wrapped network's device, in its dtype (placed once per device/dtype)."""
        where = (self.inner.device, self.inner.net_dtype)
        if self._placed is None or self._placed[0] != where:
            cond, uncond = self._master
            self._placed = (where, cond.to(device=where[0], dtype=where[1]), uncond.to(device=where[0], dtype=where[1]))
        return self._placed[1], self._placed[2]

    def cond_for_seeds(self, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{"prompt_index": seed mod P}`` for the samples of ``seeds`` (see the module docstring)."""
        p = max(self.n_prompts, 1)
        return {"prompt_index": torch.tensor([int(s) % p for s in seeds], dtype=torch.long)}

    def _rows(self, cond: Mapping[str, Any], batch: int, device: torch.device) -> torch.Tensor:
        unknown = set(cond) - {"prompt_index"}
        if unknown:
            raise StepoptError(f"{self.id}: unknown conditioning {sorted(unknown)}; this pipeline takes prompt_index")
        idx = cond.get("prompt_index")
        if idx is None:
            if self.n_prompts != 1:
                raise StepoptError(
                    f"{self.id}: {self.n_prompts} prompts are bound but the caller passed no per-sample prompt_index "
                    "(this command supports one prompt per run, or use `stepopt sample`)"
                )
            return torch.zeros(batch, dtype=torch.long, device=device)
        rows = torch.as_tensor(idx, dtype=torch.long).reshape(-1).to(device)
        if rows.numel() == 1:
            rows = rows.expand(batch)
        if rows.numel() != batch:
            raise StepoptError(f"{self.id}: prompt_index has {rows.numel()} entries for a batch of {batch}")
        if bool(((rows < 0) | (rows >= self.n_prompts)).any()):
            raise StepoptError(f"{self.id}: prompt_index out of range for {self.n_prompts} prompts")
        return rows

    # -- the guided denoiser ---------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        b = x.shape[0]
        c, u = self.conditions()
        emb = c.index_select(0, self._rows(cond, b, x.device).to(c.device))
        if self.scale == 1.0:
            return self.inner.denoise(x, sigma, **{self.key: emb})
        x64 = x.to(torch.float64)  # both halves and their combination in float64
        both = torch.cat([u.expand(b, *u.shape[1:]), emb])
        d_u, d_c = self.inner.denoise(torch.cat([x64, x64]), torch.cat([sigma, sigma]), **{self.key: both}).chunk(2)
        return (d_u + self.scale * (d_c - d_u)).to(x.dtype)
