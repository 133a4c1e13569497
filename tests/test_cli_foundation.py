"""The command line: baseline/show/validate/models, one-line errors with exit 1, no partial files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stepopt import __version__
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.schedule import Schedule

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_version_and_module_entry_point():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"stepopt {__version__}"
    p = subprocess.run([sys.executable, "-m", "stepopt", "--version"], capture_output=True, text=True, check=False)
    assert p.returncode == 0 and p.stdout.strip() == f"stepopt {__version__}"


def test_baseline_logsnr_acceptance(tmp_path):
    out = tmp_path / "s.yaml"
    r = run("baseline", "logsnr", "--solver", "euler", "--nfe", "5", "--out", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["path"] == str(out) and payload["nfe"] == 5
    s = Schedule.load(out)
    assert s.sigmas[0] == 80.0 and s.sigmas[-1] == 0.002 and len(s.sigmas) == 6
    np.testing.assert_allclose(np.diff(np.log(s.sigmas)), math.log(0.002 / 80.0) / 5, rtol=1e-12)
    assert run("validate", str(out)).exit_code == 0


def _corrupt(tmp_path, name, edit):
    good = tmp_path / "good.yaml"
    run("baseline", "logsnr", "--solver", "euler", "--nfe", "5", "--out", str(good))
    bad = tmp_path / name
    bad.write_text(edit(good.read_text()))
    return bad


@pytest.mark.parametrize(
    ("name", "edit", "fragment"),
    [
        ("nonmono.yaml", lambda t: t.replace("80.0, 9.6", "80.0, 99.6"), "'sigmas[1]'"),
        ("trunc.yaml", lambda t: t[: t.index("sigmas:") + 20], "not valid YAML"),
        ("v9.yaml", lambda t: t.replace("stepopt.schedule/v1", "stepopt.schedule/v9"), "'format'"),
        ("nfe.yaml", lambda t: t.replace("nfe: 5", "nfe: 4"), "'nfe' = 4"),
        ("empty.yaml", lambda t: "", "expected a mapping"),
    ],
)
def test_validate_rejects_bad_files_with_one_line(tmp_path, name, edit, fragment):
    bad = _corrupt(tmp_path, name, edit)
    r = run("validate", str(bad))
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_validate_stops_at_first_invalid_and_names_it(tmp_path):
    good = _corrupt(tmp_path, "ok.yaml", lambda t: t)
    bad = _corrupt(tmp_path, "bad.yaml", lambda t: t.replace("nfe: 5", "nfe: 4"))
    r = run("validate", str(good), str(bad), str(good))
    assert r.exit_code == 1 and f"error: {bad}" in r.stderr and r.stderr.count(f"ok {good}") == 1


def test_user_errors_exit_1_without_traceback_or_partial_file(tmp_path):
    out = tmp_path / "x.yaml"
    for args, fragment in [
        (("baseline", "nope"), "unknown baseline 'nope'"),
        (("baseline", "edm", "--solver", "zzz"), "unknown solver 'zzz'"),
        (("baseline", "edm", "--model", "builtin:zzz"), "unknown built-in model"),
        (("baseline", "edm", "--order", "5"), "does not support order 5"),
        (("baseline", "interpolate"), "needs --from"),
        (("baseline", "interpolate", "--from", str(tmp_path / "missing.yaml")), "no such file"),
        (("show", str(tmp_path / "missing.yaml")), "no such file"),
    ]:
        r = run(*args, "--out", str(out)) if args[0] == "baseline" else run(*args)
        assert r.exit_code == 1, (args, r.output)
        assert fragment in r.stderr and "Traceback" not in r.output
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("baseline", "edm", "--out", str(blocker / "sub" / "s.yaml"))
    assert r.exit_code == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback():
    r = runner.invoke(app, ["--debug", "baseline", "nope"])
    assert r.exit_code != 0 and r.exception is not None
    # --debug re-raises the library error itself (a traceback), instead of the one-line "error:" exit
    assert isinstance(r.exception, StepoptError) and "unknown baseline 'nope'" in str(r.exception)
    assert r.exc_info is not None and r.exc_info[2] is not None  # the traceback
    assert "error:" not in r.output
    plain = runner.invoke(app, ["baseline", "nope"])
    assert plain.exit_code == 1 and isinstance(plain.exception, SystemExit)


def test_usage_error_exits_2():
    assert run("baseline", "edm", "--nfe", "0").exit_code == 2


def test_interpolate_and_show(tmp_path):
    src = tmp_path / "edm10.yaml"
    assert run("baseline", "edm", "--nfe", "10", "--out", str(src)).exit_code == 0
    dst = tmp_path / "i20.yaml"
    r = run("baseline", "interpolate", "--from", str(src), "--nfe", "20", "--out", str(dst))
    assert r.exit_code == 0, r.stderr
    a, b = Schedule.load(src), Schedule.load(dst)
    np.testing.assert_allclose(b.sigmas[::2], a.sigmas, rtol=1e-12)
    assert b.method.config["from_method"] == "edm"
    r = run("show", str(dst))
    assert r.exit_code == 0 and "interpolate schedule for builtin:gmm-digits" in r.stdout
    j = json.loads(run("show", str(dst), "--json").stdout)
    assert j["nfe"] == 20 and len(j["sigmas"]) == 21


def test_default_output_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("--json", "baseline", "kl-optimal", "--nfe", "4")
    assert r.exit_code == 0
    path = json.loads(r.stdout)["path"]
    assert path == "schedules/gmm-digits/dpmpp-3m/nfe4/kl-optimal.yaml"  # the same defaults as optimize
    assert yaml.safe_load((tmp_path / path).read_text())["method"]["name"] == "kl-optimal"


def test_models_lists_builtins_and_solvers():
    j = json.loads(run("models", "--json").stdout)
    ids = [b["id"] for b in j["builtins"]]
    assert "builtin:gmm-digits" in ids
    assert "euler" in [s["name"] for s in j["solvers"]]
    gmm = j["builtins"][ids.index("builtin:gmm-digits")]
    assert gmm["sigma_min"] == 0.002 and gmm["sigma_max"] == 80.0 and gmm["fingerprint"].startswith("sha256:")


def test_optimize_refuses_init_and_resume_for_optimizers_without_them(tmp_path):
    src = tmp_path / "edm.yaml"
    assert run("baseline", "edm", "--solver", "dpmpp-3m", "--nfe", "6", "--out", str(src)).exit_code == 0
    r = run("optimize", "--init", str(src), "--out", str(tmp_path / "o.yaml"))
    assert r.exit_code == 1 and "optimizer 'trust-region' does not take a start schedule" in r.stderr
    r = run("optimize", "--resume", "--out", str(tmp_path / "o.yaml"))
    assert r.exit_code == 1 and "keeps no resumable state" in r.stderr
    assert not (tmp_path / "o.yaml").exists()


def test_library_parameters_are_shown_as_flags(tmp_path):
    """The library names parameters (`sets`, `config`, `min_gap=X`); the command line shows the flags."""
    r = run("optimize", "--set", "novalue", "--out", str(tmp_path / "s.yaml"))
    assert r.exit_code == 1 and "error: --set 'novalue': expected KEY=VALUE, e.g. --set p=2" in r.stderr
    r = run("optimize", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "s.yaml"))
    assert r.exit_code == 1 and "error: --config " in r.stderr and "`" not in r.stderr
    r = run("optimize", "--nfe", "10", "--set", "min_gap=2", "--out", str(tmp_path / "s.yaml"))
    assert r.exit_code == 1 and "use --set min_gap=X with X <" in r.stderr and "`" not in r.stderr
