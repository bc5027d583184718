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
  `gradaccum_ddp.harness.DDPHarness` does (with the same pieces, from
  `gradaccum_ddp.harness_support`: the launch and the comparison of the
  ranks, the trajectory's JSON form, the loop around ``iterate``, the
  reduction counter, the probes' bookkeeping).

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
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from lightning.fabric.wrappers import _FabricModule

import gradaccum.errors
from gradaccum_conformance import (
    CheckpointPlan,
    Harness,
    MicrobatchView,
    PlannedRun,
    Scenario,
    Trajectory,
    TrajectoryRecorder,
)
from gradaccum_ddp.harness_support import (
    WindowReductions,
    run_iterate_loop,
    run_on_ranks,
    run_one_plan,
    run_plan_loop,
    run_plans,
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
    "run_rank_plan",
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
            "checkpoint_io",
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
        return run_on_ranks(
            self, run_rank, scenario, workdir, timeout=self.timeout, launcher=launch_fabric
        )

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        """``scenario`` under ``plan`` (see `gradaccum_conformance.Harness.run_plan`):
        checkpoints through ``acc.save(dir)``, a resume through ``acc.load(dir)``
        into a fresh ``Fabric`` and fresh objects."""
        return run_one_plan(self, scenario, workdir, plan)

    def run_plans(
        self, runs: Sequence[PlannedRun]
    ) -> list[Trajectory | gradaccum.errors.GradAccumError]:
        """Runs on one process here; runs on several ranks in one launch."""
        return run_plans(
            self,
            run_rank_plan,
            runs,
            timeout=self.timeout,
            launcher=launch_fabric,
            one_rank=one_process,
        )


class _Run:
    """One rank's objects, fresh from the scenario's factories, through ``fabric.setup``
    (an `gradaccum_ddp.harness_support.IterateRun`)."""

    def __init__(self, harness: FabricHarness, scenario: Scenario) -> None:
        self.scenario = scenario
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
        # Counts DDP's bucket all-reduces and the accumulator's own reductions.
        self.counter = WindowReductions.of(self.model._forward_module, self.acc.distributed)

    def owners(self, recorder: TrajectoryRecorder) -> tuple[object, ...]:
        """What the memory probe ignores: the model (through the ``_FabricModule``
        and its DDP), DDP's gradient buckets, the optimizer (raw and Fabric's
        wrapper), the scaler and the recorder's snapshots. Not the accumulator."""
        return (
            self.model,
            self.module,
            self.counter.bucket_buffers,
            self.optimizer,
            self.fabric_optimizer,
            self.scaler,
            recorder,
        )

    def reductions(self) -> int | None:
        return self.counter.take()

    def microbatch(self, view: MicrobatchView) -> None:
        """One microbatch (its loss and outputs die here, before any probe looks). The
        ``_FabricModule`` applies Fabric's precision (autocast, input and output casts)."""
        with self.acc.microbatch(items=view.count):
            loss = self.scenario.loss(self.model(view.x), view.y)
            self.acc.backward(loss)

    def save(self, path: Path) -> None:
        self.acc.save(path)

    def load(self, path: Path) -> None:
        """``acc.load`` (into a fresh ``Fabric`` and fresh objects)."""
        self.acc.load(path)


def run_rank(harness: FabricHarness, scenario: Scenario, workdir: Path, rank: int) -> Trajectory:
    """Run ``scenario`` as rank ``rank`` (of the current process group when
    ``scenario.world_size > 1``).

    The loop, the probes' attribution (reads before a pass's first microbatch
    belong to it, less the one comparison of a pass of known length on several
    ranks, ACC-D6; reads after a microbatch, the ``end_pass`` inside ``iterate``,
    to that microbatch; checkpoints are not counted) and the checkpoint points
    are those of `gradaccum_ddp.harness_support.run_iterate_loop`; a checkpoint is
    ``acc.save``, everything rebuilt (a fresh ``Fabric`` included), ``acc.load``.
    """
    return run_iterate_loop(functools.partial(_Run, harness, scenario), scenario, workdir, rank)


def run_rank_plan(
    harness: FabricHarness, scenario: Scenario, workdir: Path, rank: int, plan: CheckpointPlan
) -> Trajectory:
    """Run ``scenario`` under ``plan`` as rank ``rank``
    (`gradaccum_ddp.harness_support.run_plan_loop`)."""
    return run_plan_loop(functools.partial(_Run, harness, scenario), scenario, rank, plan)
