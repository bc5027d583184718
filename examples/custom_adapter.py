"""A third-party adapter on gradaccum's public contract, for a made-up framework.

    python examples/custom_adapter.py

``MiniTrainer`` stands for a training framework in the style of Lightning
Fabric: it wraps the user's model, owns the optimizer, the LR scheduler and an
optional ``GradScaler``, and the user trains through its own wrappers,
``trainer.backward(loss)`` and ``trainer.step()``. gradaccum does not know
it. Three small pieces make it an exact accumulating framework:

* ``MiniFramework`` — the `gradaccum_torch.Framework` protocol for it: which
  optimizer, scheduler and scaler, how backward runs, how steps are taken;
* ``accumulator(trainer, steps=...)`` — a `gradaccum_torch.Accumulator` built
  with ``framework=MiniFramework(trainer)`` (one process, so the default
  `gradaccum_torch.SingleProcess` is the distributed side);
* ``MiniHarness`` — its `gradaccum_conformance.Harness`, so the conformance
  suite can prove it keeps the promises of ``spec/accumulation.md``::

      PYTHONPATH=examples pytest --pyargs gradaccum_conformance \\
          --gradaccum-harness=custom_adapter:MiniHarness

``docs/adapter-authors.md`` walks through it;
``packages/gradaccum-torch/tests/test_adapter_example.py`` runs the whole suite on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum_conformance import Harness, Scenario, Trajectory, TrajectoryRecorder
from gradaccum_torch import Accumulator

# -- the made-up framework (gradaccum knows nothing of it) ------------------------------


# --8<-- [start:trainer]
class TrainerModule(nn.Module):
    """What the framework wraps the user's model in: the model is ``self.net``,
    so its parameters are named ``net.0.weight``, ``net.0.bias``, …"""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)


class MiniTrainer:
    """A tiny Fabric-like framework.

    ``backward`` scales the loss under a ``GradScaler``; ``step`` takes the
    optimizer step the way mixed-precision plugins do: ``scaler.step`` (which
    unscales the gradients unless they were unscaled already, and skips the
    step on inf/nan) then ``scaler.update``; a plain ``optimizer.step()``
    without a scaler. With ``unscale_in_step=True`` its step always calls
    ``scaler.unscale_`` first, as Lightning's precision plugin does in manual
    optimization: nobody may unscale before it. It counts its calls, so tests
    can see who called it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
        unscale_in_step: bool = False,
    ) -> None:
        self.module = TrainerModule(model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.unscale_in_step = unscale_in_step
        self.backward_calls = 0
        self.step_calls = 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled first under a GradScaler)."""
        self.backward_calls += 1
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()  # type: ignore[no-untyped-call]

    def step(self) -> None:
        """One optimizer step (through the GradScaler when there is one)."""
        self.step_calls += 1
        if self.scaler is None:
            self.optimizer.step()
            return
        if self.unscale_in_step:
            self.scaler.unscale_(self.optimizer)  # raises if someone unscaled already
        self.scaler.step(self.optimizer)
        self.scaler.update()


# --8<-- [end:trainer]


# -- the adapter: the Framework protocol for MiniTrainer ----------------------------------


# --8<-- [start:framework]
class MiniFramework:
    """`gradaccum_torch.Framework` for `MiniTrainer`.

    The accumulator calls `backward` once per microbatch (with the loss
    already multiplied by the core's loss multiplier); at a boundary that
    steps, `step_optimizer` then `step_scheduler`; at one that does not,
    `skip_step` when a scaler is in use.
    """

    name_prefix = "net."
    """``MiniTrainer`` holds the user's model as ``module.net``: checkpoints
    strip ``net.`` so they carry the model's own names (``0.weight``) and load
    into any other stack."""

    def __init__(self, trainer: MiniTrainer) -> None:
        self.trainer = trainer

    @property
    def scaled_boundary(self) -> bool:
        """False (the usual case): the boundary unscales the window's gradient
        itself, once (``scaler.unscale_``, whose found-inf flag is the window's
        overflow check); ``trainer.step()`` then finds the optimizer unscaled
        and ``scaler.step`` does not unscale it again. True when the trainer's
        step insists on unscaling: the boundary then leaves the gradient
        scaled, checks it as it is and clips against ``max × scale``."""
        return self.trainer.unscale_in_step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The raw torch optimizer the trainer steps."""
        return self.trainer.optimizer

    @property
    def scheduler(self) -> Any | None:
        """The trainer's LR scheduler, or ``None``."""
        return self.trainer.scheduler

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The trainer's enabled GradScaler, or ``None``."""
        return self.trainer.scaler

    def backward(self, loss: torch.Tensor) -> None:
        """The framework's own backward (it scales the loss under AMP)."""
        self.trainer.backward(loss)

    def step_optimizer(self) -> None:
        """The framework's own optimizer step (``scaler.step`` + ``update`` under AMP)."""
        self.trainer.step()

    def skip_step(self) -> None:
        """No step this window (AMP overflow, an empty window, or a boundary
        that failed after unscaling): the scaler must still update — backing
        off after inf/nan — or its next ``unscale_`` would fail."""
        scaler = self.trainer.scaler
        if scaler is None:
            return
        optimizer = self.trainer.optimizer
        if self.scaled_boundary and any(
            p.grad is not None for group in optimizer.param_groups for p in group["params"]
        ):
            scaler.unscale_(optimizer)  # the gradients are still scaled: let it see the inf
        if scaler._found_inf_per_device(optimizer):
            scaler.update()
        else:
            # No gradient was unscaled (an empty window): nothing to update from,
            # so keep the scale (gradaccum_torch.TorchFramework does the same).
            scaler.update(new_scale=scaler._scale)

    def step_scheduler(self) -> None:
        """Once per optimizer step, never on a skipped window (ACC-S3)."""
        if self.trainer.scheduler is not None:
            self.trainer.scheduler.step()


# --8<-- [end:framework]


# --8<-- [start:accumulator]
def accumulator(trainer: MiniTrainer, steps: int | None = None, **options: Any) -> Accumulator:
    """An exact accumulator for ``trainer``: `gradaccum_torch.Accumulator`
    with ``framework=MiniFramework(trainer)``. ``options`` are the
    Accumulator's keywords (``config``, ``normalization``, ``clip``, …); the
    scheduler and the scaler come from the trainer."""
    return Accumulator(
        trainer.module, trainer.optimizer, steps, framework=MiniFramework(trainer), **options
    )


# --8<-- [end:accumulator]


# -- its conformance harness ------------------------------------------------------------


# --8<-- [start:harness]
class MiniHarness(Harness):
    """The adapter above under the conformance suite (one process)."""

    name = "custom-adapter-example"
    unscale_in_step = False
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
        }
    )

    def _build(self, scenario: Scenario) -> tuple[MiniTrainer, Accumulator]:
        model = scenario.make_model().to(scenario.device)
        optimizer = scenario.make_optimizer(model)
        trainer = MiniTrainer(
            model,
            optimizer,
            scheduler=scenario.make_scheduler(optimizer),
            scaler=scenario.make_scaler(),
            unscale_in_step=self.unscale_in_step,
        )
        return trainer, accumulator(trainer, config=scenario.config)

    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        """Run ``scenario`` through the adapter's public API (see `Harness.run`)."""
        trainer, acc = self._build(scenario)
        # Parameters are recorded by the scenario model's own names: strip the prefix.
        recorder = TrajectoryRecorder(trainer.module, prefix="net.")
        known = scenario.pass_length == "known"

        def record(windows_before: int, steps_before: int) -> None:
            state = acc.machine.state
            if state.windows > windows_before:  # a window closed (stepped or skipped)
                stepped = state.optimizer_steps > steps_before
                recorder.window(trainer.module, trainer.optimizer, stepped=stepped)

        for view in scenario.iter_microbatches():
            state = acc.machine.state
            windows, steps = state.windows, state.optimizer_steps
            with acc.microbatch(
                view.items,
                last=view.is_last_in_pass,
                remaining=view.remaining_in_pass if known else None,
            ):
                with scenario.autocast():
                    loss = scenario.loss(trainer.module(view.x), view.y)
                acc.backward(loss)
            record(windows, steps)
            if view.is_last_in_pass:
                state = acc.machine.state
                windows, steps = state.windows, state.optimizer_steps
                acc.end_pass()
                record(windows, steps)
            if view.global_index == scenario.checkpoint_after:
                acc.save(workdir / "checkpoint")
                trainer, acc = self._build(scenario)  # fresh objects from the factories
                acc.load(workdir / "checkpoint")
        return recorder.finish(acc.stats, trainer.scheduler)


class ScaledBoundaryHarness(MiniHarness):
    """The same adapter on a trainer whose step unscales (``unscale_in_step``):
    the boundary works in the scaled domain (``scaled_boundary``)."""

    name = "custom-adapter-example-scaled"
    unscale_in_step = True


# --8<-- [end:harness]


# -- a short run ----------------------------------------------------------------------


def _batches(count: int, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    true_weight = torch.randn(8, 1, generator=gen)
    for _ in range(count):
        x = torch.randn(size, 8, generator=gen)
        yield x, x @ true_weight + 0.1 * torch.randn(size, 1, generator=gen)


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    trainer = MiniTrainer(model, optimizer, scheduler=scheduler)
    acc = accumulator(trainer, steps=4)
    for epoch in range(2):
        batches = list(_batches(10, 8))  # 10 microbatches: windows of 4, 4 and 2
        for x, y in acc.iterate(batches):
            with acc.microbatch():
                loss = nn.functional.mse_loss(trainer.module(x), y)
                result = acc.backward(loss)
            if result:
                print(
                    f"epoch {epoch} step {acc.effective_step:2d} loss {loss.item():.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.4f}"
                )
    print(
        f"{trainer.backward_calls} trainer.backward() calls, {trainer.step_calls} "
        f"trainer.step() calls, {acc.stats.optimizer_steps} optimizer steps"
    )


if __name__ == "__main__":
    main()
