"""``diffusers:PATH`` for flow-matching text-to-image pipelines: SD3-style and FLUX-style folders.

A folder whose scheduler is ``FlowMatchEulerDiscreteScheduler`` is loaded here
(:func:`stepopt.models.diffusers.load_diffusers` hands it over): ``model_index.json`` with
``transformer/`` (``SD3Transformer2DModel`` or ``FluxTransformer2DModel``), ``vae/``
(``AutoencoderKL``), the text encoders and tokenizers, and ``scheduler/``.

**Frame** (rectified flow, Esser et al. 2024, eq. 1 and §3.1): ``x_t = (1 - t) z + t eps`` with the
network predicting the velocity ``v = eps - z``. In stepopt's frame (:mod:`stepopt.models.flow`)
``sigma = t / (1 - t)``, the state is ``x_t / (1 - t)`` (noise-scaled at ``t = 1``) and the
denoiser is ``D = x_t - t v``, computed in float64. ``sigma_max = inf``: sampling starts from the
noise itself. The smallest training time is ``1 / T`` (``T = num_train_timesteps``).

**Time the network sees.** SD3's transformer takes ``timestep = 1000 t`` (what its pipeline passes:
the scheduler's ``sigmas * num_train_timesteps``); FLUX's takes ``t`` (its pipeline divides by
1000 and the transformer multiplies by 1000 inside), and its guidance scale likewise.

**Shift** (a :class:`~stepopt.frames.Flow` frame records it, and so does every schedule file):
with a static shift (SD3: ``shift: 3.0``) the pipeline's default grid is ``t = s u / (1 + (s - 1)
u)``; with ``use_dynamic_shifting`` (FLUX) the pipeline computes ``mu`` from the image sequence
length ``L`` (the packed latent's tokens, ``(H/2) (W/2)``; SD3: ``(H/p) (W/p)`` for patch ``p``) by
the line through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``, and
the exponential time shift ``t = e^mu / (e^mu + 1/u - 1)`` is the shift ``s = e^mu``. ``mu``
depends on the resolution, so the model id may carry one: ``diffusers:PATH:height=H,width=W``
(pixels, as the pipelines take them; default the pipeline's, SD3 ``sample_size`` times the VAE
factor, FLUX 128 times it).

**State shape.** SD3: the latent ``(C, H, W)``. FLUX: also the unpacked latent ``(C, H, W)``; the
adapter packs it into ``(H/2 W/2, 4C)`` tokens of 2x2 patches for the transformer and unpacks the
velocity (packing is a fixed permutation, so every solver step is the same in either layout), with
the image ids ``(0, row, col)`` of the patches and zero text ids, as FluxPipeline makes them.

**Conditioning** (the prompts, :class:`~stepopt.models.diffusers.latent.PromptSet`), encoded as the
pipelines' ``encode_prompt`` does:

- SD3: both CLIP encoders' penultimate hidden states, concatenated on the feature axis and
  zero-padded to the T5 width, then the T5 encoder's last hidden state (``max_sequence_length``
  256; zeros without a T5 encoder) on the token axis; the pooled projection is both CLIP text
  embeddings side by side. Classifier-free guidance (SD3 default 7.0) is the wrapper's: one
  transformer call of ``2B`` rows counted as one evaluation.
- FLUX: the CLIP encoder's pooled output and the T5 encoder's last hidden state
  (``max_sequence_length`` 512). The guidance scale (default 3.5) is the transformer's own
  ``guidance`` input (guidance distillation): one call of ``B`` rows, one evaluation. FLUX's "true
  CFG" (a negative prompt and ``true_cfg_scale``, two calls) is not supported.

**Fingerprint**: the transformer's state dict, the scheduler's denoiser-relevant settings and
every text encoder's weights; the VAE is not hashed (it does not change the latent ODE).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stepopt.errors import StepoptError
from stepopt.frames import Flow
from stepopt.models.diffusers.common import load_component, quiet_diffusers, read_json, state_dtype, unet_fingerprint
from stepopt.models.diffusers.latent import (
    ENCODE_BATCH,
    DiffusersLatent,
    PromptSet,
    TextToImageNetwork,
)
from stepopt.models.flow import denoised_from_velocity, flow_input, parse_key_values

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
SD3_GUIDANCE = 7.0  # StableDiffusion3Pipeline's default guidance_scale
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
SD3_T5_TOKENS = 256  # the pipelines' default max_sequence_length
FLUX_T5_TOKENS = 512
FLUX_DEFAULT_LATENT = 128  # FluxPipeline's default_sample_size (latent pixels before the 2x2 packing)

# Scheduler options that change the grid in ways the flow frame does not model.
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")
_SETTINGS = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "time_shift_type",
)


def flow_scheduler_settings(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """The settings of a ``FlowMatchEulerDiscreteScheduler`` config, with the scheduler's own defaults, validated."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        full: Any = FlowMatchEulerDiscreteScheduler.from_config(dict(config)).config
    except (ValueError, TypeError, ImportError) as e:
        raise StepoptError(f"{where}: not a valid FlowMatchEulerDiscreteScheduler config ({e})") from None
    for key in _UNSUPPORTED:
        if full.get(key):
            raise StepoptError(f"{where}: {key}={full[key]!r} is not supported for flow models yet")
    if full.get("stochastic_sampling"):
        raise StepoptError(f"{where}: stochastic_sampling is not a probability-flow ODE; not supported")
    s = {k: full.get(k) for k in _SETTINGS}
    if s["use_dynamic_shifting"] and s["time_shift_type"] != "exponential":
        raise StepoptError(
            f"{where}: time_shift_type {s['time_shift_type']!r} is not supported; expected 'exponential' (shift e^mu)"
        )
    nt = s["num_train_timesteps"]
    if isinstance(nt, bool) or not isinstance(nt, int) or not 2 <= nt <= 1_000_000:
        raise StepoptError(f"{where}: num_train_timesteps = {nt!r}: expected an integer from 2 to 1000000")
    if not s["use_dynamic_shifting"] and not (isinstance(s["shift"], (int, float)) and s["shift"] > 0):
        raise StepoptError(f"{where}: shift = {s['shift']!r}: expected a number > 0")
    return s


def dynamic_mu(settings: Mapping[str, Any], seq_len: int) -> float:
    """The pipelines' ``calculate_shift``: ``mu`` on the line through (base_len, base_shift), (max_len, max_shift)."""
    m = (settings["max_shift"] - settings["base_shift"]) / (
        settings["max_image_seq_len"] - settings["base_image_seq_len"]
    )
    return float(settings["base_shift"] + m * (seq_len - settings["base_image_seq_len"]))


def _pixels(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise ValueError(f"must be an integer number of pixels, got '{value}'") from None
    if v < 1:
        raise ValueError("must be >= 1")
    return v


def parse_resolution(text: str) -> dict[str, int]:
    """``height=H,width=W`` (pixels; either may be omitted) from the part after ``diffusers:PATH:``."""
    return parse_key_values(
        text, {"height": _pixels, "width": _pixels}, "height=H,width=W (pixels) after the folder", skip_empty=False
    )


# -- the networks ----------------------------------------------------------------------------------


class FlowTransformer(TextToImageNetwork):
    """A flow-matching transformer with its VAE, as an unguided conditional denoiser on the latent.

    ``D = x_t - t v`` in the flow frame (module docstring); subclasses call the transformer
    (:meth:`velocity`). The state dtype follows the network's (:func:`state_dtype`).
    """

    parameterization = "flow"
    cond_keys: tuple[str, ...] = ("encoder_hidden_states", "pooled_projections")

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        frame: Flow,
        shape: tuple[int, int, int],
        *,
        id: str,
        fingerprint: str,
        pipeline: str,
        settings: Mapping[str, Any],
    ) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.attach_vae(vae, shape)
        self.id = id
        self.pipeline = pipeline
        self.settings = dict(settings)
        self.frame = frame
        self.sigma_min = float(frame.sigma(frame.t_min))
        self.sigma_max = math.inf
        self.shape = shape
        self._fingerprint = fingerprint
        self.device = next(transformer.parameters()).device
        self.net_dtype = next(transformer.parameters()).dtype
        self.dtype = state_dtype(self.net_dtype)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def network(self) -> Any:
        return self.transformer

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlowTransformer:
        """Move to ``device``; run the transformer in ``dtype`` (the VAE in float32; float64 with a float64 network)."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.net_dtype = dtype
            self.dtype = state_dtype(dtype)
        vae_dtype = torch.float64 if self.net_dtype == torch.float64 else torch.float32
        with quiet_diffusers():
            self.transformer.to(device=self.device, dtype=self.net_dtype)
            self.vae.to(device=self.device, dtype=vae_dtype)
        return self

    def _check_cond(self, cond: Mapping[str, Any]) -> None:
        missing = [k for k in self.cond_keys if cond.get(k) is None]
        unknown = set(cond) - set(self.cond_keys)
        if missing or unknown:
            raise StepoptError(f"{self.id}: the {self.pipeline} transformer takes {', '.join(self.cond_keys)}")

    @abstractmethod
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """The velocity ``v`` (float64) for ``x_t`` ``(B, *shape)`` in the network dtype at flow times ``t``."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        self._check_cond(cond)
        x_t, t = flow_input(x.to(torch.float64), sigma.to(device=x.device, dtype=torch.float64))
        v = self.velocity(x_t.to(self.net_dtype), t, cond)
        return denoised_from_velocity(x_t, t, v).to(x.dtype)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["network_dtype"] = str(self.net_dtype).removeprefix("torch.")
        d["latent"] = {
            "pipeline": self.pipeline,
            "image_shape": list(self.image_shape or ()),
            "vae_scaling_factor": self.scaling_factor,
            "vae_shift_factor": self.shift_factor,
        }
        return d


class SD3Network(FlowTransformer):
    """An ``SD3Transformer2DModel``: ``v = transformer(x_t, 1000 t, text tokens, pooled projection)``."""

    default_guidance = SD3_GUIDANCE

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        timestep = (t * float(self.settings["num_train_timesteps"])).to(self.net_dtype)
        out = self.transformer(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]
        return out.to(torch.float64)


class FluxNetwork(FlowTransformer):
    """A ``FluxTransformer2DModel`` on the packed latent, with image ids and (when it has one) the guidance input."""

    default_guidance = FLUX_GUIDANCE

    def __init__(self, transformer: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(transformer, *args, **kwargs)
        embeds = bool(transformer.config.guidance_embeds)
        self.guidance_input = "embedded" if embeds else "none"
        self.cond_keys = ("encoder_hidden_states", "pooled_projections", *(("guidance",) if embeds else ()))
        _, h, w = self.shape
        rows = torch.arange(h // 2, dtype=torch.float64)[:, None].expand(h // 2, w // 2)
        cols = torch.arange(w // 2, dtype=torch.float64)[None, :].expand(h // 2, w // 2)
        self._img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H/2 W/2, 4C)``: 2x2 patches, channel-major in a patch (FluxPipeline's order)."""
        b, c, h, w = z.shape
        return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`pack`."""
        c, h, w = self.shape
        b = tokens.shape[0]
        return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        emb = cond["encoder_hidden_states"]
        guidance = cond.get("guidance")
        out = self.transformer(
            hidden_states=self.pack(x_t),
            timestep=t.to(self.net_dtype),
            guidance=None if guidance is None else guidance.to(self.net_dtype),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=emb,
            txt_ids=torch.zeros(emb.shape[1], 3, device=x_t.device, dtype=self.net_dtype),
            img_ids=self._img_ids.to(device=x_t.device, dtype=self.net_dtype),
            return_dict=False,
        )[0]
        return self.unpack(out.to(torch.float64))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["latent"]["packed_tokens"] = (self.shape[1] // 2) * (self.shape[2] // 2)
        return d


# -- prompt encoders -------------------------------------------------------------------------------


def _tokens(tokenizer: Any, prompts: Sequence[str], length: int) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")[
        "input_ids"
    ]


def _too_long(tokenizer: Any, prompts: Sequence[str], length: int) -> set[int]:
    ids = tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
    return {i for i, row in enumerate(ids) if len(row) > length}


class _Encoders:
    """Text encoders run without gradients, in batches of ``ENCODE_BATCH`` prompts."""

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], lengths: Sequence[int]) -> None:
        self.tokenizers = list(tokenizers)
        self.encoders = [e.eval().requires_grad_(False) for e in encoders]
        self.lengths = list(lengths)
        self.max_length = min(self.lengths)

    def to(self, device: torch.device, dtype: torch.dtype) -> _Encoders:
        for e in self.encoders:
            e.to(device=device, dtype=dtype)
        return self

    def truncated(self, prompts: Sequence[str]) -> list[int]:
        cut: set[int] = set()
        for tok, n in zip(self.tokenizers, self.lengths, strict=False):
            cut |= _too_long(tok, prompts, n)
        return sorted(cut)

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        parts = [self.encode(list(prompts[i : i + ENCODE_BATCH])) for i in range(0, len(prompts), ENCODE_BATCH)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SD3PromptEncoder(_Encoders):
    """``StableDiffusion3Pipeline.encode_prompt``: tokens ``(P, L_clip + L_t5, D_t5)`` and pooled ``(P, 2 proj)``."""

    def __init__(self, clips: Sequence[tuple[Any, Any]], t5: tuple[Any, Any] | None, t5_dim: int) -> None:
        clip_len = int(clips[0][0].model_max_length)  # the pipeline uses the first tokenizer's length for both
        toks = [c[0] for c in clips] + ([t5[0]] if t5 else [])
        encs = [c[1] for c in clips] + ([t5[1]] if t5 else [])
        super().__init__(toks, encs, [clip_len, clip_len] + ([SD3_T5_TOKENS] if t5 else []))
        self.max_length = clip_len
        self.t5_dim = t5_dim
        self.has_t5 = t5 is not None

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            hidden, pooled = [], []
            for tok, enc in zip(self.tokenizers[:2], self.encoders[:2], strict=True):
                device = next(enc.parameters()).device
                out = enc(_tokens(tok, prompts, self.lengths[0]).to(device), output_hidden_states=True)
                pooled.append(out[0])  # the projected text embedding
                hidden.append(out.hidden_states[-2])  # the penultimate layer
            clip = torch.cat(hidden, dim=-1)
            ref = self.encoders[0]
            if self.has_t5:
                t5_enc = self.encoders[2]
                ids = _tokens(self.tokenizers[2], prompts, SD3_T5_TOKENS).to(next(t5_enc.parameters()).device)
                t5 = t5_enc(ids)[0].to(clip.dtype)
            else:  # the pipeline's zeros without a T5 encoder
                t5 = torch.zeros(len(prompts), SD3_T5_TOKENS, self.t5_dim, device=clip.device, dtype=clip.dtype)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            dtype = next(ref.parameters()).dtype
            return {
                "encoder_hidden_states": torch.cat([clip, t5], dim=-2).to(dtype),
                "pooled_projections": torch.cat(pooled, dim=-1).to(dtype),
            }


class FluxPromptEncoder(_Encoders):
    """``FluxPipeline.encode_prompt``: T5 tokens ``(P, 512, D_t5)`` and the CLIP pooled output ``(P, D_clip)``."""

    def __init__(self, clip: tuple[Any, Any], t5: tuple[Any, Any]) -> None:
        super().__init__([clip[0], t5[0]], [clip[1], t5[1]], [int(clip[0].model_max_length), FLUX_T5_TOKENS])

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            clip, t5 = self.encoders
            ids = _tokens(self.tokenizers[0], prompts, self.lengths[0]).to(next(clip.parameters()).device)
            pooled = clip(ids).pooler_output
            ids2 = _tokens(self.tokenizers[1], prompts, self.lengths[1]).to(next(t5.parameters()).device)
            tokens = t5(ids2)[0]
            return {"encoder_hidden_states": tokens, "pooled_projections": pooled.to(tokens.dtype)}


# -- loading ---------------------------------------------------------------------------------------

SD3_TEXT = {
    "text_encoder": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_3": ("T5EncoderModel",),
    "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast"),
}
FLUX_TEXT = {
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("T5EncoderModel",),
    "tokenizer_2": ("T5Tokenizer", "T5TokenizerFast"),
}
TRANSFORMERS = {"SD3Transformer2DModel": SD3_TEXT, "FluxTransformer2DModel": FLUX_TEXT}
OPTIONAL = ("text_encoder_3", "tokenizer_3")  # SD3 runs without its T5 encoder (zeros)


def _component_class(index: Mapping[str, Any], index_path: Path, name: str, allowed: Sequence[str]) -> str | None:
    entry = index.get(name)
    if entry in (None, [None, None]) and name in OPTIONAL:
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise StepoptError(f"{index_path}: no '{name}' component; expected [library, class]")
    if entry[1] not in allowed:
        raise StepoptError(f"{index_path}: {name} class {entry[1]!r} is not supported; expected {', '.join(allowed)}")
    if not (index_path.parent / name).is_dir():
        raise StepoptError(f"{index_path.parent / name}: no such folder; the pipeline's {name} is missing")
    return str(entry[1])


def _load_text_parts(folder: Path, index: Mapping[str, Any], spec: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The text encoders and tokenizers named in ``spec`` (None for an absent optional one), offline."""
    from stepopt.models.diffusers.common import weights_variant
    from stepopt.models.diffusers.latent import load_pretrained_text

    try:
        import transformers
    except ImportError:
        raise StepoptError(
            f"{folder}: {index.get('_class_name', 'this pipeline')} needs the 'transformers' package for its text "
            "encoders (pip install 'stepopt[diffusers]')"
        ) from None
    parts: dict[str, Any] = {}
    for name, allowed in spec.items():
        cls = _component_class(index, folder / "model_index.json", name, allowed)
        if cls is None:
            parts[name] = None
            continue
        kwargs: dict[str, Any] = {}
        if name.startswith("text_encoder"):
            variant = weights_variant(folder / name, "model")
            kwargs = {"variant": variant} if variant else {}
        parts[name] = load_pretrained_text(getattr(transformers, cls), folder / name, cls, **kwargs)
    if "text_encoder_3" in spec and (parts["text_encoder_3"] is None) != (parts["tokenizer_3"] is None):
        raise StepoptError(f"{folder / 'model_index.json'}: text_encoder_3 and tokenizer_3 come together or not at all")
    return parts


def load_flow_pipeline(
    folder: Path,
    path: str,
    scheduler_config: Mapping[str, Any],
    scheduler_path: Path,
    device: torch.device,
    dtype: torch.dtype | None = None,
    resolution: Mapping[str, int] | None = None,
) -> DiffusersLatent:
    """Load an SD3- or FLUX-style folder (module docstring); default prompt ``""``, the pipeline's guidance."""
    settings = flow_scheduler_settings(scheduler_config, scheduler_path)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise StepoptError(
            f"{folder}: a flow-matching scheduler outside a pipeline folder; expected model_index.json with "
            "transformer/, vae/, the text encoders and scheduler/"
        )
    index = read_json(index_path)
    pipeline = str(index.get("_class_name", "?"))
    tcls = _component_class(index, index_path, "transformer", tuple(TRANSFORMERS))
    _component_class(index, index_path, "vae", ("AutoencoderKL",))
    import diffusers

    transformer = load_component(getattr(diffusers, str(tcls)), folder / "transformer", str(tcls))
    vae = load_component(diffusers.AutoencoderKL, folder / "vae", "AutoencoderKL")
    c: Any = transformer.config
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    flux = tcls == "FluxTransformer2DModel"
    channels = int(c.in_channels) // 4 if flux else int(c.in_channels)
    where = folder / "transformer" / "config.json"
    if int(vae.config.latent_channels) != channels:
        raise StepoptError(
            f"{folder / 'vae'}: latent_channels {vae.config.latent_channels} != the transformer's {channels}"
        )
    if flux and int(c.patch_size) != 1:
        raise StepoptError(f"{where}: patch_size {c.patch_size}: FLUX-style transformers take packed 2x2 patches (1)")
    if (c.out_channels or c.in_channels) != c.in_channels:
        raise StepoptError(f"{where}: out_channels {c.out_channels} must equal in_channels {c.in_channels}")
    patch = 2 if flux else int(c.patch_size)
    default_px = (FLUX_DEFAULT_LATENT if flux else int(c.sample_size)) * f
    res = dict(resolution or {})
    h_px, w_px = res.get("height", default_px), res.get("width", default_px)
    for name, px in (("height", h_px), ("width", w_px)):
        if px % (f * patch):
            raise StepoptError(
                f"diffusers:{path}: {name} {px} must be a multiple of {f * patch} (the VAE factor {f} times the "
                f"transformer's patch {patch})"
            )
    h, w = h_px // f, w_px // f
    mu = dynamic_mu(settings, (h // patch) * (w // patch)) if settings["use_dynamic_shifting"] else None
    frame = Flow(shift=float(settings["shift"]), mu=mu, t_min=1.0 / int(settings["num_train_timesteps"]))
    text = _load_text_parts(folder, index, TRANSFORMERS[str(tcls)])
    extra = {k: v for k, v in text.items() if k.startswith("text_encoder") and v is not None}
    fp_settings = {**settings, "transformer": tcls}
    fp = unet_fingerprint(transformer.float(), fp_settings, extra=extra)
    ident = f"diffusers:{path}"
    net_cls = FluxNetwork if flux else SD3Network
    net = net_cls(
        transformer, vae, frame, (channels, h, w), id=ident, fingerprint=fp, pipeline=pipeline, settings=settings
    )
    net.to(device, dtype or torch.float32)
    encoder: FluxPromptEncoder | SD3PromptEncoder
    if flux:
        encoder = FluxPromptEncoder(
            (text["tokenizer"], text["text_encoder"]), (text["tokenizer_2"], text["text_encoder_2"])
        )
    else:
        t5 = (text["tokenizer_3"], text["text_encoder_3"]) if text["text_encoder_3"] is not None else None
        clips = [(text["tokenizer"], text["text_encoder"]), (text["tokenizer_2"], text["text_encoder_2"])]
        encoder = SD3PromptEncoder(clips, t5, int(c.joint_attention_dim))
    guidance = net.default_guidance if net.guidance_input != "none" else 1.0
    return DiffusersLatent.from_prompts(net, encoder, PromptSet(guidance=guidance))[0]
