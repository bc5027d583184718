"""Lockstep checks: the rows ranks exchange to prove they are at the same
point, and the errors that say where each rank was when they are not."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["FIX_LENGTHS", "Tag", "describe", "digest"]


class Tag:
    """What a lockstep row describes (its first entry)."""

    INIT = 1
    PASS = 2
    MICROBATCH = 3
    END_PASS = 4
    SAVE = 5
    SAVED = 6
    LOAD = 7
    LOADED = 8


FIX_LENGTHS = (
    "every rank must run the same number of microbatches in every pass: shard the data with "
    "torch.utils.data.DistributedSampler(dataset, drop_last=True) or give every rank equally "
    "many batches"
)


def digest(value: Any) -> int:
    """A 56-bit digest of a JSON value (fits an int64 on every backend)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _where(row: Sequence[int]) -> str:
    """What a lockstep row says about where its rank is."""
    tag = row[0]
    if tag == Tag.INIT:
        return f"creating the accumulator (config digest {row[1]:014x})"
    if tag == Tag.PASS:
        return (
            f"starting pass {row[1]} with {row[4]} microbatch(es) "
            f"(after {row[2]} microbatches, window position {row[3]})"
        )
    if tag == Tag.MICROBATCH:
        flags = []
        if row[4]:
            flags.append("closes its window")
        if row[5]:
            flags.append("last of its pass")
        detail = f" ({', '.join(flags)})" if flags else ""
        return (
            f"microbatch {row[2] + 1} of the run (pass {row[1]}, position {row[3]} of a "
            f"{row[6]}-microbatch window){detail}"
        )
    if tag == Tag.END_PASS:
        return f"ending pass {row[1]} after {row[2]} microbatches (window position {row[3]})"
    if tag == Tag.SAVE:
        return f"saving a checkpoint (state digest {row[1]:014x})"
    if tag == Tag.SAVED:
        return "finishing a checkpoint save"
    if tag == Tag.LOAD:
        return f"loading a checkpoint (manifest digest {row[1]:014x})"
    if tag == Tag.LOADED:
        return "finishing a checkpoint load" + ("" if row[1] else " (this rank failed)")
    return f"an unknown step (tag {tag})"


def describe(rows: list[list[int]]) -> str:
    tags = {row[0] for row in rows}
    ranks = "; ".join(f"rank {r} is {_where(row)}" for r, row in enumerate(rows))
    if tags == {Tag.PASS} and len({row[4] for row in rows}) > 1:
        counts = ", ".join(f"rank {r}: {row[4]}" for r, row in enumerate(rows))
        return (
            f"ranks would run different numbers of microbatches in pass {rows[0][1]} "
            f"({counts}); nothing ran. {FIX_LENGTHS}"
        )
    if tags == {Tag.INIT}:
        return (
            f"ranks were given different accumulation configs ({ranks}); build the "
            f"DDPAccumulator with the same config on every rank"
        )
    if tags == {Tag.SAVE}:
        return (
            f"ranks disagree on the accumulation state, so no checkpoint was written ({ranks}); "
            f"every rank must call save() at the same microbatch"
        )
    if tags == {Tag.LOAD}:
        return (
            f"ranks see different checkpoints at the same path, so none was loaded ({ranks}); "
            f"every rank must read the same directory (a shared file system on several nodes)"
        )
    return f"ranks are out of step: {ranks}. {FIX_LENGTHS}"
