"""The accumulator: the loop-facing API every torch adapter shares.

Three lines turn a plain loop into an exact accumulating one::

    acc = Accumulator(model, optimizer, steps=4, scheduler=scheduler)
    for x, y in acc.iterate(loader):              # knows the last microbatch
        with acc.microbatch():                    # forward and backward inside
            acc.backward(loss_fn(model(x), y))    # steps, clips, zeroes at the boundary

Every *when* comes from the core's state machine (`gradaccum.state`). This
module applies the decisions through the adapter contract
(`gradaccum_torch.contract`): a `Distributed` for the ranks, a `Framework`
for backward and the steps. Where the window's gradient lives is a
`gradaccum_torch.gradients.GradientStore`; the boundary is
`gradaccum_torch.boundary.close_window`.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

import torch

from gradaccum.checkpoint import FORMAT_VERSION
from gradaccum.config import AccumulationConfig
from gradaccum.errors import (
    CheckpointMismatchError,
    ConfigError,
    DistributedError,
    UsageError,
)
from gradaccum.iteration import mark_last
from gradaccum.lockstep import Tag, describe, digest, pass_end_row, pass_row
from gradaccum.machine import AccumulationMachine
from gradaccum.policies import (
    AccumulationDType,
    ClipPolicy,
    GradientWeights,
    NonFinitePolicy,
    Normalization,
    PartialWindowPolicy,
)
from gradaccum.schedules import Schedule
from gradaccum.state import AccumulationState, Phase, Topology
from gradaccum.stats import AccumulationListener, AccumulationStats
from gradaccum_torch import grads as G
from gradaccum_torch._version import PRODUCER, __version__
from gradaccum_torch.adaptive import AdaptiveRunner, Batch
from gradaccum_torch.boundary import (
    NOT_A_BOUNDARY,
    BackwardResult,
    close_window,
    exchange_row,
    positions,
)
from gradaccum_torch.checkpoint import load_checkpoint, save_checkpoint
from gradaccum_torch.contract import (
    Distributed,
    DistributedCheckpoints,
    Framework,
    SingleProcess,
    TorchFramework,
)
from gradaccum_torch.gradients import GradientStore, gradient_store
from gradaccum_torch.items import ItemCounter, check_count_tensor
from gradaccum_torch.naming import named_parameters

__all__ = ["Accumulator", "BackwardResult", "unknown_keywords"]

T = TypeVar("T")


def unknown_keywords(unknown: Mapping[str, object], init: Callable[..., None]) -> ConfigError:
    """The `ConfigError` for keyword arguments ``init`` (an adapter's ``__init__``)
    does not take: each named with the closest valid keyword, and the valid
    ones listed (read from ``init``'s signature, so every adapter's list is its own)."""
    known = [
        name
        for name, param in inspect.signature(init).parameters.items()
        if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return ConfigError(
        f"unknown keyword argument(s) {', '.join(parts)}; the options are {', '.join(known)}"
    )


class Accumulator:
    """Exact gradient accumulation for a model and its optimizer.

    Args:
        model: the module being trained (wrapped or not: parameter names are
            canonicalised, see `gradaccum_torch.naming`).
        optimizer: its optimizer; every parameter it holds must belong to
            ``model``. A param group added later with ``add_param_group`` is
            adopted at the next microbatch.
        steps: microbatches per window (shorthand for ``schedule=Fixed(steps)``).
        config: a full `AccumulationConfig`; exclusive with
            ``steps`` and the option keywords below.
        schedule: windows' sizes (`gradaccum.Fixed`, `gradaccum.ByEpoch`, ...).
        normalization: ``"mean"``, ``"items"`` or ``"sum"`` (ACC-N).
        partial_window: ``"step"``, ``"drop"`` or ``"carry"`` (ACC-W).
        non_finite: ``"skip"``, ``"raise"`` or ``"drop_microbatch"`` (ACC-F).
        clip: a `gradaccum.ClipPolicy` (ACC-L).
        weights: `gradaccum.GradientWeights` (ACC-G).
        accumulation_dtype: ``"param"`` or ``"float32"`` (ACC-P1).
        offload: keep the window's gradient on the CPU (ACC-P2).
        micro_batch_size: items per microbatch, for the effective batch size.
        scheduler: an LR scheduler stepped exactly once per successful
            optimizer step (ACC-S3), never on microbatches or skipped steps.
            ``ReduceLROnPlateau`` needs a metric: step it yourself.
        scaler: a ``torch.amp.GradScaler`` for fp16; the loss is scaled, the
            gradient unscaled once per window before the non-finite check and
            clipping, and an overflow skips the step without stepping the
            scheduler (ACC-F4).
        listeners: receivers of microbatch/step/skip/epoch events.
        before_step: called with the accumulator after clipping and the
            weights, right before each optimizer step (only when one is
            taken): the final gradient is in ``param.grad`` to inspect or
            modify. More with `add_before_step`.
        track_grad_norm: compute the total gradient norm (before clipping)
            at every boundary for ``stats.last_grad_norm`` and
            ``BackwardResult.grad_norm``: a device value, read only when
            you read it. Always on when clipping by norm; off by default
            because the non-finite check has a cheaper fused kernel.
        distributed: the adapter contract's distributed side
            (`Distributed`); one process by default.
        framework: the adapter contract's framework side
            (`Framework`); plain torch by default
            (then built from ``optimizer``, ``scheduler`` and ``scaler``).

    An unknown keyword raises `ConfigError` naming the closest
    valid one (and ``mypy`` flags it).

    Promises (spec ``ACC-…``): the parameters after each window equal one
    large-batch step on the window's data; no host sync and no gradient
    communication on microbatches that are not the last of their window,
    and at most one device-to-host read at a boundary; in the default
    configuration no buffer besides ``param.grad``.
    """

    producer: tuple[str, str] = (PRODUCER, __version__)
    """The (name, version) checkpoints written by this adapter record."""

    def __init__(
        self,
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
        before_step: Callable[[Accumulator], None] | None = None,
        track_grad_norm: bool = False,
        distributed: Distributed | None = None,
        framework: Framework | None = None,
        **unknown: NoReturn,
    ) -> None:
        if unknown:
            raise unknown_keywords(unknown, Accumulator.__init__)
        options: dict[str, Any] = {
            name: value
            for name, value in (
                ("schedule", schedule),
                ("normalization", normalization),
                ("partial_window", partial_window),
                ("non_finite", non_finite),
                ("clip", clip),
                ("weights", weights),
                ("accumulation_dtype", accumulation_dtype),
                ("offload", offload),
                ("micro_batch_size", micro_batch_size),
            )
            if value is not None
        }
        if config is None:
            config = AccumulationConfig(steps, **options)
        elif not isinstance(config, AccumulationConfig):
            raise ConfigError(f"config={config!r} must be a gradaccum.AccumulationConfig")
        elif steps is not None or options:
            given = sorted(options) + (["steps"] if steps is not None else [])
            raise ConfigError(
                f"config= was given together with {given}; put everything in the config "
                f"(config.replace(...)), or pass the options without config="
            )
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if framework is None:
            if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
                raise ConfigError(
                    f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}"
                )
            _check_scheduler(scheduler, optimizer)
            framework = TorchFramework(optimizer, scheduler, scaler)
        else:
            if not isinstance(framework, Framework):
                raise ConfigError(
                    f"framework={framework!r} does not implement gradaccum_torch.Framework"
                )
            if scheduler is not None or scaler is not None:
                raise ConfigError(
                    "scheduler= and scaler= belong to the framework when framework= is given; "
                    "build the framework with them"
                )
            if framework.optimizer is not optimizer:
                raise ConfigError(
                    "framework.optimizer is not the optimizer given; pass the same raw "
                    "torch optimizer to both"
                )
            _check_scheduler(framework.scheduler, optimizer)
        distributed = SingleProcess() if distributed is None else distributed
        if not isinstance(distributed, Distributed):
            raise ConfigError(
                f"distributed={distributed!r} does not implement gradaccum_torch.Distributed"
            )
        if framework.scaler is not None and config.non_finite == "drop_microbatch":
            raise ConfigError(
                "non_finite='drop_microbatch' cannot be combined with a GradScaler: a loss-scale "
                "overflow must skip the whole window so the scaler can lower its scale; use "
                "non_finite='skip' with AMP"
            )
        if before_step is not None and not callable(before_step):
            raise ConfigError(f"before_step={before_step!r} must be a callable or None")
        if not isinstance(track_grad_norm, bool):
            raise ConfigError(f"track_grad_norm={track_grad_norm!r} must be True or False")
        topology = Topology(
            world_size=distributed.world_size,
            averages=distributed.averages,
            check_windows=distributed.check_windows,
        )
        machine = AccumulationMachine(config, topology=topology, listeners=listeners)
        self.model = model
        self.optimizer = optimizer
        self._framework = framework
        self._distributed = distributed
        self._machine = machine
        self._prefix = framework.name_prefix
        params, names, weighted, bystanders = self._resolve(config)
        self._store: GradientStore = gradient_store(config, params, names, bystanders)
        self._weighted = weighted
        self._group_count = len(optimizer.param_groups)
        self._items = ItemCounter()
        self._before_step: list[Callable[[Accumulator], None]] = (
            [] if before_step is None else [before_step]
        )
        self._track_grad_norm = track_grad_norm
        self._open: _Microbatch | None = None
        self._after_backward: Callable[[], None] | None = None  # adaptive ranks' agreement
        self._adaptive: AdaptiveRunner | None = None
        self._next_last = False
        self._next_remaining: int | None = None
        if distributed.world_size > 1:
            self._agree([Tag.INIT, digest(config.to_dict())])

    # -- construction helpers --------------------------------------------------

    def _resolve(self, config: AccumulationConfig) -> _Resolved:
        """The optimizer's parameters, their canonical names, the weight
        groups, and the model's other trainable parameters; raises
        `ConfigError` (nothing changed) for a parameter that is not the model's."""
        by_name = named_parameters(self.model, self._prefix)
        name_of = {id(p): n for n, p in by_name.items()}
        params: list[torch.nn.Parameter] = []
        groups: list[int] = []
        for g, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                if id(param) not in name_of:
                    raise ConfigError(
                        f"optimizer group {g} holds a parameter of shape {tuple(param.shape)} "
                        f"that is not a parameter of the model; build the optimizer from "
                        f"model.parameters() of this model"
                    )
                params.append(param)
                groups.append(g)
        names = [name_of[id(p)] for p in params]
        weights = config.weights.resolve(
            names, groups, [group.get("name") for group in self.optimizer.param_groups]
        )
        by_weight: dict[float, list[torch.nn.Parameter]] = {}
        for param, weight in zip(params, weights, strict=True):
            if weight != 1.0:
                by_weight.setdefault(weight, []).append(param)
        optimized = {id(p) for p in params}
        bystanders = [p for p in by_name.values() if p.requires_grad and id(p) not in optimized]
        return params, names, list(by_weight.items()), bystanders

    def _adopt_param_groups(self) -> None:
        """The optimizer gained param groups since the last microbatch: take
        their parameters into normalization, weights and checkpoints. Their
        ``.grad`` was cleared with every window, so it holds this window's
        gradient only (ACC-N9)."""
        params, names, weighted, bystanders = self._resolve(self.config)
        self._store.adopt(params, names, bystanders)
        self._weighted = weighted
        self._group_count = len(self.optimizer.param_groups)

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
    def framework(self) -> Framework:
        """The framework side of the adapter contract."""
        return self._framework

    @property
    def distributed(self) -> Distributed:
        """The distributed side of the adapter contract."""
        return self._distributed

    @property
    def gradients(self) -> GradientStore:
        """Where the window's gradient lives (export/import for checkpoints)."""
        return self._store

    @property
    def scheduler(self) -> Any | None:
        """The LR scheduler, or ``None``."""
        return self._framework.scheduler

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The enabled AMP GradScaler, or ``None``."""
        return self._framework.scaler

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
        return self._machine.is_accumulating

    @property
    def sync_gradients(self) -> bool:
        """True inside the microbatch that closes its window (Accelerate's name)."""
        current = self._machine.current
        return current is not None and current.is_boundary

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The optimizer's parameters by canonical name (prefix stripped), in order."""
        return self._store.by_name

    def add_listener(self, listener: AccumulationListener) -> None:
        """Register an event listener (e.g. ``gradaccum_wandb``'s logger)."""
        self._machine.add_listener(listener)

    def add_before_step(self, hook: Callable[[Accumulator], None]) -> None:
        """Call ``hook(acc)`` after clipping and weights, right before every
        optimizer step (see ``before_step``)."""
        if not callable(hook):
            raise ConfigError(f"before_step hook {hook!r} must be callable")
        self._before_step.append(hook)

    # -- the loop ------------------------------------------------------------

    def iterate(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield the items of one pass, marking the last one for the next
        `microbatch`, and end the pass (applying the partial-window policy)
        when the iterable is exhausted. Looks one item ahead; uses
        ``len(iterable)`` when available to plan a short last window exactly.

        On several ranks with ``len()``, the ranks first compare the pass
        length in one small collective (ACC-D5): ranks that would run
        different numbers of microbatches raise `DistributedError`
        on every rank before any microbatch runs; the windows of such a pass
        need no comparison at their boundaries."""
        try:
            total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        self.begin_pass(total)
        for index, (item, last) in enumerate(mark_last(iterable)):
            self._next_last = last
            remaining = None if total is None else total - index
            self._next_remaining = remaining if remaining is not None and remaining >= 1 else None
            yield item
        self._next_last = False
        self._next_remaining = None
        self.end_pass()

    def begin_pass(self, length: int | None) -> None:
        """Announce a pass of ``length`` microbatches (``None``: unknown) before its
        first microbatch, when you drive the loop yourself and pass ``remaining=``
        (`iterate` calls it for you). On several ranks with a known length the
        ranks compare it once (ACC-D5): different lengths raise
        `gradaccum.DistributedError` on every rank before any microbatch runs,
        and the pass's boundaries then need no comparison. On one rank, or with
        an unknown length, it does nothing."""
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < 0
        ):
            raise UsageError(f"a pass length must be an int >= 0 or None, got {length!r}")
        self._check_idle("begin a pass")
        if length is not None and self._distributed.world_size > 1:
            self._agree(pass_row(self._machine.state, length))
            self._machine.set_ranks_in_step()

    def microbatch(
        self,
        items: int | torch.Tensor | None = None,
        *,
        last: bool | None = None,
        remaining: int | None = None,
    ) -> contextlib.AbstractContextManager[Accumulator]:
        """Run one microbatch's forward and backward inside this context.

        Args:
            items: items the loss covers (tokens, samples); required under
                ``items`` normalization. An int, or a 0-d tensor kept on the
                device (no host sync; checked at the boundary).
            last: this is the last microbatch of the pass; `iterate` sets it
                for you.
            remaining: microbatches left in the pass, this one included,
                when you drive the loop yourself and know the pass length: a
                short last window is then planned exactly from its start.

        Exactly one `backward` must run inside. Gradient communication is
        suppressed unless this microbatch closes its window. If the block
        raises, the window is left exactly as before the microbatch began
        (the exception propagates); where the gradient store cannot separate
        a backward that failed part-way from the window (``param.grad``
        accumulation after the window's first microbatch), the window is
        discarded instead and the exception says so in a note.
        """
        return _Microbatch(self, items, last, remaining)

    def backward(self, loss: torch.Tensor) -> BackwardResult:
        """Backpropagate ``loss`` for the open microbatch; at a window's
        boundary, also normalize, unscale, check, clip, weight, step the
        optimizer and scheduler, and zero the gradients (ACC-B1).

        Returns a `BackwardResult`: whether this closed a window, whether the
        optimizer stepped (it is truthy exactly then), the outcome, the
        window's item count (a lazy device value for device counts) and the
        pre-clip norm when one was computed.
        """
        mb = self._open
        if mb is None:
            raise UsageError(
                "acc.backward(loss) was called outside `with acc.microbatch():`; "
                "open the microbatch context first"
            )
        if mb.stage != _OPENED:
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
        decision = mb.decision
        mb.stage = _BACKWARD
        multiplier = decision.loss_multiplier
        self._framework.backward(loss if multiplier == 1.0 else loss * multiplier)
        if self._after_backward is not None:
            self._after_backward()
        dropped = False
        if decision.isolate:
            dropped = self._check_isolated(mb)
        self._store.close_microbatch(keep=not dropped)
        if not dropped and mb.count is not None:
            self._items.add(mb.count)
        mb.stage = _DONE
        window = self._machine.end(dropped=dropped)
        if window is None:
            return NOT_A_BOUNDARY
        return close_window(
            self,
            window,
            machine=self._machine,
            store=self._store,
            items=self._items,
            framework=self._framework,
            distributed=self._distributed,
            weighted=self._weighted,
            before_step=self._before_step,
            track_grad_norm=self._track_grad_norm,
        )

    @property
    def adaptive(self) -> AdaptiveRunner:
        """The adaptive-microbatching loop behind `run`: its current size
        (``micro_batch``), clean-window count and recovered OOMs (``events``)."""
        if self._adaptive is None:
            self._adaptive = AdaptiveRunner(self)
        return self._adaptive

    def run(
        self,
        batch: Batch,
        loss_fn: Callable[[Any], torch.Tensor],
        *,
        items: Callable[[Any], int | torch.Tensor] | None = None,
    ) -> BackwardResult:
        """Run one whole window on ``batch`` and let gradaccum choose the
        microbatch size (``schedule=AdaptiveMicrobatch(...)``,
        ``normalization="items"``; see `gradaccum_torch.adaptive`).

        Args:
            batch: ``target`` rows: a tensor, tuple/list or dict of tensors,
                sliced along dim 0.
            loss_fn: ``loss_fn(slice)`` returns the *summed* loss of the slice.
            items: ``items(slice)`` returns its item count (an int or a 0-d
                device tensor, e.g. a token count); ``None`` counts rows.

        Out-of-memory errors are recovered from (the microbatch cancelled, the
        size halved, grown back after ``grow_after`` clean windows); the
        update equals one large-batch step on ``batch`` (ACC-K5). Returns the
        window's `BackwardResult`. Raises `UsageError` inside an open window
        or for a batch of another length, `ConfigError` under another
        schedule, `AdaptiveOutOfMemoryError` when ``min_micro_batch`` rows do
        not fit."""
        return self.adaptive.run(batch, loss_fn, items=items)

    def accumulate(
        self, loss: torch.Tensor, *, items: int | torch.Tensor | None = None, last: bool = False
    ) -> BackwardResult:
        """One-call form: ``with microbatch(items, last=last): backward(loss)``.
        The forward ran outside the context, so under DDP it was not exempt
        from synchronisation bookkeeping; prefer `microbatch`."""
        with self.microbatch(items, last=last):
            return self.backward(loss)

    def end_pass(self) -> BackwardResult | None:
        """End a pass over the data and apply the partial-window policy
        (`iterate` calls this for you). Returns the `BackwardResult` of a
        window the end of the pass closed (policy ``step``), else ``None``."""
        if self._open is not None:
            raise UsageError(
                "the pass cannot end inside `with acc.microbatch():`; end it after the block"
            )
        decision = self._machine.end_pass()
        if decision.check_ranks:
            self._agree(pass_end_row(self._machine.state))
        if decision.action == "close" and decision.window is not None:
            return close_window(
                self,
                decision.window,
                machine=self._machine,
                store=self._store,
                items=self._items,
                framework=self._framework,
                distributed=self._distributed,
                weighted=self._weighted,
                before_step=self._before_step,
                track_grad_norm=self._track_grad_norm,
            )
        if decision.action == "discard":
            self._discard()
        return None

    def discard_window(self) -> None:
        """Drop the open window: its gradient is zeroed, nothing steps, and it
        is counted in ``stats.dropped_windows``. Between microbatches only."""
        self._check_idle("discard a window")
        self._machine.abandon()
        self._discard()

    # -- microbatch internals -----------------------------------------------

    def _check_isolated(self, mb: _Microbatch) -> bool:
        """An isolated microbatch's own gradient: check it (``drop_microbatch``)
        and clip it (per-microbatch clipping). True when it is dropped."""
        decision = mb.decision
        fresh = self._store.microbatch_gradients()
        # drop_microbatch reads one flag per microbatch: documented (ACC-F3).
        if self.config.non_finite == "drop_microbatch" and bool(G.has_nonfinite(fresh).item()):
            return True
        if decision.clip is not None:
            G.clip_(fresh, decision.clip, scale=self._microbatch_scale(mb))
        return False

    def _microbatch_scale(self, mb: _Microbatch) -> torch.Tensor:
        """What backward multiplied the microbatch's mean-loss gradient by: the
        loss multiplier, the item count under ``items`` (the loss is a sum),
        and the GradScaler's scale. Per-microbatch clipping divides it out
        (spec ACC-L2), on the device, in float64 where the device has it (so
        1/k is not rounded to float32)."""
        device = self._device()
        dtype = torch.float32 if device.type == "mps" else torch.float64
        factor = mb.decision.loss_multiplier
        if self.config.normalization == "items" and mb.count is None:
            factor *= self._machine.current_items
        scale = torch.tensor(factor, dtype=dtype, device=device)
        if self.config.normalization == "items" and mb.count is not None:
            scale = scale * mb.count.detach().to(device, dtype)
        scaler = self._framework.scaler
        if scaler is not None and scaler._scale is not None:
            scale = scale * scaler._scale.to(device, dtype).reshape(())
        return scale

    def _discard(self) -> None:
        self._store.zero()
        self._items.clear()

    def _device(self) -> torch.device:
        params = self._store.params
        return params[0].device if params else torch.device("cpu")

    def _check_idle(self, what: str) -> None:
        if self._open is not None or self._machine.phase is not Phase.IDLE:
            raise UsageError(f"cannot {what} inside a microbatch; do it between microbatches")

    def _agree(self, row: list[int]) -> None:
        """Compare a `gradaccum.lockstep` row across ranks (one all-gather, one
        host read); raise `DistributedError` on every rank when they differ."""
        mine = exchange_row(row, self._device())
        where = positions(self._distributed.all_gather(mine).tolist())
        if any(r != where[0] for r in where):
            raise DistributedError(describe(where))

    # -- state and checkpoints ------------------------------------------------

    def inflight_items(self) -> torch.Tensor | None:
        """The open window's device item count on this rank as one 0-d float64
        tensor (NaN when a count was bad), or ``None`` without device counts."""
        return self._items.export(self._device())

    def state_dict(self) -> dict[str, Any]:
        """Accumulation state, config and in-flight gradients (tensors), like a
        torch ``state_dict``. Only between microbatches."""
        self._check_idle("save a state")
        items = self.inflight_items()
        return {
            "accumulation": self._machine.state_dict(),
            "config": self.config.to_dict(),
            "gradients": {n: t.detach().clone() for n, t in self._store.export().items()},
            "items": None if items is None else items.detach().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict` output. Everything is checked first: on any
        mismatch nothing changes."""
        self._check_idle("load a state")
        if not isinstance(state, Mapping):
            raise CheckpointMismatchError(
                f"state must be a mapping from Accumulator.state_dict(), got {type(state).__name__}"
            )
        missing = sorted({"accumulation", "config"} - set(state))
        if missing:
            raise CheckpointMismatchError(
                f"the state lacks {missing}; pass what Accumulator.state_dict() returned"
            )
        parsed = AccumulationState.from_state_dict(state["accumulation"])
        saved_config = AccumulationConfig.from_dict(state["config"])
        gradients = state.get("gradients") or {}
        items = state.get("items")
        if items is not None and not isinstance(items, torch.Tensor):
            raise CheckpointMismatchError(f"items={items!r} must be a tensor or None")
        self.restore(parsed, saved_config, gradients, items)

    def restore(
        self,
        state: AccumulationState,
        saved_config: AccumulationConfig,
        gradients: Mapping[str, torch.Tensor],
        items: torch.Tensor | None,
        *,
        owned: bool = False,
    ) -> None:
        """Install a checkpoint's accumulation state, in-flight gradients and
        device item count, after checking them against this accumulator:
        a mid-window state needs the same normalization, gradient names and
        shapes must match. Raises `CheckpointMismatchError` (nothing changed).
        The gradients are copied unless ``owned`` (tensors the caller gives
        away — no one else holds them): then those already on the right device
        with the right dtype are installed as they are. Checkpoint loaders call
        it last, once everything else is verified."""
        self._check_idle("restore a state")
        if state.position > 0 and saved_config.normalization != self.config.normalization:
            raise CheckpointMismatchError(
                f"the state was saved mid-window under normalization="
                f"{saved_config.normalization!r} but this accumulator uses "
                f"{self.config.normalization!r}; resume with the same normalization"
            )
        self._store.check(gradients)
        self.config.schedule.check_state(state.schedule_state)
        self._machine.load_state_dict(state.state_dict())
        self._store.load(gradients, owned=owned)
        self._items.load(None if items is None else items.to(self._device()))

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        model: bool = True,
        optimizer: bool = True,
        scheduler: bool = True,
        scaler: bool = True,
        format_version: int = FORMAT_VERSION,
    ) -> None:
        """Write a checkpoint in the shared format (``spec/checkpoint-v3.md``),
        atomically: the accumulation state, the in-flight gradients, and, as
        asked, the model, optimizer, scheduler and scaler state under canonical
        names. Works at any point between microbatches, mid-window included.

        ``format_version`` 3 (the default) checks tensor data with CRC-32; 2
        keeps every byte under a SHA-256 (``spec/checkpoint-v2.md``), for a
        checkpoint pinned by one digest kept elsewhere; 1 is for readers older
        than format 2. Another value raises `UsageError` before anything is
        written (on several ranks: on every rank, since the ranks compare it
        before writing).

        On several ranks call it on every rank at the same point: the
        distributed side (a `DistributedCheckpoints`, such as
        ``gradaccum_ddp.DDPDistributed``) makes it a collective — rank 0
        gathers every rank's in-flight gradients and writes, and every rank
        returns, or raises, together."""
        self._check_idle("save a checkpoint")
        if self._distributed.world_size > 1 or isinstance(
            self._distributed, DistributedCheckpoints
        ):
            # checked there, inside the ranks' agreement, so that every rank raises together
            ranks = self._ranks_checkpoints()
            kwargs: dict[str, Any] = {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "scaler": scaler,
            }
            if _takes_keyword(ranks.save_checkpoint, "format_version"):
                kwargs["format_version"] = format_version
            elif format_version != FORMAT_VERSION:
                raise UsageError(
                    f"{type(ranks).__name__}.save_checkpoint takes no format_version (it was "
                    f"written before there was one), so it writes format {FORMAT_VERSION}; "
                    f"drop format_version={format_version!r:.40} or add the keyword to it "
                    "(gradaccum_torch.DistributedCheckpoints)"
                )
            ranks.save_checkpoint(self, path, **kwargs)
            return
        save_checkpoint(
            self,
            path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            format_version=format_version,
        )

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by any gradaccum adapter. Every file is
        verified and every name and shape checked against this model before
        anything is changed. On several ranks call it on every rank: each takes
        its own in-flight gradients; a mid-window checkpoint needs the world
        size it was written with, a boundary one loads at any."""
        self._check_idle("load a checkpoint")
        if self._distributed.world_size > 1 or isinstance(
            self._distributed, DistributedCheckpoints
        ):
            self._ranks_checkpoints().load_checkpoint(self, path)
            return
        load_checkpoint(self, path)

    def _ranks_checkpoints(self) -> DistributedCheckpoints:
        ranks = self._distributed
        if not isinstance(ranks, DistributedCheckpoints):
            raise UsageError(
                f"{type(self).__name__}.save()/load() on {ranks.world_size} ranks need a "
                f"distributed side that gathers every rank's in-flight gradients "
                f"(gradaccum_torch.DistributedCheckpoints, as gradaccum_ddp.DDPDistributed); "
                f"{type(ranks).__name__} is not one"
            )
        return ranks


def _takes_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``name`` (or ``**kwargs``);
    ``True`` when its signature cannot be read."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in parameters
    )


def _check_scheduler(scheduler: Any | None, optimizer: torch.optim.Optimizer) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(
            "ReduceLROnPlateau steps on a metric, not once per optimizer step: do not pass it "
            "as scheduler=; call scheduler.step(metric) yourself after validation"
        )
    if not callable(getattr(scheduler, "step", None)):
        raise ConfigError(
            f"scheduler={scheduler!r} has no step() method; pass a torch LR scheduler or None"
        )
    own = getattr(scheduler, "optimizer", optimizer)
    if own is not optimizer:
        raise ConfigError(
            "the scheduler was built for another optimizer than the one given; build it "
            "from this optimizer"
        )


_OPENED, _BACKWARD, _DONE = 0, 1, 2

_Resolved = tuple[
    list[torch.nn.Parameter],
    list[str],
    list[tuple[float, list[torch.nn.Parameter]]],
    list[torch.nn.Parameter],
]


class _Microbatch:
    """The context of one microbatch (`Accumulator.microbatch`)."""

    __slots__ = ("acc", "count", "decision", "items", "last", "remaining", "stage", "sync")

    def __init__(
        self,
        acc: Accumulator,
        items: int | torch.Tensor | None,
        last: bool | None,
        remaining: int | None,
    ) -> None:
        self.acc = acc
        self.items = items
        self.last = last
        self.remaining = remaining
        self.count: torch.Tensor | None = None
        self.stage = _OPENED
        self.sync: contextlib.AbstractContextManager[Any] | None = None

    def __enter__(self) -> Accumulator:
        acc = self.acc
        if acc._open is not None:
            raise UsageError(
                "a microbatch is already open: call backward() for it before starting another"
            )
        if len(acc.optimizer.param_groups) != acc._group_count:
            acc._adopt_param_groups()
        items = self.items
        if isinstance(items, torch.Tensor):
            check_count_tensor(items)
            self.count = items.detach()
            host: int | None = None
        else:
            host = items
        machine = acc._machine
        if self.last is None and self.remaining is None:
            last, remaining = acc._next_last, acc._next_remaining
        else:
            last, remaining = bool(self.last), self.remaining
        self.decision = decision = machine.begin(
            host,
            items_on_device=self.count is not None,
            last_in_pass=last,
            remaining_in_pass=remaining,
        )
        acc._next_last = False
        acc._next_remaining = None
        try:
            acc._store.open_microbatch(decision.isolate, first=decision.index == 0)
            self.sync = acc._distributed.no_sync(decision.sync_gradients)
            self.sync.__enter__()
        except BaseException:
            acc._store.rollback()
            machine.cancel()
            raise
        acc._open = self
        return acc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        acc = self.acc
        acc._open = None
        try:
            if exc is not None:
                self._undo(exc)
        finally:
            sync, self.sync = self.sync, None
            if sync is not None:
                sync.__exit__(exc_type, exc, tb)
        if exc is None and self.stage != _DONE:
            self._undo(None)
            raise UsageError(
                "the microbatch ended without acc.backward(loss); call it exactly once "
                "inside `with acc.microbatch():`"
            )

    def _undo(self, exc: BaseException | None) -> None:
        """The block raised (or never called backward): leave the window as before."""
        acc = self.acc
        if self.stage == _DONE:
            return  # the microbatch completed; the exception came after it
        machine = acc._machine
        if self.stage == _OPENED:
            if self.decision.isolate:
                acc._store.rollback()
            machine.cancel()
            return
        exact = acc._store.rollback()
        machine.cancel()
        if exact:
            return
        position = machine.state.position
        machine.abandon()
        acc._discard()
        add_note = getattr(exc, "add_note", None)  # Python 3.11+
        if add_note is not None:
            add_note(
                f"gradaccum: this microbatch failed inside backward after {position} earlier "
                f"microbatch(es) of its window had accumulated into param.grad; its partial "
                f"gradient cannot be separated from theirs, so the window was discarded "
                f"(gradients zeroed, no step, stats.dropped_windows). For an exact rollback use "
                f"accumulation_dtype='float32' or offload=True (the window then lives in a "
                f"buffer), or resume from a checkpoint taken before the window"
            )
