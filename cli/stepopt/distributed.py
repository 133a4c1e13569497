"""Scaling out with ``torch.distributed`` (``torchrun``): work split by seed, results as one process.

Under any launcher that sets the ``torch.distributed`` environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``: ``torchrun`` on one node or several, SLURM
through torchrun) every command that loads a model joins one process group: NCCL when the model
runs on CUDA (one device per local rank, ``cuda:LOCAL_RANK``), gloo on the CPU. Without that
environment, or with ``WORLD_SIZE=1``, nothing here does anything and no process group exists.

How work is split (sample ``i`` always comes from seed ``i``, so results cannot depend on who
computes them):

* :func:`map_rows` runs a function over a list of seeds on this rank's contiguous share and
  gathers every share, in seed order, to every rank (:func:`gather_rows`); sampling
  (:func:`stepopt.sampling.sample_schedule`), the teacher (:func:`stepopt.teacher.teacher_outputs`,
  each rank caching the entries it computed) and the grid validator use it, so every rank then
  holds the same tensors as one process would, and the optimizers run identically on every rank;
* sums that are reduced (LD3's gradients and losses) go through :func:`all_sum` in float64;
* files are written once: :func:`stepopt.io.atomic_path` writes only on rank 0, except files a
  rank owns (teacher cache entries), and progress, summaries and ``--json`` are printed by rank 0.

Failure: a rank that fails records its one-line error in the rendezvous store and exits with 1;
a rank whose peer has gone (its collective fails) exits with 1 without a second message, so a
run ends promptly with one line naming the rank and the cause (:func:`report_failure`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from stepopt.errors import StepoptError

if TYPE_CHECKING:
    import torch

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = timedelta(minutes=30)  # a collective legitimately waits for a slow rank's work
FAILURE_WAIT = timedelta(seconds=20)  # at most; ranks decide as soon as rank 0 failed or got past its checks

_store: Any = None  # the rendezvous store of this process group (failure reports)
_watcher: Any = None  # (thread, stop event) of _watch_peers


class PeerFailure(StepoptError):
    """A collective failed because another rank stopped (that rank reports its own error)."""


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment; ``(0, 1, 0)`` without one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise StepoptError(
            "the torch.distributed environment is malformed: RANK, WORLD_SIZE and LOCAL_RANK must be integers"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise StepoptError(f"the torch.distributed environment is inconsistent: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def quiet_backend_logs() -> None:
    """Keep c10d's C++ warnings (e.g. a store connection closed by a rank that stopped) off stderr."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def launched() -> bool:
    """Whether this process was started as one of several ranks (``WORLD_SIZE`` > 1)."""
    try:
        return env_world()[1] > 1
    except StepoptError:
        return True  # a malformed environment is reported by init()


def active() -> bool:
    """Whether a process group with more than one rank is running (never imports torch itself)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank (0 without a process group; from the environment before it exists)."""
    if active():
        import torch.distributed as dist

        return int(dist.get_rank())
    try:
        return env_world()[0]
    except StepoptError:
        return 0


def world_size() -> int:
    if active():
        import torch.distributed as dist

        return int(dist.get_world_size())
    return 1


def is_main() -> bool:
    """True on rank 0 and in a single process: the one that prints and writes shared outputs."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """One CUDA device per local rank: ``cuda`` (or ``auto``'s CUDA) becomes ``cuda:LOCAL_RANK``."""
    import torch

    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", env_world()[2] % max(torch.cuda.device_count(), 1))
    return device


def _open_store(host: bool) -> Any:
    """A client of the rendezvous store (``host``: rank 0 serves it unless torchrun's agent does)."""
    import torch.distributed as dist

    r, world, _local = env_world()
    use_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=host and r == 0 and not use_agent,
        timeout=TIMEOUT,
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"stepopt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_store() -> None:
    """Connect to the launcher's rendezvous address (no-op in one process or when connected).

    The store carries the process group's rendezvous and the failure reports; it is opened when a
    command starts, before any input is checked, so that a bad input reported by every rank is
    printed once. torchrun's agent hosts the store when it says so (``TORCHELASTIC_USE_AGENT_STORE``);
    otherwise rank 0 does.
    """
    global _store
    if _store is not None:
        return
    r, world, _local = env_world()
    if world == 1:
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise StepoptError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun")
    import torch.distributed as dist

    if not dist.is_available():
        raise StepoptError("this torch build has no torch.distributed; run one process (unset WORLD_SIZE)")
    try:
        _store = _open_store(host=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise StepoptError(f"rank {r}: cannot reach the rendezvous store: {' '.join(str(e).split())}") from None


def init(device: torch.device) -> None:
    """Join the launcher's process group (NCCL for CUDA, gloo for the CPU); no-op without one."""
    r, world, _local = env_world()
    if world == 1 or active():
        return
    init_store()
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _arrive(r, world)
    try:
        pg_store = dist.PrefixStore("pg", _store)
        dist.init_process_group(backend, store=pg_store, rank=r, world_size=world, timeout=TIMEOUT)
    except (RuntimeError, ValueError, OSError) as e:
        raise StepoptError(f"rank {r}: cannot join the process group ({backend}): {' '.join(str(e).split())}") from None
    _watch_peers(r, world)


def _watch_peers(r: int, world: int) -> None:
    """A daemon thread that ends this rank (exit 1, silently) as soon as another rank reports a failure.

    A collective does not notice a peer that has stopped (gloo and NCCL wait until their timeout,
    unless torchrun's agent stops the ranks), so a failure in the middle of the work would otherwise
    leave the other ranks blocked. The failing rank prints the one line (:func:`report_failure`).
    """
    import threading

    global _watcher
    stop = threading.Event()

    def watch() -> None:
        try:
            store = _open_store(host=False)
        except Exception:
            return
        others = [k for k in range(world) if k != r]
        failed: list[int] = []
        while not failed:
            if stop.wait(0.2):
                return
            try:
                failed = [k for k in others if store.check([f"fail/{k}"])]
            except Exception:  # the store is gone: the run is over
                return
        if r == 0:  # this rank serves the store: let the failed ranks finish reporting
            keys = [f"reported/{k}" for k in failed]
            _poll(lambda: bool(store.check(keys)), FAILURE_WAIT)
        sys.stderr.flush()
        os._exit(1)

    thread = threading.Thread(target=watch, name="stepopt-peer-watch", daemon=True)
    thread.start()
    _watcher = (thread, stop)


def note_crash(exc: BaseException) -> None:
    """Record an unexpected exception of this rank (its traceback follows) so the others stop too."""
    store = _store
    if store is None:
        return
    r = env_world()[0]
    with contextlib.suppress(Exception):
        store.set(f"fail/{r}", f"crashed: {type(exc).__name__}")
        store.set(f"reported/{r}", "1")


def _arrive(r: int, world: int) -> None:
    """Wait until every rank has arrived here, or stop at once when one has reported a failure.

    A rank that fails before it joins (e.g. an output path only it cannot write) would otherwise
    leave the others waiting in the process group's rendezvous until its timeout.
    """
    import time

    store = _store
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    try:
        store.set(f"arrived/{r}", "1")  # past its input checks (see report_failure)
        store.add("arrived", 1)
        while int(store.add("arrived", 0)) < world:
            if any(store.check([f"fail/{k}"]) for k in range(world) if k != r):
                raise PeerFailure(f"rank {r}: another rank failed before the run started")
            if time.monotonic() > deadline:
                raise StepoptError(f"rank {r}: the other ranks did not arrive within {TIMEOUT}")
            time.sleep(0.05)
    except (RuntimeError, OSError) as e:  # the store went away with the rank that hosted it
        raise PeerFailure(f"rank {r}: the rendezvous store is gone ({' '.join(str(e).split())[:200]})") from None


def _comm_device() -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous share ``[start, stop)`` of ``n`` items that rank ``r`` works on."""
    r = rank() if r is None else r
    w = world_size() if world is None else world
    return n * r // w, n * (r + 1) // w


def _collective(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuntimeError as e:  # gloo/NCCL errors when a peer has gone
        raise PeerFailure(f"rank {rank()}: another rank stopped ({' '.join(str(e).split())[:200]})") from None


def gather_rows(part: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's share (rows ``shard(n, r)``) in rank order, on every rank.

    ``part`` has this rank's ``shard(n)`` rows; the result has ``n`` rows, on ``part``'s device and
    dtype, bit-identical to the shares (tensors are moved, never converted).
    """
    if not active():
        return part
    import torch
    import torch.distributed as dist

    w = world_size()
    sizes = [shard(n, r, w) for r in range(w)]
    size = max(b - a for a, b in sizes)
    dev = _comm_device()
    shape = tuple(part.shape[1:])
    padded = torch.zeros((size, *shape), dtype=part.dtype, device=dev)
    padded[: part.shape[0]] = part.detach().to(dev)
    bufs = [torch.empty_like(padded) for _ in range(w)]
    _collective(lambda: dist.all_gather(bufs, padded))
    out = torch.cat([b[: stop - start] for b, (start, stop) in zip(bufs, sizes, strict=True)])
    return out.to(part.device)


def map_rows(seeds: Sequence[int], fn: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """``fn(seeds)`` computed share by share over the ranks, gathered in seed order on every rank."""
    seeds = list(seeds)
    if not active():
        return fn(seeds)
    a, b = shard(len(seeds))
    return gather_rows(fn(seeds[a:b]), len(seeds))


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the ranks in float64 (returned on ``value``'s device, in float64)."""
    import torch

    if not active():
        return value.to(torch.float64)
    import torch.distributed as dist

    buf = value.detach().to(device=_comm_device(), dtype=torch.float64).clone()
    _collective(lambda: dist.all_reduce(buf))
    return buf.to(value.device)


def _poll(done: Callable[[], bool], limit: timedelta) -> bool:
    """Poll ``done()`` every 50 ms for at most ``limit``; whether it came true (store errors: False)."""
    import time

    deadline = time.monotonic() + limit.total_seconds()
    while True:
        try:
            if done():
                return True
        except Exception:  # the store went away with the rank that hosted it
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def report_failure(message: str) -> bool:
    """Record this rank's error; whether this rank should print it.

    Rank 0 always prints. Another rank first looks whether rank 0 failed with the same message (the
    same bad input fails on every rank), waiting until rank 0 has either failed or got past its
    input checks; it stays silent when the messages agree, so one line is printed per cause. Rank 0
    then keeps its store up until the others have decided.
    """
    store = _store
    if store is None:
        return True
    r = env_world()[0]
    try:
        store.set(f"fail/{r}", message)
    except Exception:
        return True
    if r == 0:
        return True
    _poll(lambda: bool(store.check(["fail/0"]) or store.check(["arrived/0"])), FAILURE_WAIT)
    same = False
    with contextlib.suppress(Exception):
        same = bool(store.check(["fail/0"]) and store.get("fail/0").decode() == message)
    with contextlib.suppress(Exception):
        store.set(f"reported/{r}", "1")
    return not same


def linger_for_reports() -> None:
    """Before this rank exits (it may host the store): let ranks that failed finish reporting."""
    store = _store
    if store is None:
        return
    r, world, _local = env_world()

    def settled(k: int) -> bool:
        reported = store.check([f"reported/{k}"])
        return bool(reported or (store.check([f"arrived/{k}"]) and not store.check([f"fail/{k}"])))

    _poll(lambda: all(settled(k) for k in range(1, world) if k != r), FAILURE_WAIT)


def shutdown() -> None:
    """Stop watching the peers and leave the process group (at the end of a command)."""
    global _store, _watcher
    if _watcher is not None:
        thread, stop = _watcher
        stop.set()
        thread.join(timeout=5)
        _watcher = None
    if active():
        import torch.distributed as dist

        dist.destroy_process_group()
    _store = None
