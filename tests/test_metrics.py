"""Metrics: ode-error, the exact Fréchet distance, and torch-fidelity's FID/KID/IS/PRC behind our wrapper.

Ground truths: closed-form Fréchet distances of Gaussians with commuting covariances; features
computed directly with the classifier and reduced by our own float64 Fréchet code (independent of
torch-fidelity's); the real digits (FID against themselves is 0 by definition); the statistics of
the random Inception network's own features (FID = |delta mu|^2 when only the mean moves).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.defaults import DEFAULTS as TF_DEFAULTS
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from stepopt.errors import StepoptError
from stepopt.metrics import METRIC_NAMES, parse_metrics
from stepopt.metrics import digits_features as D
from stepopt.metrics import fidelity as F
from stepopt.metrics.exact import exact_moments, fd_exact, frechet_distance, sample_moments
from stepopt.metrics.ode_error import ode_error
from stepopt.models import IsotropicGaussian, PointMass


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPOPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def digits_fid(images: torch.Tensor, **opts: object) -> float:
    options = F.FidelityOptions(feature_extractor=F.DIGITS, **opts)  # type: ignore[arg-type]
    ref = F.resolve_reference(None, F.DIGITS)
    return F.fidelity_metrics(images, ["fid"], ref, options, D.weights_fingerprint())[0]["fid"]


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return D.real_digits_images()


# -- ode-error ---------------------------------------------------------------------------------------------


def test_ode_error_values() -> None:
    y = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    d = torch.zeros_like(y)
    d[0, 0, 0, 0] = 3.0  # one element off by 3 out of 16: rmse = sqrt(9/16), max = 3
    assert ode_error(y + d, y) == pytest.approx({"rmse": 0.75, "max": 3.0}, rel=1e-15)
    with pytest.raises(ValueError):
        ode_error(y, y[:2])


# -- exact Fréchet distance ----------------------------------------------------------------------------


def test_frechet_distance_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64)
    # Diagonal covariances commute: FD = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2.
    want = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, rel=1e-12)
    # General covariances: against scipy's sqrtm form tr(C1 + C2 - 2 (C1 C2)^{1/2}).
    x, y = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    c1, c2 = x @ x.T + 0.1 * torch.eye(5), y @ y.T
    ref = float(((m1 - m2) ** 2).sum()) + float(
        np.trace(c1.numpy() + c2.numpy() - 2 * scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real)
    )
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(m2, c2, m1, c1) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-10)


def test_fd_exact_gaussian_and_point_mass() -> None:
    mu = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64).reshape(1, 4, 4)
    model = IsotropicGaussian(mu, c=0.7)
    m, c = exact_moments(model)
    assert torch.equal(m, mu.reshape(-1)) and torch.allclose(c, 0.49 * torch.eye(16, dtype=torch.float64))
    # Samples whose moments are exactly (mu + delta, 0.49 I) (a +-1 design, unbiased covariance):
    # FD = |delta|^2 exactly, FD to the sigma-marginal adds sum (0.7 - sqrt(0.49 + sigma^2))^2.
    h = torch.from_numpy(scipy.linalg.hadamard(16)).to(torch.float64)  # rows orthogonal, entries +-1
    z = torch.cat([h, -h])  # 32 samples, mean 0, covariance 32/31 * I
    samples = (mu.reshape(-1) + 0.1 + 0.7 * math.sqrt(31 / 32) * z).reshape(32, 1, 4, 4)
    _, cs = sample_moments(samples)
    assert torch.allclose(cs, 0.49 * torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert fd_exact(samples, model) == pytest.approx(16 * 0.01, rel=1e-9)
    sigma = 0.3
    want = 16 * 0.01 + 16 * (0.7 - math.sqrt(0.49 + sigma**2)) ** 2
    assert fd_exact(samples, model, sigma) == pytest.approx(want, rel=1e-9)
    pm = PointMass(mu)
    assert fd_exact(pm.sample(5), pm) == pytest.approx(0.0, abs=1e-12)


def test_fd_exact_on_gmm_samples_shrinks_with_n(gmm) -> None:
    # Exact mixture samples: FD has only the O(d/n) finite-sample bias, so it shrinks with n;
    # a sampler that loses the covariance (all samples at the mean) is far away: FD = tr(C).
    g = torch.Generator().manual_seed(0)
    small = fd_exact(gmm.sample(500, g), gmm)
    large = fd_exact(gmm.sample(8000, g), gmm)
    assert large < small / 4
    m, c = gmm.mean_and_covariance()
    collapsed = m.reshape(1, 1, 8, 8).expand(10, 1, 8, 8) + 1e-9 * torch.randn(10, 1, 8, 8, generator=g)
    assert fd_exact(collapsed, gmm) == pytest.approx(float(torch.trace(c)), rel=1e-6)
    assert large < 0.01 * float(torch.trace(c))


def test_fd_exact_needs_known_moments() -> None:
    from stepopt.models.base import DiffusionModel

    class Net(DiffusionModel):
        id = "python:net"

        def denoise(self, x, sigma, **cond):  # pragma: no cover - not called
            return x

        @property
        def fingerprint(self) -> str:
            return "sha256:0"

    with pytest.raises(StepoptError, match="known data moments"):
        exact_moments(Net())


# -- metric names --------------------------------------------------------------------------------------------


def test_parse_metrics() -> None:
    reqs = parse_metrics("ode-error, fid-digits,fd-exact,fid-digits")
    assert [r.name for r in reqs] == ["ode-error", "fid-digits", "fd-exact"]
    assert reqs[1].base == "fid" and reqs[1].extractor == F.DIGITS
    assert parse_metrics(["kid"])[0].extractor is None
    with pytest.raises(StepoptError, match="unknown metric 'fdi'"):
        parse_metrics("ode-error,fdi")
    assert set(METRIC_NAMES) >= {"ode-error", "fd-exact", "fid", "kid", "isc", "prc", "fid-digits"}


# -- the typed torch-fidelity wrapper ----------------------------------------------------------------------


def test_options_are_torch_fidelity_keywords() -> None:
    names = [f.name for f in dataclasses.fields(F.FidelityOptions)]
    assert set(names) <= set(TF_DEFAULTS), set(names) - set(TF_DEFAULTS)
    assert F.FidelityOptions().to_kwargs().keys() == set(names)
    with pytest.raises(
        StepoptError, match=r"unknown torch-fidelity option 'kid_subset'; valid options: .*kid_subset_size"
    ):
        F.fidelity_options_from({"kid_subset": 10})
    with pytest.raises(StepoptError, match="kid_kernel"):
        F.FidelityOptions(kid_kernel="gauss")  # type: ignore[arg-type]
    with pytest.raises(StepoptError, match="unknown feature extractor"):
        F.FidelityOptions(feature_extractor="inception")


def test_option_defaults_are_torch_fidelitys() -> None:
    """Every default is torch-fidelity's own except the few stepopt declares (and says why)."""
    for f in dataclasses.fields(F.FidelityOptions):
        want = F.STEPOPT_DEFAULTS[f.name] if f.name in F.STEPOPT_DEFAULTS else TF_DEFAULTS[f.name]
        assert f.default == want, f.name
    assert set(F.STEPOPT_DEFAULTS) <= {f.name for f in dataclasses.fields(F.FidelityOptions)}
    source = Path(F.__file__).read_text(encoding="utf-8")
    assert "-stat-fid-" not in source and "torch.save" not in source  # no forged cache entries


def test_requests_are_checked_before_work(tmp_path) -> None:
    opts = F.FidelityOptions()
    with pytest.raises(StepoptError, match="need `reference`"):
        F.check_request(["fid"], None, opts)
    F.check_request(["isc"], None, opts)  # unary: no reference needed
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    ref = F.resolve_reference(str(tmp_path / "ref.npz"), F.INCEPTION)
    assert ref is not None and ref.kind == "npz"
    with pytest.raises(StepoptError, match="kid and prc need reference images"):
        F.check_request(["fid", "kid"], ref, opts)
    with pytest.raises(StepoptError, match="not an image folder"):
        F.resolve_reference(str(tmp_path / "missing"), F.INCEPTION)
    assert F.resolve_reference(None, F.DIGITS) == F.Reference("dataset", "stepopt-digits")
    assert F.resolve_reference(str(tmp_path), F.DIGITS) == F.Reference("folder", str(tmp_path))


# -- FID-digits -------------------------------------------------------------------------------------------------


def test_digits_classifier_is_accurate(real) -> None:
    # The shipped weights classify the digits (held-out accuracy 99.4% reported by the training script).
    _, labels = D.load_digits(scaled=True)
    net = D.load_classifier()
    with torch.no_grad():
        acc = (net(D.from_image_scale(real)).argmax(1).numpy() == labels).mean()
    assert acc > 0.98


def test_fid_digits_zero_for_real_large_for_noise(real) -> None:
    assert abs(digits_fid(real)) < 1e-6  # the same set as the reference: FID = 0 up to round-off
    half = digits_fid(real[::2])  # a real subset: only finite-sample bias
    g = torch.Generator().manual_seed(0)
    noise = digits_fid(F.to_images(torch.randn(500, 1, 8, 8, generator=g, dtype=torch.float64), F.DIGITS))
    assert 0 < half < 20
    assert noise > 20 * half


def test_fid_digits_matches_independent_computation(real) -> None:
    # Features straight from the classifier, statistics and Fréchet distance by our own code
    # (eigh-based; torch-fidelity takes eigvals of the non-symmetric product: they agree to ~1e-7).
    g = torch.Generator().manual_seed(1)
    fake = (real[:300] + 40 * torch.randn(300, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 255)
    net = D.load_classifier()
    with torch.no_grad():
        f1 = net.features(D.from_image_scale(fake))[0]
        f2 = net.features(D.from_image_scale(real))[0]
    m1, c1 = sample_moments(f1)
    m2, c2 = sample_moments(f2)
    assert digits_fid(fake) == pytest.approx(frechet_distance(m1, c1, m2, c2), rel=1e-6)


def test_fid_digits_independent_of_batch_size(real) -> None:
    g = torch.Generator().manual_seed(2)
    fake = (real[:200] + 30 * torch.randn(200, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 255)
    a, b = digits_fid(fake, batch_size=7), digits_fid(fake, batch_size=200)
    assert a == pytest.approx(b, rel=1e-10)


def test_digits_reference_as_folder_and_npz(real, tmp_path) -> None:
    from PIL import Image

    # A folder of grey PNGs (torch-fidelity reads them as uint8 RGB): FID vs the float digits is
    # only the 8-bit rounding, tiny next to the noise FID.
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(real[:400, 0].round().to(torch.uint8).numpy()):
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    opts = F.FidelityOptions(feature_extractor=F.DIGITS)
    fp = D.weights_fingerprint()
    ref_folder = F.resolve_reference(str(folder), F.DIGITS)
    same = F.fidelity_metrics(real[:400], ["fid", "kid"], ref_folder, opts, fp)[0]
    assert abs(same["fid"]) < 0.05
    # EDM-style .npz of the reference statistics (ours, float64) gives torch-fidelity's dataset FID.
    net = D.load_classifier()
    with torch.no_grad():
        feats = net.features(D.from_image_scale(real))[0].numpy()
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    g = torch.Generator().manual_seed(3)
    fake = (real[:300] + 40 * torch.randn(300, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 255)
    via_npz = F.fidelity_metrics(fake, ["fid"], F.resolve_reference(str(tmp_path / "ref.npz"), F.DIGITS), opts, fp)
    assert via_npz[0]["fid"] == pytest.approx(digits_fid(fake), rel=1e-9)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(StepoptError, match="dimension 3, but stepopt-digits-cnn layer penultimate gives 64"):
        F.fidelity_metrics(fake, ["fid"], F.resolve_reference(str(tmp_path / "bad.npz"), F.DIGITS), opts, fp)


def test_other_fidelity_metrics_on_digits(real) -> None:
    opts = F.FidelityOptions(feature_extractor=F.DIGITS, kid_subsets=5)
    ref = F.resolve_reference(None, F.DIGITS)
    out, used = F.fidelity_metrics(real[:300], ["kid", "isc", "prc"], ref, opts, D.weights_fingerprint())
    assert used.kid_subset_size == 300  # resolved to min(1000, n)
    assert abs(out["kid"]["mean"]) < 5 * out["kid"]["std"] + 1e-9  # real vs real: KID ~ 0
    assert 8.0 < out["isc"]["mean"] <= 10.0  # 10 balanced, confidently classified classes: IS near 10
    assert out["prc"]["precision"] > 0.9 and out["prc"]["recall"] > 0.5


# -- Inception ---------------------------------------------------------------------------------------------------


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's inception-v3-compat architecture with its random initialisation (no weights loaded)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
        return None


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("inception")
    torch.save({}, tmp / "empty.pt")
    torch.manual_seed(0)
    net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp / "empty.pt"))
    torch.save(net.state_dict(), tmp / "random-inception.pth")
    return tmp / "random-inception.pth", net


def test_inception_weights_missing_is_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(StepoptError) as e:
        F.inception_weights(None)
    msg = str(e.value)
    assert "\n" not in msg and "`feature_weights`" in msg and str(F.inception_hub_path()) in msg
    hub = F.inception_hub_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert F.inception_weights(None) == hub  # torch's hub cache is used when present
    with pytest.raises(StepoptError, match="no such file"):
        F.inception_weights(tmp_path / "nope.pth")
    with pytest.raises(StepoptError, match="never downloads weights"):
        F.extractor_weights("vgg16", None)  # other torch-fidelity extractors: an explicit file only


def test_inception_fid_with_random_weights(random_inception, tmp_path) -> None:
    path, net = random_inception
    # Two 8x8 samples (upsampled to 299 by torch-fidelity); their features computed directly.
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    images = F.to_images(samples, F.INCEPTION)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    with torch.no_grad():
        feats = net(images)[0].double().numpy()
    delta = np.zeros(2048)
    delta[:4] = 1.0  # only the mean moves: FID = |delta|^2 = 4
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0) + delta, sigma=np.cov(feats, rowvar=False))
    wpath, wfp = F.extractor_weights(F.INCEPTION, str(path))
    opts = F.FidelityOptions(feature_extractor_weights_path=wpath)
    ref = F.resolve_reference(str(tmp_path / "ref.npz"), F.INCEPTION)
    out, _ = F.fidelity_metrics(images, ["fid"], ref, opts, wfp)
    assert out["fid"] == pytest.approx(4.0, abs=1e-3)
