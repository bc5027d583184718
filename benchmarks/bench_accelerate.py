"""gradaccum-accelerate against Accelerate's own ``accelerator.accumulate()`` idiom, paired.

``python benchmarks/bench_accelerate.py [--quick] [--more N] [--out PATH]`` times, per
optimizer step, the same training pass written two ways on one ``Accelerator`` (on the CPU)
and identical models (``--more N`` runs N times the repetitions, for tighter intervals):

- ``gradaccum``: ``gradaccum_accelerate.Accumulator(accelerator, model, optimizer, steps=k)``
  after ``accelerator.prepare``, and ``for b in acc.iterate(batches): with acc.microbatch():
  acc.backward(loss)``;
- ``accelerate``: Accelerate's documented idiom with ``gradient_accumulation_steps=k``: per
  microbatch ``with accelerator.accumulate(model):`` forward, ``accelerator.backward(loss)``,
  ``optimizer.step()``, ``optimizer.zero_grad()`` (the prepared optimizer skips both until the
  window ends; ``backward`` divides the loss by k). The batches go through the minimal iterable
  of ``bench_peers.py`` (``marked_end``) that tells Accelerate's gradient state where the data
  ends, as a prepared DataLoader would, and does nothing else;
- ``control``: a second, identical copy of the ``accelerate`` loop. Its ratio to
  ``accelerate`` is pure noise: read the ``gradaccum`` ratio against it.

on the tiny model of ``bench_torch.py`` (``Linear(16, 16)``, SGD, batches of 4), where each
loop's own overhead shows, and on its small transformer (``SmallTransformer``, AdamW, batches of
8 x 64 x 128), at k=1 and k=8 (passes a multiple of 8 microbatches: no short window), on one
process and on two (``MULTI_CPU``: two spawned processes in the environment that
``ACCELERATE_USE_CPU=1 torchrun --nproc-per-node=2`` gives, gloo over loopback; every rank
trains on its own batches, and rank 0 measures).

Accelerate keeps its accumulation steps in a process-wide singleton (``GradientState``) that
``accelerator.backward`` reads on every call, so one ``Accelerator`` serves both loops: it is
built with ``gradient_accumulation_steps=1`` (the adapter refuses any other), and before each
timed pass (untimed) ``accelerator.gradient_accumulation_steps`` is set to what the loop
expects: k for Accelerate's idiom, 1 for the adapter.

Method (as ``bench_torch.py`` and ``bench_peers.py``, whose models, ``summary``, ``Times``,
``williams`` and ``marked_end`` this script imports): one torch thread per process; a warm-up
pass of every loop from identical models, after which the parameters are compared (the
adapter's must equal Accelerate's to rounding: there is no short window, where they would
differ on purpose); then each repetition times every loop once, back to back, in an order from
a Williams design (every loop in every position, and after every other loop, equally often),
after a barrier on two processes. Reported: per-optimizer-step wall time of each loop (median),
and the median of the per-repetition ratios ``gradaccum / accelerate`` (target: at most 1) and
``control / accelerate``, each with its interquartile range and a bootstrap 95% interval.

Writes ``benchmarks/results/accelerate.json`` (or ``--out``) and prints a Markdown table. Needs
``accelerate`` (``nox -s bench`` installs it); without it exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_peers import marked_end, williams
from bench_torch import RESULTS, SmallTransformer, Times, summary
from torch import nn

from gradaccum_ddp.testing import free_port, launch

Batch = tuple[torch.Tensor, torch.Tensor]
Loop = Callable[[], None]

TARGET = 1.0  # gradaccum / accelerate per optimizer step, at most
TOLERANCE = 1e-5  # largest parameter difference after the warm-up pass that counts as equal
LOOPS = ("gradaccum", "accelerate", "control")
LABELS = {
    "gradaccum": "gradaccum-accelerate `Accumulator`",
    "accelerate": "Accelerate `accumulate()` (baseline)",
    "control": "Accelerate `accumulate()`, second copy (control)",
}
MODELS = ("tiny", "transformer")
STEPS = (1, 8)
LAUNCHER = (
    "ACCELERATE_USE_CPU",
    "ACCELERATE_MIXED_PRECISION",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)
DISTRIBUTIONS = ("torch", "accelerate", "gradaccum", "gradaccum-torch", "gradaccum-accelerate")

# model -> (quick, full) sizes: (repetitions, warm-up passes, microbatches per pass).
# Repetitions are whole Williams blocks (6 orders of 3 loops) in a full run; microbatches a
# multiple of 8. A full run takes about a minute on two cores.
SIZES = {
    "tiny": ((6, 1, 80), (12, 2, 200)),
    "transformer": ((3, 1, 16), (6, 1, 16)),
}


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(16, 16) if name == "tiny" else SmallTransformer()


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "tiny":
        return torch.optim.SGD(model.parameters(), lr=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def make_batches(name: str, count: int, rank: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(rank)
    shape = (4, 16) if name == "tiny" else (8, 64, 128)
    return [
        (torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen))
        for _ in range(count)
    ]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def fresh_accelerator() -> Any:
    """An ``Accelerator(cpu=True)`` on fresh process-wide singletons (Accelerate keeps its
    state in them: an Accelerator built after another inherits its settings)."""
    from accelerate import Accelerator  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from accelerate.state import AcceleratorState, GradientState  # type: ignore[import-untyped,import-not-found,unused-ignore]

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True)


def gradaccum_loop(
    accelerator: Any, model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], k: int
) -> Loop:
    """The adapter's loop, as its docs write it."""
    from gradaccum_accelerate import Accumulator

    pmodel, popt = accelerator.prepare(model, opt)
    acc = Accumulator(accelerator, pmodel, popt, steps=k)

    def run() -> None:
        for x, y in acc.iterate(batches):
            with acc.microbatch():
                acc.backward(mse(pmodel(x), y))

    return run


def accelerate_loop(
    accelerator: Any, model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch]
) -> Loop:
    """Accelerate's idiom: every microbatch under ``accumulate``, step and zero_grad every
    time (the prepared optimizer skips them mid-window)."""
    pmodel, popt = accelerator.prepare(model, opt)
    feed = marked_end(batches)

    def run() -> None:
        for x, y in feed:
            with accelerator.accumulate(pmodel):
                loss = mse(pmodel(x), y)
                accelerator.backward(loss)
                popt.step()
                popt.zero_grad()

    return run


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


def agree(models: dict[str, nn.Module]) -> dict[str, float]:
    """Largest absolute parameter difference of each loop's model from Accelerate's."""
    reference = list(_unwrap(models["accelerate"]).parameters())
    return {
        loop: max(
            (p - q).abs().max().item()
            for p, q in zip(_unwrap(models[loop]).parameters(), reference, strict=True)
        )
        for loop in ("gradaccum", "control")
    }


def measure(
    name: str, k: int, reps: int, warmup: int, microbatches: int, rank: int, world_size: int
) -> dict[str, Any]:
    """Warm-up passes (the first is checked for agreement), then ``reps`` paired repetitions:
    raw times in ns."""
    agreement: dict[str, float] = {}
    accelerator = fresh_accelerator()
    assert accelerator.num_processes == world_size, accelerator.state
    batches = make_batches(name, microbatches, rank)
    base = make_model(name)
    models = {loop: copy.deepcopy(base) for loop in LOOPS}
    opts = {loop: make_optimizer(name, models[loop]) for loop in LOOPS}
    loops = {
        "gradaccum": gradaccum_loop(
            accelerator, models["gradaccum"], opts["gradaccum"], batches, k
        ),
        "accelerate": accelerate_loop(
            accelerator, models["accelerate"], opts["accelerate"], batches
        ),
        "control": accelerate_loop(accelerator, models["control"], opts["control"], batches),
    }
    steps = {"gradaccum": 1, "accelerate": k, "control": k}  # gradient_accumulation_steps

    def ready(loop: str) -> None:
        accelerator.gradient_accumulation_steps = steps[loop]  # untimed: see the docstring
        if world_size > 1:
            dist.barrier()

    for _ in range(warmup):  # the first pass starts from identical models
        for loop in LOOPS:
            ready(loop)
            loops[loop]()
        if not agreement:
            agreement.update(agree(models))
    times = Times(list(LOOPS))
    orders = williams(len(LOOPS))
    for rep in range(reps):
        for i in orders[rep % len(orders)]:
            loop = LOOPS[i]
            ready(loop)
            wall, cpu = time.perf_counter_ns(), time.process_time_ns()
            loops[loop]()
            times.cpu[loop].append(time.process_time_ns() - cpu)
            times.wall[loop].append(time.perf_counter_ns() - wall)
    accelerator.gradient_accumulation_steps = 1
    return {
        "wall_ns": times.wall,
        "cpu_ns": times.cpu,
        "agreement": agreement,
        "parameters": sum(p.numel() for p in base.parameters()),
        "distributed_type": str(accelerator.distributed_type),
    }


def measure_all(quick: bool, more: int, rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in MODELS:
        reps, warmup, microbatches = SIZES[name][0 if quick else 1]
        reps *= more
        for k in STEPS:
            out[f"{name}/k{k}"] = {
                "model": name,
                "steps": k,
                "reps": reps,
                "warmup": warmup,
                "microbatches_per_rep": microbatches,
                **measure(name, k, reps, warmup, microbatches, rank, world_size),
            }
    return out


# -- processes --------------------------------------------------------------------------------


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """This process as a single-process Accelerate run: no launcher variables."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def bench_rank(rank: int, world_size: int, port: int, quick: bool, more: int, out: str) -> None:
    """One of ``world_size`` spawned processes, in the environment that ``ACCELERATE_USE_CPU=1
    torchrun`` gives. `launch` has already joined the default gloo group, which Accelerate
    adopts; it reads its ranks from the variables (the port is never dialled)."""
    os.environ.update(
        ACCELERATE_USE_CPU="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",  # or Accelerate resets torch's threads to the cores per process
    )
    measured = measure_all(quick, more, rank, world_size)
    if rank == 0:
        Path(out).write_text(json.dumps(measured))


def collect(quick: bool, more: int) -> dict[str, Any]:
    """Raw times for 1 process (here) and 2 processes (spawned)."""
    results: dict[str, Any] = {}
    print("1 process ...", file=sys.stderr, flush=True)
    with one_process():
        results["1"] = measure_all(quick, more, 0, 1)
    print("2 processes ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        run = launch(
            bench_rank,
            2,
            free_port(),
            quick,
            more,
            str(raw),
            timeout=900 * more,
            pg_timeout=300,
            threads=1,
        )
        if not run.ok:
            raise RuntimeError(f"benchmark processes failed: {run}")
        results["2"] = json.loads(raw.read_text())
    return results


# -- summary ----------------------------------------------------------------------------------


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per-optimizer-step times and paired ratios of one configuration."""
    steps_per_rep = raw["microbatches_per_rep"] // raw["steps"]
    wall: dict[str, list[float]] = raw["wall_ns"]
    cpu: dict[str, list[float]] = raw["cpu_ns"]

    def ratios(times: dict[str, list[float]], num: str) -> list[float]:
        return [n / d for n, d in zip(times[num], times["accelerate"], strict=True)]

    ratio = summary(ratios(wall, "gradaccum"))
    return {
        "model": raw["model"],
        "steps": raw["steps"],
        "parameters": raw["parameters"],
        "distributed_type": raw["distributed_type"],
        "reps": raw["reps"],
        "warmup": raw["warmup"],
        "microbatches_per_rep": raw["microbatches_per_rep"],
        "optimizer_steps_per_rep": steps_per_rep,
        "ms_per_optimizer_step": {
            loop: statistics.median(wall[loop]) / steps_per_rep / 1e6 for loop in LOOPS
        },
        "ratio": ratio,
        "cpu_ratio": summary(ratios(cpu, "gradaccum")),
        "control_ratio": summary(ratios(wall, "control")),
        # contention only slows a run down: the fastest repetitions are the least disturbed
        "fastest_ratio": min(wall["gradaccum"]) / min(wall["accelerate"]),
        "target": TARGET,
        "target_met": ratio["median"] <= TARGET,
        "max_abs_param_diff_after_one_pass": raw["agreement"]["gradaccum"],
        "control_max_abs_param_diff_after_one_pass": raw["agreement"]["control"],
        "agree": raw["agreement"]["gradaccum"] <= TOLERANCE,
        "wall_ns_raw": wall,
    }


def _interval(pair: list[float]) -> str:
    return f"{pair[0]:.3f} – {pair[1]:.3f}"


def table(results: dict[str, Any]) -> str:
    lines = [
        f"gradaccum-accelerate vs Accelerate's accumulate(), {results['environment']['cpu']}, "
        f"one torch thread per process. Per optimizer step: median wall time (ms) of each loop; "
        f"the median of the per-repetition ratios gradaccum / Accelerate (target <= {TARGET}) "
        "with its IQR and a bootstrap 95% interval; the control's ratio (noise); the largest "
        "parameter difference from Accelerate's after one pass.",
        "",
        "| processes | model | k | gradaccum (ms) | Accelerate (ms) | ratio | IQR | 95% CI "
        "| control | met | param diff |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for world, configs in results["configs"].items():
        for r in configs.values():
            ms = r["ms_per_optimizer_step"]
            lines.append(
                f"| {world} | {r['model']} | {r['steps']} | {ms['gradaccum']:.3f} "
                f"| {ms['accelerate']:.3f} | {r['ratio']['median']:.3f} "
                f"| {_interval(r['ratio']['iqr'])} | {_interval(r['ratio']['ci95'])} "
                f"| {r['control_ratio']['median']:.3f} | {'yes' if r['target_met'] else 'NO'} "
                f"| {r['max_abs_param_diff_after_one_pass']:.1e} |"
            )
    disagree = [
        f"{world} process(es) {key}"
        for world, configs in results["configs"].items()
        for key, r in configs.items()
        if not r["agree"]
    ]
    verdict = (
        f"**DISAGREE** (above {TOLERANCE:g}): {', '.join(disagree)}"
        if disagree
        else f"the adapter's parameters equal Accelerate's after one pass (within {TOLERANCE:g})"
    )
    lines += ["", f"Exactness sanity: {verdict}."]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next(
            (line.partition(":")[2].strip() for line in info if line.startswith("model name")),
            cpu,
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "accelerate.json")
    parser.add_argument(
        "--more",
        type=int,
        default=1,
        metavar="N",
        help="N times the repetitions of every configuration (tighter intervals, N times longer)",
    )
    args = parser.parse_args(argv)
    if args.more < 1:
        parser.error("--more must be at least 1")
    if importlib.util.find_spec("accelerate") is None:
        print(
            'bench_accelerate: cannot measure without accelerate: pip install "accelerate==1.15.0" '
            "(nox -s bench does)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # Accelerate would otherwise change torch's threads
    start = time.perf_counter()
    try:
        raw = collect(args.quick, args.more)
    except RuntimeError as error:
        print(f"bench_accelerate: {error}", file=sys.stderr)
        return 1
    results: dict[str, Any] = {
        "command": "python benchmarks/bench_accelerate.py"
        + (" --quick" if args.quick else "")
        + (f" --more {args.more}" if args.more > 1 else ""),
        "environment": environment(),
        "target": TARGET,
        "agreement_tolerance": TOLERANCE,
        "configs": {
            world: {key: summarize(r) for key, r in configs.items()}
            for world, configs in raw.items()
        },
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
