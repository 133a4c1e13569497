"""Loaders for foreign checkpoints: EDM pickles (trusted only) and python factories; the shipped unet-digits."""

from __future__ import annotations

import pickle
from functools import partial

import pytest
import torch
from typer.testing import CliRunner

from _edm_like import TinyEDMPrecond
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.models import load_digits, load_model
from stepopt.models.base import LoadOptions
from stepopt.models.loaders import EDMNetwork, load_edm_pickle


@pytest.fixture
def edm_pickle(tmp_path):
    torch.manual_seed(0)
    net = TinyEDMPrecond()
    p = tmp_path / "net.pkl"
    with open(p, "wb") as f:
        pickle.dump({"ema": net, "augment_pipe": None}, f)
    return p, net


def test_edm_pickle_needs_trust(edm_pickle):
    p, _ = edm_pickle
    with pytest.raises(StepoptError, match="refusing to load without `trust_code`"):
        load_model(f"edm:{p}")
    with pytest.raises(StepoptError, match="refusing to unpickle without `trust_code`"):
        load_edm_pickle(str(p), LoadOptions(torch.device("cpu"), None))
    r = CliRunner().invoke(app, ["optimize", "--model", f"edm:{p}", "--optimizer", "trust-region"])
    assert r.exit_code == 1 and "--trust-code" in r.stderr and "Traceback" not in r.output
    # The old flag name still works (hidden alias).
    out = p.parent / "s.yaml"
    r = CliRunner().invoke(app, ["baseline", "edm", "--model", f"edm:{p}", "--trust-pickle", "--out", str(out)])
    assert r.exit_code == 0, r.output


def test_edm_pickle_loads_and_denoises(edm_pickle):
    p, net = edm_pickle
    m = load_model(f"edm:{p}", trust_pickle=True)
    assert isinstance(m, EDMNetwork) and m.shape == (1, 4, 4)
    assert (m.sigma_min, m.sigma_max) == (0.002, 80.0) and m.fingerprint.startswith("sha256:")
    x = torch.randn(3, 1, 4, 4)
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(m(x, s), net(x, s.float()))


def test_edm_pickle_errors(tmp_path):
    with pytest.raises(StepoptError, match="no such checkpoint file"):
        load_model(f"edm:{tmp_path / 'missing.pkl'}", trust_pickle=True)
    bad = tmp_path / "corrupt.pkl"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(StepoptError, match="not a readable EDM pickle"):
        load_model(f"edm:{bad}", trust_pickle=True)
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"model": 1}))
    with pytest.raises(StepoptError, match="expected a dict with an 'ema' network"):
        load_model(f"edm:{wrong}", trust_pickle=True)


def test_python_factory_needs_trust_code():
    with pytest.raises(StepoptError, match="refusing to load without `trust_code`"):
        load_model("python:_edm_like:make_user_denoiser")
    r = CliRunner().invoke(app, ["optimize", "-m", "python:os:system", "-O", "ays"])
    assert r.exit_code == 1 and "--trust-code" in r.stderr and "Traceback" not in r.output


def test_python_factory_contract(tmp_path):
    load = partial(load_model, trust_code=True)
    m = load("python:_edm_like:make_user_denoiser")
    assert m.shape == (1, 4, 4) and m.sigma_max == 10.0
    x = torch.ones(2, 1, 4, 4)
    torch.testing.assert_close(m(x, torch.tensor([1.0, 1.0], dtype=torch.float64)), x / 2)
    with pytest.raises(StepoptError, match=r"lacks __call__\(x, sigma\), sigma_min, sigma_max, shape"):
        load("python:_edm_like:make_broken")
    with pytest.raises(StepoptError, match="'nope' is not a callable"):
        load("python:_edm_like:nope")
    with pytest.raises(StepoptError, match="module 'no_such_mod' is not importable"):
        load("python:no_such_mod:f")
    f = tmp_path / "user.py"
    f.write_text("from _edm_like import UserDenoiser\n\ndef build():\n    return UserDenoiser()\n")
    assert load(f"python:{f}:build").shape == (1, 4, 4)


def test_unet_digits_loads_from_package_data_and_denoises():
    m = load_model("builtin:unet-digits")
    assert m.shape == (1, 8, 8) and m.parameterization == "edm"
    assert m.fingerprint == load_model("builtin:unet-digits").fingerprint
    x0 = torch.from_numpy(load_digits()[0][:64]).float()
    g = torch.Generator().manual_seed(0)
    gmm = load_model("builtin:gmm-digits")
    for sigma in (0.1, 0.5, 2.0):
        noisy = x0 + sigma * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            err = (m(noisy, torch.full((64,), sigma, dtype=torch.float64)) - x0).pow(2).mean().sqrt()
        # A trained denoiser removes noise (error below sigma) about as well as the exact posterior mean of
        # the mixture fitted to the same digits (measured: 0.059 vs 0.076 at 0.1, 0.45 vs 0.44 at 2.0).
        ref = (gmm(noisy.double(), sigma) - x0).pow(2).mean().sqrt()
        assert err < sigma and err < 1.25 * ref, (sigma, float(err), float(ref))


def test_unet_digits_runs_in_bfloat16_with_float32_state():
    m = load_model("builtin:unet-digits", dtype=torch.bfloat16)
    assert m.dtype == torch.float32 and next(m.net.parameters()).dtype == torch.bfloat16
    ref = load_model("builtin:unet-digits")
    x = torch.from_numpy(load_digits()[0][:16]).float() + 0.3 * torch.randn(16, 1, 8, 8)
    s = torch.full((16,), 0.3, dtype=torch.float64)
    with torch.no_grad():
        lo, hi = m(x, s), ref(x, s)
    assert lo.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits: the denoised images agree to about 1e-2.
    assert (lo - hi).abs().max() < 5e-2 and (lo - hi).abs().max() > 0
