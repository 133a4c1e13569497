"""Schedule value object and file format v1: exact round trips, validation messages, migrations."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from stepopt import schedule as sched_mod
from stepopt.errors import ScheduleValidationError
from stepopt.schedule import MethodInfo, ModelRef, Schedule
from stepopt.solvers import SolverIdentity

GOLDEN = Path(__file__).parent / "golden"
REF = ModelRef("builtin:gmm-digits", "sha256:abc", 0.002, 80.0, "sigma")
EULER = SolverIdentity("euler", 1)


def make(sigmas=(80.0, 1.0, 0.002), **kw) -> Schedule:
    args = dict(model=REF, solver=EULER, nfe=len(sigmas) - 1, sigmas=sigmas, method=MethodInfo("logsnr"))
    args.update(kw)
    return Schedule(**args)


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("*.yaml")))
def test_golden_files_round_trip_exactly(name):
    text = (GOLDEN / name).read_text()
    s = Schedule.from_yaml(text)
    assert s.to_yaml() == text
    assert Schedule.from_yaml(s.to_yaml()) == s


def test_golden_values_are_read_as_written():
    s = Schedule.load(GOLDEN / "full_euler_denoise.yaml")
    assert s.sigmas[1] == 3.0000000000000004 and s.sigmas[2] == 0.1 + 0.2
    assert s.final_step == "denoise" and s.nfe == 4  # 3 steps + the final denoising evaluation
    assert s.model_sigmas == (157.40726936571173, 2.9, 0.31, 0.01)
    assert s.method.config["eps"] == 1e-12 and s.method.config["nested"] == {"flag": True, "none": None}
    assert s.metrics["ode-error"]["n"] == 64


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.002, 80.0, allow_nan=False, allow_infinity=False), min_size=2, max_size=30, unique=True))
def test_random_grids_round_trip_bit_exactly(values):
    grid = tuple(sorted(values, reverse=True))
    s = make(grid)
    back = Schedule.from_yaml(s.to_yaml())
    assert back == s
    assert all(a.hex() == b.hex() for a, b in zip(back.sigmas, grid, strict=True))


def test_save_and_load_file(tmp_path):
    s = make()
    p = s.save(tmp_path / "deep" / "s.yaml")
    assert Schedule.load(p) == s
    assert not [f for f in p.parent.iterdir() if f.name != "s.yaml"], "no temporary files left behind"


def test_frozen():
    s = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.nfe = 3  # type: ignore[misc]


def _doc(**changes):
    d = make().to_dict()
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".")
            d[a][b] = v
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"sigmas": [80.0, 90.0, 0.002]}, "'sigmas[1]' = 90.0: expected strictly decreasing"),
        ({"sigmas": [80.0, 1.0, 1.0]}, "'sigmas[2]' = 1.0: expected strictly decreasing"),
        ({"sigmas": [80.0, float("nan"), 0.002]}, "'sigmas[1]' = nan: expected a finite number"),
        ({"sigmas": [80.0, 1.0, 0.0]}, "'sigmas[2]' = 0.0: expected a value > 0"),
        ({"sigmas": [100.0, 1.0, 0.002]}, "'sigmas[0]' = 100.0: expected at most model.sigma_max = 80.0"),
        ({"sigmas": [80.0, 1.0, 0.001]}, "'sigmas[2]' = 0.001: expected at least model.sigma_min = 0.002"),
        ({"sigmas": [80.0]}, "'sigmas' = [80.0]: expected at least 2 values"),
        ({"sigmas": "80, 1"}, "'sigmas' = '80, 1': expected a list of numbers"),
        ({"nfe": 3}, "'nfe' = 3: expected 2: solver euler"),
        ({"nfe": "2"}, "'nfe' = '2': expected an integer"),
        ({"format": "stepopt.schedule/v9"}, "'format' = 'stepopt.schedule/v9': expected 'stepopt.schedule/v1'"),
        ({"solver.name": "nope"}, "'solver': unknown solver 'nope'; expected one of"),
        ({"solver.order": 2}, "'solver': solver 'euler' does not support order 2"),
        ({"final_step": "jump"}, "'final_step' = 'jump': expected one of none, denoise"),
        ({"model_sigmas": [1.0]}, "'model_sigmas' = [1.0]: expected 3 values"),
        ({"model.time": "minutes"}, "'model.time' = 'minutes': expected one of sigma"),
        ({"model.sigma_min": -1}, "'model.sigma_min' = -1: expected a number > 0"),
        ({"extra": 1}, "'extra' = 1: expected no such key; valid keys: format, model"),
        ({"model.colour": "red"}, "'model.colour' = 'red': expected no such key"),
    ],
)
def test_validation_errors_name_key_value_and_expectation(changes, fragment):
    with pytest.raises(ScheduleValidationError) as e:
        Schedule.from_dict(_doc(**changes))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_keys_and_non_mapping():
    d = _doc()
    del d["sigmas"]
    with pytest.raises(ScheduleValidationError, match="missing required key 'sigmas'"):
        Schedule.from_dict(d)
    d = _doc()
    del d["format"]
    with pytest.raises(ScheduleValidationError, match="missing required key 'format'"):
        Schedule.from_dict(d)
    with pytest.raises(ScheduleValidationError, match="expected a mapping"):
        Schedule.from_yaml("- 1\n- 2\n")


def test_truncated_and_unsafe_yaml(tmp_path):
    text = make().to_yaml()
    with pytest.raises(ScheduleValidationError, match="not valid YAML"):
        Schedule.from_yaml(text[: text.index("sigmas:") + 15])
    # yaml.safe_load only: a python-object tag is refused, never constructed.
    with pytest.raises(ScheduleValidationError, match="not valid YAML"):
        Schedule.from_yaml("format: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ScheduleValidationError, match="no such file"):
        Schedule.load(tmp_path / "missing.yaml")


def test_load_error_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(make().to_yaml().replace("nfe: 2", "nfe: 7"))
    with pytest.raises(ScheduleValidationError, match=r"bad\.yaml: 'nfe' = 7"):
        Schedule.load(p)


def test_migration_hook_upgrades_old_versions(monkeypatch):
    def v0_to_v1(d):
        d = dict(d)
        d["format"] = "stepopt.schedule/v1"
        d["sigmas"] = d.pop("grid")
        return d

    monkeypatch.setitem(sched_mod.MIGRATIONS, "stepopt.schedule/v0", v0_to_v1)
    d = make().to_dict()
    d["format"] = "stepopt.schedule/v0"
    d["grid"] = d.pop("sigmas")
    assert Schedule.from_dict(d) == make()


def test_non_canonical_floats_load_to_the_same_value():
    text = make().to_yaml().replace("0.002]", "2.0e-03]")
    assert Schedule.from_yaml(text).sigmas[-1] == 0.002


def test_floats_are_written_with_full_precision():
    s = make((80.0, math.pi, 1 / 3, 0.002))
    doc = yaml.safe_load(s.to_yaml())
    assert doc["sigmas"][1] == math.pi and doc["sigmas"][2] == 1 / 3
    assert "3.141592653589793" in s.to_yaml()


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        p = make().save(tmp_path / "s.yaml")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_dpmpp_3m_files_from_before_the_variants_keep_the_exact_form(tmp_path):
    """A v1 file written when dpmpp-3m was the exact form (``variant: null``) loads as ``variant: exact``."""
    old = GOLDEN / "legacy" / "logsnr_dpmpp3m_nfe6_before_variants.yaml"
    assert yaml.safe_load(old.read_text())["solver"]["variant"] is None
    s = Schedule.load(old)
    assert s.solver == SolverIdentity("dpmpp-3m", 3, "exact", True)
    assert s.provenance["migrated"] == ["solver.variant: null -> exact (dpmpp-3m file from before the variants)"]
    # Written back, it says so explicitly and round-trips from then on.
    again = Schedule.load(s.save(tmp_path / "s.yaml"))
    assert again == s and yaml.safe_load((tmp_path / "s.yaml").read_text())["solver"]["variant"] == "exact"
    # New files carry the variant they were made for; the default is the reference form.
    new = make(solver=SolverIdentity("dpmpp-3m", 3, "reference", True), nfe=2)
    assert Schedule.from_yaml(new.to_yaml()) == new
