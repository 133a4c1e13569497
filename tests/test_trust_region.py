"""trust-region (Xue et al. 2024): weights, error model, objective, gradient, minimizer, contract, CLI.

Where the numbers come from:
* Solver weights: the torch solver itself, run on probe evaluations (``measured_step_weights``:
  the coefficient of each evaluation in each step), for every registered solver identity; for the
  exact 3M, adaptive quadrature of ``e^lam l_j(lam)`` with the Lagrange basis built here from its
  definition (the paper's weights).
* Error model: ``sigma_t^p / alpha_t`` from the VP formulas written out here.
* Objective: a second, loop-by-step implementation of the paper's structure written in this file,
  on the measured weights.
* NFE 5 and 6 minimizer: Powell (derivative free) on the objective in an unconstrained softmax-gap
  parameterization, from starts the optimizer never uses; the optimizer's starts must agree with
  each other and with Powell to 1e-6 in lam (the minimizer is unique there).
* gmm-digits: the exact ODE solution (``GridValidator``) is the reference for the RMSE (slow).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import minimize
from typer.testing import CliRunner

from stepopt.baselines import baseline_sigmas, start_sigmas
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.models import load_model
from stepopt.optimizers import get_optimizer, optimize
from stepopt.optimizers.trust_region import ErrorBound, Resolved, TrustRegionConfig, error_model, optimize_grid
from stepopt.schedule import Schedule
from stepopt.solvers import SolverIdentity, all_solvers, get_solver, solve
from stepopt.solvers.linear import measured_step_weights, step_weights
from stepopt.teacher import GridValidator, teacher_outputs

# EDM's range: lam from -log 80 to -log 0.002.
LAM0, LAM1 = -math.log(80.0), -math.log(0.002)
DPM3 = get_solver("dpmpp-3m").identity()
DPM3_EXACT = get_solver("dpmpp-3m").identity(variant="exact")


def all_identities() -> list[SolverIdentity]:
    """Every identity of every solver that declares its weights (all built-in multistep/Heun/iPNDM ones)."""
    out = []
    for spec in all_solvers():
        if spec.linear_weights is None:
            continue
        for order in spec.orders:
            for variant in spec.variants or (None,):
                for lof in (True, False) if spec.has_lower_order_final else (None,):
                    out.append(spec.identity(order, variant, lof))
    return out


IDENTITIES = all_identities()


def _lagrange_weight(nodes: list[float], j: int, lo: float, hi: float) -> float:
    """∫_lo^hi e^lam prod_{m != j} (lam - x_m) / (x_j - x_m) dlam by quadrature."""

    def f(x: float) -> float:
        v = math.exp(x)
        for m, xm in enumerate(nodes):
            if m != j:
                v *= (x - xm) / (nodes[j] - xm)
        return v

    return quad(f, lo, hi, epsabs=0, epsrel=1e-13, limit=200)[0]


def _quadrature_paper_weights(lam: np.ndarray, ident: SolverIdentity) -> tuple[np.ndarray, np.ndarray]:
    """weights: paper by quadrature: step s of order k (the solver's pattern) weighs int e^lam l_j."""
    from stepopt.solvers._common import step_order

    n = len(lam) - 1
    lof = ident.lower_order_final is not False
    w = np.zeros((n, n))
    for s in range(n):
        k = step_order(s, n, ident.order or 1, lof)
        nodes = [float(lam[i]) for i in range(s - k + 1, s + 1)]
        for j in range(k):
            w[s, s - k + 1 + j] = _lagrange_weight(nodes, j, lam[s], lam[s + 1])
    return w, np.arange(n)


def _reference_objective(lam: np.ndarray, ident: SolverIdentity, p: float, tau: int, weights: str = "solver") -> float:
    """J of the paper's structure, written independently of the module, on the *measured* weights
    (``weights="solver"``) or on the Lagrange integrals by quadrature (``"paper"``).

    One-evaluation steps add |eps w|; steps s < tau with more evaluations the root of the sum of
    squares; the others add to per-evaluation sums c_e, which enter as |c_e|.
    """
    if weights == "paper":
        w, nodes = _quadrature_paper_weights(lam, ident)
    else:
        w, nodes = measured_step_weights(ident, np.exp(-lam))
    alpha = (1 + np.exp(-2 * lam)) ** -0.5
    sig_t = (1 + np.exp(2 * lam)) ** -0.5
    eps = (sig_t**p / alpha)[nodes]
    total, c = 0.0, np.zeros(len(nodes))
    for s, row in enumerate(w):
        used = np.nonzero(row)[0]
        terms = eps[used] * row[used]
        if len(used) == 1:
            total += abs(terms[0])
        elif s < tau:
            total += math.sqrt(float(terms @ terms))
        else:
            c[used] += terms
    return total + float(np.abs(c).sum())


def _random_grid(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.concatenate(([LAM0], np.sort(rng.uniform(LAM0, LAM1, n - 1)), [LAM1]))


def _bound(ident: SolverIdentity, n: int, p: float = 2.0, tau: int = 3) -> ErrorBound:
    return ErrorBound(ident, n, LAM0, LAM1, p, tau)


def _paper_bound(ident: SolverIdentity, n: int, p: float = 2.0, tau: int = 3) -> ErrorBound:
    """The bound the optimizer minimizes by default (weights: paper)."""
    from stepopt.optimizers.trust_region.bound import lagrange_weights

    return ErrorBound(ident, n, LAM0, LAM1, p, tau, lagrange_weights)


# -- weights, error model, objective ------------------------------------------------------------
@pytest.mark.parametrize("ident", IDENTITIES, ids=[str(i).replace(" ", ",") for i in IDENTITIES])
def test_bound_weights_are_the_solvers_measured_coefficients(ident):
    """For every solver identity: the bound's weights = the torch solver's own coefficients, to 1e-10."""
    rng = np.random.default_rng(len(str(ident)))
    for n in (1, 2, 3, 5, 8, 12):
        lam = _random_grid(rng, n)
        measured, nodes = measured_step_weights(ident, np.exp(-lam))
        w = _bound(ident, n).weights(lam)
        assert w.shape == measured.shape and np.array_equal(_bound(ident, n).nodes, nodes)
        np.testing.assert_allclose(w, measured, rtol=0, atol=1e-10 * np.abs(measured).max())
        # And so the coefficient of each evaluation in x_N, sigma_N sum_s W[s, e].
        np.testing.assert_allclose(
            w.sum(axis=0) / np.exp(lam[-1]), measured.sum(axis=0) / np.exp(lam[-1]), rtol=1e-10, atol=1e-16
        )


def test_exact_3m_weights_are_the_papers_lagrange_integrals():
    """dpmpp-3m exact: first- and third-order steps weigh the exact integrals of e^lam l_j (the paper's);
    the reference variant differs on the third-order steps (half the quadratic term)."""
    rng = np.random.default_rng(5)
    for _ in range(3):
        lam = np.sort(rng.uniform(-3.0, 4.0, 8))
        w = step_weights(DPM3_EXACT, lam[None])[0][0]
        ref = step_weights(DPM3, lam[None])[0][0]
        for s, k in [(0, 1), (2, 3), (3, 3), (4, 3)]:
            nodes = [float(lam[i]) for i in range(s - k + 1, s + 1)]
            for j in range(k):
                want = _lagrange_weight(nodes, j, lam[s], lam[s + 1])
                assert w[s, s - k + 1 + j] == pytest.approx(want, rel=1e-9, abs=1e-12)
            # Every step's weights sum to E_{s+1} - E_s (constants are integrated exactly).
            assert w[s].sum() == pytest.approx(math.exp(lam[s + 1]) - math.exp(lam[s]), rel=1e-12)
        assert np.abs(w[3] - ref[3]).max() > 1e-3 * np.abs(w[3]).max()


def test_weight_derivatives_match_central_differences():
    """The complex-step derivatives of the weights (what the gradient uses) against central differences."""
    rng = np.random.default_rng(3)
    for ident in (DPM3, get_solver("unipc").identity(variant="bh1"), get_solver("ipndm-v").identity()):
        lam = _random_grid(rng, 7)
        dirs = np.eye(8)[1:-1]
        wc = step_weights(ident, lam[None] + 1e-30j * dirs)[0]
        for k in range(6):
            num = (step_weights(ident, (lam + 1e-6 * dirs[k])[None])[0][0]
                   - step_weights(ident, (lam - 1e-6 * dirs[k])[None])[0][0]) / 2e-6  # fmt: skip
            np.testing.assert_allclose(wc[k].imag / 1e-30, num, rtol=1e-5, atol=1e-7 * np.abs(num).max())


@pytest.mark.parametrize("p", [1.0, 2.0, 2.5])
def test_error_model_is_sigma_p_over_alpha(p):
    lam = np.linspace(-8, 9, 35)
    alpha = 1 / np.sqrt(1 + np.exp(-2 * lam))
    sig = 1 / np.sqrt(1 + np.exp(2 * lam))
    eps, deps = error_model(lam, p)
    np.testing.assert_allclose(eps, sig**p / alpha, rtol=1e-13)
    num = (error_model(lam + 1e-6, p)[0] - error_model(lam - 1e-6, p)[0]) / 2e-6
    np.testing.assert_allclose(deps, num, rtol=1e-7)


OBJ_CASES = [
    (DPM3, 5, 2.0, 3),
    (DPM3_EXACT, 6, 2.0, 3),
    (DPM3, 9, 1.0, 0),
    (get_solver("dpmpp-3m").identity(lower_order_final=False), 8, 2.5, 4),
    (get_solver("dpmpp-2m").identity(), 7, 2.0, 2),
    (get_solver("unipc").identity(), 8, 2.5, 6),
    (get_solver("unipc").identity(order=2, variant="bh1"), 6, 2.0, 0),
    (get_solver("ipndm").identity(), 6, 2.0, 3),
    (get_solver("heun").identity(), 5, 2.0, 3),
    (get_solver("euler").identity(), 5, 1.0, 3),
]


@pytest.mark.parametrize("ident,n,p,tau", OBJ_CASES)
def test_objective_matches_independent_implementation(ident, n, p, tau):
    rng = np.random.default_rng(n)
    bound = _bound(ident, n, p, tau)
    paper = _paper_bound(ident, n, p, tau) if ident.name in ("euler", "dpmpp-2m", "dpmpp-3m", "unipc") else None
    for _ in range(3):
        lam = _random_grid(rng, n)
        assert bound.value(lam[1:-1]) == pytest.approx(_reference_objective(lam, ident, p, tau), rel=1e-10)
        if paper is not None:
            want = _reference_objective(lam, ident, p, tau, "paper")
            assert paper.value(lam[1:-1]) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("ident,n,tau,mu", [(DPM3, 5, 3, 0.0), (DPM3, 8, 3, 1e-2), (DPM3, 10, 0, 1e-3),
                                            (DPM3_EXACT, 12, 10, 0.0), (DPM3, 30, 3, 1e-2),
                                            (get_solver("unipc").identity(), 8, 0, 1e-3),
                                            (get_solver("heun").identity(), 6, 2, 1e-3),
                                            ("paper", 8, 3, 1e-2), ("paper", 10, 0, 1e-3)])  # fmt: skip
def test_gradient_matches_central_differences(ident, n, tau, mu):
    rng = np.random.default_rng(n + tau)
    bound = _paper_bound(DPM3, n, 2.0, tau) if ident == "paper" else _bound(ident, n, 2.0, tau)
    x = _random_grid(rng, n)[1:-1]
    h = 1e-6
    num = np.array([(bound.value(x + h * e, mu) - bound.value(x - h * e, mu)) / (2 * h) for e in np.eye(n - 1)])
    np.testing.assert_allclose(bound.gradient(x, mu), num, rtol=1e-5, atol=1e-6 * np.abs(num).max())


# -- the minimizer ------------------------------------------------------------------------------
def _powell_minimum(n: int, lam_start: np.ndarray) -> np.ndarray:
    """Derivative-free search on the objective (checked above against this file's implementation);
    gaps = softmax(z) * (LAM1 - LAM0)."""
    bound = _paper_bound(DPM3, n, 2.0, 3)

    def lam_of(z: np.ndarray) -> np.ndarray:
        g = np.exp(z - z.max())
        return LAM0 + np.concatenate(([0.0], np.cumsum(g / g.sum()))) * (LAM1 - LAM0)

    def f(z: np.ndarray) -> float:
        return bound.value(lam_of(z)[1:-1])

    z = np.log(np.diff(lam_start))
    for _ in range(4):  # Powell restarts from its own result until it stops moving
        res = minimize(f, z, method="Powell", options={"xtol": 1e-10, "ftol": 1e-15, "maxfev": 20000})
        if np.abs(lam_of(res.x) - lam_of(z)).max() < 1e-9:
            break
        z = res.x
    return lam_of(res.x)


@pytest.mark.parametrize("n", [5, 6])
def test_nfe5_and_6_unique_minimizer(gmm, n):
    """p=2, tau=3, third order, EDM range: every start and an independent Powell search agree to 1e-6."""
    cfg = TrustRegionConfig(p=2.0, tau=3, multistart=False, perturbed_starts=0)
    sols = [optimize_grid(gmm, DPM3, n, cfg, Resolved(2.0, 3, init))[0] for init in ("logsnr", "time-uniform", "edm")]
    perturbed = optimize_grid(gmm, DPM3, n, TrustRegionConfig(p=2.0, tau=3), Resolved(2.0, 3, "logsnr"), seed=7)[0]
    for s in [*sols[1:], perturbed]:
        assert np.abs(s.lam - sols[0].lam).max() < 1e-6
    assert np.diff(sols[0].lam).min() > 2 * cfg.min_gap  # the gap constraint is not active
    # Powell from starts the optimizer does not use: kl-optimal and time-quadratic grids.
    for kind in ("kl-optimal", "time-quadratic"):
        start = -np.log(baseline_sigmas(kind, n, 80.0, 0.002))
        np.testing.assert_allclose(_powell_minimum(n, start), sols[0].lam, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [8, 10, 12])
def test_larger_nfe_multistart_objective_is_best(gmm, n):
    """N >= 8: compare objective values: the multistart is no worse than any single start.

    (Up to 1e-5 relative: the multistart's successive halving stops non-finalist starts early.)
    """
    singles = [
        optimize_grid(gmm, DPM3, n, TrustRegionConfig(p=2.0, tau=3, multistart=False, perturbed_starts=0),
                      Resolved(2.0, 3, init))[0].value
        for init in ("logsnr", "time-uniform", "edm")
    ]  # fmt: skip
    multi = optimize_grid(gmm, DPM3, n, TrustRegionConfig(p=2.0, tau=3), Resolved(2.0, 3, "logsnr"))[0]
    assert multi.value <= min(singles) * (1 + 1e-5)
    # And far below the uniform-lam start (the authors' start).
    bound = _paper_bound(DPM3, n, 2.0, 3)
    assert multi.value < 0.9 * bound.value(np.linspace(LAM0, LAM1, n + 1)[1:-1])


def test_two_and_one_order_solvers(gmm):
    """dpmpp-2m (orders 1,2,..,2,1; an extension) and euler (all first order) get their own patterns."""
    for name, pattern, evals in [("dpmpp-2m", [1, 2, 2, 2, 2, 1], [1, 2, 2, 2, 2, 1]), ("euler", None, [1] * 6)]:
        sched = optimize("trust-region", gmm, get_solver(name).identity(), 6)
        assert sched.method.config["report"]["orders"] == pattern
        assert sched.method.config["report"]["evaluations_per_step"] == evals
        assert sched.method.objective["final"] <= sched.method.objective["initial"]
    # Euler with p = 1: J = sum_s (e^{h_s} - 1) is minimized by uniform lam (Jensen): logsnr exactly.
    sched = optimize("trust-region", gmm, get_solver("euler").identity(), 6, TrustRegionConfig(p=1.0))
    np.testing.assert_allclose(-np.log(sched.sigmas), np.linspace(LAM0, LAM1, 7), atol=1e-6)


@pytest.mark.parametrize("name", ["heun", "ipndm", "ipndm-v"])
def test_non_exponential_integrators_are_an_extension(gmm, name):
    """Heun and iPNDM: the bound takes their exact weights (through earlier states too) and says so."""
    sched = optimize("trust-region", gmm, get_solver(name).identity(), 6 if name != "heun" else 8)
    rep = sched.method.config["report"]
    assert "an extension" in rep["note"] and rep["orders"] is None
    assert sched.method.objective["final"] <= sched.method.objective["initial"]


def test_no_lowered_final_order_builds_its_own_weights(gmm):
    ident = get_solver("dpmpp-3m").identity(lower_order_final=False)
    logs: list[str] = []
    sched = optimize("trust-region", gmm, ident, 6, progress=lambda e, d: logs.append(str(d.get("message"))))
    rep = sched.method.config["report"]
    assert rep["orders"] == [1, 2, 3, 3, 3, 3] and rep["lower_order_final"] is False
    assert "assumes the solver lowers its order" in rep["note"]
    assert any("lowers its order" in m for m in logs)


# -- the optimizer contract ---------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TrustRegionConfig(), TrustRegionConfig(tau=3, p=2.0), TrustRegionConfig(tau="all")])
@pytest.mark.parametrize("nfe", [3, 6, 9])
def test_contract_valid_never_worse_deterministic(gmm, cfg, nfe):
    a = optimize("trust-region", gmm, DPM3, nfe, cfg, seed=3)
    b = optimize("trust-region", gmm, DPM3, nfe, cfg, seed=3)
    assert isinstance(a, Schedule) and a.nfe == nfe and len(a.sigmas) == nfe + 1  # N = NFE (multistep)
    assert a.sigmas[0] == gmm.sigma_max and a.sigmas[-1] == gmm.sigma_min  # endpoints from the model
    assert a.sigmas == b.sigmas and a.method.objective == b.method.objective
    lam = -np.log(np.asarray(a.sigmas))
    assert np.diff(lam).min() >= cfg.min_gap * (1 - 1e-6)
    # Never worse than its start, recomputed here on the start grid (uniform lam).
    obj = a.method.objective
    res = a.method.config["report"]["resolved"]
    tau = nfe if res["tau"] == "all" else res["tau"]
    start = _reference_objective(np.linspace(LAM0, LAM1, nfe + 1), DPM3, res["p"], tau, "paper")
    assert obj["initial"] == pytest.approx(start, rel=1e-9)
    assert obj["final"] <= obj["initial"]
    assert obj["final"] == pytest.approx(_reference_objective(lam, DPM3, res["p"], tau, "paper"), rel=1e-9)


def test_seed_changes_only_the_perturbed_starts(gmm):
    a = optimize("trust-region", gmm, DPM3, 10, TrustRegionConfig(tau=3, p=2.0), seed=0)
    b = optimize("trust-region", gmm, DPM3, 10, TrustRegionConfig(tau=3, p=2.0), seed=1)
    starts_a = [r["start"] for r in a.method.config["report"]["runs"]]
    assert starts_a[:3] == ["logsnr", "time-uniform", "edm"]
    assert a.method.objective["initial"] == b.method.objective["initial"]
    # The deterministic starts begin at the same objective for both seeds, the perturbed ones do not.
    runs_a = {r["start"]: r["initial"] for r in a.method.config["report"]["runs"] if "refine" not in r["start"]}
    runs_b = {r["start"]: r["initial"] for r in b.method.config["report"]["runs"] if "refine" not in r["start"]}
    assert runs_a.keys() == runs_b.keys()
    fixed = ["logsnr", "time-uniform", "edm"]
    perturbed = [k for k in runs_a if k not in fixed]
    assert perturbed, "the default config has perturbed starts"
    assert all(runs_a[k] == runs_b[k] for k in fixed)
    assert all(runs_a[k] != runs_b[k] for k in perturbed)


def test_resolution_records_values(gmm):
    sched = optimize("trust-region", gmm, DPM3, 6, TrustRegionConfig(p="paper", tau="paper"))
    assert sched.method.config["p"] == "paper"
    assert sched.method.config["report"]["resolved"] == {"p": 1.0, "tau": 3, "init": "logsnr"}  # pixel model
    sched = optimize("trust-region", gmm, DPM3, 9, TrustRegionConfig(tau="paper"))
    assert sched.method.config["report"]["resolved"]["tau"] == 0
    sched = optimize("trust-region", gmm, DPM3, 9)
    assert sched.method.config["report"]["resolved"] == {"p": 2.5, "tau": 7, "init": "logsnr"}


def test_bad_inputs(gmm):
    with pytest.raises(ValueError, match="tau"):
        TrustRegionConfig(tau=-1)
    undeclared = [spec for spec in all_solvers() if spec.linear_weights is None]
    for spec in undeclared:  # e.g. pfdiff: a clear error naming the solver
        with pytest.raises(StepoptError, match=f"solver '{spec.name}' does not declare"):
            optimize("trust-region", gmm, spec.identity(), 6)
    with pytest.raises(StepoptError, match="min_gap"):
        optimize("trust-region", gmm, DPM3, 6, TrustRegionConfig(min_gap=2.0))
    assert get_optimizer("trust-region").config_cls is TrustRegionConfig
    # the registered config class is what validates --set input, so a bad value fails there, named
    from stepopt.config import resolve_config
    from stepopt.errors import ConfigError

    with pytest.raises(ConfigError, match="tau must be 'auto', 'paper', 'all' or an integer >= 0, got -1"):
        resolve_config(get_optimizer("trust-region").config_cls, None, ["tau=-1"])


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_no_arguments_writes_the_default_schedule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["optimize", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    path = tmp_path / "schedules" / "gmm-digits" / "dpmpp-3m" / "nfe6" / "trust-region.yaml"
    assert out["path"] == str(path.relative_to(tmp_path)) and path.exists()
    sched = Schedule.load(path)
    assert sched.method.name == "trust-region" and sched.nfe == 6
    assert sched.method.objective["final"] < sched.method.objective["initial"]
    assert sched.method.config["min_gap"] == 0.05 and sched.method.config["report"]["resolved"]["p"] == 2.5
    assert sched.method.seconds is not None and sched.method.seconds < 5.0


@pytest.mark.parametrize(
    "extra,needle",
    [(["--set", "nope=1"], "unknown option 'nope'"), (["--set", "tau=-2"], "tau"), (["--solver", "nope"], "nope")],
)
def test_cli_bad_config_is_one_line_exit_1(tmp_path, extra, needle):
    r = CliRunner().invoke(app, ["optimize", "--device", "cpu", "--out", str(tmp_path / "s.yaml"), *extra])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not (tmp_path / "s.yaml").exists()


def _cli_select(out, nfe, *sets):
    """Run ``optimize --select`` on gmm-digits (2 p x 1 tau x 2 inits, 8 noises); its report and output."""
    extra = [x for kv in sets for x in ("--set", kv)]
    r = CliRunner().invoke(
        app,
        ["optimize", "--nfe", str(nfe), "--device", "cpu", "--out", str(out), "--select",
         "--set", "select_p=[1, 2]", "--set", "select_tau=[auto]", "--set", "select_n=8", *extra],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    sel = Schedule.load(out).method.config["report"]["select"]
    assert len(sel["candidates"]) == 5 + 2 * 1 * 2  # every baseline + p x tau x init
    return sel, r.output


def test_cli_select_reports_every_candidate(tmp_path):
    out = tmp_path / "sel.yaml"
    sel, output = _cli_select(out, 8, "select_confirm=16")
    assert "logsnr baseline" in output and "chose" in output
    # Default rule "significant": the bound's best candidate is lower on the 8 selection noises, so
    # the decision is taken on 16 fresh ones (seeds 10008..10023), where its paired bootstrap
    # interval against the best baseline must lie below 0; the selection's comparison is kept beside.
    assert sel["rule"] == "significant"
    chosen = next(c for c in sel["candidates"] if c["candidate"] == sel["chosen"])
    bases = [c for c in sel["candidates"] if c["p"] is None]
    bounds = [c for c in sel["candidates"] if c["p"] is not None]
    best_base, best_bound = min(c["rmse"] for c in bases), min(c["rmse"] for c in bounds)
    assert best_bound < best_base  # (checked when written: the confirmation runs)
    assert sel["confirm_seeds"] == [10_008, 10_023] and sel["interval"]["n"] == 16
    assert sel["selection_interval"]["n"] == 8
    assert sel["selection_interval"]["change"] == pytest.approx(best_bound / best_base - 1, rel=1e-9, abs=1e-12)
    assert chosen["p"] is not None and chosen["rmse"] == best_bound and sel["interval"]["high"] < 0
    # ... and the decisive interval is the two finalists' on those fresh noises, recomputed here.
    base_name = min(bases, key=lambda c: c["rmse"])["candidate"].removesuffix(" baseline")
    base_grid = [float(v) for v in start_sigmas(base_name, load_model("builtin:gmm-digits"), 8)]
    fresh = GridValidator(load_model("builtin:gmm-digits"), DPM3, range(10_008, 10_024))
    a, b = fresh.squared_errors(Schedule.load(out).sigmas), fresh.squared_errors(base_grid)
    assert sel["interval"]["change"] == pytest.approx(float(np.sqrt(a.mean() / b.mean())) - 1, rel=1e-9)
    # Rule "lowest": the lowest RMSE on the selection's noises wins; ties within 1e-9 relative (both
    # inits reaching the same grid) keep the first.
    sel, _ = _cli_select(out, 5, "select_rule=lowest")
    assert sel["rule"] == "lowest" and "interval" not in sel
    best = min(c["rmse"] for c in sel["candidates"])
    chosen = next(c for c in sel["candidates"] if c["candidate"] == sel["chosen"])
    assert chosen["rmse"] <= best * (1 + 1e-9)


def test_select_decision_rules():
    """The bound's best candidate must prove itself against the best baseline under "significant"."""
    from stepopt.optimizers.trust_region import _select_decision

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.5, 64)
    base[60:] *= 10  # a heavy tail: 4 noises carry most of the error
    clear = base * 0.8  # lower on every noise
    lucky = base.copy()
    lucky[:60] *= 0.9  # lower on most noises
    lucky[60:] *= 1.13  # but the tail decides: a slightly lower mean, not significant
    assert lucky.mean() < base.mean()

    def best(bound):
        return {"baseline": (1.0, [], {}, base), "bound": (0.9, [], {}, bound)}

    d = _select_decision(best(clear), "significant")
    assert d["group"] == "bound" and d["interval"]["high"] < 0
    d = _select_decision(best(lucky), "significant")
    assert d["group"] == "baseline" and d["interval"]["low"] < 0 <= d["interval"]["high"]
    assert _select_decision(best(lucky), "lowest")["group"] == "bound"
    assert _select_decision({"baseline": (1.0, [], {}, base)}, "significant")["group"] == "baseline"


def test_cli_select_final_denoise_scores_against_denoised_teacher(tmp_path, gmm):
    """With final_step denoise the solver returns D(x_N), so --select must compare it to D(teacher)."""
    out = tmp_path / "sel.yaml"
    r = CliRunner().invoke(
        app,
        ["optimize", "--nfe", "6", "--device", "cpu", "--out", str(out), "--select", "--final-step", "denoise",
         "--set", "select_p=[2]", "--set", "select_tau=[auto]", "--set", "select_n=8"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    sched = Schedule.load(out)
    sel = sched.method.config["report"]["select"]
    chosen = next(c for c in sel["candidates"] if c["candidate"] == sel["chosen"])
    x_t, ref = teacher_outputs(gmm, list(range(10_000, 10_008)))
    with torch.no_grad():
        x = solve(DPM3, gmm, x_t, torch.as_tensor(sched.sigmas, dtype=torch.float64), final_step="denoise")
        target = gmm(ref, gmm.sigma_min)
    denoised = float(((x - target) ** 2).mean().sqrt())
    undenoised = float(((x - ref) ** 2).mean().sqrt())
    assert chosen["rmse"] == pytest.approx(denoised, rel=1e-9)
    assert abs(undenoised - denoised) > 1e-6 * denoised


# -- UniPC: the corrector in the bound; teacher refinement ---------------------------------------
UNIPC = get_solver("unipc").identity(variant="bh2")


def test_paper_weights_are_lagrange_integrals_on_the_solvers_order_pattern():
    """weights: paper (default): every step of order k weighs the exact integral of e^lam l_j over
    nodes s-k+1..s (quadrature here), on the solver's order pattern; equal to dpmpp-3m exact's
    first- and third-order weights; weights: solver is the solver's own (different for UniPC)."""
    from stepopt.optimizers.trust_region.bound import lagrange_weights
    from stepopt.solvers._common import step_order

    rng = np.random.default_rng(11)
    for ident in (UNIPC, DPM3, get_solver("dpmpp-2m").identity(lower_order_final=False)):
        for n in (3, 5, 8):
            lam = np.sort(rng.uniform(-3.0, 4.0, n + 1))
            w = ErrorBound(ident, n, lam[0], lam[-1], 2.5, n - 2, lagrange_weights).weights(lam)
            lof = ident.lower_order_final is not False
            for s in range(n):
                k = step_order(s, n, ident.order, lof)
                nodes = [float(lam[i]) for i in range(s - k + 1, s + 1)]
                for j in range(k):
                    want = _lagrange_weight(nodes, j, lam[s], lam[s + 1])
                    assert w[s, s - k + 1 + j] == pytest.approx(want, rel=1e-9, abs=1e-12)
                assert np.count_nonzero(w[s]) == k
    lam = _random_grid(rng, 8)
    paper = ErrorBound(UNIPC, 8, LAM0, LAM1, 2.5, 6, lagrange_weights).weights(lam)
    exact3 = _bound(DPM3_EXACT, 8).weights(lam)
    for s in (0, 2, 3, 4, 5, 7):  # orders 1, 3, 3, 3, 3, 1
        np.testing.assert_allclose(paper[s], exact3[s], rtol=1e-10, atol=1e-12 * np.abs(exact3[s]).max())
    assert np.abs(_bound(UNIPC, 8).weights(lam) - paper).max() > 1e-3 * np.abs(paper).max()
    assert TrustRegionConfig().weights == "paper"
    with pytest.raises(ValueError, match="weights"):
        TrustRegionConfig(weights="both")  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["bh2", "bh1"])
def test_corrector_first_weighs_the_first_step_as_the_solver_takes_it(variant):
    """corrector: first (default under weights: paper): step 0 = the torch solver's measured UniC-1
    coefficients (bh2: the trapezoid, half the first-order weight on D_0 and on D_1), every later step
    the paper's Lagrange integrals (quadrature); a one-step grid (uncorrected) keeps the paper's."""
    from stepopt.optimizers.trust_region.bound import lagrange_weights, solver_first_step

    ident = get_solver("unipc").identity(variant=variant)
    wf = solver_first_step(lagrange_weights)
    rng = np.random.default_rng(23)
    for n in (1, 2, 3, 5, 8):
        lam = _random_grid(rng, n)
        w = ErrorBound(ident, n, LAM0, LAM1, 2.5, max(n - 2, 0), wf).weights(lam)
        paper, _ = _quadrature_paper_weights(lam, ident)
        measured, _ = measured_step_weights(ident, np.exp(-lam))
        rest = slice(1, None) if n > 1 else slice(0, None)
        np.testing.assert_allclose(w[rest], paper[rest], rtol=1e-9, atol=1e-12 * np.abs(paper).max())
        if n > 1:
            np.testing.assert_allclose(w[0], measured[0], rtol=0, atol=1e-10 * np.abs(measured[0]).max())
            assert np.count_nonzero(w[0]) == 2
            first = math.exp(lam[1]) - math.exp(lam[0])
            if variant == "bh2":
                np.testing.assert_allclose(w[0, :2], [first / 2, first / 2], rtol=1e-12)
            assert w[0, :2].sum() == pytest.approx(first, rel=1e-12)  # constants integrated exactly
    # The bound on these weights: the paper's structure (independent loop) on exactly these weights.
    lam = _random_grid(rng, 6)
    b = ErrorBound(ident, 6, LAM0, LAM1, 2.5, 4, wf)
    assert b.single.tolist() == [False, False, False, False, False, True] and b.rss.tolist()[:4] == [True] * 4
    assert TrustRegionConfig().corrector == "first"
    with pytest.raises(ValueError, match="corrector"):
        TrustRegionConfig(corrector="all")  # type: ignore[arg-type]


def test_corrector_first_gradient_matches_central_differences():
    from stepopt.optimizers.trust_region.bound import lagrange_weights, solver_first_step

    rng = np.random.default_rng(4)
    bound = ErrorBound(UNIPC, 7, LAM0, LAM1, 2.5, 5, solver_first_step(lagrange_weights))
    x = _random_grid(rng, 7)[1:-1]
    h = 1e-6
    num = np.array([(bound.value(x + h * e, 1e-3) - bound.value(x - h * e, 1e-3)) / (2 * h) for e in np.eye(6)])
    np.testing.assert_allclose(bound.gradient(x, 1e-3), num, rtol=1e-5, atol=1e-6 * np.abs(num).max())


def test_corrector_option_only_changes_unipc(gmm):
    """corrector only concerns a solver whose first step corrects (unipc); dpmpp-3m's grid is the same."""
    cfg = TrustRegionConfig(multistart=False, perturbed_starts=0)
    none = TrustRegionConfig(multistart=False, perturbed_starts=0, corrector="none")
    assert optimize("trust-region", gmm, DPM3, 6, cfg).sigmas == optimize("trust-region", gmm, DPM3, 6, none).sigmas
    a = np.asarray(optimize("trust-region", gmm, UNIPC, 6, cfg).sigmas)
    b = np.asarray(optimize("trust-region", gmm, UNIPC, 6, none).sigmas)
    assert np.abs(np.log(a / b)).max() > 0.1  # the first node moves down (4.03 vs 6.59)
    assert a[1] < b[1]


def test_corrector_option_leaves_grids_from_pure_noise_alone():
    """From pure noise (flow) the bound keeps the predictor's weights whatever ``corrector`` says."""
    flow = load_model("builtin:gmm-digits-flow")
    cfg = TrustRegionConfig(multistart=False, perturbed_starts=0)
    none = TrustRegionConfig(multistart=False, perturbed_starts=0, corrector="none")
    for final_step in ("none", "denoise"):
        a = optimize("trust-region", flow, UNIPC, 5, cfg, final_step=final_step).sigmas
        assert a == optimize("trust-region", flow, UNIPC, 5, none, final_step=final_step).sigmas


def test_gmm_digits_unipc_nfe6_corrector_first_beats_kl_optimal(gmm):
    """The cell the paper's UniPC treatment lost (issue 11): unipc bh2, NFE 6, RMSE vs the exact ODE on
    held-out seeds 20000..20399. Measured (this commit): default 0.0593, kl-optimal (the best
    baseline) 0.0670 (-11.5 %), corrector: none 0.0723 (+7.9 %)."""
    rmse = GridValidator(gmm, UNIPC, range(20_000, 20_400)).rmse
    tr = rmse(optimize("trust-region", gmm, UNIPC, 6).sigmas)
    none = rmse(optimize("trust-region", gmm, UNIPC, 6, TrustRegionConfig(corrector="none")).sigmas)
    base = {k: rmse(baseline_sigmas(k, 6, gmm.sigma_max, gmm.sigma_min, gmm.frame)) for k in BASELINES}
    assert tr < 0.96 * min(base.values()), (tr, base)
    assert none > min(base.values()), (none, base)


def test_weights_option_changes_the_grid(gmm):
    paper = optimize("trust-region", gmm, UNIPC, 6).sigmas
    solver = optimize("trust-region", gmm, UNIPC, 6, TrustRegionConfig(weights="solver")).sigmas
    assert np.abs(np.log(np.asarray(solver) / np.asarray(paper))).max() > 1e-3
    # Heun has no multistep order pattern: both settings use its own weights.
    heun = get_solver("heun").identity()
    a = optimize("trust-region", gmm, heun, 8, TrustRegionConfig(multistart=False)).sigmas
    b = optimize("trust-region", gmm, heun, 8, TrustRegionConfig(multistart=False, weights="solver")).sigmas
    assert a == b


def test_teacher_refine_beats_its_start_and_every_baseline_on_the_teacher(gmm):
    """teacher_refine starts from the best of the bound's grid and the baselines (teacher RMSE) and
    only lowers that RMSE; the report records every start candidate."""
    cfg = TrustRegionConfig(teacher_refine=True, teacher_refine_iters=15, select_n=8)
    sched = optimize("trust-region", gmm, UNIPC, 5, cfg)
    rep = sched.method.config["report"]["teacher_refine"]
    assert set(rep["start_candidates"]) == {"trust-region", *(f"{k} baseline" for k in BASELINES)}
    assert rep["start"] == min(rep["start_candidates"], key=rep["start_candidates"].get)
    assert rep["accepted"] and rep["rmse"] < rep["rmse_start"] == pytest.approx(min(rep["start_candidates"].values()))
    val = GridValidator(gmm, UNIPC, list(range(10_000, 10_008)))
    assert val.rmse(sched.sigmas) == pytest.approx(rep["rmse"], rel=1e-9)
    assert sched.sigmas[0] == gmm.sigma_max and sched.sigmas[-1] == gmm.sigma_min
    assert np.all(np.diff(sched.sigmas) < 0)
    assert sched.method.objective["teacher_refine_rmse"] == pytest.approx(rep["rmse"])


def test_teacher_refine_from_several_starts_keeps_the_lowest(gmm):
    """refine_starts refines the best few start candidates and keeps the lowest result: never above
    the single-start refinement on the same noises, each run reported."""
    one = TrustRegionConfig(teacher_refine=True, teacher_refine_iters=15, select_n=8)
    many = TrustRegionConfig(teacher_refine=True, teacher_refine_iters=15, select_n=8, refine_starts=3)
    rep1 = optimize("trust-region", gmm, DPM3, 6, one).method.config["report"]["teacher_refine"]
    sched = optimize("trust-region", gmm, DPM3, 6, many)
    rep = sched.method.config["report"]["teacher_refine"]
    cands = rep["start_candidates"]
    assert list(rep["starts"]) == sorted(cands, key=cands.get)[:3]
    assert rep["starts"][rep1["start"]]["rmse"] == pytest.approx(rep1["rmse"], rel=1e-12)
    assert rep["rmse"] == min(r["rmse"] for r in rep["starts"].values()) <= rep1["rmse"]
    assert rep["starts"][rep["start"]]["rmse"] == rep["rmse"]
    assert GridValidator(gmm, DPM3, range(10_000, 10_008)).rmse(sched.sigmas) == pytest.approx(rep["rmse"], rel=1e-9)


def test_refine_grid_keeps_its_progress_when_a_trial_point_is_not_finite(gmm, monkeypatch):
    """A long L-BFGS trial step can collapse gaps until the solver overflows (measured: dpmpp-3m NFE 10
    on 4096 gmm-digits noises, RMSE 0.0285 -> NaN, and the refinement returned its start, 0.0455).
    Here every gradient evaluation after the fourth is NaN: the best iterate before it is returned,
    the NaN points are counted, and the grid is still increasing with the start's endpoints."""
    from stepopt.optimizers.trust_region import refine

    val = GridValidator(gmm, DPM3, range(10_000, 10_016))
    lam0 = -np.log(np.asarray(baseline_sigmas("time-uniform", 10, gmm.sigma_max, gmm.sigma_min, gmm.frame)))
    _, clean_rep = refine.refine_grid(val, lam0, 30)
    assert clean_rep["non_finite"] == 0 and clean_rep["accepted"]

    calls = [0]
    real_solve = refine.solve

    def flaky(*args, **kwargs):
        out = real_solve(*args, **kwargs)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > 4:
                return out * float("nan")
        return out

    monkeypatch.setattr(refine, "solve", flaky)
    lam, rep = refine.refine_grid(val, lam0, 30)
    assert rep["non_finite"] >= 1 and rep["accepted"], rep
    assert rep["rmse"] < rep["rmse_start"] and np.all(np.isfinite(lam)) and np.all(np.diff(lam) > 0)
    assert lam[0] == lam0[0] and lam[-1] == lam0[-1]
    assert val.rmse(np.exp(-lam)) == pytest.approx(rep["rmse"], rel=1e-9)
    # only four gradient evaluations were usable: less progress than the clean run's 30 iterations
    assert rep["rmse"] >= clean_rep["rmse"]


# -- acceptance on gmm-digits (exact ODE reference) ---------------------------------------------
BASELINES = ("logsnr", "edm", "time-uniform", "time-quadratic", "kl-optimal")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bh2", "bh1"])
def test_gmm_digits_unipc_teacher_refine_beats_every_baseline(gmm, variant):
    """unipc with teacher_refine (teacher noises 10000..10031), RMSE vs the exact ODE on held-out seeds
    0..249. Measured (this commit): see the README's UniPC table."""
    ident = get_solver("unipc").identity(variant=variant)
    rmse = GridValidator(gmm, ident, range(250)).rmse

    for nfe in (5, 6, 8, 10):
        tr = rmse(optimize("trust-region", gmm, ident, nfe, TrustRegionConfig(teacher_refine=True)).sigmas)
        base = {k: rmse(baseline_sigmas(k, nfe, gmm.sigma_max, gmm.sigma_min, gmm.frame)) for k in BASELINES}
        assert tr < 0.95 * min(base.values()), (nfe, tr, base)


@pytest.mark.slow
@pytest.mark.parametrize("nfe,margin", [(5, 0.03), (6, 0.01), (8, 0.05), (10, 0.05)])
def test_gmm_digits_beats_every_baseline(gmm, nfe, margin):
    """RMSE vs the exact ODE on seeds 0..999, dpmpp-3m (reference), default config (weights: paper).

    Measured (this commit): NFE 5 0.0850 vs 0.0921 (time-quadratic, -7.8 %), NFE 6 0.0728 vs
    0.0778 (-6.4 %), NFE 8 0.0495 vs 0.0573 (-14 %), NFE 10 0.0296 vs 0.0431 (-31 %).
    """
    rmse = GridValidator(gmm, DPM3, range(1000)).rmse
    tr = rmse(optimize("trust-region", gmm, DPM3, nfe).sigmas)
    base = {k: rmse(baseline_sigmas(k, nfe, gmm.sigma_max, gmm.sigma_min, gmm.frame)) for k in BASELINES}
    assert tr < (1 - margin) * min(base.values()), (tr, base)


@pytest.mark.slow
@pytest.mark.parametrize("nfe,margin", [(5, 0.0), (6, 0.05), (8, 0.15), (10, 0.2)])
def test_gmm_digits_unipc_beats_every_baseline(gmm, nfe, margin):
    """unipc bh2, default config (weights: paper, corrector: first), RMSE vs the exact ODE on held-out
    seeds 20000..20999 (issue 11). Measured (this commit), against the best baseline: NFE 5 0.0766 vs
    0.0782 (time-quadratic, -2.0 %), NFE 6 0.0623 vs 0.0678 (kl-optimal, -8.1 %), NFE 8 0.0362 vs
    0.0460 (time-quadratic, -21 %), NFE 10 0.0268 vs 0.0372 (kl-optimal, -28 %)."""
    rmse = GridValidator(gmm, UNIPC, range(20_000, 21_000)).rmse
    tr = rmse(optimize("trust-region", gmm, UNIPC, nfe).sigmas)
    base = {k: rmse(baseline_sigmas(k, nfe, gmm.sigma_max, gmm.sigma_min, gmm.frame)) for k in BASELINES}
    assert tr < (1 - margin) * min(base.values()), (tr, base)


def test_documented_config_file_is_the_defaults():
    from pathlib import Path

    from stepopt.config import resolve_config

    path = Path(__file__).resolve().parents[1] / "configs" / "trust-region.yaml"
    assert resolve_config(TrustRegionConfig, path) == TrustRegionConfig()
