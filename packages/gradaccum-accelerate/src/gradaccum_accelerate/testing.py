"""Test utilities for gradaccum-accelerate: fresh Accelerate state, real Accelerate ranks.

Accelerate keeps process-wide singletons (``PartialState``, ``AcceleratorState``,
``GradientState``): an ``Accelerator`` built after another one in the same
process inherits its distributed type, mixed precision and accumulation
steps. Every run of the tests and of the conformance harness therefore starts
from `reset_accelerate`:

* `fresh_accelerator` resets, then builds ``Accelerator(cpu=True, ...)``;
* `one_process` is the environment of a single-process run in the calling
  process (no launcher variables, so Accelerate picks ``DistributedType.NO``);
* `launch_accelerate` runs a function on ``world_size`` spawned processes
  (`gradaccum_ddp.testing.launch`: gloo on loopback, a hard timeout) in
  Accelerate's ``MULTI_CPU`` environment, the one
  ``ACCELERATE_USE_CPU=1 torchrun --nproc-per-node=N`` gives.

About the process group: `launch` initialises the default gloo group (through
a file store) before the target runs. ``PartialState`` accepts it: on
``MULTI_CPU`` it calls ``init_process_group`` only ``if not
torch.distributed.is_initialized()`` (``accelerate/state.py``), and the
prepared model's DDP uses that default group. The torchrun variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``) are still set, because Accelerate reads its ranks and
sizes from them; the port is never dialled. ``OMP_NUM_THREADS`` is set to the
rank's thread count so that Accelerate keeps it (without it, it resets
``torch.set_num_threads`` to the physical cores per process and warns).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from gradaccum_ddp.testing import LaunchResult, free_port, launch

__all__ = [
    "LAUNCHER_VARIABLES",
    "fresh_accelerator",
    "launch_accelerate",
    "one_process",
    "rank_environment",
    "reset_accelerate",
]

LAUNCHER_VARIABLES = (
    "ACCELERATE_USE_CPU",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_TORCH_DEVICE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)
"""Environment variables through which a launcher tells Accelerate how it runs."""


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state (``AcceleratorState`` with its
    ``PartialState``, and ``GradientState``); the process group, if any, stays."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def fresh_accelerator(**kwargs: Any) -> Accelerator:
    """``Accelerator(cpu=True, **kwargs)`` on fresh singletons."""
    reset_accelerate()
    return Accelerator(cpu=True, **kwargs)


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """A single-process Accelerate run in this process: the launcher variables
    are removed for the block (Accelerate would otherwise look for a process
    group) and the singletons are reset before and after it."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    reset_accelerate()
    try:
        yield
    finally:
        reset_accelerate()
        os.environ.update(saved)


def rank_environment(rank: int, world_size: int, port: int) -> None:
    """Set, in this process, what ``ACCELERATE_USE_CPU=1 torchrun`` would set for
    ``rank`` of ``world_size`` on one node."""
    os.environ.update(
        ACCELERATE_USE_CPU="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )


def _accelerate_rank(
    rank: int,
    world_size: int,
    target: Callable[..., None],
    port: int,
    *args: Any,
) -> None:
    rank_environment(rank, world_size, port)
    reset_accelerate()
    target(rank, world_size, *args)


def launch_accelerate(
    target: Callable[..., None],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
) -> LaunchResult:
    """Run ``target(rank, world_size, *args)`` on ``world_size`` spawned processes,
    each in Accelerate's ``MULTI_CPU`` environment over the gloo group that
    `gradaccum_ddp.testing.launch` initialised (see the module docstring), so
    that ``Accelerator(cpu=True)`` inside ``target`` is one of ``world_size``
    processes. ``target`` must be a module-level function; results travel
    through files. Waits at most ``timeout`` seconds, then kills the ranks."""
    return launch(
        _accelerate_rank,
        world_size,
        target,
        free_port(),
        *args,
        timeout=timeout,
        pg_timeout=pg_timeout,
    )
