"""The Python API: a small lazy public surface, and the README's Python examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stepopt

ROOT = Path(__file__).resolve().parents[1]


def test_public_surface_is_small_typed_and_lazy():
    assert set(stepopt.__all__) >= {"load_schedule", "optimize", "sample", "Schedule", "export_schedule"}
    for name in stepopt.__all__:
        assert getattr(stepopt, name) is not None
    code = "import sys, stepopt; stepopt.load_schedule; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "cli")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert p.stdout.strip() == "False", p.stderr
    with pytest.raises(AttributeError):
        stepopt.no_such_name  # noqa: B018


def test_schedule_methods(tmp_path):
    s = stepopt.baseline("edm", solver="euler", nfe=4)
    assert s.sigmas_tensor().dtype == torch.float64 and s.to_k_diffusion().tolist() == list(s.sigmas)
    with pytest.raises(stepopt.ExportRefused, match="time domain"):
        s.diffusers_kwargs()
    s.save(tmp_path / "s.yaml")
    assert stepopt.load_schedule(tmp_path / "s.yaml") == s
    a = stepopt.sample(s, n=3, seed=5)
    b = stepopt.sample(tmp_path / "s.yaml", seeds=[5, 6, 7], batch_size=1)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # batching changes BLAS sums only
    assert a.shape == (3, 1, 8, 8)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), ns)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "6 torch.Size([6]) 0.0" and out[-1] == "True (4, 1, 8, 8)"
