"""The conformance harness of gradaccum-ddp (needs ``gradaccum-conformance``).

`DDPHarness` runs a conformance `Scenario`
through `DDPAccumulator`'s public API on real process
groups:

* ``world_size == 1``: in this process, on a one-rank gloo process group it
  creates (and destroys) around the run;
* ``world_size > 1``: on that many fresh processes (``torch.multiprocessing``,
  gloo on loopback, see `gradaccum_ddp.testing.launch`). Each rank writes
  its trajectory as JSON; the harness returns rank 0's and first checks that
  every rank's is identical (parameters bitwise, learning rates, outcomes,
  counters, reductions): ranks that disagree fail the run.

The plumbing it shares with the other adapters' harnesses (launching ranks and
comparing their trajectories, the loop around ``iterate``, the probes'
bookkeeping) is in `gradaccum_ddp.harness_support`.

Gradient reductions are counted per window by
`ReductionCounter`. The probes
(``scenario.probes``: host reads, held memory) run inside each rank; the
trajectory carries rank 0's. Use it with the suite::

    pytest --pyargs gradaccum_conformance --gradaccum-harness=gradaccum_ddp.harness:DDPHarness
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch.nn.parallel import DistributedDataParallel

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
from gradaccum_ddp.accumulator import DDPAccumulator
from gradaccum_ddp.harness_support import (
    BucketKeepingCounter,
    run_iterate_loop,
    run_on_ranks,
    run_one_plan,
    run_plan_loop,
    run_plans,
    trajectory_from_json,
    trajectory_to_json,
)
from gradaccum_ddp.testing import one_rank_group

__all__ = [
    "DDPHarness",
    "run_rank",
    "run_rank_plan",
    "trajectory_from_json",
    "trajectory_to_json",
]


class DDPHarness(Harness):
    """gradaccum-ddp under the conformance suite, at any world size."""

    name = "gradaccum-ddp"
    capabilities = frozenset(
        {
            "amp_fp16",
            "amp_bf16",
            "checkpoint",
            "checkpoint_mid_window",
            "offload",
            "fp32_accumulation",
            "per_microbatch_clip",
            "drop_microbatch",  # on one rank; the core refuses it on several
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

    def accumulator(self, ddp: DistributedDataParallel, optimizer: Any, **kwargs: Any) -> Any:
        """The accumulator under test (meta-tests override it with broken ones)."""
        return DDPAccumulator(ddp, optimizer, **kwargs)

    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        if scenario.world_size == 1:
            with one_rank_group():
                return run_rank(self, scenario, workdir, rank=0)
        return run_on_ranks(self, run_rank, scenario, workdir, timeout=self.timeout)

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        """``scenario`` under ``plan`` (see `gradaccum_conformance.Harness.run_plan`):
        checkpoints through ``acc.save(dir)`` on every rank, a resume through
        ``acc.load(dir)`` into fresh objects."""
        return run_one_plan(self, scenario, workdir, plan)

    def run_plans(
        self, runs: Sequence[PlannedRun]
    ) -> list[Trajectory | gradaccum.errors.GradAccumError]:
        """Runs on one rank in this process, each on its own one-rank group; runs on
        several ranks in one launch (`run_plans_on_ranks`)."""
        return run_plans(self, run_rank_plan, runs, timeout=self.timeout, one_rank=one_rank_group)


class _Run:
    """One rank's objects, fresh from the scenario's factories (an
    `gradaccum_ddp.harness_support.IterateRun`)."""

    def __init__(self, harness: DDPHarness, scenario: Scenario) -> None:
        self.scenario = scenario
        self.module = scenario.make_model().to(scenario.device)
        device_ids = [self.module[0].weight.device] if scenario.device != "cpu" else None
        self.ddp = DistributedDataParallel(self.module, device_ids=device_ids)
        self.optimizer = scenario.make_optimizer(self.module)
        self.scheduler = scenario.make_scheduler(self.optimizer)
        self.scaler = scenario.make_scaler()
        self.acc = harness.accumulator(
            self.ddp,
            self.optimizer,
            config=scenario.config,
            scheduler=self.scheduler,
            scaler=self.scaler,
        )
        self.counter = BucketKeepingCounter(self.ddp, self.acc)

    def owners(self, recorder: TrajectoryRecorder) -> tuple[object, ...]:
        """What the memory probe ignores: the model (through DDP), DDP's gradient
        buckets, the optimizer, the scaler and the recorder's snapshots."""
        return (self.ddp, self.counter.bucket_buffers, self.optimizer, self.scaler, recorder)

    def reductions(self) -> int:
        return self.counter.take()

    def microbatch(self, view: MicrobatchView) -> None:
        """One microbatch (its loss and outputs die here, before any probe looks)."""
        with self.acc.microbatch(items=view.count):
            with self.scenario.autocast():
                loss = self.scenario.loss(self.ddp(view.x), view.y)
            self.acc.backward(loss)

    def save(self, path: Path) -> None:
        self.acc.save(path)

    def load(self, path: Path) -> None:
        self.acc.load(path)


def run_rank(harness: DDPHarness, scenario: Scenario, workdir: Path, rank: int) -> Trajectory:
    """Run ``scenario`` as rank ``rank`` of the current process group, through
    `gradaccum_ddp.harness_support.run_iterate_loop` (checkpoints through
    ``acc.save`` and ``acc.load``; the probes' attribution is described there)."""
    return run_iterate_loop(functools.partial(_Run, harness, scenario), scenario, workdir, rank)


def run_rank_plan(
    harness: DDPHarness, scenario: Scenario, workdir: Path, rank: int, plan: CheckpointPlan
) -> Trajectory:
    """Run ``scenario`` under ``plan`` as rank ``rank`` of the current process group
    (`gradaccum_ddp.harness_support.run_plan_loop`)."""
    return run_plan_loop(functools.partial(_Run, harness, scenario), scenario, rank, plan)
