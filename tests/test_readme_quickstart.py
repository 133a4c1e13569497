"""The README's quick start, run as a new user would: every command, in an empty folder outside the
repository, with an empty cache, each as its own ``stepopt`` process.

Only the installation line (``source .venv/bin/activate``) is left out: the commands run with this
interpreter and the package under test. Nothing may rely on the repository's folders (the published
schedules and the documented configs ship with the package), and every step must exit 0 and leave
its outputs in the new user's folder.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stepopt

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[list[str]]:
    """The ``stepopt`` commands of the README's quick-start block (continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the README's quick start has no bash block"
    joined = block.group(1).replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] == "stepopt":
                commands.append(words)
    return commands


def test_the_quickstart_block_is_found() -> None:
    cmds = quickstart_commands()
    assert [c[1] for c in cmds[:3]] == ["optimize", "optimize", "optimize"]
    assert {"baseline", "eval", "sample", "show", "validate", "models"} <= {c[1] for c in cmds}


@pytest.mark.slow
def test_readme_quickstart_in_an_empty_folder_outside_the_repository(tmp_path: Path) -> None:
    home = tmp_path / "newcomer"
    home.mkdir()
    assert ROOT not in home.resolve().parents
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(stepopt.__file__).resolve().parents[1]),  # the package under test
        "STEPOPT_CACHE_DIR": str(tmp_path / "cache"),
        "COLUMNS": "120",
    }
    for cmd in quickstart_commands():
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "stepopt", *cmd[1:]],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        print(f"{time.perf_counter() - t0:7.1f} s  exit {r.returncode}  {shlex.join(cmd)}")  # pytest -s shows it
        assert r.returncode == 0, f"{shlex.join(cmd)}: exit {r.returncode}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, shlex.join(cmd)
    for made in (
        "schedules/gmm-digits/dpmpp-3m/nfe6/trust-region.yaml",
        "schedules/gmm-digits/unipc/nfe5/ld3.yaml",
        "schedules/gmm-digits/euler/nfe10/ays.yaml",
        "logsnr.yaml",
        "table.md",
        "samples.npz",
        "grid.png",
    ):
        assert (home / made).is_file(), made
    assert "trust-region" in (home / "table.md").read_text()
