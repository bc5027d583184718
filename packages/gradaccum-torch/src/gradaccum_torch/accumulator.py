"""The plain-PyTorch accumulator.

Three lines turn a plain loop into an exact accumulating one::

    acc = Accumulator(model, optimizer, steps=4, scheduler=scheduler)
    for x, y in acc.iterate(loader):              # knows the last microbatch
        with acc.microbatch():                    # forward and backward inside
            acc.backward(loss_fn(model(x), y))    # steps, clips, zeroes at the boundary

Every *when* comes from the core's state machine (:mod:`gradaccum.state`);
this module only applies the decisions to tensors.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from gradaccum.config import AccumulationConfig
from gradaccum.errors import (
    CheckpointMismatchError,
    ConfigError,
    NonFiniteGradientError,
    UsageError,
)
from gradaccum.iteration import mark_last
from gradaccum.machine import AccumulationMachine
from gradaccum.state import MicrobatchDecision, Phase, Topology, WindowDecision
from gradaccum.stats import AccumulationListener, AccumulationStats
from gradaccum_torch import grads as G
from gradaccum_torch.naming import named_parameters

__all__ = ["Accumulator"]

T = TypeVar("T")

PRODUCER = "gradaccum-torch"


class Accumulator:
    """Exact gradient accumulation for a model and its optimizer.

    Args:
        model: the module being trained (wrapped or not: parameter names are
            canonicalised, see :mod:`gradaccum_torch.naming`).
        optimizer: its optimizer; every parameter it holds must belong to
            ``model``.
        steps: microbatches per window (shorthand for ``schedule=Fixed(steps)``).
        config: a full :class:`~gradaccum.AccumulationConfig`; exclusive with
            ``steps`` and ``options``.
        scheduler: an LR scheduler stepped exactly once per successful
            optimizer step, never on microbatches or skipped steps.
        scaler: a ``torch.amp.GradScaler`` for fp16; the loss is scaled, the
            gradient unscaled once per window before the non-finite check and
            clipping, and an overflow skips the step without stepping the
            scheduler.
        listeners: receivers of microbatch/step/skip/epoch events.
        **options: any other :class:`~gradaccum.AccumulationConfig` keyword
            (``normalization="items"``, ``clip=ClipPolicy(1.0)``, ...).

    Promises (spec ``ACC-…``): the parameters after each window equal one
    large-batch step on the window's data; no host sync and no gradient
    communication on microbatches that are not the last of their window;
    in the default configuration no buffer besides ``param.grad``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        steps: int | None = None,
        *,
        config: AccumulationConfig | None = None,
        scheduler: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
        listeners: Iterable[AccumulationListener] = (),
        **options: Any,
    ) -> None:
        if config is None:
            config = AccumulationConfig(steps, **options)
        elif steps is not None or options:
            raise ConfigError(
                f"config= was given together with steps={steps!r} / {sorted(options)}; "
                f"put everything in the config, or pass steps and options only"
            )
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if scaler is not None and config.non_finite == "drop_microbatch":
            raise ConfigError(
                "non_finite='drop_microbatch' cannot be combined with a GradScaler: a loss-scale "
                "overflow must skip the whole window so the scaler can lower its scale; use "
                "non_finite='skip' with AMP"
            )
        by_name = named_parameters(model)
        name_of = {id(p): n for n, p in by_name.items()}
        params: list[torch.nn.Parameter] = []
        groups: list[int] = []
        for g, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if id(param) not in name_of:
                    raise ConfigError(
                        f"optimizer group {g} holds a parameter of shape {tuple(param.shape)} "
                        f"that is not a parameter of the model; build the optimizer from "
                        f"model.parameters() of this model"
                    )
                params.append(param)
                groups.append(g)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self._params = params
        self._names = [name_of[id(p)] for p in params]
        self._name_of = name_of
        weights = config.weights.resolve(
            self._names,
            groups,
            [group.get("name") for group in optimizer.param_groups],
        )
        by_weight: dict[float, list[torch.nn.Parameter]] = {}
        for param, weight in zip(params, weights, strict=True):
            if weight != 1.0:
                by_weight.setdefault(weight, []).append(param)
        self._weighted = list(by_weight.items())
        self._buffered = config.accumulation_dtype == "float32" or config.offload
        self._buffers: dict[int, torch.Tensor] = {}
        self._items: torch.Tensor | None = None
        self._machine = AccumulationMachine(config, topology=self._topology(), listeners=listeners)
        self._decision: MicrobatchDecision | None = None
        self._backward_done = False
        self._next_last = False
        self._next_remaining: int | None = None
        self._pending_items: torch.Tensor | None = None

    # -- extension points for distributed adapters -------------------------

    def _topology(self) -> Topology:
        """World size and reduction semantics (one process here)."""
        return Topology()

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context around forward and backward; DDP enters ``no_sync`` when not ``sync``."""
        return contextlib.nullcontext()

    def _manual_sync(self, grads: Sequence[torch.Tensor]) -> None:
        """Reduce gradients when a window closed without a synced backward."""

    def _world_items(self, local: torch.Tensor) -> torch.Tensor:
        """The window's item count summed over ranks (one collective in DDP)."""
        return local

    # -- properties ----------------------------------------------------------

    @property
    def config(self) -> AccumulationConfig:
        """The accumulation configuration."""
        return self._machine.config

    @property
    def machine(self) -> AccumulationMachine:
        """The core state machine (read it; do not drive it while the accumulator does)."""
        return self._machine

    @property
    def stats(self) -> AccumulationStats:
        """Counters and the last pre-clip gradient norm (read lazily)."""
        return self._machine.stats

    @property
    def effective_step(self) -> int:
        """Successful optimizer steps: the step to log metrics at."""
        return self._machine.state.optimizer_steps

    @property
    def is_accumulating(self) -> bool:
        """True while a window is open."""
        return self._machine.state.is_accumulating

    @property
    def sync_gradients(self) -> bool:
        """True inside the microbatch that closes its window (Accelerate's name)."""
        return self._decision is not None and self._decision.sync_gradients

    def add_listener(self, listener: AccumulationListener) -> None:
        """Register an event listener (e.g. ``gradaccum_wandb``'s logger)."""
        self._machine.add_listener(listener)

    # -- the loop ------------------------------------------------------------

    def iterate(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield the items of one pass, marking the last one for the next
        :meth:`microbatch`, and end the pass (applying the partial-window
        policy) when the iterable is exhausted. Looks one item ahead; uses
        ``len(iterable)`` when available to plan a short last window exactly."""
        try:
            total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        for index, (item, last) in enumerate(mark_last(iterable)):
            self._next_last = last
            remaining = None if total is None else total - index
            self._next_remaining = remaining if remaining is not None and remaining >= 1 else None
            yield item
        self._next_last = False
        self._next_remaining = None
        self.end_pass()

    @contextlib.contextmanager
    def microbatch(
        self,
        items: int | torch.Tensor | None = None,
        *,
        last: bool | None = None,
        remaining: int | None = None,
    ) -> Iterator[Accumulator]:
        """Run one microbatch's forward and backward inside this context.

        Args:
            items: items the loss covers (tokens, samples); required under
                ``items`` normalization. An int, or a 0-d tensor kept on the
                device (no host sync).
            last: this is the last microbatch of the pass; :meth:`iterate`
                sets it for you.
            remaining: microbatches left in the pass, this one included, when
                you drive the loop yourself and know the pass length: a short
                last window is then planned exactly from its start.

        Exactly one :meth:`backward` must run inside. Gradient communication
        is suppressed unless this microbatch closes its window.
        """
        on_device = isinstance(items, torch.Tensor)
        if on_device and self.config.normalization != "items":
            items = None
            on_device = False
        decision = self._machine.begin(
            items=None if on_device else items,  # type: ignore[arg-type]
            items_on_device=on_device,
            last_in_pass=self._next_last if last is None else last,
            remaining_in_pass=(
                remaining if remaining is not None or last is not None else self._next_remaining
            ),
        )
        self._next_last = False
        self._next_remaining = None
        self._decision = decision
        self._backward_done = False
        self._pending_items = items if isinstance(items, torch.Tensor) else None
        try:
            with self._sync_context(decision.sync_gradients):
                yield self
        except BaseException:
            if not self._backward_done:
                self._machine.cancel()
            raise
        finally:
            self._decision = None
        if not self._backward_done:
            self._machine.cancel()
            raise UsageError(
                "the microbatch ended without acc.backward(loss); call it exactly once "
                "inside `with acc.microbatch():`"
            )

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate ``loss`` for the open microbatch; at a window's
        boundary, also normalize, unscale, check, clip, weight, step the
        optimizer and scheduler, and zero the gradients.

        Returns True when an optimizer step was taken.
        """
        decision = self._decision
        if decision is None:
            raise UsageError(
                "acc.backward(loss) was called outside `with acc.microbatch():`; "
                "open the microbatch context first"
            )
        if self._backward_done:
            raise UsageError(
                "acc.backward(loss) was called twice in one microbatch; sum the losses "
                "and call it once, or start a new microbatch"
            )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UsageError(
                f"the loss must be a scalar tensor, got {shape}; reduce it with .mean() "
                f"(normalization='mean') or .sum() (normalization='items')"
            )
        if not loss.requires_grad:
            raise UsageError(
                "the loss does not require grad (computed under torch.no_grad() or from "
                "detached tensors); compute it from the model's output with grad enabled"
            )
        scaled = loss if decision.loss_multiplier == 1.0 else loss * decision.loss_multiplier
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        dropped = False
        if decision.isolate:
            dropped = self._isolated_backward(scaled, decision)
        else:
            scaled.backward()  # type: ignore[no-untyped-call]
        if not dropped and self._pending_items is not None:
            count = self._pending_items.detach()
            self._items = count if self._items is None else self._items + count
        if self._buffered:
            self._fold_into_buffers()
        self._backward_done = True
        window = self._machine.end(dropped=dropped)
        if window is None:
            return False
        return self._close_window(window)

    def accumulate(
        self, loss: torch.Tensor, *, items: int | torch.Tensor | None = None, last: bool = False
    ) -> bool:
        """One-call form: ``with microbatch(items, last=last): backward(loss)``.
        The forward ran outside the context, so under DDP it was not exempt
        from synchronisation bookkeeping; prefer :meth:`microbatch`."""
        with self.microbatch(items, last=last):
            return self.backward(loss)

    def end_pass(self) -> None:
        """End a pass over the data and apply the partial-window policy
        (:meth:`iterate` calls this for you)."""
        decision = self._machine.end_pass()
        if decision.action == "close" and decision.window is not None:
            self._close_window(decision.window)
        elif decision.action == "discard":
            self._zero()

    # -- microbatch internals -----------------------------------------------

    def _isolated_backward(self, scaled: torch.Tensor, decision: MicrobatchDecision) -> bool:
        """Backward into fresh gradients, clip them or check them alone, then add
        them to the window. Returns True when the microbatch is dropped."""
        stash = [p.grad for p in self._params]
        for param in self._params:
            param.grad = None
        scaled.backward()  # type: ignore[no-untyped-call]
        fresh = [p.grad for p in self._params if p.grad is not None]
        dropped = False
        if self.config.non_finite == "drop_microbatch":
            dropped = bool(G.has_nonfinite(fresh).item())
        if not dropped and decision.clip is not None:
            G.clip_(fresh, decision.clip, scale=self._microbatch_scale(decision))
        for param, old in zip(self._params, stash, strict=True):
            new = param.grad
            if dropped or new is None:
                param.grad = old
            elif old is not None:
                param.grad = old.add_(new)
        return dropped

    def _microbatch_scale(self, decision: MicrobatchDecision) -> torch.Tensor:
        """What backward multiplied the microbatch's mean-loss gradient by: the
        loss multiplier, the item count under ``items`` (the loss is a sum),
        and the GradScaler's scale. Per-microbatch clipping divides it out
        (spec ACC-L2), on the device."""
        factor = decision.loss_multiplier
        per_item: torch.Tensor | None = None
        if self.config.normalization == "items":
            if self._pending_items is not None:
                per_item = self._pending_items.detach()
            else:
                factor *= self._machine.state.current_items
        scale = torch.tensor(factor, dtype=torch.float32, device=self._device())
        if per_item is not None:
            scale = scale * per_item.to(scale.device, torch.float32)
        if self.scaler is not None and self.scaler._scale is not None:
            scale = scale * self.scaler._scale.to(scale.device)
        return scale

    def _fold_into_buffers(self) -> None:
        device = torch.device("cpu") if self.config.offload else None
        to_fp32 = self.config.accumulation_dtype == "float32"
        for param in self._params:
            grad = param.grad
            if grad is None:
                continue
            buf = self._buffers.get(id(param))
            if buf is None:
                dtype = torch.float32 if to_fp32 and grad.is_floating_point() else grad.dtype
                self._buffers[id(param)] = grad.to(
                    device=device or grad.device, dtype=dtype, copy=True
                )
            else:
                buf.add_(grad.to(device=buf.device, dtype=buf.dtype, non_blocking=True))
            param.grad = None

    # -- the boundary (spec ACC-B1: sync, normalize, unscale, check, clip, weights, step, zero)

    def _close_window(self, window: WindowDecision) -> bool:
        if self._buffered:
            world_total = self._restore_from_buffers(window)
            grads = self._grads()
        else:
            grads = self._grads()
            if window.needs_manual_sync:
                self._manual_sync(grads)
            world_total = self._normalize(grads, window)
        amp_overflow = False
        found_inf = False
        norm: torch.Tensor | None = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            found = self.scaler._found_inf_per_device(self.optimizer)
            amp_overflow = bool(sum(v.item() for v in found.values()))
        if not amp_overflow and not window.empty:
            clip = window.clip
            norm_type = clip.norm_type if clip is not None and clip.mode == "norm" else 2.0
            norm = G.total_norm(grads, norm_type)
            # The boundary's one host read: inf or nan anywhere makes the norm non-finite.
            found_inf = not math.isfinite(norm.item())
            if clip is not None and not found_inf:
                G.clip_(grads, clip, norm=norm if clip.mode == "norm" else None)
            if window.apply_weights and not found_inf:
                for weight, params in self._weighted:
                    G.scale_([p.grad for p in params if p.grad is not None], weight)
        verdict = self._machine.commit(
            found_inf=found_inf,
            amp_overflow=amp_overflow,
            grad_norm=norm,
            # Device-side counts become known here, at the boundary (ACC-C4, ACC-N6).
            world_items=None if world_total is None else round(world_total.item()),
        )
        if verdict.step_optimizer:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if verdict.step_scheduler and self.scheduler is not None:
            self.scheduler.step()
        self._zero()
        if verdict.raise_error:
            raise NonFiniteGradientError(
                f"the gradient of window {self._machine.state.windows} holds inf or nan "
                f"(total norm {float(norm) if norm is not None else 'n/a'}); the step was "
                f"skipped and the gradients zeroed. Use non_finite='skip' to continue silently "
                f"or 'drop_microbatch' to leave out only the bad microbatch"
            )
        return verdict.step_optimizer

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params if p.grad is not None]

    def _normalize(
        self, grads: Sequence[torch.Tensor], window: WindowDecision
    ) -> torch.Tensor | None:
        """Apply the window's multiplier; under ``items`` with device counts or
        several ranks, divide by the world item count and return it (a device
        scalar), else return None."""
        if window.divide_by_world_items:
            local = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
            if self._items is not None:
                local = local + self._items.to(local.device, torch.float64)
            local = local + window.items
            total = self._world_items(local)
            G.scale_(grads, window.grad_multiplier / total.clamp(min=1.0))
            return total
        G.scale_(grads, window.grad_multiplier)
        return None

    def _restore_from_buffers(self, window: WindowDecision) -> torch.Tensor | None:
        buffers = [self._buffers[id(p)] for p in self._params if id(p) in self._buffers]
        if window.needs_manual_sync:
            self._manual_sync(buffers)
        world_total = self._normalize(buffers, window)
        for param in self._params:
            buf = self._buffers.get(id(param))
            if buf is not None:
                param.grad = buf.to(device=param.device, dtype=param.dtype)
        return world_total

    def _zero(self) -> None:
        # self._params are exactly the optimizer's parameters: this clears every .grad.
        self.optimizer.zero_grad(set_to_none=True)
        self._buffers.clear()
        self._items = None

    # -- state and checkpoints ------------------------------------------------

    def _inflight(self) -> dict[str, torch.Tensor]:
        """In-flight (not yet stepped) gradients by canonical name."""
        if self._buffered:
            return {
                name: self._buffers[id(p)]
                for name, p in zip(self._names, self._params, strict=True)
                if id(p) in self._buffers
            }
        return {
            name: p.grad
            for name, p in zip(self._names, self._params, strict=True)
            if p.grad is not None
        }

    def state_dict(self) -> dict[str, Any]:
        """Accumulation state, config and in-flight gradients (tensors), like a
        torch ``state_dict``. Only between microbatches."""
        return {
            "accumulation": self._machine.state_dict(),
            "config": self.config.to_dict(),
            "gradients": {n: t.detach().clone() for n, t in self._inflight().items()},
            "items": None if self._items is None else self._items.detach().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Everything is checked first:
        on any mismatch nothing changes."""
        self._check_idle("load a state")
        from gradaccum.state import AccumulationState

        parsed = AccumulationState.from_state_dict(state["accumulation"])
        saved_config = AccumulationConfig.from_dict(state["config"])
        if parsed.position > 0 and saved_config.normalization != self.config.normalization:
            raise CheckpointMismatchError(
                f"the state was saved mid-window under normalization="
                f"{saved_config.normalization!r} but this accumulator uses "
                f"{self.config.normalization!r}; resume with the same normalization"
            )
        gradients = self._check_gradients(state.get("gradients") or {})
        self._machine.load_state_dict(state["accumulation"])
        self._apply_gradients(gradients)
        items = state.get("items")
        self._items = None if items is None else items.to(self._device())

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _check_idle(self, what: str) -> None:
        if self._decision is not None or self._machine.state.phase is not Phase.IDLE:
            raise UsageError(f"cannot {what} inside a microbatch; do it between microbatches")

    def _check_gradients(self, gradients: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        by_name = dict(zip(self._names, self._params, strict=True))
        unknown = sorted(set(gradients) - set(by_name))
        if unknown:
            raise CheckpointMismatchError(
                f"the checkpoint holds gradients for {unknown[:5]}, which this model/optimizer "
                f"lacks; its parameters are {self._names[:5]}…; load it into the same model"
            )
        # In the model's parameter order, so the first mismatch reported is deterministic.
        for name in (n for n in self._names if n in gradients):
            tensor = gradients[name]
            if tuple(tensor.shape) != tuple(by_name[name].shape):
                raise CheckpointMismatchError(
                    f"gradient {name!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                    f"the parameter has shape {tuple(by_name[name].shape)}"
                )
        return dict(gradients)

    def _apply_gradients(self, gradients: Mapping[str, torch.Tensor]) -> None:
        self._zero()
        by_name = dict(zip(self._names, self._params, strict=True))
        to_fp32 = self.config.accumulation_dtype == "float32"
        for name, tensor in gradients.items():
            param = by_name[name]
            if self._buffered:
                dtype = torch.float32 if to_fp32 else param.dtype
                device = torch.device("cpu") if self.config.offload else param.device
                self._buffers[id(param)] = tensor.to(device=device, dtype=dtype, copy=True)
            else:
                param.grad = tensor.to(device=param.device, dtype=param.dtype, copy=True)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        model: bool = True,
        optimizer: bool = True,
        scheduler: bool = True,
        scaler: bool = True,
    ) -> None:
        """Write a checkpoint in the shared format (``spec/checkpoint-v1.md``),
        atomically: the accumulation state, the in-flight gradients, and, as
        asked, the model, optimizer, scheduler and scaler state under canonical
        names. Works at any point between microbatches, mid-window included."""
        from gradaccum_torch.checkpoint import save_checkpoint

        self._check_idle("save a checkpoint")
        save_checkpoint(
            self,
            path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
        )

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by any gradaccum adapter. Every file is
        verified and every name and shape checked against this model before
        anything is changed."""
        from gradaccum_torch.checkpoint import load_checkpoint

        self._check_idle("load a checkpoint")
        load_checkpoint(self, path)
