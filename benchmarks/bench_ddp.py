"""gradaccum-ddp on 2 gloo ranks against two hand-written DDP loops, paired in one run.

``python benchmarks/bench_ddp.py [--quick]`` spawns 2 processes (gloo on 127.0.0.1, one
thread each) that train three copies of the same MLP of 5.2 million parameters
(1024-2048-1024-1024, float32, SGD) with microbatches of 4 samples and 8 accumulation
steps, on identical data:

* ``gradaccum``: ``DDPAccumulator`` (``acc.iterate`` / ``acc.microbatch`` / ``acc.backward``);
* ``sync_every``: plain DDP, ``(loss / 8).backward()`` on every microbatch, so every
  backward all-reduces the gradient (what accumulation without ``no_sync`` costs);
* ``no_sync``: the hand-written loop, ``with ddp.no_sync():`` for the first 7 microbatches.

Each repetition times every variant for one pass of the same number of windows (6; the
``gradaccum`` pass includes its one pass-length check), back to back, in a rotating order
(ABC, BCA, CAB, ...), after a barrier; per-window wall time is measured on rank 0. Reported:
the median per-window time of each variant, and the medians (with interquartile ranges) of
the paired ratios ``sync_every / gradaccum`` (target >= 1.5) and ``gradaccum / no_sync``
(target <= 1.03). Writes ``benchmarks/results/ddp.json`` (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradaccum_ddp
from gradaccum_ddp import DDPAccumulator
from gradaccum_ddp.testing import launch

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 8
MICROBATCH = 4
WIDTHS = (1024, 2048, 1024, 1024)
VARIANTS = ("gradaccum", "sync_every", "no_sync")
TARGET_SPEEDUP = 1.5  # sync_every / gradaccum, at least
TARGET_OVERHEAD = 1.03  # gradaccum / no_sync, at most

Window = Callable[[], None]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def data(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(rank)
    return [
        (
            torch.randn(MICROBATCH, WIDTHS[0], generator=gen),
            torch.randn(MICROBATCH, WIDTHS[-1], generator=gen),
        )
        for _ in range(count)
    ]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def gradaccum_loop(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Window:
    ddp = DistributedDataParallel(make_model())
    acc = DDPAccumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-6), steps=STEPS)

    def run() -> None:
        for x, y in acc.iterate(batches):
            with acc.microbatch():
                acc.backward(mse(ddp(x), y))

    return run


def sync_every_loop(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Window:
    ddp = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-6)

    def run() -> None:
        for i, (x, y) in enumerate(batches, start=1):
            (mse(ddp(x), y) / STEPS).backward()  # type: ignore[no-untyped-call]
            if i % STEPS == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)

    return run


def no_sync_loop(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Window:
    ddp = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-6)

    def run() -> None:
        for i, (x, y) in enumerate(batches, start=1):
            if i % STEPS:
                with ddp.no_sync():
                    (mse(ddp(x), y) / STEPS).backward()  # type: ignore[no-untyped-call]
            else:
                (mse(ddp(x), y) / STEPS).backward()  # type: ignore[no-untyped-call]
                opt.step()
                opt.zero_grad(set_to_none=True)

    return run


def bench_rank(rank: int, world_size: int, out: str, reps: int, warmup: int, windows: int) -> None:
    batches = data(rank, windows * STEPS)
    loops = {
        "gradaccum": gradaccum_loop(batches),
        "sync_every": sync_every_loop(batches),
        "no_sync": no_sync_loop(batches),
    }
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(warmup + reps):
        order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            loops[name]()
            seconds = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(seconds / windows)
    if rank == 0:
        params = sum(p.numel() for p in make_model().parameters())
        Path(out).write_text(json.dumps({"params": params, "per_window_s": times}))


def summary(values: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "iqr": [q[0], q[2]]}


def table(results: dict[str, Any]) -> str:
    ms = results["per_window_ms"]
    r = results["ratios"]
    lines = [
        f"gradaccum-ddp, {results['world_size']} {results['backend']} ranks, "
        f"{results['params'] / 1e6:.2f} M parameters, microbatch {MICROBATCH}, steps {STEPS}, "
        f"{results['reps']} paired repetitions of {results['windows_per_rep']} windows",
        "",
        "| variant | per-window wall time, median (ms) | IQR (ms) |",
        "| --- | --- | --- |",
    ]
    for name in VARIANTS:
        lo, hi = ms[name]["iqr"]
        lines.append(f"| {name} | {ms[name]['median']:.1f} | {lo:.1f} – {hi:.1f} |")
    lines += [
        "",
        "| paired ratio | median | IQR | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, target in (
        ("sync_every_over_gradaccum", f">= {TARGET_SPEEDUP}"),
        ("gradaccum_over_no_sync", f"<= {TARGET_OVERHEAD}"),
    ):
        lo, hi = r[key]["iqr"]
        met = "yes" if r[key]["target_met"] else "NO"
        lines.append(f"| {key} | {r[key]['median']:.3f} | {lo:.3f} – {hi:.3f} | {target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ddp.json")
    args = parser.parse_args(argv)
    reps, warmup, windows = (4, 1, 2) if args.quick else (24, 2, 6)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        run = launch(
            bench_rank, 2, str(raw), reps, warmup, windows, timeout=1800, pg_timeout=300, threads=1
        )
        if not run.ok:
            print(f"benchmark ranks failed: {run}", file=sys.stderr)
            return 1
        measured = json.loads(raw.read_text())
    per_window: dict[str, list[float]] = measured["per_window_s"]
    ratio_speedup = [
        s / g for s, g in zip(per_window["sync_every"], per_window["gradaccum"], strict=True)
    ]
    ratio_overhead = [
        g / h for g, h in zip(per_window["gradaccum"], per_window["no_sync"], strict=True)
    ]
    speedup, overhead = summary(ratio_speedup), summary(ratio_overhead)
    results: dict[str, Any] = {
        "gradaccum_ddp": gradaccum_ddp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU, {_cpus()} cores",
        "command": "python benchmarks/bench_ddp.py" + (" --quick" if args.quick else ""),
        "world_size": 2,
        "backend": "gloo",
        "threads_per_rank": 1,
        "params": measured["params"],
        "steps": STEPS,
        "microbatch": MICROBATCH,
        "reps": reps,
        "windows_per_rep": windows,
        "per_window_ms": {name: summary([t * 1e3 for t in per_window[name]]) for name in VARIANTS},
        "per_window_s_raw": per_window,
        "ratios": {
            "sync_every_over_gradaccum": {
                **speedup,
                "target": TARGET_SPEEDUP,
                "target_met": speedup["median"] >= TARGET_SPEEDUP,
            },
            "gradaccum_over_no_sync": {
                **overhead,
                "target": TARGET_OVERHEAD,
                "target_met": overhead["median"] <= TARGET_OVERHEAD,
            },
        },
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
