"""The adapter contract: two small protocols every torch adapter implements.

An adapter — ours (DDP, Lightning, Fabric, Accelerate) or a third party's —
is an `Accumulator` given two objects:

* a `Distributed`: how this rank talks to the others (world size, whether
  the gradient reduction averages, the no-sync context around forward and
  backward, reducing gradients, gathering one small row per rank);
* a `Framework`: how the framework runs backward and steps (the loss scaling
  of its precision plugin, the optimizer and scheduler steps, what happens
  after an AMP-skipped step, the name prefix of the user's model).

The accumulator decides nothing by itself either: every *when* comes from
the core (`gradaccum.state`); the accumulator applies the decisions through
these two objects. `SingleProcess` and `TorchFramework` are the plain-torch
implementations; ``gradaccum_ddp.DDPDistributed`` is the DDP one.
``docs/adapter-authors.md`` walks through writing an adapter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "Distributed",
    "DistributedCheckpoints",
    "Framework",
    "SingleProcess",
    "TorchFramework",
]

_NOTHING: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


@runtime_checkable
class Distributed(Protocol):
    """The distributed side of an adapter: how ranks communicate.

    Every method that communicates is a collective: all ranks call it at the
    same point, in the same order. A failed collective (a dead peer, a
    timeout) must raise `gradaccum.DistributedError`.
    """

    @property
    def world_size(self) -> int:
        """The number of ranks (1 for one process)."""
        ...

    @property
    def rank(self) -> int:
        """This process's rank, from 0."""
        ...

    @property
    def averages(self) -> bool:
        """True when the gradient reduction averages over ranks (DDP's
        all-reduce does), False when it sums. The core's multipliers depend
        on it (ACC-N1, ACC-N2)."""
        ...

    @property
    def check_windows(self) -> bool:
        """Compare the ranks' positions at every boundary (ACC-D5). Return
        True unless the adapter guarantees lockstep another way."""
        ...

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """The context the microbatch's forward *and* backward run in:
        gradient communication suppressed unless ``sync`` (the core's
        ``MicrobatchDecision.sync_gradients``, true only on a boundary)."""
        ...

    def reduce_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        """Reduce ``grads`` in place over the ranks (average or sum, as
        `averages` says): the one manual reduction of a window that closed
        without a synced backward (``WindowDecision.needs_manual_sync``)."""
        ...

    def all_gather(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's ``row`` (a 1-D float64 tensor of the same length on
        every rank) as a ``(world_size, len(row))`` tensor on ``row``'s
        device, in rank order. One collective, no host read: the boundary
        sends its item count, a bad-count flag and the rank-agreement row
        through it in one go (ACC-D3, ACC-D5)."""
        ...


@runtime_checkable
class DistributedCheckpoints(Protocol):
    """What a `Distributed` spanning several ranks adds so that
    ``Accumulator.save`` / ``load`` work there: in the middle of a window
    every rank holds its own in-flight gradient, so a checkpoint is a
    collective (``gradaccum_ddp.DDPDistributed`` implements it: rank 0
    gathers every rank's gradients and writes; every rank reads its own)."""

    def save_checkpoint(
        self,
        acc: Any,
        path: str | os.PathLike[str],
        *,
        model: bool,
        optimizer: bool,
        scheduler: bool,
        scaler: bool,
        format_version: int,
    ) -> None:
        """Write ``acc``'s checkpoint in ``format_version``; called on every
        rank at the same point. ``format_version`` is not checked yet: check it
        (``gradaccum.checkpoint.check_format_version``) where the ranks agree
        before writing, so that a bad or differing value raises on every rank
        instead of leaving the others waiting. (An implementation written
        before the keyword existed still works: `Accumulator.save` calls it
        without ``format_version`` for the default format and refuses another
        one with `UsageError`.)"""
        ...

    def load_checkpoint(self, acc: Any, path: str | os.PathLike[str]) -> None:
        """Restore ``acc`` from ``path``; called on every rank."""
        ...


@runtime_checkable
class Framework(Protocol):
    """The framework side of an adapter: how backward runs and how steps are taken."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The raw torch optimizer (its ``param_groups`` and ``state``)."""
        ...

    @property
    def scheduler(self) -> Any | None:
        """The LR scheduler whose state checkpoints carry, or ``None``."""
        ...

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The AMP loss scaler in use (enabled), or ``None``."""
        ...

    @property
    def scaled_boundary(self) -> bool:
        """True when `step_optimizer` unscales the gradients itself (a
        framework precision plugin does, as Lightning's in manual
        optimization): the boundary then never calls ``scaler.unscale_``;
        it checks, clips and weights the still-scaled gradients, clipping
        against ``max × scale``. False: the boundary unscales first."""
        ...

    @property
    def name_prefix(self) -> str:
        """The prefix of the user's model in the module's parameter names
        (``"model."`` when a ``LightningModule`` holds it as ``self.model``),
        stripped from checkpoint names so other stacks can read them; ``""``."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (already multiplied by the core's loss
        multiplier), scaling it first when AMP is on."""
        ...

    def step_optimizer(self) -> None:
        """Take the optimizer step on final, finite gradients (the boundary
        decided to step); under AMP also update the loss scale."""
        ...

    def skip_step(self) -> None:
        """The boundary decided not to step (AMP overflow, non-finite or empty
        window): let the loss scaler back off if one is in use."""
        ...

    def step_scheduler(self) -> None:
        """Step the LR scheduler: called exactly once per successful
        optimizer step (ACC-S3)."""
        ...


class SingleProcess:
    """`Distributed` for one process: nothing to communicate."""

    world_size = 1
    rank = 0
    averages = True
    check_windows = True

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """No communication to suppress."""
        return _NOTHING

    def reduce_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        """One rank: already reduced."""

    def all_gather(self, row: torch.Tensor) -> torch.Tensor:
        """``row`` as a one-row matrix."""
        return row.unsqueeze(0)


class TorchFramework:
    """`Framework` for plain PyTorch: ``loss.backward()`` (through the
    GradScaler's ``scale`` under fp16), ``optimizer.step()``,
    ``scheduler.step()``.

    Under a GradScaler the boundary unscales once (``scaler.unscale_``, whose
    found-inf flag is the window's overflow check), so a step needs no
    second look at the flag: `step_optimizer` calls ``optimizer.step()``
    and ``scaler.update()`` instead of ``scaler.step()``, which would read
    the flag from the device again.
    """

    scaled_boundary = False
    name_prefix = ""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer."""
        return self._optimizer

    @property
    def scheduler(self) -> Any | None:
        """The LR scheduler, or ``None``."""
        return self._scheduler

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The enabled GradScaler, or ``None``."""
        return self._scaler

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through ``scaler.scale`` under AMP."""
        scaler = self._scaler
        (loss if scaler is None else scaler.scale(loss)).backward()  # type: ignore[no-untyped-call]

    def step_optimizer(self) -> None:
        """``optimizer.step()``; under AMP then ``scaler.update()``."""
        self._optimizer.step()
        self._update()

    def skip_step(self) -> None:
        """Under AMP, ``scaler.update()`` (the scale backs off after an overflow)."""
        self._update()

    def _update(self) -> None:
        scaler = self._scaler
        if scaler is None:
            return
        if scaler._found_inf_per_device(self._optimizer):
            scaler.update()
        else:
            # No gradient was unscaled (an empty window): keep the scale, reset the
            # scaler's per-step bookkeeping as update() does.
            scaler.update(new_scale=scaler._scale)

    def step_scheduler(self) -> None:
        """``scheduler.step()`` if there is one."""
        if self._scheduler is not None:
            self._scheduler.step()
