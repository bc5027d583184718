"""Overhead of adaptive microbatching and its monitors, per microbatch (not a timed test).

``python benchmarks/bench_monitors.py [--reps N] [--ddp]`` times, per microbatch, on
a tiny model (``Linear(16, 16)``, SGD, 8 microbatches of 4 rows per window, one
torch thread, CPU) where any per-microbatch cost shows:

- ``loop``: the hand-sliced loop, ``with acc.microbatch(n): acc.backward(loss)``;
- ``run``: ``acc.run(batch, loss_fn)`` (AdaptiveMicrobatch, no OOM);
- ``run+memory``: ``run`` with a `MemoryMonitor` listener (reads /proc and counts
  the saved activations of every forward);
- ``run+perf``: ``run`` with a `PerformanceTracker`;
- ``run+both``.

Repetitions interleave the variants (rotating order); reported: the median per
microbatch time of each and its difference to ``loop`` (µs). With ``--ddp`` it
also times ``run`` against the plain ``iterate`` loop on 2 gloo ranks over
loopback (the status all-gather per microbatch attempt, and the boundary's
single reduction instead of DDP's bucketed one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradaccum import AdaptiveMicrobatch
from gradaccum_torch import Accumulator, MemoryMonitor, PerformanceTracker

K, ROWS, WINDOWS = 8, 4, 25


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(16, 16)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(K * ROWS, 16, generator=gen), torch.randn(K * ROWS, 16, generator=gen))
        for _ in range(WINDOWS)
    ]


def _variant(name: str) -> Callable[[list[tuple[torch.Tensor, torch.Tensor]]], float]:
    def go(data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def loss_fn(part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            out: torch.Tensor = ((model(part[0]) - part[1]) ** 2).sum()
            return out

        if name == "loop":
            acc = Accumulator(model, opt, K, normalization="items")
            began = time.perf_counter()
            for x, y in data:
                for s in range(0, K * ROWS, ROWS):
                    with acc.microbatch(ROWS):
                        acc.backward(loss_fn((x[s : s + ROWS], y[s : s + ROWS])))
            return (time.perf_counter() - began) / (len(data) * K)
        listeners: list[object] = []
        if name in ("run+memory", "run+both"):
            listeners.append(MemoryMonitor(model))
        acc = Accumulator(
            model,
            opt,
            schedule=AdaptiveMicrobatch(target=K * ROWS, micro_batch=ROWS),
            normalization="items",
            listeners=listeners,  # type: ignore[arg-type]
        )
        if name in ("run+perf", "run+both"):
            PerformanceTracker(acc)
        began = time.perf_counter()
        for batch in data:
            acc.run(batch, loss_fn)
        return (time.perf_counter() - began) / (len(data) * K)

    return go


def single(reps: int) -> dict[str, float]:
    names = ["loop", "run", "run+memory", "run+perf", "run+both"]
    data = _data()
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        _variant(n)(data)  # warm-up
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for n in order:
            times[n].append(_variant(n)(data))
    return {n: statistics.median(v) * 1e6 for n, v in times.items()}


def _ddp_rank(rank: int, world: int, out: str, reps: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradaccum_ddp import DDPAccumulator

    data = _data()
    results: dict[str, list[float]] = {"iterate": [], "run": []}
    for rep in range(reps + 1):
        for name in ("iterate", "run") if rep % 2 == 0 else ("run", "iterate"):
            model = _model()
            ddp = DistributedDataParallel(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)

            def loss_fn(
                part: tuple[torch.Tensor, torch.Tensor], ddp: torch.nn.Module = ddp
            ) -> torch.Tensor:
                out: torch.Tensor = ((ddp(part[0]) - part[1]) ** 2).sum()
                return out

            if name == "iterate":
                acc = DDPAccumulator(ddp, opt, K, normalization="items")
                micro = [
                    (x[s : s + ROWS], y[s : s + ROWS])
                    for x, y in data
                    for s in range(0, K * ROWS, ROWS)
                ]
                dist.barrier()
                began = time.perf_counter()
                for part in acc.iterate(micro):
                    with acc.microbatch(ROWS):
                        acc.backward(loss_fn(part))
            else:
                acc = DDPAccumulator(
                    ddp,
                    opt,
                    schedule=AdaptiveMicrobatch(target=K * ROWS, micro_batch=ROWS),
                    normalization="items",
                )
                dist.barrier()
                began = time.perf_counter()
                for batch in data:
                    acc.run(batch, loss_fn)
            seconds = (time.perf_counter() - began) / (len(data) * K)
            if rep:
                results[name].append(seconds)
    if rank == 0:
        Path(out).write_text(
            json.dumps({n: statistics.median(v) * 1e6 for n, v in results.items()})
        )


def ddp(reps: int) -> dict[str, float]:
    from gradaccum_ddp.testing import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "ddp.json"))
        result = launch(_ddp_rank, 2, out, reps, timeout=900, pg_timeout=120)
        if not result.ok:
            raise SystemExit(f"DDP ranks failed: {result}")
        return dict(json.loads(Path(out).read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--ddp", action="store_true", help="also time 2 gloo ranks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    med = single(args.reps)
    base = med["loop"]
    print(f"per microbatch, median of {args.reps} interleaved repetitions (µs), 1 process:")
    for n, v in med.items():
        print(f"  {n:<11} {v:8.1f}   {v - base:+7.1f} vs loop")
    if args.ddp:
        d = ddp(max(3, args.reps // 3))
        print("per microbatch on 2 gloo ranks (µs, rank 0):")
        for n, v in d.items():
            print(f"  {n:<11} {v:8.1f}   {v - d['iterate']:+7.1f} vs iterate")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
