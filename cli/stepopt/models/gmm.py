"""``builtin:gmm-digits``: a Gaussian mixture whose denoiser is exact in closed form.

For data ``x0 ~ sum_k w_k N(mu_k, Sigma_k)`` and ``x = x0 + sigma eps`` the posterior mean is

    D(x, sigma) = sum_k r_k(x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^{-1} (x - mu_k)],
    r_k(x) ∝ w_k N(x; mu_k, Sigma_k + sigma^2 I),

computed batched in float64 with ``Sigma_k = U_k diag(s_k) U_k^T`` (so every inverse and
log-determinant is elementwise in the eigenbasis) and log-sum-exp responsibilities.

The probability-flow ODE ``dx/d log(sigma) = x - D(x, sigma)`` is integrated by scipy's DOP853
at tight tolerances; :meth:`GaussianMixture.ode_solution` is accurate to ~1e-10 (tests compare
two tolerances), which makes it the exact reference for solvers, optimizers and metrics.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

from stepopt.errors import StepoptError
from stepopt.models.base import AnalyticModel, fingerprint_arrays


class GaussianMixture(AnalyticModel):
    """A full-covariance Gaussian mixture on data of shape ``shape`` (flattened internally)."""

    def __init__(
        self,
        weights: np.ndarray,
        means: np.ndarray,
        covariances: np.ndarray,
        shape: tuple[int, ...] | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        id: str = "builtin:gmm",
    ) -> None:
        super().__init__(sigma_min, sigma_max)
        w = np.asarray(weights, dtype=np.float64)
        mu = np.asarray(means, dtype=np.float64)
        cov = np.asarray(covariances, dtype=np.float64)
        k, d = mu.shape
        if w.shape != (k,) or cov.shape != (k, d, d):
            raise StepoptError(
                f"mixture parameters disagree: weights {w.shape}, means {mu.shape}, covariances {cov.shape}"
            )
        self.id = id
        self.shape = shape if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise StepoptError(f"shape {self.shape} does not hold {d} values")
        self._params = (w, mu, cov)
        self._fingerprint = fingerprint_arrays([w, mu, cov])
        s, u = np.linalg.eigh(0.5 * (cov + cov.transpose(0, 2, 1)))
        if s.min() <= 0:
            raise StepoptError("mixture covariances must be positive definite")
        self.dim = d
        self.log_w = torch.from_numpy(np.log(w / w.sum()))
        self.means = torch.from_numpy(mu)
        self.evals = torch.from_numpy(s)  # (K, d)
        self.evecs = torch.from_numpy(u)  # (K, d, d), columns are eigenvectors

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def weights(self) -> torch.Tensor:
        return self.log_w.exp()

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in (self.log_w, self.means, self.evals, self.evecs))

    def log_responsibilities(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        """log r_k(x) of shape (B, K); ``x`` of shape (B, *shape)."""
        return self._posterior(x, sigma)[0]

    def _posterior(self, x: torch.Tensor, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sig = sig.expand(b) if sig.numel() == 1 else sig
        inf = torch.isinf(sig.detach())
        if bool(inf.any()):
            # Pure noise: x is noise-scaled (README: Conventions); the scaled form at rho = 1/sigma = 0.
            rho = torch.zeros(b, dtype=torch.float64, device=x.device)
            if bool(inf.all()):
                return self._posterior_scaled(x, rho)
            fin = ~inf
            lr_i, post_i = self._posterior_scaled(x[inf], rho[inf])
            lr_f, post_f = self._posterior(x[fin], sig[fin])
            log_r = torch.empty((b, *lr_f.shape[1:]), dtype=lr_f.dtype, device=x.device)
            post = torch.empty((b, *post_f.shape[1:]), dtype=post_f.dtype, device=x.device)
            log_r[inf], log_r[fin] = lr_i, lr_f
            post[inf], post[fin] = post_i, post_f
            return log_r, post
        log_w, mu, s, u = self._on(x.device)
        xf = x.reshape(b, -1).to(torch.float64)
        var = s[None] + (sig * sig)[:, None, None]  # (B, K, d): eigenvalues of Sigma_k + sigma^2 I
        z = torch.einsum("bkd,kde->bke", xf[:, None, :] - mu[None], u)  # U_k^T (x - mu_k)
        log_p = log_w[None] - 0.5 * (torch.log(var).sum(-1) + (z * z / var).sum(-1) + self.dim * math.log(2 * math.pi))
        log_r = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        post = mu[None] + torch.einsum("bke,kde->bkd", z * (s[None] / var), u)  # E[x0 | x, k]
        return log_r, post

    def _posterior_scaled(self, y: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior in the noise-scaled state ``y = x / sigma`` at ``rho = 1 / sigma`` >= 0 (finite at rho = 0).

        With ``x = y / rho``: ``(x - mu)^2 / (s + sigma^2) = (y - rho mu)^2 / (1 + s rho^2)`` and
        ``Sigma (Sigma + sigma^2 I)^{-1} (x - mu) = U diag(s rho / (1 + s rho^2)) U^T (y - rho mu)``; the
        log-determinants differ from the unscaled ones by ``-2 d log rho``, the same for every component.
        """
        log_w, mu, s, u = self._on(y.device)
        b = y.shape[0]
        yf = y.reshape(b, -1).to(torch.float64)
        r = rho.reshape(-1, 1, 1)
        var = 1.0 + s[None] * r * r  # (B, K, d): (s + sigma^2) rho^2
        z = torch.einsum("bkd,kde->bke", yf[:, None, :] - r * mu[None], u)
        log_p = log_w[None] - 0.5 * (torch.log(var).sum(-1) + (z * z / var).sum(-1))
        log_r = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        post = mu[None] + torch.einsum("bke,kde->bkd", z * (s[None] * r / var), u)
        return log_r, post

    def denoise_scaled(self, y: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """D at ``sigma = 1 / rho`` from the noise-scaled state ``y = x / sigma`` (rho = 0: pure noise)."""
        log_r, post = self._posterior_scaled(y, rho)
        d = torch.einsum("bk,bkd->bd", log_r.exp(), post)
        return d.reshape(y.shape).to(y.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        log_r, post = self._posterior(x, sigma)
        d = torch.einsum("bk,bkd->bd", log_r.exp(), post)
        return d.reshape(x.shape).to(x.dtype)

    def denoise_jacobian(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``dD/dx`` at one finite ``sigma`` for a batch ``x``: shape ``(B, d, d)``, float64.

        Tweedie's second moment: ``dD/dx = Cov[x0 | x] / sigma^2`` with the mixture's posterior covariance
        ``sum_k r_k (C_k + m_k m_k^T) - D D^T``, ``C_k = U_k diag(s_k sigma^2 / (s_k + sigma^2)) U_k^T`` the
        component's posterior covariance and ``m_k`` its posterior mean.
        """
        if not (math.isfinite(sigma) and sigma > 0):
            raise StepoptError(f"denoise_jacobian needs a finite sigma > 0, got {sigma}")
        log_r, post = self._posterior(x, sigma)
        r = log_r.exp()
        _, _, s, u = self._on(x.device)
        s2 = sigma * sigma
        ck = torch.einsum("kde,ke,kfe->kdf", u, s * s2 / (s + s2), u)
        d = torch.einsum("bk,bkd->bd", r, post)
        cov = torch.einsum("bk,kde->bde", r, ck) + torch.einsum("bk,bkd,bke->bde", r, post, post)
        cov = cov - d[:, :, None] * d[:, None, :]
        return cov / s2

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact mixture samples: pick k ~ w, then mu_k + U_k diag(sqrt(s_k)) eps."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nde,ne->nd", self.evecs[k], eps * self.evals[k].sqrt())
        return x.reshape(n, *self.shape)

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's exact mean (d,) and covariance (d, d)."""
        w = self.weights
        m = (w[:, None] * self.means).sum(0)
        cov_k = torch.einsum("kde,ke,kfe->kdf", self.evecs, self.evals, self.evecs)
        dm = self.means - m
        c = (w[:, None, None] * (cov_k + dm[:, :, None] * dm[:, None, :])).sum(0)
        return m, c

    def ode_solution(
        self,
        x: torch.Tensor,
        sigma_from: float,
        sigma_to: float,
        rtol: float = 1e-12,
        atol: float = 1e-12,
    ) -> torch.Tensor:
        """Integrate dx/ds = x - D(x, e^s), s = log sigma, from ``sigma_from`` to ``sigma_to`` (DOP853).

        From ``sigma_from = inf`` (``x`` noise-scaled) the first part runs in the frame where pure noise
        is finite: ``dy/drho = D`` for ``y = x / sigma``, ``rho = 1 / sigma`` from 0 to
        ``min(1 / sigma_to, 1)``, then in log sigma from sigma = 1 on.
        """
        shape, dtype, device = x.shape, x.dtype, x.device
        b = shape[0]
        if math.isinf(sigma_from):
            rho_end = min(1.0 / sigma_to, 1.0)
            yy0 = x.detach().reshape(-1).to(torch.float64).cpu().numpy()

            def rhs_scaled(rho: float, yv: np.ndarray) -> np.ndarray:
                yt = torch.from_numpy(yv).reshape(b, self.dim)
                r = torch.full((b,), rho, dtype=torch.float64)
                return self.denoise_scaled(yt, r).reshape(-1).numpy()

            sol = solve_ivp(rhs_scaled, (0.0, rho_end), yy0, method="DOP853", rtol=rtol, atol=atol)
            if not sol.success:  # pragma: no cover
                raise RuntimeError(f"exact ODE reference failed: {sol.message}")
            x_mid = torch.from_numpy(sol.y[:, -1].copy() / rho_end).reshape(shape)
            return self.ode_solution(x_mid, 1.0 / rho_end, sigma_to, rtol, atol).to(device=device, dtype=dtype)
        y0 = x.detach().reshape(-1).to(torch.float64).cpu().numpy()

        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            xt = torch.from_numpy(y).reshape(b, self.dim)
            return (xt - self.denoise(xt, torch.tensor(math.exp(s), dtype=torch.float64))).reshape(-1).numpy()

        if sigma_from == sigma_to:
            return x.clone()
        sol = solve_ivp(rhs, (math.log(sigma_from), math.log(sigma_to)), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:  # pragma: no cover - DOP853 does not fail on this smooth field
            raise RuntimeError(f"exact ODE reference failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape).to(device=device, dtype=dtype)


def load_gmm_digits() -> GaussianMixture:
    """The embedded default model (parameters shipped as package data, no download)."""
    with resources.files("stepopt.data").joinpath("gmm_digits.npz").open("rb") as f:
        p = np.load(f)
        w, mu, cov = p["weights"], p["means"], p["covariances"]
    return GaussianMixture(w, mu, cov, shape=(1, 8, 8), id="builtin:gmm-digits")


def load_digits(scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 shipped 8x8 digits: images (N, 1, 8, 8) in [-1, 1] (or uint8 0..16) and labels."""
    with resources.files("stepopt.data").joinpath("digits.npz").open("rb") as f:
        p = np.load(f)
        images, labels = p["images"], p["labels"]
    images = images[:, None]
    return (images.astype(np.float64) / 8.0 - 1.0 if scaled else images), labels
