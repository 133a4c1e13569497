"""Tiny, randomly initialised flow-matching pipelines (SD3-style and FLUX-style) saved as diffusers folders.

``make_tiny_sd3``: ``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel`` (patch 2, 8x8
latent of 4 channels, one joint block), two 2-layer ``CLIPTextModelWithProjection`` encoders and a
2-layer ``T5EncoderModel``, the ``AutoencoderKL`` of ``_tiny_latent`` (16x16 RGB, with SD3's
``shift_factor``) and ``FlowMatchEulerDiscreteScheduler(shift=3)``.

``make_tiny_flux``: ``FluxPipeline`` with a ``FluxTransformer2DModel`` (one double and one single
block, guidance embedding, RoPE axes 4+6+6 = head dim 16), a 2-layer ``CLIPTextModel`` (pooled
output) and a 2-layer ``T5EncoderModel``, the same VAE and the scheduler with dynamic shifting
(FLUX.1-dev's config: base_shift 0.5, max_shift 1.15, sequence lengths 256 .. 4096).

The CLIP tokenizers are ``_tiny_latent``'s byte-level BPE; the T5 tokenizer is a Unigram model over
a few whole words and single letters, built here (``T5Tokenizer(vocab=...)``, saved as
``tokenizer.json``), so everything loads offline. Untrained (fixed torch seeds): enough to compare
implementations and exercise loading and the CLI.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from _tiny_latent import CROSS_DIM, WORDS, tiny_clip, tiny_vae

T5_DIM = 32
CLIP_PROJ = 16  # each SD3 CLIP encoder's text projection
SD3_JOINT_DIM = 2 * CROSS_DIM  # the concatenated CLIP hidden states are padded to the T5 width
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}  # SD3's VAE constants
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1's


def tiny_t5_tokenizer() -> Any:
    """A T5 (Unigram) tokenizer: pad, eos, unk, whole words with the word-start mark, single letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(d_model: int, seed: int = 0) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS) + 4 + 36,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_clip_with_projection(folder: Path, seed: int) -> tuple[Any, Any]:
    """(tokenizer, CLIPTextModelWithProjection) on the vocabulary of ``_tiny_latent``."""
    from transformers import CLIPTextModelWithProjection

    tokenizer, plain = tiny_clip(folder, seed=seed)
    config = plain.config
    config.projection_dim = CLIP_PROJ
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModelWithProjection(config).eval()


def flow_scheduler(**kwargs: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kwargs)


def vae_with(constants: dict[str, float], seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    base = tiny_vae(seed)
    return AutoencoderKL.from_config({**dict(base.config), **constants})


def make_tiny_sd3(folder: Path, *, seed: int = 0, with_t5: bool = True, sample_size: int = 8) -> Path:
    """Save a tiny ``StableDiffusion3Pipeline`` under ``folder``; returns ``folder``."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    tok1, te1 = tiny_clip_with_projection(folder.parent / f"{folder.name}-bpe1", seed)
    tok2, te2 = tiny_clip_with_projection(folder.parent / f"{folder.name}-bpe2", seed + 1)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=SD3_JOINT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_PROJ,
        pos_embed_max_size=16,
    )
    torch.manual_seed(seed)
    vae = vae_with(SD3_VAE, seed)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift=3.0),
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=tiny_t5(SD3_JOINT_DIM, seed) if with_t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if with_t5 else None,
    )
    pipe.save_pretrained(folder)
    return folder


def make_tiny_flux(folder: Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a tiny ``FluxPipeline`` under ``folder``; returns ``folder``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    tok, te = tiny_clip(folder.parent / f"{folder.name}-bpe", seed=seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CROSS_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=flow_scheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=vae_with(FLUX_VAE, seed),
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=tiny_t5(T5_DIM, seed),
        tokenizer_2=tiny_t5_tokenizer(),
    )
    pipe.save_pretrained(folder)
    return folder
