"""``diffusers:PATH`` for latent text-to-image pipelines (the ``StableDiffusionPipeline`` layout).

A pipeline folder holds ``model_index.json``, ``unet/`` (a ``UNet2DConditionModel``), ``vae/`` (an
``AutoencoderKL``), ``text_encoder/`` + ``tokenizer/`` (CLIP, from ``transformers``) and
``scheduler/`` (DDPM-style betas). It is loaded offline through the same ``diffusers:PATH`` id as
pixel models; :func:`stepopt.models.diffusers.load_diffusers` hands it here when the UNet
class is ``UNet2DConditionModel``.

**State.** The model's state is the VAE latent of Rombach et al. 2022 (LDM, §3 and App. D.1):
``z = scaling_factor * (E(image) - shift_factor)``, of shape ``(unet.in_channels, *unet.sample_size)``;
the image is ``(vae.out_channels, H * f, W * f)`` with ``f = 2 ** (len(vae.block_out_channels) - 1)``.
The latent diffusion is an ordinary DDPM in ``z``, so the EDM frame, the ``alphas_cumprod`` table,
the timestep rounding and the epsilon / v / sample conversions are exactly those of the pixel
adapter (:mod:`stepopt.models.diffusers.pixel`): ``x = z_t / a_t``, ``sigma = s_t / a_t``.
:meth:`DiffusersLatent.decode` maps the final state to images in ``[-1, 1]``:
``image = VAE.decode(x / scaling_factor + shift_factor)``, clipped. The VAE decodes in float32
(float64 for a float64 network) whatever ``--dtype`` is: decoding is a small part of the cost and
half-precision VAEs overflow.

**Conditioning** is a :class:`PromptSet`: the prompts, one negative (unconditional) prompt and the
guidance scale ``s``. Prompts are encoded once by the text encoder exactly as diffusers'
``StableDiffusionPipeline.encode_prompt`` does (padding to the tokenizer's ``model_max_length``,
truncation, the last hidden state; ``clip_skip`` and prompt weighting are not supported). Row ``b``
of a batch uses prompt ``prompt_index[b]`` (``cond={"prompt_index": ...}``);
:meth:`DiffusersLatent.cond_for_seeds` assigns prompt ``seed mod P`` to the sample of seed ``seed``,
so with ``--seed 0`` sample ``i`` gets prompt ``i mod P``, and like its noise a sample's prompt
depends only on its seed (not on batch size, ``--seed`` offsets of other samples, or sharding).
With a single prompt the index may be omitted; with several, a caller that passes none is refused.

**Classifier-free guidance** (Ho & Salimans 2022, eq. 6, written for the denoiser):
``D = D_uncond + s (D_cond - D_uncond)``, by the wrapper :class:`~stepopt.models.guidance.ClassifierFreeGuidance`
around the unguided :class:`LatentUNet` (see there: one network call on ``2B`` rows, counted as one
evaluation, so a schedule's NFE does not depend on the guidance; the float64 combination of the
denoised halves equals diffusers' combination of the noise predictions up to float64 rounding).
:class:`DiffusersLatent` is that wrapper for a prompt set; it never changes: another prompt set or
scale is another model around the same network. ``s = 1`` makes one call of ``B`` rows
(conditional only); ``0 <= s < 1`` interpolates toward the unconditional model (diffusers switches
guidance off for every ``s <= 1``; here only ``s = 1`` is guidance-free). Guidance rescaling
(``guidance_rescale``) is not applied.

**Fingerprint**: the UNet's as in the pixel adapter plus the text encoder's weights (they decide
the conditioning); the VAE is not hashed: it does not change the latent ODE, so a schedule stays
valid with a fine-tuned decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from stepopt.errors import StepoptError
from stepopt.models.base import DiffusionModel
from stepopt.models.diffusers.common import (
    load_component,
    quiet_diffusers,
    read_json,
    unet_fingerprint,
    weights_variant,
)
from stepopt.models.diffusers.pixel import DiffusersUNet
from stepopt.models.guidance import ClassifierFreeGuidance, Condition, check_guidance

DEFAULT_GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance_scale
TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
ENCODE_BATCH = 64  # prompts per text-encoder call
DECODE_BATCH = 8  # latents per VAE call
GUIDANCE_INPUTS = ("cfg", "embedded", "none")
"""How a text-to-image network takes its guidance scale: ``cfg`` (classifier-free guidance by the
wrapper, one call of 2B rows), ``embedded`` (the network's own guidance input, FLUX-style: one call
of B rows) or ``none`` (a network without guidance)."""


@dataclass(frozen=True)
class PromptSet:
    """Prompts (sample of seed ``s`` uses ``prompts[s % len(prompts)]``), the negative prompt and the guidance scale."""

    prompts: tuple[str, ...] = ("",)
    negative_prompt: str = ""
    guidance: float = DEFAULT_GUIDANCE

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
        if not self.prompts:
            raise StepoptError("the prompt set is empty; give `prompts` or a `prompt_file` with one prompt a line")
        object.__setattr__(self, "guidance", check_guidance(self.guidance))

    @property
    def prompts_sha256(self) -> str:
        text = json.dumps(list(self.prompts), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    def record(self) -> dict[str, Any]:
        """What a schedule's ``method.config['conditioning']`` and a samples file record."""
        return {
            "prompts_sha256": self.prompts_sha256,
            "n_prompts": len(self.prompts),
            "guidance": self.guidance,
            "negative_prompt": self.negative_prompt,
        }


def read_prompts(prompts: Sequence[str] = (), prompt_file: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """``--prompt`` values, then the lines of ``--prompt-file`` (UTF-8, one prompt a line; blank lines skipped)."""
    out = [str(p) for p in prompts]
    if prompt_file is not None:
        path = Path(prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StepoptError(f"`prompt_file` {path}: cannot read ({e.__class__.__name__}: {e})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise StepoptError(f"`prompt_file` {path}: no prompts; expected one prompt a line")
        out.extend(lines)
    return tuple(out)


class PromptEncoder(Protocol):
    """Text conditions for a list of prompts: one tensor ``(P, ...)`` or a mapping of such tensors,
    keyed by the network's keywords; ``truncated`` lists prompts longer than the encoders take."""

    max_length: int

    def to(self, device: torch.device, dtype: torch.dtype) -> Any: ...

    def truncated(self, prompts: Sequence[str]) -> list[int]: ...

    def __call__(self, prompts: Sequence[str]) -> Condition: ...


class CLIPPromptEncoder:
    """Text embeddings as ``StableDiffusionPipeline.encode_prompt`` makes them: ``(P, L, D)``, the last hidden state."""

    def __init__(self, tokenizer: Any, text_encoder: Any) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        n_pos = int(getattr(text_encoder.config, "max_position_embeddings", 77))
        m = getattr(tokenizer, "model_max_length", None)
        self.max_length = int(m) if isinstance(m, int) and 0 < m <= n_pos else n_pos

    def to(self, device: torch.device, dtype: torch.dtype) -> CLIPPromptEncoder:
        self.text_encoder.to(device=device, dtype=dtype)
        return self

    def truncated(self, prompts: Sequence[str]) -> list[int]:
        """Indices of prompts longer than the encoder's ``max_length`` tokens (they are cut, as in diffusers)."""
        ids = self.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
        return [i for i, row in enumerate(ids) if len(row) > self.max_length]

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        use_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        outs = []
        with torch.no_grad():
            for start in range(0, len(prompts), ENCODE_BATCH):
                tok = self.tokenizer(
                    list(prompts[start : start + ENCODE_BATCH]),
                    padding="max_length",
                    max_length=self.max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                mask = tok["attention_mask"].to(device) if use_mask else None
                outs.append(self.text_encoder(tok["input_ids"].to(device), attention_mask=mask)[0])
        return torch.cat(outs)


def decode_latents(
    vae: Any,
    x: torch.Tensor,
    scaling_factor: float,
    shift_factor: float,
    device: torch.device,
    batch_size: int,
    grad: bool = False,
) -> torch.Tensor:
    """Images in ``[-1, 1]`` (float32, CPU): ``VAE.decode(x / scaling_factor + shift_factor)``, clipped.

    ``grad``: differentiable in ``x`` (where gradients are enabled) and left on ``device``, for losses
    on the decoded image (LD3's LPIPS on latent models).
    """
    vae_dtype = next(vae.parameters()).dtype
    outs = []
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for chunk in x.split(max(1, int(batch_size))):
            z = chunk.to(device=device, dtype=vae_dtype) / scaling_factor + shift_factor
            image = vae.decode(z).sample.to(torch.float32).clamp(-1.0, 1.0)
            outs.append(image if grad else image.cpu())
    return torch.cat(outs) if outs else torch.empty(0)


class TextToImageNetwork(DiffusionModel):
    """What :class:`DiffusersLatent` needs of the unguided conditional network it wraps, besides the
    denoiser: how it takes guidance (:data:`GUIDANCE_INPUTS`), its pipeline's default scale, the
    network module and the pipeline it came from, and a ``describe()`` with a ``latent`` section."""

    latent = True
    guidance_input: str = "cfg"
    default_guidance: float = DEFAULT_GUIDANCE
    pipeline: str = "StableDiffusionPipeline"
    vae: Any = None

    @property
    def network(self) -> Any:
        """The denoising network module (UNet or transformer)."""
        raise NotImplementedError

    def attach_vae(self, vae: Any, latent_shape: tuple[int, ...]) -> None:
        """Keep the pipeline's VAE (frozen) and the image shape it decodes ``latent_shape`` to."""
        vcfg: Any = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vcfg.scaling_factor)
        self.shift_factor = float(getattr(vcfg, "shift_factor", None) or 0.0)
        f = 2 ** (len(vcfg.block_out_channels) - 1)
        self.image_shape = (int(vcfg.out_channels), latent_shape[1] * f, latent_shape[2] * f)

    def decode(self, x: torch.Tensor, batch_size: int = DECODE_BATCH, *, grad: bool = False) -> torch.Tensor:
        """Images ``(B, *image_shape)`` in ``[-1, 1]`` (float32, CPU) from final states ``x`` (the latent
        in the model's frame); ``grad``: differentiable, on the model's device."""
        images = decode_latents(self.vae, x, self.scaling_factor, self.shift_factor, self.device, batch_size, grad)
        return images if len(x) else torch.empty((0, *(self.image_shape or ())))


class LatentUNet(DiffusersUNet, TextToImageNetwork):
    """A latent ``UNet2DConditionModel`` with its VAE, as an unguided conditional denoiser on the latent.

    Call as ``net(x, sigma, encoder_hidden_states=emb)`` with ``x`` of shape ``(B, *shape)`` (the
    latent) and ``emb`` ``(B, L, D)`` text embeddings; :class:`DiffusersLatent` adds the prompts and
    the guidance.
    """

    latent = True  # a latent-space model (read by optimizers whose defaults differ, e.g. trust-region's p)

    def __init__(
        self,
        unet: Any,
        vae: Any,
        settings: Mapping[str, Any],
        *,
        id: str,
        fingerprint: str,
        pipeline: str = "StableDiffusionPipeline",
        round_timesteps: bool = True,
    ) -> None:
        super().__init__(unet, settings, id=id, fingerprint=fingerprint, round_timesteps=round_timesteps)
        self.attach_vae(vae, self.shape)
        self.pipeline = pipeline

    @property
    def network(self) -> Any:
        return self.unet

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LatentUNet:
        super().to(device, dtype)
        vae_dtype = torch.float64 if self.net_dtype == torch.float64 else torch.float32
        with quiet_diffusers():
            self.vae.to(device=self.device, dtype=vae_dtype)
        return self

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """The conditional prediction ``F`` (first ``C`` channels, float64) for text embeddings ``(B, L, D)``."""
        unknown = set(cond) - {"encoder_hidden_states"}
        emb = cond.get("encoder_hidden_states")
        if unknown or emb is None:
            raise StepoptError(f"{self.id}: the latent UNet takes encoder_hidden_states (B, L, D) as conditioning")
        return self.unet(x_t, t, encoder_hidden_states=emb).sample[:, : self.shape[0]].to(torch.float64)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["latent"] = {
            "pipeline": self.pipeline,
            "image_shape": list(self.image_shape or ()),
            "vae_scaling_factor": self.scaling_factor,
            "vae_shift_factor": self.shift_factor,
        }
        return d


def encode_prompts(encoder: PromptEncoder, prompts: PromptSet) -> tuple[Condition, Condition, list[str]]:
    """``(cond (P, ...), uncond (1, ...), notes)`` for ``prompts`` (each a tensor or a mapping of tensors,
    as the encoder gives them); each distinct text is encoded once."""
    uniq = list(dict.fromkeys([prompts.negative_prompt, *prompts.prompts]))
    emb = encoder(uniq)
    row = {p: i for i, p in enumerate(uniq)}
    idx, neg = [row[p] for p in prompts.prompts], row[prompts.negative_prompt]
    if isinstance(emb, Mapping):
        return (
            {k: v[idx] for k, v in emb.items()},
            {k: v[neg][None] for k, v in emb.items()},
            _truncation_notes(encoder, uniq),
        )
    return emb[idx], emb[neg][None], _truncation_notes(encoder, uniq)


def _truncation_notes(encoder: PromptEncoder, uniq: list[str]) -> list[str]:
    cut = encoder.truncated(uniq)
    return (
        [
            f"{len(cut)} prompt(s) exceed the text encoder's {encoder.max_length} tokens and are truncated "
            f"(as diffusers does), e.g. {uniq[cut[0]][:60]!r}"
        ]
        if cut
        else []
    )


class DiffusersLatent(ClassifierFreeGuidance):
    """A latent text-to-image pipeline: its :class:`TextToImageNetwork` (the SD UNet, or an SD3 / FLUX
    transformer) under guidance for a :class:`PromptSet` (prompts, negative prompt, guidance scale),
    with its text encoder.

    The guidance scale goes where the network takes it (``net.guidance_input``): ``cfg``, classifier-free
    guidance by this wrapper (one call of ``2B`` rows); ``embedded``, the network's own guidance input
    (FLUX), passed as the condition ``guidance`` of every prompt, with this wrapper's scale 1 (one
    call of ``B`` rows); ``none``, no guidance. Call as ``model(x, sigma, prompt_index=idx)`` with
    ``x`` of shape ``(B, *shape)`` (the latent) and ``idx`` a ``(B,)`` index into the prompts (omit it
    with one prompt). The configuration is fixed: :meth:`with_prompts` and :meth:`with_scale` return
    new models around the same network.
    """

    inner: TextToImageNetwork

    def __init__(
        self,
        net: TextToImageNetwork,
        prompts: PromptSet,
        cond: Condition,
        uncond: Condition,
        *,
        encoder: PromptEncoder | None = None,
    ) -> None:
        self.text_conditions = (cond, uncond)
        kind = net.guidance_input
        if kind not in GUIDANCE_INPUTS:
            raise StepoptError(f"{net.id}: guidance input {kind!r}; expected one of {', '.join(GUIDANCE_INPUTS)}")
        if kind == "embedded":  # the scale is an input of the network, one value per prompt row
            c = dict(cond) if isinstance(cond, Mapping) else {"encoder_hidden_states": cond}
            u = dict(uncond) if isinstance(uncond, Mapping) else {"encoder_hidden_states": uncond}
            n = int(next(iter(c.values())).shape[0])
            g = torch.full((n,), prompts.guidance, dtype=torch.float64)
            cond, uncond = {**c, "guidance": g}, {**u, "guidance": g[:1]}
        super().__init__(net, cond, uncond, prompts.guidance if kind == "cfg" else 1.0)
        self.prompt_set = prompts
        self.guidance = prompts.guidance
        self.encoder = encoder  # None: fixed embeddings (only the guidance can change)

    @classmethod
    def from_prompts(
        cls, net: TextToImageNetwork, encoder: PromptEncoder, prompts: PromptSet
    ) -> tuple[DiffusersLatent, list[str]]:
        """Encode ``prompts`` with ``encoder`` (in the network's dtype); returns the model and notes (truncation)."""
        encoder.to(net.device, net.net_dtype)
        cond, uncond, notes = encode_prompts(encoder, prompts)
        return cls(net, prompts, cond, uncond, encoder=encoder), notes

    @classmethod
    def from_embeddings(
        cls,
        net: TextToImageNetwork,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        guidance: float,
        prompts: PromptSet | None = None,
    ) -> DiffusersLatent:
        """Precomputed text embeddings: ``cond`` ``(P, L, D)``, ``uncond`` ``(L, D)`` or ``(1, L, D)``."""
        cond = torch.as_tensor(cond)
        if cond.ndim != 3 or cond.shape[0] < 1:
            raise StepoptError(f"{net.id}: prompt embeddings must have shape (P, L, D), got {tuple(cond.shape)}")
        record = prompts or PromptSet(tuple(f"<embedding {i}>" for i in range(cond.shape[0])), "<embedding>", guidance)
        return cls(net, PromptSet(record.prompts, record.negative_prompt, guidance), cond, uncond)

    @property
    def guidance_input(self) -> str:
        """The wrapped network's (see the class docstring)."""
        return self.inner.guidance_input

    @property
    def default_guidance(self) -> float:
        """The guidance scale the pipeline uses by default (SD 7.5, SD3 7.0, FLUX 3.5)."""
        return self.inner.default_guidance

    def with_prompts(self, prompts: PromptSet) -> tuple[DiffusersLatent, list[str]]:
        """The same network and text encoder for another prompt set; returns the model and notes."""
        if self.encoder is None:
            raise StepoptError(f"{self.id}: no text encoder is loaded; its prompt embeddings are fixed")
        model, notes = DiffusersLatent.from_prompts(self.inner, self.encoder, prompts)
        model.id = self.id
        return model, notes

    def with_scale(self, scale: float) -> DiffusersLatent:
        """The same prompts at guidance ``scale``."""
        ps = PromptSet(self.prompt_set.prompts, self.prompt_set.negative_prompt, scale)
        model = DiffusersLatent(self.inner, ps, *self.text_conditions, encoder=self.encoder)
        model.id = self.id
        return model

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusersLatent:
        """Move the network (in place); prompts encoded by the text encoder are re-encoded in the new dtype."""
        super().to(device, dtype)
        if self.encoder is not None:
            self.encoder.to(self.device, self.net_dtype)
            cond, uncond, _ = encode_prompts(self.encoder, self.prompt_set)  # exact, not a cast of a cast
            fresh = DiffusersLatent(self.inner, self.prompt_set, cond, uncond, encoder=self.encoder)
            self.text_conditions, self._master, self._placed = fresh.text_conditions, fresh._master, None
        return self

    @property
    def network(self) -> Any:
        """The pipeline's denoising network (UNet or transformer)."""
        return self.inner.network

    @property
    def unet(self) -> Any:
        """The pipeline's denoising network (its old name, from the UNet pipelines)."""
        return self.inner.network

    @property
    def vae(self) -> Any:
        """The pipeline's VAE (the wrapped network's)."""
        return self.inner.vae

    def conditioning_record(self) -> dict[str, Any] | None:
        return self.record_for(self.prompt_set)

    def record_for(self, prompts: PromptSet) -> dict[str, Any]:
        """What a schedule records about ``prompts`` on this network (the guidance input when not ``cfg``)."""
        kind = self.guidance_input
        return {**prompts.record(), **({"guidance_input": kind} if kind != "cfg" else {})}

    def conditioning_prompts(self) -> list[str]:
        return list(self.prompt_set.prompts)

    def describe(self) -> dict[str, Any]:
        d = self.inner.describe()
        d["id"] = self.id
        d["latent"] = {**d["latent"], "guidance": self.guidance, "n_prompts": self.n_prompts}
        if self.guidance_input != "cfg":
            d["latent"]["guidance_input"] = self.guidance_input
        return d


# -- loading ---------------------------------------------------------------------------------------


def _component(index: Mapping[str, Any], folder: Path, name: str, allowed: Sequence[str]) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise StepoptError(f"{folder / 'model_index.json'}: no '{name}' component; expected [library, class]")
    if entry[1] not in allowed:
        raise StepoptError(
            f"{folder / 'model_index.json'}: {name} class {entry[1]!r} is not supported; expected {', '.join(allowed)}"
        )
    if not (folder / name).is_dir():
        raise StepoptError(f"{folder / name}: no such folder; the pipeline's {name} is missing")
    return str(entry[1])


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or advice-level messages from ``transformers`` while loading (stderr stays ours)."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load_pretrained_text(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` of a ``transformers`` text encoder or tokenizer, offline and quietly."""
    try:
        with quiet_transformers():
            return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())[:300]
        raise StepoptError(f"{folder}: cannot load {what} ({msg})") from None


def load_latent_pipeline(
    folder: Path,
    path: str,
    settings: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    round_timesteps: bool = True,
) -> DiffusersLatent:
    """Load a StableDiffusionPipeline-style folder (see the module docstring); default prompt ``""``."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise StepoptError(
            f"{folder}: a UNet2DConditionModel is not supported outside a latent text-to-image pipeline folder; "
            "expected model_index.json with unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    index = read_json(index_path)
    pipeline = str(index.get("_class_name", "?"))
    if index.get("text_encoder_2") not in (None, [None, None]):
        raise StepoptError(f"{index_path}: {pipeline} has a second text encoder (SDXL-style); not supported")
    _component(index, folder, "vae", ("AutoencoderKL",))
    te_cls = _component(index, folder, "text_encoder", TEXT_ENCODER_CLASSES)
    tok_cls = _component(index, folder, "tokenizer", TOKENIZER_CLASSES)
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError:
        raise StepoptError(
            "diffusers:PATH models need the 'diffusers' package (pip install 'stepopt[diffusers]')"
        ) from None
    unet_cfg = folder / "unet" / "config.json"
    unet = load_component(UNet2DConditionModel, folder / "unet", "UNet2DConditionModel")
    c = unet.config
    for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type"):
        if getattr(c, key, None) is not None:
            raise StepoptError(f"{unet_cfg}: {key}={getattr(c, key)!r} needs extra conditioning; not supported")
    if c.sample_size is None:
        raise StepoptError(f"{unet_cfg}: sample_size is missing; expected the latent size the UNet was trained at")
    if c.out_channels not in (c.in_channels, 2 * c.in_channels):
        raise StepoptError(f"{unet_cfg}: out_channels {c.out_channels} must equal in_channels {c.in_channels}")
    vae = load_component(AutoencoderKL, folder / "vae", "AutoencoderKL")
    if int(vae.config.latent_channels) != int(c.in_channels):
        raise StepoptError(
            f"{folder / 'vae'}: latent_channels {vae.config.latent_channels} != the UNet's in_channels {c.in_channels}"
        )
    try:
        import transformers
    except ImportError:
        raise StepoptError(
            f"diffusers:{path}: {pipeline} needs the 'transformers' package for its CLIP text encoder "
            "(pip install 'stepopt[diffusers]')"
        ) from None
    variant = weights_variant(folder / "text_encoder", "model")
    te_kwargs = {"variant": variant} if variant else {}
    text_encoder = load_pretrained_text(getattr(transformers, te_cls), folder / "text_encoder", te_cls, **te_kwargs)
    tok_type = getattr(transformers, tok_cls, None) or transformers.CLIPTokenizer
    tokenizer = load_pretrained_text(tok_type, folder / "tokenizer", tok_cls)
    hidden = int(text_encoder.config.hidden_size)
    cad = c.cross_attention_dim
    if isinstance(cad, int) and cad != hidden:
        raise StepoptError(f"{unet_cfg}: cross_attention_dim {cad} != the text encoder's hidden_size {hidden}")
    fp = unet_fingerprint(unet.float(), settings, extra={"text_encoder": text_encoder})
    net = LatentUNet(
        unet, vae, settings, id=f"diffusers:{path}", fingerprint=fp, pipeline=pipeline, round_timesteps=round_timesteps
    )
    net.to(device, dtype or torch.float32)
    return DiffusersLatent.from_prompts(net, CLIPPromptEncoder(tokenizer, text_encoder), PromptSet())[0]


# -- the command-line options, as library calls ----------------------------------------------------


@dataclass(frozen=True)
class Conditioning:
    """A text-conditioned model configured from the command-line options, what it records, and notes."""

    model: DiffusersLatent
    record: dict[str, Any]
    notes: list[str]


def configure_conditioning(
    model: DiffusionModel,
    prompts: Sequence[str] = (),
    prompt_file: str | os.PathLike[str] | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    *,
    default_guidance: float | None = None,
    recorded: Mapping[str, Any] | None = None,
) -> Conditioning | None:
    """The model for ``--prompt``/``--prompt-file``/``--negative-prompt``/``--guidance`` (``model`` is unchanged).

    Returns a :class:`Conditioning` for a text-conditioned model (defaults: the prompt ``""``, the
    negative prompt ``""``, ``guidance`` else ``default_guidance`` else the pipeline's default scale
    (SD 7.5, SD3 7.0, FLUX 3.5); a network with embedded guidance (FLUX) refuses a negative prompt, one
    without guidance also a scale; a model with fixed
    embeddings and no text encoder keeps its prompts and its own guidance unless one is given),
    ``None`` for any other model, which refuses these options. ``recorded`` (a schedule's
    ``method.config['conditioning']``) supplies the defaults of every option it records: the
    guidance, the negative prompt and, where the schedule stores them, the prompts.
    """
    rec = recorded if isinstance(recorded, Mapping) else {}
    if default_guidance is None and isinstance(rec.get("guidance"), (int, float)):
        default_guidance = float(rec["guidance"])
    rec_prompts = rec.get("prompts")
    default_prompts = tuple(str(p) for p in rec_prompts) if isinstance(rec_prompts, list) and rec_prompts else ("",)
    rec_negative = rec.get("negative_prompt")
    default_negative = rec_negative if isinstance(rec_negative, str) else ""
    options = (
        ("`prompts`", prompts),
        ("`prompt_file`", prompt_file),
        ("`negative_prompt`", negative_prompt),
        ("`guidance`", guidance),
    )
    given = [name for name, v in options if v not in (None, (), [])]
    if not isinstance(model, DiffusersLatent):
        if given:
            raise StepoptError(
                f"{given[0]}: {model.id} takes no text conditioning (only latent text-to-image diffusers pipelines do)"
            )
        return None
    kind = model.guidance_input
    if kind != "cfg" and negative_prompt is not None:
        raise StepoptError(
            f"`negative_prompt`: {model.id} takes its guidance as an input of the network ({kind}); "
            "true classifier-free guidance with a negative prompt is not supported for it"
        )
    if kind == "none" and guidance is not None:
        raise StepoptError(f"`guidance`: {model.id} has no guidance input (its transformer has no guidance embedding)")
    if model.encoder is None:  # fixed embeddings (e.g. from a python: factory): only the guidance can change
        if given and given[0] != "`guidance`":
            raise StepoptError(f"{given[0]}: {model.id} has no text encoder; its prompt embeddings are fixed")
        g0 = guidance if guidance is not None else default_guidance
        fixed = model if g0 is None else model.with_scale(g0)
        return Conditioning(fixed, fixed.conditioning_record() or {}, [])
    g = (
        1.0
        if kind == "none"
        else next(v for v in (guidance, default_guidance, model.default_guidance) if v is not None)
    )
    neg = negative_prompt if negative_prompt is not None else default_negative
    ps = PromptSet(read_prompts(prompts, prompt_file) or default_prompts, neg, g)
    configured, notes = model.with_prompts(ps)
    return Conditioning(configured, {**configured.record_for(ps), "prompts": list(ps.prompts)}, notes)


def conditioning_mismatches(
    recorded: Mapping[str, Any] | None, record: Mapping[str, Any] | None
) -> tuple[list[str], list[str]]:
    """(problems, notes) comparing a schedule's ``method.config['conditioning']`` with the sampling run's.

    A different guidance scale is a problem (a schedule is optimized for one guided ODE); a
    different prompt set or negative prompt is only a note (schedules transfer across prompts).
    """
    if not isinstance(recorded, Mapping) or record is None:
        return [], []
    problems, notes = [], []
    g0, g1 = recorded.get("guidance"), record.get("guidance")
    if isinstance(g0, (int, float)) and g1 is not None and float(g0) != float(g1):
        problems.append(f"guidance {g1} differs from the schedule's {g0} (it was optimized for that guided ODE)")
    if recorded.get("prompts_sha256") not in (None, record.get("prompts_sha256")):
        notes.append(
            f"the prompt set ({record.get('n_prompts')} prompts) is not the one the schedule was optimized with "
            f"({recorded.get('n_prompts')} prompts)"
        )
    if recorded.get("negative_prompt") not in (None, record.get("negative_prompt")):
        notes.append(f"the negative prompt differs from the schedule's {recorded.get('negative_prompt')!r}")
    return problems, notes
