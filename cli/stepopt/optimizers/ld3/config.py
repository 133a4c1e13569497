"""LD3's options (see :mod:`stepopt.optimizers.ld3` for the method)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from stepopt.teacher import TeacherConfig

BASELINE_STARTS = ("logsnr", "edm", "time-uniform", "time-quadratic", "kl-optimal")
# Config keys that do not change the trajectory of a run: a resumed run may change them (keep_best and
# check_pairs act after training).
RESUMABLE_CHANGES = ("max_iterations", "checkpoint", "keep_best", "check_pairs", "check_batch_size")
KEEP_BEST_RULES = ("lowest", "significant", "off")

# The teachers of the LD3 reference code (github.com/vinhsuhi/LD3): scripts/gen_data.sh and its
# configs/*.yml generate the training pairs of CIFAR-10 / AFHQv2 / FFHQ and of the LSUN / ImageNet
# latent-diffusion models with UniPC, 20 steps, ``skip_type edm`` (order 3 from the configs), and
# those of Stable Diffusion with UniPC order 2 (configs/stable_diff_v1-5.yml) on a time-uniform grid
# with 5 steps (scripts/gen_data.sh) or 6 (the README's example).
PAPER_TEACHER = {"solver": "unipc", "order": 3, "steps": 20, "grid": "edm", "rho": 7.0}
PAPER_SD_TEACHER = {"solver": "unipc", "order": 2, "steps": 6, "grid": "time-uniform", "rho": 7.0}
# configs/stable_diff_v1-5.yml: 25 + 25 pairs, batch 1, 2 + 3 rounds (CIFAR-10's are stepopt's defaults).
PAPER_SD_SIZES = {"n_train": 25, "n_valid": 25, "batch_size": 1, "joint_rounds": 3}


@dataclass(frozen=True)
class Ld3Config:
    """Options of LD3 (see configs/ld3.yaml and the README's table of departures from the paper).

    preset: ``stepopt`` (the defaults below), ``paper`` (the paper's teacher for pixel-space and
       unconditional latent models -- UniPC order 3, 20 steps, EDM rho=7 grid -- its LPIPS loss, its
       uniform start, the reference trainer's ``noise_lr_rule`` and no ``keep_best``), ``paper-sd`` (the same with the
       reference's Stable Diffusion teacher -- UniPC order 2, 6 steps, time-uniform -- and its
       Stable Diffusion sizes: 25 + 25 pairs, batch 1, 2 + 3 rounds). A preset is
       applied when the options are resolved (:func:`stepopt.config.resolve_config`: configs,
       ``--set``, :func:`stepopt.optimize`'s keywords), under every key given explicitly; the config
       records the resolved values.
    loss: l2 | lpips | features (see :mod:`stepopt.optimizers.ld3.losses`); lpips needs
       ``vgg_weights`` and ``lpips_weights`` (paths; nothing is downloaded); ``lpips_resize``: the
       shorter image side LPIPS sees (smaller images are upsampled).
    n_train / n_valid: teacher pairs for training and validation, seeds ``data_seed + i``.
    batch_size: training pairs per iteration; valid_batch_size: pairs per validation (and teacher) forward.
    space: auto | lam | time: the coordinate of the grid (auto: time for models with a true
       ``latent`` attribute and for models that start from pure noise, sigma_max = inf, e.g. flow
       models, where lam has no finite end; else lam). init: the start grid: ``uniform`` in that coordinate (the
       paper's start), a baseline kind, ``trust-region`` (that optimizer's schedule for the same
       solver and NFE), or ``best``: whichever of uniform, the baselines and trust-region (where it
       supports the solver) has the lowest validation loss -- an extension (the reference code can
       likewise start from a prior schedule). An explicit ``--init FILE`` schedule overrides it.
    last_node: with ``final_step: denoise``, ``free`` (default): the last evaluated node is a parameter
       (one more logit, the gap to sigma_min that the denoise skips), so that evaluation is a real
       step; ``sigma_min``: pinned there (the grid before this option). Starts (``init: best``) then
       also include each baseline's N+1-step grid without its last point and, on flow models, the
       pipeline default.
    decouple: learn the decoupled model time xi; window: its clamp as a fraction of the smallest gap.
    soft / gamma: the soft loss and its ball radius ``gamma * D / N^2`` (soft: false = hard loss).
    lr_theta, momentum_theta: RMSprop on the logits; lr_xi: SGD on xi ("auto": 0.1/N in lam,
       0.001/N in normalised time); lr_noise: SGD on the relaxed noise ("auto": 12/N).
    clip_grad: gradient-norm clip of theta and of xi (each).
    grid_rounds: rounds training theta only; joint_rounds: rounds training theta and xi.
    patience, lr_decay, min_lr_theta, min_lr_xi, min_lr_patience: validation-based decay and early
       stop; noise_lr_decay: factor on lr_noise after a round in which no relaxed noise moved.
    noise_lr_rule: which noises' movement decides that decay: ``accepted`` (the training pairs'
       relaxed noises, as they are updated during the round) or ``reference`` (the reference
       trainer's: after the round, one projected SGD step on each validation pair's own relaxed
       noise with the grid fixed, kept where it lowers that pair's loss; decay when none moved.
       Those validation noises serve only this signal: validation still scores the original noise).
    max_iterations: stop after this many iterations (a budget; a resumed run may raise it).
    keep_best: after training, the learned grid is compared with its start and every baseline start
       (:meth:`Trainer.start_grids`) by the mean distance to the teacher on the check pairs: ``lowest``
       (default): the lowest mean is returned (the learned grid wins ties); ``significant``: a baseline
       replaces the learned grid only when :func:`stepopt.stats.paired_bootstrap` puts its relative
       change entirely below 0 (as gits / oss); ``off``: the learned grid. ``true`` / ``false`` read as
       ``lowest`` / ``off``. An extension beyond the paper (README: "LD3 on a network's tail").
    check_pairs: the teacher pairs keep_best decides on, separate from training and validation
       (seeds ``data_seed + n_train + n_valid + i``; their teacher is cached like the others); 0: the
       validation pairs, which chose the learned grid among the iterates and so favour it.
    check_batch_size: pairs per forward in the keep_best check and in every teacher computation
       (``auto``: ``valid_batch_size``, raised to ``min(512, 32768 // D)`` for networks whose samples
       have D elements -- not for analytic models, whose exact ODE integrates a batch as one system;
       results do not depend on it beyond float rounding). A network's throughput on CPU grows with
       the batch: unet-digits' Heun teacher runs 2.3x faster at 512 than at 50.
    checkpoint: recompute each network call in the backward (``auto``: for networks whose samples
       have at least 1024 elements -- images from 32x32 up, latents; below that the activations of
       N calls at ``batch_size`` take a few megabytes and recomputing them only costs time:
       unet-digits dpmpp-3m NFE 5 trains in 54 s instead of 73-97 s).
    teacher: the many-step teacher for networks (analytic models use the exact ODE).
    """

    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "stepopt": {},
        "paper": {
            "loss": "lpips",
            "init": "uniform",
            "noise_lr_rule": "reference",
            "teacher": PAPER_TEACHER,
            "keep_best": "off",
        },
        "paper-sd": {
            "loss": "lpips",
            "init": "uniform",
            "noise_lr_rule": "reference",
            "teacher": PAPER_SD_TEACHER,
            "keep_best": "off",
            **PAPER_SD_SIZES,
        },
    }

    preset: Literal["stepopt", "paper", "paper-sd"] = "stepopt"
    loss: Literal["l2", "lpips", "features"] = "l2"
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    lpips_resize: int = 32
    n_train: int = 50
    n_valid: int = 50
    data_seed: int = 2_000_000
    batch_size: int = 2
    valid_batch_size: int = 50
    space: Literal["auto", "lam", "time"] = "auto"
    last_node: Literal["free", "sigma_min"] = "free"
    init: Literal[
        "best", "uniform", "logsnr", "edm", "time-uniform", "time-quadratic", "kl-optimal", "trust-region"
    ] = "best"
    decouple: bool = True
    window: float = 0.5
    soft: bool = True
    gamma: float = 0.001
    lr_theta: float = 0.005
    momentum_theta: float = 0.9
    lr_xi: float | Literal["auto"] = "auto"
    lr_noise: float | Literal["auto"] = "auto"
    clip_grad: float = 1.0
    grid_rounds: int = 2
    joint_rounds: int = 5
    patience: int = 5
    lr_decay: float = 0.8
    min_lr_theta: float = 5e-5
    min_lr_xi: float = 1e-6
    min_lr_patience: int = 5
    noise_lr_decay: float = 0.5
    noise_lr_rule: Literal["accepted", "reference"] = "accepted"
    max_iterations: int | None = None
    keep_best: bool | Literal["lowest", "significant", "off"] = "lowest"
    check_pairs: int = 2048
    check_batch_size: int | Literal["auto"] = "auto"
    checkpoint: bool | Literal["auto"] = "auto"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def departures(self, exact_teacher: bool) -> list[str]:
        """Where this configuration departs from the paper's setting (``paper``, or ``paper-sd`` when that
        is the preset), one line each, plus what stepopt always does differently from the reference code.
        ``exact_teacher``: the model's teacher is its exact ODE (the ``teacher`` option does not apply)."""
        paper = self.PRESETS["paper-sd" if self.preset == "paper-sd" else "paper"]
        out = []
        for key, want in paper.items():
            have = getattr(self, key)
            if key == "teacher":
                if exact_teacher:
                    continue
                have = have.to_dict()
                if all(have.get(k) == v for k, v in want.items()):
                    continue
            elif have == want:
                continue
            out.append(f"{key}: {have!r} (paper: {want!r})")
        return [
            *out,
            "validation scores the original noise (reference: the relaxed validation noises)",
            "xi clamp: half the smallest gap of the grid (reference: of the raw logits)",
        ]

    def __post_init__(self) -> None:
        if isinstance(self.keep_best, bool):
            object.__setattr__(self, "keep_best", "lowest" if self.keep_best else "off")
        if self.keep_best not in KEEP_BEST_RULES:
            raise ValueError(
                f"keep_best must be one of {', '.join(KEEP_BEST_RULES)} (or true/false), got {self.keep_best!r}"
            )
        if isinstance(self.check_pairs, bool) or not isinstance(self.check_pairs, int) or self.check_pairs < 0:
            raise ValueError(f"check_pairs must be an integer >= 0, got {self.check_pairs!r}")
        if self.last_node not in ("free", "sigma_min"):
            raise ValueError(f"last_node must be 'free' or 'sigma_min', got {self.last_node!r}")
        if self.n_train < 1 or self.n_valid < 1:
            raise ValueError("n_train and n_valid must be >= 1")
        cbs = self.check_batch_size
        if cbs != "auto" and (isinstance(cbs, bool) or not isinstance(cbs, int) or cbs < 1):
            raise ValueError(f"check_batch_size must be 'auto' or an integer >= 1, got {cbs!r}")
        if self.batch_size < 1 or self.valid_batch_size < 1:
            raise ValueError("batch_size and valid_batch_size must be >= 1")
        if not 0 < self.window <= 0.5:
            raise ValueError(f"window must be in (0, 0.5] (the offsets must not cross a neighbour), got {self.window}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        for name in ("lr_theta", "clip_grad", "min_lr_theta", "min_lr_xi"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_xi", "lr_noise"):
            v = getattr(self, name)
            if v != "auto" and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be 'auto' or a number >= 0, got {v!r}")
        if not 0 <= self.momentum_theta < 1:
            raise ValueError(f"momentum_theta must be in [0, 1), got {self.momentum_theta}")
        if not 0 < self.lr_decay <= 1 or not 0 < self.noise_lr_decay <= 1:
            raise ValueError("lr_decay and noise_lr_decay must be in (0, 1]")
        if self.grid_rounds < 0 or self.joint_rounds < 0 or self.grid_rounds + self.joint_rounds < 1:
            raise ValueError("grid_rounds and joint_rounds must be >= 0 with at least one round in all")
        if self.patience < 1 or self.min_lr_patience < 1:
            raise ValueError("patience and min_lr_patience must be >= 1")
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0 or null, got {self.max_iterations}")
        if self.teacher.steps < 2:
            raise ValueError(f"teacher steps must be >= 2, got {self.teacher.steps}")
