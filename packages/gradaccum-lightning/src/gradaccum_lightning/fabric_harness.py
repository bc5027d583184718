"""The conformance harness of `gradaccum_lightning.FabricAccumulator` (needs
``gradaccum-conformance``).

`FabricHarness` runs a conformance `Scenario` through real Lightning Fabric and
the adapter's public API, the way a user's script does::

    fabric = Fabric(accelerator="cpu", devices=W, strategy="ddp")   # W == 1: one device
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    acc = FabricAccumulator(fabric, model, optimizer, config=..., scheduler=...)
    for view in acc.iterate(views):
        with acc.microbatch(items=view.count):
            acc.backward(loss(model(view.x), view.y))

* ``world_size == 1``: in this process, ``Fabric(accelerator="cpu", devices=1)``
  (Fabric's ``SingleDeviceStrategy``), with the launcher variables removed for
  the run (`one_process`).
* ``world_size > 1``: on that many spawned processes (`launch_fabric`: the
  gloo group of `gradaccum_ddp.testing.launch`, plus the environment
  ``torchrun`` gives), ``Fabric(accelerator="cpu", devices=W, strategy="ddp")``.
  Each rank writes its trajectory as JSON; the harness returns rank 0's once
  it has checked that every rank's is identical, as
  `gradaccum_ddp.harness.DDPHarness` does (whose pieces it reuses: the
  trajectory's JSON form, the reduction counter, the probes' bookkeeping).

About the ranks' environment: with ``TORCHELASTIC_RUN_ID`` set Fabric picks
its ``TorchElasticEnvironment`` (ranks and sizes from ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``; ``devices × num_nodes`` must equal
``WORLD_SIZE``), which creates no processes: ``fabric.launch()`` only sets up
the strategy. The default process group already exists, so Fabric's
``_init_dist_connection`` returns early and its DDP model uses that group
(``MASTER_PORT`` is never dialled). ``OMP_NUM_THREADS`` is set to the rank's
thread count, or ``fabric.launch()`` would reset ``torch.set_num_threads`` to
the cores per process. Without ``TORCHELASTIC_RUN_ID`` Fabric's
``LightningEnvironment`` behaves the same once ``LOCAL_RANK`` is set; without
``LOCAL_RANK`` it would start copies of the running script (``sys.argv``).

Precision (the forward runs through the ``_FabricModule``, under Fabric's own
autocast and input/output casts; the harness adds no autocast):

* ``float64``, ``float32``: Fabric's default ``"32-true"`` (it leaves a float64
  model as it is).
* ``bf16``: ``Fabric(precision="bf16-mixed")``: bf16 autocast, no scaler.
* ``fp16``: ``Fabric(plugins=[MixedPrecision("16-mixed", "cpu",
  scaler=scenario.make_scaler())])``. On the CPU ``precision="16-mixed"``
  would silently become ``"bf16-mixed"`` without a scaler (Fabric's connector
  warns and switches), so real fp16 needs the explicit plugin. The adapter
  finds the scaler on ``fabric.strategy.precision``.

Checkpoints (``scenario.checkpoint_after``): ``acc.save(dir)``; then a fresh
``Fabric``, fresh objects, ``fabric.setup``, a fresh accumulator and
``acc.load(dir)``; the run continues with the microbatches that follow.

Probes (``scenario.probes``) run in each rank as in ``DDPHarness``: host reads
counted over the whole loop and attributed to microbatches, memory held
beyond the model (through its ``_FabricModule`` and DDP), DDP's gradient
buckets (the counter's hook), the optimizer, the scaler and the recorder. Use
it with the suite::

    pytest --pyargs gradaccum_conformance \\
        --gradaccum-harness=gradaccum_lightning.fabric_harness:FabricHarness
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from lightning.fabric.wrappers import _FabricModule
from torch.nn.parallel import DistributedDataParallel

import gradaccum.errors
from gradaccum_conformance import (
    Harness,
    MicrobatchProbes,
    MicrobatchView,
    Scenario,
    Trajectory,
    TrajectoryRecorder,
)
from gradaccum_ddp.harness import (
    _Counter,
    _generator,
    _passes,
    _Pending,
    _rebuild_error,
    _shared,
    trajectory_from_json,
    trajectory_to_json,
)
from gradaccum_ddp.testing import LaunchResult, free_port, launch
from gradaccum_lightning.fabric import FabricAccumulator

__all__ = [
    "LAUNCHER_VARIABLES",
    "FabricHarness",
    "launch_fabric",
    "make_fabric",
    "one_process",
    "rank_environment",
    "run_rank",
]

LAUNCHER_VARIABLES = (
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "NODE_RANK",
)
"""Environment variables through which a launcher tells Fabric how it runs."""


def rank_environment(rank: int, world_size: int, port: int) -> None:
    """Set, in this process, what ``torchrun --nproc-per-node=world_size`` sets for ``rank``."""
    os.environ.update(
        TORCHELASTIC_RUN_ID="gradaccum-fabric",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        ROLE_RANK=str(rank),
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """A single-process Fabric run in this process: the launcher variables are
    removed for the block (restored after it), so Fabric sees no launcher."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        for name in LAUNCHER_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(saved)


def _fabric_rank(
    rank: int, world_size: int, target: Callable[..., None], port: int, *args: Any
) -> None:
    rank_environment(rank, world_size, port)
    target(rank, world_size, *args)


def launch_fabric(
    target: Callable[..., None],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
) -> LaunchResult:
    """Run ``target(rank, world_size, *args)`` on ``world_size`` spawned processes
    (`gradaccum_ddp.testing.launch`: a gloo group on loopback, a hard timeout),
    each in the environment ``torchrun`` gives (`rank_environment`), so that
    ``Fabric(accelerator="cpu", devices=world_size, strategy="ddp")`` and
    ``fabric.launch()`` inside ``target`` make it one of ``world_size`` ranks.
    ``target`` must be a module-level function; results travel through files."""
    return launch(
        _fabric_rank,
        world_size,
        target,
        free_port(),
        *args,
        timeout=timeout,
        pg_timeout=pg_timeout,
    )


def make_fabric(world_size: int, precision: str = "float64", **kwargs: Any) -> Fabric:
    """The launched ``Fabric`` on the CPU for ``world_size`` ranks (``"ddp"`` when
    more than one) and a conformance precision (see the module docstring).
    Under ``"fp16"`` pass the ``scaler=``."""
    scaler: torch.amp.GradScaler | None = kwargs.pop("scaler", None)
    options: dict[str, Any] = {"accelerator": "cpu", "devices": world_size, **kwargs}
    if world_size > 1:
        options.setdefault("strategy", "ddp")
    if precision == "fp16":
        if scaler is None:
            raise ValueError("fp16 needs an explicit GradScaler on the CPU: pass scaler=")
        options["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    elif precision == "bf16":
        options["precision"] = "bf16-mixed"
    fabric = Fabric(**options)
    fabric.launch()
    return fabric


class FabricHarness(Harness):
    """`FabricAccumulator` under the conformance suite, at any world size."""

    name = "gradaccum-lightning-fabric"
    capabilities = frozenset(
        {
            "amp_fp16",
            "amp_bf16",
            "checkpoint",
            "checkpoint_mid_window",
            "offload",
            "fp32_accumulation",
            "per_microbatch_clip",
            "drop_microbatch",  # on one process; the core refuses it on several
            "weights",
            "schedules",
            "partial_carry",
            "partial_drop",
            "distributed",
            "device_items",
            "probes",
        }
    )
    timeout: ClassVar[float] = 180.0
    """Seconds a multi-process run may take before its ranks are killed."""

    def make_fabric(self, scenario: Scenario) -> Fabric:
        """The run's launched ``Fabric`` (see the module docstring)."""
        if scenario.device != "cpu":
            raise NotImplementedError(f"{self.name}: the harness runs on the CPU only")
        return make_fabric(scenario.world_size, scenario.precision, scaler=scenario.make_scaler())

    def accumulator(
        self, fabric: Fabric, model: _FabricModule, optimizer: Any, **kwargs: Any
    ) -> FabricAccumulator:
        """The accumulator under test (meta-tests override it with broken ones)."""
        return FabricAccumulator(fabric, model, optimizer, **kwargs)

    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        if scenario.world_size == 1:
            with one_process():
                return run_rank(self, scenario, workdir, rank=0)
        launched = launch_fabric(
            _rank_program,
            scenario.world_size,
            self,
            scenario,
            str(workdir),
            timeout=self.timeout,
            pg_timeout=60.0,
        )
        results = []
        for rank in range(scenario.world_size):
            path = workdir / f"trajectory.rank{rank}.json"
            if not path.exists():
                raise RuntimeError(
                    f"{self.name}: rank {rank} wrote no trajectory ({launched}); its traceback "
                    f"is on stderr"
                )
            results.append(json.loads(path.read_text()))
        for rank, result in enumerate(results):
            if "error" in result:
                raise _rebuild_error(result["error"], rank)
        first = results[0]["trajectory"]
        for rank, result in enumerate(results[1:], start=1):
            if _shared(result["trajectory"], scenario) != _shared(first, scenario):
                raise AssertionError(
                    f"{self.name}: rank {rank}'s trajectory differs from rank 0's "
                    f"(parameters, learning rates, outcomes, counters or reductions): ranks "
                    f"must agree on every decision"
                )
        return trajectory_from_json(first)


class _Run:
    """One rank's objects, fresh from the scenario's factories, through ``fabric.setup``."""

    def __init__(self, harness: FabricHarness, scenario: Scenario) -> None:
        self.fabric = fabric = harness.make_fabric(scenario)
        self.module = scenario.make_model().to(scenario.device)
        self.optimizer = scenario.make_optimizer(self.module)
        self.scheduler = scenario.make_scheduler(self.optimizer)
        self.model, self.fabric_optimizer = fabric.setup(self.module, self.optimizer)
        self.acc = harness.accumulator(
            fabric,
            self.model,
            self.fabric_optimizer,
            config=scenario.config,
            scheduler=self.scheduler,
        )
        self.scaler = self.acc.scaler
        self.counter: _Counter | None = None
        ddp = self.model._forward_module
        if isinstance(ddp, DistributedDataParallel):
            # Counts DDP's bucket all-reduces and the accumulator's own reductions.
            self.counter = _Counter(ddp, self.acc.distributed)

    def owners(self, recorder: TrajectoryRecorder) -> tuple[object, ...]:
        """What the memory probe ignores: the model (through the ``_FabricModule``
        and its DDP), DDP's gradient buckets, the optimizer (raw and Fabric's
        wrapper), the scaler and the recorder's snapshots. Not the accumulator."""
        buckets = {} if self.counter is None else self.counter.bucket_buffers
        return (
            self.model,
            self.module,
            buckets,
            self.optimizer,
            self.fabric_optimizer,
            self.scaler,
            recorder,
        )

    def reductions(self) -> int | None:
        return None if self.counter is None else self.counter.take()


def run_rank(harness: FabricHarness, scenario: Scenario, workdir: Path, rank: int) -> Trajectory:
    """Run ``scenario`` as rank ``rank`` (of the current process group when
    ``scenario.world_size > 1``).

    The loop, the probes' attribution (reads before a pass's first microbatch
    belong to it, less the one comparison of a pass of known length on several
    ranks, ACC-D6; reads after a microbatch, the ``end_pass`` inside ``iterate``,
    to that microbatch; checkpoints are not counted) and the checkpoint points
    are those of `gradaccum_ddp.harness.run_rank`.
    """
    passes = _passes(scenario, rank)
    run = _Run(harness, scenario)
    recorder = TrajectoryRecorder(run.module)
    allowed = 1 if scenario.pass_length == "known" and scenario.world_size > 1 else 0
    with MicrobatchProbes(scenario, *run.owners(recorder)) as probes:
        for views in passes:
            remaining = views
            while remaining:
                source = remaining if scenario.pass_length == "known" else _generator(remaining)
                resumed_at: int | None = None
                pending = _Pending(probes, recorder)
                with probes.counting():
                    for view in run.acc.iterate(source):
                        pending.flush(probes.take(), allowed)
                        windows = run.acc.machine.state.windows
                        steps = run.acc.stats.optimizer_steps
                        _microbatch(run, scenario, view)
                        boundary = run.acc.machine.state.windows != windows
                        reads = probes.take()
                        with probes.paused():
                            if boundary:
                                recorder.window(
                                    run.module,
                                    run.optimizer,
                                    stepped=run.acc.stats.optimizer_steps != steps,
                                    reductions=run.reductions(),
                                )
                            pending.hold(boundary, reads, probes.measure(boundary))
                        if (
                            view.global_index == scenario.checkpoint_after
                            and not view.is_last_in_pass
                        ):
                            pending.flush(probes.take())
                            with probes.paused():
                                run = _checkpoint_and_resume(harness, scenario, run, workdir)
                            probes.track(*run.owners(recorder))
                            resumed_at = view.index_in_pass + 1
                            break
                pending.flush(probes.take())
                if resumed_at is None:
                    if views[-1].global_index == scenario.checkpoint_after:
                        run = _checkpoint_and_resume(harness, scenario, run, workdir)
                        probes.track(*run.owners(recorder))
                    break
                remaining = views[resumed_at:]
    return recorder.finish(run.acc.stats, run.scheduler)


def _microbatch(run: _Run, scenario: Scenario, view: MicrobatchView) -> None:
    """One microbatch (its loss and outputs die here, before any probe looks). The
    ``_FabricModule`` applies Fabric's precision (autocast, input and output casts)."""
    with run.acc.microbatch(items=view.count):
        loss = scenario.loss(run.model(view.x), view.y)
        run.acc.backward(loss)


def _checkpoint_and_resume(
    harness: FabricHarness, scenario: Scenario, run: _Run, workdir: Path
) -> _Run:
    """``acc.save``, everything rebuilt (a fresh ``Fabric`` included), ``acc.load``."""
    path = workdir / "checkpoint"
    run.acc.save(path)
    del run
    fresh = _Run(harness, scenario)
    fresh.acc.load(path)
    return fresh


def _rank_program(
    rank: int, world_size: int, harness: FabricHarness, scenario: Scenario, workdir: str
) -> None:
    out = Path(workdir) / f"trajectory.rank{rank}.json"
    try:
        result: dict[str, Any] = {
            "trajectory": trajectory_to_json(run_rank(harness, scenario, Path(workdir), rank))
        }
    except gradaccum.errors.GradAccumError as exc:
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
