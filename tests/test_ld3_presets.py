"""LD3's presets (``stepopt`` / ``paper`` / ``paper-sd``) and how they resolve with files and ``--set``.

Where the numbers come from: the paper preset's teacher is the LD3 reference code's
(github.com/vinhsuhi/LD3, scripts/gen_data.sh with configs/cifar10.yml: UniPC order 3, 20 steps,
``skip_type edm``); paper-sd's is its Stable Diffusion one (configs/stable_diff_v1-5.yml order 2,
time-uniform, 6 steps as in its README; 25 + 25 pairs, batch 1, 2 + 3 rounds). Both use LPIPS
(``loss_type: LPIPS`` in every config), start from equal logits (the uniform grid) and decay the
noise rate by the reference trainer's rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stepopt import api
from stepopt.cli import app
from stepopt.config import config_to_dict, resolve_config
from stepopt.errors import ConfigError
from stepopt.models import DiffusionModel
from stepopt.optimizers.ld3 import Ld3Config
from stepopt.schedule import Schedule
from stepopt.teacher import TeacherConfig

REPO = Path(__file__).resolve().parents[1]
PAPER_TEACHER = TeacherConfig(solver="unipc", order=3, steps=20, grid="edm", rho=7.0)
SMALL = {"n_train": 4, "n_valid": 4, "grid_rounds": 1, "joint_rounds": 0}


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPOPT_CACHE_DIR", str(tmp_path_factory.mktemp("ld3-preset-cache")))
    yield
    mp.undo()


def test_the_default_preset_is_todays_defaults() -> None:
    assert resolve_config(Ld3Config) == Ld3Config()
    assert resolve_config(Ld3Config, REPO / "configs" / "ld3.yaml") == Ld3Config()
    assert Ld3Config().preset == "stepopt" and Ld3Config().teacher == TeacherConfig()


def test_paper_sets_the_teacher_the_loss_and_the_start() -> None:
    c = resolve_config(Ld3Config, None, ["preset=paper"])
    assert (c.preset, c.loss, c.init, c.teacher) == ("paper", "lpips", "uniform", PAPER_TEACHER)
    assert c.noise_lr_rule == "reference" and c.keep_best == "off"
    # every other option keeps its default
    preset_keys = ("preset", "loss", "init", "noise_lr_rule", "teacher", "keep_best")
    rest = {k: v for k, v in config_to_dict(c).items() if k not in preset_keys}
    assert rest == {k: v for k, v in config_to_dict(Ld3Config()).items() if k in rest}
    sd = resolve_config(Ld3Config, None, [], {"preset": "paper-sd"})
    assert sd.teacher == TeacherConfig(solver="unipc", order=2, steps=6, grid="time-uniform")
    assert (sd.loss, sd.init, sd.noise_lr_rule, sd.keep_best) == ("lpips", "uniform", "reference", "off")
    # the reference's Stable Diffusion config: 25 + 25 pairs, batch 1, 2 + 3 rounds
    assert (sd.n_train, sd.n_valid, sd.batch_size, sd.grid_rounds, sd.joint_rounds) == (25, 25, 1, 2, 3)


def test_explicit_keys_override_the_preset_key_by_key(tmp_path: Path) -> None:
    c = resolve_config(Ld3Config, None, ["preset=paper", "teacher.steps=40", "loss=l2"])
    assert c.loss == "l2" and c.init == "uniform"
    assert c.teacher == TeacherConfig(solver="unipc", order=3, steps=40, grid="edm", rho=7.0)
    # a section written as a mapping in a file, and the flat legacy key, merge the same way
    f = tmp_path / "c.yaml"
    f.write_text("preset: paper\nteacher: {rho: 5}\n")
    c = resolve_config(Ld3Config, f, ["teacher_steps=30"])
    assert c.teacher == TeacherConfig(solver="unipc", order=3, steps=30, grid="edm", rho=5.0)
    # the documented config file leaves the preset's keys commented out, so the preset applies through it
    c = resolve_config(Ld3Config, REPO / "configs" / "ld3.yaml", ["preset=paper"])
    assert (c.loss, c.init, c.teacher) == ("lpips", "uniform", PAPER_TEACHER)
    # every key a preset sets is left to it by the documented file
    for name in Ld3Config.PRESETS:
        want = resolve_config(Ld3Config, None, [f"preset={name}"])
        assert resolve_config(Ld3Config, REPO / "configs" / "ld3.yaml", [f"preset={name}"]) == want
    # an explicit override back to the stepopt value wins too
    assert resolve_config(Ld3Config, None, ["preset=paper", "init=best"]).init == "best"


def test_an_unknown_preset_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="'preset' = 'pape': expected one of 'stepopt', 'paper', 'paper-sd'"):
        resolve_config(Ld3Config, None, ["preset=pape"])


def test_the_schedule_records_the_resolved_values(gmm: DiffusionModel) -> None:
    s = api.optimize(gmm, solver="euler", nfe=4, optimizer="ld3", preset="paper", loss="l2", **SMALL)
    conf = s.method.config
    assert conf["preset"] == "paper" and conf["loss"] == "l2" and conf["init"] == "uniform"
    assert conf["teacher"] == PAPER_TEACHER.to_dict()
    assert conf["report"]["init"] == "uniform"
    # every remaining departure from the paper is listed (the exact-ODE teacher of gmm-digits is none)
    fixed = [
        "validation scores the original noise (reference: the relaxed validation noises)",
        "xi clamp: half the smallest gap of the grid (reference: of the raw logits)",
    ]
    assert conf["report"]["departures"] == ["loss: 'l2' (paper: 'lpips')", *fixed]


def test_departures_name_every_option_off_the_paper() -> None:
    lines = Ld3Config().departures(exact_teacher=False)
    assert [x.split(":")[0] for x in lines[:4]] == ["loss", "init", "noise_lr_rule", "teacher"]
    assert "'solver': 'heun'" in lines[3] and "'solver': 'unipc'" in lines[3]
    assert [x.split(":")[0] for x in Ld3Config().departures(exact_teacher=True)[:3]] == [
        "loss",
        "init",
        "noise_lr_rule",
    ]
    paper = resolve_config(Ld3Config, None, ["preset=paper"])
    assert len(paper.departures(exact_teacher=False)) == 2  # only what stepopt always does differently
    sd = resolve_config(Ld3Config, None, ["preset=paper-sd", "batch_size=2"])
    assert sd.departures(exact_teacher=False)[0] == "batch_size: 2 (paper: 1)"


def test_cli_preset(tmp_path: Path) -> None:
    out = tmp_path / "ld3.yaml"
    args = ["optimize", "-O", "ld3", "-s", "euler", "--nfe", "4", "--device", "cpu", "--out", str(out)]
    sets = [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]
    r = CliRunner().invoke(app, [*args, *sets, "--set", "preset=paper", "--set", "loss=l2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    conf = Schedule.load(out).method.config
    assert (conf["preset"], conf["loss"], conf["teacher"]["solver"]) == ("paper", "l2", "unipc")
    # lpips without its weights: the one-line error that says how to give them
    r = CliRunner().invoke(app, [*args, *sets, "--set", "preset=paper"], catch_exceptions=False)
    assert r.exit_code == 1 and "vgg_weights=PATH" in r.output and "Traceback" not in r.output
