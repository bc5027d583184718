"""Rank programs for the off-boundary test (spec ACC-D6): every collective and every
host read a rank makes, attributed to the microbatch (or the pass start or end) in
which it happened.

* :class:`CollectiveCounter` wraps the collectives of ``torch.distributed`` (the
  module functions every caller reaches as ``dist.<name>``, in ``torch.distributed``
  and in ``torch.distributed.distributed_c10d``) and records each outermost call by
  name, telling DDP's own bucket all-reduces (made from DDP's communication hook,
  which :class:`~gradaccum_ddp.testing.ReductionCounter` installs) from the others:
  the others are the accumulator's.
* :class:`~gradaccum_conformance.probes.HostReadCounter` counts the host reads.

Like ``ddp_workers``, programs write JSON; the parent asserts.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ddp_workers as W
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.nn.parallel import DistributedDataParallel

from gradaccum_conformance.probes import HostReadCounter
from gradaccum_ddp import DDPAccumulator
from gradaccum_ddp.testing import ReductionCounter

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)
DDP_HOOKS = "torch.distributed.algorithms.ddp_comm_hooks.default_hooks"


class CollectiveCounter:
    """Counts calls of ``torch.distributed`` collectives inside ``with counter:``.

    ``calls`` lists ``(name, by_ddp)`` for each outermost call (``all_gather_object``
    calling ``all_gather`` counts once); ``by_ddp`` is true for the all-reduces DDP's
    communication hook makes for its gradient buckets.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self._taken = 0
        self._saved: list[tuple[Any, str, Any]] = []
        self._local = threading.local()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        local = self._local

        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(local, "depth", 0)
            if depth == 0:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                self.calls.append((name, caller == DDP_HOOKS))
            local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                local.depth = depth

        return counted

    def __enter__(self) -> CollectiveCounter:
        wrappers: dict[int, Callable[..., Any]] = {}
        for module in (dist, c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is None:
                    continue
                wrapper = wrappers.setdefault(id(original), self._wrap(name, original))
                setattr(module, name, wrapper)
                self._saved.append((module, name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def take(self) -> tuple[list[str], int]:
        """The accumulator's collectives (names) and DDP's bucket all-reduces since
        the previous call."""
        new, self._taken = self.calls[self._taken :], len(self.calls)
        return [name for name, by_ddp in new if not by_ddp], sum(by_ddp for _, by_ddp in new)


def _generator(items: Sequence[Any]) -> Iterator[Any]:
    yield from items


class _Phases:
    """Takes the counts at the edges of each microbatch and files them."""

    def __init__(
        self, collectives: CollectiveCounter, reads: HostReadCounter, reductions: ReductionCounter
    ) -> None:
        self.collectives = collectives
        self.reads = reads
        self.reductions = reductions
        self._backward = reductions.backward_reductions
        self._buckets = reductions.buckets

    def take(self) -> dict[str, Any]:
        acc, ddp_calls = self.collectives.take()
        host = self.reads.take()
        backward = self.reductions.backward_reductions - self._backward
        buckets = self.reductions.buckets - self._buckets
        self._backward = self.reductions.backward_reductions
        self._buckets = self.reductions.buckets
        return {
            "acc": acc,
            "ddp_calls": ddp_calls,
            "ddp_reductions": backward,
            "buckets": buckets,
            "reads": host.reads,
            "sites": list(host.sites),
        }


def run_config(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One pass of ``spec["microbatches"]`` through a fresh DDPAccumulator with the
    default ``lockstep``; what each phase of the pass communicated and read."""
    model = W.make_model(spec["seed"])
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    acc = DDPAccumulator(ddp, opt, steps=spec["steps"], normalization=spec["normalization"])
    reductions = ReductionCounter(ddp, acc)
    data = []
    for j in range(spec["microbatches"]):
        n = 2 + (3 * j + rank) % 5  # unequal item counts across microbatches and ranks
        x, y = W.microbatch(spec["seed"], rank, j, n)
        items: int | torch.Tensor | None = None
        if spec["normalization"] == "items":
            items = torch.tensor(n) if spec["device_items"] else n
        data.append((x, y, items))
    source = data if spec["sized"] else _generator(data)

    microbatches: list[dict[str, Any]] = []
    with CollectiveCounter() as collectives, HostReadCounter() as reads:
        phases = _Phases(collectives, reads, reductions)
        start: dict[str, Any] | None = None
        for x, y, items in acc.iterate(source):
            before = phases.take()  # the pass start, or what followed the last microbatch
            if start is None:
                start = before
            else:
                microbatches[-1]["after"] = before
            windows = acc.machine.state.windows
            with acc.microbatch(items):
                acc.backward(W.loss_fn(ddp(x), y, spec["normalization"]))
            boundary = acc.machine.state.windows != windows
            microbatches.append({"boundary": boundary, **phases.take()})
        end = phases.take()  # after the last microbatch: the pass's end inside iterate()
    return {
        "start": start,
        "microbatches": microbatches,
        "end": end,
        "optimizer_steps": acc.stats.optimizer_steps,
        "windows": acc.machine.state.windows,
    }


def off_boundary_program(
    rank: int, world_size: int, out_dir: str, specs: list[dict[str, Any]]
) -> None:
    """Run every config in ``specs``; write ``<name>.rank<r>.json`` for each."""
    for spec in specs:
        try:
            result: dict[str, Any] = run_config(rank, spec)
        except Exception as exc:
            result = {"error": W.error_info(exc)}
        W.write_json(Path(out_dir) / f"{spec['name']}.rank{rank}.json", result)
