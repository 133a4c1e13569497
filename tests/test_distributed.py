"""torchrun: several CPU ranks (gloo) give the results of one process, and fail together.

Each test starts the ranks as ``torchrun`` does: the same command in K processes whose environment
has ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (one test goes
through ``python -m torch.distributed.run`` itself, with the documented ``-- eval`` form).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stepopt.cache import ENV_VAR
from stepopt.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"PYTHONPATH": str(ROOT / "cli"), "OMP_NUM_THREADS": "1", ENV_VAR: str(cache), **extra})
    return env


def run_ranks(argv_of_rank: list[list[str]], cache: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run ``python -m stepopt ARGV`` as ranks 0..K-1 of one gloo group; returns their results."""
    world = len(argv_of_rank)
    port = str(_port())
    procs = []
    for r, argv in enumerate(argv_of_rank):
        env = _env(
            cache,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "stepopt", *argv],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def run_one(argv: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    """The same command in this process, with no distributed environment (typer's runner)."""
    from typer.testing import CliRunner

    from stepopt.cli import app

    env = {ENV_VAR: str(cache), "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None}
    res = CliRunner().invoke(app, argv, env=env)
    return subprocess.CompletedProcess(argv, res.exit_code, res.stdout, "" if res.exit_code == 0 else res.output)


def _ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stderr


@pytest.fixture
def schedules(tmp_path: Path) -> list[Path]:
    import stepopt

    paths = []
    for kind in ("edm", "kl-optimal"):
        p = tmp_path / f"{kind}.yaml"
        stepopt.baseline(kind, solver="euler", nfe=4).save(p)
        paths.append(p)
    return paths


def test_sample_equals_one_process(tmp_path: Path, schedules: list[Path]) -> None:
    """Two ranks: sample's npz equals one process's; rank 0 alone prints and writes."""
    s = str(schedules[0])
    one = tmp_path / "one.npz"
    _ok(run_one(["sample", "--schedule", s, "--n", "7", "--batch-size", "2", "-o", str(one)], tmp_path / "c1"))
    two = tmp_path / "two.npz"
    res = run_ranks([["sample", "--schedule", s, "--n", "7", "--batch-size", "2", "-o", str(two)]] * 2, tmp_path / "c2")
    for r in res:
        _ok(r)
    assert "wrote" in res[0].stderr and res[1].stderr.strip() == ""  # rank 0 speaks for the run
    a, b = np.load(one), np.load(two)
    assert np.array_equal(a["seeds"], b["seeds"]) and a["samples"].shape == (7, 1, 8, 8)
    np.testing.assert_allclose(b["samples"], a["samples"], rtol=1e-6, atol=1e-7)
    assert not list(tmp_path.glob(".two.npz.*"))  # no stray temporary file from any rank


@pytest.mark.slow
def test_eval_equals_one_process(tmp_path: Path, schedules: list[Path]) -> None:
    """Two ranks: eval's fid-digits (1e-6) and ode-error (1e-9) equal one process's; --json once."""
    ev = [
        "eval",
        *(a for p in schedules for a in ("-S", str(p))),
        "--n",
        "40",
        "--batch-size",
        "8",
        "--metrics",
        "ode-error,fid-digits",
    ]
    e1 = run_one([*ev, "--json"], tmp_path / "c3")
    _ok(e1)
    e2 = run_ranks([[*ev, "--json"]] * 2, tmp_path / "c4")
    for r in e2:
        _ok(r)
    assert e2[1].stdout.strip() == ""  # --json once
    rows1, rows2 = json.loads(e1.stdout)["rows"], json.loads(e2[0].stdout)["rows"]
    assert [r["schedule"] for r in rows1] == [r["schedule"] for r in rows2]
    for r1, r2 in zip(rows1, rows2, strict=True):
        assert r2["metrics"]["ode-error"]["rmse"] == pytest.approx(r1["metrics"]["ode-error"]["rmse"], rel=1e-9)
        assert r2["metrics"]["fid-digits"] == pytest.approx(r1["metrics"]["fid-digits"], rel=1e-6)
        assert r1["metrics"]["fid-digits"] > 0
    # Each rank cached the teacher entries it computed, once: 40 seeds, no duplicates, all verified.
    entries = list((tmp_path / "c4").rglob("*.npy"))
    assert len(entries) == 40 and len({e.name for e in entries}) == 40


def test_failing_rank_ends_the_run_with_one_line(tmp_path: Path, schedules: list[Path]) -> None:
    """Rank 1 cannot write its output: every rank exits 1 within seconds, one line names rank and cause."""
    s = str(schedules[0])
    (tmp_path / "file").write_text("a file, not a folder\n")
    t0 = time.monotonic()
    res = run_ranks(
        [
            ["sample", "--schedule", s, "--n", "4", "-o", str(tmp_path / "ok.npz")],
            ["sample", "--schedule", s, "--n", "4", "-o", str(tmp_path / "file" / "x.npz")],
        ],
        tmp_path / "c",
    )
    assert time.monotonic() - t0 < 60
    assert [r.returncode for r in res] == [1, 1]
    lines = [ln for r in res for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: rank 1: --out") and "is not a directory" in lines[0]
    assert "Traceback" not in res[0].stderr + res[1].stderr
    assert not (tmp_path / "ok.npz").exists()


@pytest.mark.slow
def test_same_bad_input_is_reported_once(tmp_path: Path) -> None:
    res = run_ranks([["sample", "--schedule", str(tmp_path / "missing.yaml")]] * 2, tmp_path / "c")
    assert [r.returncode for r in res] == [1, 1]
    lines = [ln for r in res for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: ") and "missing.yaml" in lines[0], lines


@pytest.mark.slow
def test_ld3_same_schedule_for_world_size_one_and_two(tmp_path: Path) -> None:
    """LD3 data-parallel: same teacher, batches and validation selection; lam equal to 1e-6."""
    sets = ["--set", "n_train=8", "--set", "n_valid=8", "--set", "max_iterations=6", "--set", "valid_batch_size=3"]
    sets += ["--set", "check_pairs=8"]  # keep_best's check pairs shared out over the ranks too
    base = ["optimize", "-O", "ld3", "-s", "euler", "-n", "4", *sets]
    _ok(run_one([*base, "-o", str(tmp_path / "one.yaml")], tmp_path / "c1"))
    res = run_ranks([[*base, "-o", str(tmp_path / "two.yaml")]] * 2, tmp_path / "c2")
    for r in res:
        _ok(r)
    a, b = Schedule.load(tmp_path / "one.yaml"), Schedule.load(tmp_path / "two.yaml")
    np.testing.assert_allclose(np.log(b.sigmas), np.log(a.sigmas), rtol=0, atol=1e-6)
    assert b.provenance["world_size"] == 2 and "world_size" not in a.provenance
    assert b.method.config["report"]["iterations"] == a.method.config["report"]["iterations"]


@pytest.mark.slow
def test_ays_same_schedule_for_world_size_one_and_two(tmp_path: Path) -> None:
    """AYS with its KLUB blocks and validation shared out over 2 ranks: the same grid (1e-6 in lam)."""
    sets = ["samples=256", "max_sweeps=2", "hierarchy=false", "val_noises=16", "klub_samples=512", "data_size=512"]
    base = ["optimize", "-O", "ays", "-s", "euler", "-n", "4", *(a for kv in sets for a in ("--set", kv))]
    _ok(run_one([*base, "-o", str(tmp_path / "one.yaml")], tmp_path / "c1"))
    res = run_ranks([[*base, "-o", str(tmp_path / "two.yaml")]] * 2, tmp_path / "c2")
    for r in res:
        _ok(r)
    a, b = Schedule.load(tmp_path / "one.yaml"), Schedule.load(tmp_path / "two.yaml")
    np.testing.assert_allclose(np.log(b.sigmas), np.log(a.sigmas), rtol=0, atol=1e-6)
    assert b.method.objective["final"] == pytest.approx(a.method.objective["final"], rel=1e-9)
    ea, eb = a.method.config["report"]["network_evals"], b.method.config["report"]["network_evals"]
    assert eb == ea  # the evaluations of every rank, counted once


@pytest.mark.slow
def test_torchrun_documented_form(tmp_path: Path, schedules: list[Path]) -> None:
    """`torchrun --nproc-per-node 2 -m stepopt -- eval ...` (the README's form) works as one process."""
    ev = ["eval", "-S", str(schedules[0]), "--n", "16", "--batch-size", "4", "--json"]
    one = run_one(ev, tmp_path / "c1")
    _ok(one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port())]
    res = subprocess.run(
        [*cmd, "-m", "stepopt", "--", *ev],
        env=_env(tmp_path / "c2"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert res.returncode == 0, res.stderr
    (r1,), (r2,) = json.loads(one.stdout)["rows"], json.loads(res.stdout)["rows"]
    assert r2["metrics"]["ode-error"]["rmse"] == pytest.approx(r1["metrics"]["ode-error"]["rmse"], rel=1e-9)


MID_RUN = """
import sys, time, torch
from stepopt import distributed as d
d.init_store()
d.init(torch.device("cpu"))
if d.rank() == 1:
    time.sleep(1)
    d.report_failure("boom")
    d.shutdown()
    sys.exit(1)
d.gather_rows(torch.zeros(1, 3), 2)  # rank 1 never joins this collective
print("not reached")
"""


@pytest.mark.slow
def test_failure_in_the_middle_stops_the_waiting_rank(tmp_path: Path) -> None:
    """A rank that fails while another waits in a collective: both end within seconds with exit 1."""
    port = str(_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MID_RUN],
            env=_env(
                tmp_path, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    waited = time.monotonic() - t0
    assert [p.returncode for p in procs] == [1, 1], outs
    assert "not reached" not in outs[0][0]
    assert waited < 60
