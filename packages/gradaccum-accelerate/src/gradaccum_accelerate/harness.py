"""The conformance harness of gradaccum-accelerate (needs ``gradaccum-conformance``).

`AccelerateHarness` runs a conformance `Scenario` through real Accelerate and
`gradaccum_accelerate.Accumulator`'s public API, the way a user's script does:
``Accelerator(cpu=True)``, ``accelerator.prepare(model, optimizer, scheduler)``,
``Accumulator(accelerator, model, optimizer, config=..., scheduler=...)``, and
``acc.iterate`` / ``acc.microbatch`` / ``acc.backward``:

* ``world_size == 1``: in this process, Accelerate's ``DistributedType.NO``
  (`gradaccum_accelerate.testing.one_process`);
* ``world_size > 1``: on that many fresh processes in Accelerate's
  ``MULTI_CPU`` environment (`gradaccum_accelerate.testing.launch_accelerate`:
  gloo on loopback; the prepared model is a ``DistributedDataParallel``).
  Each rank writes its trajectory as JSON; the harness returns rank 0's once
  it has checked that every rank's is identical, as
  `gradaccum_ddp.harness.DDPHarness` does (with the same pieces, from
  `gradaccum_ddp.harness_support`: the launch and the comparison of the
  ranks, the trajectory's JSON form, the loop around ``iterate``, the
  reduction counter, the probes' bookkeeping).

Accelerate's singletons are reset before every ``Accelerator`` is built.

Precision:

* ``fp16``: on the CPU Accelerate's ``mixed_precision="fp16"`` is a silent
  fp32 run (no autocast, no scaler). The harness builds
  ``Accelerator(cpu=True, mixed_precision="fp16")`` and passes
  ``scaler=scenario.make_scaler()`` with the forward under
  ``scenario.autocast()``: the one way to train fp16 with Accelerate on a CPU,
  which the adapter documents (and refuses without ``scaler=``). It tests the
  adapter's loss scaling, unscaling and overflow skips, not Accelerate's AMP.
* ``bf16``: ``Accelerator(cpu=True, mixed_precision="bf16")``, and no autocast
  of the harness's own. On the CPU that is Accelerate's real AMP path (the
  prepared model's forward runs under Accelerate's bf16 autocast and its
  outputs come back in float32), so the test covers what a user gets: the
  adapter working with Accelerate's own mixed precision, with no scaler.

Checkpoints (``scenario.checkpoint_after``) go through Accelerate:
``accelerator.save_state(dir)`` (the adapter's save pre-hook adds
``dir/gradaccum``, every rank's in-flight gradients), then fresh singletons,
a fresh ``Accelerator``, fresh objects, ``prepare`` and ``Accumulator``, and
``accelerator.load_state(dir)`` (the load pre-hook restores the window);
the run continues with the microbatches that follow.

The probes (``scenario.probes``) run in each rank as in ``DDPHarness``: host
reads counted over the whole loop and attributed to microbatches, memory held
beyond the model, its DDP buckets (the counter's hook), the optimizer, the
scaler and the recorder. Use it with the suite::

    pytest --pyargs gradaccum_conformance \\
        --gradaccum-harness=gradaccum_accelerate.harness:AccelerateHarness
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator

import gradaccum.errors
from gradaccum_accelerate.accumulator import Accumulator
from gradaccum_accelerate.testing import launch_accelerate, one_process, reset_accelerate
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

__all__ = ["AccelerateHarness", "run_rank", "run_rank_plan"]


class AccelerateHarness(Harness):
    """gradaccum-accelerate under the conformance suite, at any world size."""

    name = "gradaccum-accelerate"
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

    def make_accelerator(self, scenario: Scenario) -> Accelerator:
        """The run's ``Accelerator`` (the singletons are fresh): on the CPU, with
        Accelerate's mixed precision for the scenario (see the module docstring)."""
        if scenario.device != "cpu":
            raise NotImplementedError(f"{self.name}: the harness runs on the CPU only")
        precision = {"bf16": "bf16", "fp16": "fp16"}.get(scenario.precision, "no")
        return Accelerator(cpu=True, mixed_precision=precision)

    def forward_context(self, scenario: Scenario) -> contextlib.AbstractContextManager[Any]:
        """Around the forward and the loss: the scenario's fp16 autocast (Accelerate
        has none on the CPU); nothing otherwise (bf16 is Accelerate's own)."""
        if scenario.precision == "fp16":
            return scenario.autocast()
        return contextlib.nullcontext()

    def accumulator(
        self, accelerator: Accelerator, model: Any, optimizer: Any, **kwargs: Any
    ) -> Accumulator:
        """The accumulator under test (meta-tests override it with broken ones)."""
        return Accumulator(accelerator, model, optimizer, **kwargs)

    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        if scenario.world_size == 1:
            with one_process():
                return run_rank(self, scenario, workdir, rank=0)
        return run_on_ranks(
            self, run_rank, scenario, workdir, timeout=self.timeout, launcher=launch_accelerate
        )

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        """``scenario`` under ``plan`` (see `gradaccum_conformance.Harness.run_plan`).

        Checkpoints are ``acc.save(dir)`` — the shared format, model, optimizer,
        scheduler and scaler included, what another stack can load — not
        ``accelerator.save_state`` (whose ``gradaccum`` folder holds only the
        accumulation state and the in-flight gradients); a resume is
        ``acc.load(dir)`` into fresh singletons and objects after ``prepare``."""
        return run_one_plan(self, scenario, workdir, plan)

    def run_plans(
        self, runs: Sequence[PlannedRun]
    ) -> list[Trajectory | gradaccum.errors.GradAccumError]:
        """Runs on one process here; runs on several processes in one launch."""
        return run_plans(
            self,
            run_rank_plan,
            runs,
            timeout=self.timeout,
            launcher=launch_accelerate,
            one_rank=one_process,
        )


class _Run:
    """One rank's objects, fresh from the scenario's factories, through
    ``accelerator.prepare`` (an `gradaccum_ddp.harness_support.IterateRun`)."""

    def __init__(self, harness: AccelerateHarness, scenario: Scenario) -> None:
        reset_accelerate()
        self.harness = harness
        self.scenario = scenario
        self.accelerator = accelerator = harness.make_accelerator(scenario)
        self.module = scenario.make_model().to(scenario.device)
        optimizer = scenario.make_optimizer(self.module)
        scheduler = scenario.make_scheduler(optimizer)
        if scheduler is None:
            self.model, self.prepared_optimizer = accelerator.prepare(self.module, optimizer)
            self.prepared_scheduler: Any | None = None
        else:
            self.model, self.prepared_optimizer, self.prepared_scheduler = accelerator.prepare(
                self.module, optimizer, scheduler
            )
        # The raw objects behind Accelerate's wrappers: what the recorder reads.
        self.optimizer: torch.optim.Optimizer = self.prepared_optimizer.optimizer
        self.scheduler: Any | None = (
            None if self.prepared_scheduler is None else self.prepared_scheduler.scheduler
        )
        self.scaler = scenario.make_scaler()
        self.acc = harness.accumulator(
            accelerator,
            self.model,
            self.prepared_optimizer,
            config=scenario.config,
            scheduler=self.prepared_scheduler,
            scaler=self.scaler,
        )
        # Counts DDP's bucket all-reduces and the accumulator's own reductions.
        self.counter = WindowReductions.of(self.model, self.acc.distributed)

    def owners(self, recorder: TrajectoryRecorder) -> tuple[object, ...]:
        """What the memory probe ignores: the model (through DDP when prepared so),
        DDP's gradient buckets, the optimizer, the scaler and the recorder's
        snapshots. Not the accelerator: it holds the accumulator (its checkpoint
        hooks), whose buffers the probe must see."""
        buckets = self.counter.bucket_buffers
        return (self.model, self.module, buckets, self.optimizer, self.scaler, recorder)

    def reductions(self) -> int | None:
        return self.counter.take()

    def microbatch(self, view: MicrobatchView) -> None:
        """One microbatch (its loss and outputs die here, before any probe looks)."""
        with self.acc.microbatch(items=view.count):
            with self.harness.forward_context(self.scenario):
                loss = self.scenario.loss(self.model(view.x), view.y)
            self.acc.backward(loss)

    def save(self, path: Path) -> None:
        """``accelerator.save_state``."""
        self.accelerator.save_state(str(path))

    def load(self, path: Path) -> None:
        """``accelerator.load_state`` (into fresh singletons and objects)."""
        self.accelerator.load_state(str(path))


def run_rank(
    harness: AccelerateHarness, scenario: Scenario, workdir: Path, rank: int
) -> Trajectory:
    """Run ``scenario`` as process ``rank`` of Accelerate's current environment.

    The loop, the probes' attribution (reads before a pass's first microbatch
    belong to it, less the one comparison of a pass of known length on several
    processes, ACC-D6; reads after a microbatch, the ``end_pass`` inside
    ``iterate``, to that microbatch; checkpoints are not counted) and the
    checkpoint points are those of `gradaccum_ddp.harness_support.run_iterate_loop`;
    a checkpoint is ``accelerator.save_state``, everything rebuilt (singletons
    included), ``accelerator.load_state``.
    """
    return run_iterate_loop(functools.partial(_Run, harness, scenario), scenario, workdir, rank)


def run_rank_plan(
    harness: AccelerateHarness, scenario: Scenario, workdir: Path, rank: int, plan: CheckpointPlan
) -> Trajectory:
    """Run ``scenario`` under ``plan`` as process ``rank`` of Accelerate's current
    environment (`gradaccum_ddp.harness_support.run_plan_loop`)."""
    return run_plan_loop(functools.partial(_Run, harness, scenario), scenario, rank, plan)
