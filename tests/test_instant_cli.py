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


def test_model_card_matches_the_loaded_model():
    from stepopt.model_cards import model_card
    from stepopt.models import load_model

    card = model_card("builtin:gmm-digits")
    assert card is not None and card.ref() == load_model("builtin:gmm-digits").ref()
    assert model_card("builtin:unet-digits") is None
