"""Unit tests of the pure transitions and the decisions they return (spec/accumulation.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from gradaccum import (
    AccumulationConfig,
    AccumulationMachine,
    AccumulationState,
    ByStep,
    ClipPolicy,
    GradAccumError,
    GradientWeights,
    Phase,
    TargetBatch,
    Topology,
    UsageError,
    WindowDecision,
)
from gradaccum.state import (
    abandon_window,
    begin_microbatch,
    commit,
    end_microbatch,
    end_pass,
)


def run_window(machine: AccumulationMachine, n: int, items: int | None = None) -> WindowDecision:
    """Run ``n`` microbatches; the last one must close the window."""
    window = None
    for i in range(n):
        decision = machine.begin(items)
        assert decision.is_boundary == (i == n - 1)
        window = machine.end()
    assert window is not None
    return window


def test_pure_transitions_do_not_mutate() -> None:
    """ACC-B1 (contract): transitions are pure: they return new states and leave the input as
    is; beginning a microbatch changes no state (a forgotten microbatch leaves no trace)."""
    config = AccumulationConfig(2)
    s0 = AccumulationState.initial(config)
    s1, d = begin_microbatch(config, s0)
    assert s1 is s0
    assert s0 == AccumulationState.initial(config)
    assert d.index == 0
    assert d.window_size == 2
    s2, w = end_microbatch(config, s1, d)
    assert w is None
    assert (s2.position, s2.window_size, s2.micro_steps) == (1, 2, 1)
    assert s0 == AccumulationState.initial(config)
    s3, d3 = begin_microbatch(config, s2)
    assert s3 is s2
    s4, w = end_microbatch(config, s3, d3)
    assert w is not None
    assert s4.phase is Phase.BOUNDARY
    assert s2.phase is Phase.IDLE
    assert s2.position == 1
    s5, verdict = commit(config, s4)
    assert s4.phase is Phase.BOUNDARY
    assert verdict.step_optimizer
    assert s5.optimizer_steps == 1
    s6, p = end_pass(config, s5)
    assert p.action == "none"
    assert s6.epoch == 1
    assert s5.epoch == 0


def test_end_microbatch_refuses_a_decision_of_another_position() -> None:
    """ACC-E2: handing end_microbatch a stale decision raises UsageError and changes nothing."""
    config = AccumulationConfig(3)
    s0 = AccumulationState.initial(config)
    _, d0 = begin_microbatch(config, s0)
    s1, _ = end_microbatch(config, s0, d0)
    with pytest.raises(UsageError, match="position 0"):
        end_microbatch(config, s1, d0)
    assert s1.position == 1


def test_abandon_at_boundary_drops_the_window_uncommitted() -> None:
    """ACC-C1, ACC-C3: a boundary that fails before commit is abandoned: the window is counted
    in dropped_windows, not in windows/optimizer_steps/skipped_steps; a pass it closed ends."""
    config = AccumulationConfig(4)
    machine = AccumulationMachine(config)
    machine.begin()
    machine.end()
    machine.end_pass()  # closes the partial window: boundary pending, epoch pending
    assert machine.state.phase is Phase.BOUNDARY
    machine.abandon()
    state = machine.state
    assert state.phase is Phase.IDLE
    assert (state.epoch, state.position, state.window_size) == (1, 0, 0)
    assert (state.windows, state.optimizer_steps, state.skipped_steps) == (0, 0, 0)
    assert state.dropped_windows == 1
    assert state.micro_steps == 1
    assert abandon_window(state) is state  # nothing open: nothing to abandon


def test_full_window_mean_is_fast_path() -> None:
    """ACC-N1, ACC-N7, ACC-D1: a full mean window: loss × 1/k, no gradient pass, one sync."""
    machine = AccumulationMachine(AccumulationConfig(4))
    syncs = []
    for i in range(4):
        d = machine.begin()
        assert d.loss_multiplier == 0.25
        assert d.window_size == 4
        assert d.index == i
        syncs.append(d.sync_gradients)
        window = machine.end()
    assert syncs == [False, False, False, True]
    assert window is not None
    assert window.grad_multiplier == 1.0
    assert not window.divide_by_world_items
    assert not window.partial
    assert not window.empty


def test_short_last_window_with_last_in_pass_is_corrected() -> None:
    """ACC-W3, ACC-W4, ACC-N1: k=4, a pass of 6 with a one-ahead look: the last window of 2
    closes on the last microbatch and is rescaled by 4/2."""
    machine = AccumulationMachine(AccumulationConfig(4))
    run_window(machine, 4)
    machine.commit()
    machine.begin()
    assert machine.end() is None
    d = machine.begin(last_in_pass=True)
    assert d.is_boundary
    assert d.sync_gradients
    assert d.ends_pass
    window = machine.end()
    assert window is not None
    assert window.partial
    assert window.contributing == 2
    assert window.grad_multiplier == 2.0
    assert 2 * 0.25 * window.grad_multiplier == 1.0
    machine.commit()
    assert machine.end_pass().action == "none"
    assert machine.state.epoch == 1


def test_short_last_window_planned_up_front_with_remaining() -> None:
    """ACC-W4: with remaining_in_pass the short window is planned exactly: k=min(4, 2)."""
    machine = AccumulationMachine(AccumulationConfig(4))
    d = machine.begin(remaining_in_pass=2)
    assert d.window_size == 2
    assert d.loss_multiplier == 0.5
    machine.end()
    d = machine.begin(remaining_in_pass=1)
    assert d.is_boundary
    window = machine.end()
    assert window is not None
    assert window.grad_multiplier == 1.0


def test_end_pass_closes_partial_window_under_step() -> None:
    """ACC-W3, ACC-W7, ACC-D1: without a look-ahead, end_pass closes the window; on W>1 ranks
    it asks for one manual sync; the epoch advances at commit."""
    machine = AccumulationMachine(AccumulationConfig(4), topology=Topology(2))
    for _ in range(3):
        machine.begin()
        machine.end()
    p = machine.end_pass()
    assert p.action == "close"
    assert p.window is not None
    assert p.window.needs_manual_sync
    assert p.window.partial
    assert p.window.grad_multiplier == pytest.approx(4 / 3, rel=1e-15)
    assert machine.state.epoch == 0
    with pytest.raises(UsageError):
        machine.state_dict()
    verdict = machine.commit()
    assert verdict.step_optimizer
    assert machine.state.epoch == 1
    assert machine.state.position == 0


def test_drop_policy_discards_partial_window() -> None:
    """ACC-W5: under drop, a pass of 3 with k=4 never reaches a boundary; end_pass discards."""
    machine = AccumulationMachine(AccumulationConfig(4, partial_window="drop"))
    for i in range(3):
        d = machine.begin(last_in_pass=i == 2, remaining_in_pass=3 - i)
        assert not d.is_boundary
        assert not d.sync_gradients
        assert d.window_size == 4
        assert machine.end() is None
    p = machine.end_pass()
    assert p.action == "discard"
    state = machine.state
    assert (state.position, state.windows, state.skipped_steps, state.optimizer_steps) == (
        0,
        0,
        0,
        0,
    )
    assert state.dropped_windows == 1
    assert state.epoch == 1
    assert state.micro_steps == 3


def test_carry_policy_continues_window() -> None:
    """ACC-W6: under carry, the open window continues into the next pass with its size."""
    machine = AccumulationMachine(AccumulationConfig(4, partial_window="carry"))
    for i in range(3):
        machine.begin(last_in_pass=i == 2)
        machine.end()
    assert machine.end_pass().action == "carry"
    assert machine.state.position == 3
    assert machine.state.epoch == 1
    d = machine.begin()
    assert d.index == 3
    assert d.is_boundary
    window = machine.end()
    assert window is not None
    assert window.grad_multiplier == 1.0
    assert not window.partial


def test_items_single_process() -> None:
    """ACC-N2: single process, host counts: grad multiplier = 1 / items of the window."""
    machine = AccumulationMachine(AccumulationConfig(3, normalization="items"))
    for n in (5, 7):
        assert machine.begin(n).loss_multiplier == 1.0
        machine.end()
    machine.begin(8)
    window = machine.end()
    assert window is not None
    assert window.items == 20
    assert window.grad_multiplier == 1 / 20
    assert not window.divide_by_world_items
    machine.commit()
    assert machine.state.items_total == 20


@pytest.mark.parametrize(("averages", "multiplier"), [(True, 2.0), (False, 1.0)])
def test_items_across_ranks_divides_by_world_items(averages: bool, multiplier: float) -> None:
    """ACC-N2, ACC-D2, ACC-D3: with W ranks the decision does not depend on the local count:
    multiply by W (averaging reduction) or 1 (summing), then divide by the world item count."""
    topology = Topology(2, averages=averages)
    windows = []
    for counts in ((1, 9), (5, 0)):
        machine = AccumulationMachine(
            AccumulationConfig(2, normalization="items"), topology=topology
        )
        for n in counts:
            machine.begin(n)
            window = machine.end()
        assert window is not None
        windows.append(replace(window, items=0))
    assert windows[0] == windows[1]
    assert windows[0].divide_by_world_items
    assert windows[0].grad_multiplier == multiplier
    assert not windows[0].empty


def test_items_on_device_single_process() -> None:
    """ACC-N3: a device item count asks the adapter to divide by it, no host read."""
    machine = AccumulationMachine(AccumulationConfig(2, normalization="items"))
    machine.begin(items_on_device=True)
    machine.end()
    assert machine.state.device_items
    assert machine.state_dict()["device_items"] is True
    machine.begin(3)
    window = machine.end()
    assert window is not None
    assert window.divide_by_world_items
    assert window.grad_multiplier == 1.0


def test_items_zero_is_empty() -> None:
    """ACC-N6, ACC-F5: a window with zero items is empty: no step, counted as skipped."""
    machine = AccumulationMachine(AccumulationConfig(2, normalization="items"))
    window = run_window(machine, 2, items=0)
    assert window.empty
    verdict = machine.commit(found_inf=True, amp_overflow=True)
    assert verdict.outcome == "empty"
    assert not verdict.step_optimizer
    assert not verdict.step_scheduler
    assert not verdict.raise_error
    assert machine.state.skipped_steps == 1


def test_sum_normalization() -> None:
    """ACC-N4: sum: no multiplier anywhere, even for a short window."""
    machine = AccumulationMachine(AccumulationConfig(4, normalization="sum"))
    assert machine.begin().loss_multiplier == 1.0
    machine.end()
    assert machine.begin(last_in_pass=True).loss_multiplier == 1.0
    window = machine.end()
    assert window is not None
    assert window.grad_multiplier == 1.0


def test_drop_microbatch_excluded_from_mean() -> None:
    """ACC-F3, ACC-N5: a dropped microbatch keeps its slot, not its weight."""
    config = AccumulationConfig(4, non_finite="drop_microbatch")
    machine = AccumulationMachine(config)
    for i in range(4):
        d = machine.begin()
        assert d.isolate
        window = machine.end(dropped=i == 1)
    assert window is not None
    assert window.contributing == 3
    assert window.grad_multiplier == pytest.approx(4 / 3, rel=1e-15)
    assert 3 * 0.25 * window.grad_multiplier == pytest.approx(1.0, abs=1e-15)
    assert machine.state.dropped_microbatches == 1
    assert machine.state.micro_steps == 4


def test_all_dropped_window_is_empty() -> None:
    """ACC-F3, ACC-N6: a window whose microbatches were all dropped does not step."""
    machine = AccumulationMachine(AccumulationConfig(2, non_finite="drop_microbatch"))
    machine.begin()
    machine.end(dropped=True)
    machine.begin()
    window = machine.end(dropped=True)
    assert window is not None
    assert window.empty
    assert machine.commit().outcome == "empty"


@pytest.mark.parametrize("policy", ["skip", "raise", "drop_microbatch"])
def test_amp_overflow_always_skips(policy: str) -> None:
    """ACC-F4, ACC-S3: AMP overflow skips whatever the policy, never raises, never steps the
    scheduler."""
    machine = AccumulationMachine(AccumulationConfig(2, non_finite=policy))  # type: ignore[arg-type]
    run_window(machine, 2)
    verdict = machine.commit(amp_overflow=True, found_inf=True)
    assert verdict.outcome == "amp_overflow"
    assert not verdict.step_optimizer
    assert not verdict.step_scheduler
    assert not verdict.raise_error
    assert machine.state.skipped_steps == 1
    assert machine.state.optimizer_steps == 0


@pytest.mark.parametrize(("policy", "raises"), [("skip", False), ("raise", True)])
def test_non_finite_skip_and_raise(policy: str, raises: bool) -> None:
    """ACC-F1, ACC-F2: a non-finite gradient skips; under raise the adapter raises after the
    state is committed."""
    machine = AccumulationMachine(AccumulationConfig(2, non_finite=policy))  # type: ignore[arg-type]
    run_window(machine, 2)
    verdict = machine.commit(found_inf=True)
    assert verdict.outcome == "non_finite"
    assert not verdict.step_optimizer
    assert not verdict.step_scheduler
    assert verdict.raise_error is raises
    assert machine.state.phase is Phase.IDLE
    assert machine.state.skipped_steps == 1
    assert machine.state.windows == 1


def test_clip_and_weights_in_window_decision() -> None:
    """ACC-L1, ACC-G2: the window clip and the weights are applied once at the boundary."""
    clip = ClipPolicy(1.0)
    weights = GradientWeights.of(by_name={"*.bias": 0.5})
    machine = AccumulationMachine(AccumulationConfig(2, clip=clip, weights=weights))
    d = machine.begin()
    assert d.clip is None
    assert not d.isolate
    machine.end()
    machine.begin()
    window = machine.end()
    assert window is not None
    assert window.clip == clip
    assert window.apply_weights


def test_per_microbatch_clip() -> None:
    """ACC-L2: per-microbatch clipping isolates and clips each microbatch; the window is not
    clipped again."""
    clip = ClipPolicy(1.0, per_microbatch=True)
    machine = AccumulationMachine(AccumulationConfig(2, clip=clip))
    d = machine.begin()
    assert d.isolate
    assert d.clip == clip
    machine.end()
    machine.begin()
    window = machine.end()
    assert window is not None
    assert window.clip is None
    assert not window.apply_weights


def test_by_step_counts_closed_windows_including_skips() -> None:
    """ACC-K3: the ByStep key counts closed windows: an AMP-skipped window advances the ramp."""
    machine = AccumulationMachine(AccumulationConfig(schedule=ByStep({0: 1, 2: 3})))
    run_window(machine, 1)
    machine.commit(amp_overflow=True)
    run_window(machine, 1)
    machine.commit()
    assert machine.state.optimizer_steps == 1
    assert machine.begin().window_size == 3


def test_window_size_fixed_while_open() -> None:
    """ACC-W1: a ByEpoch change does not resize a window carried across the epoch."""
    from gradaccum import ByEpoch

    machine = AccumulationMachine(
        AccumulationConfig(schedule=ByEpoch({0: 3, 1: 1}), partial_window="carry")
    )
    machine.begin()
    machine.end()
    machine.end_pass()
    assert machine.begin().window_size == 3
    machine.end()
    d = machine.begin()
    assert d.window_size == 3
    assert d.is_boundary
    machine.end()
    machine.commit()
    assert machine.begin().window_size == 1


def test_target_batch_window() -> None:
    """ACC-K4: TargetBatch(32, 4, 2) plans k = 32 / (4 × 2) = 4."""
    config = AccumulationConfig(schedule=TargetBatch(32, 4, 2), micro_batch_size=4)
    machine = AccumulationMachine(config, topology=Topology(2))
    assert machine.begin().window_size == 4
    assert machine.stats.effective_batch_size == 32


def test_state_dict_round_trip_mid_window() -> None:
    """ACC-R1, ACC-R3, ACC-R4: a mid-window state survives JSON and the resumed machine
    continues exactly."""
    config = AccumulationConfig(3, normalization="items")
    a = AccumulationMachine(config)
    a.begin(4)
    a.end()
    b = AccumulationMachine(config)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.state == b.state
    for machine in (a, b):
        machine.begin(6)
        machine.end()
        machine.begin(10)
    wa, wb = a.end(), b.end()
    assert wa == wb
    assert wa is not None
    assert wa.grad_multiplier == 1 / 20


def test_state_dict_keys() -> None:
    """ACC-R4: the state JSON has exactly the documented keys."""
    keys = set(AccumulationMachine(AccumulationConfig(2)).state_dict())
    assert keys == {
        "version",
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
        "synced_in_window",
        "device_items",
        "schedule_state",
    }


def test_state_dict_refused_inside_microbatch() -> None:
    """ACC-R1: no checkpoint inside a microbatch or before the boundary's commit."""
    machine = AccumulationMachine(AccumulationConfig(1))
    machine.begin()
    with pytest.raises(UsageError, match="microbatch"):
        machine.state_dict()
    machine.end()
    with pytest.raises(UsageError, match="boundary"):
        machine.state_dict()
    machine.commit()
    assert machine.state_dict()["optimizer_steps"] == 1


def test_cancel_forgets_the_microbatch() -> None:
    """ACC-C2: a cancelled microbatch is not counted and the machine can begin again."""
    machine = AccumulationMachine(AccumulationConfig(2))
    machine.begin()
    machine.end()
    before = machine.state
    machine.begin()
    machine.cancel()
    assert machine.state == before
    assert machine.state.micro_steps == 1
    machine.cancel()  # idle: a no-op
    assert machine.state == before
    assert machine.begin().is_boundary


def test_cancel_first_microbatch_restores_state() -> None:
    """ACC-C2: cancelling the first microbatch of a window leaves the state as if it never began."""
    machine = AccumulationMachine(AccumulationConfig(4))
    before = machine.state
    machine.begin()
    machine.cancel()
    assert machine.state == before


def test_pure_functions_report_usage_errors() -> None:
    """ACC-E1, ACC-E2: out-of-order transitions raise UsageError (a GradAccumError)."""
    config = AccumulationConfig(1)
    s0 = AccumulationState.initial(config)
    with pytest.raises(UsageError):
        commit(config, s0)
    _, d = begin_microbatch(config, s0)
    s1, window = end_microbatch(config, s0, d)
    assert window is not None
    with pytest.raises(GradAccumError):
        end_microbatch(config, s1, d)  # a boundary awaits commit
    with pytest.raises(UsageError):
        end_pass(config, s1)
    with pytest.raises(UsageError):
        begin_microbatch(config, s1)
    machine = AccumulationMachine(config)
    with pytest.raises(UsageError):
        machine.end()
    machine.begin()
    with pytest.raises(UsageError):
        machine.end_pass()
    with pytest.raises(UsageError):
        machine.state_dict()


# Distributed consistency: decisions must not depend on rank-local values (ACC-D2).


def test_mean_with_summing_reduction_divides_by_world() -> None:
    """ACC-N1: mean over W ranks with a summing reduction needs an extra 1/W."""
    machine = AccumulationMachine(AccumulationConfig(2), topology=Topology(2, averages=False))
    window = run_window(machine, 2)
    assert window.grad_multiplier == 0.5


@pytest.mark.parametrize("normalization", ["mean", "items"])
def test_drop_microbatch_decisions_identical_across_ranks(normalization: str) -> None:
    """ACC-D2: two ranks, one drops both microbatches of its window: either the configuration
    is refused or both ranks take the same window decision and verdict."""
    config = AccumulationConfig(
        2,
        non_finite="drop_microbatch",
        normalization=normalization,  # type: ignore[arg-type]
    )
    try:
        ranks = [AccumulationMachine(config, topology=Topology(2)) for _ in range(2)]
        windows = []
        verdicts = []
        for rank, machine in enumerate(ranks):
            for _ in range(2):
                machine.begin(3 if normalization == "items" else None)
                window = machine.end(dropped=rank == 0)
            assert window is not None
            windows.append(replace(window, items=0, contributing=0))
            verdicts.append(machine.commit())
    except GradAccumError:
        return  # refusing drop_microbatch on several ranks is also sound
    assert windows[0] == windows[1]
    assert verdicts[0] == verdicts[1]


def test_world_items_zero_is_empty() -> None:
    """ACC-N6: a window with zero items over all ranks is empty, not non-finite."""
    config = AccumulationConfig(1, normalization="items", non_finite="raise")
    machine = AccumulationMachine(config, topology=Topology(2))
    run_window(machine, 1, items=0)
    verdict = machine.commit(world_items=0, found_inf=True)
    assert verdict.outcome == "empty"
    assert not verdict.raise_error


def test_target_batch_world_size_must_match_topology() -> None:
    """ACC-K4: TargetBatch(world_size=1) on 2 ranks is refused, naming both sizes."""
    from gradaccum import ConfigError

    config = AccumulationConfig(schedule=TargetBatch(32, 4, 1))
    with pytest.raises(ConfigError, match="2"):
        AccumulationMachine(config, topology=Topology(2))


@pytest.mark.parametrize(
    "options",
    [
        {"accumulation_dtype": "float32"},
        {"offload": True},
        {"clip": ClipPolicy(1.0, per_microbatch=True)},
    ],
    ids=["fp32-buffers", "offload", "per-microbatch-clip"],
)
def test_gradient_outside_param_grad_defers_the_sync_to_one_manual_reduction(
    options: dict[str, Any],
) -> None:
    """ACC-D1: on several ranks a gradient kept outside param.grad is never synced by a
    backward; the window closes needing exactly one manual reduction. One rank: unchanged."""
    config = AccumulationConfig(3, **options)
    many = AccumulationMachine(config, topology=Topology(2))
    syncs = []
    for _ in range(3):
        syncs.append(many.begin().sync_gradients)
        window = many.end()
    assert syncs == [False, False, False]
    assert window is not None
    assert window.needs_manual_sync
    one = AccumulationMachine(config)
    syncs = []
    for _ in range(3):
        syncs.append(one.begin().sync_gradients)
        window = one.end()
    assert syncs == [False, False, True]
    assert window is not None
    assert not window.needs_manual_sync
