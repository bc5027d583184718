"""The core's own cost per microbatch: `AccumulationMachine.begin` + `end`, and the window's
`commit` amortised over its microbatches, with no tensor in sight.

``python benchmarks/bench_core.py [--quick] [--out PATH]``: for k = 1 and k = 8 (fixed windows,
``mean``), and for k = 8 with a listener that overrides every event, times ``rounds`` runs of
``n`` microbatches each with ``time.perf_counter_ns`` and reports the median and the
interquartile range in microseconds per microbatch. Writes ``benchmarks/results/core.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from gradaccum import AccumulationCallback, AccumulationConfig, AccumulationMachine
from gradaccum.stats import AccumulationStats

RESULTS = Path(__file__).resolve().parent / "results"


class _Counting(AccumulationCallback):
    def __init__(self) -> None:
        self.events = 0

    def on_microbatch(self, stats: AccumulationStats) -> None:
        self.events += 1

    def on_step(self, stats: AccumulationStats) -> None:
        self.events += 1


class _StepsOnly(AccumulationCallback):
    """A logger that only wants steps: must cost nothing per microbatch."""

    def on_step(self, stats: AccumulationStats) -> None:
        return


def _run(k: int, n: int, listener: AccumulationCallback | None) -> float:
    machine = AccumulationMachine(
        AccumulationConfig(k), listeners=() if listener is None else [listener]
    )
    begin, end, commit = machine.begin, machine.end, machine.commit
    start = time.perf_counter_ns()
    for _ in range(n):
        begin()
        if end() is not None:
            commit()
    return (time.perf_counter_ns() - start) / n / 1000.0


def measure(k: int, listener: str, n: int, rounds: int) -> dict[str, Any]:
    """Median and quartiles of µs per microbatch over ``rounds`` runs."""
    make = {"none": lambda: None, "steps_only": _StepsOnly, "every_event": _Counting}[listener]
    _run(k, n, make())  # warm-up
    samples = sorted(_run(k, n, make()) for _ in range(rounds))
    q = statistics.quantiles(samples, n=4)
    return {
        "k": k,
        "listener": listener,
        "microbatches": n,
        "rounds": rounds,
        "median_us": statistics.median(samples),
        "q1_us": q[0],
        "q3_us": q[2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "core.json")
    args = parser.parse_args(argv)
    n, rounds = (20_000, 5) if args.quick else (100_000, 15)
    rows = [
        measure(1, "none", n, rounds),
        measure(8, "none", n, rounds),
        measure(8, "steps_only", n, rounds),
        measure(8, "every_event", n, rounds),
    ]
    result = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| k | listener | µs per microbatch (median) | IQR |")
    print("| ---: | --- | ---: | --- |")
    for row in rows:
        print(
            f"| {row['k']} | {row['listener']} | {row['median_us']:.2f} | "
            f"{row['q1_us']:.2f}–{row['q3_us']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
