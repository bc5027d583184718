"""`MemoryMonitor` and `PerformanceTracker` (spec ACC-K5 tooling): real readings
of this process, checked for consistency with numbers the test knows."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, make_model, sum_loss
from test_host_sync import count_host_reads

from gradaccum import AdaptiveMicrobatch, ConfigError
from gradaccum_torch import Accumulator, MemoryMonitor, PerformanceTracker


def wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 1)
    ).double()


def run(model: torch.nn.Module, listeners: list[object], windows: int = 4) -> Accumulator:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acc = Accumulator(
        model,
        opt,
        schedule=AdaptiveMicrobatch(target=64, micro_batch=16),
        normalization="items",
        listeners=listeners,  # type: ignore[arg-type]
    )
    for batch in make_batches([64] * windows):
        acc.run(batch, lambda p: sum_loss(model, p))
    return acc


def test_memory_monitor_records_every_point_and_estimates_rows() -> None:
    """ACC-K5: after forward, backward and boundary readings exist for every
    microbatch/window; the per-row estimate covers at least the hidden
    activation the test knows a row needs (4096 float64 = 32 KiB), and the
    largest microbatch under a 64 MiB-over-baseline budget follows from it."""
    model = wide_model()
    monitor = MemoryMonitor(model, budget_bytes=10**12)
    run(model, [monitor])
    points = [s.point for s in monitor.samples]
    assert points.count("forward") == 16 and points.count("backward") == 16
    assert points.count("boundary") == 4
    rec = monitor.recommendations()
    # Saved per microbatch of 16 rows: tanh's output (4096 float64 per row), the
    # residual model(x) - y squared by the loss (1 float64 per row), and the 64x4
    # input batch's storage, which the first Linear saves (its slice is a view).
    assert rec.activation_bytes_per_row == 4096 * 8 + 8 + 64 * 4 * 8 / 16
    assert rec.bytes_per_row == 3 * rec.activation_bytes_per_row
    assert rec.gradient_bytes == sum(p.numel() * 8 for p in model.parameters())
    assert not rec.offload_pays  # CPU: offloading to the CPU frees nothing
    assert not rec.float32_pays  # float64 parameters
    baseline = monitor.samples[-1].current
    budgeted = MemoryMonitor(model, budget_bytes=baseline + 64 * 2**20, threshold=1.0)
    budgeted._baseline, budgeted._per_row = baseline, [rec.activation_bytes_per_row]
    assert budgeted.recommendations().largest_microbatch == int(64 * 2**20 // rec.bytes_per_row)
    assert monitor.summary()["advice"]
    metrics = monitor.metrics()
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["mem/bytes_per_row"] == rec.bytes_per_row
    assert metrics["mem/current_mib"] == monitor.samples[-1].current / 2**20


def test_memory_monitor_float32_advice_for_bf16() -> None:
    """ACC-P1: bf16 parameters over windows of 4 microbatches: fp32 accumulation
    pays, and its extra memory is 4 bytes per parameter."""
    model = wide_model().to(torch.bfloat16)
    monitor = MemoryMonitor(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acc = Accumulator(model, opt, 4, normalization="sum", listeners=[monitor])
    for x, y in make_batches([8] * 4, dtype=torch.bfloat16):
        with acc.microbatch():
            acc.backward(sum_loss(model, (x, y)))
    rec = monitor.recommendations()
    assert rec.float32_pays
    assert rec.float32_extra_bytes == 4 * sum(p.numel() for p in model.parameters())


def test_memory_monitor_bad_options() -> None:
    """ACC-E4: bad options raise ConfigError naming the value."""
    model = make_model()
    with pytest.raises(ConfigError, match=r"threshold=0\.0"):
        MemoryMonitor(model, threshold=0.0)
    with pytest.raises(ConfigError, match="window=1"):
        MemoryMonitor(model, window=1)
    with pytest.raises(ConfigError, match="threshold='x'"):
        MemoryMonitor(model, threshold="x")  # type: ignore[arg-type]
    for budget in ("x", -1, 0, True):
        with pytest.raises(ConfigError, match="budget_bytes="):
            MemoryMonitor(model, budget_bytes=budget)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device='bogus'"):
        MemoryMonitor(model, device="bogus")


def test_performance_tracker_bad_options() -> None:
    """ACC-E4: a tracker needs an Accumulator and a real device: ConfigError naming the
    value, and nothing is registered."""
    for acc in (None, 3):
        with pytest.raises(ConfigError, match=f"acc={acc!r}"):
            PerformanceTracker(acc)  # type: ignore[arg-type]
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    with pytest.raises(ConfigError, match="device='bogus'"):
        PerformanceTracker(acc, device="bogus")
    assert acc.machine.listeners == ()


def test_performance_tracker_counts_and_adds_no_host_reads() -> None:
    """ACC-B3: the tracker's metrics count exactly the run's steps and items
    (4 steps, 256 items, 16 microbatches), report 1 host read per step on one
    rank, and the tracker adds no tensor read of its own (counted like
    test_host_sync)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acc = Accumulator(
        model, opt, schedule=AdaptiveMicrobatch(target=64, micro_batch=16), normalization="items"
    )
    tracker = PerformanceTracker(acc)
    data = make_batches([64] * 4)
    reads = [0]
    with count_host_reads(reads):
        for batch in data:
            acc.run(batch, lambda p: sum_loss(model, p))
    with_tracker = reads[0]
    m = tracker.metrics()
    assert set(m) == {
        "perf/items_per_s",
        "perf/steps_per_s",
        "perf/microbatch_ms",
        "perf/boundary_ms",
        "perf/host_reads_per_step",
    }
    assert all(isinstance(v, float) for v in m.values())
    assert tracker._steps == 4 and tracker._items == 256 and tracker._microbatches == 16
    assert m["perf/host_reads_per_step"] == 1.0
    assert tracker.postfix().startswith("step 4, ")
    model2 = make_model()
    acc2 = Accumulator(
        model2,
        torch.optim.SGD(model2.parameters(), lr=0.01),
        schedule=AdaptiveMicrobatch(target=64, micro_batch=16),
        normalization="items",
    )
    reads = [0]
    with count_host_reads(reads):
        for batch in data:
            acc2.run(batch, lambda p: sum_loss(model2, p))
    assert with_tracker == reads[0] == 4  # the boundary's one read per window
