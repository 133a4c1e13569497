"""Method configuration: defaults <- --config file <- --set items <- flags; unknown keys listed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from stepopt.config import config_to_dict, resolve_config
from stepopt.errors import ConfigError


@dataclass(frozen=True)
class Cfg:
    p: float = 1.0
    tau: int | None = None
    init: Literal["logsnr", "time-uniform"] = "logsnr"
    select: bool = False
    ps: tuple[float, ...] = (1.0, 2.0)


def test_layers_override_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("p: 2\ntau: 3\ninit: time-uniform\n")
    c = resolve_config(Cfg, f, ["tau=0", "ps=[1, 1.5]"], {"select": True, "p": None})
    assert c == Cfg(p=2.0, tau=0, init="time-uniform", select=True, ps=(1.0, 1.5))
    assert config_to_dict(c)["ps"] == [1.0, 1.5]
    assert resolve_config(Cfg) == Cfg()


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["q=1"], "unknown option 'q' for Cfg; valid options: p, tau, init, select, ps"),
        (["p=abc"], "'p' = 'abc': expected a number"),
        (["tau=1.5"], "'tau' = 1.5: expected an integer"),
        (["init=edm"], "'init' = 'edm': expected one of 'logsnr', 'time-uniform'"),
        (["select=maybe"], "'select' = 'maybe': expected true or false"),
        (["novalue"], "`sets` 'novalue': expected KEY=VALUE"),
    ],
)
def test_bad_options_are_one_line_errors(sets, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_config(Cfg, None, sets)
    assert fragment in str(e.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("p: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(Cfg, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve_config(Cfg, lst)
