"""Options of the trust-region optimizer (documented defaults: configs/trust-region.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stepopt.teacher_config import TeacherConfig

INITS = ("logsnr", "time-uniform", "edm")
OBJECTIVE_NAME = "xue2024-error-bound"


Tau = int | Literal["auto", "paper", "all"]


@dataclass(frozen=True)
class TrustRegionConfig:
    """Options of the trust-region optimizer (documented defaults: configs/trust-region.yaml).

    p: exponent of the error model ``sigma_t^p / alpha_t``. Default 2.5, measured on gmm-digits
       (module docstring); "paper" = 1 for pixel models, 2 for latent ones (the paper's
       recommendation; its reference code hard-codes 2). A model is latent if ``model.latent``.
    tau: truncation step of the bound: steps s < tau use the root-sum-square term, the others
       the per-node sums. "auto" = N-2: only the final lowered-order steps form the tail (the
       paper's 3 at N = 5); "paper" = 3 for N <= 7 else 0 (the paper's rule, degenerate under a
       global optimizer for N > 7, see the module docstring); "all" = every step root-sum-square.
    init: the start whose objective is reported as "initial"; "auto" = logsnr (uniform lam) for
       pixel models, time-uniform for latent ones (the paper's recommendation).
    min_gap: minimum lam gap between consecutive nodes.
    multistart: also start from the other inits (logsnr, time-uniform, edm).
    perturbed_starts / perturb: extra starts: ``init`` plus seeded Gaussian noise of
       ``perturb`` x the mean lam gap.
    finalists / screen_maxiter: every start first runs at most ``screen_maxiter`` iterations;
       the ``finalists`` best then run to convergence and through the later stages.
    smoothing: continuation widths mu for the kinks ``|c|``, relative to J(start) / N.
    screen: "slsqp" screens every start with SLSQP and refines the best with trust-constr;
       "none" solves every start with trust-constr.
    maxiter: iteration cap of each solve; refine_maxiter: of the trust-constr refinement.
    ftol: SLSQP's tolerance; gtol, xtol: trust-constr's.
    select: choose p, tau and init by the RMSE of the solver against a teacher on
       ``select_n`` noises (seeds ``select_seed``, ...), among ``select_p`` x ``select_tau`` x
       both inits plus every baseline. ``select_rule`` decides between the best bound candidate and
       the best baseline: "significant" (default): when the bound's candidate is lower on those noises,
       both are solved from ``select_confirm`` fresh noises (seeds after the selection's; default 512)
       and the bound's grid is kept only when its RMSE change against the baseline there has a 95 %
       paired bootstrap interval below 0 (``select_confirm: 0``: decided on the selection's noises);
       "lowest": whichever is lower on the selection's noises (the rule before). The minimum of ~30
       candidates on 32 noises is optimistic, and the error over noises heavy-tailed: on unet-digits
       unipc NFE 8 the lowest candidate beat kl-optimal significantly on the 32 noises and lost by
       14 % on 2048 held-out seeds.
    weights: "paper" (default): for the multistep exponential integrators (euler, dpmpp-2m,
       dpmpp-3m, unipc) the paper's weights, the exact integrals of the Lagrange interpolant on
       the solver's own order pattern (UniPC's corrector not modelled, as in the paper);
       "solver": the solver's exact weights (every identity; UniPC with its corrector, DPM-Solver++'s
       second-order form). Other solvers (heun, ipndm) always use their own. Measured on
       gmm-digits "paper" gives better grids (README).
    corrector: with ``weights: paper``, for solvers whose first step corrects (unipc): "first"
       (default) weighs the first step as the solver takes it (UniC-1: bh2's trapezoid, D_0 and D_1
       half the first-order weight each; ``bound.solver_first_step``), the later steps by the paper's
       predictor weights; "none": the paper's treatment, the predictor's weights in every step (the
       corrector not modelled). Measured on gmm-digits (README): "first" beats every unipc bh2
       baseline at NFE 5, 6, 8, 10, "none" loses at NFE 5 and 6. Grids from pure noise (flow) keep
       the predictor's weights either way (measured worse with the corrected first steps).
    last_node: with ``final_step: denoise``, whether the last evaluated node is a variable of the bound
       ("free") or the model's sigma_min ("sigma_min", the bound before this option). "auto" (default):
       free for models that sample from pure noise (flow: their pipelines end with the denoise, and
       there the free node beats the pinned one for every solver and NFE measured), sigma_min
       otherwise (on gmm-digits the free node helps euler but costs dpmpp-2m/3m and unipc: README).
       Without a final denoise the last node is always sigma_min.
    denoise_carry: how the free-node bound carries the state error through the final denoise
       (``bound.FinalDenoise``): "linear" (default), the paper's bound for the N steps followed by a
       first-order step to sigma_min; "data", the exact error propagation for Gaussian data of
       standard deviation ``sigma_data`` through the ODE and D (measured worse on gmm-digits-flow).
    sigma_data: the data standard deviation of ``denoise_carry: data``.
    teacher_refine: after the bound (or the selection), start from the best of the bound's grid and
       every baseline by RMSE against the teacher on the selection's noises, and move the interior
       nodes to minimize that RMSE (L-BFGS through the solver, at most ``teacher_refine_iters``
       iterations; an extension beyond the paper, see ``trust_region.refine``).
    refine_starts: how many of the start candidates (the lowest by teacher RMSE first) are refined;
       the lowest refined RMSE wins. The RMSE has several basins and the best start is not always
       in the best one (measured on gmm-digits, dpmpp-3m NFE 10: README); 1 (default) refines the
       best start only, a number at least the candidates' count refines every one.
    refine_pool: 0 (default): teacher_refine fits the ``select_n`` noises from ``select_seed``. Above
       ``select_n``: it fits ``select_n`` noises drawn from ``refine_pool`` seeds (from ``select_seed``)
       by stratified sampling (``stepopt.strata``): every pool seed is screened without a teacher
       (the bound's grid against itself with each step split in 4), the ``refine_tail`` x
       ``select_n`` seeds with the largest error are taken whole, the rest by a weighted uniform
       sample, so the heavy tail of the error is measured instead of sampled. Costs
       ``5 x refine_pool x steps`` extra network evaluations (no teacher).
    refine_tail: the share of the ``select_n`` noises taken from the top of the screen, in [0, 1)
       (0: a uniform sample of the pool; at least one noise always samples the rest).
    """

    p: float | Literal["paper"] = 2.5
    tau: Tau = "auto"
    init: Literal["auto", "logsnr", "time-uniform", "edm"] = "auto"
    min_gap: float = 0.05
    multistart: bool = True
    perturbed_starts: int = 2
    perturb: float = 0.2
    finalists: int = 2
    screen_maxiter: int = 40
    smoothing: tuple[float, ...] = (1e-3, 1e-5)
    screen: Literal["slsqp", "none"] = "slsqp"
    maxiter: int = 200
    refine_maxiter: int = 20
    ftol: float = 1e-14
    gtol: float = 1e-10
    xtol: float = 1e-10
    select: bool = False
    select_p: tuple[float, ...] = (1.0, 2.0, 2.5, 3.0)
    select_tau: tuple[Tau, ...] = ("auto", 3, "all")
    select_n: int = 32
    select_seed: int = 10_000
    select_rule: Literal["significant", "lowest"] = "significant"
    select_confirm: int = 512
    weights: Literal["paper", "solver"] = "paper"
    corrector: Literal["first", "none"] = "first"
    last_node: Literal["auto", "free", "sigma_min"] = "auto"
    sigma_data: float = 1.0
    denoise_carry: Literal["linear", "data"] = "linear"
    teacher_refine: bool = False
    teacher_refine_iters: int = 100
    refine_starts: int = 1
    refine_pool: int = 0
    refine_tail: float = 0.5
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        for p in (self.p, *self.select_p):
            if p != "paper" and not (isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0):
                raise ValueError(f"p must be 'paper' or a number > 0, got {p!r}")
        for tau in (self.tau, *self.select_tau):
            if tau not in ("auto", "paper", "all") and not (
                isinstance(tau, int) and not isinstance(tau, bool) and tau >= 0
            ):
                raise ValueError(f"tau must be 'auto', 'paper', 'all' or an integer >= 0, got {tau!r}")
        if not self.min_gap > 0:
            raise ValueError(f"min_gap must be > 0 (in lam), got {self.min_gap!r}")
        if self.perturbed_starts < 0 or not self.perturb >= 0 or self.finalists < 1 or self.screen_maxiter < 1:
            raise ValueError("perturbed_starts and perturb must be >= 0, finalists and screen_maxiter >= 1")
        if not self.smoothing or any(not m > 0 for m in self.smoothing):
            raise ValueError(f"smoothing must be a non-empty list of numbers > 0, got {list(self.smoothing)!r}")
        if self.maxiter < 1 or self.refine_maxiter < 1 or not (self.ftol > 0 and self.gtol > 0 and self.xtol > 0):
            raise ValueError("maxiter and refine_maxiter must be >= 1 and ftol, gtol, xtol > 0")
        if not self.select_p or not self.select_tau:
            raise ValueError("select_p and select_tau must not be empty")
        if self.weights not in ("paper", "solver"):
            raise ValueError(f"weights must be 'paper' or 'solver', got {self.weights!r}")
        if self.corrector not in ("first", "none"):
            raise ValueError(f"corrector must be 'first' or 'none', got {self.corrector!r}")
        if self.last_node not in ("auto", "free", "sigma_min"):
            raise ValueError(f"last_node must be 'auto', 'free' or 'sigma_min', got {self.last_node!r}")
        if self.denoise_carry not in ("linear", "data"):
            raise ValueError(f"denoise_carry must be 'linear' or 'data', got {self.denoise_carry!r}")
        if not (isinstance(self.sigma_data, (int, float)) and self.sigma_data > 0):
            raise ValueError(f"sigma_data must be a number > 0 (inf: a = 1), got {self.sigma_data!r}")
        if self.teacher_refine_iters < 1:
            raise ValueError(f"teacher_refine_iters must be >= 1, got {self.teacher_refine_iters}")
        if self.select_rule not in ("significant", "lowest"):
            raise ValueError(f"select_rule must be 'significant' or 'lowest', got {self.select_rule!r}")
        if self.select_confirm != 0 and self.select_confirm < 2:
            raise ValueError(f"select_confirm must be 0 (no confirmation) or >= 2 noises, got {self.select_confirm}")
        if self.select_n < 1:
            raise ValueError(f"select_n must be >= 1, got {self.select_n}")
        if self.refine_starts < 1:
            raise ValueError(f"refine_starts must be >= 1, got {self.refine_starts}")
        if self.refine_pool != 0 and self.refine_pool <= self.select_n:
            raise ValueError(
                f"refine_pool must be 0 (off) or more than select_n ({self.select_n}), got {self.refine_pool}"
            )
        if not 0.0 <= self.refine_tail < 1.0:
            raise ValueError(f"refine_tail must be in [0, 1), got {self.refine_tail}")
