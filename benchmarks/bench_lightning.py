"""gradaccum-lightning's ``GradAccum`` callback against the Trainer's own
``accumulate_grad_batches``, paired.

``python benchmarks/bench_lightning.py [--quick] [--more N] [--out PATH]`` times, per optimizer
step, the same training epoch run by ``lightning.Trainer.fit`` two ways, on identical models and
data (``--more N`` runs N times the repetitions, for tighter intervals):

- ``gradaccum``: ``Trainer(callbacks=[GradAccum(steps=k)])``, the LightningModule's
  ``training_step`` returning the mean loss (GradAccum switches the module to manual
  optimization and drives the window);
- ``lightning``: ``Trainer(accumulate_grad_batches=k)``, the same LightningModule class in
  Lightning's automatic optimization (the baseline);
- ``control``: a second, identical copy of the ``lightning`` run. Its ratio to ``lightning`` is
  pure noise: read the ``gradaccum`` ratio against it.

on the tiny model of ``bench_torch.py`` (``Linear(16, 16)``, SGD, batches of 4), where each
loop's own overhead shows, and on its small transformer (``SmallTransformer``, AdamW, batches of
8 x 64 x 128), at k=1 and k=8 (epochs a multiple of 8 microbatches: no short window), on one
process and on two (``Trainer(strategy="ddp", devices=2)`` in two spawned processes with
``torchrun``'s environment, gloo over loopback: Lightning launches nothing and uses the process
group already there; every rank trains on its own batches, and rank 0 measures).

What is timed. Every timed run is one ``fit`` of one epoch on a fresh ``Trainer``, built before
the repetition's timings start (its construction is never timed). The figure compared is the
*epoch*: from the first ``on_train_epoch_start`` to the last ``on_train_epoch_end`` callback
hook (two small callbacks around the others, GradAccum included), divided by the epoch's
optimizer steps: what each step costs however long the run. The rest of the ``fit`` (setting
up, wrapping the model in DDP, tearing down; once per run in real training) is reported apart,
per loop, as the *fixed cost per fit*. The batches are handed to ``fit`` as one plain sized
iterable (``Batches`` of ``bench_peers.py``), no DataLoader, and ``configure_optimizers``
returns the same optimizer every fit, so its state carries on from fit to fit.

Method (as ``bench_accelerate.py``, whose helpers this script shares with ``bench_torch.py``
and ``bench_peers.py``): one torch thread per process; warm-up fits of every loop from
identical models, after the first of which the parameters are compared (GradAccum's must equal
Lightning's to rounding: there is no short window, where they would differ on purpose); then
each repetition runs every loop once, back to back, in an order from a Williams design, after
a barrier on two processes, with ``gc.collect()`` before each repetition. Reported: the median
per-optimizer-step epoch time of each loop, the median of the per-repetition ratios
``gradaccum / lightning`` (target: at most 1) and ``control / lightning``, each with its
interquartile range and a bootstrap 95% interval, the CPU-time ratio, and the fixed cost per
fit.

Writes ``benchmarks/results/lightning.json`` (or ``--out``) and prints a Markdown table. Needs
``lightning`` (a dependency of gradaccum-lightning; ``nox -s bench`` pins 2.6.6); without it
exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_peers import Batches, williams
from bench_torch import RESULTS, SmallTransformer, summary
from torch import nn

from gradaccum_ddp.testing import free_port, launch

Batch = tuple[torch.Tensor, torch.Tensor]

TARGET = 1.0  # gradaccum / lightning per optimizer step, at most
TOLERANCE = 1e-5  # largest parameter difference after the first fit that counts as equal
LOOPS = ("gradaccum", "lightning", "control")
LABELS = {
    "gradaccum": "gradaccum-lightning `GradAccum`",
    "lightning": "Trainer `accumulate_grad_batches` (baseline)",
    "control": "Trainer `accumulate_grad_batches`, second copy (control)",
}
MODELS = ("tiny", "transformer")
STEPS = (1, 8)
LAUNCHER = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "NODE_RANK",
    "TORCHELASTIC_RUN_ID",
)
DISTRIBUTIONS = ("torch", "lightning", "gradaccum", "gradaccum-torch", "gradaccum-lightning")
QUIET = (
    r".*isinstance\(treespec, LeafSpec\).*",  # torch 2.13 deprecates what lightning 2.6 uses
    ".*does not have many workers.*",
    ".*is smaller than the logging interval.*",
    ".*The number of training batches .* is smaller than.*",
)

# model -> (quick, full) sizes: (repetitions, warm-up fits, microbatches per epoch).
# Repetitions are whole Williams blocks (6 orders of 3 loops) in a full run; microbatches a
# multiple of 8.
SIZES = {
    "tiny": ((6, 1, 80), (12, 1, 160)),
    "transformer": ((3, 1, 16), (6, 1, 24)),
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


def lightning_module(net: nn.Module, opt: torch.optim.Optimizer) -> Any:
    """``net`` as a LightningModule whose ``training_step`` returns the mean loss and whose
    ``configure_optimizers`` returns ``opt`` (the same optimizer, its state kept, every fit)."""
    import lightning  # type: ignore[import-not-found,unused-ignore]

    class Module(lightning.LightningModule):  # type: ignore[misc,unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return opt

    return Module()


class Clock:
    """The epoch's wall and CPU time, from the first ``on_train_epoch_start`` (the `start`
    callback, listed first) to the last ``on_train_epoch_end`` (the `stop` callback, listed
    last)."""

    def __init__(self) -> None:
        import lightning  # type: ignore[import-not-found,unused-ignore]

        clock = self

        class Start(lightning.Callback):  # type: ignore[misc,unused-ignore]
            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                clock.wall0, clock.cpu0 = time.perf_counter_ns(), time.process_time_ns()

        class Stop(lightning.Callback):  # type: ignore[misc,unused-ignore]
            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                clock.cpu = time.process_time_ns() - clock.cpu0
                clock.wall = time.perf_counter_ns() - clock.wall0

        self.start, self.stop = Start(), Stop()
        self.wall0 = self.cpu0 = self.wall = self.cpu = 0


class Run:
    """One loop: its module and data; a fresh Trainer per fit, built by `prepare` (untimed)."""

    def __init__(
        self, loop: str, model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], k: int
    ) -> None:
        self.loop, self.k = loop, k
        self.model = model
        self.module = lightning_module(model, opt)
        self.data = Batches(batches)
        self.clock = Clock()
        self.trainer: Any = None

    def prepare(self, world_size: int) -> None:
        import lightning  # type: ignore[import-not-found,unused-ignore]

        from gradaccum_lightning import GradAccum

        mine = self.loop == "gradaccum"
        self.trainer = lightning.Trainer(
            accelerator="cpu",
            devices=world_size,
            strategy="ddp" if world_size > 1 else "auto",
            max_epochs=1,
            accumulate_grad_batches=1 if mine else self.k,
            callbacks=[
                self.clock.start,
                *([GradAccum(steps=self.k)] if mine else []),
                self.clock.stop,
            ],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )

    def fit(self) -> int:
        """Fit one epoch; the whole fit's wall time (ns)."""
        start = time.perf_counter_ns()
        self.trainer.fit(self.module, train_dataloaders=self.data)
        elapsed = time.perf_counter_ns() - start
        self.trainer = None
        return elapsed


def agree(models: dict[str, nn.Module]) -> dict[str, float]:
    """Largest absolute parameter difference of each loop's model from Lightning's."""
    reference = list(models["lightning"].parameters())
    return {
        loop: max(
            (p - q).abs().max().item()
            for p, q in zip(models[loop].parameters(), reference, strict=True)
        )
        for loop in ("gradaccum", "control")
    }


def measure(
    name: str, k: int, reps: int, warmup: int, microbatches: int, rank: int, world_size: int
) -> dict[str, Any]:
    """Warm-up fits (the first is checked for agreement), then ``reps`` paired repetitions:
    raw times in ns."""
    batches = make_batches(name, microbatches, rank)
    base = make_model(name)
    models = {loop: copy.deepcopy(base) for loop in LOOPS}
    runs = {
        loop: Run(loop, models[loop], make_optimizer(name, models[loop]), batches, k)
        for loop in LOOPS
    }

    def ready(run: Run) -> None:
        run.prepare(world_size)
        if world_size > 1:
            dist.barrier()

    agreement: dict[str, float] = {}
    for _ in range(warmup):  # the first fit starts from identical models
        for run in runs.values():
            ready(run)
            run.fit()
        if not agreement:
            agreement.update(agree(models))
    epoch_wall: dict[str, list[int]] = {loop: [] for loop in LOOPS}
    epoch_cpu: dict[str, list[int]] = {loop: [] for loop in LOOPS}
    fit_wall: dict[str, list[int]] = {loop: [] for loop in LOOPS}
    orders = williams(len(LOOPS))
    for rep in range(reps):
        gc.collect()
        for i in orders[rep % len(orders)]:
            loop = LOOPS[i]
            run = runs[loop]
            ready(run)
            fit_wall[loop].append(run.fit())
            epoch_wall[loop].append(run.clock.wall)
            epoch_cpu[loop].append(run.clock.cpu)
    return {
        "epoch_wall_ns": epoch_wall,
        "epoch_cpu_ns": epoch_cpu,
        "fit_wall_ns": fit_wall,
        "agreement": agreement,
        "parameters": sum(p.numel() for p in base.parameters()),
    }


def measure_all(quick: bool, more: int, rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in MODELS:
        reps, warmup, microbatches = SIZES[name][0 if quick else 1]
        reps *= more
        for k in STEPS:
            if rank == 0:
                print(f"  {name}, k={k} ...", file=sys.stderr, flush=True)
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


def _quiet() -> None:
    """Lightning's start-up lines ("GPU available: ...") and the warnings this setup gives on
    purpose (few batches, no workers, no logger)."""
    import lightning  # type: ignore[import-not-found,unused-ignore]

    del lightning  # imported first: it sets its loggers' levels on import
    for logger in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """This process as a single-process run: no launcher variables."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def bench_rank(rank: int, world_size: int, port: int, quick: bool, more: int, out: str) -> None:
    """One of ``world_size`` spawned processes, in the environment ``torchrun`` gives each rank
    (``TORCHELASTIC_RUN_ID`` included: Lightning picks its ``TorchElasticEnvironment`` and
    launches nothing). `launch` has already joined the default gloo group, which Lightning
    keeps (the port is never dialled)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        ROLE_RANK=str(rank),
        NODE_RANK="0",
        TORCHELASTIC_RUN_ID="gradaccum-bench-lightning",
        OMP_NUM_THREADS="1",
    )
    _quiet()
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
    wall: dict[str, list[float]] = raw["epoch_wall_ns"]
    cpu: dict[str, list[float]] = raw["epoch_cpu_ns"]
    fit: dict[str, list[float]] = raw["fit_wall_ns"]

    def ratios(times: dict[str, list[float]], num: str) -> list[float]:
        return [n / d for n, d in zip(times[num], times["lightning"], strict=True)]

    ratio = summary(ratios(wall, "gradaccum"))
    return {
        "model": raw["model"],
        "steps": raw["steps"],
        "parameters": raw["parameters"],
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
        "fastest_ratio": min(wall["gradaccum"]) / min(wall["lightning"]),
        "fixed_ms_per_fit": {
            loop: summary([(f - e) / 1e6 for f, e in zip(fit[loop], wall[loop], strict=True)])
            for loop in LOOPS
        },
        "target": TARGET,
        "target_met": ratio["median"] <= TARGET,
        "max_abs_param_diff_after_one_fit": raw["agreement"]["gradaccum"],
        "control_max_abs_param_diff_after_one_fit": raw["agreement"]["control"],
        "agree": raw["agreement"]["gradaccum"] <= TOLERANCE,
        "epoch_wall_ns_raw": wall,
        "fit_wall_ns_raw": fit,
    }


def _interval(pair: list[float]) -> str:
    return f"{pair[0]:.3f} – {pair[1]:.3f}"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def table(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"`{results['command']}`: lightning {env['versions']['lightning']}, torch "
        f"{env['versions']['torch']}, {env['cpu']}, {env['cores']} cores, one torch thread per "
        "process. Per optimizer step (the epoch, Trainer construction and fit set-up excluded): "
        "median wall time (ms) of each loop; the median of the per-repetition ratios GradAccum / "
        f"accumulate_grad_batches (target <= {TARGET}) with its IQR and a bootstrap 95% "
        "interval; the control's ratio (noise); the fixed cost of a fit outside its epoch "
        "(median ms, GradAccum / Lightning); the largest parameter difference from Lightning's "
        "after one fit.",
        "",
        "| processes | model | k | GradAccum (ms) | Lightning (ms) | ratio | IQR | 95% CI "
        "| control | met | fixed per fit (ms) | param diff |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for world, configs in results["configs"].items():
        for r in configs.values():
            ms, fixed = r["ms_per_optimizer_step"], r["fixed_ms_per_fit"]
            lines.append(
                f"| {world} | {r['model']} | {r['steps']} | {_ms(ms['gradaccum'])} "
                f"| {_ms(ms['lightning'])} | {r['ratio']['median']:.3f} "
                f"| {_interval(r['ratio']['iqr'])} | {_interval(r['ratio']['ci95'])} "
                f"| {r['control_ratio']['median']:.3f} | {'yes' if r['target_met'] else 'NO'} "
                f"| {fixed['gradaccum']['median']:.1f} / {fixed['lightning']['median']:.1f} "
                f"| {r['max_abs_param_diff_after_one_fit']:.1e} |"
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
        else f"GradAccum's parameters equal Lightning's after one fit (within {TOLERANCE:g})"
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
    parser.add_argument("--out", type=Path, default=RESULTS / "lightning.json")
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
    if importlib.util.find_spec("lightning") is None:
        print(
            'bench_lightning: cannot measure without lightning: pip install "lightning==2.6.6" '
            "(nox -s bench does)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    _quiet()
    start = time.perf_counter()
    try:
        raw = collect(args.quick, args.more)
    except RuntimeError as error:
        print(f"bench_lightning: {error}", file=sys.stderr)
        return 1
    results: dict[str, Any] = {
        "command": "python benchmarks/bench_lightning.py"
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
