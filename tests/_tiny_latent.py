"""Tiny, randomly initialised latent text-to-image parts (diffusers + transformers) for tests and smoke runs.

``UNet2DConditionModel`` (4 latent channels, 8x8, cross-attention width 16), ``AutoencoderKL``
(8x8 latent <-> 16x16 RGB) and, when ``transformers`` is installed, a 2-layer ``CLIPTextModel``
with a ``CLIPTokenizer`` built from a small byte-level BPE vocabulary made here (every printable
ASCII character plus a few merged words), saved as a ``StableDiffusionPipeline`` folder.
Untrained (fixed torch seeds): enough to compare implementations and exercise loading and the CLI.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

CROSS_DIM = 16
MAX_TOKENS = 16  # the tokenizer's model_max_length (= the text encoder's positions)
WORDS = ("a", "cat", "dog", "photo", "of", "the", "red", "blue")  # whole-word tokens beside the characters


def tiny_cond_unet(seed: int = 0, cross_dim: int = CROSS_DIM, sample_size: int = 8) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def tiny_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def ddpm_scheduler(prediction_type: str = "epsilon") -> Any:
    """Stable Diffusion's training schedule (scaled_linear, 0.00085 .. 0.012, T = 1000)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny CLIP-style byte-level BPE: specials, printable ASCII (plain and word-final ``</w>``), word merges."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    merges: list[tuple[str, str]] = []
    for w in WORDS:  # merge each word left to right into one whole-word token
        parts = [*w[:-1], w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            tokens.append(parts[0])
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, list(dict.fromkeys(merges))


def tiny_clip(folder: Path, seed: int = 0) -> tuple[Any, Any]:
    """(tokenizer, text encoder) with the vocabulary of :func:`bpe_vocab`.

    transformers 5 builds a ``CLIPTokenizer`` from ``vocab``/``merges`` values; transformers 4 from
    ``vocab.json``/``merges.txt`` files, which are written to ``folder`` for it.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = bpe_vocab()
    try:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    except TypeError:  # transformers 4: the (slow) tokenizer reads files
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), model_max_length=MAX_TOKENS
        )
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CROSS_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return tokenizer, CLIPTextModel(config).eval()


def make_tiny_sd(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` (needs transformers) under ``folder``; returns ``folder``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    tokenizer, text_encoder = tiny_clip(folder.parent / f"{folder.name}-bpe", seed=seed)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_cond_unet(seed),
        scheduler=ddpm_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def make_latent_folder_without_clip(folder: Path, *, seed: int = 0) -> Path:
    """A pipeline folder with UNet, VAE and scheduler saved by diffusers, and CLIP folders holding configs only.

    For checking what the loader says when ``transformers`` is missing (the CLIP weights could not
    be written without it). ``model_index.json`` is written as diffusers writes it.
    """
    folder = Path(folder)
    tiny_cond_unet(seed).save_pretrained(folder / "unet")
    tiny_vae(seed).save_pretrained(folder / "vae")
    ddpm_scheduler().save_pretrained(folder / "scheduler")
    for sub in ("text_encoder", "tokenizer"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def make_embedded_latent(n_prompts: int = 2, guidance: float = 3.0) -> Any:
    """A latent model with fixed prompt embeddings and no text encoder (a ``python:`` factory; no CLIP needed).

    ``python:_tiny_latent:make_embedded_latent`` exercises the latent path of the CLI (guidance,
    per-seed prompts, VAE decoding) on the real diffusers UNet and VAE above.
    """
    from stepopt.models.diffusers import DiffusersLatent, LatentUNet, scheduler_settings, unet_fingerprint

    settings = scheduler_settings(dict(ddpm_scheduler().config), Path("scheduler_config.json"))
    unet = tiny_cond_unet()
    fp = unet_fingerprint(unet, settings)
    net = LatentUNet(unet, tiny_vae(), settings, id="python:_tiny_latent:make_embedded_latent", fingerprint=fp)
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(n_prompts, 6, CROSS_DIM, generator=g)
    return DiffusersLatent.from_embeddings(net, cond, torch.randn(1, 6, CROSS_DIM, generator=g), guidance)


def make_embedded_latent_one_prompt() -> Any:
    """:func:`make_embedded_latent` with a single prompt (callers need not pass a prompt index)."""
    model = make_embedded_latent(n_prompts=1)
    model.id = "python:_tiny_latent:make_embedded_latent_one_prompt"
    return model
