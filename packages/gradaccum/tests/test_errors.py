"""Bad inputs to the machine: the right GradAccumError, naming the value, before any change.

Every test here checks ACC-E1 (one base class), ACC-E2 (raised before any state change) and
ACC-E3 (the message names the value seen), for the input listed in ACC-E4.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from gradaccum import (
    AccumulationConfig,
    AccumulationMachine,
    AccumulationState,
    AdaptiveMicrobatch,
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    ConfigError,
    DistributedError,
    GradAccumError,
    ItemCountError,
    NonFiniteGradientError,
    Topology,
    UsageError,
)


def rejects(
    machine: AccumulationMachine,
    call: Callable[[], object],
    error: type[GradAccumError],
    names: str | None = None,
) -> str:
    """Call, expect ``error`` naming ``names``, and check that the state did not change."""
    before = machine.state
    before_phase, before_current = machine.phase, machine.current
    before_json = machine.state_dict() if before_phase.value == "idle" else None
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, GradAccumError)
    message = str(info.value)
    if names is not None:
        assert names in message, message
    assert machine.state == before
    assert (machine.phase, machine.current) == (before_phase, before_current)
    if before_json is not None:
        assert machine.state_dict() == before_json
    return message


def mid_window(config: AccumulationConfig, items: int | None = None) -> AccumulationMachine:
    machine = AccumulationMachine(config)
    machine.begin(items)
    machine.end()
    return machine


def test_hierarchy() -> None:
    """ACC-E1: one base class; subclasses also derive from the closest built-in."""
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ItemCountError, ValueError)
    assert issubclass(UsageError, RuntimeError)
    assert issubclass(DistributedError, RuntimeError)
    assert issubclass(NonFiniteGradientError, FloatingPointError)
    assert issubclass(CheckpointChecksumError, CheckpointCorruptError)
    for cls in (
        ConfigError,
        ItemCountError,
        UsageError,
        DistributedError,
        NonFiniteGradientError,
        CheckpointError,
        CheckpointCorruptError,
        CheckpointVersionError,
        CheckpointChecksumError,
        CheckpointMismatchError,
    ):
        assert issubclass(cls, GradAccumError)


@pytest.mark.parametrize(
    ("items", "shown"),
    [(-1, "-1"), (1.5, "1.5"), (True, "True"), ("3", "'3'"), (None, "items")],
)
def test_bad_items_in_items_mode(items: Any, shown: str) -> None:
    """ACC-E4, ACC-N2: a missing, negative, non-int or bool item count is an ItemCountError."""
    machine = mid_window(AccumulationConfig(3, normalization="items"), items=2)
    rejects(machine, lambda: machine.begin(items), ItemCountError, shown)


def test_items_on_device_outside_items_mode() -> None:
    """ACC-E4: items_on_device applies only to items normalization."""
    machine = mid_window(AccumulationConfig(3))
    rejects(machine, lambda: machine.begin(items_on_device=True), ItemCountError, "'mean'")


@pytest.mark.parametrize("items", [-2, 2.5])
def test_bad_items_in_mean_mode(items: Any) -> None:
    """ACC-E4: an item count given under mean is still validated."""
    machine = mid_window(AccumulationConfig(3))
    rejects(machine, lambda: machine.begin(items), ItemCountError, str(items))


@pytest.mark.parametrize("remaining", [0, -1, 1.5, True])
def test_bad_remaining_in_pass(remaining: Any) -> None:
    """ACC-E4: remaining_in_pass counts this microbatch: an int >= 1."""
    machine = mid_window(AccumulationConfig(3))
    rejects(
        machine, lambda: machine.begin(remaining_in_pass=remaining), UsageError, repr(remaining)
    )


def test_begin_twice() -> None:
    """ACC-E4: begin while a microbatch is open is a UsageError."""
    machine = AccumulationMachine(AccumulationConfig(3))
    machine.begin()
    rejects(machine, machine.begin, UsageError, "already open")


def test_begin_before_commit() -> None:
    """ACC-E4: begin while a closed window awaits commit is a UsageError."""
    machine = AccumulationMachine(AccumulationConfig(1))
    machine.begin()
    machine.end()
    rejects(machine, machine.begin, UsageError, "commit")


def test_end_outside_microbatch() -> None:
    """ACC-E4: backward (end) outside a microbatch is a UsageError."""
    machine = AccumulationMachine(AccumulationConfig(2))
    rejects(machine, machine.end, UsageError, "outside a microbatch")
    machine.begin()
    machine.end()
    rejects(machine, machine.end, UsageError, "outside a microbatch")


def test_drop_outside_drop_policy() -> None:
    """ACC-E4, ACC-F3: end(dropped=True) needs non_finite='drop_microbatch'."""
    machine = AccumulationMachine(AccumulationConfig(2))
    machine.begin()
    rejects(machine, lambda: machine.end(dropped=True), UsageError, "'skip'")


def test_commit_without_boundary() -> None:
    """ACC-E4: commit without a closed window is a UsageError."""
    machine = AccumulationMachine(AccumulationConfig(2))
    rejects(machine, machine.commit, UsageError, "closed window")
    machine.begin()
    rejects(machine, machine.commit, UsageError, "closed window")
    machine.end()
    rejects(machine, machine.commit, UsageError, "closed window")


def test_end_pass_inside_microbatch_or_before_commit() -> None:
    """ACC-E4: end_pass inside a microbatch or before commit is a UsageError."""
    machine = AccumulationMachine(AccumulationConfig(1))
    machine.begin()
    rejects(machine, machine.end_pass, UsageError, "'microbatch'")
    machine.end()
    rejects(machine, machine.end_pass, UsageError, "'boundary'")


def test_state_dict_inside_microbatch() -> None:
    """ACC-E4, ACC-R1: state_dict inside a microbatch is a UsageError."""
    machine = AccumulationMachine(AccumulationConfig(2))
    machine.begin()
    rejects(machine, machine.state_dict, UsageError, "'microbatch'")


def test_report_oom_needs_adaptive() -> None:
    """ACC-E4, ACC-K5: report_oom under a non-adaptive schedule is a ConfigError."""
    machine = mid_window(AccumulationConfig(2))
    rejects(machine, machine.report_oom, ConfigError, "'fixed'")


def test_report_oom_at_min() -> None:
    """ACC-E4, ACC-K5: an OOM at min_micro_batch is a ConfigError; the state is unchanged."""
    schedule = AdaptiveMicrobatch(target=8, micro_batch=2, min_micro_batch=2)
    machine = AccumulationMachine(AccumulationConfig(schedule=schedule, normalization="items"))
    rejects(machine, machine.report_oom, ConfigError, "micro_batch=2")


@pytest.mark.parametrize("world", [0, -1, 1.5, True, "2"])
def test_bad_world_size(world: Any) -> None:
    """ACC-E4: world_size must be an int >= 1."""
    with pytest.raises(ConfigError) as info:
        Topology(world)
    assert repr(world) in str(info.value)


def test_machine_needs_a_config() -> None:
    """ACC-E4: the machine takes an AccumulationConfig."""
    with pytest.raises(ConfigError, match="'fixed'"):
        AccumulationMachine({"schedule": "fixed"})  # type: ignore[arg-type]


def good_state() -> dict[str, Any]:
    machine = mid_window(AccumulationConfig(4))
    data: dict[str, Any] = json.loads(json.dumps(machine.state_dict()))
    return data


def _without(key: str) -> dict[str, Any]:
    data = good_state()
    del data[key]
    return data


BAD_STATES: list[tuple[Any, str]] = [
    ({**good_state(), "version": 2}, "2"),
    ({**good_state(), "version": None}, "None"),
    (_without("epoch"), "epoch"),
    ({**good_state(), "bogus": 1}, "bogus"),
    ({**good_state(), "micro_steps": -1}, "-1"),
    ({**good_state(), "optimizer_steps": 1.5}, "1.5"),
    ({**good_state(), "windows": True}, "True"),
    ({**good_state(), "epoch": "3"}, "'3'"),
    ({**good_state(), "synced_in_window": "yes"}, "'yes'"),
    ({**good_state(), "device_items": 1}, "device_items"),
    ({**good_state(), "schedule_state": []}, "schedule_state"),
    ({**good_state(), "position": 5}, "position=5"),
    ({**good_state(), "contributing": 2}, "contributing=2"),
    ([1, 2], "list"),
]


@pytest.mark.parametrize(("data", "shown"), BAD_STATES)
def test_bad_state_dict(data: Any, shown: str) -> None:
    """ACC-E4, ACC-R4: a malformed state dict is a ConfigError and changes nothing."""
    machine = mid_window(AccumulationConfig(4))
    rejects(machine, lambda: machine.load_state_dict(data), ConfigError, shown)
    with pytest.raises(ConfigError):
        AccumulationState.from_state_dict(data)


@pytest.mark.parametrize(
    "changes",
    [
        {"version": True},
        {"position": 4, "contributing": 4},
        {"optimizer_steps": 7},
        {"synced_in_window": True},
    ],
    ids=["version-true", "position-eq-window", "steps-gt-windows", "synced-mid-window"],
)
def test_impossible_state_dict_is_refused(changes: dict[str, Any]) -> None:
    """ACC-R4: a state that no run can reach is refused with a ConfigError."""
    machine = mid_window(AccumulationConfig(4))
    data = {**good_state(), **changes}
    rejects(machine, lambda: machine.load_state_dict(data), ConfigError)


def test_bad_adaptive_schedule_state_is_refused() -> None:
    """ACC-R4: an adaptive schedule state with a microbatch of 0 is refused on load."""
    schedule = AdaptiveMicrobatch(target=8, micro_batch=4)
    machine = AccumulationMachine(AccumulationConfig(schedule=schedule, normalization="items"))
    data = machine.state_dict()
    data["schedule_state"] = {"micro_batch": 0, "clean_windows": 0, "ooms": 0}
    rejects(machine, lambda: machine.load_state_dict(data), ConfigError, "0")


@pytest.mark.parametrize(("world_items", "shown"), [(-5, "-5"), (1.5, "1.5"), ("4", "'4'")])
def test_bad_world_items(world_items: Any, shown: str) -> None:
    """ACC-C1, ACC-E4: world_items must be an int >= 0; a bad one is an ItemCountError."""
    machine = AccumulationMachine(
        AccumulationConfig(1, normalization="items"), topology=Topology(2)
    )
    machine.begin(3)
    machine.end()
    rejects(machine, lambda: machine.commit(world_items=world_items), ItemCountError, shown)
