"""The conformance harness of the Trainer callback (needs ``gradaccum-conformance``).

`LightningHarness` runs a conformance `Scenario` through the real
``lightning.pytorch.Trainer``: one ``Trainer.fit`` with
``GradAccum(config=scenario.config, model_attr="model")``, the way a user's
script does:

* the module (`ScenarioModule`) holds ``self.model = scenario.make_model()``;
  ``configure_optimizers`` returns the scenario's optimizer and, when the
  scenario has one, its scheduler as ``{"scheduler": ..., "interval":
  "step"}``; ``training_step`` returns ``{"loss": scenario.loss(...),
  "items": view.count}`` (the item count is informational outside
  ``items``; under ``items_on_device`` it is a 0-d tensor);
* the data: one Trainer epoch per scenario pass (``max_epochs =
  len(passes)``, ``reload_dataloaders_every_n_epochs=1``: passes may differ
  in length), each epoch's ``train_dataloader()`` a
  `gradaccum_lightning.testing.ListLoader` (``batch_size=None``, sized and
  stateful) when ``pass_length == "known"`` — GradAccum then plans a short
  last window from ``trainer.num_training_batches`` — or a
  `gradaccum_lightning.testing.StreamLoader` (an ``IterableDataset``: only
  Lightning's one-batch look-ahead tells the last batch) for
  ``"last_only"``;
* precision: ``float64`` as ``precision="64-true"``, ``float32`` as
  ``"32-true"``, ``bf16`` as ``"bf16-mixed"`` (Lightning's CPU autocast), and
  fp16 as ``plugins=[MixedPrecision("16-mixed", "cpu",
  scaler=scenario.make_scaler())]`` — ``precision="16-mixed"`` on a CPU
  silently becomes bf16 without a scaler, so the plugin is the one way to
  train fp16 with a GradScaler under the Trainer on a CPU;
* windows are recorded by a core listener (``on_step``/``on_skip``, passed as
  ``GradAccum(listeners=[...])``), which fires at the window's commit,
  *before* the optimizer step: the harness's callback records the
  parameters (``TrajectoryRecorder(module, prefix="model.")``) in
  ``on_train_batch_end``, after the step and the scheduler (and again in
  ``on_train_epoch_end``, after a window the pass end closed);
* ``checkpoint_after = i``: after microbatch ``i`` the harness's callback
  calls ``trainer.save_checkpoint(path)`` in ``on_train_batch_end`` (in
  ``on_train_epoch_end``, after GradAccum's ``end_pass``, when ``i`` ends its
  pass, as the contract says) and sets ``trainer.should_stop``; the harness
  checks that the Trainer stopped right there (no further microbatch), then
  builds a fresh module, ``GradAccum`` and ``Trainer`` and runs
  ``fit(module, ckpt_path=path)`` into the same recorder: the stateful loader
  resumes at microbatch ``i + 1`` (checked: the two fits together run every
  microbatch once, in order);
* ``world_size > 1``: that many spawned processes
  (`gradaccum_lightning.testing.launch_lightning`: torchrun's environment,
  gloo on loopback), ``Trainer(strategy="ddp", devices=world_size,
  use_distributed_sampler=False)``, rank ``r`` feeding
  ``iter_microbatches(rank=r)``; reductions are counted per window by a
  `gradaccum_ddp.testing.ReductionCounter` on ``trainer.strategy.model``
  registered in ``on_fit_start`` (after GradAccum's). Each rank writes its
  trajectory as JSON; ranks must agree (as in `gradaccum_ddp.harness`; the
  launch, the comparison and the probes' bookkeeping are
  `gradaccum_ddp.harness_support`'s).
* probes (``scenario.probes``): host reads are counted over the whole fit and
  attributed to microbatches: a microbatch's are those from its
  ``on_train_batch_start`` to its ``on_train_batch_end`` (the wrapped
  ``training_step``: forward, backward, the boundary and Lightning's
  optimizer step), plus GradAccum's ``on_train_epoch_start`` (the first
  microbatch of a pass, less the one comparison of a pass of known length on
  several ranks, ACC-D6) and ``on_train_epoch_end`` (the last microbatch of
  the pass: ``end_pass``). Lightning's own reads between batches (on
  several ranks its SIGTERM broadcast reads a flag before every batch) are
  not the adapter's and are not counted. Memory is measured after each
  microbatch against a baseline taken in ``on_train_start``, ignoring the
  user's model, the optimizer, the scaler, the recorder and DDP's gradient
  buckets; Lightning's own per-batch bookkeeping (the detached loss it
  keeps) counts against the adapter. Under fp16 a boundary reads twice
  (GradAccum's verdict, then ``scaler.step`` inside Lightning's plugin):
  ``test_host_reads_only_at_the_boundary[fp16-*]`` are expected failures.

Use it with the suite::

    pytest --pyargs gradaccum_conformance \\
        --gradaccum-harness=gradaccum_lightning.harness:LightningHarness
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import MixedPrecision

import gradaccum.errors
from gradaccum.stats import AccumulationCallback, AccumulationStats
from gradaccum_conformance import (
    CheckpointPlan,
    Harness,
    MicrobatchProbes,
    MicrobatchView,
    PlannedRun,
    Scenario,
    Trajectory,
    TrajectoryRecorder,
)
from gradaccum_ddp.harness_support import (
    BucketKeepingCounter,
    PendingRecord,
    WindowReductions,
    allowed_pass_reads,
    run_on_ranks,
    run_one_plan,
    run_plans,
    scenario_passes,
)
from gradaccum_lightning.callback import GradAccum
from gradaccum_lightning.testing import (
    ListLoader,
    StreamLoader,
    launch_lightning,
    quiet_lightning,
    quiet_trainer_kwargs,
)

__all__ = ["LightningHarness", "ScenarioModule", "run_rank", "run_rank_plan"]

_PRECISION = {"float64": "64-true", "float32": "32-true", "bf16": "bf16-mixed"}

_FP16_SECOND_READ = (
    "ACC-B4 under Lightning's fp16 plugin: GradAccum steps through LightningOptimizer.step(), "
    "whose MixedPrecision.optimizer_step calls scaler.step(), and GradScaler._maybe_opt_step reads "
    "the found-inf flag (Tensor.item, lightning/pytorch/plugins/precision/amp.py:95) after the "
    "boundary's own read: two host reads per fp16 boundary"
)


class ScenarioModule(pl.LightningModule):
    """The scenario's model as a plain automatic-optimization LightningModule.

    ``passes[p]`` are the views of epoch ``p`` for this rank; ``known``: a
    sized, stateful loader (else an ``IterableDataset``).
    """

    def __init__(
        self, scenario: Scenario, passes: list[list[MicrobatchView]], *, known: bool
    ) -> None:
        super().__init__()
        self.scenario = scenario
        self.passes = passes
        self.known = known
        self.model = scenario.make_model().to(scenario.device)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, count = batch
        loss = self.scenario.loss(self.model(x), y)
        return {"loss": loss, "items": count}

    def configure_optimizers(self) -> Any:
        optimizer = self.scenario.make_optimizer(self)
        scheduler = self.scenario.make_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def train_dataloader(self) -> Any:
        epoch = self.trainer.current_epoch
        batches = [(v.x, v.y, v.count) for v in self.passes[epoch]]
        return ListLoader(batches, tag=epoch) if self.known else StreamLoader(batches)


class _Windows(AccumulationCallback):
    """The core listener: each closed window's outcome, at its commit (before the
    optimizer step), until the harness records the window after the step."""

    def __init__(self) -> None:
        self.closed: list[bool] = []

    def on_step(self, stats: AccumulationStats) -> None:
        self.closed.append(True)

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        self.closed.append(False)


class _Run:
    """What one rank's run shares across the first fit and the resumed one."""

    def __init__(self, scenario: Scenario, rank: int, workdir: Path) -> None:
        self.scenario = scenario
        self.rank = rank
        self.workdir = workdir
        self.passes = scenario_passes(scenario, rank)
        self.offsets = [sum(len(p) for p in self.passes[:i]) for i in range(len(self.passes))]
        self.windows = _Windows()
        self.recorder: TrajectoryRecorder | None = None
        self.probes: MicrobatchProbes | None = None
        self.pending: PendingRecord | None = None
        self.counter = WindowReductions()
        self.seen: list[int] = []
        self.stopped_after: int | None = None
        self.checkpoint: Path | None = None
        self.allowed = allowed_pass_reads(scenario)  # ACC-D6


class _BeforeGradAccum(pl.Callback):
    """Placed before GradAccum: what was read since the last take is Lightning's."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._discard()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        run = self.run
        if run.probes is not None and run.pending is not None:
            run.probes.take()  # Lightning's loop between two batches
            run.pending.flush(None)  # the previous microbatch's record is complete

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._discard()

    def _discard(self) -> None:
        if self.run.probes is not None:
            self.run.probes.take()


class _Driver(pl.Callback):
    """Placed after GradAccum: records windows and probes, takes the checkpoint."""

    def __init__(self, run: _Run, module: ScenarioModule) -> None:
        self.run = run
        self.module = module

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run
        if run.scenario.world_size > 1:
            acc = GradAccum.of(trainer).accumulator
            counter = BucketKeepingCounter(trainer.strategy.model, acc.distributed)  # type: ignore[arg-type]
            run.counter = WindowReductions(counter)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run
        if run.probes is None:
            return
        # Every object exists now (and a resumed window is restored): the baseline.
        run.probes.track(*self._owners(trainer))
        if run.probes.memory is not None:
            run.probes.memory.baseline()
        run.probes.take()

    def _owners(self, trainer: pl.Trainer) -> tuple[object, ...]:
        """What the memory probe ignores: the user's model (its parameters and
        gradients), the optimizer, the scaler, the recorder's snapshots and DDP's
        buckets. Not the LightningModule or the Trainer: they reach the callback."""
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        buckets = self.run.counter.bucket_buffers
        return (self.module.model, trainer.optimizers[0], scaler, self.run.recorder, buckets)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run
        if run.probes is not None and run.pending is not None:
            run.pending.flush(run.probes.take(), run.allowed)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        run = self.run
        index = run.offsets[trainer.current_epoch] + batch_idx
        run.seen.append(index)
        probes = run.probes
        reads = probes.take() if probes is not None else None
        boundary = self._record_windows(trainer)
        if probes is not None and run.pending is not None:
            with probes.paused():
                run.pending.hold(boundary, reads, probes.measure(boundary))
        view = run.passes[trainer.current_epoch][batch_idx]
        if index == run.scenario.checkpoint_after and not view.is_last_in_pass:
            self._checkpoint(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run
        if run.stopped_after is not None:
            return
        closed = self._record_windows(trainer)
        if run.probes is not None and run.pending is not None:
            if closed:
                run.pending.mark_boundary()
            run.pending.flush(run.probes.take())
        last = run.offsets[trainer.current_epoch] + len(run.passes[trainer.current_epoch]) - 1
        if last == run.scenario.checkpoint_after and run.seen and run.seen[-1] == last:
            self._checkpoint(trainer)

    def _record_windows(self, trainer: pl.Trainer) -> bool:
        """Record the windows the listener saw close, now that they have stepped."""
        run = self.run
        closed, run.windows.closed = run.windows.closed, []
        assert run.recorder is not None
        for stepped in closed:
            run.recorder.window(
                self.module,
                trainer.optimizers[0],
                stepped=stepped,
                reductions=run.counter.take(),
            )
        return bool(closed)

    def _checkpoint(self, trainer: pl.Trainer) -> None:
        run = self.run
        path = run.workdir / "checkpoint.ckpt"
        if run.probes is not None:
            with run.probes.paused():
                trainer.save_checkpoint(path)
        else:
            trainer.save_checkpoint(path)
        run.checkpoint = path
        run.stopped_after = run.seen[-1]
        trainer.should_stop = True


class LightningHarness(Harness):
    """gradaccum-lightning's ``GradAccum`` callback under the conformance suite."""

    name = "gradaccum-lightning"
    capabilities = frozenset(
        {
            "amp_fp16",
            "amp_bf16",
            "checkpoint",
            "checkpoint_mid_window",
            "offload",
            "fp32_accumulation",
            "per_microbatch_clip",
            "drop_microbatch",
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
    expected_failures = MappingProxyType(
        {
            f"test_host_reads_only_at_the_boundary[fp16-{probe}]": _FP16_SECOND_READ
            for probe in ("mean", "items_device", "clip_norm", "distributed")
        }
    )
    timeout: ClassVar[float] = 180.0
    """Seconds a multi-process run may take before its ranks are killed."""

    def callback(self, scenario: Scenario, listener: AccumulationCallback) -> GradAccum:
        """The callback under test (meta-tests override it with broken ones)."""
        return GradAccum(config=scenario.config, model_attr="model", listeners=[listener])

    def trainer_kwargs(self, scenario: Scenario) -> dict[str, Any]:
        """The ``Trainer`` arguments for ``scenario`` (see the module docstring)."""
        if scenario.device != "cpu":
            raise NotImplementedError(f"{self.name}: the harness runs on the CPU only")
        kwargs = quiet_trainer_kwargs(
            max_epochs=len(scenario.passes),
            reload_dataloaders_every_n_epochs=1,
            use_distributed_sampler=False,
        )
        if scenario.precision == "fp16":
            kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scenario.make_scaler())]
        else:
            kwargs["precision"] = _PRECISION[scenario.precision]
        if scenario.world_size > 1:
            kwargs.update(strategy="ddp", devices=scenario.world_size)
        return kwargs

    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        if scenario.world_size == 1:
            return run_rank(self, scenario, workdir, rank=0)
        return run_on_ranks(
            self, run_rank, scenario, workdir, timeout=self.timeout, launcher=launch_lightning
        )

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        """``scenario`` under ``plan`` (see `gradaccum_conformance.Harness.run_plan`),
        one ``Trainer.fit``: checkpoints through ``GradAccum.save(dir)`` (the shared
        format) from the harness's callback, a resume through
        ``GradAccum(resume=dir)``, with loaders that start at the microbatch after
        ``plan.resume_after`` (the rest of its pass is the first epoch)."""
        return run_one_plan(self, scenario, workdir, plan)

    def run_plans(
        self, runs: Sequence[PlannedRun]
    ) -> list[Trajectory | gradaccum.errors.GradAccumError]:
        """Runs on one process here; runs on several ranks in one launch."""
        return run_plans(self, run_rank_plan, runs, timeout=self.timeout, launcher=launch_lightning)


def _module(run: _Run) -> ScenarioModule:
    return ScenarioModule(run.scenario, run.passes, known=run.scenario.pass_length == "known")


def _fit(
    harness: LightningHarness, run: _Run, module: ScenarioModule, ckpt_path: Path | None
) -> tuple[pl.Trainer, GradAccum]:
    scenario = run.scenario
    callback = harness.callback(scenario, run.windows)
    driver = _Driver(run, module)
    trainer = pl.Trainer(
        callbacks=[_BeforeGradAccum(run), callback, driver], **harness.trainer_kwargs(scenario)
    )
    trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer, callback


def run_rank(harness: LightningHarness, scenario: Scenario, workdir: Path, rank: int) -> Trajectory:
    """Run ``scenario`` as rank ``rank`` (of a process group `launch_lightning`
    made, when ``world_size > 1``) through ``Trainer.fit``; see the module
    docstring."""
    run = _Run(scenario, rank, workdir)
    module = _module(run)
    run.recorder = recorder = TrajectoryRecorder(module, prefix="model.")
    with quiet_lightning():
        if scenario.probes:
            run.probes = MicrobatchProbes(scenario)
            run.pending = PendingRecord(run.probes, recorder)
        try:
            with run.probes.counting() if run.probes is not None else contextlib.nullcontext():
                trainer, callback = _fit(harness, run, module, None)
                if run.stopped_after is not None:
                    _check_stopped(run)
                    run.stopped_after = None
                    del trainer, callback, module
                    trainer, callback = _fit(harness, run, _module(run), run.checkpoint)
                if run.pending is not None and run.probes is not None:
                    run.pending.flush(run.probes.take())
        finally:
            if run.probes is not None:
                run.probes.close()
    expected = scenario.total_microbatches
    if run.seen != list(range(expected)):
        raise AssertionError(
            f"{harness.name}: the Trainer ran microbatches {run.seen}, not 0..{expected - 1} "
            f"(a resume must continue with the microbatch after the checkpoint)"
        )
    configs = trainer.lr_scheduler_configs
    scheduler = configs[0].scheduler if configs else None
    return recorder.finish(callback.stats, scheduler)


def _check_stopped(run: _Run) -> None:
    """``trainer.should_stop`` set in the checkpoint's hook must stop the Trainer
    right there: no microbatch may run after the checkpoint."""
    if run.seen[-1] != run.stopped_after or run.seen != list(range(run.seen[-1] + 1)):
        raise AssertionError(
            f"the checkpoint was taken after microbatch {run.stopped_after} and "
            f"trainer.should_stop set, but the Trainer ran microbatches {run.seen}"
        )


class _PlanDriver(pl.Callback):
    """Placed after GradAccum in a planned run: starts the recorder once a resume
    is loaded, records windows, writes the plan's shared-format checkpoints."""

    def __init__(
        self,
        passes: list[list[MicrobatchView]],
        windows: _Windows,
        module: ScenarioModule,
        plan: CheckpointPlan,
        world_size: int,
    ) -> None:
        self.passes = passes
        self.windows = windows
        self.module = module
        self.plan = plan
        self.world_size = world_size
        self.counter = WindowReductions()
        self.recorder: TrajectoryRecorder | None = None
        self.seen: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.world_size > 1:
            acc = GradAccum.of(trainer).accumulator
            counter = BucketKeepingCounter(trainer.strategy.model, acc.distributed)  # type: ignore[arg-type]
            self.counter = WindowReductions(counter)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # GradAccum's on_train_start (before this callback) loaded the resume.
        self.recorder = TrajectoryRecorder(self.module, prefix="model.")

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        view = self.passes[trainer.current_epoch][batch_idx]
        self.seen.append(view.global_index)
        self._record(trainer)
        path = self.plan.save_path(view.global_index)
        if path is not None and not view.is_last_in_pass:
            GradAccum.of(trainer).save(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)
        path = self.plan.save_path(self.passes[trainer.current_epoch][-1].global_index)
        if path is not None:
            GradAccum.of(trainer).save(path)

    def _record(self, trainer: pl.Trainer) -> None:
        closed, self.windows.closed = self.windows.closed, []
        assert self.recorder is not None
        for stepped in closed:
            self.recorder.window(
                self.module,
                trainer.optimizers[0],
                stepped=stepped,
                reductions=self.counter.take(),
            )


def run_rank_plan(
    harness: LightningHarness, scenario: Scenario, workdir: Path, rank: int, plan: CheckpointPlan
) -> Trajectory:
    """Run ``scenario`` under ``plan`` as rank ``rank`` through one ``Trainer.fit``
    (see `LightningHarness.run_plan`)."""
    passes = [
        [view for view in views if view.global_index >= plan.first]
        for views in scenario_passes(scenario, rank)
    ]
    passes = [views for views in passes if views]
    module = ScenarioModule(scenario, passes, known=scenario.pass_length == "known")
    windows = _Windows()
    callback = harness.callback(scenario, windows)
    if plan.resume_from is not None:
        callback.resume = os.fspath(plan.resume_from)
    driver = _PlanDriver(passes, windows, module, plan, scenario.world_size)
    kwargs = harness.trainer_kwargs(scenario)
    kwargs["max_epochs"] = len(passes)
    with quiet_lightning():
        trainer = pl.Trainer(callbacks=[callback, driver], **kwargs)
        trainer.fit(module)
    expected = [view.global_index for views in passes for view in views]
    if driver.seen != expected:
        raise AssertionError(
            f"{harness.name}: the Trainer ran microbatches {driver.seen}, not {expected}"
        )
    assert driver.recorder is not None
    configs = trainer.lr_scheduler_configs
    scheduler = configs[0].scheduler if configs else None
    return driver.recorder.finish(callback.stats, scheduler)
