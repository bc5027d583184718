"""The stateful driver adapters hold: one object, pure transitions inside.

:class:`AccumulationMachine` keeps the current :class:`AccumulationState`,
runs the pure transitions of :mod:`gradaccum.state`, and tells listeners
what happened. Adapters call it in this order for every microbatch::

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
from gradaccum.errors import ConfigError
from gradaccum.schedules import AdaptiveMicrobatch, TargetBatch
from gradaccum.state import (
    SINGLE_PROCESS,
    AccumulationState,
    CommitDecision,
    MicrobatchDecision,
    PassDecision,
    Topology,
    WindowDecision,
    abandon_window,
    begin_microbatch,
    cancel_microbatch,
    commit,
    end_microbatch,
    end_pass,
)
from gradaccum.stats import AccumulationListener, AccumulationStats

__all__ = ["AccumulationMachine"]


class AccumulationMachine:
    """Holds the accumulation state of one rank and applies transitions.

    Every method validates its input and raises before the state changes.
    Decisions depend only on the config, the state and the arguments, so
    ranks that see the same sequence of calls take the same decisions
    without communicating.
    """

    __slots__ = ("_config", "_grad_norm", "_listeners", "_state", "_topology")

    def __init__(
        self,
        config: AccumulationConfig,
        *,
        topology: Topology = SINGLE_PROCESS,
        listeners: Iterable[AccumulationListener] = (),
    ) -> None:
        if not isinstance(config, AccumulationConfig):
            raise ConfigError(f"config={config!r} must be an AccumulationConfig")
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
        self._config = config
        self._topology = topology
        self._state = AccumulationState.initial(config)
        self._listeners: list[AccumulationListener] = list(listeners)
        self._grad_norm: SupportsFloat | None = None

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
        """The current state (immutable snapshot)."""
        return self._state

    def add_listener(self, listener: AccumulationListener) -> None:
        """Register a listener for microbatch, step, skip and epoch events."""
        self._listeners.append(listener)

    @property
    def stats(self) -> AccumulationStats:
        """A snapshot of the counters; see :class:`AccumulationStats`."""
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
            is_accumulating=state.is_accumulating,
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
        """Open a microbatch; see :func:`gradaccum.state.begin_microbatch`."""
        self._state, decision = begin_microbatch(
            self._config,
            self._state,
            items=items,
            items_on_device=items_on_device,
            last_in_pass=last_in_pass,
            remaining_in_pass=remaining_in_pass,
            topology=self._topology,
        )
        return decision

    def cancel(self) -> None:
        """Forget the open microbatch (an exception before its backward)."""
        self._state = cancel_microbatch(self._state)

    def end(self, *, dropped: bool = False) -> WindowDecision | None:
        """Close the open microbatch; see :func:`gradaccum.state.end_microbatch`."""
        self._state, window = end_microbatch(
            self._config, self._state, dropped=dropped, topology=self._topology
        )
        if self._listeners:
            stats = self.stats
            for listener in self._listeners:
                listener.on_microbatch(stats)
        return window

    def commit(
        self,
        *,
        found_inf: bool = False,
        amp_overflow: bool = False,
        world_items: int | None = None,
        grad_norm: SupportsFloat | None = None,
    ) -> CommitDecision:
        """Decide step or skip for the closed window; see :func:`gradaccum.state.commit`.

        ``grad_norm`` (a float or a 0-d device tensor) is the window's
        pre-clip gradient norm, kept for :attr:`stats` without reading it.
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
        if self._listeners:
            stats = self.stats
            for listener in self._listeners:
                if verdict.step_optimizer:
                    listener.on_step(stats)
                else:
                    listener.on_skip(stats, verdict.outcome)
                if ending_epoch:
                    listener.on_epoch_end(stats)
        return verdict

    def end_pass(self) -> PassDecision:
        """End a pass; see :func:`gradaccum.state.end_pass`. With the ``step``
        policy and an open window, apply the returned window decision and
        call :meth:`commit`, which then reports the epoch's end."""
        self._state, decision = end_pass(self._config, self._state, topology=self._topology)
        if decision.action != "close" and self._listeners:
            stats = self.stats
            for listener in self._listeners:
                listener.on_epoch_end(stats)
        return decision

    def report_oom(self) -> int:
        """Record an out-of-memory error under :class:`AdaptiveMicrobatch`
        and return the new (halved) microbatch size.

        Call it between microbatches (cancel the failed one first). A window
        in progress is abandoned (counted in ``dropped_windows``): the adapter
        zeroes its gradient and replays the window's data in microbatches of
        the new size, so every window still holds ``target`` items.
        """
        schedule = self._config.schedule
        if not isinstance(schedule, AdaptiveMicrobatch):
            raise ConfigError(
                f"report_oom() needs the AdaptiveMicrobatch schedule; the schedule is "
                f"{schedule.kind!r}"
            )
        new_schedule_state = schedule.after_oom(self._state.schedule_state)
        self._state = replace(abandon_window(self._state), schedule_state=new_schedule_state)
        return schedule.current(new_schedule_state)

    def state_dict(self) -> dict[str, Any]:
        """JSON state for checkpoints; only between microbatches."""
        return self._state.state_dict()

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; validated before anything changes."""
        state = AccumulationState.from_state_dict(data)
        self._config.schedule.check_state(state.schedule_state)
        self._state = state
