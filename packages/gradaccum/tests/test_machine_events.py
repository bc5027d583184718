"""The machine's events and statistics (listeners, AccumulationStats)."""

from __future__ import annotations

import pytest

from gradaccum import (
    AccumulationCallback,
    AccumulationConfig,
    AccumulationListener,
    AccumulationMachine,
    AccumulationStats,
    Topology,
)


class Recorder(AccumulationCallback):
    """Records every event with the counters it saw."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.stats: list[AccumulationStats] = []

    def on_microbatch(self, stats: AccumulationStats) -> None:
        self.events.append(("microbatch", str(stats.micro_steps)))
        self.stats.append(stats)

    def on_step(self, stats: AccumulationStats) -> None:
        self.events.append(("step", str(stats.optimizer_steps)))
        self.stats.append(stats)

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        self.events.append(("skip", reason))
        self.stats.append(stats)

    def on_epoch_end(self, stats: AccumulationStats) -> None:
        self.events.append(("epoch_end", str(stats.epoch)))
        self.stats.append(stats)


class CountingNorm:
    """A stand-in for a 0-d device tensor: counts how often it is read."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.reads = 0

    def __float__(self) -> float:
        self.reads += 1
        return self.value


def test_recorder_is_a_listener() -> None:
    """ACC-C3 (events): the callback base satisfies the listener protocol."""
    assert isinstance(Recorder(), AccumulationListener)


def test_events_for_steps_skips_and_epochs() -> None:
    """ACC-S1, ACC-F4, ACC-W7: one on_microbatch per microbatch, on_step per stepped window,
    on_skip with its reason, on_epoch_end once per pass."""
    recorder = Recorder()
    machine = AccumulationMachine(AccumulationConfig(2), listeners=[recorder])
    for verdict in ({}, {"amp_overflow": True}, {"found_inf": True}):
        for _ in range(2):
            machine.begin()
            window = machine.end()
        assert window is not None
        machine.commit(**verdict)
    assert machine.end_pass().action == "none"
    assert recorder.events == [
        ("microbatch", "1"),
        ("microbatch", "2"),
        ("step", "1"),
        ("microbatch", "3"),
        ("microbatch", "4"),
        ("skip", "amp_overflow"),
        ("microbatch", "5"),
        ("microbatch", "6"),
        ("skip", "non_finite"),
        ("epoch_end", "1"),
    ]


def test_epoch_end_emitted_at_commit_when_step_closes_partial_window() -> None:
    """ACC-W3, ACC-W7: end_pass under step closes the window; on_epoch_end follows its commit,
    once, after on_step, with the epoch advanced."""
    recorder = Recorder()
    machine = AccumulationMachine(AccumulationConfig(4))
    machine.add_listener(recorder)
    machine.begin()
    machine.end()
    decision = machine.end_pass()
    assert decision.action == "close"
    assert recorder.events == [("microbatch", "1")]
    machine.commit()
    assert recorder.events == [("microbatch", "1"), ("step", "1"), ("epoch_end", "1")]
    assert recorder.stats[-1].epoch == 1


@pytest.mark.parametrize(("policy", "action"), [("drop", "discard"), ("carry", "carry")])
def test_epoch_end_for_drop_and_carry(policy: str, action: str) -> None:
    """ACC-W5, ACC-W6: drop and carry report the epoch's end at end_pass, no step or skip."""
    recorder = Recorder()
    config = AccumulationConfig(4, partial_window=policy)  # type: ignore[arg-type]
    machine = AccumulationMachine(config, listeners=[recorder])
    machine.begin()
    machine.end()
    assert machine.end_pass().action == action
    assert recorder.events == [("microbatch", "1"), ("epoch_end", "1")]


def test_empty_window_skip_reason() -> None:
    """ACC-N6: an empty window is reported as a skip with reason 'empty'."""
    recorder = Recorder()
    machine = AccumulationMachine(
        AccumulationConfig(1, normalization="items"), listeners=[recorder]
    )
    machine.begin(0)
    machine.end()
    machine.commit()
    assert recorder.events[-1] == ("skip", "empty")


def test_stats_counters() -> None:
    """ACC-C3, ACC-S2: effective_step == optimizer_steps; position, window and effective batch."""
    machine = AccumulationMachine(AccumulationConfig(3, micro_batch_size=8), topology=Topology(2))
    stats = machine.stats
    assert (stats.micro_steps, stats.optimizer_steps, stats.position) == (0, 0, 0)
    assert stats.window_size == 3
    assert stats.effective_batch_size == 48
    assert stats.world_size == 2
    assert not stats.is_accumulating
    machine.begin()
    assert machine.stats.is_accumulating
    machine.end()
    stats = machine.stats
    assert stats.position == 1
    assert stats.is_accumulating
    for _ in range(2):
        machine.begin()
        machine.end()
    machine.commit()
    stats = machine.stats
    assert stats.effective_step == stats.optimizer_steps == 1
    assert stats.micro_steps == 3
    assert not stats.is_accumulating
    assert AccumulationMachine(AccumulationConfig(3)).stats.effective_batch_size is None


def test_last_grad_norm_is_read_lazily() -> None:
    """ACC-L3: the pre-clip norm is kept as given and read (host sync) only when
    last_grad_norm is accessed — never while building stats or calling listeners."""
    norm = CountingNorm(2.5)
    recorder = Recorder()
    machine = AccumulationMachine(AccumulationConfig(2), listeners=[recorder])
    assert machine.stats.last_grad_norm is None
    for _ in range(2):
        machine.begin()
        machine.end()
    machine.commit(grad_norm=norm)
    for _ in range(2):
        machine.begin()
        machine.end()
    machine.commit()  # no new norm: the last one stays
    stats = machine.stats
    assert norm.reads == 0
    assert stats.last_grad_norm == 2.5
    assert norm.reads == 1
    data = stats.as_dict()
    assert norm.reads == 2
    assert data["last_grad_norm"] == 2.5
    assert data["effective_step"] == 2
    assert "_grad_norm" not in data
