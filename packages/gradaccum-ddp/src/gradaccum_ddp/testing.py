"""Test utilities: count gradient reductions, launch real process groups.

* `ReductionCounter` counts every gradient reduction of a DDP model:
  each backward in which DDP all-reduced its buckets (seen through a
  communication hook that wraps DDP's default all-reduce), plus each
  reduction a `DDPAccumulator` made itself. The
  conformance suite's distributed harness uses it to prove "exactly one
  reduction per window".
* `launch` runs a function on ``world_size`` fresh processes
  (``torch.multiprocessing``, spawn) with an initialised gloo process group on
  loopback, and never waits longer than its timeout: a hung rank is killed.
  Results travel through files the function writes, never through pickle.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._C._distributed_c10d import GradBucket, HashStore
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from gradaccum_ddp.accumulator import DDPAccumulator

__all__ = ["LaunchResult", "ReductionCounter", "free_port", "launch", "one_rank_group"]


class ReductionCounter:
    """Counts the gradient reductions of ``model`` (and of ``acc``, if given).

    Registers a communication hook on ``model`` (DDP allows one per model,
    before its first backward); the hook all-reduces exactly as DDP's default
    does (average over the process group) and counts.

    Attributes:
        backward_reductions: backward passes in which DDP communicated
            (one per backward, however many buckets).
        buckets: buckets all-reduced, over all those backward passes.
        manual_reductions: reductions the accumulator made itself.
    """

    def __init__(self, model: DistributedDataParallel, acc: DDPAccumulator | None = None) -> None:
        self.backward_reductions = 0
        self.buckets = 0
        self.manual_reductions = 0
        self._group: dist.ProcessGroup = model.process_group
        self._taken = 0
        model.register_comm_hook(self, _counting_hook)
        if acc is not None:
            acc.add_reduction_observer(self._on_manual)

    def _on_manual(self, kind: str) -> None:
        self.manual_reductions += 1

    @property
    def total(self) -> int:
        """Every gradient reduction counted so far."""
        return self.backward_reductions + self.manual_reductions

    def take(self) -> int:
        """The reductions counted since the previous call (per window, say)."""
        taken, self._taken = self.total - self._taken, self.total
        return taken


def _counting_hook(
    state: ReductionCounter, bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    state.buckets += 1
    if bucket.is_last():
        state.backward_reductions += 1
    return default_hooks.allreduce_hook(state._group, bucket)


# DDP checks a hook's annotations as objects; postponed (string) annotations fail that check.
_counting_hook.__annotations__ = {
    "state": object,
    "bucket": GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class LaunchResult:
    """What `launch` saw: each rank's exit code (``None``: killed at the
    timeout), whether the timeout hit, and the wall time."""

    exitcodes: list[int | None]
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        """Every rank exited with status 0 before the timeout."""
        return not self.timed_out and all(code == 0 for code in self.exitcodes)


def _entry(
    target: Callable[..., None],
    rank: int,
    world_size: int,
    store_file: str,
    backend: str,
    pg_timeout: float,
    threads: int,
    args: Sequence[Any],
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group(
        backend,
        init_method=f"file://{store_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    code = 0
    try:
        target(rank, world_size, *args)
    except SystemExit as exc:  # what multiprocessing makes of it: the code, or 1 for a message
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # DDP models left in reference cycles must go before their process group.
        gc.collect()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    # The rank's outcome is decided; leave without interpreter finalization. A DDP model
    # leaves its gloo process group alive after destroy_process_group (two pt_gloo_runloop
    # threads and the TCP loop remain, with plain torch DDP and nothing of ours), so its C++
    # threads live into finalization, where one that touches a Python object aborts the
    # process ("terminate called without an active exception"): one CI run lost a rank that
    # way after it had written its results. Streams are flushed; results go through files
    # the target has closed.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def launch(
    target: Callable[..., None],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
    backend: str = "gloo",
    threads: int = 1,
) -> LaunchResult:
    """Run ``target(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Each process first joins a process group (``backend``, rendezvous through a
    fresh file store — no TCP port to pick, so launches running side by side
    cannot collide; gloo then connects the ranks over loopback — and
    ``pg_timeout`` seconds for every collective) with
    ``torch.set_num_threads(threads)``. ``target`` must be importable by name
    (a module-level function); its arguments are sent by multiprocessing, its
    results should be written to files. Waits at most ``timeout`` seconds in
    all, then kills the ranks still running.

    A rank's exit code is decided by ``target`` alone: 0 when it returns, the
    code of a `SystemExit`, 1 (traceback on stderr) for any other exception.
    The rank then destroys its process group and leaves with ``os._exit``,
    without interpreter finalization: torch keeps a DDP model's gloo threads
    alive past ``destroy_process_group``, and such a thread touching Python
    during finalization aborts the process. So nothing of finalization runs:
    files the target has not closed are not flushed, ``atexit`` handlers
    (``logging.shutdown``, an unfinished wandb run's, coverage's) do not run,
    threads still running are not joined and items still queued in a
    ``multiprocessing.Queue`` may be lost. Finish and close what the target
    opened (the rank programs here write their results with ``os.replace``).
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gradaccum-ddp-launch-") as tmp:
        store_file = os.path.join(tmp, "store")
        processes = [
            ctx.Process(
                target=_entry,
                args=(target, rank, world_size, store_file, backend, pg_timeout, threads, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        return _run(processes, timeout)


def _run(processes: list[Any], timeout: float) -> LaunchResult:
    start = time.monotonic()
    for process in processes:
        process.start()
    deadline = start + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    killed: set[int] = set()
    for rank, process in enumerate(processes):
        if process.is_alive():
            killed.add(rank)
            process.terminate()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
    codes = [None if r in killed else p.exitcode for r, p in enumerate(processes)]
    return LaunchResult(codes, bool(killed), time.monotonic() - start)


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A one-rank gloo process group on an in-memory store (no port) for the
    duration of the block; an existing one-rank group is reused as is."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                "a world_size=1 scenario needs a one-rank process group, but this process is "
                f"already in a group of {dist.get_world_size()}"
            )
        yield
        return
    dist.init_process_group(
        "gloo",
        store=HashStore(),  # one rank: an in-memory store, no port
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        gc.collect()  # DDP objects of the block go before their process group
        dist.destroy_process_group()
