"""Every machine-readable output is strict JSON (RFC 8259): a grid from sigma = inf writes ``"inf"``.

Python's ``json.loads`` accepts the non-standard ``Infinity`` / ``NaN`` through ``parse_constant``;
making that hook raise turns any of them into a failure, as a strict parser (jq, JSON.parse) would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stepopt.cli import app
from stepopt.jsontext import json_text, strict


def _strict_loads(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"non-JSON constant {name} in output")

    return json.loads(text, parse_constant=refuse)


def test_refusing_parser_catches_python_default():
    with pytest.raises(AssertionError, match="Infinity"):
        _strict_loads(json.dumps([math.inf]))  # what json.dumps writes by default


def test_json_text_writes_non_finite_floats_as_strings():
    obj = {"a": [math.inf, -math.inf, 1.25], "b": (math.nan,), "c": {"d": float("inf")}}
    back = _strict_loads(json_text(obj))
    assert back == {"a": ["inf", "-inf", 1.25], "b": ["nan"], "c": {"d": "inf"}}
    assert [float(v) for v in back["a"]] == [math.inf, -math.inf, 1.25]  # float() reads them back
    assert strict(2.5) == 2.5 and strict("inf") == "inf"


def test_every_json_output_of_a_grid_from_pure_noise_is_strict(tmp_path: Path):
    runner = CliRunner()
    sched = tmp_path / "tu.yaml"
    m = ["--model", "builtin:gmm-digits-flow", "--solver", "euler", "--nfe", "4", "--final-step", "denoise"]
    outs: dict[str, Any] = {}

    def run(name: str, args: list[str]) -> Any:
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (name, r.output)
        outs[name] = _strict_loads(r.stdout)
        return outs[name]

    run("baseline", ["baseline", "time-uniform", *m, "--out", str(sched), "--json"])
    assert outs["baseline"]["sigmas"][0] == "inf"
    assert run("show", ["show", str(sched), "--json"])["sigmas"][0] == "inf"
    run("validate", ["validate", str(sched), "--json"])
    exported = run("export", ["export", str(sched), "--to", "json"])
    assert exported["sigmas"][0] == "inf" and exported["lam"][0] == "-inf"
    run("export --json", ["export", str(sched), "--to", "json", "--json"])
    _strict_loads(outs["export --json"]["text"])
    table = tmp_path / "t.json"
    rows = run("eval", ["eval", str(sched), "--n", "4", "--metrics", "ode-error", "--out", str(table), "--json"])
    assert rows["rows"] and _strict_loads(table.read_text())["rows"]
