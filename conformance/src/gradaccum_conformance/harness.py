"""The harness protocol: what an adapter provides to be tested.

A harness runs a whole `Scenario`
through an adapter's real public API and returns a `Trajectory`.
Because it receives the whole scenario (not per-step callbacks), frameworks
that own the training loop (``Trainer.fit``, ``accelerator.prepare``) can
implement it as easily as a plain loop.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor, nn

from gradaccum import AccumulationStats
from gradaccum.errors import GradAccumError
from gradaccum_conformance.promises import CAPABILITIES
from gradaccum_conformance.scenario import Scenario

__all__ = [
    "CHECKPOINT_IO",
    "CheckpointPlan",
    "Harness",
    "MicrobatchRecord",
    "Outcome",
    "PlannedRun",
    "Trajectory",
    "TrajectoryRecorder",
    "load_harness",
    "snapshot_params",
]

Outcome: TypeAlias = Literal["stepped", "skipped"]
"""What a closed window did: the optimizer stepped, or the step was skipped
(AMP overflow, non-finite gradient, empty window)."""


CHECKPOINT_IO = "checkpoint_io"
"""The capability of a harness that implements `Harness.run_plan`: it saves a
shared-format checkpoint (``spec/checkpoint-v1.md``) at given points of a run
and starts a run from one, through its adapter's public API. The cross-stack
matrix (`gradaccum_conformance.crossstack`) runs only harnesses that declare it."""


@dataclass(frozen=True)
class CheckpointPlan:
    """Where a run writes shared-format checkpoints, and what it starts from.

    Attributes:
        save: ``(i, directory)`` pairs: after the backward of global microbatch
            ``i`` (and after its pass ended, if it is the last of its pass), write
            a checkpoint of the whole run (accumulation state, every rank's
            in-flight gradients, model, optimizer, scheduler, scaler) into
            ``directory`` through the adapter's *shared-format* save, and go on
            with the same objects: saving never changes the run.
        resume_from: a shared-format checkpoint directory, written by any stack:
            build fresh objects from the scenario, load it through the adapter's
            public API, then run only the microbatches after ``resume_after``.
        resume_after: the global index of the last microbatch the checkpoint
            holds (required with ``resume_from``).
    """

    save: tuple[tuple[int, Path], ...] = ()
    resume_from: Path | None = None
    resume_after: int | None = None

    def __post_init__(self) -> None:
        if (self.resume_from is None) != (self.resume_after is None):
            raise ValueError(
                f"CheckpointPlan: resume_from={self.resume_from!r} and "
                f"resume_after={self.resume_after!r} go together"
            )
        if self.resume_after is not None and any(i <= self.resume_after for i, _ in self.save):
            raise ValueError(
                f"CheckpointPlan: save points {[i for i, _ in self.save]} must come after "
                f"resume_after={self.resume_after}"
            )

    @property
    def first(self) -> int:
        """The global index of the run's first microbatch (0, or ``resume_after + 1``)."""
        return 0 if self.resume_after is None else self.resume_after + 1

    def save_path(self, index: int) -> Path | None:
        """Where to save after global microbatch ``index`` (``None``: nowhere)."""
        for i, path in self.save:
            if i == index:
                return path
        return None


@dataclass(frozen=True)
class PlannedRun:
    """One `Harness.run_plan` call: ``scenario`` run in ``workdir`` under ``plan``."""

    scenario: Scenario
    workdir: Path
    plan: CheckpointPlan


def snapshot_params(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """``{name: parameter}`` cloned to CPU float64, names relative to ``prefix``.

    A harness whose framework wraps the scenario's model (``self.model`` in
    a LightningModule, say) passes that wrapper's prefix (``"model."``) so the
    names are the scenario model's own: ``0.weight``, ``0.bias``, ...
    """
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        if prefix and not name.startswith(prefix):
            continue
        out[name[len(prefix) :]] = param.detach().to(device="cpu", dtype=torch.float64).clone()
    return out


@dataclass(frozen=True)
class MicrobatchRecord:
    """What the probes saw around one microbatch (`gradaccum_conformance.probes`).

    Attributes:
        boundary: a window closed in this microbatch (or in the ``end_pass``
            that followed it).
        host_reads: device-to-host reads made while the adapter ran this
            microbatch (its ``microbatch`` block, and the ``end_pass`` after
            it); ``None`` when not measured.
        extra_bytes: after a microbatch that is not a boundary, the bytes of
            tensor memory held beyond what was held before the first
            microbatch, the parameters, their gradients, the optimizer's
            state and what the harness told the probe to ignore; ``None``
            when not measured (and at boundaries).
        notes: where the reads happened and which tensors were extra, for
            failure messages.
    """

    boundary: bool
    host_reads: int | None = None
    extra_bytes: int | None = None
    notes: tuple[str, ...] = ()


@dataclass
class Trajectory:
    """What a run did, window by window.

    Attributes:
        initial_params: parameters before the first microbatch.
        params: parameters after every closed window (every optimizer step
            *attempt*, stepped or skipped), in order. Partial windows
            discarded by ``partial_window='drop'`` are not closed windows.
        lrs: the learning rate of every optimizer parameter group after each
            closed window (after the scheduler stepped, if it did).
        outcomes: ``"stepped"`` or ``"skipped"`` for each closed window.
        micro_steps / optimizer_steps / skipped_steps: final counters.
        stats: the adapter's final ``AccumulationStats.as_dict()``.
        scheduler_steps: ``scheduler.last_epoch`` at the end (``None``
            without a scheduler).
        reductions_per_window: gradient communications in each closed window
            (distributed harnesses; ``None`` if not counted).
        microbatches: one `MicrobatchRecord` per microbatch, in order,
            from harnesses that record probes (empty otherwise).
    """

    initial_params: dict[str, Tensor]
    params: list[dict[str, Tensor]] = field(default_factory=list)
    lrs: list[tuple[float, ...]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    micro_steps: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    scheduler_steps: int | None = None
    reductions_per_window: list[int] | None = None
    microbatches: list[MicrobatchRecord] = field(default_factory=list)


class TrajectoryRecorder:
    """Builds a `Trajectory` while a harness runs.

    Create it with the freshly built model, call `window` after every
    closed window (after the optimizer and the scheduler stepped or were
    skipped), and `finish` at the end. One recorder spans a checkpoint
    and resume: pass the *new* model and optimizer after resuming. A harness
    that declares the ``probes`` capability also calls `microbatch`
    after every microbatch (`MicrobatchProbes`
    does it).
    """

    def __init__(self, model: nn.Module, *, prefix: str = "") -> None:
        self.prefix = prefix
        self.trajectory = Trajectory(initial_params=snapshot_params(model, prefix))

    def window(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        stepped: bool,
        reductions: int | None = None,
    ) -> None:
        """Record one closed window."""
        t = self.trajectory
        t.params.append(snapshot_params(model, self.prefix))
        t.lrs.append(tuple(float(g["lr"]) for g in optimizer.param_groups))
        t.outcomes.append("stepped" if stepped else "skipped")
        if reductions is not None:
            if t.reductions_per_window is None:
                t.reductions_per_window = []
            t.reductions_per_window.append(reductions)

    def microbatch(
        self,
        boundary: bool,
        host_reads: int | None = None,
        extra_bytes: int | None = None,
        notes: tuple[str, ...] | list[str] = (),
    ) -> None:
        """Record the probes of one microbatch (see `MicrobatchRecord`)."""
        self.trajectory.microbatches.append(
            MicrobatchRecord(
                boundary=bool(boundary),
                host_reads=host_reads,
                extra_bytes=extra_bytes,
                notes=tuple(notes),
            )
        )

    def finish(
        self,
        stats: AccumulationStats | Mapping[str, Any],
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> Trajectory:
        """Fill in the counters and stats (from ``stats``) and the scheduler
        step count (``scheduler.last_epoch``); return the trajectory."""
        data = stats.as_dict() if isinstance(stats, AccumulationStats) else dict(stats)
        t = self.trajectory
        t.stats = data
        t.micro_steps = int(data["micro_steps"])
        t.optimizer_steps = int(data["optimizer_steps"])
        t.skipped_steps = int(data["skipped_steps"])
        t.scheduler_steps = None if scheduler is None else int(scheduler.last_epoch)
        return t


class Harness(abc.ABC):
    """An adapter under test. Subclass it, set the three attributes and
    implement `run`.

    Attributes:
        name: the adapter's name, shown in the report header, messages and
            the JSON report (e.g. ``"gradaccum-torch"``).
        capabilities: optional features the adapter supports, from
            `CAPABILITIES`. A test
            that needs one not declared is *skipped*, with the reason
            ``harness X does not declare capability Y``.
        expected_failures: ``{test name: reason}`` — tests known to fail for
            this adapter. They are marked ``xfail(strict=True)``: an
            unexpected pass fails, so the list cannot go stale. A key is a
            test function name (``"test_partial_carry"``) or a full
            parametrized name (``"test_partial_carry[float32]"``).
    """

    name: str = "unnamed-harness"
    capabilities: frozenset[str] = frozenset()
    expected_failures: Mapping[str, str] = MappingProxyType({})

    @abc.abstractmethod
    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        """Run ``scenario`` through the adapter's public API; return the trajectory.

        The contract:

        * Build fresh objects from the scenario: ``model =
          scenario.make_model().to(scenario.device)``, ``optimizer =
          scenario.make_optimizer(model)``, ``scheduler =
          scenario.make_scheduler(optimizer)`` (may be ``None``),
          ``scaler = scenario.make_scaler()`` (``None`` unless fp16). Give
          the adapter ``scenario.config``.
        * For each view in ``scenario.iter_microbatches(rank)``: run the
          forward under ``scenario.autocast()``, compute
          ``scenario.loss(model(view.x), view.y)`` and let the adapter
          backward it, telling it ``view.items``. Tell it where passes end:
          the pass length (``view.remaining_in_pass``) when
          ``scenario.pass_length == "known"``, otherwise only
          ``view.is_last_in_pass``. End each pass as the adapter's API says.
        * The adapter decides everything else (scaling, syncing, clipping,
          weights, stepping the optimizer, the scheduler and the scaler).
        * Record every closed window with `TrajectoryRecorder.window`
          after its step or skip; finish with `TrajectoryRecorder.finish`
          and the adapter's stats.
        * ``non_finite="raise"``: let ``NonFiniteGradientError`` propagate.
        * ``scenario.checkpoint_after = i``: after the backward of global
          microbatch ``i`` (and after ending its pass, if ``i`` is the last
          microbatch of a pass), save a checkpoint under ``workdir`` through the
          adapter's API, drop every object (model, optimizer, scheduler,
          scaler, adapter), build fresh ones from the scenario, load the
          checkpoint and continue with microbatch ``i + 1``, recording into
          the same recorder. The trajectory covers the whole run.
        * ``scenario.world_size > 1``: run one process (or replica) per rank,
          rank ``r`` feeding ``iter_microbatches(rank=r)``; return rank 0's
          trajectory with ``reductions_per_window`` counted.
        * ``scenario.items_on_device`` (capability ``device_items``): give the
          adapter ``view.count`` (a 0-d device tensor) instead of ``view.items``.
        * ``scenario.probes`` (capability ``probes``): measure each microbatch
          and record it with `TrajectoryRecorder.microbatch`, through
          `MicrobatchProbes` (build it
          once the objects exist, before the first microbatch; count reads
          around the ``microbatch`` block and the ``end_pass`` that follows
          it, not around the recording).
        * Never modify the scenario's tensors.
        """

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        """Run ``scenario`` under ``plan`` (capability ``checkpoint_io``); see `CheckpointPlan`.

        As `run`, with three differences: ``scenario.checkpoint_after`` and
        ``scenario.probes`` are not used; at each of ``plan.save``'s points the
        harness writes a shared-format checkpoint and goes on with the same
        objects; with ``plan.resume_from`` it builds fresh objects, loads that
        checkpoint through the adapter's public API (which may raise a
        `GradAccumError`, e.g. a `CheckpointMismatchError` for a mid-window
        checkpoint of another world size, ACC-R5) and runs only the microbatches
        after ``plan.resume_after``. The trajectory then starts at the loaded
        parameters and records the windows closed after the resume; its counters
        and stats are the adapter's final ones (which include the checkpoint's).
        """
        raise NotImplementedError(
            f"harness {self.name!r} does not implement run_plan (capability {CHECKPOINT_IO!r})"
        )

    def run_plans(self, runs: Sequence[PlannedRun]) -> list[Trajectory | GradAccumError]:
        """Every `PlannedRun` in order: its trajectory, or the `GradAccumError` it raised.

        The default calls `run_plan` once per run. A harness that launches
        processes overrides it to run them all in one launch (every run must then
        have the same ``world_size``).
        """
        results: list[Trajectory | GradAccumError] = []
        for planned in runs:
            try:
                results.append(self.run_plan(planned.scenario, planned.workdir, planned.plan))
            except GradAccumError as exc:
                results.append(exc)
        return results


def load_harness(spec: str) -> Harness:
    """Load ``"package.module:Name"``: a `Harness` subclass (built
    with no arguments), a callable returning a harness, or an instance."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--gradaccum-harness={spec!r} must look like 'package.module:HarnessClass'"
        )
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    harness = obj if isinstance(obj, Harness) else obj()
    if not isinstance(harness, Harness):
        raise TypeError(
            f"--gradaccum-harness={spec!r} gave {harness!r}, which is not a "
            f"gradaccum_conformance.Harness"
        )
    return harness


def check_harness(harness: Harness) -> None:
    """Raise ``TypeError`` naming the problem if ``harness`` declares an
    unknown capability (a typo would silently skip tests)."""
    unknown = sorted(set(harness.capabilities) - set(CAPABILITIES) - {CHECKPOINT_IO})
    if unknown:
        raise TypeError(
            f"harness {harness.name!r} declares unknown capabilities {unknown}; "
            f"the known ones are {sorted(CAPABILITIES)}"
        )
