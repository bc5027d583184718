"""`GradAccum`: exact gradient accumulation under ``Trainer.fit``, as a Callback.

The user's ``LightningModule`` stays as it is: ``training_step`` returns the
mean loss, or ``{"loss": summed_loss, "items": n}`` for ``items``
normalization. At ``on_fit_start`` the callback switches the module to manual
optimization and wraps its ``training_step`` on the instance; from then on
the gradaccum core decides, and the callback applies the decisions through
Lightning's own machinery:

* the backward is ``manual_backward`` (the precision plugin scales the loss;
  under DDP, ``strategy.model.no_sync()`` is held around it on every
  microbatch but the window's last: one gradient reduction per window);
* the optimizer is stepped through ``LightningOptimizer.step()`` only for
  successful steps, so ``trainer.global_step`` counts optimizer steps and the
  precision plugin unscales exactly once (the boundary works in the scaled
  domain: it never unscales itself);
* the LR schedulers are stepped by the callback: ``interval="step"`` ones once
  per ``frequency`` successful optimizer steps, ``interval="epoch"`` ones at
  the end of each epoch — never after an AMP-skipped step;
* logging, validation and ``ModelCheckpoint`` see windows: Lightning's
  "is this microbatch accumulating" question is answered by the core.

Spec references (``ACC-…``) point into ``spec/accumulation.md``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.nn.parallel import DistributedDataParallel

from gradaccum.checkpoint import FORMAT_VERSION, open_checkpoint
from gradaccum.config import AccumulationConfig
from gradaccum.errors import CheckpointMismatchError, ConfigError, GradAccumError, UsageError
from gradaccum.machine import AccumulationMachine
from gradaccum.policies import (
    AccumulationDType,
    ClipPolicy,
    GradientWeights,
    NonFinitePolicy,
    Normalization,
    PartialWindowPolicy,
)
from gradaccum.schedules import Fixed, Schedule
from gradaccum.state import AccumulationState
from gradaccum.stats import AccumulationListener, AccumulationStats
from gradaccum_ddp.collectives import communication_errors, gather_bytes, gather_rows
from gradaccum_ddp.distributed import DDPDistributed
from gradaccum_lightning._version import PRODUCER, __version__
from gradaccum_torch import Accumulator, SingleProcess
from gradaccum_torch.accumulator import unknown_keywords
from gradaccum_torch.tensor_io import tensors_from_bytes, tensors_to_bytes

__all__ = ["GradAccum", "LightningFramework"]

STATE_FORMAT = 1
"""Version of the callback's ``state_dict`` layout inside Lightning checkpoints."""

_REFUSED_HOOKS = (
    "optimizer_step",
    "optimizer_zero_grad",
    "backward",
    "lr_scheduler_step",
    "configure_gradient_clipping",
)
"""LightningModule hooks manual optimization stops calling: overriding one with
GradAccum would silently lose it."""


class LightningFramework:
    """`gradaccum_torch.Framework` for the Lightning Trainer in manual optimization."""

    def __init__(self, trainer: pl.Trainer, module: pl.LightningModule, prefix: str) -> None:
        self.trainer = trainer
        self.module = module
        self._prefix = prefix
        self._optimizer: torch.optim.Optimizer = trainer.optimizers[0]
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None) if isinstance(plugin, MixedPrecision) else None
        self._scaler: torch.amp.GradScaler | None = (
            scaler if scaler is not None and scaler.is_enabled() else None
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The raw torch optimizer (``trainer.optimizers[0]``)."""
        return self._optimizer

    @property
    def scheduler(self) -> Any | None:
        """The first non-plateau LR scheduler (what shared-format checkpoints carry)."""
        for config in self.trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                return config.scheduler
        return None

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's GradScaler (fp16), or ``None``."""
        return self._scaler

    @property
    def scaled_boundary(self) -> bool:
        """True under fp16: the plugin's optimizer step unscales, so the boundary
        must not (a second ``unscale_`` raises)."""
        return self._scaler is not None

    @property
    def name_prefix(self) -> str:
        """The user's model's attribute in the LightningModule, with a dot."""
        return self._prefix

    def backward(self, loss: torch.Tensor) -> None:
        """``LightningModule.manual_backward`` (the plugin scales the loss)."""
        self.module.manual_backward(loss)

    def step_optimizer(self) -> None:
        """``LightningOptimizer.step()``: the plugin unscales, runs
        ``on_before_optimizer_step``, steps through the scaler; ``global_step``
        grows by one."""
        optimizer = self.module.optimizers()
        assert not isinstance(optimizer, list)
        optimizer.step()

    def skip_step(self) -> None:
        """After an AMP overflow (or an empty window): unscale the still-scaled
        gradient so the scaler records the overflow, and update (the scale
        backs off). Lightning does not count the step."""
        scaler = self._scaler
        if scaler is None:
            return
        if any(p.grad is not None for g in self._optimizer.param_groups for p in g["params"]):
            scaler.unscale_(self._optimizer)
        if scaler._found_inf_per_device(self._optimizer):
            scaler.update()
        else:
            scaler.update(new_scale=scaler._scale)

    def step_scheduler(self) -> None:
        """Step every ``interval="step"`` scheduler whose ``frequency`` divides the
        optimizer steps taken (a ``ReduceLROnPlateau`` with its monitored metric)."""
        steps = self.trainer.global_step
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "step" and steps % config.frequency == 0:
                _step(self.trainer, config)

    def step_epoch_schedulers(self) -> None:
        """Step the ``interval="epoch"`` schedulers (at the end of an epoch)."""
        epoch = self.trainer.current_epoch + 1
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and epoch % config.frequency == 0:
                _step(self.trainer, config)


def _step(trainer: pl.Trainer, config: Any) -> None:
    scheduler = config.scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        metric = trainer.callback_metrics.get(config.monitor)
        if metric is None:
            if config.strict:
                raise ConfigError(
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; log "
                    f"it with self.log({config.monitor!r}, ...) or set strict=False"
                )
            return
        scheduler.step(metric)
    else:
        scheduler.step()


class _GradAccumAccumulator(Accumulator):
    producer = (PRODUCER, __version__)


class GradAccum(Callback):
    """Exact gradient accumulation for ``Trainer.fit``.

    ``Trainer(callbacks=[GradAccum(steps=8, normalization="items")])``; the
    LightningModule's ``training_step`` returns the mean loss, or
    ``{"loss": summed_loss, "items": n}`` (``n`` an int or a 0-d device
    tensor) under ``normalization="items"``.

    Args:
        steps: microbatches per window (``schedule=Fixed(steps)``).
        config: a full `gradaccum.AccumulationConfig` (exclusive with the options).
        schedule: windows' sizes (`gradaccum.Fixed`, `gradaccum.ByEpoch`, ...).
        normalization: ``"mean"``, ``"items"`` or ``"sum"``.
        partial_window: ``"step"``, ``"drop"`` or ``"carry"``.
        non_finite: ``"skip"``, ``"raise"`` or ``"drop_microbatch"``.
        clip: a `gradaccum.ClipPolicy`. ``Trainer(gradient_clip_val=...,
            gradient_clip_algorithm=...)`` becomes one (clipping once per
            window, after unscaling); giving both is an error.
        weights: `gradaccum.GradientWeights`.
        accumulation_dtype: ``"param"`` or ``"float32"``.
        offload: keep the window's gradient on the CPU.
        micro_batch_size: items per microbatch, for the effective batch size.
        model_attr: the attribute of the LightningModule that holds the user's
            model (``"model"`` for ``self.model``): shared-format checkpoints
            name parameters without it, so other stacks can resume them.
            ``None``: names as in the LightningModule.
        listeners: `gradaccum.AccumulationListener` objects (a W&B logger, ...).
        allow_replay: allow resuming a checkpoint taken in the middle of a
            window without a stateful train loader (Lightning would then feed
            the epoch's first batches again, not the ones after the
            checkpoint); refused by default.
        resume: a shared-format checkpoint directory (written by any gradaccum
            stack) to restore at the start of training: model, optimizer,
            scheduler, scaler, accumulation state, in-flight gradients. One
            taken mid-window is refused (`gradaccum.ConfigError`, before
            anything is loaded) unless the train loader is stateful or
            ``allow_replay=True``: Lightning knows nothing of its data position.
        log_each_window: Lightning's step-level logging and the logger's step
            follow optimizer steps (default True; see ``docs/lightning.md``).

    Refused with `gradaccum.ConfigError`, each with the ways out:
    ``Trainer(accumulate_grad_batches != 1)`` or a
    ``GradientAccumulationScheduler`` (two accumulators); strategies other
    than a single device and ``"ddp"``; several optimizers; a
    ``training_step`` that takes a ``dataloader_iter``; a LightningModule
    that is already in manual optimization or overrides a hook manual
    optimization stops calling (``optimizer_step``, ``optimizer_zero_grad``,
    ``backward``, ``lr_scheduler_step``, ``configure_gradient_clipping``).
    """

    def __init__(
        self,
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
        model_attr: str | None = None,
        listeners: Iterable[AccumulationListener] = (),
        allow_replay: bool = False,
        resume: str | os.PathLike[str] | None = None,
        log_each_window: bool = True,
        **unknown: NoReturn,
    ) -> None:
        if unknown:
            raise unknown_keywords(unknown, GradAccum.__init__)
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
            raise ConfigError(
                "config= was given together with steps or options; put everything in the config"
            )
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ConfigError(f"model_attr={model_attr!r} must be an attribute name or None")
        for name, flag in (("allow_replay", allow_replay), ("log_each_window", log_each_window)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name}={flag!r} must be True or False")
        self.config = config
        self.model_attr = model_attr
        self.listeners = list(listeners)
        self.allow_replay = allow_replay
        self.resume = None if resume is None else os.fspath(resume)
        self.log_each_window = log_each_window
        self._acc: _GradAccumAccumulator | None = None
        self._framework: LightningFramework | None = None
        self._pending: dict[str, Any] | None = None
        self._pass_complete = False
        self._stepped = False
        self._undo: list[Callable[[], None]] = []
        self._trainer: pl.Trainer | None = None

    # -- what users read ---------------------------------------------------------

    @property
    def accumulator(self) -> Accumulator:
        """The `gradaccum_torch.Accumulator` driving this fit (from ``on_fit_start`` on)."""
        if self._acc is None:
            raise UsageError("the accumulator exists once Trainer.fit has started")
        return self._acc

    @property
    def stats(self) -> AccumulationStats:
        """Counters and the last pre-clip gradient norm."""
        return self.accumulator.stats

    @property
    def effective_step(self) -> int:
        """Successful optimizer steps (equals ``trainer.global_step``)."""
        return self.accumulator.effective_step

    @classmethod
    def of(cls, trainer: pl.Trainer) -> GradAccum:
        """The GradAccum callback of ``trainer``."""
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, cls):
                return callback
        raise UsageError("this Trainer has no GradAccum callback")

    def estimated_optimizer_steps(self, trainer: pl.Trainer) -> int:
        """The optimizer steps ``trainer.fit`` will take if no step is skipped:
        what ``trainer.estimated_stepping_batches`` means in automatic
        optimization (it counts microbatches here). Needs a sized train loader
        and ``max_epochs`` or ``max_steps``."""
        batches = _finite(trainer.num_training_batches)
        if batches is None:
            # Called before the fit loop set up its data (from configure_optimizers, as
            # estimated_stepping_batches may be): set it up, as that property does.
            trainer.fit_loop.setup_data()
            batches = _finite(trainer.num_training_batches)
        if batches is None:
            raise UsageError(
                "estimated_optimizer_steps needs a train loader with len(); this one has none"
            )
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
        if epochs is None and max_steps is None:
            raise UsageError("estimated_optimizer_steps needs max_epochs or max_steps")
        steps = _count_windows(
            self.config, batches, epochs if epochs is not None else 10**9, max_steps
        )
        return steps if max_steps is None else min(steps, max_steps)

    def save(self, path: str | os.PathLike[str], *, format_version: int = FORMAT_VERSION) -> None:
        """Write a checkpoint in the shared gradaccum format (any stack resumes it;
        names without ``model_attr``), in ``format_version`` (see
        ``gradaccum_torch.Accumulator.save``). Between microbatches; on every rank."""
        self.accumulator.save(path, format_version=format_version)

    # -- Lightning hooks --------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"GradAccum supports one optimizer; configure_optimizers returned "
                f"{len(trainer.optimizers)}. Combine their parameter groups into one optimizer"
            )
        config = self.config
        clip_val = trainer.gradient_clip_val
        if clip_val:
            if config.clip is not None:
                raise ConfigError(
                    f"both Trainer(gradient_clip_val={clip_val}) and GradAccum(clip=...) were "
                    f"given; keep one"
                )
            by_value = trainer.gradient_clip_algorithm == "value"
            config = config.replace(
                clip=ClipPolicy(float(clip_val), mode="value" if by_value else "norm")
            )
        prefix = "" if self.model_attr is None else self.model_attr + "."
        framework = LightningFramework(trainer, pl_module, prefix)
        strategy = trainer.strategy
        distributed: Any
        if isinstance(strategy, DDPStrategy) and trainer.world_size > 1:
            ddp = strategy.model
            if not isinstance(ddp, DistributedDataParallel):
                raise ConfigError(
                    "the DDP strategy did not wrap the model in DistributedDataParallel"
                )
            distributed = DDPDistributed(ddp)
        else:
            distributed = SingleProcess()
        self._framework = framework
        self._trainer = trainer
        self._acc = _GradAccumAccumulator(
            pl_module,
            framework.optimizer,
            config=config,
            listeners=self.listeners,
            distributed=distributed,
            framework=framework,
        )
        self._take_over(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own zero_grad at the start of the run: restore in-flight gradients now.
        acc = self.accumulator
        if self.resume is not None and self._pending is None:
            # Refuse a replay before the load changes anything, every rank alike.
            self._refuse_everywhere(self._resume_refusal(trainer, self.resume), "resume")
            acc.load(self.resume)
            # The directory may have been replaced since that check: check what was loaded.
            self._refuse_everywhere(
                self._replay_refusal(trainer, acc.machine.state.position, via_resume=True),
                "continue the window",
            )
            return
        if self._pending is not None:
            self._restore(trainer, self._pending)
            self._pending = None
        refusal = self._replay_refusal(trainer, acc.machine.state.position)
        if refusal is not None:
            raise ConfigError(refusal)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pass_complete = False
        self._stepped = False
        if self.accumulator.distributed.world_size > 1:
            self.accumulator.begin_pass(_finite(trainer.num_training_batches))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch stopped early (max_steps, a callback) keeps its window open for a
        # checkpoint to carry, and does not step the epoch schedulers, as in Lightning.
        if self._pass_complete:
            assert self._framework is not None
            self._framework.step_epoch_schedulers()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_module()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips on_fit_end when fit raises: undo the wrappers here too.
        self._restore_module()

    def _restore_module(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def state_dict(self) -> dict[str, Any]:
        """The accumulation state and every rank's in-flight gradients (all ranks
        call it; rank 0's result is what Lightning writes)."""
        if self._acc is None:
            return {}
        return _gather_state(self._acc)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            if state_dict.get("format") != STATE_FORMAT:
                raise CheckpointMismatchError(
                    f"the checkpoint's GradAccum state has format {state_dict.get('format')!r}; "
                    f"this release reads {STATE_FORMAT}"
                )
            self._pending = state_dict

    # -- internals ------------------------------------------------------------------

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ways = "remove it and let GradAccum(steps=...) accumulate"
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) would "
                f"accumulate a second time: {ways}"
            )
        if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):  # type: ignore[attr-defined]
            raise ConfigError(
                f"a GradientAccumulationScheduler callback would accumulate a second time: {ways} "
                f"(GradAccum(schedule=ByEpoch({{epoch: k}})) does what it does)"
            )
        strategy = trainer.strategy
        if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ConfigError(
                f"GradAccum supports a single device and strategy='ddp' for now, not "
                f"{type(strategy).__name__}"
            )
        start_method = getattr(strategy, "_start_method", "popen")
        if start_method != "popen":
            raise ConfigError(
                f"strategy='ddp_{start_method}' runs the fit in child processes, so this "
                f"process's GradAccum (its stats, save()) never sees it: use strategy='ddp' "
                f"(Lightning starts the ranks as subprocesses, or launch with torchrun)"
            )
        if not pl_module.automatic_optimization and not getattr(
            pl_module, "_gradaccum_manual", False
        ):
            raise ConfigError(
                "the LightningModule is in manual optimization already (it steps its own "
                "optimizer); GradAccum drives optimization: return the loss from training_step "
                "and let GradAccum step"
            )
        overridden = [h for h in _REFUSED_HOOKS if is_overridden(h, pl_module)]
        if overridden:
            raise ConfigError(
                f"the LightningModule overrides {overridden}, which manual optimization (how "
                f"GradAccum drives Lightning) no longer calls: move that logic to GradAccum's "
                f"options (clip=, a listener, before_step on GradAccum.accumulator) or to "
                f"on_before_optimizer_step, or drop the callback"
            )
        import inspect

        if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
            raise ConfigError(
                "a training_step that takes dataloader_iter cannot tell GradAccum where a pass "
                "ends; take (batch, batch_idx)"
            )

    def _take_over(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Manual optimization, the wrapped training_step, and window-aware
        logging/validation, each undone at the end of the fit."""
        # Stays manual after the fit: trainer.global_step reads the manual counter then.
        pl_module.automatic_optimization = False
        vars(pl_module)["_gradaccum_manual"] = True  # read by setup() at the next fit
        original = pl_module.training_step
        wrapped = functools.wraps(original)(functools.partial(self._training_step, original))
        pl_module.training_step = wrapped  # type: ignore[method-assign]
        self._undo.append(lambda: _delete(pl_module, "training_step"))
        acc = self.accumulator

        def no_step_yet() -> bool:
            # Lightning's "is this batch accumulating?": until a window closes with a
            # successful step (a skipped window logs nothing and advances no logger step).
            return acc.is_accumulating or not self._stepped

        def zero_grad_between_windows() -> None:
            if not acc.is_accumulating:
                pl_module.zero_grad()

        pl_module.on_validation_model_zero_grad = zero_grad_between_windows  # type: ignore[method-assign]
        self._undo.append(lambda: _delete(pl_module, "on_validation_model_zero_grad"))
        if self.log_each_window:
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_should_accumulate"):
                loop._should_accumulate = no_step_yet  # type: ignore[method-assign]
                self._undo.append(lambda: _delete(loop, "_should_accumulate"))
            connector = trainer._logger_connector
            original_update = connector.update_train_step_metrics

            def update_at_boundaries() -> None:
                if not no_step_yet():
                    original_update()

            connector.update_train_step_metrics = update_at_boundaries  # type: ignore[method-assign]
            self._undo.append(lambda: _delete(connector, "update_train_step_metrics"))
        warnings.filterwarnings(
            "ignore",
            message="Using ModelCheckpoint with manual optimization and every_n_train_steps",
            category=UserWarning,
        )

    def _training_step(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        trainer = self._trainer
        assert trainer is not None
        last = bool(trainer.is_last_batch)
        if out is None:  # Lightning's "skip this batch": not a microbatch
            if last:
                self._end_pass()
            return None
        loss, items = _loss_and_items(out)
        length = _finite(trainer.num_training_batches)
        remaining: int | None = None
        if length is not None:
            remaining = length - int(trainer.fit_loop.epoch_loop.batch_idx)
            remaining = remaining if remaining >= 1 else None
        acc = self.accumulator
        with acc.microbatch(items, last=last, remaining=remaining):
            result = acc.backward(loss)
        if result.boundary:
            self._stepped = result.stepped
        if last:
            # The pass ends with its last microbatch, not in on_train_epoch_end: a
            # checkpoint saved after this batch must hold the ended pass (Lightning does
            # not call on_train_epoch_end for the epoch it resumes into).
            self._end_pass()
        return out

    def _end_pass(self) -> None:
        result = self.accumulator.end_pass()
        if result is not None and result.boundary:
            self._stepped = result.stepped
        self._pass_complete = True

    def _restore(self, trainer: pl.Trainer, state: Mapping[str, Any]) -> None:
        acc = self.accumulator
        world = acc.distributed.world_size
        parsed = AccumulationState.from_state_dict(state["accumulation"])
        saved_config = AccumulationConfig.from_dict(state["config"])
        if parsed.position > 0 and state.get("world_size") != world:
            raise CheckpointMismatchError(
                f"the checkpoint was taken mid-window on {state.get('world_size')} rank(s); it "
                f"resumes only on that many, not {world}. Checkpoints at a window boundary move "
                f"between world sizes"
            )
        rank = acc.distributed.rank
        gradients = (state.get("gradients") or {}).get(rank, {}) if parsed.position > 0 else {}
        items = (state.get("items") or {}).get(rank) if parsed.position > 0 else None
        acc.restore(parsed, saved_config, gradients, items)

    def _resume_refusal(self, trainer: pl.Trainer, resume: str) -> str | None:
        """Why ``resume`` may not be loaded with this train loader, read from the
        manifest and headers alone; ``None`` also when the checkpoint cannot be
        read or was taken mid-window on another number of processes: the load
        then raises the checkpoint's own error, the ranks agreeing on it."""
        try:
            with open_checkpoint(resume, verify=False) as ckpt:
                position = AccumulationState.from_state_dict(ckpt.state).position
                world = ckpt.world_size
        except GradAccumError:
            return None
        if position > 0 and world != self.accumulator.distributed.world_size:
            return None
        return self._replay_refusal(trainer, position, via_resume=True, loaded=False)

    def _refuse_everywhere(self, message: str | None, what: str) -> None:
        """Raise `ConfigError` on every rank when any rank refuses (``message``):
        the ranks decide together, so none goes on into a collective alone."""
        distributed = self.accumulator.distributed
        if distributed.world_size > 1:
            assert isinstance(distributed, DDPDistributed)
            rank = distributed.rank
            with communication_errors(f"agreeing whether to {what}", rank):
                rows = gather_rows(
                    [int(message is not None)], distributed.group, distributed.device
                )
            refusing = [r for r, row in enumerate(rows) if row[0]]
            if refusing and message is None:
                message = (
                    f"rank(s) {refusing} refused to {what} with their train loader (see the "
                    f"error there); every rank stops with them"
                    + ("; nothing was loaded" if what == "resume" else "")
                )
        if message is not None:
            raise ConfigError(message)

    def _replay_refusal(
        self, trainer: pl.Trainer, position: int, via_resume: bool = False, loaded: bool = True
    ) -> str | None:
        """Why continuing a window ``position`` microbatches in would replay
        batches into it, or ``None``."""
        if position == 0 or self.allow_replay:
            return None
        loader = trainer.train_dataloader
        loaders = getattr(loader, "flattened", None) or [loader]
        # Lightning restores stateful loaders since 2.2 (it keeps their saved states in
        # fit_loop._combined_loader_states_to_load until it applies them).
        restores = hasattr(trainer.fit_loop, "_combined_loader_states_to_load")
        stateful = restores and all(
            hasattr(x, "state_dict") and hasattr(x, "load_state_dict") for x in loaders
        )
        unapplied = getattr(trainer.fit_loop, "_combined_loader_states_to_load", [])
        if stateful and unapplied:
            return (
                "this checkpoint was taken in the middle of a window and the train loader is "
                "stateful, but Lightning has not given it its saved position (the loader was "
                "set up before the checkpoint was restored, e.g. by reading "
                "trainer.estimated_stepping_batches in configure_optimizers; Lightning issue "
                "#20550): it would replay the epoch's first batches into the open window. Read "
                "it elsewhere (on_train_start), or pass GradAccum(allow_replay=True)"
            )
        if stateful:
            return None
        if via_resume:
            return (
                f"GradAccum(resume={self.resume!r}) restores a checkpoint taken in the middle of "
                f"a window ({position} microbatches in), and Lightning knows nothing of its data "
                f"position: the callback cannot tell whether this train loader starts at the "
                f"microbatch after the checkpoint or replays batches into the open window. Give "
                f"the fit a loader over the rest of the interrupted pass and pass "
                f"GradAccum(allow_replay=True) to confirm it (a stateful loader, with "
                f"state_dict/load_state_dict, is taken as positioned), or resume from a "
                f"checkpoint taken between windows" + ("; nothing was loaded" if not loaded else "")
            )
        return (
            f"this checkpoint was taken in the middle of a window ({position} "
            f"microbatches in), but the train loader is not stateful: Lightning would feed the "
            f"epoch's first batches again, not the ones after the checkpoint. Use a stateful "
            f"loader (torchdata.stateful_dataloader.StatefulDataLoader), checkpoint at window "
            f"boundaries (ModelCheckpoint(every_n_train_steps=...) does), or pass "
            f"GradAccum(allow_replay=True) to accept the replay"
        )


def _finite(batches: int | float) -> int | None:
    """``trainer.num_training_batches`` as an int, ``None`` when infinite (no ``len()``)."""
    if isinstance(batches, float) and not math.isfinite(batches):
        return None
    return int(batches)


def _delete(obj: Any, name: str) -> None:
    if name in vars(obj):
        delattr(obj, name)


def _loss_and_items(out: Any) -> tuple[torch.Tensor, int | torch.Tensor | None]:
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, Mapping) and "loss" in out:
        items = out.get("items")
        return out["loss"], items
    raise UsageError(
        f"training_step returned {type(out).__name__}; return the loss tensor, or "
        f"{{'loss': summed_loss, 'items': n}} under normalization='items' (None skips the batch)"
    )


def _count_windows(
    config: AccumulationConfig, batches: int, epochs: int, max_steps: int | None
) -> int:
    """Closed windows over ``epochs`` passes of ``batches`` microbatches, as the
    core decides them (every microbatch told how many remain)."""
    if isinstance(config.schedule, Fixed) and config.partial_window != "carry":
        full, rest = divmod(batches, config.schedule.k)
        per_epoch = full + (1 if rest and config.partial_window == "step" else 0)
        return per_epoch * epochs
    machine = AccumulationMachine(config)
    items = 1 if config.normalization == "items" else None
    windows = 0
    for _ in range(epochs):
        for index in range(batches):
            machine.begin(items, remaining_in_pass=batches - index)
            if machine.end() is not None:
                machine.commit()
                windows += 1
                if max_steps is not None and windows >= max_steps:
                    return windows
        if machine.end_pass().action == "close":
            machine.commit()
            windows += 1
    return windows


def _gather_state(acc: Accumulator) -> dict[str, Any]:
    """The callback's checkpoint state on every rank; rank 0's holds every rank's
    in-flight gradients and device item counts (gathered as safetensors bytes)."""
    machine_state = acc.machine.state_dict()
    config = acc.config.to_dict()
    distributed = acc.distributed
    world, rank = distributed.world_size, distributed.rank
    local_grads = {n: t.detach() for n, t in acc.gradients.export().items()}
    local_items = acc.inflight_items()
    if acc.config.normalization == "items" and machine_state["position"] > 0:
        # Each rank's host count of the open window moves into its own items tensor, so
        # the one state rank 0 writes is true for every rank (as gradaccum-ddp does).
        host = float(machine_state["items_in_window"])
        device = (
            local_items.detach().cpu()
            if local_items is not None
            else torch.zeros((), dtype=torch.float64)
        )
        local_items = device + host
        machine_state = {**machine_state, "items_in_window": 0, "device_items": True}
    if world == 1:
        gradients = {0: {n: t.clone() for n, t in local_grads.items()}}
        items = {0: None if local_items is None else local_items.detach().clone()}
    else:
        assert isinstance(distributed, DDPDistributed)
        blob = tensors_to_bytes(
            {
                **{f"g.{n}": t for n, t in local_grads.items()},
                **({} if local_items is None else {"items": local_items}),
            }
        )
        with communication_errors("gathering in-flight gradients for a checkpoint", rank):
            rows = gather_rows([len(blob)], distributed.group, distributed.device)
            blobs = gather_bytes(blob, distributed.group, distributed.device, [r[0] for r in rows])
        gradients, items = {}, {}
        for r, data in enumerate(blobs or []):
            tensors = tensors_from_bytes(data) if data else {}
            gradients[r] = {k[2:]: v for k, v in tensors.items() if k.startswith("g.")}
            items[r] = tensors.get("items")
    return {
        "format": STATE_FORMAT,
        "accumulation": machine_state,
        "config": config,
        "world_size": world,
        "gradients": gradients,
        "items": items,
    }
