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

A condition is one tensor (passed to ``inner`` as the keyword ``key``) or several, a mapping from
the inner model's keyword to a tensor whose first axis indexes the prompts (SD3: the token
embeddings and the pooled projection; FLUX also its embedded guidance scale per prompt).

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

Condition = torch.Tensor | Mapping[str, torch.Tensor]
"""One prompt-indexed tensor (passed as the wrapper's ``key``) or several, keyed by the inner model's keywords."""


def check_guidance(scale: float) -> float:
    """The guidance scale as a float; an error naming the parameter for a negative or non-finite one."""
    g = float(scale)
    if not math.isfinite(g) or g < 0:
        raise StepoptError(f"`guidance` {scale}: expected a finite scale >= 0 (1.0 = no guidance)")
    return g


class ClassifierFreeGuidance(DiffusionModel):
    """``D = D_u + s (D_c - D_u)`` around ``inner`` (see the module docstring).

    ``cond`` ``(P, ...)`` holds one condition per prompt, ``uncond`` ``(1, ...)`` the unconditional
    one; both are passed to ``inner`` as the keyword ``key`` (or, given as mappings of such tensors,
    as those keywords). Call as ``model(x, sigma, prompt_index=idx)`` with ``idx`` a ``(B,)`` index
    into ``cond``.
    """

    def __init__(
        self,
        inner: DiffusionModel,
        cond: Condition,
        uncond: Condition,
        scale: float,
        *,
        key: str = "encoder_hidden_states",
    ) -> None:
        self.key = key
        c = self._as_mapping(cond)
        n = int(c[next(iter(c))].shape[0]) if c and c[next(iter(c))].ndim else 0
        single_ok = isinstance(cond, Mapping) or c[key].ndim >= 2
        if n < 1 or not single_ok or any(v.ndim < 1 or v.shape[0] != n for v in c.values()):
            shapes = {k: tuple(v.shape) for k, v in c.items()}
            raise StepoptError(
                f"{inner.id}: conditions must have shape (P, ...) with one P for every key, got {shapes}"
            )
        u = self._as_mapping(uncond)
        if set(u) != set(c):
            raise StepoptError(f"{inner.id}: unconditional keys {sorted(u)} differ from the conditions' {sorted(c)}")
        u = {k: v.reshape(1, *c[k].shape[1:]) for k, v in u.items()}
        self.inner = inner
        self.scale = check_guidance(scale)
        self._single = not isinstance(cond, Mapping)
        self._master = (c, u)
        self._placed: tuple[tuple[torch.device, torch.dtype], dict[str, torch.Tensor], dict[str, torch.Tensor]] | None
        self._placed = None
        self.id = inner.id
        self._sync()

    def _as_mapping(self, cond: Condition) -> dict[str, torch.Tensor]:
        if isinstance(cond, Mapping):
            return {str(k): torch.as_tensor(v).detach() for k, v in cond.items()}
        return {self.key: torch.as_tensor(cond).detach()}

    def _unwrap(self, c: dict[str, torch.Tensor]) -> Condition:
        return c[self.key] if self._single else dict(c)

    def _sync(self) -> None:
        """Take the wrapped model's description (frame, shape, device, dtypes, decoder)."""
        m = self.inner
        self.frame, self.shape, self.parameterization = m.frame, m.shape, m.parameterization
        self.sigma_min, self.sigma_max = m.sigma_min, m.sigma_max
        self.device, self.dtype, self.net_dtype = m.device, m.dtype, m.net_dtype
        self.latent, self.image_shape = m.latent, m.image_shape

    def with_scale(self, scale: float) -> ClassifierFreeGuidance:
        """The same conditions at guidance ``scale`` (a new wrapper around the same model)."""
        return ClassifierFreeGuidance(self.inner, *self.master_conditions(), scale, key=self.key)

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

    def decode(self, x: torch.Tensor, batch_size: int = 8, *, grad: bool = False) -> torch.Tensor:
        return self.inner.decode(x, batch_size, grad=grad)

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
        return int(next(iter(self._master[0].values())).shape[0])

    def master_conditions(self) -> tuple[Condition, Condition]:
        """``(cond, uncond)`` as given (before moving them to the network's device and dtype)."""
        return self._unwrap(self._master[0]), self._unwrap(self._master[1])

    def _placed_conditions(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        where = (self.inner.device, self.inner.net_dtype)
        if self._placed is None or self._placed[0] != where:

            def place(c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                return {
                    k: v.to(device=where[0], dtype=where[1] if v.is_floating_point() else v.dtype) for k, v in c.items()
                }

            self._placed = (where, place(self._master[0]), place(self._master[1]))
        return self._placed[1], self._placed[2]

    def conditions(self) -> tuple[Condition, Condition]:
        """``(cond, uncond)`` on the wrapped network's device, in its dtype (placed once per device/dtype)."""
        c, u = self._placed_conditions()
        return self._unwrap(c), self._unwrap(u)

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
        c, u = self._placed_conditions()
        rows = self._rows(cond, b, x.device)
        emb = {k: v.index_select(0, rows.to(v.device)) for k, v in c.items()}
        if self.scale == 1.0:
            return self.inner.denoise(x, sigma, **emb)
        x64 = x.to(torch.float64)  # both halves and their combination in float64
        both = {k: torch.cat([u[k].expand(b, *u[k].shape[1:]), e]) for k, e in emb.items()}
        d_u, d_c = self.inner.denoise(torch.cat([x64, x64]), torch.cat([sigma, sigma]), **both).chunk(2)
        return (d_u + self.scale * (d_c - d_u)).to(x.dtype)
