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
* ``iterate`` compares the pass length of every rank in one tiny all-gather
  before the pass's first microbatch (when the loader has a ``len()``);
  otherwise every window's boundary compares the ranks' positions in the
  boundary's one exchange (the same collective that carries the item counts
  under ``items``), so no collective and no host read happens anywhere else
  (see ``lockstep``).

Every *when* comes from the core's state machine; this module only builds the
adapter contract's `DDPDistributed` and hands it to the torch accumulator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradaccum.config import AccumulationConfig
from gradaccum.errors import ConfigError, UsageError
from gradaccum.policies import (
    AccumulationDType,
    ClipPolicy,
    GradientWeights,
    NonFinitePolicy,
    Normalization,
    PartialWindowPolicy,
)
from gradaccum.schedules import Schedule
from gradaccum.stats import AccumulationListener
from gradaccum_ddp._version import PRODUCER, __version__
from gradaccum_ddp.collectives import communication_errors
from gradaccum_ddp.distributed import DDPDistributed
from gradaccum_torch import Accumulator, BackwardResult
from gradaccum_torch.accumulator import unknown_keywords

__all__ = ["PRODUCER", "DDPAccumulator", "Lockstep"]

Lockstep = Literal["auto", "window", "pass"]
"""How ranks verify that they run the same microbatches (spec ACC-D5):

* ``"auto"`` (default) and ``"window"``: a pass whose loader has ``len()``
  starts with one all-gather of the pass length (inside ``iterate``) and
  needs nothing more; in any other pass every boundary compares the ranks'
  positions inside the boundary's one exchange (folded into the item-count
  collective under ``items``; one tiny all-gather under ``mean``/``sum``).
  Ranks that diverge raise `DistributedError` on every rank at
  the next boundary, before anything is stepped.
* ``"pass"``: only the pass-length check. Passes of unknown length are then
  not checked at all: ranks that diverge may pair the all-reduces of different
  windows, or wait until the process-group timeout.

On one rank nothing is checked.
"""


class DDPAccumulator(Accumulator):
    """Exact gradient accumulation for a ``DistributedDataParallel`` model.

    Takes the same arguments as `gradaccum_torch.Accumulator`, with the
    DDP-wrapped model, plus ``lockstep`` (see `Lockstep`). Every rank
    builds it with the same config (checked by one collective here).

    Promises (spec ``ACC-D``): exactly one gradient reduction per window, none
    on the other microbatches (forward included); under ``items`` the window
    gradient is divided by the window's item count over all ranks, so the
    update equals the large-batch item mean over the global batch; decisions,
    counters, learning rates and loss scales are identical on every rank (a
    non-finite gradient on one rank skips the step on all); ranks that would
    run different numbers of microbatches raise
    `DistributedError` instead of hanging; a dead peer makes
    the others raise `DistributedError` (within the
    process-group timeout).

    Not supported on more than one rank: ``non_finite="drop_microbatch"`` (a
    microbatch dropped on one rank only would weight the reduced gradient
    differently; the core raises `ConfigError`, use
    ``"skip"``).
    ``accumulation_dtype="float32"``, ``offload`` and per-microbatch clipping
    accumulate outside ``param.grad``, so under them every microbatch runs
    under ``no_sync`` and the accumulated gradient is all-reduced once at the
    boundary instead (still one reduction per window).
    """

    producer = (PRODUCER, __version__)

    def __init__(
        self,
        model: DistributedDataParallel,
        optimizer: torch.optim.Optimizer,
        steps: int | None = None,
        *,
        config: AccumulationConfig | None = None,
        schedule: Schedule | None = None,
        normalization: Normalization | None = None,
        partial_window: PartialWindowPolicy | None = None,
        non_finite: NonFinitePolicy | None = None,
        clip: ClipPolicy | None = None,
        weights: GradientWeights | None = None,
        accumulation_dtype: AccumulationDType | None = None,
        offload: bool | None = None,
        micro_batch_size: int | None = None,
        scheduler: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
        listeners: Iterable[AccumulationListener] = (),
        before_step: Callable[[Accumulator], None] | None = None,
        track_grad_norm: bool = False,
        lockstep: Lockstep = "auto",
        **unknown: NoReturn,
    ) -> None:
        if unknown:
            raise unknown_keywords(unknown, DDPAccumulator.__init__)
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
        self._ddp_distributed = DDPDistributed(model, check_windows=lockstep != "pass")
        with communication_errors("the config check at construction", self._ddp_distributed.rank):
            super().__init__(
                model,
                optimizer,
                steps,
                config=config,
                schedule=schedule,
                normalization=normalization,
                partial_window=partial_window,
                non_finite=non_finite,
                clip=clip,
                weights=weights,
                accumulation_dtype=accumulation_dtype,
                offload=offload,
                micro_batch_size=micro_batch_size,
                scheduler=scheduler,
                scaler=scaler,
                listeners=listeners,
                before_step=before_step,
                track_grad_norm=track_grad_norm,
                distributed=self._ddp_distributed,
            )

    # -- public surface ----------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank in the DDP process group."""
        return self._ddp_distributed.rank

    @property
    def world_size(self) -> int:
        """The number of ranks in the DDP process group."""
        return self._ddp_distributed.world_size

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The DDP model's process group, on which every collective runs."""
        return self._ddp_distributed.group

    @property
    def comm_device(self) -> torch.device:
        """Where the process group's collectives run (CUDA for NCCL, else CPU)."""
        return self._ddp_distributed.device

    @property
    def manual_reductions(self) -> int:
        """Gradient reductions made by the accumulator itself (not by DDP's backward)."""
        return self._ddp_distributed.manual_reductions

    def add_reduction_observer(self, observer: Callable[[str], None]) -> None:
        """Call ``observer("manual")`` after every gradient reduction the
        accumulator makes itself (a window closed without a synced backward).
        `gradaccum_ddp.testing.ReductionCounter` uses it."""
        self._ddp_distributed.add_reduction_observer(observer)

    def accumulate(
        self, loss: torch.Tensor, *, items: int | torch.Tensor | None = None, last: bool = False
    ) -> BackwardResult:
        """Not available under DDP: a forward run outside ``no_sync`` makes DDP
        all-reduce in the backward that follows. Raises `UsageError`."""
        raise UsageError(
            "acc.accumulate(loss) cannot be used with DDP: the forward ran outside "
            "`with acc.microbatch():`, so DDP would all-reduce this microbatch's gradient. "
            "Run forward and backward inside `with acc.microbatch(items): "
            "acc.backward(loss_fn(model(x), y))`"
        )
