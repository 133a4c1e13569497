"""Train the FID-digits feature extractor: a small CNN classifier of the shipped 8x8 digits.

Writes ``cli/stepopt/data/digits_classifier.safetensors`` (float32 weights of
:class:`stepopt.metrics.digits_features.DigitsClassifier`) and prints the held-out accuracy.

Deterministic on CPU: a fixed 80/20 split (numpy seed 0), torch seed 0, one thread,
deterministic algorithms. Training data are augmented by random shifts of up to one pixel.
The shipped weights are the ones trained on the 80% split, so the printed held-out accuracy
is the accuracy of exactly the shipped model.

    python scripts/train_digits_classifier.py [--epochs 40] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stepopt.io import atomic_path
from stepopt.metrics.digits_features import DigitsClassifier
from stepopt.models import load_digits

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cli" / "stepopt" / "data" / "digits_classifier.safetensors"


def shift_batch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image by (dy, dx) in {-1, 0, 1}^2, filling with the background value -1."""
    b = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    d = torch.randint(0, 3, (b, 2), generator=g)
    out = torch.empty_like(x)
    for i in range(b):
        dy, dx = int(d[i, 0]), int(d[i, 1])
        out[i] = pad[i, :, dy : dy + 8, dx : dx + 8]
    return out


def accuracy(net: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    t0 = time.perf_counter()

    images, labels = load_digits(scaled=True)
    perm = np.random.default_rng(0).permutation(len(labels))
    n_train = int(0.8 * len(labels))
    tr, te = perm[:n_train], perm[n_train:]
    x = torch.from_numpy(images).to(torch.float32)
    y = torch.from_numpy(labels).long()
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]

    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(n_train, generator=g)
        for start in range(0, n_train, args.batch_size):
            idx = order[start : start + args.batch_size]
            loss = F.cross_entropy(net(shift_batch(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()

    report = {
        "train_accuracy": accuracy(net, x_tr, y_tr),
        "heldout_accuracy": accuracy(net, x_te, y_te),
        "n_train": int(n_train),
        "n_heldout": len(te),
        "epochs": args.epochs,
        "parameters": sum(p.numel() for p in net.parameters()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(args.out) as tmp:
        # one metadata entry: safetensors writes a map in arbitrary order, one key keeps the file bitwise reproducible
        meta = json.dumps({k: v for k, v in report.items() if k != "seconds"}, sort_keys=True)
        save_file(state, str(tmp), metadata={"training": meta})
        tmp.chmod(0o644)  # package data: readable by everyone (mkstemp creates 0600)
    print(json.dumps({"out": str(args.out), **report}))


if __name__ == "__main__":
    main()
