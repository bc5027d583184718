"""Schedules: how many microbatches the next window holds.

A schedule is immutable data. The state machine asks it for the size of a
window when the window opens, passing the epoch, the number of windows closed
so far (stepped or skipped) and the schedule's own JSON state (only the
adaptive schedule has one). A window's size never changes once it is open.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from gradaccum.errors import ConfigError

__all__ = [
    "AdaptiveMicrobatch",
    "ByEpoch",
    "ByStep",
    "Fixed",
    "Schedule",
    "TargetBatch",
    "schedule_from_dict",
]


def _positive_int(name: str, value: object, fix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = fix or f"pass an integer >= 1, e.g. {name}=4"
        raise ConfigError(f"{name}={value!r} must be a positive integer; {hint}")
    return value


class Schedule(ABC):
    """The number of microbatches per window, as a function of progress."""

    kind: ClassVar[str]

    @abstractmethod
    def steps(self, epoch: int, windows: int, schedule_state: Mapping[str, Any]) -> int:
        """Microbatches in the window that opens now (always >= 1)."""

    def initial_state(self) -> dict[str, Any]:
        """The schedule's JSON state before any window (empty for stateless schedules)."""
        return {}

    def check_state(self, schedule_state: Mapping[str, Any]) -> None:
        """Raise `ConfigError` unless ``schedule_state`` is one this
        schedule can be in (stateless schedules accept only ``{}``)."""
        if schedule_state:
            raise ConfigError(
                f"the {self.kind!r} schedule keeps no state, but the saved state holds "
                f"{dict(schedule_state)!r}; it was saved under another schedule"
            )

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON form, with a ``"kind"`` key that `schedule_from_dict` reads."""

    @property
    def requires_items(self) -> bool:
        """True when only ``items`` normalization keeps the schedule exact."""
        return False


@dataclass(frozen=True, slots=True)
class Fixed(Schedule):
    """Every window holds ``steps`` microbatches."""

    kind: ClassVar[str] = "fixed"
    k: int

    def __post_init__(self) -> None:
        _positive_int("accumulation steps", self.k)

    def steps(self, epoch: int, windows: int, schedule_state: Mapping[str, Any]) -> int:
        return self.k

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.k}


def _check_table(
    name: str, table: Mapping[int, int], first_key_hint: str
) -> tuple[tuple[int, int], ...]:
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(f"{name} schedule {table!r} must be a non-empty mapping {first_key_hint}")
    keys = list(table)
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ConfigError(
                f"{name} schedule key {key!r} must be an integer >= 0; e.g. {first_key_hint}"
            )
    if keys != sorted(keys):
        raise ConfigError(
            f"{name} schedule keys {keys} are not sorted; list them in increasing order, "
            f"e.g. {dict(sorted(table.items()))}"
        )
    for key, value in table.items():
        _positive_int(f"{name} schedule value at {key}", value)
    return tuple(table.items())


def _lookup(table: tuple[tuple[int, int], ...], at: int) -> int:
    keys = [k for k, _ in table]
    index = bisect.bisect_right(keys, at) - 1
    # Before the first key the first value applies, like Lightning's
    # GradientAccumulationScheduler when its first key is not 0.
    return table[max(index, 0)][1]


@dataclass(frozen=True, slots=True)
class ByEpoch(Schedule):
    """``{epoch: k}``: from each listed epoch on, windows hold ``k``
    microbatches (the shape of Lightning's ``GradientAccumulationScheduler``).
    Epochs before the first key use the first value."""

    kind: ClassVar[str] = "by_epoch"
    table: tuple[tuple[int, int], ...]

    def __init__(self, table: Mapping[int, int]) -> None:
        object.__setattr__(self, "table", _check_table("by-epoch", table, "{0: 1, 4: 2}"))

    def steps(self, epoch: int, windows: int, schedule_state: Mapping[str, Any]) -> int:
        return _lookup(self.table, epoch)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": {str(k): v for k, v in self.table}}


@dataclass(frozen=True, slots=True)
class ByStep(Schedule):
    """``{window: k}``: batch-size ramps by progress. The key counts closed
    windows (stepped or skipped), so an AMP-skipped step still advances the
    ramp and all ranks agree without communication."""

    kind: ClassVar[str] = "by_step"
    table: tuple[tuple[int, int], ...]

    def __init__(self, table: Mapping[int, int]) -> None:
        object.__setattr__(self, "table", _check_table("by-step", table, "{0: 2, 100: 4}"))

    def steps(self, epoch: int, windows: int, schedule_state: Mapping[str, Any]) -> int:
        return _lookup(self.table, windows)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": {str(k): v for k, v in self.table}}


@dataclass(frozen=True, slots=True)
class TargetBatch(Schedule):
    """Derive ``k`` from a target effective batch: ``target = k × micro_batch
    × world_size`` exactly. A target that is not a multiple of
    ``micro_batch × world_size`` is refused with the nearest valid targets,
    because rounding would silently change the effective batch."""

    kind: ClassVar[str] = "target_batch"
    target: int
    micro_batch: int
    world_size: int = 1

    def __post_init__(self) -> None:
        _positive_int("target batch", self.target)
        _positive_int("micro batch", self.micro_batch)
        _positive_int("world size", self.world_size)
        per_window = self.micro_batch * self.world_size
        if self.target < per_window:
            raise ConfigError(
                f"target batch {self.target} is smaller than one microbatch on every rank "
                f"({self.micro_batch} × {self.world_size} ranks = {per_window}); "
                f"use a target >= {per_window} or a smaller micro batch"
            )
        if self.target % per_window:
            lower = (self.target // per_window) * per_window
            raise ConfigError(
                f"target batch {self.target} is not a multiple of micro batch × world size "
                f"= {per_window}; use {lower} or {lower + per_window}, or change the micro batch"
            )

    @property
    def k(self) -> int:
        """Microbatches per window."""
        return self.target // (self.micro_batch * self.world_size)

    def steps(self, epoch: int, windows: int, schedule_state: Mapping[str, Any]) -> int:
        return self.k

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
        }


@dataclass(frozen=True, slots=True)
class AdaptiveMicrobatch(Schedule):
    """Memory-aware microbatching: the *microbatch size* adapts, the
    effective batch never does.

    Each window holds ``target`` items per rank split into microbatches of
    at most the current microbatch size (``ceil(target / micro)``
    microbatches; the last may be smaller). After an out-of-memory error the
    size halves (down to ``min_micro_batch``); after ``grow_after`` clean
    windows it doubles again (up to ``max_micro_batch``), so a transient
    spike does not slow the rest of the run. Gradients are never rescaled by
    memory pressure: that would bias the update. Requires ``items``
    normalization, which is exact for unequal microbatches.
    """

    kind: ClassVar[str] = "adaptive"
    target: int
    micro_batch: int
    min_micro_batch: int = 1
    max_micro_batch: int | None = None
    grow_after: int = 50
    _fields: ClassVar[tuple[str, ...]] = (
        "target",
        "micro_batch",
        "min_micro_batch",
        "max_micro_batch",
        "grow_after",
    )

    def __post_init__(self) -> None:
        _positive_int("adaptive target", self.target)
        _positive_int("adaptive micro_batch", self.micro_batch)
        _positive_int("adaptive min_micro_batch", self.min_micro_batch)
        _positive_int("adaptive grow_after", self.grow_after)
        ceiling = self.max_micro_batch if self.max_micro_batch is not None else self.target
        _positive_int("adaptive max_micro_batch", ceiling)
        if not self.min_micro_batch <= self.micro_batch <= ceiling:
            raise ConfigError(
                f"adaptive micro_batch={self.micro_batch} must lie in "
                f"[min_micro_batch={self.min_micro_batch}, max_micro_batch={ceiling}]"
            )
        if ceiling > self.target:
            raise ConfigError(
                f"adaptive max_micro_batch={ceiling} exceeds target={self.target}; "
                f"a microbatch cannot be larger than the window"
            )

    @property
    def requires_items(self) -> bool:
        return True

    @property
    def ceiling(self) -> int:
        """Largest microbatch size the schedule grows back to."""
        return self.max_micro_batch if self.max_micro_batch is not None else self.target

    def initial_state(self) -> dict[str, Any]:
        return {"micro_batch": self.micro_batch, "clean_windows": 0, "ooms": 0}

    def check_state(self, schedule_state: Mapping[str, Any]) -> None:
        expected = {"micro_batch", "clean_windows", "ooms"}
        # "oom_in_window" (optional, True only): the open window already ran out of
        # memory once, so its close does not count as a clean window.
        flag = schedule_state.get("oom_in_window", None)
        if "oom_in_window" in schedule_state and flag is not True:
            raise ConfigError(
                f"adaptive schedule state oom_in_window={flag!r} must be true when present"
            )
        if set(schedule_state) - {"oom_in_window"} != expected:
            raise ConfigError(
                f"adaptive schedule state {dict(schedule_state)!r} must have exactly the keys "
                f"{sorted(expected)}"
            )
        micro = schedule_state["micro_batch"]
        if (
            isinstance(micro, bool)
            or not isinstance(micro, int)
            or not self.min_micro_batch <= micro <= self.ceiling
        ):
            raise ConfigError(
                f"adaptive schedule state micro_batch={micro!r} must be an integer in "
                f"[{self.min_micro_batch}, {self.ceiling}]"
            )
        for key in ("clean_windows", "ooms"):
            value = schedule_state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"adaptive schedule state {key}={value!r} must be an int >= 0")

    def current(self, schedule_state: Mapping[str, Any]) -> int:
        """The microbatch size in force."""
        return int(schedule_state.get("micro_batch", self.micro_batch))

    def steps(self, epoch: int, windows: int, schedule_state: Mapping[str, Any]) -> int:
        return math.ceil(self.target / self.current(schedule_state))

    def split(self, schedule_state: Mapping[str, Any]) -> list[int]:
        """Microbatch sizes of one window: they sum to ``target``."""
        micro = self.current(schedule_state)
        sizes = [micro] * (self.target // micro)
        if self.target % micro:
            sizes.append(self.target % micro)
        return sizes

    def after_oom(self, schedule_state: Mapping[str, Any]) -> dict[str, Any]:
        """The state after an out-of-memory error: the microbatch size halves.

        Raises `ConfigError` when already at ``min_micro_batch``,
        because no smaller microbatch is allowed.
        """
        micro = self.current(schedule_state)
        if micro <= self.min_micro_batch:
            raise ConfigError(
                f"out of memory at micro_batch={micro}, which is min_micro_batch; "
                f"lower min_micro_batch, shrink the model's memory (activation checkpointing), "
                f"or use a larger device"
            )
        return {
            "micro_batch": max(self.min_micro_batch, micro // 2),
            "clean_windows": 0,
            "ooms": int(schedule_state.get("ooms", 0)) + 1,
        }

    def after_oom_in_window(self, schedule_state: Mapping[str, Any]) -> dict[str, Any]:
        """`after_oom` for an OOM whose window goes on (its earlier
        microbatches kept): the size halves and the window, once it closes,
        does not count as clean (``"oom_in_window"``). Raises `ConfigError`
        at ``min_micro_batch`` like `after_oom`."""
        return {**self.after_oom(schedule_state), "oom_in_window": True}

    def after_window(self, schedule_state: Mapping[str, Any]) -> dict[str, Any]:
        """The state after a window closed: a clean one (no OOM) counts towards
        ``grow_after``; one that ran out of memory (``"oom_in_window"``) does not."""
        micro = self.current(schedule_state)
        if schedule_state.get("oom_in_window"):
            return {
                "micro_batch": micro,
                "clean_windows": 0,
                "ooms": int(schedule_state.get("ooms", 0)),
            }
        clean = int(schedule_state.get("clean_windows", 0)) + 1
        if clean >= self.grow_after and micro < self.ceiling:
            return {
                "micro_batch": min(self.ceiling, micro * 2),
                "clean_windows": 0,
                "ooms": int(schedule_state.get("ooms", 0)),
            }
        return {**schedule_state, "micro_batch": micro, "clean_windows": clean}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{name: getattr(self, name) for name in self._fields}}


_KINDS: dict[str, type[Schedule]] = {
    cls.kind: cls for cls in (Fixed, ByEpoch, ByStep, TargetBatch, AdaptiveMicrobatch)
}


def _int_keys(name: str, table: Any) -> dict[int, int]:
    """JSON object keys are strings in no meaningful order: parse and sort them."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name} schedule 'steps' must be a mapping, got {table!r}")
    out: dict[int, int] = {}
    for key, value in table.items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            raise ConfigError(f"{name} schedule key {key!r} is not an integer") from None
    return dict(sorted(out.items()))


_SCHEDULE_KEYS = {
    "fixed": ("steps",),
    "by_epoch": ("steps",),
    "by_step": ("steps",),
    "target_batch": ("target", "micro_batch", "world_size"),
    "adaptive": AdaptiveMicrobatch._fields,
}


def schedule_from_dict(data: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from `Schedule.to_dict` output."""
    if not isinstance(data, Mapping) or "kind" not in data:
        raise ConfigError(f"schedule {data!r} needs a 'kind' key; one of {sorted(_KINDS)}")
    kind = data["kind"]
    rest = {k: v for k, v in data.items() if k != "kind"}
    if kind in _SCHEDULE_KEYS:
        unknown = sorted(set(rest) - set(_SCHEDULE_KEYS[kind]))
        if unknown:
            raise ConfigError(
                f"{kind} schedule has unknown keys {unknown}; its keys are "
                f"{list(_SCHEDULE_KEYS[kind])}"
            )
    if kind == "fixed":
        return Fixed(rest.get("steps"))  # type: ignore[arg-type]
    if kind == "by_epoch":
        return ByEpoch(_int_keys("by-epoch", rest.get("steps")))
    if kind == "by_step":
        return ByStep(_int_keys("by-step", rest.get("steps")))
    if kind in ("target_batch", "adaptive"):
        cls = TargetBatch if kind == "target_batch" else AdaptiveMicrobatch
        try:
            return cls(**rest)
        except TypeError as exc:
            raise ConfigError(f"{kind} schedule {dict(data)!r} is malformed: {exc}") from None
    raise ConfigError(f"schedule kind {kind!r} is unknown; use one of {sorted(_KINDS)}")
