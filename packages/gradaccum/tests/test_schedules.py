"""Schedules: fixed, by epoch, by step, target batch, adaptive microbatch (ACC-K)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gradaccum import (
    AccumulationConfig,
    AccumulationMachine,
    AdaptiveMicrobatch,
    ByEpoch,
    ByStep,
    ConfigError,
    Fixed,
    TargetBatch,
    schedule_from_dict,
)


def test_fixed() -> None:
    """ACC-K1: Fixed(k) is k everywhere."""
    assert Fixed(3).steps(0, 0, {}) == 3
    assert Fixed(3).steps(9, 99, {}) == 3


def test_by_epoch_lookup() -> None:
    """ACC-K2: the greatest key <= epoch; before the first key, the first value."""
    schedule = ByEpoch({2: 4, 5: 8})
    assert [schedule.steps(e, 0, {}) for e in range(7)] == [4, 4, 4, 4, 4, 8, 8]
    assert ByEpoch({0: 1, 4: 2}).steps(3, 1000, {}) == 1


def test_by_step_lookup() -> None:
    """ACC-K3: keyed by closed windows, ignoring the epoch."""
    schedule = ByStep({0: 2, 3: 4, 6: 8})
    assert [schedule.steps(99, w, {}) for w in range(8)] == [2, 2, 2, 4, 4, 4, 8, 8]


@pytest.mark.parametrize("cls", [ByEpoch, ByStep])
@pytest.mark.parametrize(
    ("table", "shown"),
    [
        ({}, "{}"),
        ({-1: 2}, "-1"),
        ({1.5: 2}, "1.5"),
        ({True: 2}, "True"),
        ({"0": 2}, "'0'"),
        ({4: 2, 0: 1}, "[4, 0]"),
        ({0: 0}, "0"),
        ({0: -3}, "-3"),
        ({0: 2.5}, "2.5"),
        ([(0, 1)], "[(0, 1)]"),
    ],
)
def test_bad_tables(cls: Any, table: Any, shown: str) -> None:
    """ACC-K2, ACC-E4: empty tables, negative, non-int or unsorted keys, values < 1 are refused."""
    with pytest.raises(ConfigError) as info:
        cls(table)
    assert shown in str(info.value)


def test_target_batch() -> None:
    """ACC-K4: k = target / (micro × world) exactly."""
    assert TargetBatch(64, 8, 2).k == 4
    assert TargetBatch(8, 8).k == 1
    assert TargetBatch(64, 8, 2).steps(0, 0, {}) == 4


def test_target_batch_smaller_than_one_microbatch() -> None:
    """ACC-K4, ACC-E4: a target below micro × world is refused, naming both."""
    with pytest.raises(ConfigError) as info:
        TargetBatch(8, 4, 4)
    assert "8" in str(info.value)
    assert "16" in str(info.value)


def test_target_batch_not_divisible() -> None:
    """ACC-K4, ACC-E4: a non-multiple is refused (never rounded) with the nearest valid targets."""
    with pytest.raises(ConfigError) as info:
        TargetBatch(100, 8, 2)
    message = str(info.value)
    assert "100" in message
    assert "96" in message
    assert "112" in message


@pytest.mark.parametrize(
    "args", [(0, 4), (-8, 4), (8, 0), (8, 2, 0), (8.0, 2), (True, 1), ("8", 2)]
)
def test_target_batch_bad_numbers(args: tuple[Any, ...]) -> None:
    """ACC-E4: non-positive or non-int targets, micro batches and world sizes are refused."""
    with pytest.raises(ConfigError) as info:
        TargetBatch(*args)
    assert any(repr(a) in str(info.value) for a in args)


def test_adaptive_split_sums_to_target() -> None:
    """ACC-K5: a window's microbatch sizes sum to target, ceil(target/m) of them."""
    schedule = AdaptiveMicrobatch(target=10, micro_batch=4)
    state = schedule.initial_state()
    assert schedule.split(state) == [4, 4, 2]
    assert schedule.steps(0, 0, state) == 3
    for micro in range(1, 11):
        sizes = schedule.split({"micro_batch": micro})
        assert sum(sizes) == 10
        assert len(sizes) == schedule.steps(0, 0, {"micro_batch": micro})
        assert max(sizes) == micro


def test_adaptive_halves_after_oom_and_raises_at_min() -> None:
    """ACC-K5: an OOM halves the microbatch, never below min; at min it is a ConfigError."""
    schedule = AdaptiveMicrobatch(target=32, micro_batch=16, min_micro_batch=3)
    state = schedule.initial_state()
    state = schedule.after_oom(state)
    assert schedule.current(state) == 8
    assert state["ooms"] == 1
    state = schedule.after_oom(state)
    assert schedule.current(state) == 4
    state = schedule.after_oom(state)
    assert schedule.current(state) == 3  # clamped at min, not 2
    assert sum(schedule.split(state)) == 32
    with pytest.raises(ConfigError, match="micro_batch=3"):
        schedule.after_oom(state)


def test_adaptive_grows_back_to_ceiling() -> None:
    """ACC-K5: after grow_after clean windows the microbatch doubles, up to the ceiling — it
    does not only shrink (Composer's flaw)."""
    schedule = AdaptiveMicrobatch(
        target=32, micro_batch=16, min_micro_batch=1, max_micro_batch=16, grow_after=2
    )
    state = schedule.after_oom(schedule.after_oom(schedule.initial_state()))
    assert schedule.current(state) == 4
    sizes = []
    for _ in range(8):
        state = schedule.after_window(state)
        sizes.append(schedule.current(state))
    assert sizes == [4, 8, 8, 16, 16, 16, 16, 16]
    assert state["ooms"] == 2


def test_adaptive_oom_resets_clean_count() -> None:
    """ACC-K5: the grow_after windows must be consecutive clean windows."""
    schedule = AdaptiveMicrobatch(target=16, micro_batch=8, grow_after=2)
    state = schedule.after_window(schedule.initial_state())
    state = schedule.after_oom(state)
    state = schedule.after_window(state)
    assert schedule.current(state) == 4
    state = schedule.after_window(state)
    assert schedule.current(state) == 8


def test_adaptive_effective_batch_constant_through_machine() -> None:
    """ACC-K5: through the machine an OOM changes the window's microbatch count, not its
    item count, and never the gradient scale (items normalization divides by the items)."""
    schedule = AdaptiveMicrobatch(
        target=12, micro_batch=6, min_micro_batch=1, max_micro_batch=6, grow_after=1
    )
    machine = AccumulationMachine(AccumulationConfig(schedule=schedule, normalization="items"))
    plans = []
    for oom in (False, True, False):
        if oom:
            assert machine.report_oom() == 3
        sizes = schedule.split(machine.state.schedule_state)
        window = None
        for n in sizes:
            decision = machine.begin(n)
            assert decision.loss_multiplier == 1.0
            window = machine.end()
        assert window is not None
        assert window.items == 12
        assert window.grad_multiplier == 1 / 12
        machine.commit()
        plans.append(sizes)
    assert plans == [[6, 6], [3, 3, 3, 3], [6, 6]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": 8, "micro_batch": 0},
        {"target": 8, "micro_batch": 4, "min_micro_batch": 5},
        {"target": 8, "micro_batch": 4, "max_micro_batch": 2},
        {"target": 8, "micro_batch": 4, "max_micro_batch": 16},
        {"target": 8, "micro_batch": 16},
        {"target": 8, "micro_batch": 4, "grow_after": 0},
    ],
)
def test_adaptive_bad_sizes(kwargs: dict[str, int]) -> None:
    """ACC-K5, ACC-E4: sizes must satisfy min <= micro <= max <= target, grow_after >= 1."""
    with pytest.raises(ConfigError):
        AdaptiveMicrobatch(**kwargs)


@pytest.mark.parametrize(
    "schedule",
    [
        Fixed(3),
        ByEpoch({0: 1, 4: 2, 10: 8}),
        ByStep({0: 2, 2: 4, 10: 8}),
        TargetBatch(64, 8, 2),
        AdaptiveMicrobatch(16, 8, 2, 8, 3),
    ],
)
def test_schedule_json_round_trip(schedule: Any) -> None:
    """ACC-K6: every schedule round-trips through JSON exactly."""
    assert schedule_from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ({"kind": "warmup"}, "'warmup'"),
        ({"steps": 2}, "kind"),
        ({"kind": "by_epoch", "steps": [1, 2]}, "[1, 2]"),
        ({"kind": "by_step", "steps": {"x": 2}}, "'x'"),
        ({"kind": "target_batch", "target": 8, "micro": 2}, "micro"),
        ({"kind": "fixed"}, "None"),
    ],
)
def test_schedule_from_dict_rejects(data: Any, shown: str) -> None:
    """ACC-K6, ACC-E4: unknown kinds and malformed entries are a ConfigError."""
    with pytest.raises(ConfigError) as info:
        schedule_from_dict(data)
    assert shown in str(info.value)


@pytest.mark.parametrize("kind", ["fixed", "by_epoch", "by_step"])
def test_schedule_from_dict_unknown_keys(kind: str) -> None:
    """ACC-E4: a schedule dict with an unknown key is refused, naming the key."""
    steps: Any = 4 if kind == "fixed" else {"0": 4}
    with pytest.raises(ConfigError, match="warmup"):
        schedule_from_dict({"kind": kind, "steps": steps, "warmup": 2})


@pytest.mark.parametrize("cls", [ByEpoch, ByStep])
def test_schedule_from_dict_key_order_independent(cls: Any) -> None:
    """ACC-K6: a schedule written by to_dict loads after json.dumps(sort_keys=True)."""
    schedule = cls({0: 2, 2: 4, 10: 8})
    text = json.dumps(schedule.to_dict(), sort_keys=True)
    assert schedule_from_dict(json.loads(text)) == schedule


def test_oom_mid_window_abandons_the_window_and_replays_at_the_new_size() -> None:
    """ACC-K5: an OOM inside a window abandons it (dropped_windows + 1); the replayed
    window holds ``target`` items in microbatches of the halved size."""
    from gradaccum import AccumulationMachine

    schedule = AdaptiveMicrobatch(target=8, micro_batch=4)
    machine = AccumulationMachine(AccumulationConfig(schedule=schedule, normalization="items"))
    machine.begin(4)
    assert machine.end() is None
    machine.begin(4)
    machine.cancel()  # the second microbatch ran out of memory
    assert machine.report_oom() == 2
    state = machine.state
    assert (state.position, state.window_size, state.dropped_windows) == (0, 0, 1)
    sizes = schedule.split(state.schedule_state)
    assert sizes == [2, 2, 2, 2]
    windows = []
    for n in sizes:
        machine.begin(n)
        windows.append(machine.end())
    assert windows[:3] == [None, None, None]
    last = windows[3]
    assert last is not None
    assert last.items == 8
    assert last.grad_multiplier == 1 / 8
