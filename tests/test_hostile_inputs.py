"""Hostile and malformed inputs: every one gives one ``error:`` line, exit 1 (2 for usage), no traceback,
no partial or stray file, runs no foreign code and takes at most a few seconds.

Schedule files are data that people download and share. The cases here are the attacks and
mistakes of a review of the tool as a new user and as an attacker; each is run in-process
(typer's CliRunner) so the whole list stays fast.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from stepopt.cli import app
from stepopt.schedule import Schedule

runner = CliRunner()
SECONDS = 5.0  # no case may take longer (most take milliseconds)


def run(*args: Any, ok: bool = False):
    t0 = time.perf_counter()
    r = runner.invoke(app, [str(a) for a in args])
    took = time.perf_counter() - t0
    assert took < SECONDS, f"{args}: took {took:.1f} s"
    if ok:
        assert r.exit_code == 0, r.output
    return r


def assert_one_error(r, *fragments: str, code: int = 1) -> None:
    """Exit ``code``, one ``error:`` line on stderr naming ``fragments``, no traceback."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] if code == 1 else []
    if code == 1:
        assert len(errors) == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


@pytest.fixture(scope="module", autouse=True)
def _warm_imports() -> None:
    """Import matplotlib once up front: the time limit is for each case, not for first imports."""
    import stepopt.plots  # noqa: F401


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid gmm-digits schedule (logsnr, euler, NFE 4)."""
    p = tmp_path_factory.mktemp("good") / "logsnr.yaml"
    run("baseline", "logsnr", "--solver", "euler", "--nfe", 4, "--out", p, ok=True)
    return p


def edited(good: Path, tmp_path: Path, name: str, text_edit=None, data_edit=None) -> Path:
    text = good.read_text()
    if data_edit is not None:
        data = yaml.safe_load(text)
        data_edit(data)
        text = yaml.safe_dump(data, sort_keys=False)
    if text_edit is not None:
        text = text_edit(text)
    p = tmp_path / name
    p.write_text(text)
    return p


# A few hundred bytes that expand to 2^10 strings: ten levels of aliases (the "billion laughs").
ALIAS_BOMB = 'a: &a ["x", "x"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)
)


def alias_bomb(good: Path, tmp_path: Path) -> Path:
    body = "".join("  " + ln + "\n" for ln in ALIAS_BOMB.splitlines())
    return edited(good, tmp_path, "bomb.yaml", text_edit=lambda t: t.replace("metrics: {}\n", "metrics:\n" + body))


@pytest.mark.parametrize("command", ["validate", "show", "show --json", "eval", "sample"])
def test_alias_bomb_is_rejected_at_once(good: Path, tmp_path: Path, command: str) -> None:
    bomb = alias_bomb(good, tmp_path)
    assert len(bomb.read_bytes()) < 2000
    args = {"eval": ["eval", "-S", bomb, "--n", 2], "sample": ["sample", "--schedule", bomb, "--n", 2]}
    r = run(*args.get(command, [*command.split(), bomb]))
    assert_one_error(r, "bomb.yaml", "not allowed")


def test_anchor_without_alias_is_rejected(good: Path, tmp_path: Path) -> None:
    p = edited(good, tmp_path, "anchor.yaml", text_edit=lambda t: t.replace("metrics: {}", "metrics: &m {}"))
    assert_one_error(run("validate", p), "anchors (&m) are not allowed")


def test_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    p = tmp_path / "huge.yaml"
    with open(p, "wb") as f:  # 50 MB (sparse: costs nothing to make)
        f.truncate(50 * 1024 * 1024)
    assert_one_error(run("validate", p), "huge.yaml", "larger than the limit")
    assert_one_error(run("optimize", "-O", "ays", "--config", p), "--config", "larger than the limit")


@pytest.mark.parametrize("depth", [100, 100_000])
@pytest.mark.parametrize("style", ["flow", "block"])
def test_deep_nesting_is_one_line(tmp_path: Path, depth: int, style: str) -> None:
    p = tmp_path / "deep.yaml"
    if style == "flow":
        p.write_text("format: stepopt.schedule/v1\nmetrics: " + "[" * depth + "]" * depth + "\n")
    else:
        p.write_text("".join("  " * i + "k:\n" for i in range(min(depth, 3000))))
    r = run("validate", p)
    assert_one_error(r, "deep.yaml")
    assert "RecursionError" not in r.output


def test_not_a_regular_file(tmp_path: Path) -> None:
    assert_one_error(run("validate", tmp_path), "is a directory")
    if os.path.exists("/dev/zero"):
        assert_one_error(run("validate", "/dev/zero"), "not a regular file")
    fifo = tmp_path / "fifo.yaml"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)  # reading it would block forever
        assert_one_error(run("validate", fifo), "not a regular file")


def test_config_alias_bomb(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(ALIAS_BOMB)
    assert_one_error(run("optimize", "-O", "ays", "--config", cfg), "--config", "not allowed")


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['echo hi']\n",
        "format: !!python/name:os.system\n",
        "? [a, b]\n: 1\n",
        "format: stepopt.schedule/v1\nmodel: !!binary aGVsbG8=\n",
        "\t- tab\n",
        "",
        "~\n",
        "[1, 2, 3]\n",
    ],
)
def test_odd_yaml_documents(tmp_path: Path, text: str) -> None:
    p = tmp_path / "odd.yaml"
    p.write_text(text)
    assert_one_error(run("validate", p), "odd.yaml")


def test_schedule_load_is_fast_on_a_large_valid_grid(tmp_path: Path) -> None:
    """A 1000-step schedule (with every optional grid) loads quickly."""
    r = run("baseline", "logsnr", "--solver", "euler", "--nfe", 1000, "--out", tmp_path / "big.yaml", ok=True)
    t0 = time.perf_counter()
    s = Schedule.load(tmp_path / "big.yaml")
    assert s.nfe == 1000 and time.perf_counter() - t0 < 1.0
    assert r.exit_code == 0


@pytest.mark.parametrize(
    "text", ['{"rows": [1]}', '{"rows": [{"nfe": "4", "metrics": {}}]}', "[" * 100_000 + "]" * 100_000, "\xff"]
)
def test_plot_eval_malformed_tables(tmp_path: Path, text: str) -> None:
    table = tmp_path / "t.json"
    table.write_bytes(text.encode("latin-1"))
    assert_one_error(run("plot", "--eval", table, "--out", tmp_path / "p.png"), "t.json")


def test_disk_full_names_the_file(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("stepopt.io.os.replace", full)
    out = tmp_path / "s.yaml"
    r = run("baseline", "edm", "--out", out)
    assert_one_error(r, str(out), "No space left on device")
    assert list(tmp_path.iterdir()) == []


# --- A schedule file must never run code: its model id loads only built-in models without --trust-code.

EVIL = """
from pathlib import Path

def f():
    Path(__file__).with_name("ran.txt").write_text("ran")
    raise SystemExit(3)
"""


def _evil_schedule(good: Path, tmp_path: Path, model_id: str) -> Path:
    (tmp_path / "evil.py").write_text(EVIL)

    def set_id(d: dict) -> None:
        d["model"]["id"] = model_id

    return edited(good, tmp_path, "evil.yaml", data_edit=set_id)


@pytest.mark.parametrize("loader", ["python:{dir}/evil.py:f", "python:os:abort", "edm:{dir}/net.pkl"])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_schedule_model_id_never_runs_code_without_trust(good: Path, tmp_path: Path, loader: str, command: str) -> None:
    s = _evil_schedule(good, tmp_path, loader.format(dir=tmp_path))
    out = tmp_path / "out.npz"
    args = ("sample", "--schedule", s, "--n", 2, "--out", out) if command == "sample" else ("eval", "-S", s, "--n", 2)
    r = run(*args)
    assert_one_error(r, "--trust-code", "not a built-in model")
    assert not (tmp_path / "ran.txt").exists()
    assert not out.exists()


def test_schedule_model_id_from_a_hub_path_needs_trust_too(good: Path, tmp_path: Path) -> None:
    s = _evil_schedule(good, tmp_path, "diffusers:/etc")
    assert_one_error(run("sample", "--schedule", s, "--n", 1), "--trust-code")


def test_trust_code_opts_in_to_a_schedule_files_python_model(good: Path, tmp_path: Path) -> None:
    s = _evil_schedule(good, tmp_path, f"python:{tmp_path}/evil.py:f")
    run("sample", "--schedule", s, "--n", 1, "--out", tmp_path / "o.npz", "--trust-code")
    assert (tmp_path / "ran.txt").read_text() == "ran"  # the user opted in: the factory ran


def test_api_sample_refuses_a_schedule_files_code(good: Path, tmp_path: Path) -> None:
    import stepopt
    from stepopt.errors import StepoptError

    s = _evil_schedule(good, tmp_path, f"python:{tmp_path}/evil.py:f")
    with pytest.raises(StepoptError, match="`trust_code`"):  # the API's keyword (the CLI shows --trust-code)
        stepopt.sample(s, n=1)
    assert not (tmp_path / "ran.txt").exists()


def test_validate_and_show_say_which_files_need_trust_code(good: Path, tmp_path: Path) -> None:
    import json

    s = _evil_schedule(good, tmp_path, f"python:{tmp_path}/evil.py:f")
    r = run("validate", good, s, "--json", ok=True)
    assert json.loads(r.stdout)["needs_trust_code"] == {str(s): "it imports and runs a Python module"}
    assert f"ok {good}\n" in r.stderr and "--trust-code" in r.stderr
    shown = run("show", s, ok=True)
    assert "--trust-code" in shown.stdout
    assert "--trust-code" not in run("show", good, ok=True).stdout
    assert not (tmp_path / "ran.txt").exists()


# -- crashes, wrong exits and wrong behaviour; the newcomer's path ----------------------------------------


@pytest.mark.parametrize(
    "model_id", ["python:os:abort", "edm:/nonexistent/net.pkl", "diffusers:/etc", "nope:x", "builtin:no-such"]
)
def test_any_non_builtin_id_from_a_file_needs_the_flag(good: Path, tmp_path: Path, model_id: str) -> None:
    def set_id(d: dict[str, Any]) -> None:
        d["model"]["id"] = model_id

    sched = edited(good, tmp_path, "s.yaml", data_edit=set_id)
    r = run("sample", "--schedule", sched, "--n", 2, "--out", tmp_path / "x.npz")
    if model_id.startswith("builtin:"):
        assert_one_error(r, "unknown built-in model")
    else:
        assert_one_error(r, "--trust-code")


def test_code_loaders_need_the_flag_on_the_command_line_too(tmp_path: Path) -> None:
    r = run("optimize", "-m", "python:os:system", "-O", "ays", "--out", tmp_path / "s.yaml")
    assert_one_error(r, "--trust-code")
    r = run("baseline", "edm", "-m", "edm:net.pkl", "--out", tmp_path / "s.yaml")
    assert_one_error(r, "--trust-code")
    assert not list(tmp_path.iterdir())


def test_trusted_code_that_fails_is_one_line(tmp_path: Path) -> None:
    code = tmp_path / "bad.py"
    code.write_text("def raises():\n    raise RuntimeError('boom')\n\ndef junk():\n    return 42\n")
    r = run("optimize", "-m", "python:os:system", "--trust-code", "-O", "ays", "--out", tmp_path / "s.yaml")
    assert_one_error(r, "python:os:system: calling the factory failed")
    r = run("optimize", "-m", f"python:{code}:raises", "--trust-code", "--out", tmp_path / "s.yaml")
    assert_one_error(r, "calling the factory failed (RuntimeError: boom)")
    r = run("optimize", "-m", f"python:{code}:junk", "--trust-code", "--out", tmp_path / "s.yaml")
    assert_one_error(r, "lacks")
    assert not (tmp_path / "s.yaml").exists()


def test_non_utf8_config_and_schedule(good: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"samples: 8\n# \xff\xfe latin-1 \xe9\n")
    assert_one_error(run("optimize", "-O", "ays", "--config", cfg, "--out", tmp_path / "s.yaml"), "not UTF-8")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(good.read_bytes() + b"# \xe9\n")
    assert_one_error(run("validate", bad), "bad.yaml", "not UTF-8")
    assert not (tmp_path / "s.yaml").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["optimize", "--seed", -1],
        ["sample", "--seed", 2**64 - 1],
        ["sample", "--seed", -1],
        ["eval", "--seed", -1],
        ["eval", "--seed", 2**63],
        ["sample", "--n", 4, "--seed", 2**63 - 2],  # the last seed would overflow int64 (after sampling, before)
        ["eval", "--n", 4, "--seed", 2**63 - 2],
        ["sample", "--n", 0],
        ["eval", "--n", 1],
        ["sample", "--batch-size", 0],
        ["eval", "--batch-size", 0],
    ],
)
def test_seed_and_count_ranges_are_usage_errors_everywhere(good: Path, tmp_path: Path, args: list[Any]) -> None:
    out = tmp_path / "x.npz"
    extra = {"sample": ["--schedule", good, "--out", out], "eval": ["-S", good], "optimize": ["--out", out]}[args[0]]
    r = run(*args, *extra)
    assert_one_error(r, code=2)
    assert "Invalid value" in r.stderr and not out.exists()


def test_largest_seed_works(good: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.npz"
    run("sample", "--schedule", good, "--n", 2, "--seed", 2**63 - 2, "--out", out, ok=True)
    import numpy as np

    with np.load(out) as f:
        assert f["seeds"].tolist() == [2**63 - 2, 2**63 - 1]


def test_sample_n_beyond_memory_is_refused_at_once(good: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.npz"
    assert_one_error(run("sample", "--schedule", good, "--n", 10**12, "--out", out), "--n", "memory")
    assert not out.exists()


@pytest.mark.parametrize(
    "change",
    [
        {"num_train_timesteps": 0},
        {"num_train_timesteps": "abc"},
        {"num_train_timesteps": 1.5},
        {"beta_start": "x"},
        {"beta_end": -1},
        {"trained_betas": [0.1, "a"]},
        {"prediction_type": ["epsilon"]},
    ],
)
def test_bad_scheduler_config_values(tmp_path: Path, change: dict[str, Any]) -> None:
    pytest.importorskip("diffusers")
    from _tiny_diffusers import make_tiny_diffusers

    folder = make_tiny_diffusers(tmp_path / "tiny", channels=1)
    cfg = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(cfg.read_text())
    data.update(change)
    cfg.write_text(json.dumps(data))
    r = run("baseline", "logsnr", "-m", f"diffusers:{folder}", "--out", tmp_path / "s.yaml")
    assert_one_error(r, "scheduler_config.json")
    assert not (tmp_path / "s.yaml").exists()


@pytest.mark.parametrize(
    "metrics",
    [
        {"ode-error": {"rmse": "abc", "max": 1.0}},
        {"ode-error": "high"},
        {"fid": [1, 2]},
        {"fid": True},
        {"ode-error": {}},
    ],
)
def test_plot_eval_with_non_numeric_metrics(tmp_path: Path, metrics: dict[str, Any]) -> None:
    table = tmp_path / "t.json"
    row = {"schedule": "a.yaml", "method": "m", "solver": "euler", "nfe": 4, "metrics": metrics}
    table.write_text(json.dumps({"rows": [row]}))
    out = tmp_path / "p.png"
    assert_one_error(
        run("plot", "--eval", table, "--out", out), "no row has" if metrics == {"ode-error": {}} else "a.yaml"
    )
    assert not out.exists()


NAN_MODEL = """
import torch

class Net:
    sigma_min, sigma_max, shape, fingerprint = {smin}, {smax}, (1, 4, 4), "sha256:test-{name}"

    def __call__(self, x, sigma, **cond):
        d = x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)
        return torch.where(sigma.reshape(-1, 1, 1, 1) < {below}, torch.full_like(d, float("nan")), d)

def make():
    return Net()
"""


def user_model(tmp_path: Path, name: str, below: float = 1.0, smin: float = 0.002, smax: float = 80.0) -> str:
    f = tmp_path / f"{name}.py"
    f.write_text(NAN_MODEL.format(below=below, smin=smin, smax=smax, name=name))
    return f"python:{f}:make"


def test_sample_refuses_nan_with_seed_and_step(tmp_path: Path) -> None:
    model = user_model(tmp_path, "nan_below_1")
    sched = tmp_path / "s.yaml"
    run("baseline", "logsnr", "-m", model, "--trust-code", "--solver", "euler", "--nfe", 4, "--out", sched, ok=True)
    out = tmp_path / "x.npz"
    r = run("sample", "--schedule", sched, "--trust-code", "--n", 3, "--seed", 5, "--out", out)
    assert_one_error(r, "non-finite", "seed 5 at step 2 (sigma 0.")
    assert not out.exists()


def test_ays_refuses_nan_data_and_nan_models(tmp_path: Path) -> None:
    import numpy as np

    data = tmp_path / "nan.npz"
    np.savez(data, x=np.full((16, 1, 8, 8), np.nan))
    r = run("optimize", "-O", "ays", "--set", f"data={data}", "--out", tmp_path / "a.yaml")
    assert_one_error(r, "non-finite", "16 of 16 rows")
    good_data = tmp_path / "ok.npz"
    np.savez(good_data, x=np.zeros((16, 1, 4, 4)))
    model = user_model(tmp_path, "nan_below_1")
    r = run(
        "optimize", "-O", "ays", "-m", model, "--trust-code", "-s", "euler", "--nfe", 4, "--out", tmp_path / "a.yaml",
        "--set", f"data={good_data}", "--set", "val_noises=2", "--set", "samples=4", "--set", "teacher_steps=4",
    )  # fmt: skip
    assert_one_error(r, "non-finite", "seed")
    assert not (tmp_path / "a.yaml").exists()


@pytest.mark.parametrize("optimizer", ["ld3", "trust-region"])
def test_out_onto_a_directory_fails_before_work(tmp_path: Path, optimizer: str) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    r = run("optimize", "-O", optimizer, "--out", d)
    assert_one_error(r, f"--out {d}: is a directory")
    assert list(tmp_path.iterdir()) == [d] and not list(d.iterdir())  # no stray state or temporary file


@pytest.mark.parametrize("command", ["baseline", "plot", "eval", "sample"])
def test_every_output_path_is_checked_first(good: Path, tmp_path: Path, command: str) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    args = {
        "baseline": ["baseline", "edm", "--out", d / "x.yaml" / "y.yaml"],
        "plot": ["plot", "-S", good, "--out", d],
        "eval": ["eval", "-S", good, "--n", 2, "--out", d / "t.md" / "x.md"],
        "sample": ["sample", "--schedule", good, "--n", 2, "--grid", d],
    }[command]
    if command in ("baseline", "eval"):
        (d / ("x.yaml" if command == "baseline" else "t.md")).write_text("a file, not a folder\n")
    r = run(*args)
    assert_one_error(r, str(d))
    assert len(list(d.iterdir())) == (1 if command in ("baseline", "eval") else 0)


def test_writes_go_through_symlinks(good: Path, tmp_path: Path) -> None:
    target = tmp_path / "real.yaml"
    target.write_bytes(good.read_bytes())
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    s = Schedule.load(link)
    s.replace(metrics={"x": {"value": 1.0}}).save(link)
    assert link.is_symlink() and Schedule.load(target).metrics == {"x": {"value": 1.0}}
    r = runner.invoke(app, ["eval", "-S", str(link), "--n", "2", "--write-back"])  # (first eval imports metrics)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and "ode-error" in Schedule.load(target).metrics


def test_rho_only_for_edm(tmp_path: Path) -> None:
    r = run("baseline", "logsnr", "--rho", 3, "--out", tmp_path / "s.yaml")
    assert_one_error(r, "--rho", "edm")
    run("baseline", "edm", "--rho", 3, "--out", tmp_path / "s.yaml", ok=True)
    assert Schedule.load(tmp_path / "s.yaml").method.config["rho"] == 3.0


def test_single_noise_level_model_gets_sensible_advice(tmp_path: Path) -> None:
    model = user_model(tmp_path, "narrow", below=0.0, smin=1.0, smax=1.0 + 1e-9)
    r = run("optimize", "-m", model, "--trust-code", "--out", tmp_path / "s.yaml")
    assert_one_error(r, "too narrow")
    assert "min_gap" not in r.stderr


def test_published_schedules_and_configs_ship_with_the_package() -> None:
    from stepopt.schedule import data_dir, published_names

    repo = Path(__file__).resolve().parents[1]
    assert published_names() == sorted(p.stem for p in (repo / "schedules" / "published").glob("*.yaml"))
    assert sorted(p.name for p in data_dir("configs").glob("*.yaml")) == sorted(
        p.name for p in (repo / "configs").glob("*.yaml")
    )
    pyproject = (repo / "pyproject.toml").read_text()
    assert '"data/published/*.yaml"' in pyproject and '"data/configs/*.yaml"' in pyproject


def test_published_names_work_wherever_a_schedule_file_does(tmp_path: Path) -> None:
    r = run("validate", "published:ays-sd15", "published:ays-sdxl", ok=True)
    assert "needs --trust-code" not in r.stderr  # shipped files are part of stepopt
    assert "ays" in run("show", "published:ays-sd15", ok=True).stdout
    out = tmp_path / "i.yaml"
    src = "published:ays-sd15"
    run("baseline", "interpolate", "--from", src, "--solver", "dpmpp-2m", "--nfe", 20, "--out", out, ok=True)
    assert Schedule.load(out).nfe == 20
    assert_one_error(run("validate", "published:nope"), "no published schedule 'nope'", "ays-sd15")
    assert_one_error(run("eval", "published:ays-sd15", "--write-back", "--n", 2), "read-only")
    run("plot", "-S", "published:ays-sd15", "--out", tmp_path / "p.png", ok=True)


def test_models_lists_everything_uncut() -> None:
    r = run("models", ok=True)
    for name in ("builtin:gmm-digits", "builtin:unet-digits", "builtin:point-mass", "trust-region", "ays", "ld3"):
        assert name in r.stdout
    assert "None" not in r.stdout and "published:ays-sd15" in r.stdout and "…" not in r.stdout
    j = json.loads(run("models", "--json", ok=True).stdout)
    assert {"trust-region", "ays", "ld3"} <= {o["name"] for o in j["optimizers"]}
    assert "published:ays-sd15" in j["published"] and Path(j["configs"]).is_dir()


def test_optimize_and_baseline_share_defaults() -> None:
    import inspect as pyinspect

    from stepopt.cli.baseline import baseline
    from stepopt.cli.optimize import optimize_cmd

    for p in ("solver", "nfe"):
        a = pyinspect.signature(optimize_cmd).parameters[p].default
        b = pyinspect.signature(baseline).parameters[p].default
        assert a == b, p


def test_eval_takes_files_as_arguments_and_sample_takes_S(good: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["eval", str(good), "--n", "2", "--json"])  # (runs the teacher: not timed)
    assert r.exit_code == 0, r.output
    assert [row["schedule"] for row in json.loads(r.stdout)["rows"]] == [str(good)]
    out = tmp_path / "x.npz"
    run("sample", "-S", good, "--n", 2, "--out", out, ok=True)
    assert out.exists()
    r = run("eval", "--n", 2)
    assert_one_error(r, code=2)


@pytest.mark.parametrize("command", ["optimize", "baseline", "sample", "eval", "plot", "validate", "show"])
def test_help_has_no_python_type_metavars(command: str) -> None:
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "<list" not in r.stdout and "list[" not in r.stdout


def test_eval_reports_the_teacher_apart_from_the_rows(good: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["eval", str(good), "--n", "3", "--no-cache"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    t = [i for i, ln in enumerate(lines) if ln.startswith("teacher (sigma")]
    first_row = next(i for i, ln in enumerate(lines) if ln.startswith("[1/1]"))
    assert t and max(t) < first_row and "3 of 3 seeds to compute" in lines[t[0]]
    assert any("done in" in lines[i] for i in t)


def test_show_prints_the_config_report_as_yaml(tmp_path: Path) -> None:
    out = tmp_path / "tr.yaml"
    run("optimize", "--nfe", 4, "--out", out, ok=True)
    text = run("show", out, ok=True).stdout
    assert "method.config:\n" in text and "\n  report:\n" in text and "{'" not in text


def test_plot_y_axis_says_rmse() -> None:
    from stepopt.plots import metric_label

    rows = [{"nfe": 4, "metrics": {"ode-error": {"rmse": 0.1, "max": 0.3}, "fid": 3.0}}]
    assert metric_label(rows, "ode-error") == "ode-error RMSE"
    assert metric_label(rows, "ode-error:max") == "ode-error max"
    assert metric_label(rows, "fid") == "fid"


def test_show_json_says_whether_a_file_needs_trust_code(good: Path, tmp_path: Path) -> None:
    s = _evil_schedule(good, tmp_path, f"python:{tmp_path}/evil.py:f")
    assert json.loads(run("show", s, "--json", ok=True).stdout)["needs_trust_code"] is True
    assert json.loads(run("show", good, "--json", ok=True).stdout)["needs_trust_code"] is False
    assert json.loads(run("show", "published:ays-sd15", "--json", ok=True).stdout)["needs_trust_code"] is False
    assert not (tmp_path / "ran.txt").exists()


def test_trust_region_says_how_far_a_long_search_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large N runs for minutes: the search reports its stages (here at once; by default after 5 s)."""
    r = run("optimize", "--nfe", 8, "--out", tmp_path / "a.yaml", ok=True)
    assert "screening every start" not in r.stderr  # a short run stays quiet
    monkeypatch.setattr("stepopt.optimizers.trust_region.search.PROGRESS_SECONDS", 0.0)
    r = run("optimize", "--nfe", 8, "--out", tmp_path / "b.yaml", ok=True)
    assert "trust-region: N=8, screening every start: start logsnr done" in r.stderr
    assert "refining the best grid" in r.stderr


@pytest.mark.parametrize(
    "case",
    [
        "sample --schedule {evil} --out {d}/x.npz",
        "sample --schedule {good} --n 4 --seed 9223372036854775806 --out {d}/x.npz",
        "sample --schedule {good} --out {d}",
        "optimize -m python:os:system --out {d}/s.yaml",
        "optimize -O ld3 --out {d}",
        "eval {evil} --n 2",
    ],
)
def test_refusals_come_before_the_heavy_imports(good: Path, tmp_path: Path, case: str) -> None:
    """A mistake costs nothing: these are refused before torch is imported (a process of its own)."""
    import subprocess
    import sys

    import stepopt

    evil = _evil_schedule(good, tmp_path, f"python:{tmp_path}/evil.py:f")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "samples.npz").mkdir()  # `sample --out DIR` writes DIR/samples.npz: here a folder
    args = case.format(evil=evil, good=good, d=d).split()
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom stepopt.cli import app\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\n"
        "print(r.exit_code, 'torch' in sys.modules)\nprint(r.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(stepopt.__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    first, _, stderr = p.stdout.partition("\n")
    assert first.split()[0] in ("1", "2") and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert first.split()[1] == "False", f"torch was imported before refusing: {stderr}"
    assert not (tmp_path / "ran.txt").exists()


def test_eval_refuses_a_nan_model_naming_the_seed(tmp_path: Path) -> None:
    """The teacher (computed first) refuses non-finite values with the seed; nothing is cached for it."""
    model = user_model(tmp_path, "nan_below_1_eval")
    sched = tmp_path / "s.yaml"
    run("baseline", "logsnr", "-m", model, "--trust-code", "--solver", "euler", "--nfe", 4, "--out", sched, ok=True)
    cache = tmp_path / "cache"
    out = tmp_path / "t.md"
    r = runner.invoke(
        app,
        ["eval", str(sched), "--trust-code", "--n", "2", "--seed", "7", "--teacher-set", "steps=4", "--out", str(out)],
        env={"STEPOPT_CACHE_DIR": str(cache)},
    )
    assert_one_error(r, "teacher (", "non-finite", "seed 7 at step 3 (sigma 0.")
    assert not out.exists() and not list(cache.rglob("*.npy"))


def test_api_code_loaders_take_trust_code_and_share_the_cli_defaults(tmp_path: Path) -> None:
    import inspect as pyinspect

    import stepopt
    from stepopt.cli.optimize import optimize_cmd
    from stepopt.errors import StepoptError

    model = user_model(tmp_path, "api_model", below=0.0)  # never NaN
    with pytest.raises(StepoptError, match="`trust_code`"):  # the API's keyword (the CLI shows --trust-code)
        stepopt.baseline("logsnr", model, nfe=4)
    assert stepopt.baseline("logsnr", model, nfe=4, trust_code=True).model.id == model
    cli = pyinspect.signature(optimize_cmd).parameters
    for fn in (stepopt.optimize, stepopt.baseline):
        params = pyinspect.signature(fn).parameters
        assert params["solver"].default == cli["solver"].default and params["nfe"].default == cli["nfe"].default
        assert "trust_code" in params
