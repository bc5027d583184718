"""Checkpoints of a `Accumulator` in the shared format.

Any accumulator whose distributed side is a `DDPDistributed` (``DDPAccumulator``,
the Accelerate and Lightning adapters on several processes) saves and loads
through these two functions.

One directory per checkpoint, written once, by rank 0, atomically
(``spec/checkpoint-v1.md``): the common accumulation state and config, the
model, optimizer, scheduler and scaler state (identical on every rank), and
each rank's own in-flight gradients as ``gradients.rank<r>`` (they differ
until the boundary's all-reduce). Under ``normalization="items"`` a
mid-window checkpoint also holds each rank's item count of the open window as
``items.rank<r>`` (a float64 scalar named ``items``); the manifest's state
then records ``items_in_window = 0`` and ``device_items = true``, so the one
state in the manifest is true for every rank and the count each rank resumes
with is its own.

The protocol (every rank calls `save_distributed` at the same point):

1. every rank serialises its own roles and all-gathers one row: a digest of
   the state and config it would write, whether it got this far, and the
   length of its bytes — ranks that disagree raise before anything is written;
2. rank 0 gathers the other ranks' bytes as uint8 tensors (no pickle);
3. rank 0 writes the directory atomically (temporary sibling, fsync, rename);
4. all ranks all-gather rank 0's verdict: the call returns on every rank only
   once the checkpoint is complete on disk, and raises on every rank if it
   is not. A rank that dies in between makes the others raise
   `DistributedError`; the target is then either
   absent or the previous complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradaccum.checkpoint import MANIFEST_NAME, Producer, write_checkpoint
from gradaccum.errors import DistributedError, UsageError
from gradaccum.lockstep import Tag, describe, digest
from gradaccum_ddp.collectives import (
    communication_errors,
    gather_bytes,
    gather_rows,
    pack_files,
    unpack_files,
)
from gradaccum_ddp.distributed import DDPDistributed
from gradaccum_torch.checkpoint import collect, items_role, load_checkpoint
from gradaccum_torch.tensor_io import tensors_to_bytes

if TYPE_CHECKING:
    from gradaccum_torch import Accumulator

__all__ = ["load_distributed", "save_distributed"]

_PER_RANK_KEYS = ("items_in_window", "items_total")


def _common_state(acc: Accumulator, state: dict[str, Any]) -> dict[str, Any]:
    """The part of the state every rank must agree on. Outside ``items``
    normalization item counts are informational and this rank's own."""
    if acc.config.normalization == "items":
        return state
    return {k: v for k, v in state.items() if k not in _PER_RANK_KEYS}


def _ranks(acc: Accumulator) -> DDPDistributed:
    """The accumulator's process group (its distributed side must be a DDPDistributed)."""
    ranks = acc.distributed
    if not isinstance(ranks, DDPDistributed):
        raise UsageError(
            f"a checkpoint of several ranks needs the accumulator's distributed side to be a "
            f"gradaccum_ddp.DDPDistributed, got {type(ranks).__name__}"
        )
    return ranks


def _fold_items(acc: Accumulator, state: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """Move this rank's item count of the open window into ``items.rank<r>``."""
    if acc.config.normalization != "items" or state["position"] == 0:
        return state
    local = torch.zeros((), dtype=torch.float64)
    device_items = acc.inflight_items()
    if device_items is not None:
        local = local + device_items.detach().to("cpu", torch.float64)
    local = local + float(state["items_in_window"])
    ranks = acc.distributed
    files[items_role(ranks.rank, ranks.world_size)] = tensors_to_bytes({"items": local})
    return {**state, "items_in_window": 0, "device_items": True}


def save_distributed(
    acc: Accumulator,
    path: str | os.PathLike[str],
    *,
    model: bool = True,
    optimizer: bool = True,
    scheduler: bool = True,
    scaler: bool = True,
) -> None:
    """Write ``acc``'s checkpoint (see the module docstring); call on every rank."""
    ranks = _ranks(acc)
    rank, world = ranks.rank, ranks.world_size
    group, device = ranks.group, ranks.device
    config = acc.config.to_dict()
    state = acc.machine.state_dict()
    files: dict[str, bytes] = {}
    metadata: dict[str, Any] = {}
    error: BaseException | None = None
    blob = b""
    try:
        files, metadata = collect(
            acc,
            model=model and rank == 0,
            optimizer=optimizer and rank == 0,
            scheduler=scheduler and rank == 0,
            scaler=scaler and rank == 0,
            rank=rank,
            world_size=world,
        )
        state = _fold_items(acc, state, files)
        suffix = f".rank{rank}"
        blob = pack_files({role: data for role, data in files.items() if role.endswith(suffix)})
    except Exception as exc:
        error = exc
    state_digest = digest({"state": _common_state(acc, state), "config": config})
    with communication_errors("the checkpoint's agreement step", rank):
        rows = gather_rows([Tag.SAVE, state_digest, int(error is None), len(blob)], group, device)
    _raise_failures(rows, Tag.SAVE, rank, error, "no checkpoint was written")
    if any(row[:2] != rows[0][:2] for row in rows):
        raise DistributedError(describe([row[:2] for row in rows]))
    with communication_errors("gathering the ranks' in-flight gradients", rank):
        blobs = gather_bytes(blob, group, device, [row[3] for row in rows])
    if blobs is not None:
        try:
            for other, data in enumerate(blobs):
                if other != rank:
                    files.update(unpack_files(data))
            write_checkpoint(
                path,
                state=state,
                config=config,
                files=files,
                producer=Producer(*acc.producer),
                world_size=world,
                metadata=metadata,
            )
        except Exception as exc:
            error = exc
    with communication_errors("the checkpoint's completion step", rank):
        rows = gather_rows([Tag.SAVED, int(error is None)], group, device)
    _raise_failures(
        rows,
        Tag.SAVED,
        rank,
        error,
        "rank 0 could not write the checkpoint (the previous one, if any, is intact)",
    )


def load_distributed(acc: Accumulator, path: str | os.PathLike[str]) -> None:
    """Restore ``acc`` on every rank from ``path``; every rank must see the same
    directory (on several nodes: a shared file system)."""
    ranks = _ranks(acc)
    rank, group, device = ranks.rank, ranks.group, ranks.device
    try:
        manifest = (Path(os.fspath(path)) / MANIFEST_NAME).read_bytes()
    except OSError:
        manifest = b""
    manifest_digest = int.from_bytes(hashlib.sha256(manifest).digest()[:7], "little")
    with communication_errors("the checkpoint's agreement step", rank):
        rows = gather_rows([Tag.LOAD, manifest_digest], group, device)
    if any(row != rows[0] for row in rows):
        raise DistributedError(describe(rows))
    error: BaseException | None = None
    try:
        load_checkpoint(acc, path, rank=rank)
    except Exception as exc:
        error = exc
    with communication_errors("the checkpoint's completion step", rank):
        rows = gather_rows([Tag.LOADED, int(error is None)], group, device)
    _raise_failures(
        rows,
        Tag.LOADED,
        rank,
        error,
        "this rank loaded the checkpoint but the ranks are no longer consistent: fix the "
        "cause and load again on every rank",
    )


def _raise_failures(
    rows: list[list[int]], tag: int, rank: int, error: BaseException | None, consequence: str
) -> None:
    """Raise on every rank when the rows are not all ``tag`` (ranks out of step)
    or some rank reports a failure: this rank's own error where it failed, a
    `DistributedError` naming the failed ranks elsewhere."""
    if any(row[0] != tag for row in rows):
        raise DistributedError(describe(rows))
    ok_at = 2 if tag == Tag.SAVE else 1
    failed = [r for r, row in enumerate(rows) if not row[ok_at]]
    if not failed:
        return
    if error is not None:
        raise error
    raise DistributedError(
        f"rank(s) {failed} failed (their own error says why); {consequence} on rank {rank}"
    )
