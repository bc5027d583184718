"""Exact gradient accumulation for Hugging Face Accelerate.

After ``accelerator.prepare(...)``, the same three-line loop as plain PyTorch::

    acc = Accumulator(accelerator, model, optimizer, steps=8, scheduler=scheduler)
    for batch in acc.iterate(dataloader):
        with acc.microbatch(items=...):
            acc.backward(loss_fn(model(batch["x"]), batch["y"]))

What it changes against ``accelerator.accumulate(model)``:

* the short last window of a pass is exact (Accelerate divides every loss by
  N, so a short window is under-weighted);
* the scheduler steps once per successful optimizer step whatever the number
  of processes (Accelerate's prepared scheduler steps ``num_processes`` times
  per update unless ``split_batches``), and never after an AMP-skipped step;
* ``items`` normalization divides by the window's item count over all
  processes, with device counts and no host sync;
* ``accelerator.save_state`` / ``load_state`` carry the accumulation state
  and every process's in-flight gradients (Accelerate saves no gradients), so
  a resume from the middle of a window is bitwise identical.

It is the `gradaccum_torch.Accumulator` with an Accelerate `Framework` (the
raw optimizer and scheduler behind Accelerate's wrappers, the accelerator's
loss scaler, ``accelerator.backward``) and an Accelerate `Distributed`
(``accelerator.no_sync`` on several processes, and
``accelerator.sync_gradients`` set to the core's decision on every
microbatch, so user code that reads it sees the boundary).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType
from torch.nn.parallel import DistributedDataParallel

from gradaccum.checkpoint import FORMAT_VERSION, check_format_version
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
from gradaccum_accelerate._version import PRODUCER, __version__
from gradaccum_ddp.accumulator import Lockstep
from gradaccum_ddp.distributed import DDPDistributed
from gradaccum_torch import Accumulator as TorchAccumulator
from gradaccum_torch import SingleProcess, TorchFramework
from gradaccum_torch.accumulator import unknown_keywords

__all__ = [
    "SUPPORTED",
    "AccelerateFramework",
    "AcceleratorProcesses",
    "Accumulator",
    "ProcessGroupOfAccelerator",
]

SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
"""The Accelerate distributed types this release supports (one process, and
DistributedDataParallel on CPUs or GPUs)."""

CHECKPOINT_DIR = "gradaccum"
"""The folder inside an ``accelerator.save_state`` directory that holds the
accumulation state and the in-flight gradients (the shared format)."""


class _SyncGradients:
    """Set ``accelerator.sync_gradients`` for the microbatch, then enter ``inner``."""

    __slots__ = ("accelerator", "inner", "sync")

    def __init__(
        self,
        accelerator: Accelerator,
        sync: bool,
        inner: contextlib.AbstractContextManager[Any],
    ) -> None:
        self.accelerator = accelerator
        self.sync = sync
        self.inner = inner

    def __enter__(self) -> None:
        # Left as set after the microbatch, as Accelerate's own accumulate() does:
        # code after the block reads whether the block was the boundary.
        self.accelerator.sync_gradients = self.sync
        self.inner.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool | None:
        return self.inner.__exit__(exc_type, exc, tb)


class AcceleratorProcesses(SingleProcess):
    """`gradaccum_torch.Distributed` for one Accelerate process: nothing to
    communicate; ``accelerator.sync_gradients`` follows the core's decision."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Set ``accelerator.sync_gradients`` to ``sync`` for the microbatch."""
        return _SyncGradients(self.accelerator, sync, contextlib.nullcontext())


class ProcessGroupOfAccelerator(DDPDistributed):
    """`gradaccum_torch.Distributed` for several Accelerate processes (MULTI_CPU,
    MULTI_GPU): the prepared DDP model's process group, ``accelerator.no_sync``
    around forward and backward off the boundary, and
    ``accelerator.sync_gradients`` set to the core's decision."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: DistributedDataParallel,
        *,
        check_windows: bool = True,
    ) -> None:
        super().__init__(model, check_windows=check_windows)
        self.accelerator = accelerator

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """``accelerator.no_sync(model)`` unless ``sync`` (then DDP's all-reduce
        runs in the backward; its failure becomes a `gradaccum.DistributedError`)."""
        inner = super().no_sync(True) if sync else self.accelerator.no_sync(self.model)
        return _SyncGradients(self.accelerator, sync, inner)


class AccelerateFramework(TorchFramework):
    """`gradaccum_torch.Framework` for Accelerate: the raw optimizer and scheduler
    behind Accelerate's wrappers (no 1/N, no gating, one scheduler step per
    update) and the loss scaler (``accelerator.scaler``, or the one given as
    ``scaler=``). The backward is ``scaler.scale(loss).backward()``, which is
    what ``accelerator.backward`` does for one process and DDP, without its
    division by ``accelerator.gradient_accumulation_steps`` — read at every
    call, so an Accelerator built later in the process with another value
    cannot change the loss behind gradaccum's back."""

    def __init__(
        self,
        accelerator: Accelerator,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        super().__init__(optimizer, scheduler, scaler)
        self.accelerator = accelerator
        self.own_scaler = scaler is not None and scaler is not accelerator.scaler
        """The scaler was given explicitly (Accelerate neither uses nor saves it)."""


class Accumulator(TorchAccumulator):
    """Exact gradient accumulation for a model prepared by an ``Accelerator``.

    Args:
        accelerator: the ``accelerate.Accelerator``, built with
            ``gradient_accumulation_steps=1`` (the default): gradaccum does the
            accumulating.
        model: the model ``accelerator.prepare`` returned.
        optimizer: the optimizer ``accelerator.prepare`` returned (or a plain
            torch optimizer). Its ``step()`` is gradaccum's from now on:
            calling it yourself raises `gradaccum.UsageError`.
        scheduler: the LR scheduler ``accelerator.prepare`` returned (or a
            plain one): stepped once per successful optimizer step, whatever
            the number of processes. Its ``step()`` then raises
            `gradaccum.UsageError` if you call it yourself.
        scaler: a ``torch.amp.GradScaler`` when the accelerator has none (fp16
            on the CPU, where Accelerate runs ``mixed_precision="fp16"`` as
            plain fp32); it is an error to give one when the accelerator has
            its own (``accelerator.scaler``, fp16 on CUDA), which is used.
        lockstep: how processes verify they run the same microbatches (see
            `gradaccum_ddp.Lockstep`).
        checkpoint_hooks: register ``accelerator.save_state`` /
            ``load_state`` pre-hooks that save and restore the accumulation
            state and every process's in-flight gradients in
            ``<dir>/gradaccum`` (default True).
        checkpoint_format_version: the shared format version those hooks
            write (default `gradaccum.checkpoint.FORMAT_VERSION`, 3: tensor
            data checked with CRC-32; 2 with SHA-256; 1 for readers older than
            format 2). Loading reads every version.

    The other keywords (``steps``, ``config``, the nine AccumulationConfig
    options, ``listeners``, ``before_step``, ``track_grad_norm``) are those of
    `gradaccum_torch.Accumulator`.

    Refused with `gradaccum.ConfigError`: an accelerator with
    ``gradient_accumulation_steps != 1`` (two accumulators would multiply the
    normalization); a distributed type other than one process,
    ``MULTI_CPU`` and ``MULTI_GPU`` (DeepSpeed, FSDP, XLA, Megatron-LM, ...);
    ``mixed_precision="fp16"`` without a loss scaler (on the CPU Accelerate
    silently trains in fp32: pass ``scaler=`` and autocast yourself, or use
    ``"bf16"``).
    """

    producer = (PRODUCER, __version__)

    def __init__(
        self,
        accelerator: Accelerator,
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
        scaler: torch.amp.GradScaler | None = None,
        listeners: Iterable[AccumulationListener] = (),
        before_step: Callable[[TorchAccumulator], None] | None = None,
        track_grad_norm: bool = False,
        lockstep: Lockstep = "auto",
        checkpoint_hooks: bool = True,
        checkpoint_format_version: int = FORMAT_VERSION,
        **unknown: NoReturn,
    ) -> None:
        if unknown:
            raise unknown_keywords(unknown, Accumulator.__init__)
        if not isinstance(accelerator, Accelerator):
            raise ConfigError(
                f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}"
            )
        kind = accelerator.distributed_type
        if kind not in SUPPORTED:
            raise ConfigError(
                f"Accelerate's distributed type {str(kind)!r} is not supported yet; supported: "
                f"one process, MULTI_CPU and MULTI_GPU (DistributedDataParallel). DeepSpeed, FSDP, "
                f"XLA and Megatron-LM accumulate their own way"
            )
        if accelerator.gradient_accumulation_steps != 1:
            raise ConfigError(
                f"the Accelerator was built with gradient_accumulation_steps="
                f"{accelerator.gradient_accumulation_steps}; gradaccum accumulates: build it "
                f"with gradient_accumulation_steps=1 (the default) and give steps= here"
            )
        if lockstep not in ("auto", "window", "pass"):
            raise ConfigError(f"lockstep={lockstep!r} must be 'auto', 'window' or 'pass'")
        if not isinstance(checkpoint_hooks, bool):
            raise ConfigError(f"checkpoint_hooks={checkpoint_hooks!r} must be True or False")
        try:
            check_format_version(checkpoint_format_version, "Accumulator")
        except UsageError as exc:
            message = str(exc).replace("format_version=", "checkpoint_format_version=", 1)
            raise ConfigError(message) from None
        own = accelerator.scaler
        own = own if own is not None and own.is_enabled() else None
        if scaler is not None and own is not None:
            raise ConfigError(
                "scaler= was given but the Accelerator has its own loss scaler "
                "(accelerator.scaler, mixed_precision='fp16' on a GPU), which gradaccum uses; "
                "drop scaler="
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if str(accelerator.mixed_precision) == "fp16" and own is None and scaler is None:
            raise ConfigError(
                "Accelerator(mixed_precision='fp16') has no loss scaler here (on the CPU "
                "Accelerate silently trains in fp32: no autocast, no GradScaler); use "
                "mixed_precision='bf16', or pass scaler=torch.amp.GradScaler('cpu') and run "
                "the forward under torch.autocast('cpu', dtype=torch.float16) yourself"
            )
        processes = accelerator.num_processes
        if processes > 1 and not isinstance(model, DistributedDataParallel):
            raise ConfigError(
                f"on {processes} processes the model must be the one accelerator.prepare "
                f"returned (a DistributedDataParallel), got {type(model).__name__}"
            )
        raw_optimizer = (
            optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
        )
        raw_scheduler = (
            scheduler.scheduler if isinstance(scheduler, AcceleratedScheduler) else scheduler
        )
        if not isinstance(raw_optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be the one accelerator.prepare returned (or a torch optimizer), "
                f"got {type(optimizer).__name__}"
            )
        framework = AccelerateFramework(accelerator, raw_optimizer, raw_scheduler, scaler or own)
        distributed: AcceleratorProcesses | ProcessGroupOfAccelerator
        if processes > 1:
            assert isinstance(model, DistributedDataParallel)
            distributed = ProcessGroupOfAccelerator(
                accelerator, model, check_windows=lockstep != "pass"
            )
        else:
            distributed = AcceleratorProcesses(accelerator)
        self.accelerator = accelerator
        super().__init__(
            model,
            raw_optimizer,
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
        # Accelerate's wrappers would step again (the scheduler num_processes times):
        # gradaccum owns the steps now, so a step left in the loop is refused, loudly.
        _refuse_step(optimizer, "optimizer.step()", "steps the optimizer")
        _refuse_step(scheduler, "scheduler.step()", "steps the scheduler once per update")
        if isinstance(optimizer, AcceleratedOptimizer):
            _guard_zero_grad(optimizer, self)
        self._checkpoint_format_version = checkpoint_format_version
        self._hooks: list[Any] = []
        if checkpoint_hooks:
            self._hooks = [
                accelerator.register_save_state_pre_hook(self._save_state_hook),
                accelerator.register_load_state_pre_hook(self._load_state_hook),
            ]

    # -- checkpoints -----------------------------------------------------------------

    def _save_state_hook(
        self, models: Sequence[torch.nn.Module], weights: Sequence[Any], output_dir: str
    ) -> None:
        # Accelerate saves the model, the optimizer, the scheduler and its own scaler; a
        # scaler given as scaler= (fp16 on the CPU) it does not know: that one goes here.
        framework = self.framework
        explicit = isinstance(framework, AccelerateFramework) and framework.own_scaler
        self.save(
            Path(output_dir) / CHECKPOINT_DIR,
            model=False,
            optimizer=False,
            scheduler=False,
            scaler=explicit,
            format_version=self._checkpoint_format_version,
        )

    def _load_state_hook(self, models: Sequence[torch.nn.Module], input_dir: str) -> None:
        path = Path(input_dir) / CHECKPOINT_DIR
        if path.exists():
            self.load(path)

    def remove_checkpoint_hooks(self) -> None:
        """Unregister the ``save_state`` / ``load_state`` pre-hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _refuse_step(obj: Any, call: str, what: str) -> None:
    """Make ``obj.step`` (an Accelerate wrapper the user holds) raise a
    `UsageError` saying to remove the call."""
    if not isinstance(obj, (AcceleratedOptimizer, AcceleratedScheduler)):
        return

    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise UsageError(
            f"{call} was called, but gradaccum {what} at the window's boundary: remove the "
            f"call from your loop (with Accelerate's own accumulate() it would step again, "
            f"and the scheduler once per process)"
        )

    obj.step = refused


def _guard_zero_grad(optimizer: AcceleratedOptimizer, acc: Accumulator) -> None:
    """``optimizer.zero_grad()`` on the prepared optimizer: harmless between windows
    (gradaccum has zeroed already), refused inside an open window, whose gradient
    it would discard (Accelerate lets it through on the boundary microbatch)."""
    zero_grad = optimizer.zero_grad

    def guarded(*args: Any, **kwargs: Any) -> None:
        if acc.is_accumulating:
            raise UsageError(
                "optimizer.zero_grad() was called inside an open window and would discard its "
                "gradient: remove the call; gradaccum zeroes the gradients after every window"
            )
        zero_grad(*args, **kwargs)

    optimizer.zero_grad = guarded
