"""Train ``builtin:unet-digits``: a small EDM-preconditioned UNet on the shipped 8x8 digits.

EDM training (Karras et al. 2022, Sec. 5 and Table 1): ln(sigma) ~ N(P_mean = -1.2, P_std = 1.2),
loss weight (sigma^2 + sd^2) / (sigma sd)^2, Adam with warm-up, EMA of the weights (the EMA is
what ships). CPU, deterministic given ``--seed`` and ``--threads`` (torch CPU kernels are
deterministic for a fixed thread count). Writes ``cli/stepopt/data/unet_digits.safetensors``.

    python scripts/train_unet_digits.py --steps 6000          # ~10-20 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from stepopt.models import load_digits
from stepopt.models.unet import DigitsUNet, UNetConfig, edm_precondition, save_unet

OUT = Path(__file__).resolve().parents[1] / "cli" / "stepopt" / "data" / "unet_digits.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    data = torch.from_numpy(load_digits()[0]).float()
    cfg = UNetConfig()
    net = DigitsUNet(cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99))
    sd = cfg.sigma_data
    print(f"{sum(p.numel() for p in net.parameters())} parameters, {len(data)} digits, sigma_data {sd}")
    t0 = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(data), (args.batch,), generator=g)
        x0 = data[idx]
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(args.batch, generator=g))
        noise = torch.randn(x0.shape, generator=g) * sigma[:, None, None, None]
        d = edm_precondition(net, x0 + noise, sigma, sd).float()
        weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2)[:, None, None, None]
        loss = (weight * (d - x0) ** 2).mean()
        for grp in opt.param_groups:  # linear warm-up, then cosine decay to 10%
            frac = step / args.steps
            grp["lr"] = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - args.ema)
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if step > 1 else lv
        if step % 500 == 0 or step == args.steps:
            print(f"step {step:6d}  loss {running:.4f}  {time.time() - t0:7.1f} s", flush=True)
    info = {
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "seed": args.seed,
        "threads": args.threads, "final_loss": round(running, 5), "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }  # fmt: skip
    save_unet(args.out, ema, info)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {info}")


if __name__ == "__main__":
    main()
