"""Adaptive microbatching: hand over a whole batch, gradaccum picks the microbatch size.

::

    acc = Accumulator(model, optimizer,
                      schedule=AdaptiveMicrobatch(target=256, micro_batch=256, grow_after=20),
                      normalization="items")
    for batch in loader:                          # 256 rows per batch
        acc.run(batch, lambda part: loss_fn(model(part["x"]), part["y"]).sum())

`Accumulator.run` slices the batch along dim 0 into microbatches of the
schedule's current size and runs each one through ``acc.microbatch`` /
``acc.backward``; one call is one window, hence one optimizer step. When a
microbatch runs out of memory (`is_out_of_memory`) the microbatch is
cancelled, memory is freed (``gc.collect``, ``torch.cuda.empty_cache``), the
size halves and the rest of the window runs at the new size; after
``grow_after`` clean windows the size doubles again (`AdaptiveMicrobatch`).

Exactness: under ``items`` normalization the window's gradient is the sum of
its microbatches' summed-loss gradients divided by the window's item count,
so how the window is split does not change the update (ACC-K5, ACC-N2).
``mean`` is refused (`AdaptiveMicrobatch` raises `ConfigError`): a mean per
microbatch weights rows of unequal microbatches unequally.

What survives an out-of-memory error:

* a failure in the forward (or before the backward touched a gradient)
  cancels that microbatch exactly: the window's earlier microbatches stay;
* a failure inside the backward cancels it exactly when its gradient is
  isolated from the window's — the window's first microbatch, a buffered
  store (``accumulation_dtype="float32"``, ``offload=True``), or isolated
  microbatches (per-microbatch clipping). Otherwise (``param.grad`` already
  holds earlier microbatches and the backward added part of its gradient)
  the two cannot be separated: the window is discarded and *replayed* from
  its first row at the new size — still the exact large-batch update, counted
  in ``stats.dropped_windows`` and in `OOMEvent.replayed`.

On several ranks (``DDPAccumulator``) every microbatch attempt ends with one
tiny all-gather of a status flag, so all ranks cancel the same microbatch and
keep the same size; while `run` is active the microbatches run without
gradient communication and the boundary reduces the window's gradient once
(so no rank waits inside a backward's all-reduce for a rank that failed).
Without `run` nothing of this happens.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from gradaccum.errors import ConfigError, DistributedError, GradAccumError, UsageError
from gradaccum.schedules import AdaptiveMicrobatch
from gradaccum.state import Phase
from gradaccum_torch.boundary import EXCHANGE_WIDTH, BackwardResult

if TYPE_CHECKING:
    from gradaccum_torch.accumulator import Accumulator

__all__ = [
    "AdaptiveOutOfMemoryError",
    "AdaptiveRunner",
    "Batch",
    "OOMEvent",
    "is_out_of_memory",
    "slice_batch",
]

Batch: TypeAlias = "torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]"
"""A logical batch: a tensor, a tuple/list of tensors or a dict of tensors,
all with the same length along dim 0 (the rows that microbatches split)."""

_CPU_OOM_MESSAGES = (
    "DefaultCPUAllocator: can't allocate memory",
    "not enough memory",
    "CUDA out of memory",
    "out of memory",
)

_OK, _OOM, _ERROR, _OOM_DROPPED = 0.0, 1.0, 2.0, 3.0
"""Status flags: succeeded; out of memory, the window kept; another error; out
of memory inside a backward that could not be separated (the window dropped)."""


class AdaptiveOutOfMemoryError(GradAccumError, MemoryError):
    """Even a microbatch of ``min_micro_batch`` rows ran out of memory (on this
    rank or another): adaptive microbatching cannot go smaller. Raised on
    every rank; the open window is discarded (no step)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors adaptive microbatching recovers from:
    ``torch.cuda.OutOfMemoryError``, ``MemoryError``, and the ``RuntimeError``
    of a failed allocation (CPU: ``"DefaultCPUAllocator: can't allocate
    memory"``, ``"not enough memory"``; other devices: ``"out of memory"``)."""
    if isinstance(exc, GradAccumError):
        return False
    cuda_oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if cuda_oom is not None and isinstance(exc, cuda_oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc)
        return any(m in message for m in _CPU_OOM_MESSAGES)
    return False


def batch_rows(batch: Batch) -> int:
    """The batch's length along dim 0; raises `UsageError` for anything but
    tensors (in a tuple/list/dict) of one common length."""
    tensors = _tensors(batch)
    lengths = {int(t.shape[0]) for t in tensors}
    if len(lengths) != 1:
        raise UsageError(
            f"the batch's tensors have different lengths along dim 0 ({sorted(lengths)}); "
            f"every tensor of a batch must hold the same rows"
        )
    return lengths.pop()


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        values: list[Any] = [batch]
    elif isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        raise UsageError(
            f"the batch is a {type(batch).__name__}; give a tensor, a tuple/list of tensors "
            f"or a dict of tensors sliced along dim 0"
        )
    if not values or not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
        raise UsageError(
            "every value of the batch must be a tensor with at least one dimension (rows "
            "along dim 0); keep other data outside the batch (in loss_fn's closure)"
        )
    return values


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor of the batch (views, no copy), in
    the batch's own structure."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    parts = [v[start:stop] for v in batch]
    return tuple(parts) if isinstance(batch, tuple) else parts


@dataclass(frozen=True, slots=True)
class OOMEvent:
    """One recovered out-of-memory error.

    Attributes:
        window: the window's index (``stats.optimizer_steps + skipped`` when it opened).
        position: microbatches of the window kept when it failed.
        old_size, new_size: the microbatch size before and after (rows).
        ranks: the ranks that ran out of memory.
        replayed: the window had to be replayed from its first row (a
            backward failed after ``param.grad`` held earlier microbatches).
        seconds: time from the failed microbatch's start until the run could
            go on (the failed work, the agreement, ``gc`` and cache release).
        error: the first line of this rank's error (empty when another rank failed).
    """

    window: int
    position: int
    old_size: int
    new_size: int
    ranks: tuple[int, ...]
    replayed: bool
    seconds: float
    error: str


class _PeerFailedError(Exception):
    """Raised inside a successful rank's backward when another rank failed."""

    def __init__(self, flags: list[float]) -> None:
        super().__init__("another rank failed this microbatch")
        self.flags = flags


class AdaptiveRunner:
    """The adaptive loop of one accumulator (``acc.adaptive``): `run` and the
    record of recovered out-of-memory errors. Its only state is in the
    accumulator's schedule state, so checkpoints carry it (ACC-K5)."""

    def __init__(self, acc: Accumulator) -> None:
        self._acc = acc
        self.events: list[OOMEvent] = []
        """Every recovered out-of-memory error, in order (this process only)."""
        self.flag_exchanges = 0
        """Status all-gathers made (several ranks only: one per microbatch attempt)."""
        self._exchanged = False
        self._past_backward = False
        self._agreed: list[float] | None = None

    @property
    def schedule(self) -> AdaptiveMicrobatch:
        """The accumulator's `AdaptiveMicrobatch`; `ConfigError` under another schedule."""
        schedule = self._acc.config.schedule
        if not isinstance(schedule, AdaptiveMicrobatch):
            raise ConfigError(
                f"acc.run() needs schedule=AdaptiveMicrobatch(target=..., micro_batch=...) with "
                f"normalization='items'; the schedule is {schedule.kind!r}. With a fixed "
                f"schedule, slice the batch yourself and use acc.microbatch()"
            )
        return schedule

    @property
    def micro_batch(self) -> int:
        """The microbatch size (rows) the next microbatch will use."""
        return self.schedule.current(self._acc.machine.state.schedule_state)

    @property
    def clean_windows(self) -> int:
        """Windows closed without an out-of-memory error since the last one or the last growth."""
        return int(self._acc.machine.state.schedule_state.get("clean_windows", 0))

    def run(
        self,
        batch: Batch,
        loss_fn: Callable[[Any], torch.Tensor],
        *,
        items: Callable[[Any], int | torch.Tensor] | None = None,
    ) -> BackwardResult:
        """See `Accumulator.run`."""
        acc = self._acc
        schedule = self.schedule
        machine = acc.machine
        if not callable(loss_fn):
            raise UsageError(f"loss_fn={loss_fn!r} must be a callable taking a slice of the batch")
        if items is not None and not callable(items):
            raise UsageError(
                f"items={items!r} must be None (count rows) or a callable returning the "
                f"slice's item count (an int or a 0-d tensor)"
            )
        if acc._open is not None or machine.phase is not Phase.IDLE or machine.state.position:
            raise UsageError(
                "acc.run() runs a whole window and starts between windows; a window is open "
                "(microbatches ran through acc.microbatch()): finish it first"
            )
        rows = batch_rows(batch)
        if rows != schedule.target:
            raise UsageError(
                f"the batch holds {rows} rows but AdaptiveMicrobatch(target={schedule.target}) "
                f"windows hold exactly {schedule.target} per rank; give batches of "
                f"{schedule.target} rows (DataLoader(drop_last=True)) or change target"
            )
        machine.defer_sync(acc.distributed.world_size > 1)
        acc._after_backward = self._backward_done
        try:
            return self._run(batch, rows, loss_fn, items)
        finally:
            acc._after_backward = None
            if machine.phase is Phase.IDLE and not machine.state.position:
                machine.defer_sync(False)  # plain microbatch loops sync as usual again

    # -- the loop -------------------------------------------------------------

    def _run(
        self,
        batch: Batch,
        rows: int,
        loss_fn: Callable[[Any], torch.Tensor],
        items: Callable[[Any], int | torch.Tensor] | None,
    ) -> BackwardResult:
        acc = self._acc
        machine = acc.machine
        schedule = self.schedule
        forward_listeners = [
            listener
            for listener in machine.listeners
            if callable(getattr(listener, "on_forward", None))
        ]
        start = 0
        while True:
            micro = schedule.current(machine.state.schedule_state)
            stop = min(rows, start + micro)
            window = machine.state.windows
            dropped = machine.state.dropped_windows
            position = machine.state.position
            began = time.perf_counter()
            self._exchanged = False
            self._past_backward = False
            self._agreed = None
            outcome = self._attempt(batch, start, stop, loss_fn, items, forward_listeners)
            if isinstance(outcome, BackwardResult):
                start = stop
                if outcome.boundary:
                    return outcome
                continue
            # The failed microbatch's frames (activations) are gone with its exception.
            error = outcome
            flags = self.agreed_flags()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            failed = self._failed_ranks(flags)
            if flags is not None and any(f == _ERROR for f in flags):
                bad = [r for r, f in enumerate(flags) if f == _ERROR]
                if machine.state.position:
                    acc.discard_window()
                raise DistributedError(
                    f"rank(s) {bad} raised an error that is not an out-of-memory error in the "
                    f"same microbatch (window {window}, rows {start}:{stop}); see their log. "
                    f"This rank discarded the window too"
                )
            if flags is not None and machine.state.position and self._must_replay(flags, position):
                acc.discard_window()  # another rank could not keep the window: neither can this
            replayed = machine.state.dropped_windows > dropped
            if machine.state.position == 0:
                start = 0  # nothing of the window is kept: (re)start it
            keep_rows = start
            try:
                new = machine.report_oom(keep_window=True, rows_done=keep_rows)
            except ConfigError:
                if machine.state.position:
                    acc.discard_window()
                raise AdaptiveOutOfMemoryError(
                    f"rank(s) {failed} ran out of memory at micro_batch={micro} rows, the "
                    f"smallest allowed (min_micro_batch={schedule.min_micro_batch}): not even that "
                    f"fits. The window was discarded (no step). Free memory (smaller model or "
                    f"sequence, activation checkpointing, offload=True), or use a larger device"
                    + (f". This rank's error: {error}" if error else "")
                ) from None
            self.events.append(
                OOMEvent(
                    window=window,
                    position=machine.state.position,
                    old_size=micro,
                    new_size=new,
                    ranks=tuple(failed),
                    replayed=replayed,
                    seconds=time.perf_counter() - began,
                    error=error,
                )
            )
            for listener in machine.listeners:
                on_oom = getattr(listener, "on_out_of_memory", None)
                if callable(on_oom):
                    on_oom(self.events[-1])

    def _attempt(
        self,
        batch: Batch,
        start: int,
        stop: int,
        loss_fn: Callable[[Any], torch.Tensor],
        items: Callable[[Any], int | torch.Tensor] | None,
        forward_listeners: list[Any],
    ) -> BackwardResult | str:
        """One microbatch; returns its result, or this rank's error line when
        it (or another rank: an empty line) ran out of memory. Any other error
        propagates (after telling the other ranks)."""
        acc = self._acc
        windows = acc.machine.state.windows
        dropped = acc.machine.state.dropped_windows
        part = slice_batch(batch, start, stop)
        try:
            count = stop - start if items is None else items(part)
            with acc.microbatch(count):
                with contextlib.ExitStack() as stack:
                    for listener in forward_listeners:
                        enter = getattr(listener, "forward_context", None)
                        if callable(enter):
                            stack.enter_context(enter())
                    loss = loss_fn(part)
                for listener in forward_listeners:
                    listener.on_forward(stop - start)
                return acc.backward(loss)
        except _PeerFailedError:
            return ""
        except BaseException as exc:
            oom = is_out_of_memory(exc)
            if self._past_backward:
                # The window's boundary failed. Before its commit the boundary discarded
                # the window and nothing was stepped: one rank replays it exactly.
                # After the commit (the optimizer step), or on several ranks (whose
                # boundary collectives are under way), it cannot be undone.
                state = acc.machine.state
                undone = state.windows == windows and state.position == 0
                if oom and undone and acc.distributed.world_size == 1:
                    return _first_line(exc)
                raise
            kept = acc.machine.state.dropped_windows == dropped
            self._exchange((_OOM if kept else _OOM_DROPPED) if oom else _ERROR)
            if not oom:
                # The other ranks discard the window (`_run`): so does this one, so that
                # every rank is between windows again and the next run() starts clean.
                if acc._open is None and acc.machine.state.position:
                    acc.discard_window()
                raise
            return _first_line(exc)

    # -- agreement (several ranks) -------------------------------------------------

    def _exchange(self, flag: float) -> list[float] | None:
        """All-gather this rank's status flag (once per microbatch attempt);
        ``None`` on one rank, where nothing is exchanged."""
        acc = self._acc
        if acc.distributed.world_size == 1 or self._exchanged:
            return self._agreed
        row = torch.zeros(EXCHANGE_WIDTH, dtype=torch.float64, device=acc._device())
        row[0] = flag
        self._exchanged = True
        self.flag_exchanges += 1
        flags = [float(r[0]) for r in acc.distributed.all_gather(row).tolist()]
        self._agreed = flags
        return flags

    def agreed_flags(self) -> list[float] | None:
        """Every rank's status in the last microbatch attempt (0 ok, 1 out of
        memory, 2 another error); ``None`` on one rank."""
        return self._agreed

    def _backward_done(self) -> None:
        """The hook after a successful backward, before its gradient joins the
        window: on several ranks tell the others, and learn whether one of
        them failed (then this rank cancels the microbatch too)."""
        self._past_backward = True
        flags = self._exchange(_OK)
        if flags is not None and any(f != _OK for f in flags):
            raise _PeerFailedError(flags)

    def _must_replay(self, flags: list[float], position: int) -> bool:
        """Whether every rank must drop the window and replay it: some rank
        dropped it (a backward that failed part-way), or some rank finished the
        microbatch whose gradient cannot be taken back out (the window in
        ``param.grad``, not its first microbatch, not isolated). The same answer
        on every rank: the flags are shared and the rest is the config."""
        config = self._acc.config
        separable = (
            position == 0
            or config.isolates_microbatches
            or config.offload
            or config.accumulation_dtype == "float32"
        )
        return any(f == _OOM_DROPPED for f in flags) or (
            not separable and any(f == _OK for f in flags)
        )

    def _failed_ranks(self, flags: list[float] | None) -> list[int]:
        if flags is None:
            return [self._acc.distributed.rank]
        return [r for r, f in enumerate(flags) if f != _OK]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
