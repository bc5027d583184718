"""`FabricAccumulator`: the plain-torch idiom under Lightning Fabric.

::

    model, optimizer = fabric.setup(model, optimizer)
    acc = FabricAccumulator(fabric, model, optimizer, steps=8, scheduler=scheduler)
    for x, y in acc.iterate(loader):
        with acc.microbatch():                       # fabric.no_backward_sync off the boundary
            acc.backward(loss_fn(model(x), y))       # fabric.backward; steps at the boundary

It is the `gradaccum_torch.Accumulator` with a Fabric `Framework`
(``fabric.backward``, the raw optimizer behind Fabric's wrapper, Fabric's
loss scaler) and, under ``strategy="ddp"``, a `gradaccum_ddp.DDPDistributed`
whose no-sync context is ``fabric.no_backward_sync``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies.ddp import DDPStrategy
from lightning.fabric.strategies.single_device import SingleDeviceStrategy
from lightning.fabric.wrappers import _FabricModule, _FabricOptimizer
from torch.nn.parallel import DistributedDataParallel

from gradaccum.config import AccumulationConfig
from gradaccum.errors import ConfigError, UsageError
from gradaccum.policies import (
    AccumulationDType,
    ClipPolicy,
    GradientWeights,
    NonFinitePolicy,
    Normalization,
    PartialWindowPolicy,
)
from gradaccum.schedules import Schedule
from gradaccum.stats import AccumulationListener
from gradaccum_ddp.distributed import DDPDistributed
from gradaccum_lightning._version import PRODUCER, __version__
from gradaccum_torch import Accumulator, SingleProcess, TorchFramework
from gradaccum_torch.accumulator import unknown_keywords

__all__ = ["FabricAccumulator", "FabricFramework", "FabricProcessGroup"]


class FabricFramework(TorchFramework):
    """`gradaccum_torch.Framework` for Fabric: ``fabric.backward`` (its precision
    plugin scales the loss), the raw optimizer behind ``_FabricOptimizer``, the
    plugin's GradScaler. The boundary unscales once; the step is the raw
    optimizer's plus ``scaler.update()`` (Fabric's own step would read the
    found-inf flag from the device a second time)."""

    def __init__(
        self,
        fabric: Fabric,
        module: _FabricModule,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        super().__init__(optimizer, scheduler, scaler)
        self.fabric = fabric
        self.module = module

    def backward(self, loss: torch.Tensor) -> None:
        """``fabric.backward(loss, model=module)``."""
        self.fabric.backward(loss, model=self.module)


class FabricProcessGroup(DDPDistributed):
    """`gradaccum_torch.Distributed` for Fabric's DDP strategy: the process group
    of the DDP model inside the ``_FabricModule``; the no-sync context is
    ``fabric.no_backward_sync(module)``."""

    def __init__(self, fabric: Fabric, module: _FabricModule, ddp: DistributedDataParallel) -> None:
        super().__init__(ddp)
        self.fabric = fabric
        self.fabric_module = module

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """``fabric.no_backward_sync(module)`` unless ``sync``."""
        if sync:
            return super().no_sync(True)
        return self.fabric.no_backward_sync(self.fabric_module, enabled=True)


class FabricAccumulator(Accumulator):
    """Exact gradient accumulation for a model and optimizer set up by ``Fabric``.

    Args:
        fabric: the launched ``lightning.Fabric``.
        model: the ``_FabricModule`` ``fabric.setup`` returned.
        optimizer: the optimizer ``fabric.setup`` returned (or the raw one).
            gradaccum steps it: calling ``optimizer.step()`` yourself raises
            `gradaccum.UsageError`.
        scheduler: an LR scheduler, stepped once per successful optimizer step.

    The other keywords are those of `gradaccum_torch.Accumulator`. Strategies:
    a single device and ``"ddp"``; others raise `gradaccum.ConfigError`. On the
    CPU, Fabric turns ``precision="16-mixed"`` into bf16 without a scaler;
    real fp16 needs ``Fabric(plugins=[MixedPrecision("16-mixed", "cpu",
    scaler=torch.amp.GradScaler("cpu"))])``.
    """

    producer = (PRODUCER, __version__)

    def __init__(
        self,
        fabric: Fabric,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        steps: int | None = None,
        *,
        config: AccumulationConfig | None = None,
        schedule: Schedule | None = None,
        normalization: Normalization | None = None,
        partial_window: PartialWindowPolicy | None = None,
        non_finite: NonFinitePolicy | None = None,
        clip: ClipPolicy | None = None,
        weights: GradientWeights | None = None,
        accumulation_dtype: AccumulationDType | None = None,
        offload: bool | None = None,
        micro_batch_size: int | None = None,
        scheduler: Any | None = None,
        listeners: Iterable[AccumulationListener] = (),
        before_step: Callable[[Accumulator], None] | None = None,
        track_grad_norm: bool = False,
        **unknown: NoReturn,
    ) -> None:
        if unknown:
            raise unknown_keywords(unknown, FabricAccumulator.__init__)
        if not isinstance(fabric, Fabric):
            raise ConfigError(f"fabric must be a lightning.Fabric, got {type(fabric).__name__}")
        if not isinstance(model, _FabricModule):
            raise ConfigError(
                f"model must be the module fabric.setup returned, got {type(model).__name__}"
            )
        strategy = fabric.strategy
        if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ConfigError(
                f"FabricAccumulator supports a single device and strategy='ddp' for now, not "
                f"{type(strategy).__name__}"
            )
        raw = optimizer.optimizer if isinstance(optimizer, _FabricOptimizer) else optimizer
        if not isinstance(raw, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be the one fabric.setup returned (or a torch optimizer), got "
                f"{type(optimizer).__name__}"
            )
        scaler = getattr(strategy.precision, "scaler", None)
        scaler = scaler if scaler is not None and scaler.is_enabled() else None
        framework = FabricFramework(fabric, model, raw, scheduler, scaler)
        distributed: Any = SingleProcess()
        if fabric.world_size > 1:
            # torch.compile wraps outside DDP in fabric.setup: look through it.
            ddp = model._forward_module
            ddp = getattr(ddp, "_orig_mod", ddp)
            if not isinstance(ddp, DistributedDataParallel):
                raise ConfigError("Fabric's DDP strategy did not wrap the model in DDP")
            distributed = FabricProcessGroup(fabric, model, ddp)
        self.fabric = fabric
        super().__init__(
            model,
            raw,
            steps,
            config=config,
            schedule=schedule,
            normalization=normalization,
            partial_window=partial_window,
            non_finite=non_finite,
            clip=clip,
            weights=weights,
            accumulation_dtype=accumulation_dtype,
            offload=offload,
            micro_batch_size=micro_batch_size,
            listeners=listeners,
            before_step=before_step,
            track_grad_norm=track_grad_norm,
            distributed=distributed,
            framework=framework,
        )
        if isinstance(optimizer, _FabricOptimizer):

            def refused(*args: Any, **kwargs: Any) -> NoReturn:
                raise UsageError(
                    "optimizer.step() was called, but gradaccum steps the optimizer at the "
                    "window's boundary: remove the call from your loop"
                )

            optimizer.step = refused  # type: ignore[method-assign]
