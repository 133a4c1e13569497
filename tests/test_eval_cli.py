"""``stepopt eval`` and ``stepopt plot`` end to end (typer's CliRunner, in-process).

Ground truths: the closed-form ODE of ``builtin:gaussian`` and the exact (DOP853) ODE of
``builtin:gmm-digits``, each run directly through the solver from the same per-seed noise, as
``scripts/bench_solvers.py`` does, independently of the evaluation code.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepopt.build import baseline_schedule
from stepopt.cache import ENV_VAR
from stepopt.cli import app
from stepopt.metrics.exact import fd_exact
from stepopt.models import load_model
from stepopt.sampling import initial_noise
from stepopt.schedule import ModelRef, Schedule
from stepopt.solvers import get_solver, solve

runner = CliRunner()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.getbasetemp() / "eval-cache"  # shared by the module: reference features once
    monkeypatch.setenv(ENV_VAR, str(d))
    return d


def make(tmp_path: Path, model_id: str, kind: str, solver: str, nfe: int, final_step: str = "none") -> Path:
    m = load_model(model_id)
    spec = get_solver(solver)
    ident = spec.identity()
    s = baseline_schedule(kind, m, ident, spec.steps_for_nfe(ident, nfe, final_step), final_step=final_step)
    path = tmp_path / f"{Path(model_id).name.replace(':', '-')}-{solver}-{nfe}-{kind}-{final_step}.yaml"
    s.save(path)
    return path


def run(*args: str) -> dict:
    r = runner.invoke(app, ["eval", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def direct_error(model_id: str, path: Path, n: int) -> dict[str, float]:
    """ode-error computed without stepopt.evaluate: solve from seed noise, compare with the exact ODE."""
    m = load_model(model_id)
    s = Schedule.load(path)
    x = initial_noise(m, list(range(n)), sigma=s.sigmas[0])
    y = solve(s.solver, m, x, s.sigmas_tensor(), final_step=s.final_step)
    ref = m.ode_solution(x, s.sigmas[0], s.sigmas[-1])
    if s.final_step == "denoise":
        ref = m(ref, s.sigmas[-1])
    err = y - ref
    return {"rmse": float(err.pow(2).mean().sqrt()), "max": float(err.abs().max())}


def test_rows_grouped_and_ode_error_exact(tmp_path: Path) -> None:
    a = make(tmp_path, "builtin:gaussian", "edm", "euler", 6)
    b = make(tmp_path, "builtin:gaussian", "logsnr", "dpmpp-2m", 4)
    c = make(tmp_path, "builtin:gaussian", "edm", "dpmpp-2m", 4, final_step="denoise")
    out = run("-S", str(a), "-S", str(b), "-S", str(c), "--n", "16", "--metrics", "ode-error,fd-exact")
    rows = out["rows"]
    # Grouped by solver then NFE (both dpmpp-2m at NFE 4 before euler NFE 6), else in the given order.
    assert [(r["solver"], r["nfe"], r["method"]) for r in rows] == [
        ("dpmpp-2m", 4, "logsnr"),
        ("dpmpp-2m", 4, "edm"),
        ("euler", 6, "edm"),
    ]
    for r in rows:
        assert set(r) >= {"schedule", "model", "solver", "nfe", "method", "metrics"}
        assert r["model"] == "builtin:gaussian"
        want = direct_error("builtin:gaussian", Path(r["schedule"]), 16)
        assert r["metrics"]["ode-error"] == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert r["settings"]["ode-error"]["n"] == 16 and r["settings"]["ode-error"]["seed"] == 0
    assert rows[1]["settings"]["ode-error"]["target"].startswith("D(")
    assert rows[1]["settings"]["fd-exact"]["target_sigma"] == 0.0


def test_table_formats(tmp_path: Path) -> None:
    a = make(tmp_path, "builtin:gaussian", "edm", "euler", 5)
    b = make(tmp_path, "builtin:gaussian", "logsnr", "euler", 5)
    common = ["-S", str(a), "-S", str(b), "--n", "8"]
    for ext in ("md", "csv", "json"):
        r = runner.invoke(app, ["eval", *common, "--out", str(tmp_path / f"t.{ext}")])
        assert r.exit_code == 0, r.output
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0].startswith("| solver | nfe | method | schedule | ode-error rmse | ode-error max |")
    assert len(md) == 4
    recs = list(csv.DictReader((tmp_path / "t.csv").open()))
    js = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["method"] for r in recs] == [r["method"] for r in js] == ["edm", "logsnr"]
    assert float(recs[0]["ode-error rmse"]) == js[0]["metrics"]["ode-error"]["rmse"]  # csv keeps repr precision
    assert not list(tmp_path.glob(".*.tmp"))


def test_fid_and_error_independent_of_batch_size(tmp_path: Path) -> None:
    a = make(tmp_path, "builtin:gaussian", "edm", "dpmpp-2m", 5)
    runs = [
        run("-S", str(a), "--n", "64", "--metrics", "ode-error,fid-digits", "--batch-size", bs) for bs in ("5", "64")
    ]
    m1, m2 = (r["rows"][0]["metrics"] for r in runs)
    assert m1["fid-digits"] == pytest.approx(m2["fid-digits"], rel=1e-10)
    assert m1["ode-error"] == pytest.approx(m2["ode-error"], rel=1e-12)
    assert m1["fid-digits"] > 0


def test_write_back(tmp_path: Path) -> None:
    a = make(tmp_path, "builtin:gaussian", "edm", "euler", 5)
    before = Schedule.load(a)
    before.replace(metrics={"custom": {"value": 1.0}}).save(a)
    out = run("-S", str(a), "--n", "8", "--metrics", "ode-error,fd-exact", "--write-back")
    after = Schedule.load(a)  # still a valid v1 file
    assert after.sigmas == before.sigmas and after.solver == before.solver
    assert after.metrics["custom"] == {"value": 1.0}  # other metrics kept
    assert after.metrics["ode-error"]["rmse"] == out["rows"][0]["metrics"]["ode-error"]["rmse"]
    assert after.metrics["ode-error"]["settings"]["n"] == 8
    assert after.metrics["fd-exact"]["value"] == out["rows"][0]["metrics"]["fd-exact"]


def one_line_error(args: list[str], needle: str) -> None:
    r = runner.invoke(app, ["eval", *args])
    assert r.exit_code == 1, r.output
    text = r.output.strip()
    assert text.startswith("error:") and "\n" not in text and needle in text, text


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = make(tmp_path, "builtin:gaussian", "edm", "euler", 5)
    p = make(tmp_path, "builtin:point-mass", "edm", "euler", 5)
    one_line_error(["-S", str(g), "-S", str(p)], "evaluate one model at a time")
    one_line_error(["-S", str(g), "--metrics", "ode-error,fidd"], "unknown metric 'fidd'")
    one_line_error(["-S", str(g), "--out", str(tmp_path / "t.txt")], "unknown table format")
    one_line_error(["-S", str(g), "--fidelity-set", "kid_subsetz=3"], "valid options:")
    one_line_error(["-S", str(g), "--fidelity-set", "batch_size=3"], "set by stepopt eval itself")
    one_line_error(["-S", str(g), "--metrics", "kid-digits", "--reference", str(tmp_path / "nope")], "not an image")
    # No Inception weights: the promised one-line message, before any sampling.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    one_line_error(["-S", str(g), "--metrics", "fid"], "Inception-v3 weights not found")
    one_line_error(["-S", str(g), "--metrics", "fid", "--feature-weights", str(tmp_path / "w.pth")], "no such file")
    # A schedule whose fingerprint does not match the model it names.
    s = Schedule.load(g)
    m = s.model
    s.replace(model=ModelRef(m.id, "sha256:0", m.sigma_min, m.sigma_max, m.time)).save(tmp_path / "bad.yaml")
    one_line_error(["-S", str(tmp_path / "bad.yaml")], "fingerprint")


def test_ordering_matches_solver_benchmark(tmp_path: Path) -> None:
    # dpmpp-3m at NFE 5 on the mixture: the trust-region schedule against the logsnr baseline.
    from stepopt.optimizers import optimize

    gmm = load_model("builtin:gmm-digits")
    ident = get_solver("dpmpp-3m").identity()
    opt = optimize("trust-region", gmm, ident, 5)
    opt.save(tmp_path / "tr.yaml")
    base = make(tmp_path, "builtin:gmm-digits", "logsnr", "dpmpp-3m", 5)
    edm = make(tmp_path, "builtin:gmm-digits", "edm", "dpmpp-3m", 5)
    n = 24
    out = run(
        "-S",
        str(base),
        "-S",
        str(tmp_path / "tr.yaml"),
        "-S",
        str(edm),
        "--n",
        str(n),
        "--metrics",
        "ode-error,fd-exact",
    )
    got = {r["method"]: r["metrics"]["ode-error"]["rmse"] for r in out["rows"]}
    want = {
        k: direct_error("builtin:gmm-digits", p, n)["rmse"]
        for k, p in [("logsnr", base), ("trust-region", tmp_path / "tr.yaml"), ("edm", edm)]
    }
    # The exact ODE is DOP853 at 1e-12 tolerances: values agree far below the gaps between schedules.
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6)
    assert sorted(got, key=got.get) == sorted(want, key=want.get)
    gaps = sorted(want.values())
    assert min(b - a for a, b in itertools.pairwise(gaps)) > 1e-4  # the ordering is not a tie
    # fd-exact from the same samples, recomputed directly.
    s = Schedule.load(base)
    x = initial_noise(gmm, list(range(n)), sigma=s.sigmas[0])
    samples = solve(s.solver, gmm, x, s.sigmas_tensor())
    row = next(r for r in out["rows"] if r["method"] == "logsnr")
    assert row["metrics"]["fd-exact"] == pytest.approx(fd_exact(samples, gmm, s.sigmas[-1]), rel=1e-9)


def test_plot(tmp_path: Path) -> None:
    paths = [make(tmp_path, "builtin:gaussian", k, "euler", nfe) for k in ("edm", "logsnr") for nfe in (4, 6)]
    args = [x for p in paths for x in ("-S", str(p))]
    r = runner.invoke(
        app, ["eval", *args, "--n", "8", "--metrics", "ode-error,fd-exact", "--out", str(tmp_path / "t.json")]
    )
    assert r.exit_code == 0, r.output
    png = tmp_path / "p.png"
    r = runner.invoke(
        app, ["plot", *args, "--eval", str(tmp_path / "t.json"), "--metric", "ode-error:max", "--out", str(png)]
    )
    assert r.exit_code == 0, r.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > im.size[1] > 300  # two panels side by side
    r = runner.invoke(app, ["plot", "--eval", str(tmp_path / "t.json"), "--metric", "fid", "--out", str(png)])
    assert r.exit_code == 1 and "no row has metric 'fid'" in r.output
    r = runner.invoke(app, ["plot", "--out", str(png)])
    assert r.exit_code == 1 and "nothing to plot" in r.output


@pytest.mark.slow
def test_inception_fid_through_the_command(tmp_path: Path) -> None:
    # torch-fidelity's inception-v3-compat with random weights, saved and loaded for real; the
    # reference .npz holds the statistics of the same samples' features with the mean moved.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
            return None

    torch.save({}, tmp_path / "empty.pt")
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pt"))
    torch.save(net.state_dict(), tmp_path / "w.pth")
    a = make(tmp_path, "builtin:gaussian", "edm", "euler", 5)
    s = Schedule.load(a)
    g = load_model("builtin:gaussian")
    x = solve(s.solver, g, initial_noise(g, [0, 1, 2], sigma=s.sigmas[0]), s.sigmas_tensor())
    img = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        f = net(img)[0].double().numpy()
    np.savez(tmp_path / "ref.npz", mu=f.mean(0) + 0.5, sigma=np.cov(f, rowvar=False))
    out = run(
        "-S",
        str(a),
        "--n",
        "3",
        "--metrics",
        "fid",
        "--feature-weights",
        str(tmp_path / "w.pth"),
        "--reference",
        str(tmp_path / "ref.npz"),
    )
    assert out["rows"][0]["metrics"]["fid"] == pytest.approx(2048 * 0.25, rel=1e-4)
    assert math.isfinite(out["rows"][0]["metrics"]["fid"])
