"""The ``diffusers:PATH`` adapter, and parity of stepopt's multistep solvers with diffusers' schedulers.

A tiny randomly initialised ``UNet2DModel`` (fixed torch seed) with a DDPM scheduler config
(linear betas, T = 1000) is saved to a temporary folder. The *same* sampling problem is then solved
twice: by diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` driving its own
copy of the UNet, and by ``stepopt.solvers.solve`` on ``load_model("diffusers:<folder>")``. Both
run the network in float64; the final samples must agree to ``RTOL`` relative to their largest entry.

Conventions bridged (each explicitly, in this file):

1. **Integer timesteps.** diffusers evaluates the UNet at integer DDPM indices; its
   ``scheduler.sigmas`` are the EDM-frame sigmas of those indices (float32). Our grid *is* that
   vector cast to float64, so the solver coefficients see the same lam's. The adapter maps each sigma
   back to the nearest integer index (``round_timesteps``) and builds its frame on diffusers' own
   float32 ``alphas_cumprod``, so the network sees the identical ``(x_t, t)``.
2. **State frame.** diffusers' sample is the VP state ``x_t``; ours is ``x = x_t / a_t`` with
   ``a_t = 1 / sqrt(1 + sigma^2)``. Both start from the same ``x_T`` (ours divided by ``a`` at
   ``sigmas[0]``) and we compare ``a(sigmas[-1]) * x_ours`` with diffusers' final sample.
3. **Final step.** ``final_sigmas_type="sigma_min"``: diffusers' last sigma is then sigma(t=0), the
   last point of our grid (``"zero"`` would add a jump to sigma 0 and force a first-order last step).
4. **lower_order_final.** DPM-Solver++ in diffusers lowers the order of the last two steps only when
   N < 15; stepopt's policy ``min(s+1, K, N-s)`` does not depend on N. So: N < 15 with the flag on
   for both, or N >= 15 where diffusers' flag is inert, compared with ours *off* (``min(s+1, K)``).
   UniPC in diffusers uses ``min(K, N-s)`` (plus warm-up) for any N: the same as ours.
   ``euler_at_final=False`` (diffusers' default) so nothing else changes the last step.
5. **2M solver_type.** stepopt's ``dpmpp-2m`` is the paper's Algorithm 2, diffusers'
   ``solver_type="midpoint"`` (its default); ``"heun"`` is a different second-order rule, and a
   negative control below shows it does not match.
6. **3M variants.** ``dpmpp-3m`` ``reference`` is diffusers' ``solver_order=3`` as it is (phi_3
   quadratic term, midpoint order-2 steps); ``taylor`` is diffusers with ``solver_type="heun"``
   (the taylor order-2 form, which is also k-diffusion's 3M warm-up: tests/test_solvers_extra.py
   checks that one against k-diffusion's formulas). ``exact`` integrates the whole quadratic
   (``-2 phi_3 D2``, see ``stepopt/solvers/dpmpp.py``): :class:`ExactQuadratic3M` adds the
   missing half to diffusers' step, computed from the scheduler's own stored outputs and sigmas.
   Negative controls show that the variants differ from each other's reference by far more than
   ``RTOL``.
7. **UniPC settings.** ``predict_x0=True`` (data prediction, as ours), ``solver_type`` bh1/bh2 =
   our ``variant``, ``disable_corrector=[]`` (corrector after every step except the last, which
   neither side corrects), no ``solver_p``. Both use a = 1/2 for UniP-2 and UniC-1.
8. **Custom grids.** DPM-Solver++ takes ``set_timesteps(timesteps=[...])`` (any descending integer
   indices); UniPC's ``set_timesteps`` has no ``timesteps=`` and its ``sigmas=`` requires flow
   sigmas, so UniPC grids come from ``timestep_spacing`` (``linspace``, ``trailing``, ``leading``).
9. **Precision.** diffusers' DPM step casts the sample to float32 and both schedulers compute their
   coefficients from float32 sigmas, so agreement is ~1e-7 relative (measured: at most 4.5e-7 over
   all cases here). RTOL = 2e-6 keeps a margin of 4 and is tight enough that scaling any single
   solver coefficient (the 2M difference term, the 3M quadratic term, a UniP or a UniC coefficient)
   by 1 + 1e-3 fails the cases that use it (checked once with a scratch copy of the solvers: all
   of them, except one 3M case for the 2M term, which 3M uses only in one warm-up step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from _tiny_diffusers import make_tiny_diffusers
from stepopt.errors import StepoptError
from stepopt.models import load_model
from stepopt.models.diffusers import DiffusersUNet
from stepopt.solvers import get_solver, solve

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

RTOL = 2e-6
PREDICTIONS = ("epsilon", "v_prediction")
CUSTOM_TIMESTEPS = [999, 870, 720, 560, 410, 270, 150, 60]  # non-uniform integer indices, N = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-diffusers")
    return {p: make_tiny_diffusers(root / p, prediction_type=p) for p in (*PREDICTIONS, "sample")}


class ExactQuadratic3M(diffusers.DPMSolverMultistepScheduler):  # type: ignore[misc, name-defined]
    """diffusers' DPM-Solver++(3M) plus the missing half of the quadratic term (convention 6).

    With nodes lam_{s-2} < lam_{s-1} < lam_s, ``h = lam_{s+1} - lam_s``, ``r0 = h_{s-1}/h``,
    ``r1 = h_{s-2}/h``, the quadratic through the three data predictions in ``u = (lam - lam_s)/h``
    has ``u^2`` coefficient ``D2 = ((m0 - m1)/r0 - (m1 - m2)/r1) / (r0 + r1)``; its exact weight is
    ``a_t * (-2 phi_3)`` with ``phi_3 = (e^{-h} - 1 + h)/h^2 - 1/2``, of which diffusers applies half.
    """

    def multistep_dpm_solver_third_order_update(self, model_output_list: list[torch.Tensor], *args: Any, **kw: Any):
        x_t = super().multistep_dpm_solver_third_order_update(model_output_list, *args, **kw)
        i = self.step_index
        sig = [float(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        lam = [-math.log(s) for s in sig]
        h, h0, h1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = h0 / h, h1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        phi_3 = (math.expm1(-h) + h) / h**2 - 0.5
        alpha_t = 1.0 / math.sqrt(1.0 + sig[0] ** 2)
        return x_t - alpha_t * phi_3 * d2


def _unet(folder: Path) -> Any:
    """diffusers' own copy of the network (independent of the adapter), in float64."""
    return diffusers.UNet2DModel.from_pretrained(folder / "unet", local_files_only=True).double().eval()


def _x_T(shape: tuple[int, ...], n: int = 3) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _run_diffusers(folder: Path, scheduler: Any, x_T: torch.Tensor, **set_timesteps: Any) -> tuple[Any, Any]:
    """diffusers' sampling loop; returns (final VP sample, the scheduler's sigmas as float64)."""
    unet = _unet(folder)
    scheduler.set_timesteps(**set_timesteps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x, scheduler.sigmas.to(torch.float64)


def _run_stepopt(folder: Path, solver: str, order: int, variant: str | None, lof: bool, x_T, sigmas) -> torch.Tensor:
    """stepopt on the same grid, mapped into and out of the EDM frame (convention 2)."""
    model = load_model(f"diffusers:{folder}", device="cpu", dtype=torch.float64)
    ident = get_solver(solver).identity(order, variant, lof)

    def a(s: torch.Tensor) -> torch.Tensor:
        return 1.0 / torch.sqrt(1.0 + s * s)

    with torch.no_grad():
        x = solve(ident, model, x_T / a(sigmas[0]), sigmas)
    return x * a(sigmas[-1])


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


# -- DPM-Solver++ ------------------------------------------------------------------------------

DPM_CASES = [
    # (our solver, variant, our lower_order_final, diffusers lower_order_final, set_timesteps kwargs)
    pytest.param("dpmpp-2m", None, True, True, {"num_inference_steps": 8}, id="2m-linspace8"),
    pytest.param("dpmpp-2m", None, True, True, {"timesteps": CUSTOM_TIMESTEPS}, id="2m-custom8"),
    pytest.param("dpmpp-2m", None, False, False, {"num_inference_steps": 6}, id="2m-nolof6"),
    pytest.param("dpmpp-2m", None, False, True, {"num_inference_steps": 16}, id="2m-N16-diffusers-lof-inert"),
    pytest.param("dpmpp-3m", "reference", True, True, {"timesteps": CUSTOM_TIMESTEPS}, id="3m-ref-custom8"),
    pytest.param("dpmpp-3m", "reference", True, True, {"num_inference_steps": 5}, id="3m-ref-linspace5"),
    pytest.param("dpmpp-3m", "reference", False, False, {"num_inference_steps": 7}, id="3m-ref-nolof7"),
    pytest.param("dpmpp-3m", "reference", False, True, {"num_inference_steps": 16}, id="3m-ref-N16-lof-inert"),
    pytest.param("dpmpp-3m", "taylor", True, True, {"timesteps": CUSTOM_TIMESTEPS}, id="3m-taylor-custom8"),
    pytest.param("dpmpp-3m", "taylor", False, False, {"num_inference_steps": 6}, id="3m-taylor-nolof6"),
    pytest.param("dpmpp-3m", "exact", True, True, {"timesteps": CUSTOM_TIMESTEPS}, id="3m-exact-custom8"),
    pytest.param("dpmpp-3m", "exact", False, False, {"num_inference_steps": 7}, id="3m-exact-nolof7"),
]


def _dpm_scheduler(order: int, variant: str | None, **kw: Any) -> Any:
    """diffusers' scheduler for our identity (convention 6)."""
    cls = ExactQuadratic3M if variant == "exact" else diffusers.DPMSolverMultistepScheduler
    return cls(solver_order=order, solver_type="heun" if variant == "taylor" else "midpoint", **kw)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(("solver", "variant", "lof", "d_lof", "grid"), DPM_CASES)
def test_dpmpp_matches_diffusers(folders, prediction, solver, variant, lof, d_lof, grid) -> None:
    order = get_solver(solver).default_order
    sched = _dpm_scheduler(
        order,
        variant,
        prediction_type=prediction,
        algorithm_type="dpmsolver++",
        lower_order_final=d_lof,
        euler_at_final=False,
        final_sigmas_type="sigma_min",
    )
    x_T = _x_T((2, 8, 8))
    ref, sigmas = _run_diffusers(folders[prediction], sched, x_T, **grid)
    ours = _run_stepopt(folders[prediction], solver, order, variant, lof, x_T, sigmas)
    assert _rel(ours, ref) < RTOL


def test_dpmpp_2m_sample_prediction(folders) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="sample", final_sigmas_type="sigma_min")
    x_T = _x_T((2, 8, 8))
    ref, sigmas = _run_diffusers(folders["sample"], sched, x_T, timesteps=CUSTOM_TIMESTEPS)
    assert _rel(_run_stepopt(folders["sample"], "dpmpp-2m", 2, None, True, x_T, sigmas), ref) < RTOL


def test_negative_controls(folders) -> None:
    """The tolerance discriminates: a different 2M rule, and each 3M variant against another's reference."""
    x_T = _x_T((2, 8, 8))
    folder = folders["epsilon"]
    heun = diffusers.DPMSolverMultistepScheduler(solver_type="heun", final_sigmas_type="sigma_min")
    ref, sigmas = _run_diffusers(folder, heun, x_T, timesteps=CUSTOM_TIMESTEPS)
    assert _rel(_run_stepopt(folder, "dpmpp-2m", 2, None, True, x_T, sigmas), ref) > 100 * RTOL
    plain = diffusers.DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min")
    ref, sigmas = _run_diffusers(folder, plain, x_T, timesteps=CUSTOM_TIMESTEPS)
    for variant in ("exact", "taylor"):
        assert _rel(_run_stepopt(folder, "dpmpp-3m", 3, variant, True, x_T, sigmas), ref) > 100 * RTOL


# -- UniPC -------------------------------------------------------------------------------------

UNIPC_CASES = [
    # (variant, order, lower_order_final on both sides, timestep_spacing, N)
    pytest.param("bh1", 2, True, "linspace", 7, id="bh1-o2-linspace7"),
    pytest.param("bh1", 3, True, "trailing", 6, id="bh1-o3-trailing6"),
    pytest.param("bh2", 2, True, "trailing", 7, id="bh2-o2-trailing7"),
    pytest.param("bh2", 3, True, "linspace", 8, id="bh2-o3-linspace8"),
    pytest.param("bh2", 3, False, "leading", 6, id="bh2-o3-nolof-leading6"),
    pytest.param("bh1", 3, True, "linspace", 16, id="bh1-o3-linspace16"),
]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(("variant", "order", "lof", "spacing", "n"), UNIPC_CASES)
def test_unipc_matches_diffusers(folders, prediction, variant, order, lof, spacing, n) -> None:
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type=prediction,
        solver_order=order,
        solver_type=variant,
        predict_x0=True,
        lower_order_final=lof,
        disable_corrector=[],
        timestep_spacing=spacing,
        final_sigmas_type="sigma_min",
    )
    x_T = _x_T((2, 8, 8))
    ref, sigmas = _run_diffusers(folders[prediction], sched, x_T, num_inference_steps=n)
    ours = _run_stepopt(folders[prediction], "unipc", order, variant, lof, x_T, sigmas)
    assert _rel(ours, ref) < RTOL


# -- the adapter itself ------------------------------------------------------------------------


def test_adapter_frame_matches_diffusers_sigmas(folders) -> None:
    """Integer-index sigmas equal diffusers' (float32) ones; time() inverts them to the index."""
    model = load_model(f"diffusers:{folders['epsilon']}")
    sched = diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    sched.set_timesteps(timesteps=CUSTOM_TIMESTEPS)
    theirs = sched.sigmas.to(torch.float64)
    ts = torch.tensor([*CUSTOM_TIMESTEPS, 0], dtype=torch.float64)
    assert torch.allclose(model.frame.sigma(ts), theirs, rtol=1e-15, atol=0)  # the same float32 table
    assert torch.equal(torch.as_tensor(model.frame.sigma_table[ts.long().numpy()]), theirs)
    assert torch.allclose(model.frame.time(theirs), ts, atol=1e-9)
    assert torch.equal(model.round_sigma(theirs), model.frame.sigma(ts))
    # The sigma range is [sigma(0), sigma(T-1)] of the same table.
    a = sched.alphas_cumprod
    table = (((1 - a) / a) ** 0.5).to(torch.float64)
    assert model.sigma_min == pytest.approx(float(table[0]), rel=1e-15)
    assert model.sigma_max == pytest.approx(float(table[-1]), rel=1e-15)


@pytest.mark.parametrize("prediction", (*PREDICTIONS, "sample"))
def test_adapter_denoiser_formula(folders, prediction) -> None:
    """D(x, sigma) from the raw network output at the integer index, per parameterization."""
    model = load_model(f"diffusers:{folders[prediction]}", dtype=torch.float64)
    unet = _unet(folders[prediction])
    t = torch.tensor([999.0, 500.0, 3.0], dtype=torch.float64)
    sigma = model.frame.sigma(t)
    a = (1 / torch.sqrt(1 + sigma**2)).reshape(-1, 1, 1, 1)
    s = sigma.reshape(-1, 1, 1, 1)
    x = _x_T(model.shape)
    with torch.no_grad():
        f = unet(a * x, t).sample  # VP input x_t = a x at the index t
        d = model(x, sigma)
    want = {"epsilon": x - s * f, "v_prediction": a * a * x - a * s * f, "sample": f}[prediction]
    assert torch.allclose(d, want, rtol=1e-12, atol=1e-12)


def test_adapter_rounds_only_the_timestep(folders) -> None:
    """Off an integer index the network gets round(t); scaling and conversion use the given sigma."""
    folder = folders["epsilon"]
    model = load_model(f"diffusers:{folder}", dtype=torch.float64)
    unet = _unet(folder)
    x = _x_T(model.shape)
    s_off = model.frame.sigma(torch.tensor([400.3] * 3, dtype=torch.float64))
    s = s_off.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        want = x - s * unet(x / torch.sqrt(1 + s * s), torch.tensor(400.0)).sample
        assert torch.allclose(model(x, s_off), want, rtol=1e-12, atol=1e-12)
        assert torch.allclose(model.round_sigma(s_off), model.frame.sigma(torch.tensor(400.0)), rtol=1e-15)
        frac = load_model(f"diffusers:{folder}", dtype=torch.float64)
        assert isinstance(frac, DiffusersUNet)
        frac.round_timesteps = False
        want = x - s * unet(x / torch.sqrt(1 + s * s), torch.tensor(400.3)).sample
        assert torch.allclose(frac(x, s_off), want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(frac(x, s_off), model(x, s_off), rtol=1e-9, atol=0)
        assert torch.equal(frac.round_sigma(s_off), s_off)


def test_adapter_layouts_dtype_and_fingerprint(tmp_path: Path, folders) -> None:
    flat = make_tiny_diffusers(tmp_path / "flat", layout="flat", safetensors=False)
    a = load_model(f"diffusers:{folders['epsilon']}")
    b = load_model(f"diffusers:{flat}", dtype=torch.float64)  # .bin weights, model folder layout
    assert a.fingerprint == b.fingerprint  # same seed, same weights, same scheduler settings
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == 71
    assert b.dtype == torch.float64 and next(b.unet.parameters()).dtype == torch.float64
    assert a.shape == (2, 8, 8) and a.time_domain == "vp-discrete" and a.id == f"diffusers:{folders['epsilon']}"
    other_weights = make_tiny_diffusers(tmp_path / "seed1", seed=1)
    other_sched = make_tiny_diffusers(tmp_path / "beta", beta_end=0.021)
    assert load_model(f"diffusers:{other_weights}").fingerprint != a.fingerprint
    assert load_model(f"diffusers:{other_sched}").fingerprint != a.fingerprint
    assert load_model(f"diffusers:{folders['v_prediction']}").fingerprint != a.fingerprint


def test_adapter_learned_variance_uses_first_half(tmp_path: Path) -> None:
    folder = make_tiny_diffusers(tmp_path / "lv", out_channels=4)
    model = load_model(f"diffusers:{folder}", dtype=torch.float64)
    x = _x_T(model.shape)
    sigma = model.frame.sigma(torch.tensor([700.0] * 3, dtype=torch.float64))
    with torch.no_grad():
        f = _unet(folder)(x / torch.sqrt(1 + sigma**2).reshape(-1, 1, 1, 1), torch.tensor(700.0)).sample
        assert torch.allclose(model(x, sigma), x - sigma.reshape(-1, 1, 1, 1) * f[:, :2], rtol=1e-12, atol=1e-12)


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_adapter_errors(tmp_path: Path) -> None:
    with pytest.raises(StepoptError, match="no such folder"):
        load_model(f"diffusers:{tmp_path / 'missing'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StepoptError, match="no scheduler config"):
        load_model(f"diffusers:{empty}")
    bad = make_tiny_diffusers(tmp_path / "bad")
    cfg = bad / "scheduler" / "scheduler_config.json"
    _edit_json(cfg, prediction_type="flow_prediction")
    with pytest.raises(StepoptError, match=r"prediction_type 'flow_prediction'.*epsilon, v_prediction, sample"):
        load_model(f"diffusers:{bad}")
    _edit_json(cfg, prediction_type="epsilon", beta_schedule="exotic")
    with pytest.raises(StepoptError, match="beta_schedule 'exotic'"):
        load_model(f"diffusers:{bad}")
    _edit_json(cfg, beta_schedule="linear")
    (bad / "unet" / "config.json").rename(bad / "unet" / "other.json")
    with pytest.raises(StepoptError, match="no UNet config"):
        load_model(f"diffusers:{bad}")
    (bad / "unet" / "other.json").rename(bad / "unet" / "config.json")
    _edit_json(bad / "unet" / "config.json", _class_name="UNet2DConditionModel")
    with pytest.raises(StepoptError, match=r"UNet2DConditionModel.*not supported"):
        load_model(f"diffusers:{bad}")
    _edit_json(bad / "unet" / "config.json", _class_name="UNet2DModel")
    for w in (bad / "unet").glob("*.safetensors"):
        w.unlink()
    with pytest.raises(StepoptError, match="cannot load UNet2DModel weights"):
        load_model(f"diffusers:{bad}")
