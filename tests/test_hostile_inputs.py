"""Hostile and malformed inputs: every one gives one ``error:`` line, exit 1 (2 for usage), no traceback,
no partial or stray file, runs no foreign code and takes at most a few seconds.

Schedule files are data that people download and share. The cases here are the attacks and
mistakes of a review of the tool as a new user and as an attacker; each is run in-process
(typer's CliRunner) so the whole list stays fast.
"""

from __future__ import annotations

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
    with pytest.raises(StepoptError, match="--trust-code"):
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
