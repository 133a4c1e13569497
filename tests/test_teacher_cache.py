"""The teacher's on-disk cache: per-seed reuse, keys, corruption recovery, atomic writes, info/clear.

Ground truth: the closed-form ODE solution of the isotropic Gaussian (and of the point mass), so a
cached value can be compared with the exact one, and a counting subclass of the same analytic model
shows which seeds were really computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _gaussian_net import GaussianNet
from stepopt.baselines import baseline_sigmas
from stepopt.cache import ENV_VAR, TeacherCache, cache_info, cache_root, clear_cache
from stepopt.cli import app
from stepopt.errors import StepoptError
from stepopt.models import IsotropicGaussian
from stepopt.sampling import initial_noise
from stepopt.solvers import solve
from stepopt.teacher import TeacherConfig, teacher_key, teacher_outputs


class CountingGaussian(IsotropicGaussian):
    """The analytic Gaussian, recording how many samples each exact ODE solve received."""

    def __init__(self, c: float = 0.7) -> None:
        super().__init__(torch.linspace(-0.5, 0.5, 16, dtype=torch.float64).reshape(1, 4, 4), c=c)
        self.calls: list[int] = []

    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        return super().ode_solution(x, sigma_from, sigma_to)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def exact(model: IsotropicGaussian, seeds: list[int], s_hi: float = 80.0, s_lo: float = 0.002) -> torch.Tensor:
    return IsotropicGaussian.ode_solution(model, initial_noise(model, seeds, sigma=s_hi), s_hi, s_lo)


def test_root_from_env(cache_dir: Path) -> None:
    assert cache_root() == cache_dir


def test_cached_values_are_exact_and_reused(cache_dir: Path) -> None:
    m = CountingGaussian()
    x, y = teacher_outputs(m, range(6), batch_size=4)
    assert m.calls == [4, 2]
    assert torch.equal(x, initial_noise(m, list(range(6))))
    assert torch.allclose(y, exact(m, list(range(6))), rtol=0, atol=1e-14)
    files = sorted(p.name for p in next((cache_dir / "teacher").iterdir()).iterdir())
    assert files == sorted([*(f"{i}.npy" for i in range(6)), *(f"{i}.sha256" for i in range(6)), "key.json"])
    # A second call computes nothing and returns the same values bit for bit.
    m.calls.clear()
    x2, y2 = teacher_outputs(m, range(6), batch_size=3)
    assert m.calls == [] and torch.equal(y2, y) and torch.equal(x2, x)
    # A shifted range reuses the overlap and computes only the new seeds.
    _, y3 = teacher_outputs(m, [4, 5, 6, 7, 8])
    assert m.calls == [3]
    assert torch.equal(y3[:2], y[4:]) and torch.allclose(y3, exact(m, [4, 5, 6, 7, 8]), atol=1e-14)
    assert not list(cache_dir.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_key_separates_what_changes_the_value(cache_dir: Path) -> None:
    m = CountingGaussian()
    teacher_outputs(m, [0, 1])
    m.calls.clear()
    _, y = teacher_outputs(m, [0, 1], sigma_to=0.5)  # another sigma range: a new entry
    assert m.calls == [2] and torch.allclose(y, exact(m, [0, 1], s_lo=0.5), atol=1e-14)
    other = CountingGaussian(c=0.8)  # another model fingerprint: a new entry
    teacher_outputs(other, [0, 1])
    assert other.calls == [2]
    assert len(list((cache_dir / "teacher").iterdir())) == 3
    # Analytic teachers are exact: the network-teacher configuration is not part of their key.
    k1 = teacher_key(m, TeacherConfig(steps=10), 80.0, 0.002, torch.float64)
    k2 = teacher_key(m, TeacherConfig(steps=20), 80.0, 0.002, torch.float64)
    assert k1 == k2 and k1["teacher"] == "exact:CountingGaussian"
    net = GaussianNet()
    assert teacher_key(net, TeacherConfig(steps=10), 80.0, 0.002, torch.float64) != teacher_key(
        net, TeacherConfig(steps=20), 80.0, 0.002, torch.float64
    )


def test_network_teacher_cached_per_config(cache_dir: Path) -> None:
    net = GaussianNet()
    x0 = initial_noise(net.inner, [0, 1, 2])
    truth = net.inner.ode_solution(x0, 80.0, 0.002)
    _, y40 = teacher_outputs(net, [0, 1, 2], TeacherConfig(solver="heun", steps=40))
    _, y10 = teacher_outputs(net, [0, 1, 2], TeacherConfig(solver="heun", steps=10))
    # Heun is second order: 4x the steps cuts the error by about 16 (closed-form truth).
    assert (y10 - truth).abs().max() > 8 * (y40 - truth).abs().max()
    _, y40_again = teacher_outputs(net, [0, 1, 2], TeacherConfig(solver="heun", steps=40))
    assert torch.equal(y40, y40_again)
    assert len(list((cache_dir / "teacher").iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape", "nan"])
def test_corrupt_entries_are_recomputed(cache_dir: Path, damage: str) -> None:
    m = CountingGaussian()
    _, y = teacher_outputs(m, [0, 1, 2])
    f = next((cache_dir / "teacher").iterdir()) / "1.npy"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:40])
    elif damage == "garbage":
        f.write_bytes(b"not an array at all")
    elif damage == "wrong-shape":
        np.save(f, np.zeros(3))
    else:
        np.save(f, np.full((1, 4, 4), np.nan))
    m.calls.clear()
    _, y2 = teacher_outputs(m, [0, 1, 2])
    assert m.calls == [1]  # only the damaged seed
    assert torch.allclose(y2, y, atol=1e-14)
    assert np.load(f).shape == (1, 4, 4) and np.isfinite(np.load(f)).all()  # rewritten


@pytest.mark.parametrize("attack", ["planted", "other-seed", "other-entry", "no-digest"])
def test_cache_verifies_what_it_reads(cache_dir: Path, attack: str) -> None:
    """A valid .npy that is not what this key and seed stored is never used (it used to change ode-error)."""
    m = CountingGaussian()
    _, y = teacher_outputs(m, [0, 1, 2])
    entry = next((cache_dir / "teacher").iterdir())
    f = entry / "1.npy"
    if attack == "planted":  # a well-formed array of the right shape and dtype, with a stale digest
        np.save(f, np.full((1, 4, 4), 3.0))
    elif attack == "other-seed":  # seed 2's file and digest copied onto seed 1
        f.write_bytes((entry / "2.npy").read_bytes())
        (entry / "1.sha256").write_bytes((entry / "2.sha256").read_bytes())
    elif attack == "other-entry":  # the same seed from another key (another sigma range)
        teacher_outputs(m, [1], sigma_to=0.5)
        other = next(p for p in (cache_dir / "teacher").iterdir() if p != entry)
        f.write_bytes((other / "1.npy").read_bytes())
        (entry / "1.sha256").write_bytes((other / "1.sha256").read_bytes())
    else:
        (entry / "1.sha256").unlink()
    m.calls.clear()
    _, y2 = teacher_outputs(m, [0, 1, 2])
    assert m.calls == [1]  # only the tampered seed is recomputed, and then rewritten with its digest
    assert torch.allclose(y2, y, atol=1e-14)
    m.calls.clear()
    teacher_outputs(m, [0, 1, 2])
    assert m.calls == []


def test_interrupted_teacher_resumes_from_finished_batches(cache_dir: Path) -> None:
    class Interrupted(CountingGaussian):
        stop_after: int | None = 2

        def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
            if len(self.calls) == self.stop_after:
                raise KeyboardInterrupt
            return super().ode_solution(x, sigma_from, sigma_to)

    m = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        teacher_outputs(m, range(10), batch_size=4)
    m2 = Interrupted()
    m2.stop_after = None
    _, y = teacher_outputs(m2, range(10), batch_size=4)
    assert m2.calls == [2]  # the two finished batches (8 seeds) were kept
    assert torch.allclose(y, exact(m2, list(range(10))), atol=1e-14)


def test_no_cache_writes_nothing(cache_dir: Path) -> None:
    m = CountingGaussian()
    teacher_outputs(m, [0, 1], cache=False)
    teacher_outputs(m, [0, 1], cache=False)
    assert m.calls == [2, 2] and not cache_dir.exists()
    private = TeacherCache(cache_dir / "elsewhere")
    teacher_outputs(m, [0, 1], cache=private)
    assert len(list((cache_dir / "elsewhere" / "teacher").iterdir())) == 1


def test_cache_info_and_clear(cache_dir: Path) -> None:
    teacher_outputs(CountingGaussian(), range(5))
    info = cache_info()
    assert info["root"] == str(cache_dir)
    t = info["sections"]["teacher"]
    assert t["entries"] == 1 and t["files"] == 11 and t["bytes"] > 5 * 16 * 8  # 5 arrays, 5 digests, the key
    assert info["teacher_entries"][0]["seeds"] == 5
    assert info["teacher_entries"][0]["key"]["fingerprint"] == CountingGaussian().fingerprint
    with pytest.raises(StepoptError, match="unknown cache section"):
        clear_cache("teachers")
    removed = clear_cache("teacher")
    assert removed["files"] == 11 and cache_info()["bytes"] == 0


def test_cache_command(cache_dir: Path) -> None:
    teacher_outputs(CountingGaussian(), range(3))
    runner = CliRunner()
    r = runner.invoke(app, ["cache", "info", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["sections"]["teacher"]["files"] == 7
    r = runner.invoke(app, ["cache", "clear", "--section", "teacher", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["removed"]["files"] == 7
    r = runner.invoke(app, ["cache", "clear", "--section", "nope"])
    assert r.exit_code == 1 and "expected one of teacher, fidelity" in r.output


def test_models_without_content_fingerprint_are_not_cached(cache_dir: Path) -> None:
    class Unhashed(CountingGaussian):
        @property
        def fingerprint(self) -> str:
            return "unknown:python:mod:factory"

    m = Unhashed()
    teacher_outputs(m, [0, 1])
    teacher_outputs(m, [0, 1])
    assert m.calls == [2, 2] and not cache_dir.exists()


def test_teacher_variant(cache_dir: Path) -> None:
    """``variant`` picks the teacher solver's variant (LD3's CIFAR-10 teacher is UniPC bh1), keys the cache,
    and is left out of the key and the records when unset (earlier caches stay valid)."""
    net = GaussianNet()
    x0 = initial_noise(net.inner, [0, 1, 2])
    truth = net.inner.ode_solution(x0, 80.0, 0.002)
    unset = TeacherConfig(solver="unipc", order=3, steps=20)
    assert "variant" not in unset.cache_key() and unset.identity().variant == "bh2"  # the solver's default
    ys = {}
    for v in ("bh1", "bh2"):
        err = []
        for steps in (20, 40):
            cfg = TeacherConfig(solver="unipc", order=3, steps=steps, variant=v)
            assert cfg.cache_key()["variant"] == v and cfg.identity().variant == v
            _, ys[v, steps] = teacher_outputs(net, [0, 1, 2], cfg)
            grid = torch.as_tensor(baseline_sigmas("edm", steps, 80.0, 0.002, net.frame))
            assert torch.equal(ys[v, steps], solve(cfg.identity(), net, x0, grid))  # exactly that solver and grid
            err.append(float((ys[v, steps] - truth).abs().max()))
        assert err[1] < err[0] / 8  # third order against the closed-form solution
    assert not torch.equal(ys["bh1", 20], ys["bh2", 20])
    _, y_unset = teacher_outputs(net, [0, 1, 2], unset)
    assert torch.equal(y_unset, ys["bh2", 20])
    assert len(list((cache_dir / "teacher").iterdir())) == 5  # unset and bh2 are different keys, same values
    with pytest.raises(StepoptError, match="no variant 'bh3'"):
        TeacherConfig(solver="unipc", variant="bh3").identity()
