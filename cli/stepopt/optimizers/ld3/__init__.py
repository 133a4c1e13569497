"""ld3: learn the time steps by backpropagating through the few-step solver.

Tong, Liu, Hoang, Van den Broeck, Niepert, "Learning to Discretize Denoising Diffusion ODEs",
ICLR 2025 (arXiv 2405.15506). A student (the target solver on a learnable grid) is trained to land
where a teacher (the exact ODE for analytic models, a many-step solver for networks) lands from the
same noise; the gradient flows through every solver step and network call into the grid.

**Grid.** N+1 logits theta (equal at the start): the cumulated ``softmax(theta)``
``c_0 < ... < c_N`` is normalised, ``u_i = (c_i - c_0) / (c_N - c_0)`` (so the first logit cancels:
the increments are ``softmax(theta)_{1..N}`` up to a factor), and mapped affinely onto the grid
coordinate ``s_i = s_0 + u_i (s_N - s_0)``; both ends are fixed at the model's sigma_max and
sigma_min, except with ``final_step: denoise`` (``last_node: free``, default): then theta has one more
logit, the gap between the last node and sigma_min that the final denoise skips, so the terminal node
is learned like the others. The coordinate is ``lam = -log sigma`` for pixel-space models and normalised native
time ``(t_max - t) / (t_max - t_min)`` for latent models, as in the paper's two modes. Models that
start from pure noise (flow models, sigma_max = inf) use native time too (t = 1 is finite there; lam
is not): the grid begins at ``inf``, the student starts from the noise itself (the noise-scaled state;
README: Conventions) and the teacher is the exact ODE (or the teacher solver) from pure noise. The paper
starts from equal logits (uniform lam / uniform time: ``init: uniform``); by default stepopt starts
from whichever of that grid, the hand-crafted baselines and the trust-region schedule has the
lowest validation loss (``init: best``), or from a given schedule (``--init FILE``): on gmm-digits
the uniform-lam start lands in a poor local minimum for some seeds (see scripts/bench_ld3.py).

**Decoupled model time** (the paper's decoupled, "shifted" model timesteps). N+1 offsets xi (zero
at the start and always zero at both ends) shift the time fed to the network, ``s'_i = s_i +
clip(xi_i, -m, m)``, while the solver's coefficients use the plain grid; ``m = window * min_i
(s_{i+1} - s_i)`` is half the smallest gap *of the grid* in the same coordinate. (The authors' code
clamps with the gaps between the raw logits, which are all zero at the start, so xi cannot move
until the logits separate: a bug that stepopt does not reproduce.) The schedule stores
``sigma(s'_i)`` as ``model_sigmas``.

**Network time.** A network trained at integer timesteps (a diffusers DDPM model) rounds its
timestep when sampling, and a rounded time has no derivative: the grid and ``xi`` would feel the
network's time dependence only through the input scaling. The student is therefore trained through
the model's :meth:`~stepopt.models.base.DiffusionModel.differentiable_time` twin (the same weights,
the time embedding evaluated at the fractional timestep), while validation -- which grid is kept,
every reported number -- runs the model as it samples. The report's ``time_gradient`` records the
path (``fractional-timestep``; ``none`` for a learned embedding table, which is also logged).

**Soft teacher loss** (the paper's relaxed, soft surrogate objective). For each training pair
``(x_T, Psi*(x_T))``, ``min over x'_T in B(x_T, r) of d(Psi_theta(x'_T), Psi*(x_T))`` with the
radius ``r = gamma D / N^2`` (gamma = 0.001, D the data dimension) on unit-variance noise (before
the factor sigma_max). One iteration on a batch (2 pairs): forward the student from the relaxed
noises with autograd, one backward to (theta, xi, x'_T); gradients of theta and of xi clipped to
norm 1; RMSprop on theta (lr 0.005, momentum 0.9), SGD on xi (lr 0.1/N in lam, 0.001/N in
normalised time) -- only after ``grid_rounds`` theta-only rounds, as the reference trainer does;
SGD on x'_T (lr 12/N), projected back onto the ball and kept for a pair only where it lowers that
pair's loss. ``soft: false`` is the hard loss (x'_T = x_T). After each iteration the validation
pairs are scored **from their original noise** with the current grid (the reference trainer also
relaxes the validation noises and scores those; stepopt validates what a user will get); the best
grid is kept,
``patience`` iterations without improvement restore it and decay the learning rates (x
``lr_decay``), each round starts from the best grid, and training stops after ``grid_rounds +
joint_rounds`` passes over the training pairs or when the learning rate has sat at its minimum
``min_lr_patience`` times. The validated start is a candidate, so the result is never worse than
the start on the validation pairs.

**keep_best** (an extension beyond the paper). The pairs that train and choose the grid can be too
few to see what it costs: on a network a few percent of the noises end on another mode (a digit of
``builtin:unet-digits``) than the teacher's, the squared error of those seeds is a large share of the
mean, and which seeds switch changes discontinuously with the grid. The per-pair gradient does not
see a seed cross that boundary (only one already across it), and 50 validation pairs hold about one
such seed, so a grid that switches more seeds can look much better on the validation pairs and be
worse on the population (README: "LD3 on a network's tail"). After training, ``keep_best`` therefore
scores the learned grid, its start and every baseline start on ``check_pairs`` teacher pairs that
took no part in training or validation (seeds ``data_seed + n_train + n_valid + i``; teacher cached
per seed like the others, so every solver and NFE of a model shares it) and returns the one with the
lowest mean distance (``lowest``; the learned grid wins ties), or replaces the learned grid only when
a paired bootstrap puts a candidate's relative change entirely below 0 (``significant``, the rule of
gits / oss), or returns the learned grid (``off``, the paper). ``report.keep_best`` records the rule,
the pairs, every candidate's mean and the decision; with a replaced grid ``objective.final`` is the
returned grid's validation loss (which may then lie above ``initial``). The training itself is
unchanged, so a resumed run may change these two options.

The relaxed-noise rate ``lr_noise`` decays (x ``noise_lr_decay``) after a round in which no noise
moved: by default no training pair's relaxed noise was accepted (``noise_lr_rule: accepted``); the
reference trainer instead relaxes each validation pair's noise by one step after the round, the grid
fixed, and decays when none of those moved (``noise_lr_rule: reference``; those noises serve only
this signal). On gmm-digits the two rules never differ (README).

**Distance d**: ``l2`` (mean squared difference per sample; default), ``lpips`` (the paper's
choice; needs user-given VGG16 and LPIPS weights, never downloaded; on a model with a VAE decoder,
a latent model, both states are decoded first, the student's differentiably) or ``features`` (the
digits classifier of FID-digits); see :mod:`stepopt.optimizers.ld3.losses`. The reported objective
is the validation mean of d from the original noise.

**Presets**: ``preset: paper`` (``paper-sd`` for Stable Diffusion) sets the paper's teacher, LPIPS,
the uniform start and the reference's noise-rate rule under any explicitly given option
(:class:`~stepopt.optimizers.ld3.config.Ld3Config`; README: the table of departures).

**Teacher** (the paper's setup): ``n_train + n_valid`` pairs (50/50) from seeds ``data_seed,
data_seed+1, ...`` via :class:`stepopt.teacher.GridValidator` (exact ODE for analytic models; for
networks the ``teacher`` solver, cached on disk: Heun with 100 steps by default, the paper's UniPC
with 20 steps under ``preset: paper``). A conditional model (several prompts) gives pair i
the condition of its seed (prompt ``seed mod P``) in training, validation and the teacher alike.
With ``final_step: denoise`` the target is the teacher's state at sigma_min passed through the same
final denoising jump. The report also gives
``validation_rmse``: the RMSE of the learned grid against the teacher on the validation pairs, the
measure trust-region ``select`` and AYS's stopping use.

**Memory**: ``checkpoint`` wraps each network call in :func:`torch.utils.checkpoint.checkpoint`
(activations recomputed in the backward), so memory does not grow with the NFE. ``auto`` does so for
networks whose samples have at least 1024 elements; for smaller ones (unet-digits' 64) the activations
of N calls on 2 pairs are a few megabytes and the recomputation only costs time (a third of the
training); such small samples on the CPU also train on one thread (``report.training_threads``): a
batch-2 forward is too small to share out. The teachers and the keep_best check run
``check_batch_size`` pairs per forward (``auto``: up to 512 for small samples) on every thread, in
batches side by side where the model allows it (:mod:`stepopt.batches`): there LD3 evaluates
thousands of pairs. (A teacher's float sums can differ in the last bits between thread settings --
how its pairs are batched -- and the learned grid with them.)

**Robustness**: with ``ctx.state_path`` the full training state (see
:mod:`stepopt.optimizers.ld3.state`) is written atomically after each round and when training stops;
``ctx.resume`` continues from it exactly (the result equals an uninterrupted run with the same seed).
A non-finite loss, gradient or parameter stops the run with a :class:`StepoptError` naming the
iteration and the first solver step whose state was not finite.

**Modules**: :mod:`~stepopt.optimizers.ld3.config` (the options), :mod:`~stepopt.optimizers.ld3.grid`
(the parameterization), :mod:`~stepopt.optimizers.ld3.trainer` (the training loop),
:mod:`~stepopt.optimizers.ld3.losses` (the distances) and :mod:`~stepopt.optimizers.ld3.state`
(the resumable state).
"""

from __future__ import annotations

from stepopt.optimizers import OptimizeContext, OptimizeResult, OptimizerSpec, register
from stepopt.optimizers.ld3.config import Ld3Config
from stepopt.optimizers.ld3.grid import (
    GridSpace,
    clamped_offsets,
    grid_coordinates,
    grid_space,
    ld3_grid,
    params_from_sigmas,
)
from stepopt.optimizers.ld3.trainer import Recompute, Trainer

__all__ = [
    "GridSpace",
    "Ld3Config",
    "Recompute",
    "Trainer",
    "clamped_offsets",
    "grid_coordinates",
    "grid_space",
    "ld3_grid",
    "params_from_sigmas",
    "run",
]


def run(ctx: OptimizeContext, cfg: Ld3Config) -> OptimizeResult:
    """Train LD3's grid for ``ctx`` (see the module docstring)."""
    return Trainer(ctx, cfg).run()


SPEC = register(
    OptimizerSpec(
        name="ld3",
        config_cls=Ld3Config,
        run=run,
        takes_init=True,
        resumable=True,
    )
)
