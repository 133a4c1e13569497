"""Fit the embedded default model ``builtin:gmm-digits`` and write it as package data.

A 10-component full-covariance Gaussian mixture (covariance regularisation 1e-3, seed 0) fitted
with scikit-learn to its bundled 8x8 handwritten digits scaled to [-1, 1]. Writes

* ``cli/stepopt/data/gmm_digits.npz``: weights (K,), means (K, 64), covariances (K, 64, 64);
* ``cli/stepopt/data/digits.npz``: the 1797 digits as uint8 in 0..16 and their labels (the
  reference data for metrics).

scikit-learn is needed by this script only (it is in the ``dev`` extra). Run:
``python scripts/fit_gmm_digits.py``. The fit is deterministic for a given scikit-learn version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "cli" / "stepopt" / "data"


def main() -> None:
    from sklearn.datasets import load_digits
    from sklearn.mixture import GaussianMixture

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--components", type=int, default=10)
    ap.add_argument("--reg-covar", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DATA)
    args = ap.parse_args()

    digits = load_digits()
    raw = digits.data.astype(np.uint8)  # values 0..16
    x = raw.astype(np.float64) / 8.0 - 1.0  # [-1, 1]
    gmm = GaussianMixture(
        n_components=args.components,
        covariance_type="full",
        reg_covar=args.reg_covar,
        random_state=args.seed,
        max_iter=500,
        tol=1e-6,
    ).fit(x)
    # Symmetrise exactly so eigh is well defined and the file is canonical.
    cov = 0.5 * (gmm.covariances_ + np.transpose(gmm.covariances_, (0, 2, 1)))
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out / "gmm_digits.npz",
        weights=gmm.weights_.astype(np.float64),
        means=gmm.means_.astype(np.float64),
        covariances=cov.astype(np.float64),
        reg_covar=np.float64(args.reg_covar),
        seed=np.int64(args.seed),
    )
    np.savez_compressed(args.out / "digits.npz", images=raw.reshape(-1, 8, 8), labels=digits.target.astype(np.uint8))
    print(
        f"fitted {args.components} components on {len(x)} digits: "
        f"mean log-likelihood {gmm.score(x):.3f}, converged={gmm.converged_}, iters={gmm.n_iter_}"
    )
    print(f"wrote {args.out / 'gmm_digits.npz'} and {args.out / 'digits.npz'}")


if __name__ == "__main__":
    main()
