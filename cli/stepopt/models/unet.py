"""``builtin:unet-digits``: a small real UNet with EDM preconditioning, trained on the shipped digits.

The network is the neural counterpart of ``builtin:gmm-digits``: same data (8x8 digits in [-1, 1]),
same sigma range, but a real checkpoint (safetensors), real batching and autograd through a network.

Preconditioning (Karras et al. 2022, "Elucidating the Design Space...", Table 1):
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``,
``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``,
``c_noise = log(sigma) / 4``. Training (``scripts/train_unet_digits.py``) uses EDM's loss weighting
``(sigma^2 + sd^2) / (sigma sd)^2`` and log-normal sigma (P_mean -1.2, P_std 1.2).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stepopt.errors import StepoptError
from stepopt.frames import EDM
from stepopt.models.base import DiffusionModel, fingerprint_arrays


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the digits UNet (stored in the checkpoint's metadata)."""

    in_channels: int = 1
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    blocks_per_level: int = 1
    emb_dim: int = 64
    attn_at_lowest: bool = True
    dropout: float = 0.0
    sigma_data: float = 0.75  # std of the digits in [-1, 1] (0.752)


def _groups(ch: int) -> int:
    """GroupNorm groups: 8 channels per group where possible."""
    return math.gcd(ch, max(1, ch // 8))


class FourierNoiseEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise (fixed frequencies, as in DDPM/EDM positional embeddings)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * 1000.0, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        freqs: torch.Tensor = self.freqs  # type: ignore[assignment]
        a = c_noise[:, None].float() * freqs[None]
        return torch.cat([a.cos(), a.sin()], dim=1).to(c_noise.dtype)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.drop(h))


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        out, _ = self.attn(t, t, t, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class DigitsUNet(nn.Module):
    """F(x, c_noise): a two-level UNet for 8x8 inputs (8x8 -> 4x4, attention at 4x4)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = [cfg.channels * m for m in cfg.channel_mult]
        self.embed = nn.Sequential(
            FourierNoiseEmbedding(cfg.emb_dim), nn.Linear(cfg.emb_dim, cfg.emb_dim), nn.SiLU(),
            nn.Linear(cfg.emb_dim, cfg.emb_dim),
        )  # fmt: skip
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch[0]]
        cur = ch[0]
        for lvl, c in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(cur, c, cfg.emb_dim, cfg.dropout))
                cur = c
                skips.append(cur)
            if lvl < len(ch) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = ResBlock(cur, cur, cfg.emb_dim, cfg.dropout)
        self.mid_attn = SelfAttention(cur) if cfg.attn_at_lowest else nn.Identity()
        self.mid2 = ResBlock(cur, cur, cfg.emb_dim, cfg.dropout)
        self.up = nn.ModuleList()
        for lvl, c in reversed(list(enumerate(ch))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(cur + skips.pop(), c, cfg.emb_dim, cfg.dropout))
                cur = c
            if lvl > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = nn.GroupNorm(_groups(cur), cur)
        self.out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h = self.stem(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = m(h)
        return self.out(nn.functional.silu(self.out_norm(h)))


def edm_precondition(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Table 1), sigma of shape (B,)."""
    s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
    sd2 = sigma_data**2
    c_skip = sd2 / (s * s + sd2)
    c_out = s * sigma_data / (s * s + sd2).sqrt()
    c_in = 1.0 / (s * s + sd2).sqrt()
    dt = next(net.parameters()).dtype
    f = net((c_in * x.to(torch.float64)).to(dt), (s.log() / 4).reshape(-1).to(dt))
    return (c_skip * x.to(torch.float64) + c_out * f.to(torch.float64)).to(x.dtype)


def save_unet(path: str | Path, net: DigitsUNet, extra: dict[str, Any] | None = None) -> None:
    """Write weights + config as safetensors (metadata holds the JSON config)."""
    from safetensors.torch import save_file

    from stepopt.io import atomic_path

    cfg = asdict(net.cfg)
    meta = {"config": json.dumps(cfg), "format": "stepopt.unet-digits/v1"}
    if extra:
        meta["training"] = json.dumps(extra)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_unet(path: str | Path) -> tuple[DigitsUNet, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_unet` (safetensors only: no code runs on load)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise StepoptError(f"{p}: no such checkpoint file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise StepoptError(f"{p}: not a readable safetensors checkpoint ({e.__class__.__name__})") from None
    if meta.get("format") != "stepopt.unet-digits/v1":
        raise StepoptError(f"{p}: not a stepopt unet-digits checkpoint (metadata format {meta.get('format')!r})")
    raw = json.loads(meta["config"])
    raw["channel_mult"] = tuple(raw["channel_mult"])
    net = DigitsUNet(UNetConfig(**raw))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise StepoptError(f"{p}: weights do not fit the stored architecture ({str(e).splitlines()[0]})") from None
    info = json.loads(meta.get("training", "{}"))
    return net.eval(), info


class UNetDigits(DiffusionModel):
    """A trained :class:`DigitsUNet` behind the denoiser contract."""

    parameterization = "edm"
    concurrent_batches = True  # a plain module: no state changes in its forward

    def __init__(self, net: DigitsUNet, id: str = "builtin:unet-digits", training: dict[str, Any] | None = None):
        self.net = net.eval().requires_grad_(False)
        self.id = id
        self.shape = (net.cfg.in_channels, 8, 8)
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.frame = EDM(self.sigma_min, self.sigma_max)
        self.sigma_data = net.cfg.sigma_data
        self.training = training or {}
        self.dtype = torch.float32  # solver state; the network may run in half precision (net_dtype)
        self.net_dtype = torch.float32
        self._fingerprint = fingerprint_arrays(v for _, v in sorted(net.state_dict().items()))

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UNetDigits:
        """Move the network; ``dtype`` is the network's precision (the solver state stays float32 or float64)."""
        super().to(device, None)
        if dtype is not None:
            self.net_dtype = dtype
            self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.net.to(device=self.device, dtype=self.net_dtype)
        return self

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "network_dtype": str(self.net_dtype).removeprefix("torch.")}

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return edm_precondition(self.net, x, sigma, self.sigma_data)


def load_unet_digits() -> UNetDigits:
    """The shipped checkpoint ``stepopt/data/unet_digits.safetensors``."""
    ref = resources.files("stepopt.data").joinpath("unet_digits.safetensors")
    with resources.as_file(ref) as p:
        if not Path(p).is_file():
            raise StepoptError(
                "builtin:unet-digits weights are missing from the package; run scripts/train_unet_digits.py"
            )
        net, info = load_unet(p)
    return UNetDigits(net, training=info)
