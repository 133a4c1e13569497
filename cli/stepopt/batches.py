"""Independent no-grad batches of a small network on the CPU, run side by side in Python threads.

A forward of a few hundred small samples (``builtin:unet-digits``: 8x8) is too small for torch's
intra-op threads to pay: on two cores a Heun teacher at 512 pairs per batch ran 3,052 evaluations/s
with two intra-op threads and 4,285 with two Python threads each computing its own batch on one
thread (at 256: 2,578 and 4,149), the outputs equal bit for bit (torch releases the GIL inside its
kernels; ``scripts/bench_batches.py``). So where stepopt computes many independent
batches without gradients -- teacher outputs and trajectories, a validator scoring a grid, AYS's
KLUB rows -- it hands them to
:func:`imap_batches`, which runs them concurrently when :func:`batch_workers` allows it:

* the model says its forward may run from several threads at once (``concurrent_batches``: a plain
  stateless network; the built-in UNet says so, user code and adapters are left serial);
* its device is the CPU, and torch has more than one thread to give; at most one worker per batch.

Each worker runs on one intra-op thread; torch's thread count is restored afterwards. Results come
back in batch order, so callers cache and report progress exactly as in a serial loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from stepopt.models.base import DiffusionModel

T = TypeVar("T")
R = TypeVar("R")


def batch_workers(model: DiffusionModel | None, device: torch.device | str | None, n_items: int) -> int:
    """How many of ``n_items`` independent batches of ``model`` may run at once (1: serial, the torch
    default; always for None, a denoiser that is not a model)."""
    if n_items < 2 or model is None or not model.concurrent_batches:
        return 1
    if torch.device(device if device is not None else "cpu").type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), n_items))


def split_for_workers(n_rows: int, batch_size: int, workers_available: int) -> int:
    """A batch size that gives every available worker a batch when the rows would fill fewer batches
    than workers (e.g. 100 rows at 512 per batch on two workers: 50)."""
    if workers_available < 2 or n_rows <= 0:
        return batch_size
    return max(1, min(batch_size, -(-n_rows // workers_available)))


def imap_batches(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order; with ``workers > 1`` computed concurrently (one intra-op
    thread each). Leaving the iteration early cancels the batches not yet started."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    threads = torch.get_num_threads()

    def one_thread(item: T) -> R:
        torch.set_num_threads(1)
        return fn(item)

    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="stepopt-batch")
    try:
        yield from pool.map(one_thread, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
