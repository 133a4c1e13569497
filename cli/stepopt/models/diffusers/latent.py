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
``D = D_uncond + s (D_cond - D_uncond)``. ``D`` is affine in the network output ``F`` with the same
coefficients for both halves (same ``x`` and ``sigma``), so this equals the conversion of
``F_uncond + s (F_cond - F_uncond)``, which is what diffusers computes on the noise prediction.
Both halves come from ONE network call on a batch of ``2B`` (``[uncond; cond]``, as diffusers lays
it out); stepopt counts it as one network evaluation, so a schedule's NFE does not depend on the
guidance. ``s = 1`` makes one call of ``B`` rows (conditional only); ``0 <= s < 1`` interpolates
toward the unconditional model (diffusers switches guidance off for every ``s <= 1``; here only
``s = 1`` is guidance-free). Guidance rescaling (``guidance_rescale``) is not applied.

**Fingerprint**: the UNet's as in the pixel adapter plus the text encoder's weights (they decide
the conditioning); the VAE is not hashed: it does not change the latent ODE, so a schedule stays
valid with a fine-tuned decoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

DEFAULT_GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance_scale
TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
ENCODE_BATCH = 64  # prompts per text-encoder call
DECODE_BATCH = 8  # latents per VAE call


@dataclass(frozen=True)
class PromptSet:
    """Prompts (sample of seed ``s`` uses ``prompts[s % len(prompts)]``), the negative prompt and the guidance scale."""

    prompts: tuple[str, ...] = ("",)
    negative_prompt: str = ""
    guidance: float = DEFAULT_GUIDANCE

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
        if not self.prompts:
            raise StepoptError("the prompt set is empty; give --prompt TEXT or a --prompt-file with one prompt a line")
        g = float(self.guidance)
        if not math.isfinite(g) or g < 0:
            raise StepoptError(f"--guidance {self.guidance}: expected a finite scale >= 0 (1.0 = no guidance)")
        object.__setattr__(self, "guidance", g)

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
            raise StepoptError(f"--prompt-file {path}: cannot read ({e.__class__.__name__}: {e})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise StepoptError(f"--prompt-file {path}: no prompts; expected one prompt a line")
        out.extend(lines)
    return tuple(out)


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


class DiffusersLatent(DiffusersUNet):
    """A latent ``UNet2DConditionModel`` with its VAE and prompt encoder; the denoiser works on the latent.

    Call as ``model(x, sigma, prompt_index=idx)`` with ``x`` of shape ``(B, *shape)`` (the latent) and
    ``idx`` a ``(B,)`` index into the bound prompts (omit it with one prompt).
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
        encoder: CLIPPromptEncoder | None = None,
        pipeline: str = "StableDiffusionPipeline",
        round_timesteps: bool = True,
    ) -> None:
        super().__init__(unet, settings, id=id, fingerprint=fingerprint, round_timesteps=round_timesteps)
        vcfg: Any = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.encoder = encoder
        self.pipeline = pipeline
        self.scaling_factor = float(vcfg.scaling_factor)
        self.shift_factor = float(getattr(vcfg, "shift_factor", None) or 0.0)
        f = 2 ** (len(vcfg.block_out_channels) - 1)
        self.image_shape = (int(vcfg.out_channels), self.shape[1] * f, self.shape[2] * f)
        self.prompt_set: PromptSet | None = None
        self.guidance = DEFAULT_GUIDANCE
        self._master: tuple[torch.Tensor, torch.Tensor] | None = None  # (cond (P, L, D), uncond (1, L, D))
        self._cond: torch.Tensor | None = None
        self._uncond: torch.Tensor | None = None
        self._encoded = False  # the bound embeddings came from self.encoder (re-encoded on a dtype change)

    # -- device, dtype and conditioning ----------------------------------------------------------

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusersLatent:
        super().to(device, dtype)
        vae_dtype = torch.float64 if self.net_dtype == torch.float64 else torch.float32
        with quiet_diffusers():
            self.vae.to(device=self.device, dtype=vae_dtype)
        if self.encoder is not None:
            self.encoder.to(self.device, self.net_dtype)
        if self._encoded and self.prompt_set is not None and self.encoder is not None:
            self.set_prompts(self.prompt_set)  # re-encode in the new dtype (exact, not a cast of a cast)
        else:
            self._place_embeddings()
        return self

    def set_prompts(self, prompts: PromptSet) -> list[str]:
        """Encode and bind ``prompts`` (with its negative prompt and guidance); returns notes (e.g. truncation)."""
        if self.encoder is None:
            raise StepoptError(f"{self.id}: no text encoder is loaded; bind embeddings with set_prompt_embeddings")
        uniq = list(dict.fromkeys([prompts.negative_prompt, *prompts.prompts]))
        emb = self.encoder(uniq)
        row = {p: i for i, p in enumerate(uniq)}
        cond = emb[[row[p] for p in prompts.prompts]]
        uncond = emb[row[prompts.negative_prompt]][None]
        self._bind(cond, uncond, prompts, encoded=True)
        cut = self.encoder.truncated(uniq)
        if not cut:
            return []
        return [
            f"{len(cut)} prompt(s) exceed the text encoder's {self.encoder.max_length} tokens and are truncated "
            f"(as diffusers does), e.g. {uniq[cut[0]][:60]!r}"
        ]

    def set_prompt_embeddings(
        self, cond: torch.Tensor, uncond: torch.Tensor, guidance: float, prompts: PromptSet | None = None
    ) -> None:
        """Bind precomputed text embeddings: ``cond`` ``(P, L, D)``, ``uncond`` ``(L, D)`` or ``(1, L, D)``."""
        cond = torch.as_tensor(cond)
        uncond = torch.as_tensor(uncond).reshape(1, *cond.shape[1:])
        if cond.ndim != 3 or cond.shape[0] < 1:
            raise StepoptError(f"{self.id}: prompt embeddings must have shape (P, L, D), got {tuple(cond.shape)}")
        record = prompts or PromptSet(tuple(f"<embedding {i}>" for i in range(cond.shape[0])), "<embedding>", guidance)
        self._bind(cond, uncond, PromptSet(record.prompts, record.negative_prompt, guidance), encoded=False)

    def set_guidance(self, guidance: float) -> None:
        """Change the guidance scale, keeping the bound prompts."""
        if self.prompt_set is None:
            raise StepoptError(f"{self.id}: no prompts are bound; call set_prompts first")
        ps = self.prompt_set
        self.prompt_set = PromptSet(ps.prompts, ps.negative_prompt, guidance)
        self.guidance = self.prompt_set.guidance

    def _bind(self, cond: torch.Tensor, uncond: torch.Tensor, prompts: PromptSet, *, encoded: bool) -> None:
        self.prompt_set = prompts
        self._encoded = encoded
        self.guidance = prompts.guidance
        self._master = (cond.detach(), uncond.detach())
        self._place_embeddings()

    def _place_embeddings(self) -> None:
        if self._master is not None:
            cond, uncond = self._master
            self._cond = cond.to(device=self.device, dtype=self.net_dtype)
            self._uncond = uncond.to(device=self.device, dtype=self.net_dtype)

    @property
    def n_prompts(self) -> int:
        return 0 if self._cond is None else int(self._cond.shape[0])

    def cond_for_seeds(self, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{"prompt_index": seed mod P}`` for the samples of ``seeds`` (see the module docstring)."""
        p = max(self.n_prompts, 1)
        return {"prompt_index": torch.tensor([int(s) % p for s in seeds], dtype=torch.long)}

    def conditioning_record(self) -> dict[str, Any] | None:
        return None if self.prompt_set is None else self.prompt_set.record()

    def conditioning_prompts(self) -> list[str]:
        return [] if self.prompt_set is None else list(self.prompt_set.prompts)

    # -- the denoiser ------------------------------------------------------------------------------

    def _rows(self, cond: Mapping[str, Any], batch: int, device: torch.device) -> torch.Tensor:
        unknown = set(cond) - {"prompt_index"}
        if unknown:
            raise StepoptError(f"{self.id}: unknown conditioning {sorted(unknown)}; this pipeline takes prompt_index")
        if self._cond is None:
            raise StepoptError(f"{self.id}: no prompts are bound; call set_prompts first")
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

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """Guided ``F = F_u + s (F_c - F_u)`` (float64) from one UNet call on ``[uncond; cond]`` (2B rows)."""
        b = x_t.shape[0]
        rows = self._rows(cond, b, x_t.device)
        assert self._cond is not None and self._uncond is not None
        emb = self._cond.index_select(0, rows.to(self._cond.device))
        c = self.shape[0]
        if self.guidance == 1.0:
            return self.unet(x_t, t, encoder_hidden_states=emb).sample[:, :c].to(torch.float64)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        emb2 = torch.cat([self._uncond.expand(b, -1, -1), emb])
        out = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=emb2).sample
        f = out[:, :c].to(torch.float64)
        f_u, f_c = f[:b], f[b:]
        return f_u + self.guidance * (f_c - f_u)

    # -- images ------------------------------------------------------------------------------------

    def decode(self, x: torch.Tensor, batch_size: int = DECODE_BATCH) -> torch.Tensor:
        """Images ``(B, *image_shape)`` in ``[-1, 1]`` (float32, CPU) from final states ``x`` (the EDM-frame latent)."""
        vae_dtype = next(self.vae.parameters()).dtype
        outs = []
        with torch.no_grad():
            for chunk in x.split(max(1, int(batch_size))):
                z = chunk.to(device=self.device, dtype=vae_dtype) / self.scaling_factor + self.shift_factor
                outs.append(self.vae.decode(z).sample.to(torch.float32).clamp(-1.0, 1.0).cpu())
        return torch.cat(outs) if outs else torch.empty((0, *(self.image_shape or ())))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["latent"] = {
            "pipeline": self.pipeline,
            "image_shape": list(self.image_shape or ()),
            "vae_scaling_factor": self.scaling_factor,
            "vae_shift_factor": self.shift_factor,
            "guidance": self.guidance,
            "n_prompts": self.n_prompts,
        }
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


def _load_transformers(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    try:
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
    text_encoder = _load_transformers(getattr(transformers, te_cls), folder / "text_encoder", te_cls, **te_kwargs)
    tok_type = getattr(transformers, tok_cls, None) or transformers.CLIPTokenizer
    tokenizer = _load_transformers(tok_type, folder / "tokenizer", tok_cls)
    hidden = int(text_encoder.config.hidden_size)
    cad = c.cross_attention_dim
    if isinstance(cad, int) and cad != hidden:
        raise StepoptError(f"{unet_cfg}: cross_attention_dim {cad} != the text encoder's hidden_size {hidden}")
    fp = unet_fingerprint(unet.float(), settings, extra={"text_encoder": text_encoder})
    model = DiffusersLatent(
        unet,
        vae,
        settings,
        id=f"diffusers:{path}",
        fingerprint=fp,
        encoder=CLIPPromptEncoder(tokenizer, text_encoder),
        pipeline=pipeline,
        round_timesteps=round_timesteps,
    )
    model.to(device, dtype or torch.float32)
    model.set_prompts(PromptSet())
    return model


# -- the command-line options, as library calls ----------------------------------------------------


def configure_conditioning(
    model: DiffusionModel,
    prompts: Sequence[str] = (),
    prompt_file: str | os.PathLike[str] | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    *,
    default_guidance: float | None = None,
    recorded: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]] | None:
    """Bind ``--prompt``/``--prompt-file``/``--negative-prompt``/``--guidance`` to ``model``.

    Returns ``(record, notes)`` for a text-conditioned model (defaults: the prompt ``""``, the
    negative prompt ``""``, ``guidance`` else ``default_guidance`` else 7.5; a model with fixed
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
        ("--prompt", prompts),
        ("--prompt-file", prompt_file),
        ("--negative-prompt", negative_prompt),
        ("--guidance", guidance),
    )
    given = [name for name, v in options if v not in (None, (), [])]
    if not isinstance(model, DiffusersLatent):
        if given:
            raise StepoptError(
                f"{given[0]}: {model.id} takes no text conditioning (only latent text-to-image diffusers pipelines do)"
            )
        return None
    if model.encoder is None:  # fixed embeddings (e.g. from a python: factory): only the guidance can change
        if given and given[0] != "--guidance":
            raise StepoptError(f"{given[0]}: {model.id} has no text encoder; its prompt embeddings are fixed")
        g0 = guidance if guidance is not None else default_guidance
        model.set_guidance(model.guidance if g0 is None else g0)
        record = model.conditioning_record()
        return (record, []) if record is not None else None
    g = guidance if guidance is not None else (default_guidance if default_guidance is not None else DEFAULT_GUIDANCE)
    neg = negative_prompt if negative_prompt is not None else default_negative
    ps = PromptSet(read_prompts(prompts, prompt_file) or default_prompts, neg, g)
    notes = model.set_prompts(ps)
    return {**ps.record(), "prompts": list(ps.prompts)}, notes


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
