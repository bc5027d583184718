"""The DistributedDataParallel accumulator.

The same three lines as a plain loop, with the model wrapped in DDP::

    acc = DDPAccumulator(DistributedDataParallel(model), optimizer, steps=8)
    for x, y in acc.iterate(loader):              # one collective per pass: equal lengths?
        with acc.microbatch():                    # no_sync for forward and backward ...
            acc.backward(loss_fn(acc.ddp(x), y))  # ... except on the window's last microbatch

What is communicated, and when (spec ACC-D):

* the window's last microbatch runs forward and backward with DDP's gradient
  synchronisation on — exactly one gradient all-reduce per window; every
  other microbatch runs under ``no_sync`` (forward included);
* under ``normalization="items"`` the window's item count is summed over the
  ranks at the boundary by one all-reduce of a float64 device tensor;
* :meth:`DDPAccumulator.iterate` compares the pass length of every rank in one
  tiny all-gather before the pass's first microbatch (when the loader has a
  ``len()``); otherwise ranks compare their position at the first and last
  microbatch of every window (see ``lockstep``).

Every *when* comes from the core's state machine; this module only maps the
decisions onto DDP.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradaccum.config import AccumulationConfig
from gradaccum.errors import ConfigError, UsageError
from gradaccum.state import MicrobatchDecision, Topology
from gradaccum.stats import AccumulationListener
from gradaccum_ddp._version import PRODUCER
from gradaccum_ddp.collectives import (
    agree,
    all_reduce_sum,
    average_,
    comm_device,
    communication_errors,
)
from gradaccum_ddp.lockstep import Tag, describe, digest
from gradaccum_torch import Accumulator

__all__ = ["PRODUCER", "DDPAccumulator", "Lockstep"]

T = TypeVar("T")

Lockstep = Literal["auto", "window", "pass"]
"""How ranks verify that they run the same microbatches:

* ``"auto"`` (default): one all-gather of the pass length at the start of a
  pass whose loader has ``len()`` (inside :meth:`DDPAccumulator.iterate`);
  for other passes, ``"window"``.
* ``"window"``: ranks compare their position at the first and at the last
  microbatch of every window and at the end of every pass (one tiny
  all-gather each, never between the two), so ranks that diverge raise
  before the next gradient all-reduce could pair up wrong microbatches.
* ``"pass"``: only the pass-length check. Passes of unknown length are then
  not checked at all: ranks that diverge may pair the all-reduces of different
  windows, or wait until the process-group timeout.

On one rank nothing is checked.
"""


class DDPAccumulator(Accumulator):
    """Exact gradient accumulation for a ``DistributedDataParallel`` model.

    Takes the same arguments as :class:`gradaccum_torch.Accumulator`, with the
    DDP-wrapped model, plus ``lockstep`` (see :data:`Lockstep`). Every rank
    builds it with the same config (checked by one collective here).

    Promises (spec ``ACC-D``): exactly one gradient reduction per window, none
    on the other microbatches (forward included); under ``items`` the window
    gradient is divided by the window's item count over all ranks, so the
    update equals the large-batch item mean over the global batch; decisions,
    counters, learning rates and loss scales are identical on every rank (a
    non-finite gradient on one rank skips the step on all); ranks that would
    run different numbers of microbatches raise
    :class:`~gradaccum.errors.DistributedError` instead of hanging; a dead
    peer makes the others raise :class:`~gradaccum.errors.DistributedError`
    (within the process-group timeout).

    Not supported on more than one rank: ``non_finite="drop_microbatch"`` (a
    microbatch dropped on one rank only would weight the reduced gradient
    differently; the core raises :class:`~gradaccum.errors.ConfigError`, use
    ``"skip"``).
    ``accumulation_dtype="float32"``, ``offload`` and per-microbatch clipping
    accumulate outside ``param.grad``, so under them every microbatch runs
    under ``no_sync`` and the accumulated gradient is all-reduced once at the
    boundary instead (still one reduction per window).
    """

    def __init__(
        self,
        model: DistributedDataParallel,
        optimizer: torch.optim.Optimizer,
        steps: int | None = None,
        *,
        config: AccumulationConfig | None = None,
        scheduler: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
        listeners: Iterable[AccumulationListener] = (),
        lockstep: Lockstep = "auto",
        **options: Any,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first (under torchrun it reads the "
                "environment), or use gradaccum_torch.Accumulator for a single process"
            )
        if not isinstance(model, DistributedDataParallel):
            raise ConfigError(
                f"model must be wrapped in torch.nn.parallel.DistributedDataParallel, got "
                f"{type(model).__name__}; pass DistributedDataParallel(model), or use "
                f"gradaccum_torch.Accumulator for a single process"
            )
        if lockstep not in ("auto", "window", "pass"):
            raise ConfigError(f"lockstep={lockstep!r} must be 'auto', 'window' or 'pass'")
        self.ddp = model
        self._group: dist.ProcessGroup = model.process_group
        self._world_size = dist.get_world_size(self._group)
        self._rank = dist.get_rank(self._group)
        self._comm = comm_device(self._group)
        listeners = list(listeners)
        super().__init__(
            model,
            optimizer,
            steps,
            config=config,
            scheduler=scheduler,
            scaler=scaler,
            listeners=listeners,
            **options,
        )
        self._lockstep: Lockstep = lockstep
        self._pass_checked = False
        self._observers: list[Callable[[str], None]] = []
        self.manual_reductions = 0
        """Gradient reductions made by the accumulator itself (not by DDP's backward)."""
        with communication_errors("the config check at construction", self._rank):
            agree(
                [Tag.INIT, digest(self.config.to_dict())],
                self._group,
                self._comm,
                describe,
            )

    # -- what the torch accumulator asks of a distributed adapter -------------

    def _topology(self) -> Topology:
        return Topology(world_size=self._world_size, averages=True)

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        decision = self._decision
        if (
            decision is not None
            and self._checks_windows()
            and (decision.index == 0 or decision.is_boundary)
        ):
            self._agree_microbatch(decision)
        return contextlib.nullcontext() if sync else self.ddp.no_sync()

    def _manual_sync(self, grads: Sequence[torch.Tensor]) -> None:
        with communication_errors("the gradient all-reduce at the window's boundary", self._rank):
            average_(grads, self._group, self._comm, self._world_size)
        self.manual_reductions += 1
        for observer in self._observers:
            observer("manual")

    def _world_items(self, local: torch.Tensor) -> torch.Tensor:
        with communication_errors("the all-reduce of the window's item count", self._rank):
            return all_reduce_sum(local, self._group, self._comm)

    # -- public surface ----------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank in the DDP process group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of ranks in the DDP process group."""
        return self._world_size

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The DDP model's process group, on which every collective runs."""
        return self._group

    def add_reduction_observer(self, observer: Callable[[str], None]) -> None:
        """Call ``observer("manual")`` after every gradient reduction the
        accumulator makes itself (a window closed without a synced backward).
        :class:`gradaccum_ddp.testing.ReductionCounter` uses it."""
        self._observers.append(observer)

    def iterate(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield one pass's items as :meth:`Accumulator.iterate` does, after
        checking with one all-gather (when ``len(iterable)`` exists) that every
        rank's pass has the same length; raises
        :class:`~gradaccum.errors.DistributedError` on every rank otherwise,
        before any microbatch runs."""
        try:
            total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if total is not None and self._lockstep != "window" and self._world_size > 1:
            state = self._machine.state
            self._agree([Tag.PASS, state.epoch, state.micro_steps, state.position, total])
            self._pass_checked = True
        try:
            yield from super().iterate(iterable)
        finally:
            self._pass_checked = False

    def end_pass(self) -> None:
        """End a pass (:meth:`iterate` calls it); when the pass length was not
        checked at its start, first check that every rank ends it together."""
        if self._checks_windows():
            state = self._machine.state
            self._agree([Tag.END_PASS, state.epoch, state.micro_steps, state.position])
        super().end_pass()

    def backward(self, loss: torch.Tensor) -> bool:
        """As :meth:`Accumulator.backward`; a failed gradient all-reduce (a dead
        or stuck peer) raises :class:`~gradaccum.errors.DistributedError`."""
        decision = self._decision
        communicates = decision is not None and decision.is_boundary
        guard = (
            communication_errors(
                "the boundary backward (gradient all-reduce)", self._rank, always=False
            )
            if communicates
            else contextlib.nullcontext()
        )
        with guard:
            return super().backward(loss)

    def accumulate(
        self, loss: torch.Tensor, *, items: int | torch.Tensor | None = None, last: bool = False
    ) -> bool:
        """Not available under DDP: a forward run outside ``no_sync`` makes DDP
        all-reduce in the backward that follows. Raises :class:`UsageError`."""
        raise UsageError(
            "acc.accumulate(loss) cannot be used with DDP: the forward ran outside "
            "`with acc.microbatch():`, so DDP would all-reduce this microbatch's gradient. "
            "Run forward and backward inside `with acc.microbatch(items): "
            "acc.backward(loss_fn(model(x), y))`"
        )

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        model: bool = True,
        optimizer: bool = True,
        scheduler: bool = True,
        scaler: bool = True,
    ) -> None:
        """Write a checkpoint in the shared format; call it on every rank at the
        same point (between microbatches, mid-window included).

        The ranks first check that they agree on the state (one all-gather);
        rank 0 then gathers every rank's in-flight gradients (mid-window they
        differ) as raw bytes, writes the directory atomically, and tells the
        others whether it succeeded. Raises
        :class:`~gradaccum.errors.DistributedError` on every rank if any rank
        failed; no checkpoint is then half-written.
        """
        from gradaccum_ddp.checkpoint import save_distributed

        self._check_idle("save a checkpoint")
        save_distributed(
            self, path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
        )

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint on every rank: each rank reads the directory and
        takes its own in-flight gradients (``gradients.rank<r>``). Boundary
        checkpoints from any world size (and from gradaccum-torch) load; a
        mid-window checkpoint needs the world size it was written with."""
        from gradaccum_ddp.checkpoint import load_distributed

        self._check_idle("load a checkpoint")
        load_distributed(self, path)

    # -- lockstep checks -------------------------------------------------------------

    def _checks_windows(self) -> bool:
        if self._world_size == 1:
            return False  # one rank cannot disagree with itself
        return self._lockstep == "window" or (self._lockstep == "auto" and not self._pass_checked)

    def _agree(self, row: Sequence[int]) -> list[list[int]]:
        with communication_errors("the lockstep check", self._rank):
            return agree(row, self._group, self._comm, describe)

    def _agree_microbatch(self, decision: MicrobatchDecision) -> None:
        state = self._machine.state
        self._agree(
            [
                Tag.MICROBATCH,
                state.epoch,
                state.micro_steps,
                decision.index,
                int(decision.is_boundary),
                int(decision.ends_pass),
                decision.window_size,
            ]
        )
