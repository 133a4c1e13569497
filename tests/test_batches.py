"""Concurrent no-grad batches on the CPU (stepopt.batches): order, threads, and equal results."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from stepopt.batches import batch_workers, imap_batches, split_for_workers
from stepopt.models import load_model
from stepopt.models.base import DiffusionModel
from stepopt.solvers import get_solver
from stepopt.teacher import GridValidator, TeacherConfig, teacher_outputs


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Recording(DiffusionModel):
    """The shipped UNet behind a wrapper that records which thread ran each call, with how many intra-op threads."""

    def __init__(self, concurrent: bool) -> None:
        self.inner = load_model("builtin:unet-digits")
        for name in ("id", "frame", "shape", "parameterization", "sigma_min", "sigma_max", "dtype"):
            setattr(self, name, getattr(self.inner, name))
        self.concurrent_batches = concurrent
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        with self.lock:
            self.calls.append((threading.current_thread().name, torch.get_num_threads()))
        return self.inner.denoise(x, sigma)


def test_imap_batches_keeps_order_runs_one_thread_each_and_restores(two_threads: None) -> None:
    seen: list[tuple[str, int]] = []

    def fn(i: int) -> int:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return i * i

    assert list(imap_batches(fn, list(range(7)), workers=2)) == [i * i for i in range(7)]
    assert {n for _, n in seen} == {1} and all(name.startswith("stepopt-batch") for name, _ in seen)
    assert torch.get_num_threads() == 2
    it = imap_batches(fn, list(range(50)), workers=2)
    assert next(it) == 0
    it.close()  # leaving early: the rest is cancelled and the threads restored
    assert torch.get_num_threads() == 2 and len(seen) < 7 + 50
    assert list(imap_batches(fn, [3, 4], workers=1)) == [9, 16]


def test_batch_workers_and_split(two_threads: None) -> None:
    net, plain = Recording(True), Recording(False)
    assert batch_workers(net, "cpu", 5) == 2
    assert batch_workers(net, None, 1) == 1  # one batch: nothing to run side by side
    assert batch_workers(plain, "cpu", 5) == 1  # the model did not say its forward is thread-safe
    assert batch_workers(net, torch.device("cuda"), 5) == 1  # GPUs run one big batch
    assert split_for_workers(100, 512, 2) == 50
    assert split_for_workers(2048, 512, 2) == 512
    assert split_for_workers(3, 512, 2) == 2
    assert split_for_workers(100, 512, 1) == 512


def test_teacher_and_validator_give_the_serial_results_concurrently(two_threads: None) -> None:
    """Each worker computes its batch as a serial loop on one thread would, bit for bit (a kernel's float
    sums may depend on the intra-op thread count, so the serial reference runs on one thread)."""
    cfg = TeacherConfig(steps=3)
    seeds = range(5_100_000, 5_100_020)
    serial, concurrent = Recording(False), Recording(True)
    torch.set_num_threads(1)
    x0, y0 = teacher_outputs(serial, seeds, cfg, batch_size=6, cache=False)
    torch.set_num_threads(2)
    x1, y1 = teacher_outputs(concurrent, seeds, cfg, batch_size=6, cache=False)
    assert torch.equal(x0, x1) and torch.equal(y1, y0)
    assert {name for name, _ in serial.calls} == {"MainThread"}
    workers = {name for name, _ in concurrent.calls}
    assert len(workers) == 2 and all(w.startswith("stepopt-batch") for w in workers)
    assert {n for _, n in concurrent.calls} == {1} and torch.get_num_threads() == 2

    ident = get_solver("dpmpp-3m").identity()
    grid = [80.0, 5.0, 1.0, 0.2, 0.002]
    v0 = GridValidator(serial, ident, seeds, cfg, batch_size=6, cache=False)
    v1 = GridValidator(concurrent, ident, seeds, cfg, batch_size=6, cache=False)
    concurrent.calls.clear()
    torch.set_num_threads(1)
    out0 = v0.outputs(grid)
    torch.set_num_threads(2)
    assert torch.equal(v1.outputs(grid), out0)
    assert v1.evals == v0.evals == 20 * 4  # every row counted once, across the threads
    assert len({name for name, _ in concurrent.calls}) == 2


def test_dp_teacher_trajectories_concurrently_equal_the_serial_ones(two_threads: None) -> None:
    from stepopt.optimizers.dp import candidate_grid, teacher_trajectories
    from stepopt.optimizers.gits import GITSConfig

    cfg = GITSConfig(candidates=5, trajectories=9, batch_size=4, teacher=TeacherConfig(steps=2))
    serial, concurrent = Recording(False), Recording(True)
    cand = candidate_grid(serial, cfg, 3)
    torch.set_num_threads(1)
    t0, i0 = teacher_trajectories(serial, cand, cfg, cache=False)
    torch.set_num_threads(2)
    t1, i1 = teacher_trajectories(concurrent, cand, cfg, cache=False)
    assert torch.equal(t1, t0) and i1["network_evals"] == i0["network_evals"]
    assert len({name for name, _ in concurrent.calls}) == 2 and torch.get_num_threads() == 2


def test_klub_batcher_chunks_run_side_by_side_with_the_serial_results(two_threads: None) -> None:
    from stepopt.optimizers.klub import Batcher

    torch.manual_seed(0)
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64) * 3
    sigma = torch.exp(torch.randn(12, dtype=torch.float64))
    results = {}
    for flag, threads in ((False, 1), (True, 2)):
        model = Recording(flag)
        torch.set_num_threads(threads)
        batcher, outs = Batcher(model, 3, torch.device("cpu")), []
        for i in (0, 6):  # each query of 6 rows fills the batch: flushed as chunks of 3, serial or side by side
            batcher.add(x[i : i + 6], sigma[i : i + 6], torch.arange(i, i + 6), outs.append)
        batcher.flush()
        results[flag] = torch.cat(outs)
        assert batcher.evals == 12
        assert (len({name for name, _ in model.calls}) == 2) is flag
    assert torch.equal(results[True], results[False])
    assert torch.get_num_threads() == 2
