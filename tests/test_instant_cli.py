"""Commands that evaluate no network start without importing torch, diffusers or torch-fidelity.

Each command runs in a fresh interpreter (``runpy`` of ``python -m stepopt``), which then reports
which heavy modules ended up in ``sys.modules``. ``scripts/bench_cli.py`` measures the times.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers", "torch_fidelity", "torchvision", "transformers")
ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import runpy, sys, json
sys.argv = ["stepopt", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("stepopt", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
heavy = [m for m in %r if m in sys.modules]
print("\\nPROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def probe(*args: str, cwd: Path | None = None) -> dict:
    code = PROBE % (list(HEAVY),)
    p = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "cli")},
    )
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(line[-1][len("PROBE ") :])


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instant") / "s.yaml"
    r = probe("baseline", "logsnr", "--solver", "dpmpp-2m", "--nfe", "6", "--out", str(out))
    assert r == {"code": 0, "heavy": []}  # baseline on the default (analytic) model needs no torch
    return out


def test_help_and_version_import_no_torch():
    assert probe("--help") == {"code": 0, "heavy": []}
    assert probe("--version") == {"code": 0, "heavy": []}
    assert probe("sample", "--help") == {"code": 0, "heavy": []}


def test_validate_show_export_import_no_torch(schedule_file, tmp_path):
    published = sorted(glob.glob(str(ROOT / "schedules" / "published" / "*.yaml")))
    assert probe("validate", str(schedule_file), *published) == {"code": 0, "heavy": []}
    assert probe("show", str(schedule_file)) == {"code": 0, "heavy": []}
    for fmt in ("k-diffusion", "comfyui", "json", "csv"):
        assert probe("export", str(schedule_file), "--to", fmt, "--out", str(tmp_path / fmt)) == {
            "code": 0,
            "heavy": [],
        }


def test_an_invalid_file_still_fails_cleanly_without_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: stepopt.schedule/v1\n")
    assert probe("validate", str(bad)) == {"code": 1, "heavy": []}


def test_models_and_plot_import_no_torch(schedule_file, tmp_path):
    assert probe("models", "--json") == {"code": 0, "heavy": []}
    assert probe("plot", "-S", str(schedule_file), "--out", str(tmp_path / "p.png")) == {"code": 0, "heavy": []}
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["gmm-digits", "gmm-digits-flow", "unet-digits", "gaussian", "point-mass"])
def test_model_card_matches_the_loaded_model(name):
    """Every built-in's card (numpy only) describes and fingerprints exactly what loading it gives."""
    from stepopt.model_cards import model_card
    from stepopt.models import load_model

    card = model_card(f"builtin:{name}")
    model = load_model(f"builtin:{name}")
    assert card is not None
    assert card.ref() == model.ref()
    assert card.describe() == model.describe()
    assert (card.integer_timesteps, tuple(card.shape)) == (model.integer_timesteps, tuple(model.shape))


def test_cards_cover_exactly_the_registries():
    """The summaries `stepopt models` lists without imports are the registries' own, name for name."""
    from stepopt.model_cards import BUILTIN_SUMMARIES, LOADER_SUMMARIES, OPTIMIZER_SUMMARIES, model_card
    from stepopt.models import BUILTINS, LOADERS
    from stepopt.optimizers import OPTIMIZERS

    assert {k: b.summary for k, b in BUILTINS.items()} == BUILTIN_SUMMARIES
    assert {k: v.summary for k, v in LOADERS.items()} == LOADER_SUMMARIES
    assert {k: v.summary for k, v in OPTIMIZERS.items()} == OPTIMIZER_SUMMARIES
    assert model_card("builtin:gmm-digits-flow:shift=2") is None  # options: callers load the model
    assert model_card("diffusers:/x") is None


def test_models_json_equals_the_loaded_description():
    from typer.testing import CliRunner

    from stepopt.cli import app
    from stepopt.jsontext import json_text
    from stepopt.models import BUILTINS, load_model

    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)["builtins"]
    live = [{**load_model(f"builtin:{k}").describe(), "summary": b.summary} for k, b in BUILTINS.items()]
    assert listed == json.loads(json_text(live))  # strict JSON: the flow model's sigma_max inf is "inf"


@pytest.mark.parametrize("name", ["gmm-digits-flow", "unet-digits", "point-mass"])
def test_baseline_from_a_card_equals_baseline_from_the_model(name):
    from stepopt.build import baseline_schedule
    from stepopt.model_cards import model_card
    from stepopt.models import load_model
    from stepopt.solvers import get_solver

    ident = get_solver("dpmpp-2m").identity()
    kinds = ("flow-default", "logsnr", "time-uniform") if name.endswith("flow") else ("edm", "logsnr", "kl-optimal")
    for kind in kinds:
        a = baseline_schedule(kind, model_card(f"builtin:{name}"), ident, 6)
        b = baseline_schedule(kind, load_model(f"builtin:{name}"), ident, 6)
        assert a.sigmas == b.sigmas and a.model == b.model, kind


def test_the_cli_lets_openmp_threads_sleep_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """`stepopt` sets OMP_WAIT_POLICY=PASSIVE before torch is imported, and keeps a value the user set."""
    from stepopt.cli import main

    monkeypatch.setattr(sys, "argv", ["stepopt", "--help"])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
