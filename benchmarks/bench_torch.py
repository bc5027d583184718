"""gradaccum-torch against a hand-written accumulation loop, paired in one process.

Three measurements (``python benchmarks/bench_torch.py [--quick]``):

1. *Overhead per microbatch* on a tiny model (``Linear(16, 16)``, SGD), where the framework
   work is next to nothing and whatever the accumulator adds shows: the median over paired
   repetitions of ``(t_accumulator - t_hand) / microbatches``, in microseconds.
2. *Wall-time ratio* on a small transformer (2-layer ``nn.TransformerEncoder``, d_model 128,
   sequence 64, batch 8, AdamW) at 1 and 8 accumulation steps: the median over paired
   repetitions of ``t_accumulator / t_hand``, with its interquartile range and a bootstrap
   95% interval of the median. Target: at most 1.01.
3. *Memory*: the tensors the accumulator holds (its object graph, walked) mid-window and
   after a boundary, in the default mode and with ``accumulation_dtype="float32"``; the
   peak resident memory of a fresh process training a wider MLP with each loop; and, when
   CUDA exists, ``torch.cuda.max_memory_allocated`` for each loop.

"Paired" means each repetition times both loops back to back, in alternating order
(ABBA...), on identical models and data, so slow phases of a busy machine hit both.
Timings use one thread (``torch.set_num_threads(1)``), warm-up repetitions and
``time.perf_counter_ns``. Writes ``benchmarks/results/torch.json`` (or ``--out``) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradaccum_torch
from gradaccum_torch import Accumulator

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.01  # largest acceptable wall-time ratio gradaccum / hand loop

Loop = Callable[[], None]


# -- the two loops under test -------------------------------------------------------------


def hand_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Loop:
    """The loop people write by hand: ``(loss / k).backward()``, step every k."""

    def run() -> None:
        for i, (x, y) in enumerate(batches, start=1):
            loss = loss_fn(model(x), y)
            (loss / k).backward()  # type: ignore[no-untyped-call]
            if i % k == 0 or i == len(batches):
                opt.step()
                opt.zero_grad(set_to_none=True)

    return run


def acc_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    **options: Any,
) -> Loop:
    """The same loop through the accumulator, written as its docs say."""
    acc = Accumulator(model, opt, steps=k, **options)

    def run() -> None:
        for x, y in acc.iterate(batches):
            with acc.microbatch():
                acc.backward(loss_fn(model(x), y))

    return run


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


# -- timing ---------------------------------------------------------------------------------


class Times:
    """Wall and CPU times (ns) of each loop, repetition by repetition."""

    def __init__(self, names: list[str]) -> None:
        self.wall: dict[str, list[int]] = {name: [] for name in names}
        self.cpu: dict[str, list[int]] = {name: [] for name in names}

    def ratios(self, num: str, den: str, clock: str = "wall") -> list[float]:
        """``num / den`` per repetition."""
        times = self.wall if clock == "wall" else self.cpu
        return [n / d for n, d in zip(times[num], times[den], strict=True)]

    def diffs(self, num: str, den: str, per: int, clock: str = "wall") -> list[float]:
        """``num - den`` per repetition, in microseconds per ``per`` units."""
        times = self.wall if clock == "wall" else self.cpu
        return [(n - d) / per / 1e3 for n, d in zip(times[num], times[den], strict=True)]


def paired(loops: dict[str, Loop], reps: int, warmup: int) -> Times:
    """Time every loop back to back ``reps`` times, the order cycling through all
    permutations (so no loop always runs first or after the same one). Wall time is
    ``perf_counter_ns``; CPU time (``process_time_ns``) is kept too, as it is blind to
    other processes taking the cores."""
    names = list(loops)
    orders = list(itertools.permutations(names))
    for _ in range(warmup):
        for loop in loops.values():
            loop()
    times = Times(names)
    for rep in range(reps):
        for name in orders[rep % len(orders)]:
            wall, cpu = time.perf_counter_ns(), time.process_time_ns()
            loops[name]()
            times.cpu[name].append(time.process_time_ns() - cpu)
            times.wall[name].append(time.perf_counter_ns() - wall)
    return times


def summary(values: list[float], rounds: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Median, interquartile range and a 95% percentile-bootstrap interval of the median."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return {
        "median": median,
        "iqr": [q1, q3],
        "ci95": [medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]],
    }


def _copies(
    n: int, make: Callable[[], nn.Module], opt_factory: Callable[[Any], torch.optim.Optimizer]
) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    """``n`` identical models, each with its own optimizer."""
    model = make()
    models = [model] + [copy.deepcopy(model) for _ in range(n - 1)]
    return [(m, opt_factory(m.parameters())) for m in models]


def _three_loops(
    copies: list[tuple[nn.Module, torch.optim.Optimizer]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    k: int,
) -> dict[str, Loop]:
    """The hand loop, the accumulator, and a second hand loop: the control (A/A)."""
    (m1, o1), (m2, o2), (m3, o3) = copies
    return {
        "hand": hand_loop(m1, o1, batches, k, _mse),
        "acc": acc_loop(m2, o2, batches, k, _mse),
        "control": hand_loop(m3, o3, batches, k, _mse),
    }


def bench_overhead(reps: int, microbatches: int) -> dict[str, Any]:
    """Added time per microbatch on a tiny model, at 1 and 8 accumulation steps."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 16), torch.randn(4, 16)) for _ in range(microbatches)]
    out: dict[str, Any] = {}
    for k in (1, 8):
        copies = _copies(3, lambda: nn.Linear(16, 16), lambda p: torch.optim.SGD(p, lr=1e-3))
        times = paired(_three_loops(copies, batches, k), reps, warmup=3)
        out[f"k{k}"] = {
            "steps": k,
            "hand_us_per_microbatch": statistics.median(times.wall["hand"]) / microbatches / 1e3,
            "acc_us_per_microbatch": statistics.median(times.wall["acc"]) / microbatches / 1e3,
            "added_us_per_microbatch": summary(times.diffs("acc", "hand", microbatches)),
            "added_cpu_us_per_microbatch": summary(times.diffs("acc", "hand", microbatches, "cpu")),
            "control_us_per_microbatch": summary(times.diffs("control", "hand", microbatches)),
            "reps": reps,
            "microbatches_per_rep": microbatches,
        }
    return out


class SmallTransformer(nn.Module):
    """2-layer encoder, d_model 128, 4 heads, feed-forward 512, with a linear head."""

    def __init__(self, d_model: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(x))
        return out


def bench_transformer(reps: int, microbatches: int) -> dict[str, Any]:
    """Wall-time ratio accumulator / hand loop on the small transformer."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 64, 128), torch.randn(8, 64, 128)) for _ in range(microbatches)]
    out: dict[str, Any] = {}
    for k in (1, 8):
        copies = _copies(3, SmallTransformer, lambda p: torch.optim.AdamW(p, lr=1e-4))
        times = paired(_three_loops(copies, batches, k), reps, warmup=2)
        ratio = summary(times.ratios("acc", "hand"))
        out[f"k{k}"] = {
            "steps": k,
            "hand_ms_per_microbatch": statistics.median(times.wall["hand"]) / microbatches / 1e6,
            "acc_ms_per_microbatch": statistics.median(times.wall["acc"]) / microbatches / 1e6,
            "ratio": ratio,
            "cpu_ratio": summary(times.ratios("acc", "hand", "cpu")),
            "control_ratio": summary(times.ratios("control", "hand")),
            # contention only ever slows a run down: the fastest repetitions are the least
            # disturbed, and their ratio is a second, independent estimate
            "fastest_ratio": min(times.wall["acc"]) / min(times.wall["hand"]),
            "control_fastest_ratio": min(times.wall["control"]) / min(times.wall["hand"]),
            "added_us_per_microbatch": summary(times.diffs("acc", "hand", microbatches)),
            "target": TARGET,
            "target_met": ratio["median"] <= TARGET,
            "reps": reps,
            "microbatches_per_rep": microbatches,
            "parameters": sum(p.numel() for p in copies[0][0].parameters()),
        }
    return out


# -- memory ---------------------------------------------------------------------------------


# atoms, and objects the accumulator was given or never owns: not walked
_LEAVES = (
    str,
    bytes,
    int,
    float,
    bool,
    type,
    torch.dtype,
    torch.device,
    nn.Module,
    torch.optim.Optimizer,
)


def held_tensors(acc: Accumulator) -> list[torch.Tensor]:
    """Every tensor reachable from ``acc`` except through the model, optimizer, scheduler
    and scaler it was given, and except the model's parameters themselves."""
    given = {id(acc.model), id(acc.optimizer), id(acc.scheduler), id(acc.scaler)}
    params = {id(p) for p in acc.model.parameters()}
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    todo: list[Any] = [vars(acc)]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen or id(obj) in given:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in params:
                found.append(obj)
        elif isinstance(obj, _LEAVES):
            continue
        elif isinstance(obj, dict):
            todo += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += list(obj)
        else:
            todo += list(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                todo += [getattr(obj, n) for n in getattr(cls, "__slots__", ()) if hasattr(obj, n)]
    return found


def _nbytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def held_bytes(**options: Any) -> dict[str, int]:
    """Bytes of tensors the accumulator holds mid-window and after a boundary, next to the
    bytes of the parameters, their gradients and the optimizer state."""
    torch.manual_seed(0)
    model = SmallTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    acc = Accumulator(model, opt, steps=4, **options)
    x, y = torch.randn(2, 16, 128), torch.randn(2, 16, 128)
    result: dict[str, int] = {"parameters": _nbytes(list(model.parameters()))}
    for i in range(4):
        with acc.microbatch():
            acc.backward(_mse(model(x), y))
        if i == 1:
            result["held_mid_window"] = _nbytes(held_tensors(acc))
            result["grads_mid_window"] = _nbytes(
                [p.grad for p in model.parameters() if p.grad is not None]
            )
    result["held_after_boundary"] = _nbytes(held_tensors(acc))
    result["optimizer_state"] = _nbytes(
        [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    )
    return result


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process in bytes, from /proc (Linux)."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def probe_peak(variant: str, width: int, dtype: torch.dtype) -> dict[str, int]:
    """Train an MLP (two ``Linear(width, width)``) for two windows of 4 with one loop
    and return memory figures relative to the moment before training (model, optimizer
    and data built): ``held`` is the largest resident-memory growth seen at a forward
    (mid-window, what the loop keeps between microbatches); ``peak`` the growth of the
    peak resident memory (transients inside backward included; the kernel's peak counter
    is reset just before training). With CUDA, the same from the caching allocator."""
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    model = model.to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    batches = [
        (
            torch.randn(8, width, device=device, dtype=dtype),
            torch.randn(8, width, device=device, dtype=dtype),
        )
        for _ in range(8)
    ]
    samples: list[int] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cuda:
            samples.append(torch.cuda.memory_allocated())
        else:
            samples.append(_proc_status()["VmRSS"])
        return _mse(out, y)

    if variant == "hand":
        loop = hand_loop(model, opt, batches, 4, loss_fn)
    elif variant == "acc":
        loop = acc_loop(model, opt, batches, 4, loss_fn)
    else:
        loop = acc_loop(model, opt, batches, 4, loss_fn, accumulation_dtype="float32")
    result = {"parameters": _nbytes(list(model.parameters()))}
    loop()  # warm-up: one-time allocations (kernels' workspaces, autograd) are not the loop's
    samples.clear()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loop()
        torch.cuda.synchronize()
        result["held"] = max(samples) - base
        result["peak"] = torch.cuda.max_memory_allocated() - base
        return result
    base = _proc_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current resident size
    loop()
    result["held"] = max(samples) - base
    result["peak"] = _proc_status()["VmHWM"] - base
    return result


PROBES = {
    "float32": ("hand", "acc"),
    "bfloat16": ("hand", "acc", "acc_float32"),
}


def bench_peak(width: int) -> dict[str, Any]:
    """:func:`probe_peak` for each loop and dtype, each in a fresh process, so that every
    peak belongs to one loop alone."""
    if not torch.cuda.is_available() and not Path("/proc/self/clear_refs").exists():
        return {"skipped": "needs CUDA or Linux /proc to measure a peak"}
    out: dict[str, Any] = {}
    for dtype, variants in PROBES.items():
        for variant in variants:
            command = [sys.executable, __file__, "--probe", variant, "--width", str(width)]
            proc = subprocess.run(
                [*command, "--dtype", dtype],
                check=True,
                capture_output=True,
                text=True,
                # glibc: serve every block of 64 KiB or more by mmap and give it back when
                # freed, so that resident memory follows the live tensors
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
            )
            out.setdefault(dtype, {})[variant] = json.loads(proc.stdout)
    return out


# -- report ---------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _k(row: Callable[[dict[str, Any]], str], part: dict[str, Any]) -> str:
    return " | ".join(row(part[k]) for k in ("k1", "k8"))


def _spread(s: dict[str, Any], fmt: str) -> str:
    lo, hi = s["iqr"]
    return f"{s['median']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def table(results: dict[str, Any]) -> str:
    """The Markdown summary."""
    over, tf, held, peak = (
        results["overhead"],
        results["transformer"],
        results["held"],
        results["peak"],
    )
    lines = [
        f"`{results['command']}`: gradaccum-torch {results['gradaccum_torch']}, "
        f"torch {results['torch']}, Python {results['python']}, {results['machine']}, "
        f"1 torch thread",
        "",
        "| measurement | k=1 | k=8 |",
        "| --- | ---: | ---: |",
        "| tiny model (Linear 16→16, SGD): hand loop, µs per microbatch | "
        + _k(lambda r: f"{r['hand_us_per_microbatch']:.1f}", over)
        + " |",
        "| tiny model: added by gradaccum, µs per microbatch, wall (median [IQR]) | "
        + _k(lambda r: _spread(r["added_us_per_microbatch"], "+.1f"), over)
        + " |",
        "| tiny model: added by gradaccum, µs per microbatch, CPU time | "
        + _k(lambda r: _spread(r["added_cpu_us_per_microbatch"], "+.1f"), over)
        + " |",
        "| tiny model: control (hand loop vs its twin), µs per microbatch | "
        + _k(lambda r: _spread(r["control_us_per_microbatch"], "+.1f"), over)
        + " |",
        "| small transformer: hand loop, ms per microbatch | "
        + _k(lambda r: f"{r['hand_ms_per_microbatch']:.2f}", tf)
        + " |",
        f"| **small transformer: wall-time ratio gradaccum / hand** (target ≤ {TARGET}) | "
        + _k(lambda r: f"**{r['ratio']['median']:.4f}**", tf)
        + " |",
        "| … its IQR over paired repetitions | "
        + _k(lambda r: "[{:.4f}, {:.4f}]".format(*r["ratio"]["iqr"]), tf)
        + " |",
        "| … bootstrap 95% interval of the median | "
        + _k(lambda r: "[{:.4f}, {:.4f}]".format(*r["ratio"]["ci95"]), tf)
        + " |",
        "| small transformer: CPU-time ratio (median [IQR]) | "
        + _k(lambda r: _spread(r["cpu_ratio"], ".4f"), tf)
        + " |",
        "| small transformer: control ratio, hand loop / its twin (median [IQR]) | "
        + _k(lambda r: _spread(r["control_ratio"], ".4f"), tf)
        + " |",
        "| small transformer: ratio of the fastest repetitions, gradaccum / hand (control) | "
        + _k(lambda r: f"{r['fastest_ratio']:.4f} ({r['control_fastest_ratio']:.4f})", tf)
        + " |",
        "",
        f"Tensors held by the accumulator itself (its object graph walked; small transformer, "
        f"{held['default']['parameters']} bytes of parameters, AdamW):",
        "",
        "| mode | bytes held mid-window | bytes held after the boundary |",
        "| --- | ---: | ---: |",
    ]
    for mode in ("default", "float32"):
        lines.append(
            f"| {'accumulation_dtype=' + repr(mode) if mode == 'float32' else mode} | "
            f"{held[mode]['held_mid_window']} | {held[mode]['held_after_boundary']} |"
        )
    if "skipped" in peak:
        lines += ["", f"Peak memory: skipped ({peak['skipped']})."]
        return "\n".join(lines)
    where = "CUDA allocated" if results["cuda"] else "resident memory"
    lines += [
        "",
        f"Memory growth during training ({where}, relative to before training, after a "
        f"warm-up run), MLP of two Linear({results['peak_width']}, {results['peak_width']}), "
        "SGD, 2 windows of 4, a fresh process per loop:",
        "",
        "| parameters | loop | size of the parameters | held between microbatches | peak |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    names = {
        "hand": "hand-written",
        "acc": "gradaccum (default)",
        "acc_float32": "gradaccum, accumulation_dtype='float32'",
    }
    for dtype, variants in peak.items():
        for variant, p in variants.items():
            lines.append(
                f"| {dtype} | {names[variant]} | {_mib(p['parameters'])} | {_mib(p['held'])} | "
                f"{_mib(p['peak'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "torch.json")
    parser.add_argument("--probe", choices=["hand", "acc", "acc_float32"], help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.probe:
        print(json.dumps(probe_peak(args.probe, args.width, getattr(torch, args.dtype))))
        return 0
    start = time.perf_counter()
    reps = 6 if args.quick else 40
    results: dict[str, Any] = {
        "gradaccum_torch": gradaccum_torch.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU, {_cpus()} cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "cuda": torch.cuda.is_available(),
        "command": "python benchmarks/bench_torch.py" + (" --quick" if args.quick else ""),
    }
    print("overhead on a tiny model ...", file=sys.stderr, flush=True)
    results["overhead"] = bench_overhead(reps=reps, microbatches=400)
    print("small transformer ...", file=sys.stderr, flush=True)
    results["transformer"] = bench_transformer(reps=reps, microbatches=8)
    print("memory ...", file=sys.stderr, flush=True)
    results["held"] = {
        "default": held_bytes(),
        "float32": held_bytes(accumulation_dtype="float32"),
    }
    results["peak_width"] = 1024 if args.quick else 4096
    results["peak"] = bench_peak(width=results["peak_width"])
    results["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
