"""Rank agreement (spec ACC-D5): what ranks compare to prove they are at the
same point, and the errors that say where each rank was when they are not.

The core decides *when* ranks compare (`WindowDecision.check_ranks`, the
pass-length check of an adapter that knows the pass length) and *what* they
compare (the rows below); adapters only move the rows through the collective
they already make at the boundary and call `describe` on a mismatch. A row
is a short list of integers, the same on every rank that is in step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from gradaccum.state import AccumulationState, WindowDecision

__all__ = [
    "FIX_LENGTHS",
    "ROW",
    "Tag",
    "describe",
    "digest",
    "pass_end_row",
    "pass_row",
    "window_row",
]

ROW = 8
"""The most integers a row holds."""


class Tag:
    """What a row describes (its first entry)."""

    INIT = 1
    PASS = 2
    WINDOW = 3
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
    """A 52-bit digest of a JSON value: exact in an int64 and in a float64, so
    it travels in any row."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 12


def pass_row(state: AccumulationState, length: int) -> list[int]:
    """The row ranks compare before a pass of known ``length`` begins."""
    return [Tag.PASS, state.epoch, state.micro_steps, state.position, length]


def window_row(state: AccumulationState, window: WindowDecision) -> list[int]:
    """The row ranks compare at a boundary (``state`` is the machine's state
    at the boundary, before `commit`): ranks that ran the same microbatches
    close the same window at the same point of the same pass."""
    return [
        Tag.WINDOW,
        state.epoch,
        state.micro_steps,
        state.windows,
        state.window_size,
        state.position,
        int(window.ends_pass),
    ]


def pass_end_row(state: AccumulationState) -> list[int]:
    """The row ranks compare when a pass ends without a boundary
    (`PassDecision.check_ranks`); ``state`` is the state after `end_pass`."""
    return [Tag.END_PASS, state.epoch, state.micro_steps, state.position, state.windows]


def _where(row: Sequence[int]) -> str:
    """What a row says about where its rank is."""
    tag = row[0]
    if tag == Tag.INIT:
        return f"creating the accumulator (config digest {row[1]:013x})"
    if tag == Tag.PASS:
        return (
            f"starting pass {row[1]} with {row[4]} microbatch(es) "
            f"(after {row[2]} microbatches, window position {row[3]})"
        )
    if tag == Tag.WINDOW:
        end = ", the last of its pass" if row[6] else ""
        return (
            f"closing window {row[3] + 1} in pass {row[1]} after {row[2]} microbatches "
            f"({row[5]} of a planned {row[4]}{end})"
        )
    if tag == Tag.END_PASS:
        return (
            f"ending pass {row[1] - 1} after {row[2]} microbatches and {row[4]} windows "
            f"(window position {row[3]})"
        )
    if tag == Tag.SAVE:
        return f"saving a checkpoint (state digest {row[1]:013x})"
    if tag == Tag.SAVED:
        return "finishing a checkpoint save"
    if tag == Tag.LOAD:
        return f"loading a checkpoint (manifest digest {row[1]:013x})"
    if tag == Tag.LOADED:
        return "finishing a checkpoint load" + ("" if row[1] else " (this rank failed)")
    return f"an unknown step (tag {tag})"


def describe(rows: Sequence[Sequence[int]]) -> str:
    """The error message for rows that differ: where every rank is, and the fix."""
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
            f"accumulator with the same config on every rank"
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
    if tags == {Tag.WINDOW}:
        return (
            f"ranks are out of step at a window boundary ({ranks}); the window was not "
            f"stepped. {FIX_LENGTHS}"
        )
    return f"ranks are out of step: {ranks}. {FIX_LENGTHS}"
