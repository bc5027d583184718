"""What the conformance harnesses of the gradaccum adapters share (needs ``gradaccum-conformance``).

`gradaccum_ddp.harness.DDPHarness`, ``gradaccum_accelerate.harness.AccelerateHarness``,
``gradaccum_lightning.fabric_harness.FabricHarness`` and
``gradaccum_lightning.harness.LightningHarness`` run a conformance `Scenario` on
one process or on several spawned gloo ranks. The plumbing they have in common
lives here:

* several ranks: `run_on_ranks` launches them (with the harness's launcher,
  `gradaccum_ddp.testing.launch` or one built on it), each running
  `rank_program`, which writes the rank's trajectory (or its `GradAccumError`)
  as JSON to `rank_trajectory_path`; then `collect_trajectories` reads them
  back (`rebuild_rank_error` raises a rank's error again in the parent) and
  `check_ranks_agree` compares them (`shared_trajectory`: what every rank must
  agree on). The JSON form is `trajectory_to_json` / `trajectory_from_json`.
* the scenario's data: `scenario_passes` (a rank's views, pass by pass),
  `pass_source` (what ``iterate`` is given for a pass) and
  `allowed_pass_reads` (ACC-D6: the one comparison before a pass of known
  length on several ranks).
* the probes: `PendingRecord` holds a microbatch's record until the reads
  after it (the adapter's work between microbatches) are known;
  `BucketKeepingCounter` counts reductions and hands DDP's gradient buckets to
  the memory probe to ignore; `WindowReductions` takes its count per window
  (``None`` without a DDP model).
* the loop of a harness that drives an accumulator's ``iterate``:
  `run_iterate_loop`, over an `IterateRun` (one rank's objects, rebuilt after
  each checkpoint), and `run_plan_loop`, the same loop under a
  `gradaccum_conformance.CheckpointPlan` (capability ``checkpoint_io``: the
  cross-stack matrix).
* many planned runs on several ranks in one launch: `run_plans_on_ranks`
  (each rank runs `plans_rank_program`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch._C._distributed_c10d import GradBucket
from torch.nn.parallel import DistributedDataParallel

import gradaccum.errors
from gradaccum_conformance import (
    CheckpointPlan,
    Harness,
    HeldMemory,
    HostReads,
    MicrobatchProbes,
    MicrobatchRecord,
    MicrobatchView,
    PlannedRun,
    Scenario,
    Trajectory,
    TrajectoryRecorder,
)
from gradaccum_ddp.testing import LaunchResult, ReductionCounter, _counting_hook, launch

__all__ = [
    "PER_RANK_STATS",
    "BucketKeepingCounter",
    "IterateRun",
    "Launcher",
    "PendingRecord",
    "WindowReductions",
    "allowed_pass_reads",
    "check_ranks_agree",
    "collect_trajectories",
    "pass_source",
    "plans_rank_program",
    "rank_program",
    "rank_trajectory_path",
    "rebuild_rank_error",
    "run_iterate_loop",
    "run_on_ranks",
    "run_one_plan",
    "run_plan_loop",
    "run_plans",
    "run_plans_on_ranks",
    "scenario_passes",
    "shared_trajectory",
    "trajectory_from_json",
    "trajectory_to_json",
]

H = TypeVar("H", bound=Harness)

# -- several ranks -----------------------------------------------------------------------------


class Launcher(Protocol):
    """How a harness starts its ranks: `gradaccum_ddp.testing.launch` or one
    built on it (``launch_accelerate``, ``launch_fabric``, ``launch_lightning``)."""

    def __call__(
        self,
        target: Callable[..., None],
        world_size: int,
        *args: Any,
        timeout: float = ...,
        pg_timeout: float = ...,
    ) -> LaunchResult:
        """Run ``target(rank, world_size, *args)`` on ``world_size`` ranks."""
        ...


def rank_trajectory_path(workdir: Path, rank: int) -> Path:
    """Where rank ``rank`` of a run in ``workdir`` writes its result."""
    return workdir / f"trajectory.rank{rank}.json"


def rank_program(
    rank: int,
    world_size: int,
    run_rank: Callable[[H, Scenario, Path, int], Trajectory],
    harness: H,
    scenario: Scenario,
    workdir: str,
) -> None:
    """What each launched rank runs: ``run_rank(harness, scenario, workdir, rank)``,
    its trajectory (or the `GradAccumError` it raised: class name and message)
    written as JSON to `rank_trajectory_path`, atomically. Any other exception
    leaves no file (its traceback goes to the rank's stderr). ``run_rank`` must
    be a module-level function."""
    out = rank_trajectory_path(Path(workdir), rank)
    try:
        result: dict[str, Any] = {
            "trajectory": trajectory_to_json(run_rank(harness, scenario, Path(workdir), rank))
        }
    except gradaccum.errors.GradAccumError as exc:
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)


def rebuild_rank_error(error: dict[str, str], rank: int) -> BaseException:
    """The rank's `GradAccumError`, to raise again in the parent (same class, the
    message prefixed with ``(rank N)``); a ``RuntimeError`` naming the type when
    ``gradaccum.errors`` has no such class."""
    cls = getattr(gradaccum.errors, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, gradaccum.errors.GradAccumError):
        return cls(f"(rank {rank}) {error['message']}")
    return RuntimeError(f"rank {rank} raised {error['type']}: {error['message']}")


def collect_trajectories(
    name: str, world_size: int, workdir: Path, launched: LaunchResult
) -> list[dict[str, Any]]:
    """Every rank's trajectory (as JSON, rank order) that `rank_program` wrote.

    Raises:
        RuntimeError: a rank wrote nothing (it crashed or was killed; ``name``
            is the harness's, ``launched`` says how the ranks ended).
        GradAccumError: a rank raised one (the first such rank's, rebuilt by
            `rebuild_rank_error`).
    """
    results = []
    for rank in range(world_size):
        path = rank_trajectory_path(workdir, rank)
        if not path.exists():
            raise RuntimeError(
                f"{name}: rank {rank} wrote no trajectory ({launched}); its traceback is on stderr"
            )
        results.append(json.loads(path.read_text()))
    for rank, result in enumerate(results):
        if "error" in result:
            raise rebuild_rank_error(result["error"], rank)
    return [result["trajectory"] for result in results]


PER_RANK_STATS = ("items_in_window", "items_total")
"""Stats that are each rank's own outside ``items`` normalization."""


def shared_trajectory(trajectory: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    """What every rank must agree on, of a trajectory as JSON: everything but the
    probes' records (each rank's own measurements) and, outside ``items``
    normalization, the item counts (informational and each rank's own,
    ``docs/ddp.md``)."""
    trajectory = {k: v for k, v in trajectory.items() if k != "microbatches"}
    if scenario.config.normalization == "items":
        return trajectory
    stats = {k: v for k, v in trajectory["stats"].items() if k not in PER_RANK_STATS}
    return {**trajectory, "stats": stats}


def check_ranks_agree(name: str, trajectories: list[dict[str, Any]], scenario: Scenario) -> None:
    """Raise ``AssertionError`` unless every rank's trajectory (as JSON) has rank 0's
    `shared_trajectory`: ranks must agree on every decision."""
    first = shared_trajectory(trajectories[0], scenario)
    for rank, trajectory in enumerate(trajectories[1:], start=1):
        if shared_trajectory(trajectory, scenario) != first:
            raise AssertionError(
                f"{name}: rank {rank}'s trajectory differs from rank 0's "
                f"(parameters, learning rates, outcomes, counters or reductions): ranks "
                f"must agree on every decision"
            )


def run_on_ranks(
    harness: H,
    run_rank: Callable[[H, Scenario, Path, int], Trajectory],
    scenario: Scenario,
    workdir: Path,
    *,
    timeout: float,
    launcher: Launcher = launch,
) -> Trajectory:
    """Run ``scenario`` on ``scenario.world_size`` ranks started by ``launcher``
    (at most ``timeout`` seconds; 60 s for each collective), each calling
    ``run_rank(harness, scenario, workdir, rank)`` through `rank_program`, and
    return rank 0's trajectory once `collect_trajectories` and
    `check_ranks_agree` have passed. ``run_rank`` must be a module-level function
    and ``harness`` picklable."""
    launched = launcher(
        rank_program,
        scenario.world_size,
        run_rank,
        harness,
        scenario,
        str(workdir),
        timeout=timeout,
        pg_timeout=60.0,
    )
    trajectories = collect_trajectories(harness.name, scenario.world_size, workdir, launched)
    check_ranks_agree(harness.name, trajectories, scenario)
    return trajectory_from_json(trajectories[0])


# -- the trajectory as JSON ------------------------------------------------------------------


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


def _json_value(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) else value


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


# -- the scenario's data -----------------------------------------------------------------------


def scenario_passes(scenario: Scenario, rank: int) -> list[list[MicrobatchView]]:
    """Rank ``rank``'s views of ``scenario``, one list per pass (all made now: make
    them before a memory baseline)."""
    passes: list[list[MicrobatchView]] = [[] for _ in scenario.passes]
    for view in scenario.iter_microbatches(rank):
        passes[view.pass_index].append(view)
    return passes


def _stream(views: list[MicrobatchView]) -> Iterator[MicrobatchView]:
    yield from views


def pass_source(scenario: Scenario, views: list[MicrobatchView]) -> Iterable[MicrobatchView]:
    """What ``iterate`` is given for (the rest of) a pass: under ``pass_length ==
    "known"`` the list itself (``iterate`` sees ``len()`` and plans a short last
    window); under ``"last_only"`` a generator, so only the one-item look-ahead
    marks the last microbatch."""
    return views if scenario.pass_length == "known" else _stream(views)


def allowed_pass_reads(scenario: Scenario) -> int:
    """The host reads allowed before a pass's first microbatch (ACC-D6): the one
    comparison of a pass of known length on several ranks, else none."""
    return 1 if scenario.pass_length == "known" and scenario.world_size > 1 else 0


# -- the probes --------------------------------------------------------------------------------


class PendingRecord:
    """The probes' record of the last microbatch, held until the reads after it
    (the adapter's work between microbatches: ``end_pass``) are known.

    Attributes:
        record: the held microbatch: ``(boundary, reads, memory)``, or ``None``.
        carried: reads made before a pass's first microbatch, added to it.
    """

    def __init__(self, probes: MicrobatchProbes, recorder: TrajectoryRecorder) -> None:
        self.probes = probes
        self.recorder = recorder
        self.record: tuple[bool, HostReads | None, HeldMemory | None] | None = None
        self.carried: HostReads | None = None

    def hold(self, boundary: bool, reads: HostReads | None, memory: HeldMemory | None) -> None:
        """Hold a microbatch's record (with what was carried into it)."""
        if reads is not None and self.carried is not None:
            reads = self.carried + reads
        self.carried = None
        self.record = (boundary, reads, memory)

    def mark_boundary(self) -> None:
        """The held microbatch closed a window after all (the pass's end closed
        it): record it as a boundary, without a memory measurement."""
        if self.record is not None:
            _, reads, _ = self.record
            self.record = (True, reads, None)

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


class BucketKeepingCounter(ReductionCounter):
    """A `ReductionCounter` whose hook also keeps DDP's gradient buckets.

    Its Python communication hook gives each bucket a Python tensor, which torch
    then keeps alive with the bucket: the memory probe would count it as held
    between microbatches. The buckets are DDP's (the model's), not the adapter's,
    so a harness hands them to the probe to ignore (``bucket_buffers``).

    Args:
        model: the DDP model (before its first backward).
        acc: what reports the accumulator's own reductions
            (``add_reduction_observer``): a ``DDPAccumulator`` or an
            adapter's ``distributed``; ``None``: none counted.
    """

    def __init__(self, model: DistributedDataParallel, acc: Any = None) -> None:
        self.bucket_buffers: dict[int, torch.Tensor] = {}
        register = model.register_comm_hook

        def register_keeping(state: object, hook: Any) -> None:
            register(state, _keeping_hook)

        model.register_comm_hook = register_keeping  # type: ignore[method-assign]
        try:
            super().__init__(model, acc)
        finally:
            del model.register_comm_hook


def _keeping_hook(
    state: BucketKeepingCounter, bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    state.bucket_buffers[bucket.index()] = bucket.buffer()
    return _counting_hook(state, bucket)


# DDP checks a hook's annotations as objects (see gradaccum_ddp.testing).
_keeping_hook.__annotations__ = dict(_counting_hook.__annotations__)


class WindowReductions:
    """The gradient reductions of each window, when there is a counter.

    Args:
        counter: counts the DDP model's reductions; ``None`` (no DDP model: one
            process): nothing is counted and `take` gives ``None``.
    """

    def __init__(self, counter: BucketKeepingCounter | None = None) -> None:
        self.counter = counter

    @classmethod
    def of(cls, model: object, acc: Any = None) -> WindowReductions:
        """A `BucketKeepingCounter` on ``model`` when it is a
        ``DistributedDataParallel``, else none."""
        if isinstance(model, DistributedDataParallel):
            return cls(BucketKeepingCounter(model, acc))
        return cls()

    @property
    def bucket_buffers(self) -> dict[int, torch.Tensor]:
        """DDP's gradient buckets, for the memory probe to ignore (empty without a counter)."""
        return {} if self.counter is None else self.counter.bucket_buffers

    def take(self) -> int | None:
        """The reductions since the previous call; ``None`` without a counter."""
        return None if self.counter is None else self.counter.take()


# -- the iterate loop --------------------------------------------------------------------------


class IterateRun(Protocol):
    """One rank's objects for `run_iterate_loop`, fresh from the scenario's factories."""

    @property
    def acc(self) -> Any:
        """The accumulator under test (``iterate``, ``microbatch``, ``backward``,
        ``machine``, ``stats``)."""
        ...

    @property
    def module(self) -> torch.nn.Module:
        """The scenario's model itself (not a wrapper): what the recorder snapshots."""
        ...

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The scenario's optimizer itself: the recorder reads its learning rates."""
        ...

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The scenario's scheduler itself, if any."""
        ...

    def owners(self, recorder: TrajectoryRecorder) -> tuple[object, ...]:
        """What the memory probe ignores (the harness's and the framework's objects,
        ``recorder`` included; never the accumulator)."""
        ...

    def reductions(self) -> int | None:
        """The gradient reductions since the previous call (``None``: not counted)."""
        ...

    def microbatch(self, view: MicrobatchView) -> None:
        """One microbatch through the accumulator: its loss and outputs must die
        here, before any probe looks."""
        ...

    def save(self, path: Path) -> None:
        """Save a checkpoint of the run in ``path``."""
        ...

    def load(self, path: Path) -> None:
        """Resume this fresh run from the checkpoint in ``path``."""
        ...


R = TypeVar("R", bound=IterateRun)


def run_iterate_loop(
    start: Callable[[], R], scenario: Scenario, workdir: Path, rank: int
) -> Trajectory:
    """Run ``scenario`` as rank ``rank`` through the accumulator's ``iterate``.

    ``start()`` builds the rank's objects, once and again after each checkpoint
    (``scenario.checkpoint_after``: ``run.save`` into ``workdir / "checkpoint"``,
    then ``start()`` and ``load``; the run continues with the microbatch after it,
    in a fresh ``iterate`` when that is in the middle of a pass).

    With ``scenario.probes``, reads are counted over the whole loop, because
    ``iterate`` works between the microbatches: reads before a pass's first
    microbatch belong to it (less the one comparison of a pass of known length
    on several ranks, ACC-D6, `allowed_pass_reads`; a pass resumed after a
    checkpoint compares again), reads after a microbatch (the ``end_pass``
    inside ``iterate``) to that microbatch; checkpoints are not counted. The
    memory baseline is taken once every object and every view exists.
    """
    passes = scenario_passes(scenario, rank)
    run = start()
    recorder = TrajectoryRecorder(run.module)
    allowed = allowed_pass_reads(scenario)
    with MicrobatchProbes(scenario, *run.owners(recorder)) as probes:
        for views in passes:
            remaining = views
            while remaining:
                source = pass_source(scenario, remaining)
                resumed_at: int | None = None
                pending = PendingRecord(probes, recorder)
                with probes.counting():
                    for view in run.acc.iterate(source):
                        pending.flush(probes.take(), allowed)
                        windows = run.acc.machine.state.windows
                        steps = run.acc.stats.optimizer_steps
                        run.microbatch(view)
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
                            with probes.paused():  # what a checkpoint needs (ACC-D6)
                                run = _checkpoint_and_resume(start, run, workdir)
                            probes.track(*run.owners(recorder))
                            resumed_at = view.index_in_pass + 1
                            break
                pending.flush(probes.take())  # what the pass's end (inside iterate) read
                if resumed_at is None:
                    if views[-1].global_index == scenario.checkpoint_after:
                        run = _checkpoint_and_resume(start, run, workdir)
                        probes.track(*run.owners(recorder))
                    break
                remaining = views[resumed_at:]
    return recorder.finish(run.acc.stats, run.scheduler)


def _checkpoint_and_resume(start: Callable[[], R], run: R, workdir: Path) -> R:
    path = workdir / "checkpoint"
    run.save(path)
    del run
    fresh = start()
    fresh.load(path)
    return fresh


# -- planned runs (capability ``checkpoint_io``) -------------------------------------------------


def run_plan_loop(
    start: Callable[[], R], scenario: Scenario, rank: int, plan: CheckpointPlan
) -> Trajectory:
    """Run ``scenario`` as rank ``rank`` through the accumulator's ``iterate`` under
    ``plan`` (see `gradaccum_conformance.Harness.run_plan`): ``start()`` builds the
    rank's objects once; with ``plan.resume_from`` they load it (``acc.load``, the
    shared format) and the loop starts after ``plan.resume_after`` (the rest of
    its pass in a fresh ``iterate``); at each save point ``acc.save`` writes the
    shared format and the run goes on. No probes."""
    run = start()
    if plan.resume_from is not None:
        run.acc.load(plan.resume_from)
    recorder = TrajectoryRecorder(run.module)
    recorded = run.acc.machine.state.windows
    steps = run.acc.stats.optimizer_steps

    def record() -> None:
        nonlocal recorded, steps
        windows = run.acc.machine.state.windows
        if windows > recorded:
            recorder.window(
                run.module,
                run.optimizer,
                stepped=run.acc.stats.optimizer_steps > steps,
                reductions=run.reductions(),
            )
        recorded, steps = windows, run.acc.stats.optimizer_steps

    for views in scenario_passes(scenario, rank):
        remaining = [view for view in views if view.global_index >= plan.first]
        if not remaining:
            continue
        for view in run.acc.iterate(pass_source(scenario, remaining)):
            run.microbatch(view)
            record()
            path = plan.save_path(view.global_index)
            if path is not None and not view.is_last_in_pass:
                run.acc.save(path)
        record()  # a window the pass's end closed (inside iterate)
        path = plan.save_path(remaining[-1].global_index)
        if path is not None:
            run.acc.save(path)
    return recorder.finish(run.acc.stats, run.scheduler)


def _plan_result_path(workdir: Path, rank: int) -> Path:
    return workdir / f"planned.rank{rank}.json"


def plans_rank_program(
    rank: int,
    world_size: int,
    run_rank_plan: Callable[[H, Scenario, Path, int, CheckpointPlan], Trajectory],
    harness: H,
    runs: Sequence[PlannedRun],
) -> None:
    """What each launched rank runs for `run_plans_on_ranks`: every planned run in
    order, each result (trajectory, or the `GradAccumError` raised: class name and
    message) written as JSON into its own workdir. Any other exception stops the
    rank (its traceback goes to stderr; the runs left have no result)."""
    for planned in runs:
        planned.workdir.mkdir(parents=True, exist_ok=True)
        out = _plan_result_path(planned.workdir, rank)
        try:
            trajectory = run_rank_plan(
                harness, planned.scenario, planned.workdir, rank, planned.plan
            )
            result: dict[str, Any] = {"trajectory": trajectory_to_json(trajectory)}
        except gradaccum.errors.GradAccumError as exc:
            result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(out)


def run_plans_on_ranks(
    harness: H,
    run_rank_plan: Callable[[H, Scenario, Path, int, CheckpointPlan], Trajectory],
    runs: Sequence[PlannedRun],
    *,
    timeout: float,
    launcher: Launcher = launch,
) -> list[Trajectory | gradaccum.errors.GradAccumError]:
    """Every planned run (all of the same ``world_size``) on one launch of that many
    ranks (``launcher``; ``timeout`` seconds for all of them), each rank calling
    ``run_rank_plan(harness, scenario, workdir, rank, plan)`` run after run: rank 0's
    trajectory of each run once the ranks agree (`check_ranks_agree`), or the
    `GradAccumError` every rank raised (rebuilt by `rebuild_rank_error`).

    Raises:
        RuntimeError: a rank left a run without a result (it crashed or was killed),
            or the ranks disagree on whether a run raised.
    """
    if not runs:
        return []
    world = runs[0].scenario.world_size
    if any(planned.scenario.world_size != world for planned in runs):
        raise ValueError(f"{harness.name}: planned runs of one launch need one world_size")
    launched = launcher(
        plans_rank_program,
        world,
        run_rank_plan,
        harness,
        list(runs),
        timeout=timeout,
        pg_timeout=60.0,
    )
    results: list[Trajectory | gradaccum.errors.GradAccumError] = []
    for planned in runs:
        per_rank = []
        for rank in range(world):
            path = _plan_result_path(planned.workdir, rank)
            if not path.exists():
                raise RuntimeError(
                    f"{harness.name}: rank {rank} wrote no result for the run in "
                    f"{planned.workdir} ({launched}); its traceback is on stderr"
                )
            per_rank.append(json.loads(path.read_text()))
        errors = ["error" in result for result in per_rank]
        if all(errors):
            error = rebuild_rank_error(per_rank[0]["error"], 0)
            if not isinstance(error, gradaccum.errors.GradAccumError):
                raise error
            results.append(error)
            continue
        if any(errors):
            raise RuntimeError(
                f"{harness.name}: only ranks {[r for r, e in enumerate(errors) if e]} raised in "
                f"the run in {planned.workdir}: {[r.get('error') for r in per_rank]}"
            )
        trajectories = [result["trajectory"] for result in per_rank]
        check_ranks_agree(harness.name, trajectories, planned.scenario)
        results.append(trajectory_from_json(trajectories[0]))
    return results


def run_plans(
    harness: H,
    run_rank_plan: Callable[[H, Scenario, Path, int, CheckpointPlan], Trajectory],
    runs: Sequence[PlannedRun],
    *,
    timeout: float,
    launcher: Launcher = launch,
    one_rank: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> list[Trajectory | gradaccum.errors.GradAccumError]:
    """A harness's ``run_plans``: runs of several ranks on one launch
    (`run_plans_on_ranks`, ``timeout`` seconds plus 20 per run); runs of one rank here,
    one after the other, each inside ``one_rank()`` (the harness's one-process setup), a
    `GradAccumError` returned in the run's place."""
    if runs and runs[0].scenario.world_size > 1:
        return run_plans_on_ranks(
            harness, run_rank_plan, runs, timeout=timeout + 20.0 * len(runs), launcher=launcher
        )
    results: list[Trajectory | gradaccum.errors.GradAccumError] = []
    for planned in runs:
        try:
            with one_rank():
                results.append(
                    run_rank_plan(harness, planned.scenario, planned.workdir, 0, planned.plan)
                )
        except gradaccum.errors.GradAccumError as exc:
            results.append(exc)
    return results


def run_one_plan(
    harness: Harness, scenario: Scenario, workdir: Path, plan: CheckpointPlan
) -> Trajectory:
    """A harness's ``run_plan``: its ``run_plans`` on one run, raising the run's
    `GradAccumError` instead of returning it."""
    result = harness.run_plans([PlannedRun(scenario, workdir, plan)])[0]
    if isinstance(result, gradaccum.errors.GradAccumError):
        raise result
    return result
