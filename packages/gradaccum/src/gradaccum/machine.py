"""The stateful driver adapters hold: one object, pure transitions inside.

`AccumulationMachine` keeps the current `AccumulationState`, runs the pure
transitions of `gradaccum.state`, and tells listeners what happened.
Adapters call it in this order for every microbatch::

    decision = machine.begin(items=...)       # scale the loss, enter no-sync
    ... forward, backward ...
    window = machine.end()                    # None, or a WindowDecision
    if window is not None:
        ... rescale, unscale, check, clip, weight (as `window` says) ...
        verdict = machine.commit(found_inf=...)   # step / skip / raise
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, SupportsFloat

from gradaccum.config import AccumulationConfig
from gradaccum.errors import ConfigError, UsageError
from gradaccum.schedules import AdaptiveMicrobatch, TargetBatch
from gradaccum.state import (
    SINGLE_PROCESS,
    AccumulationState,
    CommitDecision,
    MicrobatchDecision,
    PassDecision,
    Phase,
    Topology,
    WindowDecision,
    abandon_window,
    begin_microbatch,
    check_items,
    commit,
    end_microbatch,
    end_pass,
)
from gradaccum.stats import AccumulationCallback, AccumulationListener, AccumulationStats

__all__ = ["AccumulationMachine"]


def _wants_microbatch_events(listener: AccumulationListener) -> bool:
    """False for a listener whose ``on_microbatch`` is `AccumulationCallback`'s
    no-op: no stats snapshot is built per microbatch for it."""
    method = getattr(type(listener), "on_microbatch", None)
    return method is not None and method is not AccumulationCallback.on_microbatch


class AccumulationMachine:
    """Holds the accumulation state of one rank and applies transitions.

    Every method validates its input and raises before the state changes.
    Decisions depend only on the config, the state and the arguments, so
    ranks that see the same sequence of calls take the same decisions
    without communicating.

    The open microbatch (between `begin` and `end`) is held here, not in
    the state: `state` is always idle or at a boundary, and `phase` says
    `Phase.MICROBATCH` while a microbatch is open.
    """

    __slots__ = (
        "_before",
        "_config",
        "_defer_sync",
        "_grad_norm",
        "_listeners",
        "_microbatch_listeners",
        "_open",
        "_open_device_items",
        "_open_items",
        "_ranks_in_step",
        "_state",
        "_topology",
        "_unsent",
    )

    def __init__(
        self,
        config: AccumulationConfig,
        *,
        topology: Topology = SINGLE_PROCESS,
        listeners: Iterable[AccumulationListener] = (),
    ) -> None:
        if not isinstance(config, AccumulationConfig):
            raise ConfigError(f"config={config!r} must be an AccumulationConfig")
        if not isinstance(topology, Topology):
            raise ConfigError(f"topology={topology!r} must be a gradaccum Topology")
        world = topology.world_size
        if world > 1 and config.non_finite == "drop_microbatch":
            raise ConfigError(
                f"non_finite='drop_microbatch' is not supported on {world} ranks: ranks that drop "
                f"different microbatches would weight the shared reduced gradient differently; "
                f"use non_finite='skip' (a non-finite gradient on any rank skips on all)"
            )
        schedule = config.schedule
        if isinstance(schedule, TargetBatch) and schedule.world_size != world:
            raise ConfigError(
                f"TargetBatch(world_size={schedule.world_size}) but the run has {world} ranks; "
                f"build it with world_size={world} so the effective batch stays {schedule.target}"
            )
        listeners = list(listeners)
        for listener in listeners:
            _check_listener(listener)
        self._config = config
        self._topology = topology
        self._state = AccumulationState.initial(config)
        self._before = self._state
        self._open: MicrobatchDecision | None = None
        self._open_items = 0
        self._open_device_items = False
        self._ranks_in_step = False
        self._listeners: list[AccumulationListener] = listeners
        self._microbatch_listeners = [x for x in listeners if _wants_microbatch_events(x)]
        self._grad_norm: SupportsFloat | None = None
        self._unsent: tuple[CommitDecision, bool] | None = None
        self._defer_sync = False

    @property
    def config(self) -> AccumulationConfig:
        """The configuration (immutable)."""
        return self._config

    @property
    def topology(self) -> Topology:
        """World size and reduction semantics."""
        return self._topology

    @property
    def state(self) -> AccumulationState:
        """The current state (immutable snapshot), never in `Phase.MICROBATCH`."""
        return self._state

    @property
    def phase(self) -> Phase:
        """`Phase.MICROBATCH` between `begin` and `end`, else the state's phase."""
        return Phase.MICROBATCH if self._open is not None else self._state.phase

    @property
    def current(self) -> MicrobatchDecision | None:
        """The decision of the open microbatch, or ``None`` between microbatches."""
        return self._open

    @property
    def current_items(self) -> int:
        """The open microbatch's host item count (0 when none is open)."""
        return self._open_items

    @property
    def is_accumulating(self) -> bool:
        """True while a window is open (a microbatch ran or runs since the last boundary)."""
        return self._open is not None or self._state.position > 0

    def set_ranks_in_step(self) -> None:
        """Record that the ranks agreed on the current pass's length and their
        position at its start (`gradaccum.lockstep.pass_row`, one collective
        the adapter made): until `end_pass`, boundaries need not compare the
        ranks (``WindowDecision.check_ranks`` is false)."""
        self._ranks_in_step = True

    @property
    def listeners(self) -> tuple[AccumulationListener, ...]:
        """The registered listeners, in order."""
        return tuple(self._listeners)

    @property
    def defers_sync(self) -> bool:
        """True while `defer_sync` is on."""
        return self._defer_sync

    def defer_sync(self, on: bool) -> None:
        """On several ranks, run every microbatch without gradient
        communication and let the boundary reduce the window's gradient once
        (``WindowDecision.needs_manual_sync``), as when the gradient
        accumulates outside ``param.grad``. Adaptive microbatching turns it on
        for its windows: ranks agree that a microbatch succeeded *before* any
        gradient collective, so a rank that ran out of memory never leaves
        the others waiting inside a backward's all-reduce. Between windows only."""
        if self._open is not None or self._state.position > 0:
            raise UsageError("defer_sync() is called between windows, not inside one")
        self._defer_sync = bool(on)

    def add_listener(self, listener: AccumulationListener) -> None:
        """Register a listener for microbatch, step, skip and epoch events."""
        _check_listener(listener)
        self._listeners.append(listener)
        if _wants_microbatch_events(listener):
            self._microbatch_listeners.append(listener)

    @property
    def stats(self) -> AccumulationStats:
        """A snapshot of the counters; see `AccumulationStats`."""
        state = self._state
        micro = self._config.micro_batch_size
        window = state.window_size or self._config.schedule.steps(
            state.epoch, state.windows, state.schedule_state
        )
        return AccumulationStats(
            micro_steps=state.micro_steps,
            optimizer_steps=state.optimizer_steps,
            skipped_steps=state.skipped_steps,
            dropped_microbatches=state.dropped_microbatches,
            dropped_windows=state.dropped_windows,
            position=state.position,
            window_size=window,
            items_in_window=state.items_in_window,
            items_total=state.items_total,
            epoch=state.epoch,
            is_accumulating=self.is_accumulating,
            effective_batch_size=(
                None if micro is None else micro * window * self._topology.world_size
            ),
            world_size=self._topology.world_size,
            _grad_norm=self._grad_norm,
        )

    def begin(
        self,
        items: int | None = None,
        *,
        items_on_device: bool = False,
        last_in_pass: bool = False,
        remaining_in_pass: int | None = None,
    ) -> MicrobatchDecision:
        """Open a microbatch; see `gradaccum.state.begin_microbatch` and
        `gradaccum.state.check_items`. Raises `UsageError` while a microbatch
        is open or a window awaits `commit`, `ItemCountError` for a bad count."""
        if self._open is not None:
            raise UsageError(
                "a microbatch is already open: call backward() for it before starting another"
            )
        count = check_items(self._config, items, items_on_device)
        before = self._state
        self._state, decision = begin_microbatch(
            self._config,
            before,
            last_in_pass=last_in_pass,
            remaining_in_pass=remaining_in_pass,
            topology=self._topology,
        )
        if self._defer_sync and decision.sync_gradients and self._topology.world_size > 1:
            decision = replace(decision, sync_gradients=False)
        self._before = before
        self._open = decision
        self._open_items = count
        self._open_device_items = items_on_device
        return decision

    def cancel(self) -> None:
        """Forget the open microbatch, as if it never began (an exception
        before its backward changed any gradient). Nothing if none is open."""
        if self._open is None:
            return
        self._state = self._before
        self._open = None
        self._open_items = 0
        self._open_device_items = False

    def end(self, *, dropped: bool = False) -> WindowDecision | None:
        """Close the open microbatch; see `gradaccum.state.end_microbatch`."""
        decision = self._open
        if decision is None:
            raise UsageError("backward() was called outside a microbatch; open one first")
        self._state, window = end_microbatch(
            self._config,
            self._state,
            decision,
            items=self._open_items,
            items_on_device=self._open_device_items,
            dropped=dropped,
            topology=self._topology,
            ranks_in_step=self._ranks_in_step,
        )
        self._open = None
        self._open_items = 0
        self._open_device_items = False
        if self._microbatch_listeners:
            stats = self.stats
            for listener in self._microbatch_listeners:
                listener.on_microbatch(stats)
        return window

    def commit(
        self,
        *,
        found_inf: bool = False,
        amp_overflow: bool = False,
        world_items: int | None = None,
        grad_norm: SupportsFloat | None = None,
        notify: bool = True,
    ) -> CommitDecision:
        """Decide step or skip for the closed window; see `gradaccum.state.commit`.

        ``grad_norm`` (a float or a 0-d device tensor) is the window's
        pre-clip gradient norm, kept for `stats` without reading it.
        ``notify=False`` holds the listeners' ``on_step`` / ``on_skip`` (and
        ``on_epoch_end``) back until `notify_commit`: an adapter calls it after
        the optimizer and scheduler stepped, so listeners see the step done.
        """
        ending_epoch = self._state.epoch_end_pending
        self._state, verdict = commit(
            self._config,
            self._state,
            found_inf=found_inf,
            amp_overflow=amp_overflow,
            world_items=world_items,
        )
        if grad_norm is not None:
            self._grad_norm = grad_norm
        if notify:
            self._notify(verdict, ending_epoch)
        else:
            self._unsent = (verdict, ending_epoch)
        return verdict

    def notify_commit(self) -> None:
        """Send the events of a `commit` made with ``notify=False`` (nothing if none)."""
        unsent, self._unsent = self._unsent, None
        if unsent is not None:
            self._notify(*unsent)

    def _notify(self, verdict: CommitDecision, ending_epoch: bool) -> None:
        if self._listeners:
            stats = self.stats
            for listener in self._listeners:
                if verdict.step_optimizer:
                    listener.on_step(stats)
                else:
                    listener.on_skip(stats, verdict.outcome)
                if ending_epoch:
                    listener.on_epoch_end(stats)

    def end_pass(self) -> PassDecision:
        """End a pass; see `gradaccum.state.end_pass`. With the ``step``
        policy and an open window, apply the returned window decision and
        call `commit`, which then reports the epoch's end."""
        if self._open is not None:
            raise UsageError(
                "the pass cannot end during phase 'microbatch'; finish the microbatch "
                "(backward) first"
            )
        self._state, decision = end_pass(
            self._config, self._state, topology=self._topology, ranks_in_step=self._ranks_in_step
        )
        self._ranks_in_step = False
        if decision.action != "close" and self._listeners:
            stats = self.stats
            for listener in self._listeners:
                listener.on_epoch_end(stats)
        return decision

    def abandon(self) -> None:
        """Drop the open window without a step (see
        `gradaccum.state.abandon_window`): between microbatches, or at a
        boundary whose work failed before `commit`. The adapter discards the
        window's gradient. Counted in ``dropped_windows``."""
        if self._open is not None:
            raise UsageError(
                "a window cannot be abandoned while a microbatch is open; cancel() it first"
            )
        self._state = abandon_window(self._state)

    def report_oom(self, *, keep_window: bool = False, rows_done: int = 0) -> int:
        """Record an out-of-memory error under `AdaptiveMicrobatch`
        and return the new (halved) microbatch size.

        Call it between microbatches (cancel the failed one first). By
        default a window in progress is abandoned (counted in
        ``dropped_windows``): the adapter zeroes its gradient and replays the
        window's data in microbatches of the new size, so every window still
        holds ``target`` items.

        With ``keep_window=True`` the window goes on: its ``rows_done`` rows
        (the microbatches that completed) stay, and it is re-planned to hold
        ``ceil((target - rows_done) / new size)`` more microbatches; the
        window, when it closes, does not count as clean (`AdaptiveMicrobatch.after_window`).
        Raises `ConfigError` at ``min_micro_batch`` (nothing changed).
        """
        schedule = self._config.schedule
        if not isinstance(schedule, AdaptiveMicrobatch):
            raise ConfigError(
                f"report_oom() needs the AdaptiveMicrobatch schedule; the schedule is "
                f"{schedule.kind!r}"
            )
        if self._open is not None or self._state.phase is not Phase.IDLE:
            raise UsageError(
                "report_oom() is called between microbatches: cancel() the failed microbatch first"
            )
        if not keep_window:
            new_schedule_state = schedule.after_oom(self._state.schedule_state)
            self._state = replace(abandon_window(self._state), schedule_state=new_schedule_state)
            return schedule.current(new_schedule_state)
        state = self._state
        if (
            isinstance(rows_done, bool)
            or not isinstance(rows_done, int)
            or not 0 <= rows_done < schedule.target
            or (state.position == 0 and rows_done != 0)
        ):
            raise UsageError(
                f"rows_done={rows_done!r} must count the rows of the window's completed "
                f"microbatches: an int in [0, target={schedule.target}), 0 with no window open"
            )
        new_schedule_state = schedule.after_oom_in_window(state.schedule_state)
        micro = schedule.current(new_schedule_state)
        changes: dict[str, Any] = {"schedule_state": new_schedule_state}
        if state.position > 0:
            left = -(-(schedule.target - rows_done) // micro)
            changes["window_size"] = state.position + left
        self._state = replace(state, **changes)
        self._before = self._state
        return micro

    def state_dict(self) -> dict[str, Any]:
        """JSON state for checkpoints; only between microbatches."""
        if self._open is not None:
            raise UsageError(
                "cannot save the accumulation state during phase 'microbatch'; save between "
                "microbatches (after backward() returns)"
            )
        return self._state.state_dict()

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore `state_dict` output; validated before anything changes.
        Only between microbatches."""
        state = AccumulationState.from_state_dict(data)
        self._config.schedule.check_state(state.schedule_state)
        if self._open is not None or self._state.phase is not Phase.IDLE:
            raise UsageError(
                f"cannot load a state during phase {self.phase.value!r}; load between microbatches"
            )
        self._state = state
        self._before = state
        self._ranks_in_step = False


def _check_listener(listener: object) -> None:
    if not isinstance(listener, AccumulationListener):
        raise ConfigError(
            f"listener {listener!r} is not an AccumulationListener: give it on_microbatch, "
            f"on_step, on_skip and on_epoch_end, or subclass gradaccum.AccumulationCallback"
        )
