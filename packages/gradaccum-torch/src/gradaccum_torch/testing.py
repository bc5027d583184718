"""The conformance harness of gradaccum-torch.

It runs each scenario of ``gradaccum-conformance`` through the public API a
user calls — ``Accumulator``, ``microbatch()``, ``backward()``, ``end_pass()``,
``save()`` / ``load()`` — and nothing else. Needs ``gradaccum-conformance``::

    pytest --pyargs gradaccum_conformance --gradaccum-harness=gradaccum_torch.testing:TorchHarness
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradaccum_conformance import Harness, Scenario, Trajectory, TrajectoryRecorder
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
        """Run ``scenario`` through the public API; see :meth:`Harness.run`."""
        model, optimizer, acc = self._build(scenario)
        recorder = TrajectoryRecorder(model)
        known = scenario.pass_length == "known"

        def record(before_steps: int, before_windows: int) -> None:
            state = acc.machine.state
            if state.windows > before_windows:
                recorder.window(model, optimizer, stepped=state.optimizer_steps > before_steps)

        for view in scenario.iter_microbatches():
            state = acc.machine.state
            steps, windows = state.optimizer_steps, state.windows
            with acc.microbatch(
                view.items,
                last=view.is_last_in_pass,
                remaining=view.remaining_in_pass if known else None,
            ):
                with scenario.autocast():
                    loss = scenario.loss(model(view.x), view.y)
                acc.backward(loss)
            record(steps, windows)
            if view.is_last_in_pass:
                state = acc.machine.state
                steps, windows = state.optimizer_steps, state.windows
                acc.end_pass()
                record(steps, windows)
            if view.global_index == scenario.checkpoint_after:
                acc.save(workdir / "checkpoint")
                model, optimizer, acc = self._build(scenario)
                acc.load(workdir / "checkpoint")
        return recorder.finish(acc.stats, acc.scheduler)
