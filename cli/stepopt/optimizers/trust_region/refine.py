"""Teacher-driven refinement of a grid (``teacher_refine: true``): an extension beyond the paper.

The bound of Xue et al. 2024 is a model-free surrogate: its error model ``sigma^p/alpha`` is the
same for every network, and on a given model its minimizer can be worse than a simple baseline
(measured for ``unipc`` on gmm-digits at NFE 6: README). This stage measures instead of
modelling: among the bound's minimizer and every baseline the one with the lowest RMSE against the
teacher on the validator's noises is the start, and the N-1 interior lam's are then moved to
minimize that RMSE, by L-BFGS (strong Wolfe line search) with the gradient backpropagated through
the solver (and through the network's time: :meth:`~stepopt.models.base.DiffusionModel.differentiable_time`).

Parameterization: the N gaps of the fixed interval ``[lam_start, lam_end]`` as a softmax of N free
numbers, so every iterate is an increasing grid with the model's endpoints (from pure noise,
``lam_start = -inf``: the N-1 finite gaps as exponentials, lam_1 free); a gap below
``min_gap`` is never produced by the start and rarely approached. With ``final_step: denoise`` the
last node is free as well (``free_end_at``: one more gap, between lam_N and the model's sigma_min,
which the denoise skips). The result replaces the start
only when its teacher RMSE is lower (so it is never worse than the bound's minimizer or a
baseline on those noises). The teacher noises are the selection's (``select_n`` seeds from
``select_seed``), disjoint from the seeds stepopt's evaluations use by default (0, 1, ...), or with
``refine_pool`` a stratified sample of that many seeds (:mod:`stepopt.strata`: the worst of the pool
by a teacher-free screen taken whole, the rest sampled and weighted), whose weighted RMSE is then the
objective. ``refine_starts`` refines several start candidates and keeps the lowest result: the RMSE
has several basins, and the best start is not always in the best one.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from stepopt._lazy import lazy_module
from stepopt.sampling import slice_cond
from stepopt.solvers import solve

torch = lazy_module("torch")


def _lam_of(z: Any, lam_start: float, lam_end: float, free_end: bool = False) -> Any:
    """The N+1 lam's of the parameters ``z``; ``free_end``: the last entry of z is the gap between
    lam_N and lam_end that the final denoise skips (dropped from the grid)."""
    if lam_start == -math.inf:
        # From pure noise: z are the logs of the N-1 finite gaps, lam_1 = lam_end - their sum.
        back = torch.flip(torch.cumsum(torch.flip(torch.exp(z), [0]), 0), [0])
        finite = torch.cat([lam_end - back, torch.full((1,), lam_end, dtype=z.dtype)])
        lam = torch.cat([torch.full((1,), -math.inf, dtype=z.dtype), finite])
    else:
        g = torch.softmax(z, 0)
        frac = torch.cat([torch.zeros(1, dtype=z.dtype), torch.cumsum(g, 0)])
        lam = lam_start + frac * (lam_end - lam_start)
    return lam[:-1] if free_end else lam


def _z_of(lam: np.ndarray, lam_end: float | None = None) -> Any:
    """The free parameters of :func:`_lam_of` for an increasing grid ``lam`` (``lam_end``: its free end's
    bound; a last node at lam_end gets the skipped gap :data:`FREE_END_GAP`)."""
    if lam_end is not None:
        lam = np.concatenate([lam, [max(lam_end, lam[-1] + FREE_END_GAP)]])
    gaps = np.diff(lam[1:]) if lam[0] == -math.inf else np.diff(lam)
    return torch.log(torch.as_tensor(gaps))


# The gap (in lam) below a free last node that starts at sigma_min: the parameters are log gaps, so a
# zero gap could not move (0.1 in lam: sigma_N = 1.105 sigma_min, which changes no error measurably).
FREE_END_GAP = 0.1

# The loss reported to L-BFGS at a point whose loss or gradient is not finite, relative to the start's.
PENALTY = 1e6


def refine_grid(
    validator: Any, lam0: np.ndarray, maxiter: int, free_end_at: float | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Minimize the validator's RMSE (weighted by its ``weights`` when set) over the interior of
    ``lam0`` (N+1 increasing lam's).

    ``free_end_at``: the last node is free too, at most this lam (the model's sigma_min; the
    validator's ``final_step`` is then ``denoise``). Returns the refined grid (or ``lam0`` if nothing
    better was found) and a report (``rmse_start``, ``rmse``, ``iterations``, ``evals``, ``seconds``,
    ``non_finite``: trial points whose loss or gradient was not finite, each given a penalty loss
    of :data:`PENALTY` x the start's and no gradient). The grid is the best iterate seen, not the last.
    """
    t0 = time.perf_counter()
    lam0 = np.asarray(lam0, dtype=np.float64)
    free_end = free_end_at is not None
    lam_start = float(lam0[0])
    lam_end = float(free_end_at) if free_end_at is not None else float(lam0[-1])
    x_all, y_all = validator.x_t, validator.targets.to(torch.float64)
    n_rows = x_all.shape[0]
    # Each seed's share of the loss: 1/n, or its weight (stratified noises: ``stepopt.strata``).
    weights = getattr(validator, "weights", None)
    w_all = torch.full((n_rows,), 1.0, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
    w_all = (w_all / w_all.sum()).to(x_all.device)
    per_row = y_all[0].numel()
    net, solver, final_step = validator.model, validator.solver, validator.final_step
    # The minimizing runs through the network's differentiable time (a fractional timestep for models
    # trained at integer ones); the start and the result are scored as the model samples.
    grad_net = net.differentiable_time()
    bs = validator.batch_size
    evals = [0]

    def counted(x: Any, sigma: Any, **cond: Any) -> Any:
        evals[0] += x.shape[0]
        return (grad_net if torch.is_grad_enabled() else net)(x, sigma, **cond)

    def run_loss(z: Any, grad: bool, lam: Any = None) -> float:
        total = 0.0
        if lam is None:
            lam = _lam_of(z, lam_start, lam_end, free_end)
        sig = torch.exp(-lam).to(x_all.device)
        for start in range(0, n_rows, bs):
            stop = min(start + bs, n_rows)
            cond = slice_cond(validator.cond, start, stop, n_rows)
            with torch.set_grad_enabled(grad):
                out = solve(solver, counted, x_all[start:stop], sig, cond=cond, final_step=final_step)
                sq = ((out.to(torch.float64) - y_all[start:stop]) ** 2).reshape(stop - start, -1).sum(1)
                part = (w_all[start:stop] * sq).sum() / per_row
                if grad:
                    part.backward(retain_graph=stop < n_rows)
            total += float(part.detach())
        return total

    def loss_of(lam: np.ndarray) -> float:
        """The loss of a given grid (no parameters, no gradient)."""
        return run_loss(None, False, torch.as_tensor(lam))

    z = _z_of(lam0, lam_end if free_end else None).clone().requires_grad_(True)
    if z.numel() == 0:  # one step from pure noise: nothing to move
        rmse = math.sqrt(loss_of(lam0))
        return lam0.copy(), {
            "rmse_start": rmse,
            "rmse": rmse,
            "accepted": False,
            "iterations": 0,
            "non_finite": 0,
            "evals": 0,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    start_loss = loss_of(lam0)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=int(maxiter),
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )
    # The lowest loss seen and its parameters: L-BFGS's last iterate is not always its best (a line
    # search can end on a worse point), and a long trial step can collapse gaps until the solver's
    # step ratios overflow (NaN). Such a point gets a finite penalty and no gradient, so the strong
    # Wolfe search backs off instead of carrying the NaN into every later iterate (measured: dpmpp-3m
    # NFE 10 on 4096 gmm-digits noises lost its whole progress, RMSE 0.0285 -> NaN -> the start's 0.0455).
    best: dict[str, Any] = {"loss": start_loss, "z": None}
    penalty = PENALTY * max(start_loss, 1e-30)
    non_finite = [0]

    def closure() -> Any:
        opt.zero_grad()
        loss = run_loss(z, True)
        grad = z.grad
        if not math.isfinite(loss) or grad is None or not bool(torch.isfinite(grad).all()):
            non_finite[0] += 1
            z.grad = torch.zeros_like(z)
            return torch.as_tensor(penalty, dtype=torch.float64)
        if loss < best["loss"]:
            best["loss"], best["z"] = loss, z.detach().clone()
        return torch.as_tensor(loss, dtype=torch.float64)

    opt.step(closure)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    z_best = best["z"] if best["z"] is not None else z.detach()
    with torch.no_grad():
        lam = _lam_of(z_best, lam_start, lam_end, free_end).cpu().numpy()
    lam[0] = lam_start
    lam[-1] = min(lam[-1], lam_end) if free_end else lam_end
    loss = loss_of(lam) if np.all(np.diff(lam) > 0) else math.inf
    better = math.isfinite(loss) and loss < start_loss
    report = {
        "rmse_start": math.sqrt(start_loss),
        "rmse": math.sqrt(loss if better else start_loss),
        "accepted": bool(better),
        "iterations": iters,
        "non_finite": non_finite[0],
        "evals": int(evals[0]),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return (lam if better else lam0.copy()), report
