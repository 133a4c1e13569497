"""The model options every model-loading command shares (optimize, baseline, sample, eval).

``--device``, ``--dtype``, ``--trust-code`` (hidden old name ``--trust-pickle``) and the text
conditioning; ``sample`` and ``eval`` take the conditioning a schedule records unless overridden,
and say so when it is.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from _edm_like import TinyEDMPrecond
from stepopt.cli import app
from stepopt.schedule import Schedule

COMMANDS = ("optimize", "baseline", "sample", "eval")
SHARED = ("--device", "--dtype", "--trust-code", "--prompt", "--prompt-file", "--negative-prompt", "--guidance")
EMBEDDED = "python:_tiny_latent:make_embedded_latent"  # a latent model: 2 prompts, fixed embeddings, guidance 3.0


def run(*args: Any):
    # EMBEDDED is a python: factory: code, so it loads only with --trust-code.
    extra = ["--trust-code"] if EMBEDDED in args and "--trust-code" not in args else []
    return CliRunner().invoke(app, [str(a) for a in args] + extra)


@pytest.fixture
def edm_pickle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    p = tmp_path / "net.pkl"
    with open(p, "wb") as f:
        pickle.dump({"ema": TinyEDMPrecond(), "augment_pipe": None}, f)
    return p


@pytest.mark.parametrize("command", COMMANDS)
def test_every_model_command_has_the_shared_options(command: str) -> None:
    r = run(command, "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for opt in SHARED:
        assert opt in text, f"{command} lacks {opt}"
    assert "--trust-pickle" not in text  # the old name works but is hidden


@pytest.mark.parametrize("flag", ["--trust-code", "--trust-pickle"])
def test_baseline_and_eval_load_edm_pickles_when_trusted(tmp_path: Path, edm_pickle: Path, flag: str) -> None:
    s = tmp_path / "s.yaml"
    r = run("baseline", "edm", "--model", f"edm:{edm_pickle}", "--nfe", 4, "--device", "cpu", "--out", s)
    assert r.exit_code == 1 and "--trust-code" in r.stderr and not s.exists()
    r = run("baseline", "edm", "--model", f"edm:{edm_pickle}", "--nfe", 4, "--device", "cpu", flag, "--out", s)
    assert r.exit_code == 0, r.stderr
    assert Schedule.load(s).model.id == f"edm:{edm_pickle}"
    r = run("eval", "--schedule", s, "--n", 2, "--device", "cpu", "--no-cache", "--teacher-set", "steps=4", "--json")
    assert r.exit_code == 1 and "--trust-code" in r.stderr
    args = ["eval", "--schedule", s, "--n", 2, "--device", "cpu", "--no-cache", "--teacher-set", "steps=4"]
    r = run(*args, flag, "--json")
    assert r.exit_code == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["metrics"]["ode-error"]["rmse"] > 0


def test_baseline_loads_on_the_requested_device(tmp_path: Path, monkeypatch) -> None:
    import stepopt.models as models

    seen: list[Any] = []
    real = models.load_model

    def spy(spec: Any, device: Any = "cpu", dtype: Any = None, **kw: Any):
        seen.append((device, dtype))
        return real(spec, device, dtype, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    # A model without a card (built-ins without options are described by numpy-only cards, not loaded)
    model = ["--model", "builtin:gmm-digits-flow:shift=2"]
    r = run("baseline", "logsnr", *model, "--device", "cpu", "--dtype", "bfloat16", "--out", tmp_path / "s.yaml")
    assert r.exit_code == 0, r.stderr
    assert seen == [(torch.device("cpu"), torch.bfloat16)]
    seen.clear()
    assert run("baseline", "logsnr", *model, "--out", tmp_path / "t.yaml").exit_code == 0
    assert seen == [(models.resolve_device("auto"), torch.float32)]  # auto, not a hard-coded CPU


def test_eval_uses_the_schedules_guidance_unless_overridden(tmp_path: Path) -> None:
    s = tmp_path / "s.yaml"
    r = run("optimize", "--model", EMBEDDED, "--solver", "dpmpp-2m", "--nfe", 3, "--guidance", 2.0, "--out", s)
    assert r.exit_code == 0, r.stderr
    assert Schedule.load(s).method.config["conditioning"]["guidance"] == 2.0
    args = ["eval", "--schedule", s, "--n", 2, "--device", "cpu", "--no-cache", "--teacher-set", "steps=4", "--json"]
    args.append("--trust-code")  # the schedule names a diffusers folder, not a built-in model

    def rmse_and_guidance(*extra: Any) -> tuple[float, float, str]:
        r = run(*args, *extra)
        assert r.exit_code == 0, r.stderr
        (row,) = json.loads(r.stdout)["rows"]
        return row["metrics"]["ode-error"]["rmse"], row["settings"]["ode-error"]["conditioning"]["guidance"], r.stderr

    by_default, g, err = rmse_and_guidance()
    assert g == 2.0 and "overrides" not in err  # the schedule's guidance, not the model's 3.0 or 7.5
    explicit, g, err = rmse_and_guidance("--guidance", 2.0)
    assert g == 2.0 and explicit == by_default and "overrides" not in err
    other, g, err = rmse_and_guidance("--guidance", 7.5)
    assert g == 7.5 and other != by_default
    assert "note: --guidance 7.5 overrides the schedule's guidance 2.0" in " ".join(err.split())


def test_baseline_records_the_conditioning(tmp_path: Path) -> None:
    s = tmp_path / "s.yaml"
    r = run("baseline", "logsnr", "--model", EMBEDDED, "--nfe", 3, "--guidance", 1.5, "--device", "cpu", "--out", s)
    assert r.exit_code == 0, r.stderr
    assert Schedule.load(s).method.config["conditioning"]["guidance"] == 1.5
    r = run("baseline", "logsnr", "--guidance", 1.5, "--out", tmp_path / "t.yaml")
    assert r.exit_code == 1 and "--guidance: builtin:gmm-digits takes no text conditioning" in r.stderr
