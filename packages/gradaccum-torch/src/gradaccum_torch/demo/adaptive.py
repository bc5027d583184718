"""Adaptive microbatching under a real memory cap: ``python -m gradaccum_torch.demo.adaptive``.

A child process caps its own address space with ``resource.setrlimit(RLIMIT_AS)``
(relative to its size after importing torch), holds a *ballast* allocation (other
memory in use, say an evaluation cache) for the first windows, and trains a wide
float64 MLP with `Accumulator.run` starting at a microbatch of the whole batch.
The first microbatch fails with the CPU allocator's real error, the size halves
until it fits, and once the ballast is released and ``grow_after`` windows ran
clean it grows back. The parent trains the same model with a fixed microbatch
of the final size (no cap) and compares: the two agree to rounding error.

Linux only (``RLIMIT_AS`` and ``/proc``). Exit status 0 when the deviation is
within ``--tolerance``; 1 otherwise (so it is also a check).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gradaccum import AdaptiveMicrobatch
from gradaccum_torch.accumulator import Accumulator
from gradaccum_torch.memory import MemoryMonitor
from gradaccum_torch.performance import PerformanceTracker

__all__ = ["WIDTH", "capped_child", "fixed_run", "main", "make_data", "make_model"]

WIDTH = 8192
"""Hidden width: each row's activations take ``4 × WIDTH × 8`` bytes in forward and backward."""
FEATURES = 32
MiB = 2**20


def make_model(seed: int = 0) -> nn.Module:
    """The wide MLP (float64), fixed by ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)).double()


def make_data(windows: int, rows: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``windows`` batches of ``rows`` rows."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, FEATURES, generator=gen, dtype=torch.float64),
            torch.randn(rows, 1, generator=gen, dtype=torch.float64),
        )
        for _ in range(windows)
    ]


def summed_loss(model: nn.Module, part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Squared error summed over the slice's rows (``items`` normalization)."""
    x, y = part
    out: torch.Tensor = ((model(x) - y) ** 2).sum()
    return out


def fixed_run(windows: int, rows: int, micro: int, lr: float = 0.002) -> dict[str, torch.Tensor]:
    """The reference: the same training with a fixed microbatch of ``micro`` rows."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = -(-rows // micro)
    acc = Accumulator(model, opt, steps, normalization="items")
    for x, y in make_data(windows, rows):
        for start in range(0, rows, micro):
            part = (x[start : start + micro], y[start : start + micro])
            with acc.microbatch(len(part[0])):
                acc.backward(summed_loss(model, part))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")  # pragma: no cover


def _fixed_mmap_threshold() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping,
    returned to the system when freed. By default the threshold grows to the
    size of the largest mapped block freed (up to 32 MiB), after which such
    blocks come from the heap, whose address space is not given back: how much
    of the cap a failed microbatch leaves behind then depends on the order of
    earlier allocations (unrelated code changes moved it by the whole headroom).
    A no-op where the C library has no ``mallopt``."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD; setting it fixes it
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def capped_child(
    *,
    windows: int,
    rows: int,
    headroom_mib: int,
    ballast_mib: int,
    ballast_windows: int,
    grow_after: int,
    out: Path,
    lr: float = 0.002,
) -> dict[str, Any]:
    """Run in a child process: cap the address space at the current size plus
    ``headroom_mib``, hold ``ballast_mib`` for ``ballast_windows`` windows, and
    train with `Accumulator.run` from a microbatch of ``rows``. Writes the
    final parameters to ``out`` (safetensors) and returns the record."""
    torch.set_num_threads(1)  # no thread pools growing under the cap
    _fixed_mmap_threshold()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    data = make_data(windows, rows)
    monitor = MemoryMonitor(model)
    acc = Accumulator(
        model,
        opt,
        schedule=AdaptiveMicrobatch(target=rows, micro_batch=rows, grow_after=grow_after),
        normalization="items",
        listeners=[monitor],
    )
    tracker = PerformanceTracker(acc)
    # Warm everything the loop touches once, at the full size, before the cap: the
    # kernels a large microbatch takes may load code or reserve address space on first
    # use (torch 2.3's build does), which must count in the base, not in the headroom.
    probe = make_model()
    summed_loss(probe, data[0]).backward()  # type: ignore[no-untyped-call]
    del probe
    base = _vm_size()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = base + headroom_mib * MiB
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    monitor.budget_bytes = _rss() + headroom_mib * MiB  # the cap, in resident terms
    ballast: torch.Tensor | None = torch.ones(ballast_mib * MiB // 8, dtype=torch.float64)
    sizes: list[int] = []
    times: list[float] = []
    bar = _progress(len(data))
    try:
        for window, batch in enumerate(data):
            if window == ballast_windows:
                ballast = None  # the other memory use ends
            sizes.append(acc.adaptive.micro_batch)
            began = time.perf_counter()
            result = acc.run(batch, lambda part: summed_loss(model, part))
            times.append(time.perf_counter() - began)
            assert result.stepped
            if bar is not None:
                bar.set_postfix_str(tracker.postfix(), refresh=False)
                bar.update(1)
            print(
                f"window {window}: started at micro_batch={sizes[-1]}, "
                f"now {acc.adaptive.micro_batch} "
                f"(clean windows {acc.adaptive.clean_windows}), "
                f"{'ballast held' if ballast is not None else 'ballast released'}",
                flush=True,
            )
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if bar is not None:
            bar.close()
    del ballast
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    events = [
        {
            "window": e.window,
            "position": e.position,
            "old_size": e.old_size,
            "new_size": e.new_size,
            "replayed": e.replayed,
            "seconds": e.seconds,
            "error": e.error,
        }
        for e in acc.adaptive.events
    ]
    return {
        "cap_mib": round(cap / MiB, 1),
        "base_mib": round(base / MiB, 1),
        "sizes": sizes,
        "final_size": acc.adaptive.micro_batch,
        "events": events,
        "window_seconds": times,
        "memory": monitor.summary(),
        "performance": tracker.metrics(),
        "optimizer_steps": acc.stats.optimizer_steps,
        "dropped_windows": acc.stats.dropped_windows,
    }


def _progress(total: int) -> Any:
    """A tqdm bar in optimizer steps (on stderr), or ``None`` without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step", desc="optimizer steps", file=sys.stderr, leave=False)


def run_capped(
    windows: int = 7,
    rows: int = 256,
    headroom_mib: int = 130,
    ballast_mib: int = 90,
    ballast_windows: int = 3,
    grow_after: int = 2,
    *,
    workdir: Path,
    echo: bool = True,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Start the capped child and return its record and final parameters."""
    out = workdir / "adaptive-final.safetensors"
    record = workdir / "adaptive-record.json"
    args = [
        sys.executable,
        "-m",
        "gradaccum_torch.demo.adaptive",
        "--child",
        "--windows", str(windows),
        "--rows", str(rows),
        "--headroom-mib", str(headroom_mib),
        "--ballast-mib", str(ballast_mib),
        "--ballast-windows", str(ballast_windows),
        "--grow-after", str(grow_after),
        "--params-out", str(out),
        "--record-out", str(record),
    ]  # fmt: skip
    # A fixed mmap threshold: every large tensor is its own mapping, returned when freed
    # (glibc otherwise raises the threshold and keeps freed blocks in its heap).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    # With echo, the child's stderr (its tqdm bar in optimizer steps) goes to ours.
    proc = subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=None if echo else subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )
    if echo:
        sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the capped child failed with status {proc.returncode}:\n{proc.stdout}\n"
            f"{proc.stderr or ''}"
        )
    return json.loads(record.read_text()), load_file(str(out))


def deviation(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ``|a - b|`` over every parameter (float64 parameters of magnitude < 1)."""
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the capped child, the fixed-size reference, and compare."""
    parser = argparse.ArgumentParser(
        prog="python -m gradaccum_torch.demo.adaptive",
        description="Adaptive microbatching recovering from real out-of-memory errors.",
    )
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--rows", type=int, default=256, help="rows per window (the batch)")
    parser.add_argument("--headroom-mib", type=int, default=130)
    parser.add_argument("--ballast-mib", type=int, default=90)
    parser.add_argument("--ballast-windows", type=int, default=3)
    parser.add_argument("--grow-after", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-12)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--params-out", help=argparse.SUPPRESS)
    parser.add_argument("--record-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        record = capped_child(
            windows=args.windows,
            rows=args.rows,
            headroom_mib=args.headroom_mib,
            ballast_mib=args.ballast_mib,
            ballast_windows=args.ballast_windows,
            grow_after=args.grow_after,
            out=Path(args.params_out),
        )
        Path(args.record_out).write_text(json.dumps(record))
        return 0
    if not Path("/proc/self/status").exists():
        print("this demo needs Linux (/proc and RLIMIT_AS)", file=sys.stderr)
        return 2
    print(
        f"adaptive microbatching under a real memory cap: {args.windows} windows of "
        f"{args.rows} rows, starting at micro_batch={args.rows}; address space capped at "
        f"+{args.headroom_mib} MiB, {args.ballast_mib} MiB of it held by other data for the "
        f"first {args.ballast_windows} windows"
    )
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        record, adaptive = run_capped(
            args.windows,
            args.rows,
            args.headroom_mib,
            args.ballast_mib,
            args.ballast_windows,
            args.grow_after,
            workdir=Path(tmp),
        )
    for e in record["events"]:
        print(
            f"  OOM in window {e['window']} after {e['position']} kept microbatch(es): "
            f"{e['old_size']} -> {e['new_size']} rows, {e['seconds'] * 1e3:.1f} ms lost"
            f"{' (window replayed)' if e['replayed'] else ''}: {e['error'][:140]}"
        )
    memory, perf = record["memory"], record["performance"]
    print("MemoryMonitor (child, CPU resident memory):")
    for point, values in memory["points"].items():
        print(
            f"  after {point:<8}  {values['current_mib']:7.1f} MiB "
            f"(peak {values['peak_mib']:7.1f} MiB)"
        )
    for line in memory["advice"]:
        print(f"  advice: {line}")
    print(
        "PerformanceTracker: "
        + ", ".join(f"{k.removeprefix('perf/')}={v:.3g}" for k, v in perf.items())
    )
    final = record["final_size"]
    reference = fixed_run(args.windows, args.rows, final)
    dev = deviation(adaptive, reference)
    print(
        f"final micro_batch={final}; parameters vs a fixed micro_batch={final} run: "
        f"max deviation {dev:.1e}"
    )
    if dev > args.tolerance:
        print(f"error: deviation {dev:.3e} > {args.tolerance:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
