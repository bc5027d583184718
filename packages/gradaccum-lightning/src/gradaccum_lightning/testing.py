"""Test utilities for gradaccum-lightning: stateful loaders, real Lightning ranks, quiet Trainers.

* `ListLoader` is a ``DataLoader`` (``batch_size=None``) over a list of
  ready-made batches that is *sized* and *stateful* (``state_dict`` /
  ``load_state_dict``, Lightning's ``_Stateful`` protocol): Lightning saves
  its position in ``trainer.save_checkpoint`` and restores it before the
  resumed epoch's ``iter()``, so a checkpoint taken in the middle of an
  epoch resumes with the batch after the checkpoint, as a
  ``torchdata.stateful_dataloader.StatefulDataLoader`` would.
* `StreamLoader` is a ``DataLoader`` over an ``IterableDataset`` of the
  same batches: no ``len()`` (Lightning learns the last batch of a pass only
  by prefetching one ahead) and no state.
* `launch_lightning` runs a function on ``world_size`` spawned processes
  (`gradaccum_ddp.testing.launch`: gloo on loopback through a file store,
  a hard timeout) in the environment ``torchrun`` gives each rank
  (`rank_environment`), so that ``Trainer(strategy="ddp", devices=N,
  accelerator="cpu")`` inside it is one of ``N`` processes: Lightning
  detects ``TorchElasticEnvironment``, launches nothing, and keeps the
  default process group that `launch` initialised (``_init_dist_connection``
  returns early when one exists; the port is never dialled).
* `quiet_trainer_kwargs` are the ``Trainer`` arguments that keep test output
  clean (no progress bar, model summary, logger, checkpointing callback);
  `quiet_lightning` silences Lightning's info banners and the warnings a
  tiny CPU run triggers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from gradaccum_ddp.testing import LaunchResult, free_port, launch

__all__ = [
    "QUIET_WARNINGS",
    "ListLoader",
    "StreamLoader",
    "launch_lightning",
    "quiet_lightning",
    "quiet_trainer_kwargs",
    "rank_environment",
]

QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*is smaller than the logging interval.*",
    ".*Found .* module.* in eval mode.*",
    ".*treespec, LeafSpec.*",
    ".*You're resuming from a checkpoint that ended before the epoch ended.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    ".*The number of training batches .* is smaller than.*",
    ".*Total length of .* across ranks is zero.*",
    ".*MASTER_PORT environment variable is not defined.*",
)
"""Warnings a tiny CPU run prints that say nothing about the code under test."""

_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info banners ("GPU available: ...", tips) and the warnings
    in `QUIET_WARNINGS` off for the block; other warnings pass."""
    saved = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def quiet_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """``Trainer`` arguments for a quiet CPU test run, with ``overrides`` applied."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(overrides)
    return kwargs


class _ResumableSampler(Sampler[int]):
    """Indices ``start, ..., length - 1``; counts the indices it has handed out."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.start = 0
        self.served = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        self.served = start
        for index in range(start, self.length):
            self.served = index + 1
            yield index


class ListLoader(DataLoader[Any]):
    """A sized, stateful ``DataLoader(batches, batch_size=None)``.

    Each item of ``batches`` is one batch, handed out as is. ``len()`` is the
    number of batches. ``state_dict()`` says how many batches of the current
    iteration were fetched (``{"tag": tag, "next": i}``); ``load_state_dict``
    makes the next iteration start at batch ``i`` — unless the state carries
    another ``tag`` (a loader of another epoch) or says the iteration was
    exhausted (then the next one starts a new epoch at 0). Lightning
    fetches without prefetching from a sized loader, so the state saved in
    ``on_train_batch_end`` of batch ``b`` is ``next = b + 1``.
    """

    def __init__(self, batches: Sequence[Any], tag: Any = None) -> None:
        sampler = _ResumableSampler(len(batches))
        super().__init__(list(batches), batch_size=None, sampler=sampler)  # type: ignore[arg-type]
        self.positions = sampler
        self.tag = tag
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Where the current iteration is: ``{"tag": ..., "next": batches fetched}``."""
        return {"tag": self.tag, "next": self.positions.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration at ``state["next"]`` (if the tags agree)."""
        self.loaded = dict(state)
        if state.get("tag") == self.tag and int(state["next"]) < len(self.positions):
            self.positions.start = int(state["next"])


class _Stream(IterableDataset[Any]):
    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[Any]:
        yield from self.batches


class StreamLoader(DataLoader[Any]):
    """``DataLoader(IterableDataset(batches), batch_size=None)``: no ``len()``,
    no state."""

    def __init__(self, batches: Sequence[Any]) -> None:
        super().__init__(_Stream(batches), batch_size=None)


def rank_environment(rank: int, world_size: int, port: int) -> None:
    """Set, in this process, what ``torchrun --nproc-per-node=world_size``
    sets for ``rank`` on one node (``TORCHELASTIC_RUN_ID`` included, so
    Lightning picks its ``TorchElasticEnvironment`` and launches nothing)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        ROLE_RANK=str(rank),
        NODE_RANK="0",
        TORCHELASTIC_RUN_ID="gradaccum-lightning-test",
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )


def _lightning_rank(
    rank: int, world_size: int, target: Callable[..., None], port: int, *args: Any
) -> None:
    rank_environment(rank, world_size, port)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    target(rank, world_size, *args)


def launch_lightning(
    target: Callable[..., None],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    pg_timeout: float = 60.0,
) -> LaunchResult:
    """Run ``target(rank, world_size, *args)`` on ``world_size`` spawned processes,
    each in ``torchrun``'s environment over the gloo group that
    `gradaccum_ddp.testing.launch` initialised (see the module docstring), so
    that ``Trainer(strategy="ddp", devices=world_size, accelerator="cpu")``
    inside ``target`` is one rank of ``world_size``. ``target`` must be a
    module-level function; results travel through files. Waits at most
    ``timeout`` seconds, then kills the ranks."""
    return launch(
        _lightning_rank,
        world_size,
        target,
        free_port(),
        *args,
        timeout=timeout,
        pg_timeout=pg_timeout,
    )
