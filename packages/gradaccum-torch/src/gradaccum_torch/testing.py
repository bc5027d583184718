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
