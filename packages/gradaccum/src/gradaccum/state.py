"""The accumulation state and its pure transitions.

Every function here takes a config and a state and returns a *new* state and
a *decision*; nothing is mutated and nothing touches a tensor. Adapters apply
decisions (scale the loss, enter no-sync, rescale, clip, step, zero); they
never re-derive them. The life of one window::

    begin_microbatch -> end_microbatch      (position 0 .. k-2: accumulate)
    begin_microbatch -> end_microbatch      (position k-1: boundary, returns a WindowDecision)
    commit                                  (step or skip; returns a CommitDecision)

and at the end of a pass, `end_pass` applies the partial-window policy.

A microbatch in flight is not part of the state: `begin_microbatch` returns
the state unchanged except when it opens a window, and the caller hands the
`MicrobatchDecision` back to `end_microbatch`. A microbatch that fails before
its backward is forgotten by keeping the state from before it began.
Spec references (``ACC-…``) point into ``spec/accumulation.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from gradaccum.config import AccumulationConfig
from gradaccum.errors import ConfigError, ItemCountError, UsageError
from gradaccum.policies import ClipPolicy
from gradaccum.schedules import AdaptiveMicrobatch

__all__ = [
    "SINGLE_PROCESS",
    "STATE_INT_FIELDS",
    "STATE_VERSION",
    "AccumulationState",
    "CommitDecision",
    "MicrobatchDecision",
    "Outcome",
    "PassDecision",
    "Phase",
    "Topology",
    "WindowDecision",
    "abandon_window",
    "begin_microbatch",
    "check_items",
    "commit",
    "end_microbatch",
    "end_pass",
]

STATE_VERSION = 1

Outcome: TypeAlias = Literal["stepped", "amp_overflow", "non_finite", "empty"]


class Phase(enum.Enum):
    """Where the machine is inside a window."""

    IDLE = "idle"
    """Between microbatches: the only phase in which a state can be saved."""
    MICROBATCH = "microbatch"
    """A microbatch has begun; its backward has not finished. Only a driver
    (`AccumulationMachine.phase`) is in this phase: the pure state never is."""
    BOUNDARY = "boundary"
    """The window has closed; the step has not been committed."""


@dataclass(frozen=True, slots=True)
class Topology:
    """How gradients are communicated: ``world_size`` ranks, and whether the
    communication *averages* (DDP's all-reduce does) or sums them."""

    world_size: int = 1
    averages: bool = True
    check_windows: bool = True
    """On several ranks, compare the ranks' positions at every boundary
    (`WindowDecision.check_ranks`, ACC-D5). Off only when the adapter
    guarantees lockstep another way and accepts a hang otherwise."""

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int):
            raise ConfigError(f"world_size={self.world_size!r} must be an int >= 1")
        if self.world_size < 1:
            raise ConfigError(f"world_size={self.world_size!r} must be >= 1")
        for name in ("averages", "check_windows"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")


SINGLE_PROCESS = Topology()
"""One rank: no communication."""


@dataclass(frozen=True, slots=True)
class MicrobatchDecision:
    """What to do for the microbatch that begins now.

    Attributes:
        index: position of this microbatch in its window, from 0.
        window_size: the planned number of microbatches in the window.
        is_boundary: this is the last microbatch of its window; after its
            backward the window closes.
        sync_gradients: communicate gradients in this backward (forward
            included, for DDP). True exactly on boundaries (ACC-D1), except
            on several ranks when the gradient accumulates outside
            ``param.grad``: then never, and the boundary reduces manually.
        loss_multiplier: multiply the loss by this before backward.
        isolate: compute this microbatch's gradient on its own before adding
            it to the window (per-microbatch clipping or ``drop_microbatch``).
        clip: the per-microbatch clip to apply to the isolated gradient.
        ends_pass: this microbatch is the last of its pass.
    """

    index: int
    window_size: int
    is_boundary: bool
    sync_gradients: bool
    loss_multiplier: float
    isolate: bool
    clip: ClipPolicy | None
    ends_pass: bool


@dataclass(frozen=True, slots=True)
class WindowDecision:
    """What to do to the accumulated gradient when a window closes, in this
    order (ACC-B1): sync if ``needs_manual_sync``; multiply by
    ``grad_multiplier``; divide by the window's item count over all ranks if
    ``divide_by_world_items``; unscale (AMP); check for non-finite values;
    clip with ``clip``; apply the gradient weights if ``apply_weights``; then
    ask `commit` whether to step.

    ``grad_multiplier == 1.0`` and ``divide_by_world_items == False`` means
    the gradient is already exact and needs no pass over it.

    ``check_ranks``: on several ranks, compare every rank's
    `gradaccum.lockstep.window_row` in the boundary's one exchange
    (ACC-D5), so ranks that drifted apart raise `DistributedError` instead
    of stepping. ``ends_pass``: the window closes its pass (its last
    microbatch was the pass's last, or `end_pass` closed it).
    """

    window_size: int
    contributing: int
    items: int
    grad_multiplier: float
    divide_by_world_items: bool
    needs_manual_sync: bool
    clip: ClipPolicy | None
    apply_weights: bool
    empty: bool
    partial: bool
    check_ranks: bool = False
    ends_pass: bool = False


@dataclass(frozen=True, slots=True)
class CommitDecision:
    """The verdict on a closed window.

    Attributes:
        outcome: ``"stepped"``, ``"amp_overflow"`` (the GradScaler found
            inf/nan: skip, the scaler lowers its scale), ``"non_finite"``
            (a non-finite gradient without AMP), or ``"empty"`` (every
            microbatch was dropped or the window had no items).
        step_optimizer: call ``optimizer.step()`` (through the scaler under AMP).
        step_scheduler: step the LR scheduler: exactly when the optimizer
            stepped (ACC-S3).
        raise_error: the non-finite policy is ``raise``: after zeroing the
            gradients, raise `NonFiniteGradientError`.
    """

    outcome: Outcome
    step_optimizer: bool
    step_scheduler: bool
    raise_error: bool


@dataclass(frozen=True, slots=True)
class PassDecision:
    """What the end of a pass does with an open window.

    ``action`` is ``"none"`` (no window open), ``"close"`` (policy ``step``:
    apply ``window`` as at a boundary, then `commit`), ``"discard"``
    (policy ``drop``: zero the gradients) or ``"carry"`` (keep them; the
    window continues in the next pass).
    ``check_ranks``: on several ranks whose pass length was not agreed
    beforehand, the ranks compare `gradaccum.lockstep.pass_end_row` once
    (ACC-D5): a pass ended without a boundary (``drop``, ``carry``, or no
    look-ahead) is otherwise never compared. A ``"close"`` window carries
    its own check (`WindowDecision.check_ranks`).
    """

    action: Literal["none", "close", "discard", "carry"]
    window: WindowDecision | None = None
    check_ranks: bool = False


@dataclass(frozen=True)
class AccumulationState:
    """Where accumulation stands. Counters only ever grow (ACC-C1).

    Attributes:
        epoch: passes completed.
        position: microbatches completed in the open window.
        window_size: planned size of the open window (0 when none is open).
        contributing: microbatches of the open window whose gradient counts.
        items_in_window: items counted in the open window on this rank.
        items_total: items of all committed (stepped) windows, over all ranks when known.
        micro_steps: microbatches completed, dropped ones included.
        optimizer_steps: successful optimizer steps: the *effective step*.
        skipped_steps: closed windows that did not step.
        windows: closed windows (stepped + skipped).
        dropped_microbatches: microbatches left out by ``drop_microbatch``.
        dropped_windows: windows discarded before their step: partial
            windows under the ``drop`` policy, and windows abandoned by
            `abandon_window` (an out-of-memory replay, a failed boundary).
        synced_in_window: a backward of the open window communicated.
        device_items: some item count of the open window lives on the device.
        schedule_state: the schedule's JSON state (adaptive schedules).
        phase: `Phase.IDLE` or `Phase.BOUNDARY`; not saved (states are
            saved only when idle).
        pending: the closed window awaiting `commit`.
        epoch_end_pending: the pending window was closed by `end_pass`.
    """

    epoch: int = 0
    position: int = 0
    window_size: int = 0
    contributing: int = 0
    items_in_window: int = 0
    items_total: int = 0
    micro_steps: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    windows: int = 0
    dropped_microbatches: int = 0
    dropped_windows: int = 0
    synced_in_window: bool = False
    device_items: bool = False
    schedule_state: Mapping[str, Any] = field(default_factory=dict)
    phase: Phase = Phase.IDLE
    pending: WindowDecision | None = None
    epoch_end_pending: bool = False

    @classmethod
    def initial(cls, config: AccumulationConfig) -> AccumulationState:
        """The state before the first microbatch."""
        return cls(schedule_state=config.schedule.initial_state())

    @property
    def is_accumulating(self) -> bool:
        """True while a window is open (some microbatch ran since the last boundary)."""
        return self.position > 0

    def state_dict(self) -> dict[str, Any]:
        """The JSON form saved in checkpoints (``state`` in the manifest).

        Raises `UsageError` unless the machine is between microbatches.
        """
        if self.phase is not Phase.IDLE:
            raise UsageError(
                f"cannot save the accumulation state during phase {self.phase.value!r}; "
                f"save between microbatches (after backward() returns)"
            )
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "window_size": self.window_size,
            "contributing": self.contributing,
            "items_in_window": self.items_in_window,
            "items_total": self.items_total,
            "micro_steps": self.micro_steps,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "windows": self.windows,
            "dropped_microbatches": self.dropped_microbatches,
            "dropped_windows": self.dropped_windows,
            "synced_in_window": self.synced_in_window,
            "device_items": self.device_items,
            "schedule_state": dict(self.schedule_state),
        }

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> AccumulationState:
        """Parse and validate `state_dict` output; raises `ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"accumulation state must be a mapping, got {type(data).__name__}")
        # ``device_items`` is optional in the v1 format: absent means False.
        data = {"device_items": False, **data}
        version = data.get("version")
        if isinstance(version, bool) or version != STATE_VERSION:
            raise ConfigError(
                f"accumulation state version {version!r} is not supported; "
                f"this release reads version {STATE_VERSION}"
            )
        expected = set(STATE_INT_FIELDS) | {
            "version",
            "synced_in_window",
            "device_items",
            "schedule_state",
        }
        missing, unknown = expected - set(data), set(data) - expected
        if missing or unknown:
            raise ConfigError(
                f"accumulation state has missing keys {sorted(missing)} and unknown keys "
                f"{sorted(unknown)}; it was not written by a compatible gradaccum"
            )
        values: dict[str, Any] = {}
        for name in STATE_INT_FIELDS:
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"accumulation state {name}={value!r} must be an integer >= 0")
            values[name] = value
        for name in ("synced_in_window", "device_items"):
            if not isinstance(data[name], bool):
                raise ConfigError(f"accumulation state {name}={data[name]!r} must be a bool")
            values[name] = data[name]
        if not isinstance(data["schedule_state"], Mapping):
            raise ConfigError("accumulation state schedule_state must be a mapping")
        position, window_size = values["position"], values["window_size"]
        # Between microbatches an open window is never complete (its last
        # microbatch closes it), and no window means position 0.
        if not (position < window_size or position == window_size == 0):
            raise ConfigError(
                f"accumulation state position={position} with window_size={window_size} is "
                f"impossible between microbatches (need position < window_size, or both 0)"
            )
        if values["optimizer_steps"] + values["skipped_steps"] != values["windows"]:
            raise ConfigError(
                f"accumulation state optimizer_steps={values['optimizer_steps']} + "
                f"skipped_steps={values['skipped_steps']} must equal windows={values['windows']}"
            )
        if values["synced_in_window"]:
            raise ConfigError(
                "accumulation state synced_in_window=True is impossible between microbatches: "
                "only a window's closing microbatch synchronises"
            )
        if values["contributing"] > values["position"]:
            raise ConfigError(
                f"accumulation state contributing={values['contributing']} exceeds "
                f"position={values['position']}"
            )
        if position == 0 and (values["items_in_window"] or values["device_items"]):
            raise ConfigError(
                f"accumulation state items_in_window={values['items_in_window']} / "
                f"device_items={values['device_items']} with no window open (position=0) is "
                f"impossible: a window's items are reset when it closes"
            )
        if values["dropped_microbatches"] > values["micro_steps"]:
            raise ConfigError(
                f"accumulation state dropped_microbatches={values['dropped_microbatches']} "
                f"exceeds micro_steps={values['micro_steps']}"
            )
        return cls(schedule_state=dict(data["schedule_state"]), **values)


_new_state = object.__new__
_set_dict = object.__setattr__


def _evolve(state: AccumulationState, changes: dict[str, Any]) -> AccumulationState:
    """``dataclasses.replace`` without re-running ``__init__``: a copy of the
    frozen state's fields with ``changes`` applied (about 0.5 µs instead of 5;
    this runs once per microbatch)."""
    new = _new_state(AccumulationState)
    fields = state.__dict__.copy()
    fields.update(changes)
    _set_dict(new, "__dict__", fields)
    return new


_DECISIONS: dict[tuple[Any, ...], MicrobatchDecision] = {}


def _microbatch_decision(
    index: int,
    window_size: int,
    is_boundary: bool,
    sync_gradients: bool,
    loss_multiplier: float,
    isolate: bool,
    clip: ClipPolicy | None,
    ends_pass: bool,
) -> MicrobatchDecision:
    # Decisions are immutable and repeat every window: build each one once.
    key = (
        index,
        window_size,
        is_boundary,
        sync_gradients,
        loss_multiplier,
        isolate,
        clip,
        ends_pass,
    )
    decision = _DECISIONS.get(key)
    if decision is None:
        if len(_DECISIONS) >= 4096:
            _DECISIONS.clear()
        decision = _DECISIONS[key] = MicrobatchDecision(
            index=index,
            window_size=window_size,
            is_boundary=is_boundary,
            sync_gradients=sync_gradients,
            loss_multiplier=loss_multiplier,
            isolate=isolate,
            clip=clip,
            ends_pass=ends_pass,
        )
    return decision


STATE_INT_FIELDS: tuple[str, ...] = (
    "epoch",
    "position",
    "window_size",
    "contributing",
    "items_in_window",
    "items_total",
    "micro_steps",
    "optimizer_steps",
    "skipped_steps",
    "windows",
    "dropped_microbatches",
    "dropped_windows",
)


def check_items(config: AccumulationConfig, items: object, items_on_device: bool) -> int:
    """Validate a microbatch's item count and return the host part of it.

    ``items`` is the rank's host count (an int ``>= 0``), or ``None``;
    ``items_on_device`` says the count is a device tensor the adapter keeps
    and checks itself at the boundary (ACC-N3). Raises `ItemCountError`
    (ACC-E4) for a missing count under ``items``, a negative, non-int or
    bool count, or a device count outside ``items``.
    """
    if items_on_device:
        if config.normalization != "items":
            raise ItemCountError(
                f"an item count held in a tensor only applies to normalization='items'; "
                f"the normalization is {config.normalization!r}: drop items= or use "
                f"normalization='items'"
            )
        if items is not None:
            raise ItemCountError(
                f"items={items!r} was given together with items_on_device=True; pass the "
                f"host count or the device count, not both"
            )
        return 0
    if items is None:
        if config.normalization == "items":
            raise ItemCountError(
                "normalization='items' needs the microbatch's item count (tokens, samples, "
                "pixels, ... that the summed loss covers); pass items=<int> or a device tensor"
            )
        return 0
    if isinstance(items, bool) or not isinstance(items, int):
        raise ItemCountError(
            f"items={items!r} must be a non-negative integer count (type "
            f"{type(items).__name__} given); for a count held in a tensor let the adapter "
            f"keep it on the device"
        )
    if items < 0:
        raise ItemCountError(f"items={items} is negative; item counts must be >= 0")
    return items


def begin_microbatch(
    config: AccumulationConfig,
    state: AccumulationState,
    *,
    last_in_pass: bool = False,
    remaining_in_pass: int | None = None,
    topology: Topology = SINGLE_PROCESS,
) -> tuple[AccumulationState, MicrobatchDecision]:
    """Open a microbatch and decide how to run it.

    Args:
        last_in_pass: this microbatch is the last of the pass (known from a
            one-ahead look at the data, never from prefetching a window).
        remaining_in_pass: microbatches left in the pass, this one included,
            when the pass length is known; lets a short last window be
            planned exactly from its start.

    A window opens on its first microbatch; its size comes from the
    schedule, truncated to ``remaining_in_pass`` under the ``step`` policy.
    The returned state is ``state`` itself (a window's size enters the
    state when its first microbatch ends); hand the decision to
    `end_microbatch` after the backward, or drop it to forget the
    microbatch. Validate the item
    count first with `check_items`. Raises `UsageError` if a window awaits
    `commit` or ``remaining_in_pass`` is not an int ``>= 1``, before
    anything changes.
    """
    if state.phase is not Phase.IDLE:
        raise UsageError("the window has closed but its step was not committed; call commit()")
    if remaining_in_pass is not None and (
        isinstance(remaining_in_pass, bool)
        or not isinstance(remaining_in_pass, int)
        or remaining_in_pass < 1
    ):
        raise UsageError(
            f"remaining_in_pass={remaining_in_pass!r} must count this microbatch too (>= 1)"
        )
    index = state.position
    if index == 0:
        # The window's size is recorded in the state by end_microbatch: a
        # microbatch that is forgotten before its backward leaves no trace.
        window_size = config.schedule.steps(state.epoch, state.windows, state.schedule_state)
        if remaining_in_pass is not None and config.partial_window == "step":
            window_size = min(window_size, remaining_in_pass)
    else:
        window_size = state.window_size
    ends_pass = last_in_pass or remaining_in_pass == 1
    is_boundary = index + 1 >= window_size or (ends_pass and config.partial_window == "step")
    # On several ranks a gradient kept outside param.grad cannot be reduced by a
    # backward's own communication: no microbatch syncs, and the window closes with
    # one manual reduction of the accumulated gradient (needs_manual_sync, ACC-D1).
    deferred = topology.world_size > 1 and config.accumulates_outside_grad
    decision = _microbatch_decision(
        index,
        window_size,
        is_boundary,
        is_boundary and not deferred,
        1.0 / window_size if config.normalization == "mean" else 1.0,
        config.isolates_microbatches,
        config.microbatch_clip,
        ends_pass,
    )
    return state, decision


def _window_decision(
    config: AccumulationConfig,
    state: AccumulationState,
    topology: Topology,
    *,
    partial: bool,
    ranks_in_step: bool,
    ends_pass: bool,
) -> WindowDecision:
    contributing = state.contributing
    world = topology.world_size
    divide_by_world_items = False
    grad_multiplier = 1.0
    empty = contributing == 0
    if config.normalization == "mean" and not empty:
        # Loss multipliers were 1/window_size; a window that ran fewer
        # contributing microbatches is rescaled so the weights sum to one.
        grad_multiplier = state.window_size / contributing
        if world > 1 and not topology.averages:
            grad_multiplier /= world
    elif config.normalization == "items" and not empty:
        if state.device_items or world > 1:
            divide_by_world_items = True
            grad_multiplier = float(world) if topology.averages else 1.0
        elif state.items_in_window == 0:
            empty = True
        else:
            grad_multiplier = 1.0 / state.items_in_window
    key = (
        state.window_size,
        contributing,
        state.items_in_window,
        grad_multiplier,
        divide_by_world_items,
        world > 1 and not state.synced_in_window,
        None if config.clip is None or config.clip.per_microbatch else config.clip,
        not config.weights.is_identity,
        empty,
        partial,
        world > 1 and topology.check_windows and not ranks_in_step,
        ends_pass,
    )
    # Windows repeat: build each decision once (a frozen dataclass costs ~1 µs to build).
    decision = _WINDOWS.get(key)
    if decision is None:
        if len(_WINDOWS) >= 4096:
            _WINDOWS.clear()
        decision = _WINDOWS[key] = WindowDecision(*key)
    return decision


_WINDOWS: dict[tuple[Any, ...], WindowDecision] = {}


def end_microbatch(
    config: AccumulationConfig,
    state: AccumulationState,
    decision: MicrobatchDecision,
    *,
    items: int = 0,
    items_on_device: bool = False,
    dropped: bool = False,
    topology: Topology = SINGLE_PROCESS,
    ranks_in_step: bool = False,
) -> tuple[AccumulationState, WindowDecision | None]:
    """Record that the microbatch ``decision`` was made for finished its backward.

    ``items`` is its host item count (from `check_items`),
    ``items_on_device`` says it also has a device count. ``dropped=True``
    (``drop_microbatch`` policy) records that its gradient was non-finite
    and left out: it still takes its slot in the window but neither its
    gradient nor its items count. Returns the `WindowDecision` when this
    microbatch closes its window (the state is then in `Phase.BOUNDARY`
    until `commit`). ``ranks_in_step``: on several ranks, the ranks already
    agreed on this pass's length and their position at its start
    (`gradaccum.lockstep.pass_row`), so the boundary need not compare
    them again (``WindowDecision.check_ranks`` false, ACC-D5).
    """
    if state.phase is not Phase.IDLE or decision.index != state.position:
        raise UsageError(
            f"end_microbatch() for the microbatch at window position {decision.index}, but the "
            f"state is at position {state.position} in phase {state.phase.value!r}; call it "
            f"once per begin_microbatch(), with the state begin_microbatch() returned"
        )
    if dropped and config.non_finite != "drop_microbatch":
        raise UsageError(
            f"a microbatch can be dropped only under non_finite='drop_microbatch'; "
            f"the policy is {config.non_finite!r}"
        )
    keep = not dropped
    changes: dict[str, Any] = {
        "position": state.position + 1,
        "micro_steps": state.micro_steps + 1,
        "window_size": decision.window_size,
    }
    if keep:
        changes["contributing"] = state.contributing + 1
        if items:
            changes["items_in_window"] = state.items_in_window + items
        if items_on_device:
            changes["device_items"] = True
    else:
        changes["dropped_microbatches"] = state.dropped_microbatches + 1
    if decision.sync_gradients:
        changes["synced_in_window"] = True
    if not decision.is_boundary:
        return _evolve(state, changes), None
    after = _evolve(state, changes)
    window = _window_decision(
        config,
        after,
        topology,
        partial=after.position < after.window_size,
        ranks_in_step=ranks_in_step,
        ends_pass=decision.ends_pass,
    )
    # The window's fields are already in `after`: one more field pair, no second copy.
    fields = after.__dict__
    fields["phase"] = Phase.BOUNDARY
    fields["pending"] = window
    return after, window


def commit(
    config: AccumulationConfig,
    state: AccumulationState,
    *,
    found_inf: bool = False,
    amp_overflow: bool = False,
    world_items: int | None = None,
) -> tuple[AccumulationState, CommitDecision]:
    """Decide the fate of the closed window and reset for the next one.

    Args:
        found_inf: the final gradient holds inf or nan (checked after unscaling).
        amp_overflow: the AMP GradScaler found inf/nan; the step is skipped
            whatever the non-finite policy, as loss scaling expects.
        world_items: the window's item count over all ranks, if the adapter
            learned it at the boundary; recorded in ``items_total``.

    The scheduler steps exactly when the optimizer steps (ACC-S3): never
    on a skipped or empty window.
    """
    if state.phase is not Phase.BOUNDARY or state.pending is None:
        raise UsageError("commit() needs a closed window; no window is waiting for its step")
    if world_items is not None and (
        isinstance(world_items, bool) or not isinstance(world_items, int) or world_items < 0
    ):
        raise ItemCountError(
            f"world_items={world_items!r} must be the window's item count over all ranks, "
            f"an integer >= 0"
        )
    pending = state.pending
    outcome: Outcome
    if pending.empty or (config.normalization == "items" and world_items == 0):
        outcome = "empty"
    elif amp_overflow:
        outcome = "amp_overflow"
    elif found_inf:
        outcome = "non_finite"
    else:
        outcome = "stepped"
    stepped = outcome == "stepped"
    window_items = world_items if world_items is not None else pending.items
    schedule_state = state.schedule_state
    if isinstance(config.schedule, AdaptiveMicrobatch):
        schedule_state = config.schedule.after_window(schedule_state)
    new_state = _evolve(
        state,
        {
            "epoch": state.epoch + state.epoch_end_pending,
            "position": 0,
            "window_size": 0,
            "contributing": 0,
            "items_in_window": 0,
            "items_total": state.items_total + (window_items if stepped else 0),
            "optimizer_steps": state.optimizer_steps + stepped,
            "skipped_steps": state.skipped_steps + (not stepped),
            "windows": state.windows + 1,
            "synced_in_window": False,
            "device_items": False,
            "schedule_state": schedule_state,
            "phase": Phase.IDLE,
            "pending": None,
            "epoch_end_pending": False,
        },
    )
    decision = _COMMIT_DECISIONS[outcome, config.non_finite == "raise"]
    return new_state, decision


_COMMIT_DECISIONS: dict[tuple[str, bool], CommitDecision] = {
    (outcome, raises): CommitDecision(
        outcome=outcome,
        step_optimizer=outcome == "stepped",
        step_scheduler=outcome == "stepped",
        raise_error=outcome == "non_finite" and raises,
    )
    for outcome in ("stepped", "amp_overflow", "non_finite", "empty")
    for raises in (False, True)
}


def end_pass(
    config: AccumulationConfig,
    state: AccumulationState,
    *,
    topology: Topology = SINGLE_PROCESS,
    ranks_in_step: bool = False,
) -> tuple[AccumulationState, PassDecision]:
    """End a pass over the data (an epoch) and apply the partial-window policy.

    With no open window the epoch simply advances. With one open:
    ``step`` closes it (the returned window decision makes it exact; the
    epoch advances at `commit`), ``drop`` discards it, ``carry`` keeps
    it open into the next pass. ``ranks_in_step`` as in `end_microbatch`.
    """
    if state.phase is not Phase.IDLE:
        raise UsageError(
            f"the pass cannot end during phase {state.phase.value!r}; finish the microbatch "
            f"(backward) and let the boundary commit first"
        )
    check = topology.world_size > 1 and topology.check_windows and not ranks_in_step
    if state.position == 0:
        return _evolve(state, {"epoch": state.epoch + 1}), PassDecision("none", None, check)
    if config.partial_window == "step":
        decision = _window_decision(
            config, state, topology, partial=True, ranks_in_step=ranks_in_step, ends_pass=True
        )
        closing = _evolve(
            state, {"phase": Phase.BOUNDARY, "pending": decision, "epoch_end_pending": True}
        )
        return closing, PassDecision("close", decision)
    if config.partial_window == "drop":
        dropped = _evolve(
            state,
            {
                "epoch": state.epoch + 1,
                **_NO_WINDOW,
                "dropped_windows": state.dropped_windows + 1,
            },
        )
        return dropped, PassDecision("discard", None, check)
    return _evolve(state, {"epoch": state.epoch + 1}), PassDecision("carry", None, check)


_NO_WINDOW: dict[str, Any] = {
    "position": 0,
    "window_size": 0,
    "contributing": 0,
    "items_in_window": 0,
    "synced_in_window": False,
    "device_items": False,
}


def abandon_window(state: AccumulationState) -> AccumulationState:
    """Give up the open window (its gradient is discarded by the adapter) and
    count it in ``dropped_windows``.

    Used when a microbatch of it ran out of memory and the window is
    replayed with smaller microbatches, when a microbatch failed inside its
    backward where its partial gradient cannot be separated from the
    window's, and when the boundary itself failed before `commit` (a bad
    device item count, ranks out of step): from `Phase.BOUNDARY` the window
    is dropped uncommitted, and a pass it was closing still ends (the epoch
    advances). The window is not a closed window: ``windows``,
    ``optimizer_steps`` and ``skipped_steps`` do not change.
    """
    if state.phase is Phase.BOUNDARY:
        return _evolve(
            state,
            {
                "epoch": state.epoch + state.epoch_end_pending,
                **_NO_WINDOW,
                "dropped_windows": state.dropped_windows + 1,
                "phase": Phase.IDLE,
                "pending": None,
                "epoch_end_pending": False,
            },
        )
    if state.position == 0:
        return state
    return _evolve(state, {**_NO_WINDOW, "dropped_windows": state.dropped_windows + 1})
