"""Paired bootstrap of per-seed errors (``stepopt.stats``) and ``stepopt eval --versus``.

Ground truths: exact cases (identical errors; one schedule's errors a constant multiple of the
other's, so every resample has the same ratio), scipy's own paired percentile bootstrap
(``scipy.stats.bootstrap``, written by nobody here) on heavy-tailed data, and per-seed errors
recomputed in the test from the exact ODE of ``builtin:gmm-digits``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps
from typer.testing import CliRunner

from stepopt.build import baseline_schedule
from stepopt.cli import app
from stepopt.models import load_model
from stepopt.sampling import initial_noise
from stepopt.schedule import Schedule
from stepopt.solvers import get_solver, solve
from stepopt.stats import paired_bootstrap

runner = CliRunner()


def heavy(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed squared errors like the digits': mostly small, a few seeds far larger."""
    b = rng.lognormal(0.0, 1.5, n)
    a = b * rng.lognormal(-0.1, 0.3, n)
    return a, b


def test_exact_cases() -> None:
    rng = np.random.default_rng(1)
    b = rng.lognormal(0.0, 1.0, 100)
    same = paired_bootstrap(b, b.copy())
    assert (same.change, same.low, same.high, same.better) == (0.0, 0.0, 0.0, 0.0)
    assert not same.significant
    four = paired_bootstrap(4 * b, b)  # RMSE ratio exactly 2 on every resample
    assert four.change == pytest.approx(1.0, abs=1e-12)
    assert four.low == pytest.approx(1.0, abs=1e-12) and four.high == pytest.approx(1.0, abs=1e-12)
    assert four.better == 0.0 and four.significant
    quarter = paired_bootstrap(b / 4, b)
    assert quarter.change == pytest.approx(-0.5, abs=1e-12) and quarter.better == 1.0
    assert "-50.0 % [-50.0, -50.0], better on 100 %" == quarter.describe()


def test_agrees_with_scipy_paired_bootstrap() -> None:
    a, b = heavy(np.random.default_rng(7), 300)
    ours = paired_bootstrap(a, b, resamples=20000, seed=3)

    def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sqrt(np.mean(x, axis=axis) / np.mean(y, axis=axis)) - 1

    ref = sps.bootstrap(
        (a, b),
        ratio,
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        confidence_level=0.95,
        random_state=np.random.default_rng(5),
    ).confidence_interval
    assert ours.change == pytest.approx(float(ratio(a, b)), abs=1e-12)
    # Two Monte-Carlo estimates of the same percentiles (different random streams).
    assert ours.low == pytest.approx(ref.low, abs=0.01)
    assert ours.high == pytest.approx(ref.high, abs=0.01)
    assert ours.low < ours.change < ours.high
    assert ours.high - ours.low > 0.05  # heavy tails: a wide interval, not a degenerate one
    again = paired_bootstrap(a, b, resamples=20000, seed=3)
    assert (again.low, again.high) == (ours.low, ours.high)  # seeded


def test_bad_input() -> None:
    x = np.ones(5)
    for args, needle in [
        ((x, np.ones(4)), "same seeds"),
        ((x[:1], x[:1]), "at least 2"),
        ((x, -x), ">= 0"),
        ((x, np.full(5, np.nan)), "finite"),
        ((x, np.zeros(5)), "zero error"),
    ]:
        with pytest.raises(ValueError, match=needle):
            paired_bootstrap(*args)


def make(tmp_path: Path, kind: str, nfe: int, final_step: str = "none") -> Path:
    m = load_model("builtin:gmm-digits")
    spec = get_solver("dpmpp-3m")
    ident = spec.identity()
    s = baseline_schedule(kind, m, ident, spec.steps_for_nfe(ident, nfe, final_step), final_step=final_step)
    path = tmp_path / f"{kind}-{nfe}-{final_step}.yaml"
    s.save(path)
    return path


def seed_errors(path: Path, n: int) -> np.ndarray:
    """Each seed's squared error against the exact ODE, without stepopt.evaluate."""
    m = load_model("builtin:gmm-digits")
    s = Schedule.load(path)
    x = initial_noise(m, list(range(n)), sigma=s.sigmas[0])
    y = solve(s.solver, m, x, s.sigmas_tensor(), final_step=s.final_step)
    ref = m.ode_solution(x, s.sigmas[0], s.sigmas[-1])
    return (y - ref).to(torch.float64).pow(2).flatten(1).mean(1).numpy()


def test_eval_versus(tmp_path: Path) -> None:
    n = 200
    kl, tq, edm = (make(tmp_path, k, 6) for k in ("kl-optimal", "time-quadratic", "edm"))
    den = make(tmp_path, "kl-optimal", 6, final_step="denoise")
    args = ["eval", str(kl), str(tq), str(edm), str(den), "--n", str(n), "--versus", str(kl), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = {Path(row["schedule"]).name: row for row in json.loads(r.stdout)["rows"]}
    assert rows[kl.name]["versus"] == {"schedule": str(kl), "reference": True}
    assert rows[den.name]["versus"]["comparable"] is False  # its targets are D(x(sigma_min))
    ref_err = seed_errors(kl, n)
    for p in (tq, edm):
        v = rows[p.name]["versus"]
        mine = seed_errors(p, n)
        rmse = rows[p.name]["metrics"]["ode-error"]["rmse"] / rows[kl.name]["metrics"]["ode-error"]["rmse"] - 1
        assert v["change"] == pytest.approx(rmse, rel=1e-9)
        assert v["change"] == pytest.approx(np.sqrt(mine.mean() / ref_err.mean()) - 1, rel=1e-9)
        assert v["better"] == pytest.approx(np.mean(mine < ref_err), abs=1e-12)
        assert v["low"] <= v["change"] <= v["high"] and v["n"] == n and v["resamples"] == 2000
    assert rows[edm.name]["versus"]["low"] > 0  # edm at NFE 6 is clearly worse on the mixture
    # The markdown table on stderr carries the columns.
    assert "vs ref %" in r.stderr and "better on %" in r.stderr


def one_line_error(args: list[str], needle: str) -> None:
    r = runner.invoke(app, ["eval", *args])
    assert r.exit_code == 1, r.output
    text = r.output.strip()
    assert text.startswith("error:") and "\n" not in text and needle in text, text


def test_eval_versus_errors(tmp_path: Path) -> None:
    kl, tq = make(tmp_path, "kl-optimal", 5), make(tmp_path, "time-quadratic", 5)
    one_line_error([str(kl), "--n", "8", "--versus", str(tq)], "not one of the schedules")
    one_line_error([str(kl), str(tq), "--n", "8", "--metrics", "fd-exact", "--versus", str(tq)], "add ode-error")
    r = runner.invoke(app, ["eval", str(kl), str(tq), "--n", "8", "--versus", str(tq), "--resamples", "0"])
    assert r.exit_code == 2 and "Invalid value for '--resamples'" in r.stderr  # typer's usage error, as for --n
