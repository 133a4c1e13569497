"""The contract every registered solver identity must satisfy (one shared suite, as diffusers tests its schedulers).

Parametrized over ``all_solvers()`` x orders x variants x lower-order policies, so a newly
registered solver is tested without touching this file. Ground truth comes from the analytic
models only: the point mass (the ODE solution is linear in sigma), the isotropic Gaussian (closed
form) and the digits GMM (exact denoiser).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepopt.baselines import baseline_sigmas
from stepopt.models import GaussianMixture, IsotropicGaussian, PointMass
from stepopt.solvers import SolverIdentity, SolverSpec, all_solvers, get_solver, registry, solve
from stepopt.solvers.heun import heun


def all_identities() -> list[SolverIdentity]:
    """Every identity a schedule can record: each order, variant and lower-order policy of each solver."""
    out = []
    for spec in all_solvers():
        for order in spec.orders:
            for variant in spec.variants or (None,):
                for lof in (True, False) if spec.has_lower_order_final else (None,):
                    out.append(spec.identity(order, variant, lof))
    return out


IDENTITIES = all_identities()
DEFAULTS = [spec.identity() for spec in all_solvers()]


def _ids(idents: list[SolverIdentity]) -> list[str]:
    return [str(i).replace(" ", ",") for i in idents]


def edm_grid(n: int, sigma_max: float = 80.0, sigma_min: float = 0.002) -> torch.Tensor:
    return torch.tensor(baseline_sigmas("edm", n, sigma_max, sigma_min), dtype=torch.float64)


def noise(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


class Recorder:
    """Wraps a denoiser; counts calls (one call = one network evaluation) and records the sigmas it sees."""

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model = model
        self.calls = 0
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],) and sigma.dtype == torch.float64
        assert torch.all(sigma == sigma[0])
        self.sigmas.append(float(sigma[0]))
        return self.model(x, sigma, **cond)


@pytest.fixture(scope="module")
def small_gaussian() -> IsotropicGaussian:
    """A 2-d Gaussian for gradcheck (few inputs, so numerical Jacobians stay cheap)."""
    return IsotropicGaussian(torch.tensor([[0.3, -0.2]], dtype=torch.float64), c=0.7)


# 1. Exact on the point mass ----------------------------------------------------------------------
# D = x0 for every x, so every solver here (exponential integrators: the interpolant of a constant is
# the constant; Heun / iPNDM: d = (x - x0)/sigma is constant along the exact trajectory) must
# reproduce x0 + (sigma_N / sigma_0)(x_T - x0) exactly, on any grid.


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
@settings(max_examples=8, deadline=None)
@given(
    sigma_max=st.floats(1.0, 80.0),
    sigma_min=st.floats(0.002, 0.5),
    interior=st.lists(st.floats(0.02, 0.98), min_size=0, max_size=7, unique=True),
    seed=st.integers(0, 2**16),
)
def test_exact_on_point_mass(
    point_mass: PointMass,
    identity: SolverIdentity,
    sigma_max: float,
    sigma_min: float,
    interior: list[float],
    seed: int,
) -> None:
    u = np.sort(np.asarray([0.0, *interior, 1.0]))
    if np.any(np.diff(u) < 0.01):  # keep nodes distinct (ill-conditioned divided differences otherwise)
        u = np.linspace(0.0, 1.0, len(u))
    sig = torch.tensor(np.exp(np.log(sigma_max) + u * (np.log(sigma_min) - np.log(sigma_max))))
    x = sigma_max * noise((3, *point_mass.shape), seed)
    out = solve(identity, point_mass, x, sig)
    exact = point_mass.ode_solution(x, float(sig[0]), float(sig[-1]))
    # 1e-10 relative to the largest state on the path: x_T carries rounding ~1e-16 |x_T|, which Heun's
    # corrector amplifies by (sigma_i - sigma_{i+1}) / sigma_{i+1} (up to 4e4 here; measured 7e-10 of
    # |exact| = 3e-12 of |x_T| for the single step 80 -> 0.002). A wrong coefficient errs by ~|x_T|.
    scale = max(float(exact.abs().max()), float(x.abs().max()))
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-10 * scale)


# 2. Declared convergence order on the Gaussian ----------------------------------------------------
# Grid family: EDM rho = 7 on the full range [0.002, 80]. It is smoothly non-uniform in sigma and in
# lam, so no solver sits on its special grid (uniform lam makes DPM-Solver++(3M)'s leading error
# term cancel on this model: it then measures ~4) and fixed-weight iPNDM shows its true order 2.
# N range 64..256: below ~32 the first steps from sigma = 80 are pre-asymptotic. The first-order
# warm-up and lower-order-final steps add O(h^2 |dD/dlam|) at lam_0 and lam_N, which for K >= 3 is
# asymptotically of lower order; on this range dD/dlam is tiny at both ends (~c/sigma_max and
# ~sigma_min^2/c^2), so that term stays below the interior error for N <= 256 (it starts to show at
# N = 512 for unipc order 3 with lower_order_final: local slope 3.74). Error is measured at sigma_min.
ORDER_NS = (64, 96, 128, 192, 256)


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
def test_convergence_order_on_gaussian(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    x = 80.0 * noise((2, *gaussian.shape))
    ref = gaussian.ode_solution(x, 80.0, 0.002)
    # Timestep skipping (pfdiff) stands on N/(K+1) of the points: twice the grid sizes keep it asymptotic.
    ns = [2 * n for n in ORDER_NS] if get_solver(identity.name).skips_points else list(ORDER_NS)
    errs = [float((solve(identity, gaussian, x, edm_grid(n)) - ref).abs().max() / ref.abs().max()) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    declared = get_solver(identity.name).global_order(identity)
    assert abs(slope - declared) <= 0.3, f"{identity}: measured order {slope:.2f}, declared {declared}; errors {errs}"


# 3. Exact NFE ------------------------------------------------------------------------------------


def nfe_mismatches(identity: SolverIdentity, model: Callable[..., torch.Tensor], shape: tuple[int, ...]) -> list[str]:
    """Where counted evaluations differ from ``spec.nfe`` (several N, with and without a final denoise)."""
    spec = get_solver(identity.name)
    bad = []
    for n in (1, 2, 3, 4, 5, 8):
        for final_step in ("none", "denoise"):
            rec = Recorder(model)
            solve(identity, rec, 80.0 * noise((2, *shape)), edm_grid(n), final_step=final_step)
            if rec.calls != spec.nfe(identity, n, final_step):
                bad.append(
                    f"N={n} final_step={final_step}: {rec.calls} calls, rule says {spec.nfe(identity, n, final_step)}"
                )
    return bad


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
def test_exact_nfe(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    assert nfe_mismatches(identity, gaussian, gaussian.shape) == []


def test_wrong_nfe_rule_is_caught(gaussian: IsotropicGaussian) -> None:
    """A solver registered with a wrong NFE rule (Heun declaring one evaluation per step) fails check 3."""
    wrong = SolverSpec(name="heun-wrong-nfe", fn=heun, orders=(2,), default_order=2)
    registry.register(wrong)
    try:
        assert len(nfe_mismatches(wrong.identity(), gaussian, gaussian.shape)) == 12
    finally:
        registry.SOLVERS.unregister(wrong.name)


# 4. Gradients ------------------------------------------------------------------------------------


def _grid_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid on a moderate range (finite differences stay accurate) and distinct model sigmas."""
    sig = torch.tensor(baseline_sigmas("logsnr", n, 10.0, 0.1), dtype=torch.float64)
    msig = sig * torch.linspace(1.05, 0.97, n + 1, dtype=torch.float64)
    return sig.requires_grad_(), msig.requires_grad_()


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
def test_gradcheck_gaussian(small_gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    sig, msig = _grid_inputs(6)
    x = (10.0 * noise((2, *small_gaussian.shape))).requires_grad_()

    def f(sig: torch.Tensor, x: torch.Tensor, msig: torch.Tensor) -> torch.Tensor:
        return solve(identity, small_gaussian, x, sig, model_sigmas=msig)

    assert torch.autograd.gradcheck(f, (sig, x, msig))


@pytest.mark.parametrize("identity", DEFAULTS, ids=_ids(DEFAULTS))
def test_gradcheck_gmm(gmm: GaussianMixture, identity: SolverIdentity) -> None:
    sig, msig = _grid_inputs(5)
    x = (10.0 * noise((1, *gmm.shape))).requires_grad_()

    def f(sig: torch.Tensor, x: torch.Tensor, msig: torch.Tensor) -> torch.Tensor:
        return solve(identity, gmm, x, sig, model_sigmas=msig)

    # fast_mode: a random projection of the Jacobian (64 inputs from x); the Gaussian test above is exhaustive.
    assert torch.autograd.gradcheck(f, (sig, x, msig), fast_mode=True)


# 5. Batch-size independence ----------------------------------------------------------------------


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
def test_batch_independent_gaussian(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    x = 80.0 * noise((5, *gaussian.shape))
    sig = edm_grid(7)
    batched = solve(identity, gaussian, x, sig, final_step="denoise")
    single = torch.cat([solve(identity, gaussian, x[i : i + 1], sig, final_step="denoise") for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)


@pytest.mark.parametrize("identity", DEFAULTS, ids=_ids(DEFAULTS))
def test_batch_independent_gmm(gmm: GaussianMixture, identity: SolverIdentity) -> None:
    x = 80.0 * noise((4, *gmm.shape))
    sig = edm_grid(7)
    batched = solve(identity, gmm, x, sig)
    single = torch.cat([solve(identity, gmm, x[i : i + 1], sig) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)


# 6. Decoupled model time -------------------------------------------------------------------------


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
def test_model_sigmas_equal_to_sigmas_is_plain_run(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    x = 80.0 * noise((2, *gaussian.shape))
    sig = edm_grid(6)
    plain = solve(identity, gaussian, x, sig, final_step="denoise")
    same = solve(identity, gaussian, x, sig, model_sigmas=sig.clone(), final_step="denoise")
    assert torch.equal(plain, same)


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
def test_model_sigmas_reach_the_denoiser(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    n = 6
    x = 80.0 * noise((2, *gaussian.shape))
    sig = edm_grid(n)
    msig = sig * torch.linspace(1.2, 0.9, n + 1, dtype=torch.float64)  # no value in common with sig
    rec = Recorder(gaussian)
    out = solve(identity, rec, x, sig, model_sigmas=msig, final_step="denoise")
    allowed = [float(s) for s in msig]
    seen_idx = [allowed.index(s) if s in allowed else -1 for s in rec.sigmas]
    assert -1 not in seen_idx, f"denoiser saw sigmas outside model_sigmas: {rec.sigmas}"
    assert seen_idx == sorted(seen_idx), "model sigmas must be visited in grid order"
    if not get_solver(identity.name).skips_points:  # pfdiff evaluates only at anchors and springboards
        assert set(range(n + 1)) <= set(seen_idx), "every node's model sigma is used (the last by the final denoise)"
    assert rec.calls == get_solver(identity.name).nfe(identity, n, "denoise")
    assert not torch.equal(out, solve(identity, gaussian, x, sig, final_step="denoise"))


# 7. State dtype: float64 coefficients, update in the state's dtype ---------------------------------


@pytest.mark.parametrize("identity", DEFAULTS, ids=_ids(DEFAULTS))
def test_float32_state(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    x = 80.0 * noise((3, *gaussian.shape))
    sig = edm_grid(8)
    out64 = solve(identity, gaussian, x, sig)
    out32 = solve(identity, gaussian, x.float(), sig)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4 * float(out64.abs().max()))


# 8. From pure noise (sigma_0 = inf) -----------------------------------------------------------------
# The grid may begin at sigma = inf; the state there is noise-scaled (x / sigma = the noise) and every
# solver's first step is finite (stepopt.solvers._common). The same contract holds on such grids.
#
# Order grid family: sigma^(-1/q) uniform from 0 (sigma = inf) to sigma_min^(-1/q), q = 7 (EDM's rho = 7
# mirrored: rho = 1/sigma is a power of the step index near pure noise). Near lam = -inf its lam steps
# are ~q/i (not small), but the error there is weighted by rho^2 ~ (i/N)^(2q), so no solver loses order
# (2q > 4). On grids uniform in flow time t near t = 1 (rho ~ i/N) multistep methods in lam cannot
# exceed order 2: their first steps have lam steps ~log 2 whatever N (measured, see README).
# Measured slopes (N = 128..512) are within 0.3 of the declared orders except UniPC-3 (4.6: still
# pre-asymptotic, faster than declared); the check is one-sided above (+0.7).
FROM_NOISE_NS = (128, 192, 256, 384, 512)


def pure_noise_grid(n: int, q: float = 7.0, sigma_min: float = 0.002) -> torch.Tensor:
    w = np.linspace(0.0, sigma_min ** (-1.0 / q), n + 1)
    with np.errstate(divide="ignore"):
        sig = w ** (-q)
    sig[-1] = sigma_min
    return torch.tensor(sig, dtype=torch.float64)


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
@settings(max_examples=5, deadline=None)
@given(
    sigma_1=st.floats(1.0, 1e4),
    sigma_min=st.floats(0.002, 0.5),
    interior=st.lists(st.floats(0.02, 0.98), min_size=0, max_size=6, unique=True),
    seed=st.integers(0, 2**16),
)
def test_exact_on_point_mass_from_pure_noise(
    point_mass: PointMass, identity: SolverIdentity, sigma_1: float, sigma_min: float, interior: list[float], seed: int
) -> None:
    u = np.sort(np.asarray([0.0, *interior, 1.0]))
    if np.any(np.diff(u) < 0.01):
        u = np.linspace(0.0, 1.0, len(u))
    fin = np.exp(np.log(sigma_1) + u * (np.log(sigma_min) - np.log(sigma_1)))
    sig = torch.tensor([np.inf, *fin])
    y = noise((3, *point_mass.shape), seed)  # noise-scaled state at sigma = inf
    out = solve(identity, point_mass, y, sig, final_step="none")
    exact = point_mass.ode_solution(y, np.inf, float(sig[-1]))
    assert not torch.isnan(out).any()
    scale = max(float(exact.abs().max()), sigma_1 * float(y.abs().max()))
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-10 * scale)


def _order_from_noise(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    y = noise((2, *gaussian.shape))
    ref = gaussian.ode_solution(y, np.inf, 0.002)
    ns = [2 * n for n in FROM_NOISE_NS] if get_solver(identity.name).skips_points else list(FROM_NOISE_NS)
    errs = [float((solve(identity, gaussian, y, pure_noise_grid(n)) - ref).abs().max() / ref.abs().max()) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    declared = get_solver(identity.name).global_order(identity)
    assert declared - 0.3 <= slope <= declared + 0.7, f"{identity}: from inf, order {slope:.2f}, declared {declared}"


@pytest.mark.parametrize("identity", DEFAULTS, ids=_ids(DEFAULTS))
def test_convergence_order_from_pure_noise(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    _order_from_noise(gaussian, identity)


@pytest.mark.slow
@pytest.mark.parametrize(
    "identity", [i for i in IDENTITIES if i not in DEFAULTS], ids=_ids([i for i in IDENTITIES if i not in DEFAULTS])
)
def test_convergence_order_from_pure_noise_all_identities(
    gaussian: IsotropicGaussian, identity: SolverIdentity
) -> None:
    _order_from_noise(gaussian, identity)


@pytest.mark.parametrize("identity", IDENTITIES, ids=_ids(IDENTITIES))
def test_exact_nfe_from_pure_noise(gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    spec = get_solver(identity.name)
    for n in (1, 2, 3, 4, 5, 8):
        for final_step in ("none", "denoise"):
            rec = Recorder(gaussian)
            out = solve(identity, rec, noise((2, *gaussian.shape)), pure_noise_grid(n), final_step=final_step)
            assert rec.calls == spec.nfe(identity, n, final_step), f"N={n} {final_step}: {rec.calls} calls"
            assert rec.sigmas[0] == np.inf and not torch.isnan(out).any()


@pytest.mark.parametrize("identity", DEFAULTS, ids=_ids(DEFAULTS))
def test_gradcheck_from_pure_noise(small_gaussian: IsotropicGaussian, identity: SolverIdentity) -> None:
    """Gradients w.r.t. the finite grid, the model grid and the noise are exact (no inf - inf)."""
    sig, msig = _grid_inputs(6)
    y = noise((2, *small_gaussian.shape)).requires_grad_()
    inf = torch.tensor([np.inf], dtype=torch.float64)

    def f(sig: torch.Tensor, y: torch.Tensor, msig: torch.Tensor) -> torch.Tensor:
        return solve(identity, small_gaussian, y, torch.cat([inf, sig]), model_sigmas=torch.cat([inf, msig]))

    assert torch.autograd.gradcheck(f, (sig, y, msig))


@pytest.mark.parametrize("identity", DEFAULTS, ids=_ids(DEFAULTS))
def test_batch_independent_from_pure_noise(gmm: GaussianMixture, identity: SolverIdentity) -> None:
    y = noise((3, *gmm.shape))
    sig = pure_noise_grid(6)
    batched = solve(identity, gmm, y, sig, final_step="denoise")
    single = torch.cat([solve(identity, gmm, y[i : i + 1], sig, final_step="denoise") for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)


def test_inf_only_first() -> None:
    pm = PointMass(torch.zeros(1, 2, dtype=torch.float64))
    for bad in ([80.0, np.inf, 1.0], [np.inf, np.inf, 1.0], [-np.inf, 1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="inf"):
            solve(get_solver("euler").identity(), pm, torch.zeros(1, 1, 2), torch.tensor(bad))
    with pytest.raises(ValueError, match="model_sigmas"):
        solve(
            get_solver("euler").identity(),
            pm,
            torch.zeros(1, 1, 2),
            torch.tensor([np.inf, 1.0]),
            model_sigmas=torch.tensor([5.0, 1.0]),
        )
