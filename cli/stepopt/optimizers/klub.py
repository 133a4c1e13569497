"""The KLUB estimator of Align Your Steps (Sabour, Fidler, Kreis; ICML 2024; arXiv 2404.14507).

**Objective** (paper Sec. 3, in the sigma frame where ``x_sigma = x0 + sigma eps``, i.e. EDM's
``sigma(t) = t, s(t) = 1``, so the reverse SDE has ``g^2 = 2 sigma`` and Girsanov gives ``sigma^-3``):
the Girsanov bound on the KL divergence between the true reverse SDE and stochastic DDIM whose
denoiser is frozen at the upper end ``u`` of each interval ``[l, u]`` of a grid,

    KLUB = sum over intervals [l, u] of  int_l^u sigma^-3 E || D(x_sigma, sigma) - D(x_u, u) ||^2 dsigma,

with ``x_u = x_sigma + sqrt(u^2 - sigma^2) eps2`` (the forward process), ``x0`` from a fixed data
subset. Moving one grid point changes only its two adjacent terms.

**Importance sampling** (paper appendix, Algorithm 2). For data ``N(mu, c^2 I)`` in ``d`` dimensions

    E || D(x_sigma, sigma) - D(x_u, u) ||^2 = d c^4 g(sigma),   g(sigma) = 1/(sigma^2+c^2) - 1/(u^2+c^2)

(derivation: ``D = mu + a(s) (x - mu)`` with ``a(s) = c^2/(c^2+s^2)``; the difference is
``(a(s)-a(u)) (y + s e1) - a(u) sqrt(u^2-s^2) e2`` and its expected square simplifies to the line
above). So sigma is drawn from ``pi(sigma) = sigma^-3 g(sigma) / Z`` on ``[l, u]`` and a sample
contributes ``Z ||dD||^2 / g(sigma)``; for Gaussian data with the proposal's ``c`` every sample has
the mean ``d c^4 Z``. The difference ``g`` is *not* squared (the paper's Eq. 13/15 square it; its
appendix and Algorithm 2 do not, and only the unsquared form matches the closed form above).

**Normalizer and sampling.** With ``q = c^2 / sigma^2`` an antiderivative of ``sigma^-3 g`` is

    H(sigma) = (log(1 + q) - q u^2 / (u^2 + c^2)) / (2 c^4),

(checked by differentiating: ``dH/dsigma = sigma^-3 g``), so ``Z = H(u) - H(l)`` and the CDF is
``(H(sigma) - H(l)) / Z`` in closed form. It is inverted numerically, by bisection on
``log sigma`` (64 halvings, i.e. to float64 resolution), vectorised over samples. ``H`` is
evaluated in the algebraically equal form ``(log1p(q) - q) + q c^2/(u^2+c^2)`` when ``q <= 1``
to avoid cancellation at large sigma.

**The top interval to sigma = inf** (models whose grids start from pure noise, ``sigma_max = inf``:
flow models). The interval ``[l, u]`` with ``u -> inf`` has a finite limit, which is what is
estimated; no finite sigma stands in for inf. (1) The frozen denoiser: in the noise-scaled state
``y = x / sigma`` (README, Conventions) ``x_u / u = x_sigma / u + sqrt(1 - sigma^2/u^2) eps2 -> eps2``,
so the upper end is ``D(eps2, inf)``, the denoiser at pure noise given the noise itself, and it is
independent of ``x_sigma = x0 + sigma eps1`` (their correlation ``sigma / u`` vanishes). (2) The
proposal's difference tends to ``g_inf(sigma) = 1/(sigma^2+c^2)`` and its antiderivative to
``H_inf(sigma) = (log(1 + q) - q) / (2 c^4)`` (``q = c^2/sigma^2``; check: ``dH_inf/dsigma =
sigma^-3/(sigma^2+c^2)``), with ``H_inf(inf) = 0``: ``Z_inf(l) = (q_l - log(1 + q_l)) / (2 c^4)``,
finite. So

    KLUB_top(l) = int_l^inf sigma^-3 E || D(x0 + sigma eps1, sigma) - D(eps2, inf) ||^2 dsigma,

estimated with samples ``sigma ~ sigma^-3 g_inf / Z_inf`` weighted ``Z_inf (sigma^2 + c^2)``. The
integrand is ``O(sigma^-3)`` (``||dD||^2`` stays bounded), so the term is finite for any denoiser; for
Gaussian data it is ``d c^4 Z_inf(l)``, the limit of the finite closed form. The inverse CDF is bisected
in log sigma on ``[log l, log S]`` with ``S = (4 (1 - U) Z_inf)^(-1/4)``: the tail mass above ``S`` is at
most ``int_S^inf sigma^-5 = 1/(4 S^4) = (1 - U) Z_inf``, so ``S`` brackets the sample exactly. The
finite-u estimate converges to this one sample by sample on common random numbers (tested).

**Common random numbers.** Candidates for one grid point are compared on the same data points,
the same ``eps1, eps2`` and the same uniforms. Two estimators of the candidates' two adjacent
terms are implemented:

* ``independent`` (the paper's way; the default of ``ays``'s ``estimator`` option): for each candidate ``v`` between the
  neighbours ``lo < v < hi``, draw ``sigma`` from its own ``pi`` on ``[lo, v]`` and on ``[v, hi]``
  (same uniforms for all candidates). The upper term draws ``x_hi`` first and ``x_sigma`` from the
  Brownian bridge, so ``D(x_hi, hi)`` is shared: ``3K + 1`` evaluations per sample.
* ``shared`` (candidate sharing, not in the paper): draw one sigma per sample from ``pi`` over the
  whole pair ``[lo, hi]`` and reweight it for every candidate; ``D(x_sigma, sigma)`` and
  ``D(x_hi, hi)`` are shared, so a sample costs ``2 + #{k : v_k > sigma}`` evaluations. Its
  weights are bounded (the lower term's ``g_v <= g_hi``), but on gmm-digits it needs ~4x fewer
  evaluations for ~25x the variance of the candidate differences, so it does not pay
  (``scripts/bench_ays.py``).

Every random number depends only on (seed, purpose, grid index, block of samples), never on
the network batch size, so estimates are reproducible across batch sizes and devices (and, under
``torchrun``, across world sizes: each rank runs its share of the blocks and the sums are reduced).

**Conditional models** (several prompts): every query of a data point uses that point's condition,
the one :meth:`~stepopt.models.base.DiffusionModel.cond_for_seeds` gives the seed equal to its row in
the whole data set (prompt ``row mod P``, the rule ``sample`` uses for seeds): a prompt file that lists
the data's captions in order pairs each image with its caption.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from stepopt import distributed
from stepopt.batches import batch_workers, imap_batches, split_for_workers
from stepopt.models.base import DiffusionModel

Mode = Literal["shared", "independent"]
Grid = Sequence[float] | np.ndarray  # a descending sigma grid

# Samples per block of random numbers: the unit of work whose noise has its own generator.
NOISE_BLOCK = 256
_BISECT_ITERS = 64


# -- the proposal pi(sigma) ∝ sigma^-3 (1/(sigma^2+c^2) - 1/(u^2+c^2)) on [l, u] ------------------
def _log1pmx(q: np.ndarray) -> np.ndarray:
    """``log(1 + q) - q`` without cancellation for small q (series below 0.01, error < 1e-20 relative)."""
    q = np.asarray(q, dtype=np.float64)
    out = np.log1p(q) - q
    small = np.abs(q) < 1e-2
    if np.any(small):
        qs = q[small]
        acc = np.zeros_like(qs)
        for k in range(10, 1, -1):  # -q^2/2 + q^3/3 - ... - q^10/10 (Horner from the top)
            acc = qs * acc + ((-1.0) ** (k + 1)) / k
        out[small] = acc * qs * qs
    return out


def _upper_fractions(u: np.ndarray, c2: float) -> tuple[np.ndarray, np.ndarray]:
    """``u^2/(u^2+c^2)`` and ``c^2/(u^2+c^2)``, with their limits 1 and 0 at ``u = inf``."""
    r = u * u + c2
    inf = np.isinf(u)
    with np.errstate(invalid="ignore"):
        return np.where(inf, 1.0, (u * u) / r), np.where(inf, 0.0, c2 / r)


def antiderivative(sigma: np.ndarray, u: np.ndarray, c: float) -> np.ndarray:
    """``H(sigma)`` with ``dH/dsigma = sigma^-3 (1/(sigma^2+c^2) - 1/(u^2+c^2))`` (``u = inf``: the limit ``H_inf``)."""
    s, u = np.broadcast_arrays(np.asarray(sigma, dtype=np.float64), np.asarray(u, dtype=np.float64))
    c2 = c * c
    q = c2 / (s * s)
    frac_u, frac_c = _upper_fractions(u, c2)
    big = q > 1.0
    h = np.empty(s.shape, dtype=np.float64)
    h[big] = np.log1p(q[big]) - q[big] * frac_u[big]
    h[~big] = _log1pmx(q[~big]) + q[~big] * frac_c[~big]
    return h / (2.0 * c2 * c2)


def normalizer(lo: np.ndarray | float, hi: np.ndarray | float, c: float) -> np.ndarray:
    """``Z = int_lo^hi sigma^-3 (1/(sigma^2+c^2) - 1/(hi^2+c^2)) dsigma`` (closed form)."""
    lo_a, hi_a = np.broadcast_arrays(np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))
    return antiderivative(hi_a, hi_a, c) - antiderivative(lo_a, hi_a, c)


def proposal_weight(sigma: np.ndarray, u: np.ndarray | float, c: float) -> np.ndarray:
    """The unnormalised proposal ``g(sigma) = 1/(sigma^2+c^2) - 1/(u^2+c^2)`` (not squared; at ``u = inf``
    its limit ``1/(sigma^2+c^2)``)."""
    s = np.asarray(sigma, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    c2 = c * c
    with np.errstate(invalid="ignore"):
        finite = (u * u - s * s) / ((s * s + c2) * (u * u + c2))
    return np.where(np.isinf(u), 1.0 / (s * s + c2), finite)


def proposal_density(sigma: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float, c: float) -> np.ndarray:
    """``pi(sigma)`` on ``[lo, hi]`` (0 outside)."""
    s = np.asarray(sigma, dtype=np.float64)
    lo_a = np.asarray(lo, dtype=np.float64)
    hi_a = np.asarray(hi, dtype=np.float64)
    dens = s**-3 * proposal_weight(s, hi_a, c) / normalizer(lo_a, hi_a, c)
    return np.where((s >= lo_a) & (s <= hi_a), dens, 0.0)


def sample_proposal(uniform: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float, c: float) -> np.ndarray:
    """Inverse-CDF samples of ``pi`` on ``[lo, hi]``: solve ``H(sigma) - H(lo) = U Z`` by bisection in log sigma."""
    uni = np.asarray(uniform, dtype=np.float64)
    lo_a, hi_a = (np.broadcast_to(np.asarray(v, dtype=np.float64), uni.shape) for v in (lo, hi))
    h_lo = antiderivative(lo_a, hi_a, c)
    z = antiderivative(hi_a, hi_a, c) - h_lo
    target = h_lo + uni * z
    a, b = np.log(lo_a).copy(), np.log(hi_a).copy()
    inf = np.isinf(hi_a)
    if np.any(inf):  # u = inf: the tail above S = (4 (1 - U) Z)^(-1/4) holds at most (1 - U) Z (module doc)
        with np.errstate(divide="ignore"):
            top = -0.25 * np.log(4.0 * np.maximum(1.0 - uni, np.finfo(np.float64).tiny) * z)
        b = np.where(inf, np.maximum(a, top), b)
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (a + b)
        below = antiderivative(np.exp(mid), hi_a, c) < target
        a = np.where(below, mid, a)
        b = np.where(below, b, mid)
    return np.clip(np.exp(0.5 * (a + b)), lo_a, hi_a)


# -- closed forms for isotropic Gaussian data -------------------------------------------------------
def gaussian_klub_terms(sigmas: Sequence[float], c: float, dim: int) -> np.ndarray:
    """Exact KLUB of each interval for data ``N(mu, c^2 I_dim)``: ``dim c^4 Z_c(l, u)`` (see module doc)."""
    s = np.asarray(sigmas, dtype=np.float64)
    return dim * c**4 * normalizer(s[1:], s[:-1], c)


# -- deterministic random numbers -------------------------------------------------------------------
def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) | (int(state[1]) << 32))


# -- batched network calls --------------------------------------------------------------------------
class Batcher:
    """Collects denoiser queries and evaluates them in batches of ``batch_size`` rows (no autograd).

    Each row carries the index of its data point; a conditional model gets each row the condition of
    that index (:meth:`~stepopt.models.base.DiffusionModel.cond_for_seeds`: prompt ``index mod P``).
    """

    def __init__(self, model: DiffusionModel, batch_size: int, device: torch.device) -> None:
        self.model = model
        self.batch_size = int(batch_size)
        self.device = device
        self.evals = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], None]]] = []
        self._rows = 0
        self.conditional = model.cond_for_seeds([0]) is not None

    def add(
        self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, done: Callable[[torch.Tensor], None]
    ) -> None:
        """Queue ``D(x, sigma)`` (x float64 on the device) for the data points ``rows``; ``done`` receives
        the float64 output."""
        self._pending.append((x, sigma, rows, done))
        self._rows += x.shape[0]
        if self._rows >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._rows = self._pending, [], 0
        xs = torch.cat([p[0] for p in pending])
        ss = torch.cat([p[1] for p in pending])
        rows = torch.cat([p[2] for p in pending]).tolist() if self.conditional else []
        # A small network's chunks run side by side on the CPU (stepopt.batches), e.g. 512 rows as 2 x 256.
        workers = batch_workers(self.model, self.device, xs.shape[0])
        size = split_for_workers(xs.shape[0], self.batch_size, workers)
        starts = list(range(0, xs.shape[0], size))

        def one(start: int) -> torch.Tensor:
            xb = xs[start : start + size].to(self.model.dtype)
            sb = ss[start : start + size]
            cond = self.model.cond_for_seeds(rows[start : start + size]) if self.conditional else None
            with torch.no_grad():  # per chunk: no_grad is per thread
                return self.model(xb, sb, **(cond or {})).to(torch.float64)

        outs = list(imap_batches(one, starts, min(workers, len(starts))))
        self.evals += xs.shape[0]
        out = torch.cat(outs)
        pos = 0
        for x, _, _, done in pending:
            n = x.shape[0]
            done(out[pos : pos + n])
            pos += n


@dataclass
class _Acc:
    """Running sums of per-sample contributions for K candidates (or intervals)."""

    k: int
    n: int = 0
    s1: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)
    d2: np.ndarray = field(init=False)  # sum of squared differences to the reference column
    ref: int = 0

    def __post_init__(self) -> None:
        self.s1 = np.zeros(self.k)
        self.s2 = np.zeros(self.k)
        self.d2 = np.zeros(self.k)

    def add(self, w: np.ndarray) -> None:
        """``w`` of shape (n, K)."""
        self.n += w.shape[0]
        self.s1 += w.sum(0)
        self.s2 += (w * w).sum(0)
        dw = w - w[:, self.ref : self.ref + 1]
        self.d2 += (dw * dw).sum(0)

    def mean(self) -> np.ndarray:
        return self.s1 / max(self.n, 1)

    def stderr(self) -> np.ndarray:
        m = self.mean()
        var = np.maximum(self.s2 / max(self.n, 1) - m * m, 0.0)
        return np.sqrt(var / max(self.n - 1, 1))

    def stderr_diff(self) -> np.ndarray:
        """Standard error of (candidate k - reference candidate), the quantity the search compares."""
        m = self.mean() - self.mean()[self.ref]
        var = np.maximum(self.d2 / max(self.n, 1) - m * m, 0.0)
        return np.sqrt(var / max(self.n - 1, 1))


class _Share:
    """Under torchrun, which work units (one noise block of one point or interval) this rank runs.

    Units are dealt round-robin in a fixed order, so every unit is run by exactly one rank; the
    accumulators are then summed over the ranks (:func:`_reduce`). In one process every unit is taken.
    """

    def __init__(self) -> None:
        self.active = distributed.active()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.k = -1

    def take(self) -> bool:
        self.k += 1
        return not self.active or self.k % self.world == self.rank


def _reduce(accs: Sequence[_Acc]) -> None:
    """Sum every rank's accumulators (float64) so each rank holds the totals one process would."""
    if not accs or not distributed.active():
        return
    flat = np.concatenate([np.concatenate(([a.n], a.s1, a.s2, a.d2)) for a in accs])
    total = distributed.all_sum(torch.from_numpy(flat)).numpy()
    pos = 0
    for a in accs:
        a.n = round(float(total[pos]))
        pos += 1
        for name in ("s1", "s2", "d2"):
            setattr(a, name, total[pos : pos + a.k].copy())
            pos += a.k


@dataclass(frozen=True)
class CandidateEstimate:
    """The two-term KLUB estimate of each candidate for one grid point."""

    index: int
    candidates: np.ndarray  # (K,) sigma values
    mean: np.ndarray  # (K,) estimated sum of the two adjacent interval terms
    stderr: np.ndarray  # (K,)
    stderr_diff: np.ndarray  # (K,) standard error of mean[k] - mean[ref]
    ref: int  # position of the current value among the candidates


class KLUBEstimator:
    """Monte Carlo KLUB for any :class:`DiffusionModel` on a fixed data subset (float64, CPU).

    ``data`` has shape ``(n, *model.shape)``. Network calls go through a :class:`Batcher` on
    ``device``; ``evals`` counts them.
    """

    def __init__(
        self,
        model: DiffusionModel,
        data: torch.Tensor,
        *,
        c: float = 0.5,
        batch_size: int = 4096,
        device: torch.device | str | None = None,
        seed: int = 0,
        rows: torch.Tensor | None = None,
    ) -> None:
        if data.ndim < 2 or tuple(data.shape[1:]) != tuple(model.shape):
            raise ValueError(f"data must have shape (n, {', '.join(map(str, model.shape))}), got {tuple(data.shape)}")
        self.model = model
        self.data = data.to(torch.float64).cpu()
        # Each data point's index in the whole data set (a subset keeps its rows' own): its condition's seed.
        self.rows = torch.arange(data.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        if self.rows.shape != (data.shape[0],):
            raise ValueError(f"rows must have one index per data point ({data.shape[0]}), got {tuple(self.rows.shape)}")
        self.c = float(c)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else model.device
        self.batcher = Batcher(model, batch_size, self.device)

    @property
    def evals(self) -> int:
        """Network evaluations so far (over every rank under torchrun)."""
        if distributed.active():
            return int(distributed.all_sum(torch.tensor(float(self.batcher.evals))))
        return self.batcher.evals

    # -- shared pieces ---------------------------------------------------------------------------
    def _indices(self, n: int, *key: int) -> torch.Tensor:
        """``n`` data indices: a random permutation of the subset (cycled when n exceeds it)."""
        g = _generator(self.seed, *key)
        m = self.data.shape[0]
        reps = -(-n // m)
        return torch.cat([torch.randperm(m, generator=g) for _ in range(reps)])[:n]

    def _block(
        self, idx: torch.Tensor, *key: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
        """x0, eps1, eps2 (on the device, float64), two uniforms per sample and the data indices, for one block."""
        g = _generator(self.seed, *key)
        n = idx.shape[0]
        shape = (n, *self.model.shape)
        e1 = torch.randn(shape, generator=g, dtype=torch.float64)
        e2 = torch.randn(shape, generator=g, dtype=torch.float64)
        uni = torch.rand((n, 2), generator=g, dtype=torch.float64).numpy()
        dev = self.device
        return self.data[idx].to(dev), e1.to(dev), e2.to(dev), uni, self.rows[idx]

    @staticmethod
    def _bcast(v: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(v, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))

    def _upper_state(self, x_s: torch.Tensor, sig: np.ndarray, hi: float, e2: torch.Tensor) -> torch.Tensor:
        """``x_hi = x_sigma + sqrt(hi^2 - sigma^2) eps2`` (the forward process); at ``hi = inf`` its
        noise-scaled limit ``x_hi / hi = eps2`` (the state a denoiser takes at pure noise)."""
        if math.isinf(hi):
            return e2
        return x_s + self._bcast(np.sqrt(np.maximum(hi * hi - sig * sig, 0.0)), x_s) * e2

    @staticmethod
    def _sqnorm(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        return ((a - b) ** 2).flatten(1).sum(1).cpu().numpy()

    # -- whole-grid KLUB ---------------------------------------------------------------------------
    def interval_terms(self, sigmas: Grid, n_samples: int, tag: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Estimate of each interval's KLUB term and its standard error (N values each).

        Interval ``i`` uses random numbers keyed by ``(seed, tag, i)`` only, so two grids are
        compared on common random numbers.
        """
        s = np.asarray(sigmas, dtype=np.float64)
        n_int = len(s) - 1
        accs = [_Acc(1) for _ in range(n_int)]
        mine = _Share()
        for i in range(n_int):
            lo, hi = float(s[i + 1]), float(s[i])
            idx_all = self._indices(n_samples, 1, tag, i)
            z = float(normalizer(lo, hi, self.c))
            for b0 in range(0, n_samples, NOISE_BLOCK):
                if not mine.take():
                    continue
                idx = idx_all[b0 : b0 + NOISE_BLOCK]
                x0, e1, e2, uni, _ = self._block(idx, 2, tag, i, b0 // NOISE_BLOCK)
                sig = sample_proposal(uni[:, 0], lo, hi, self.c)
                x_s = x0 + self._bcast(sig, x0) * e1
                x_u = self._upper_state(x_s, sig, hi, e2)
                n = idx.shape[0]
                dev = x0.device
                sig_t = torch.as_tensor(sig, dtype=torch.float64, device=dev)
                hi_t = torch.full((n,), hi, dtype=torch.float64, device=dev)
                weight = z / proposal_weight(sig, hi, self.c)
                self._pair(x_s, sig_t, x_u, hi_t, idx, weight, accs[i])
        self.batcher.flush()
        _reduce(accs)
        return np.array([a.mean()[0] for a in accs]), np.array([a.stderr()[0] for a in accs])

    def _pair(
        self,
        x_s: torch.Tensor,
        sig: torch.Tensor,
        x_u: torch.Tensor,
        u: torch.Tensor,
        rows: torch.Tensor,
        weight: np.ndarray,
        acc: _Acc,
    ) -> None:
        def done(out: torch.Tensor) -> None:
            n = x_s.shape[0]
            acc.add((weight * self._sqnorm(out[:n], out[n:]))[:, None])

        self.batcher.add(torch.cat([x_s, x_u]), torch.cat([sig, u]), torch.cat([rows, rows]), done)

    # -- candidates for one or several grid points ------------------------------------------------
    def candidates(
        self,
        sigmas: Grid,
        indices: Sequence[int],
        candidates: Sequence[np.ndarray],
        refs: Sequence[int],
        n_samples: int,
        tag: int,
        mode: Mode = "shared",
    ) -> list[CandidateEstimate]:
        """Two-term KLUB estimates for candidate values of the interior points ``indices``.

        ``sigmas`` is descending; point ``i`` sits between ``hi = sigmas[i-1]`` and
        ``lo = sigmas[i+1]``, and moving it to ``v`` changes the terms of ``[lo, v]`` and
        ``[v, hi]``. All points are estimated in one stream of batched network calls; random
        numbers are keyed by ``(seed, tag, i, block)`` and shared by all candidates of a point.
        """
        s = np.asarray(sigmas, dtype=np.float64)
        accs = []
        mine = _Share()
        for pos, i in enumerate(indices):
            lo, hi = float(s[i + 1]), float(s[i - 1])
            v = np.asarray(candidates[pos], dtype=np.float64)
            acc = _Acc(len(v), ref=int(refs[pos]))
            accs.append(acc)
            idx_all = self._indices(n_samples, 3, tag, i)
            for b0 in range(0, n_samples, NOISE_BLOCK):
                if not mine.take():
                    continue
                idx = idx_all[b0 : b0 + NOISE_BLOCK]
                block = self._block(idx, 4, tag, i, b0 // NOISE_BLOCK)
                if mode == "shared":
                    self._shared_block(block, lo, hi, v, acc)
                else:
                    self._independent_block(block, lo, hi, v, acc)
        self.batcher.flush()
        _reduce(accs)
        return [
            CandidateEstimate(
                i, np.asarray(candidates[p], dtype=np.float64), a.mean(), a.stderr(), a.stderr_diff(), a.ref
            )
            for p, (i, a) in enumerate(zip(indices, accs, strict=True))
        ]

    def _shared_block(
        self,
        block: tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor],
        lo: float,
        hi: float,
        v: np.ndarray,
        acc: _Acc,
    ) -> None:
        """One sigma per sample from ``pi`` over the whole pair ``[lo, hi]``, reweighted per candidate.

        For candidate ``v`` the upper term's integrand on ``[v, hi]`` has the proposal's shape and the
        lower term's on ``[lo, v]`` has ``g_v <= g_hi``, so the weight ``Z / g_hi`` stays bounded.
        """
        x0, e1, e2, uni, data_rows = block
        n, k = x0.shape[0], len(v)
        sig = sample_proposal(uni[:, 0], lo, hi, self.c)
        pre = _is_weight(sig, lo, hi, self.c)
        below = sig[:, None] < v[None, :]
        x_s = x0 + self._bcast(sig, x0) * e1
        x_hi = self._upper_state(x_s, sig, hi, e2)
        dev = x0.device
        sig_t = torch.as_tensor(sig, dtype=torch.float64, device=dev)
        need_hi = (~below).any(1)  # D(x_hi, hi) is only needed where some candidate lies below sigma
        rows, cols = np.nonzero(below)  # (sample, candidate) pairs whose upper end is the candidate
        v_rows = torch.as_tensor(rows, device=dev)
        x_v = x_s[v_rows] + self._bcast(np.sqrt(v[cols] ** 2 - sig[rows] ** 2), x0) * e2[v_rows]
        hi_rows = torch.as_tensor(np.nonzero(need_hi)[0], device=dev)
        xs = torch.cat([x_s, x_hi[hi_rows], x_v])
        ss = torch.cat(
            [
                sig_t,
                torch.full((hi_rows.shape[0],), hi, dtype=torch.float64, device=dev),
                torch.as_tensor(v[cols], dtype=torch.float64, device=dev),
            ]
        )
        n_hi = hi_rows.shape[0]
        rows_all = torch.cat([data_rows, data_rows[hi_rows.cpu()], data_rows[v_rows.cpu()]])

        def done(out: torch.Tensor) -> None:
            d_s, d_hi, d_v = out[:n], out[n : n + n_hi], out[n + n_hi :]
            f = np.empty((n, k))
            if n_hi:
                f_hi = np.zeros(n)
                f_hi[need_hi] = self._sqnorm(d_s[hi_rows], d_hi)
                f[:] = f_hi[:, None]
            if len(rows):
                f[rows, cols] = self._sqnorm(d_s[v_rows], d_v)
            acc.add(f * pre[:, None])

        self.batcher.add(xs, ss, rows_all, done)

    def _independent_block(
        self,
        block: tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor],
        lo: float,
        hi: float,
        v: np.ndarray,
        acc: _Acc,
    ) -> None:
        """Each candidate's two intervals sampled from their own proposals, on common random numbers.

        Lower term ``[lo, v]``: ``x_sigma = x0 + sigma e1``, ``x_v = x_sigma + sqrt(v^2 - sigma^2) e2``.
        Upper term ``[v, hi]``: ``x_hi = x0 + hi e2`` first and ``x_sigma`` from the Brownian bridge,
        ``x0 + (sigma/hi)^2 (x_hi - x0) + sigma sqrt(1 - (sigma/hi)^2) e1`` (the same joint law), so
        ``D(x_hi, hi)`` is shared by all candidates: 3K + 1 evaluations per sample instead of 4K.
        At ``hi = inf`` the bridge's limit is ``x_sigma = x0 + sigma e1``, independent of the
        noise-scaled ``x_hi / hi = e2``.
        """
        x0, e1, e2, uni, data_rows = block
        n, k = x0.shape[0], len(v)
        dev = x0.device
        # (n, K) sigmas for the lower and the upper term; the same uniforms for every candidate.
        sa = sample_proposal(np.repeat(uni[:, :1], k, 1), lo, v[None, :], self.c)
        sb = sample_proposal(np.repeat(uni[:, 1:], k, 1), v[None, :], hi, self.c)
        wa = _is_weight(sa, lo, v[None, :], self.c)
        wb = _is_weight(sb, v[None, :], hi, self.c)
        x_hi = e2 if math.isinf(hi) else x0 + hi * e2
        xs, ss = [x_hi], [torch.full((n,), hi, dtype=torch.float64, device=dev)]
        for j in range(k):
            s_a, s_b, up = sa[:, j], sb[:, j], float(v[j])
            x_a = x0 + self._bcast(s_a, x0) * e1
            x_v = x_a + self._bcast(np.sqrt(np.maximum(up * up - s_a * s_a, 0.0)), x0) * e2
            if math.isinf(hi):
                x_b = x0 + self._bcast(s_b, x0) * e1
            else:
                r2 = (s_b / hi) ** 2
                x_b = (
                    x0
                    + self._bcast(r2, x0) * (x_hi - x0)
                    + self._bcast(s_b * np.sqrt(np.maximum(1 - r2, 0.0)), x0) * e1
                )
            xs += [x_a, x_v, x_b]
            ss += [
                torch.as_tensor(s_a, dtype=torch.float64, device=dev),
                torch.full((n,), up, dtype=torch.float64, device=dev),
                torch.as_tensor(s_b, dtype=torch.float64, device=dev),
            ]

        def done(out: torch.Tensor) -> None:
            d_hi = out[:n]
            parts = out[n:].reshape(k, 3, n, *out.shape[1:])
            fa = np.stack([self._sqnorm(parts[j, 0], parts[j, 1]) for j in range(k)], 1)
            fb = np.stack([self._sqnorm(parts[j, 2], d_hi) for j in range(k)], 1)
            acc.add(fa * wa + fb * wb)

        self.batcher.add(torch.cat(xs), torch.cat(ss), data_rows.repeat(1 + 3 * k), done)


def _is_weight(sigma: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float, c: float) -> np.ndarray:
    """``Z / g(sigma)``: the importance weight of ``||dD||^2`` (0 on the measure-zero point sigma = hi)."""
    g = proposal_weight(sigma, hi, c)
    z = normalizer(lo, hi, c)
    return np.where(g > 0, z / np.where(g > 0, g, 1.0), 0.0)


def klub_total(terms: np.ndarray, stderrs: np.ndarray) -> tuple[float, float]:
    """Sum of interval terms and its standard error (intervals use independent random numbers)."""
    return float(np.sum(terms)), float(math.sqrt(float(np.sum(np.asarray(stderrs) ** 2))))
