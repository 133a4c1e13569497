"""The exact models: denoiser vs Tweedie and Monte Carlo, exact sampling, exact ODE references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stepopt.errors import StepoptError
from stepopt.models import GaussianMixture, IsotropicGaussian, PointMass, builtin_names, load_digits, load_model


def _log_density_direct(m: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p_sigma(x) from dense covariances with torch.distributions (independent of the eigen path)."""
    w, mu, cov = (torch.from_numpy(a) for a in m._params)
    comps = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov + sigma**2 * torch.eye(mu.shape[1]))
    lp = comps.log_prob(x.reshape(x.shape[0], 1, -1)) + torch.log(w / w.sum())
    return torch.logsumexp(lp, dim=1)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5, 2.0, 20.0])
def test_gmm_denoiser_matches_tweedie(gmm, sigma):
    """Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x)."""
    g = torch.Generator().manual_seed(1)
    x0 = gmm.sample(6, generator=g)
    x = (x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(_log_density_direct(gmm, x, sigma).sum(), x)
    tweedie = x + sigma**2 * grad
    d = gmm(x.detach(), sigma)
    torch.testing.assert_close(d, tweedie.detach(), rtol=1e-8, atol=1e-8 * max(1.0, sigma))


def test_gmm_denoiser_matches_monte_carlo_posterior_mean(gmm):
    """Self-normalised importance sampling from the prior: sum_j w_j x0_j / sum_j w_j, w_j = N(x; x0_j, sigma^2 I)."""
    sigma = 3.0
    g = torch.Generator().manual_seed(7)
    x = gmm.sample(1, generator=g) + sigma * torch.randn((1, 1, 8, 8), generator=g, dtype=torch.float64)
    x0 = gmm.sample(200_000, generator=g).reshape(200_000, -1)
    logw = -0.5 * ((x.reshape(1, -1) - x0) ** 2).sum(1) / sigma**2
    w = torch.softmax(logw, 0)
    ess = 1.0 / (w**2).sum()
    assert ess > 200, f"effective sample size {ess:.0f} too small for this check"
    mc = (w[:, None] * x0).sum(0)
    # Standard error of a self-normalised estimate ~ posterior std / sqrt(ESS); posterior std <= 1 here.
    se = torch.sqrt((w[:, None] * (x0 - mc) ** 2).sum(0) / ess)
    d = gmm(x, sigma).reshape(-1)
    assert torch.all((d - mc).abs() <= 5 * se + 1e-12), float(((d - mc).abs() / se).max())


def test_gmm_batched_sigma_and_dtype(gmm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((5, 1, 8, 8), generator=g, dtype=torch.float64)
    sig = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    both = gmm(x, sig)
    # Batched and single-sample matmuls may sum in different orders (BLAS kernels chosen by shape):
    # measured up to 2.4e-13 on |x| ~ 1; a wrong per-sample sigma errs by far more.
    for i in range(5):
        torch.testing.assert_close(both[i : i + 1], gmm(x[i : i + 1], float(sig[i])), rtol=0, atol=1e-12)
    assert gmm(x.float(), 1.0).dtype == torch.float32


def test_gmm_exact_sampling_moments(gmm):
    m, c = gmm.mean_and_covariance()
    x = gmm.sample(100_000, generator=torch.Generator().manual_seed(3)).reshape(100_000, -1)
    # Sample mean error ~ sqrt(diag(c)/n): allow 5 standard errors per coordinate.
    se = torch.sqrt(torch.diagonal(c) / x.shape[0])
    assert torch.all((x.mean(0) - m).abs() <= 5 * se)
    assert torch.linalg.matrix_norm(torch.cov(x.T) - c) / torch.linalg.matrix_norm(c) < 0.02


def test_gmm_matches_data_it_was_fitted_to(gmm):
    digits, labels = load_digits()
    assert digits.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert digits.min() == -1.0 and digits.max() == 1.0
    m, _ = gmm.mean_and_covariance()
    # The EM fit reproduces the data mean (a fixed point of EM) to within the fit tolerance.
    np.testing.assert_allclose(m.numpy(), digits.reshape(1797, -1).mean(0), atol=1e-3)


def test_gmm_ode_reference_two_resolutions_agree(gmm):
    x = 80.0 * torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = gmm.ode_solution(x, 80.0, 0.002, rtol=1e-10, atol=1e-10)
    b = gmm.ode_solution(x, 80.0, 0.002, rtol=1e-13, atol=1e-13)
    default = gmm.ode_solution(x, 80.0, 0.002)
    assert (a - b).abs().max() < 1e-8
    assert (default - b).abs().max() < 1e-9


def test_gmm_ode_reference_matches_closed_form_for_one_gaussian():
    """A one-component mixture with full covariance Sigma = U diag(s) U^T has the closed-form solution
    x(sigma) - mu = U diag(sqrt((s + sigma^2) / (s + sigma_T^2))) U^T (x_T - mu)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T / 6 + 0.01 * np.eye(6)
    mu = rng.normal(size=6)
    m = GaussianMixture(np.ones(1), mu[None], cov[None])
    x = 80.0 * torch.from_numpy(rng.normal(size=(3, 6)))
    got = m.ode_solution(x, 80.0, 0.002)
    s, u = np.linalg.eigh(cov)
    scale = np.sqrt((s + 0.002**2) / (s + 80.0**2))
    want = mu + ((x.numpy() - mu) @ u) * scale @ u.T
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["point", "gauss"])
def test_closed_form_solutions_satisfy_the_ode(kind, point_mass, gaussian):
    """d x(sigma)/d sigma = (x - D(x, sigma)) / sigma, checked by central differences."""
    m = point_mass if kind == "point" else gaussian
    x_t = 80.0 * torch.randn((2, *m.shape), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for s in (0.05, 1.0, 30.0):
        h = 1e-5 * s
        xs = m.ode_solution(x_t, 80.0, s)
        dx = (m.ode_solution(x_t, 80.0, s + h) - m.ode_solution(x_t, 80.0, s - h)) / (2 * h)
        torch.testing.assert_close(dx, (xs - m(xs, s)) / s, rtol=1e-6, atol=1e-8)


def test_isotropic_gaussian_is_a_one_component_mixture(gaussian):
    d = math.prod(gaussian.shape)
    mix = GaussianMixture(np.ones(1), gaussian.mu.reshape(1, -1).numpy(), (gaussian.c**2 * np.eye(d))[None])
    x = torch.randn((4, d), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for s in (0.01, 1.0, 50.0):
        torch.testing.assert_close(mix(x, s), gaussian(x.reshape(4, *gaussian.shape), s).reshape(4, d))


def test_point_mass_denoiser_and_sampling(point_mass):
    x = torch.randn((3, *point_mass.shape), dtype=torch.float64)
    torch.testing.assert_close(point_mass(x, 1.0), point_mass.x0.expand_as(x))
    torch.testing.assert_close(point_mass.sample(2), point_mass.x0.expand(2, *point_mass.shape))


def test_fingerprint_changes_with_parameters():
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(2, 3))
    cov = np.stack([np.eye(3)] * 2)
    a = GaussianMixture(np.array([0.5, 0.5]), mu, cov)
    mu2 = mu.copy()
    mu2[0, 0] = np.nextafter(mu2[0, 0], 1.0)
    b = GaussianMixture(np.array([0.5, 0.5]), mu2, cov)
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == 71
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == GaussianMixture(np.array([0.5, 0.5]), mu.copy(), cov.copy()).fingerprint


def test_load_model_registry_and_errors():
    assert "builtin:gmm-digits" in builtin_names()
    m = load_model()  # the default model
    assert m.id == "builtin:gmm-digits" and m.shape == (1, 8, 8)
    assert (m.sigma_min, m.sigma_max) == (0.002, 80.0)
    assert isinstance(load_model("builtin:gaussian"), IsotropicGaussian)
    assert isinstance(load_model("builtin:point-mass"), PointMass)
    with pytest.raises(StepoptError, match="unknown built-in model 'builtin:nope'"):
        load_model("builtin:nope")
    with pytest.raises(StepoptError, match="unknown model loader 'zzz'"):
        load_model("zzz:abc")
    with pytest.raises(StepoptError, match="no loader prefix"):
        load_model("gmm-digits")
