"""`WandbLogger` fed by the issue-12 monitors: `PerformanceTracker` and `MemoryMonitor`
metrics land in the same one-row-per-optimizer-step history as the accumulation counters, under
adaptive microbatching (`Accumulator.run`), read back from the real offline ``.wandb`` file."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import wandb

from gradaccum_torch import Accumulator, AdaptiveMicrobatch
from gradaccum_torch.memory import MemoryMonitor
from gradaccum_torch.performance import PerformanceTracker
from gradaccum_wandb import WandbLogger
from gradaccum_wandb.offline import read_run

TARGET, MICRO, WINDOWS = 12, 4, 3


def test_monitor_metrics_are_logged_once_per_optimizer_step(tmp_path: Path) -> None:
    """Three `run()` windows of 12 rows in microbatches of 4: three rows on the
    ``optimizer_step`` axis (1, 2, 3), each with ``accum/items_in_window`` 12, the tracker's
    items/s and microbatch time (positive, finite) and the memory monitor's reading; the
    parameters equal one float64 large-batch SGD step per window within 1e-12 (ACC-K5)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    reference = torch.nn.Linear(3, 1).double()
    reference.load_state_dict(model.state_dict())
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=AdaptiveMicrobatch(target=TARGET, micro_batch=MICRO),
        normalization="items",
    )
    tracker = PerformanceTracker(acc)
    memory = MemoryMonitor(model)
    acc.add_listener(memory)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradaccum-test")
    WandbLogger(run, extra=[tracker.metrics, memory.metrics]).attach(acc)
    gen = torch.Generator().manual_seed(1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(WINDOWS):
        x = torch.randn(TARGET, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(TARGET, 1, generator=gen, dtype=torch.float64)

        def loss_fn(rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            xs, ys = rows
            return ((model(xs) - ys) ** 2).sum()

        acc.run((x, y), loss_fn)
        ref_opt.zero_grad()
        (((reference(x) - y) ** 2).sum() / TARGET).backward()
        ref_opt.step()
    run.finish()
    wandb.teardown()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    offline = read_run(next(tmp_path.rglob("*.wandb")))
    rows = [r for r in offline.history if "accum/items_in_window" in r]
    assert [r["optimizer_step"] for r in rows] == [1, 2, 3]
    assert all(r["accum/items_in_window"] == TARGET for r in rows)
    for row in rows:
        for key in ("perf/items_per_s", "perf/microbatch_ms", "mem/current_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
