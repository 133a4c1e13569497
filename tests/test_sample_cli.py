"""``stepopt sample`` and the sampling library behind it.

Exact answers come from the point mass (D = x0, so Euler is exact: x_N = x0 + sigma_N/sigma_0
(x_0 - x0)) with the noise of seed S+i drawn independently here; batch-size independence is checked
bit for bit on the default model; bad input must give one line, exit 1 and no file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny_diffusers import make_tiny_diffusers
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.images import grid_array, save_grid
from stepopt.models import IsotropicGaussian, load_model
from stepopt.sampling import sample_schedule, schedule_mismatches
from stepopt.schedule import Schedule
from stepopt.solvers import SolverIdentity

runner = CliRunner()


def run(*args: str):
    # These schedules name diffusers folders: a file's non-built-in model loads only with --trust-code.
    extra = ["--trust-code"] if args and args[0] in ("sample", "eval") else []
    return runner.invoke(app, [str(a) for a in args] + extra, catch_exceptions=False)


def baseline(tmp_path: Path, model: str = "builtin:gmm-digits", solver: str = "dpmpp-3m", nfe: int = 6) -> Path:
    out = tmp_path / f"{solver}-{nfe}-{model.replace(':', '_').replace('/', '_')}.yaml"
    r = run("baseline", "logsnr", "--model", model, "--solver", solver, "--nfe", nfe, "--out", out)
    assert r.exit_code == 0, r.stderr
    return out


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def gmm_schedule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return baseline(tmp_path_factory.mktemp("sched"))


def test_same_samples_for_any_batch_size(tmp_path: Path, gmm_schedule: Path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run("sample", "--schedule", gmm_schedule, "--n", 64, "--seed", 0, "--out", a).exit_code == 0
    assert (
        run("sample", "--schedule", gmm_schedule, "--n", 64, "--seed", 0, "--out", b, "--batch-size", 7).exit_code == 0
    )
    with np.load(a, allow_pickle=False) as fa, np.load(b, allow_pickle=False) as fb:
        assert fa["samples"].dtype == np.float32 and fa["samples"].shape == (64, 1, 8, 8)
        assert np.array_equal(fa["samples"], fb["samples"])  # bit for bit
        assert np.array_equal(fa["seeds"], np.arange(64))


def test_npz_records_the_schedule_identity(tmp_path: Path, gmm_schedule: Path) -> None:
    out = tmp_path / "s.npz"
    assert run("sample", "--schedule", gmm_schedule, "--n", 3, "--seed", 10, "--out", out).exit_code == 0
    s = Schedule.load(gmm_schedule)
    with np.load(out, allow_pickle=False) as f:
        assert str(f["format"]) == "stepopt.samples/v1"
        assert str(f["model_id"]) == "builtin:gmm-digits" and str(f["fingerprint"]) == s.model.fingerprint
        assert json.loads(str(f["solver"])) == s.solver.to_dict()
        assert int(f["nfe"]) == s.nfe == 6 and str(f["method"]) == "logsnr" and str(f["final_step"]) == "none"
        assert f["sigmas"].dtype == np.float64 and tuple(f["sigmas"]) == s.sigmas
        assert Schedule.from_dict(json.loads(str(f["schedule"]))) == s
        assert str(f["schedule_path"]) == str(gmm_schedule) and json.loads(str(f["warnings"])) == []
        assert list(f["seeds"]) == [10, 11, 12]


def test_point_mass_samples_are_exact(tmp_path: Path) -> None:
    """Euler on a point mass is exact; the noise of sample i comes from manual_seed(S + i)."""
    sched = baseline(tmp_path, "builtin:point-mass", "euler", 4)
    out = tmp_path / "pm.npz"
    r = run("sample", "--schedule", sched, "--n", 5, "--seed", 3, "--batch-size", 2, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    s = Schedule.load(sched)
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 8, 8)  # builtin:point-mass
    want = []
    for i in range(5):
        eps = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(3 + i), dtype=torch.float64)
        want.append(x0 + s.sigmas[-1] / s.sigmas[0] * (s.sigmas[0] * eps - x0))
    with np.load(out) as f:
        np.testing.assert_allclose(f["samples"], torch.stack(want).float().numpy(), rtol=1e-6, atol=1e-6)
    payload = json.loads(r.stdout)
    assert payload["path"] == str(out) and payload["n"] == 5 and payload["nfe"] == 4
    assert payload["schedule"] == str(sched) and payload["seconds"] >= 0 and payload["warnings"] == []


def test_seed_offsets_select_rows(tmp_path: Path, gmm_schedule: Path) -> None:
    assert run("sample", "--schedule", gmm_schedule, "--n", 6, "--out", tmp_path / "all.npz").exit_code == 0
    assert run("sample", "--schedule", gmm_schedule, "--n", 2, "--seed", 4, "--out", tmp_path / "t.npz").exit_code == 0
    with np.load(tmp_path / "all.npz") as a, np.load(tmp_path / "t.npz") as t:
        assert np.array_equal(a["samples"][4:6], t["samples"])


def test_out_directory_default_path_and_grid(tmp_path: Path, gmm_schedule: Path, monkeypatch) -> None:
    r = run("sample", "--schedule", gmm_schedule, "--n", 2, "--out", tmp_path / "dir")
    assert r.exit_code == 0 and (tmp_path / "dir" / "samples.npz").is_file()
    monkeypatch.chdir(tmp_path)
    r = run("sample", "--schedule", gmm_schedule, "--n", 64, "--grid", "g.png")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "samples" / "gmm-digits" / "dpmpp-3m" / "nfe6" / "logsnr.npz").is_file()
    from PIL import Image

    with Image.open(tmp_path / "g.png") as img:
        # 64 images of 8x8 enlarged 8x to 64 px, 8 per row, 2 px gaps: 8 * 66 + 2 = 530.
        assert img.size == (530, 530) and img.mode == "L"


def test_grid_array_pixels() -> None:
    x = np.zeros((5, 3, 2, 2))
    x[0] = -2.0  # clipped to -1 -> 0
    x[1] = 1.0  # -> 255
    x[2, 0] = 0.5  # (0.5 + 1) * 127.5 = 191.25 -> 191
    g = grid_array(x, min_cell=4)
    # 5 images -> 3 columns, 2 rows; cells 2x2 enlarged 2x to 4x4 with 2 px gaps.
    assert g.shape == (2 * 6 + 2, 3 * 6 + 2, 3) and g.dtype == np.uint8
    assert (g[2:6, 2:6] == 0).all() and (g[2:6, 8:12] == 255).all()
    assert (g[2:6, 14:18, 0] == 191).all() and (g[2:6, 14:18, 1] == 128).all()  # 0 -> 127.5 -> 128
    assert grid_array(np.zeros((100, 1, 8, 8))).shape == (8 * 66 + 2, 8 * 66 + 2)  # at most 64 images
    with pytest.raises(StepoptError, match="not images"):
        grid_array(np.zeros((2, 2, 8, 8)))


def test_save_grid_writes_png(tmp_path: Path) -> None:
    from PIL import Image

    path = save_grid(tmp_path / "g.png", np.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.size == (2 * (64 + 2) + 2, 64 + 4)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--out", "OUT/x.txt"), "expected a .npz file or a directory"),
        (("--out", "SCHED/x.npz"), "is not a directory"),
        (("--grid", "OUT/g.jpg"), "expected a .png file"),
        (("--model", "builtin:gaussian"), "fingerprint"),
        (("--model", "builtin:nope"), "unknown built-in model"),
    ],
)
def test_bad_input_one_line_exit_1_no_file(tmp_path: Path, gmm_schedule: Path, args, fragment) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = tuple(a.replace("OUT", str(out)).replace("SCHED", str(gmm_schedule)) for a in args)
    extra = () if "--out" in args else ("--out", str(out / "s.npz"))
    r = run("sample", "--schedule", gmm_schedule, "--n", "2", *extra, *args)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]
    assert files(out) == set()


@pytest.mark.parametrize("args", [("--n", "0"), ("--n", "-3"), ("--batch-size", "0"), ("--seed", "-1")])
def test_out_of_range_counts_are_usage_errors(tmp_path: Path, gmm_schedule: Path, args) -> None:
    """Like --nfe 0 and eval's --n 1: a value outside an option's range is a usage error (exit 2)."""
    r = run("sample", "--schedule", gmm_schedule, "--out", str(tmp_path / "s.npz"), *args)
    assert r.exit_code == 2 and f"Invalid value for '{args[0]}'" in r.stderr
    assert files(tmp_path) == set()


def test_missing_or_invalid_schedule(tmp_path: Path) -> None:
    r = run("sample", "--schedule", tmp_path / "nope.yaml", "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "no such file" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: stepopt.schedule/v1\nnfe: 3\n")
    r = run("sample", "--schedule", bad, "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "missing required key" in r.stderr
    assert files(tmp_path) == {"bad.yaml"}


def test_force_records_the_mismatch(tmp_path: Path, gmm_schedule: Path) -> None:
    out = tmp_path / "f.npz"
    r = run(
        "sample", "--schedule", gmm_schedule, "--model", "builtin:gaussian", "--n", 2, "--out", out, "--force", "--json"
    )
    assert r.exit_code == 0 and "warning:" in r.stderr
    (warning,) = json.loads(r.stdout)["warnings"]
    assert "fingerprint" in warning and "builtin:gmm-digits" in warning
    with np.load(out) as f:
        assert json.loads(str(f["warnings"])) == [warning] and str(f["model_id"]) == "builtin:gaussian"


def test_cli_samples_under_inference_mode(tmp_path: Path, gmm_schedule: Path, monkeypatch) -> None:
    import stepopt.sampling as lib  # the command imports it when it runs

    seen = []

    def spy(*args, **kw):
        seen.append(torch.is_inference_mode_enabled())
        return sample_schedule(*args, **kw)

    monkeypatch.setattr(lib, "sample_schedule", spy)
    assert run("sample", "--schedule", gmm_schedule, "--n", 1, "--out", tmp_path / "x.npz").exit_code == 0
    assert seen == [True]


def test_library_progress_and_differentiability(gmm_schedule: Path) -> None:
    s = Schedule.load(gmm_schedule)
    m = load_model(s.model.id)
    calls: list[tuple[int, int]] = []
    x = sample_schedule(m, s, list(range(10)), batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 10), (4, 10), (8, 10), (10, 10)] and x.shape == (10, 1, 8, 8)
    # Outside the CLI nothing disables autograd: the samples depend differentiably on the model.
    mu = torch.zeros(1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = sample_schedule(IsotropicGaussian(mu, c=0.5), s, [0, 1], batch_size=1)
    (grad,) = torch.autograd.grad(y.sum(), mu)
    assert grad.abs().sum() > 0
    with pytest.raises(StepoptError, match="batch size 0"):
        sample_schedule(m, s, [0], batch_size=0)


def test_schedule_mismatches(gmm_schedule: Path) -> None:
    s = Schedule.load(gmm_schedule)
    assert schedule_mismatches(s, load_model(s.model.id)) == []
    narrow = IsotropicGaussian(torch.zeros(1, 8, 8, dtype=torch.float64), sigma_max=10.0)
    problems = schedule_mismatches(s, narrow)
    assert len(problems) == 2 and "fingerprint" in problems[0] and "sigma range" in problems[1]
    incomplete = Schedule.load(gmm_schedule)
    object.__setattr__(incomplete, "solver", SolverIdentity("dpmpp-3m", 3, None, None))  # as an older file might
    (problem,) = schedule_mismatches(incomplete, load_model(s.model.id))
    assert "resolves to" in problem


def test_diffusers_model_end_to_end(tmp_path: Path) -> None:
    """A tiny diffusers UNet through baseline -> sample; batch size changes float32 conv bits only."""
    pytest.importorskip("diffusers")
    folder = make_tiny_diffusers(tmp_path / "tiny", channels=3)
    sched = baseline(tmp_path, f"diffusers:{folder}", "unipc", 4)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    r = run("sample", "--schedule", sched, "--n", 4, "--out", a, "--grid", tmp_path / "g.png", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert run("sample", "--schedule", sched, "--n", 4, "--out", b, "--batch-size", 3).exit_code == 0
    with np.load(a) as fa, np.load(b) as fb:
        assert fa["samples"].shape == (4, 3, 8, 8) and str(fa["model_id"]) == f"diffusers:{folder}"
        scale = np.abs(fa["samples"]).max()
        np.testing.assert_allclose(fa["samples"], fb["samples"], rtol=0, atol=1e-5 * scale)
    assert (tmp_path / "g.png").is_file()
