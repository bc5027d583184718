"""The conformance harness of gradaccum-torch.

It runs each scenario of ``gradaccum-conformance`` through the public API a
user calls — ``Accumulator``, ``microbatch()``, ``backward()``, ``end_pass()``,
``save()`` / ``load()`` — and nothing else. Needs ``gradaccum-conformance``::

    pytest --pyargs gradaccum_conformance --gradaccum-harness=gradaccum_torch.testing:TorchHarness
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradaccum_conformance import (
    CheckpointPlan,
    Harness,
    MicrobatchProbes,
    MicrobatchView,
    Scenario,
    Trajectory,
    TrajectoryRecorder,
)
from gradaccum_torch.accumulator import Accumulator

__all__ = ["TorchHarness"]


class TorchHarness(Harness):
    """``gradaccum-torch`` under the conformance suite (one process)."""

    name = "gradaccum-torch"
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
            "cuda",
            "device_items",
            "probes",
            "checkpoint_io",
        }
    )

    @staticmethod
    def _build(
        scenario: Scenario,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Accumulator]:
        model = scenario.make_model().to(scenario.device)
        optimizer = scenario.make_optimizer(model)
        accumulator = Accumulator(
            model,
            optimizer,
            config=scenario.config,
            scheduler=scenario.make_scheduler(optimizer),
            scaler=scenario.make_scaler(),
        )
        return model, optimizer, accumulator

    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        """Run ``scenario`` through the public API; see `Harness.run`.

        Probes (``scenario.probes``): the reads of each ``microbatch`` block
        and of the ``end_pass`` after it are counted; the memory held after
        each microbatch is measured against a baseline taken before the first
        one, ignoring the model, the optimizer, the scaler and the recorder.
        """
        views = list(scenario.iter_microbatches())  # the data exists before the baseline
        model, optimizer, acc = self._build(scenario)
        recorder = TrajectoryRecorder(model)
        probes = MicrobatchProbes(scenario, model, optimizer, acc.scaler, recorder)
        known = scenario.pass_length == "known"

        def record(before_steps: int, before_windows: int) -> None:
            state = acc.machine.state
            if state.windows > before_windows:
                recorder.window(model, optimizer, stepped=state.optimizer_steps > before_steps)

        with probes:
            for view in views:
                state = acc.machine.state
                steps, windows, closed_before = state.optimizer_steps, state.windows, state.windows
                with probes.counting():
                    _microbatch(acc, model, scenario, view, known)
                record(steps, windows)
                if view.is_last_in_pass:
                    state = acc.machine.state
                    steps, windows = state.optimizer_steps, state.windows
                    with probes.counting():
                        acc.end_pass()
                    record(steps, windows)
                probes.record(recorder, boundary=acc.machine.state.windows > closed_before)
                if view.global_index == scenario.checkpoint_after:
                    acc.save(workdir / "checkpoint")
                    model, optimizer, acc = self._build(scenario)
                    acc.load(workdir / "checkpoint")
                    probes.track(model, optimizer, acc.scaler, recorder)
        return recorder.finish(acc.stats, acc.scheduler)

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        """Run ``scenario`` under ``plan`` (see `Harness.run_plan`): checkpoints
        through ``acc.save(dir)``, a resume through ``acc.load(dir)`` into fresh
        objects."""
        model, optimizer, acc = self._build(scenario)
        if plan.resume_from is not None:
            acc.load(plan.resume_from)
        recorder = TrajectoryRecorder(model)
        known = scenario.pass_length == "known"
        recorded = acc.machine.state.windows
        steps = acc.machine.state.optimizer_steps

        def record() -> None:
            nonlocal recorded, steps
            state = acc.machine.state
            if state.windows > recorded:
                recorder.window(model, optimizer, stepped=state.optimizer_steps > steps)
            recorded, steps = state.windows, state.optimizer_steps

        for view in scenario.iter_microbatches():
            if view.global_index < plan.first:
                continue
            _microbatch(acc, model, scenario, view, known)
            record()
            if view.is_last_in_pass:
                acc.end_pass()
                record()
            path = plan.save_path(view.global_index)
            if path is not None:
                acc.save(path)
        return recorder.finish(acc.stats, acc.scheduler)


def _microbatch(
    acc: Accumulator, model: torch.nn.Module, scenario: Scenario, view: MicrobatchView, known: bool
) -> None:
    """One microbatch (its loss and outputs die here, before any probe looks)."""
    with acc.microbatch(
        view.count,
        last=view.is_last_in_pass,
        remaining=view.remaining_in_pass if known else None,
    ):
        with scenario.autocast():
            loss = scenario.loss(model(view.x), view.y)
        acc.backward(loss)
