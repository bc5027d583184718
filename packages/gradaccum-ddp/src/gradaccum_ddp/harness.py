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

Gradient reductions are counted per window by
`ReductionCounter`. The probes
(``scenario.probes``: host reads, held memory) run inside each rank; the
trajectory carries rank 0's. Use it with the suite::

    pytest --pyargs gradaccum_conformance --gradaccum-harness=gradaccum_ddp.harness:DDPHarness
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch._C._distributed_c10d import GradBucket
from torch.nn.parallel import DistributedDataParallel

import gradaccum.errors
from gradaccum_conformance import (
    Harness,
    HeldMemory,
    HostReads,
    MicrobatchProbes,
    MicrobatchRecord,
    MicrobatchView,
    Scenario,
    Trajectory,
    TrajectoryRecorder,
)
from gradaccum_ddp.accumulator import DDPAccumulator
from gradaccum_ddp.testing import ReductionCounter, _counting_hook, launch, one_rank_group

__all__ = ["DDPHarness", "trajectory_from_json", "trajectory_to_json"]


class _Run:
    """One rank's objects, fresh from the scenario's factories."""

    def __init__(self, harness: DDPHarness, scenario: Scenario) -> None:
        self.model = scenario.make_model().to(scenario.device)
        device_ids = [self.model[0].weight.device] if scenario.device != "cpu" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = scenario.make_optimizer(self.model)
        self.scheduler = scenario.make_scheduler(self.optimizer)
        self.scaler = scenario.make_scaler()
        self.acc = harness.accumulator(
            self.ddp,
            self.optimizer,
            config=scenario.config,
            scheduler=self.scheduler,
            scaler=self.scaler,
        )
        self.counter = _Counter(self.ddp, self.acc)


class _Counter(ReductionCounter):
    """A `ReductionCounter` whose hook also keeps DDP's gradient buckets.

    Its Python communication hook gives each bucket a Python tensor, which torch
    then keeps alive with the bucket: the memory probe would count it as held
    between microbatches. The buckets are DDP's (the model's), not the adapter's,
    so the harness hands them to the probe to ignore (``bucket_buffers``).
    """

    def __init__(self, model: DistributedDataParallel, acc: Any) -> None:
        self.bucket_buffers: dict[int, torch.Tensor] = {}
        register = model.register_comm_hook

        def register_keeping(state: object, hook: Any) -> None:
            register(state, _keeping_hook)

        model.register_comm_hook = register_keeping  # type: ignore[method-assign]
        try:
            super().__init__(model, acc)
        finally:
            del model.register_comm_hook


def _keeping_hook(state: _Counter, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    state.bucket_buffers[bucket.index()] = bucket.buffer()
    return _counting_hook(state, bucket)


# DDP checks a hook's annotations as objects (see gradaccum_ddp.testing).
_keeping_hook.__annotations__ = dict(_counting_hook.__annotations__)


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
        launched = launch(
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


def _shared(trajectory: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    """What every rank must agree on. Outside ``items`` normalization item counts are
    informational and each rank's own (``docs/ddp.md``); the probes are each rank's own
    measurements."""
    trajectory = {k: v for k, v in trajectory.items() if k != "microbatches"}
    if scenario.config.normalization == "items":
        return trajectory
    stats = {k: v for k, v in trajectory["stats"].items() if k not in _PER_RANK_STATS}
    return {**trajectory, "stats": stats}


_PER_RANK_STATS = ("items_in_window", "items_total")


def _passes(scenario: Scenario, rank: int) -> list[list[MicrobatchView]]:
    passes: list[list[MicrobatchView]] = []
    for view in scenario.iter_microbatches(rank):
        if view.index_in_pass == 0:
            passes.append([])
        passes[-1].append(view)
    return passes


def _generator(views: list[MicrobatchView]) -> Iterator[MicrobatchView]:
    yield from views


def run_rank(harness: DDPHarness, scenario: Scenario, workdir: Path, rank: int) -> Trajectory:
    """Run ``scenario`` as rank ``rank`` of the current process group.

    With ``scenario.probes``, reads are counted over the whole loop, because
    ``iterate`` works between the microbatches: reads before a pass's first
    microbatch belong to it (less the one comparison of a pass of known length
    on several ranks, ACC-D6; a pass resumed after a checkpoint compares again),
    reads after a microbatch (the ``end_pass`` inside ``iterate``) to that
    microbatch; checkpoints are not counted. The memory baseline is taken once
    every object and every view exists.
    """
    passes = _passes(scenario, rank)
    run = _Run(harness, scenario)
    recorder = TrajectoryRecorder(run.model)
    # ACC-D6: the one comparison before a pass of known length (several ranks only).
    allowed = 1 if scenario.pass_length == "known" and scenario.world_size > 1 else 0
    with MicrobatchProbes(scenario, *_owners(run, recorder)) as probes:
        for views in passes:
            remaining = views
            while remaining:
                # "known": iterate() sees len() and plans a short last window; "last_only":
                # a generator, so only the one-item look-ahead marks the last microbatch.
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
                                    run.model,
                                    run.optimizer,
                                    stepped=run.acc.stats.optimizer_steps != steps,
                                    reductions=run.counter.take(),
                                )
                            pending.hold(boundary, reads, probes.measure(boundary))
                        if (
                            view.global_index == scenario.checkpoint_after
                            and not view.is_last_in_pass
                        ):
                            pending.flush(probes.take())
                            with probes.paused():  # what a checkpoint needs (ACC-D6)
                                run = _checkpoint_and_resume(harness, scenario, run, workdir)
                            probes.track(*_owners(run, recorder))
                            resumed_at = view.index_in_pass + 1
                            break
                pending.flush(probes.take())  # what the pass's end (inside iterate) read
                if resumed_at is None:
                    if views[-1].global_index == scenario.checkpoint_after:
                        run = _checkpoint_and_resume(harness, scenario, run, workdir)
                        probes.track(*_owners(run, recorder))
                    break
                remaining = views[resumed_at:]
    return recorder.finish(run.acc.stats, run.scheduler)


def _microbatch(run: _Run, scenario: Scenario, view: MicrobatchView) -> None:
    """One microbatch (its loss and outputs die here, before any probe looks)."""
    with run.acc.microbatch(items=view.count):
        with scenario.autocast():
            loss = scenario.loss(run.ddp(view.x), view.y)
        run.acc.backward(loss)


def _owners(run: _Run, recorder: TrajectoryRecorder) -> tuple[object, ...]:
    """What the memory probe ignores: the model (through DDP), DDP's gradient
    buckets, the optimizer, the scaler and the recorder's snapshots."""
    return (run.ddp, run.counter.bucket_buffers, run.optimizer, run.scaler, recorder)


class _Pending:
    """The record of the last microbatch, held until the reads after it are known."""

    def __init__(self, probes: MicrobatchProbes, recorder: TrajectoryRecorder) -> None:
        self.probes = probes
        self.recorder = recorder
        self.record: tuple[bool, HostReads | None, HeldMemory | None] | None = None
        self.carried: HostReads | None = None

    def hold(self, boundary: bool, reads: HostReads | None, memory: HeldMemory | None) -> None:
        if reads is not None and self.carried is not None:
            reads = self.carried + reads
        self.carried = None
        self.record = (boundary, reads, memory)

    def flush(self, after: HostReads | None, allowed: int = 0) -> None:
        """Record the held microbatch with the reads made ``after`` it; with none
        held (a pass starts), carry ``after`` — less ``allowed`` reads — into the
        next microbatch."""
        if self.record is None:
            if after is not None:
                after = after.minus_reads(allowed)
                self.carried = after if self.carried is None else self.carried + after
            return
        boundary, reads, memory = self.record
        self.record = None
        if reads is not None and after is not None:
            reads = reads + after
        self.probes.record(self.recorder, boundary, reads=reads, memory=memory)


def _checkpoint_and_resume(
    harness: DDPHarness, scenario: Scenario, run: _Run, workdir: Path
) -> _Run:
    path = workdir / "checkpoint"
    run.acc.save(path)
    del run
    fresh = _Run(harness, scenario)
    fresh.acc.load(path)
    return fresh


def _rank_program(
    rank: int, world_size: int, harness: DDPHarness, scenario: Scenario, workdir: str
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


def _rebuild_error(error: dict[str, str], rank: int) -> BaseException:
    """The rank's GradAccumError, raised again in the parent (same class)."""
    cls = getattr(gradaccum.errors, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, gradaccum.errors.GradAccumError):
        return cls(f"(rank {rank}) {error['message']}")
    return RuntimeError(f"rank {rank} raised {error['type']}: {error['message']}")


def _tensors_to_json(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        name: {"shape": list(t.shape), "values": [float(v) for v in t.reshape(-1).tolist()]}
        for name, t in tensors.items()
    }


def _tensors_from_json(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(entry["values"], dtype=torch.float64).reshape(entry["shape"])
        for name, entry in data.items()
    }


def trajectory_to_json(trajectory: Trajectory) -> dict[str, Any]:
    """A `Trajectory` as JSON (float64 values survive exactly)."""
    return {
        "initial_params": _tensors_to_json(trajectory.initial_params),
        "params": [_tensors_to_json(p) for p in trajectory.params],
        "lrs": [list(lrs) for lrs in trajectory.lrs],
        "outcomes": list(trajectory.outcomes),
        "micro_steps": trajectory.micro_steps,
        "optimizer_steps": trajectory.optimizer_steps,
        "skipped_steps": trajectory.skipped_steps,
        "stats": {k: _json_value(v) for k, v in trajectory.stats.items()},
        "scheduler_steps": trajectory.scheduler_steps,
        "reductions_per_window": trajectory.reductions_per_window,
        "microbatches": [
            {
                "boundary": r.boundary,
                "host_reads": r.host_reads,
                "extra_bytes": r.extra_bytes,
                "notes": list(r.notes),
            }
            for r in trajectory.microbatches
        ],
    }


def _json_value(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) else value


def trajectory_from_json(data: dict[str, Any]) -> Trajectory:
    """Inverse of `trajectory_to_json`."""
    return Trajectory(
        initial_params=_tensors_from_json(data["initial_params"]),
        params=[_tensors_from_json(p) for p in data["params"]],
        lrs=[tuple(lrs) for lrs in data["lrs"]],
        outcomes=list(data["outcomes"]),
        micro_steps=data["micro_steps"],
        optimizer_steps=data["optimizer_steps"],
        skipped_steps=data["skipped_steps"],
        stats=dict(data["stats"]),
        scheduler_steps=data["scheduler_steps"],
        reductions_per_window=data["reductions_per_window"],
        microbatches=[
            MicrobatchRecord(
                boundary=r["boundary"],
                host_reads=r["host_reads"],
                extra_bytes=r["extra_bytes"],
                notes=tuple(r["notes"]),
            )
            for r in data.get("microbatches", [])
        ],
    )
