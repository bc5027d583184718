"""`WandbLogger`: one W&B row per optimizer step, on its own x-axis.

::

    run = wandb.init(project="demo")
    logger = WandbLogger(run)
    acc = Accumulator(model, optimizer, steps=8, normalization="items")
    logger.attach(acc)
    for batch in acc.iterate(loader):
        with acc.microbatch(items=batch.n):
            loss = loss_fn(model(batch.x), batch.y)   # a sum over items
            logger.stage({"loss": loss})              # kept on the device
            acc.backward(loss)                        # the step logs one row

Rows are logged with ``run.log(row)`` and never with wandb's ``step=``: the
x value is a metric of its own (``optimizer_step`` by default, declared with
``run.define_metric``), so a skipped window, a resumed run or another writer
of the same run cannot make wandb drop a row.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeAlias

import torch

from gradaccum.errors import ConfigError, UsageError
from gradaccum.stats import AccumulationCallback, AccumulationStats

__all__ = ["ExtraMetrics", "Reduce", "WandbLogger"]

Reduce: TypeAlias = Literal["mean", "sum", "items", "item_mean"]
"""How a staged metric is reduced over a window (see `WandbLogger.stage`)."""

ExtraMetrics: TypeAlias = Callable[[], Mapping[str, Any]]
"""A zero-argument callable returning metrics to add to every step's row."""

_REDUCES: tuple[str, ...] = ("mean", "sum", "items", "item_mean")
_DEFAULT_REDUCE: dict[str, Reduce] = {"mean": "mean", "items": "items", "sum": "sum"}
Number = float | int | torch.Tensor


class WandbLogger(AccumulationCallback):
    """Log accumulation progress to Weights & Biases once per optimizer step.

    A `gradaccum.AccumulationListener`. Each successful optimizer step logs
    one row whose x value is the number of successful optimizer steps so far
    (1, 2, ..., N) under ``step_metric``; a window that closes without a step
    (AMP overflow, a non-finite gradient, an empty window) logs one row at the
    *same* x value as the last successful step, marked ``<prefix>skipped = 1``
    with ``<prefix>skip_reason``. A step row holds:

    * ``<prefix>skipped`` (0), ``<prefix>skipped_steps``, ``<prefix>micro_steps``,
      ``<prefix>microbatches`` (in the window), ``<prefix>items_in_window``
      (over all ranks), ``<prefix>items_total``, ``<prefix>epoch`` and
      ``<prefix>effective_batch_size`` (when ``micro_batch_size`` is known);
    * ``<prefix>lr`` (one param group) or ``<prefix>lr/<group name or index>``:
      the learning rate the step used (read right before the optimizer step,
      before the scheduler moves it), when attached to an accumulator;
    * ``<prefix>grad_norm``: the window's pre-clip gradient norm, only with
      ``grad_norm=True`` (one device-to-host read per step; the accumulator
      must compute it: ``track_grad_norm=True`` or clipping by norm);
    * the metrics staged during the window (`stage`), reduced over it;
    * the metrics returned by the ``extra`` callables, read at the step.

    Only rank 0 logs (the rank comes from ``rank=``, else the attached
    accumulator's distributed side, else ``torch.distributed``); on the other
    ranks every method returns at once and nothing is read from the device.

    Args:
        run: the wandb ``Run`` to log to, a zero-argument callable returning
            it (resolved at the first row, on rank 0 only: e.g.
            ``lambda: lightning_wandb_logger.experiment``), or ``None`` for
            the active ``wandb.run``.
        step_metric: the x-axis metric. ``"trainer/global_step"`` shares the
            axis of Lightning's ``WandbLogger`` (gradaccum-lightning makes
            ``global_step`` equal the optimizer steps).
        prefix: prefix of the accumulation metrics (``"accum/"``).
        grad_norm: log the pre-clip gradient norm (a host read per step).
        learning_rates: log the learning rate of every param group.
        extra: callables returning metrics for every step's row (e.g. a
            throughput or memory monitor); more with `add_extra`.
        rank: this process's rank, overriding the detection.
        first_step: the x value of the first optimizer step (x = optimizer
            steps so far + ``first_step`` - 1). ``0`` lines the rows up with
            Lightning's, which logs a window's ``self.log`` values at the
            global step *before* its optimizer step (0, 1, ...).

    Bad arguments raise `gradaccum.ConfigError`; misuse raises
    `gradaccum.UsageError`.
    """

    def __init__(
        self,
        run: Any | Callable[[], Any] | None = None,
        *,
        step_metric: str = "optimizer_step",
        prefix: str = "accum/",
        grad_norm: bool = False,
        learning_rates: bool = True,
        extra: Iterable[ExtraMetrics] = (),
        rank: int | None = None,
        first_step: int = 1,
    ) -> None:
        if not isinstance(step_metric, str) or not step_metric:
            raise ConfigError(f"step_metric={step_metric!r} must be a non-empty string")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix={prefix!r} must be a string ('' for none)")
        if prefix and step_metric.startswith(prefix):
            raise ConfigError(
                f"step_metric={step_metric!r} starts with prefix={prefix!r}; the x-axis cannot "
                f"be one of the metrics plotted against it: pick another name"
            )
        for name, flag in (("grad_norm", grad_norm), ("learning_rates", learning_rates)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name}={flag!r} must be True or False")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ConfigError(f"rank={rank!r} must be an int >= 0 or None")
        if isinstance(first_step, bool) or not isinstance(first_step, int):
            raise ConfigError(f"first_step={first_step!r} must be an int (1, or 0 for Lightning)")
        if run is not None and not callable(run) and not callable(getattr(run, "log", None)):
            raise ConfigError(
                f"run={run!r} must be a wandb run (with .log), a callable returning one "
                f"(e.g. lambda: wandb.run), or None for the current wandb.run"
            )
        extras = list(extra)
        for fn in extras:
            if not callable(fn):
                raise ConfigError(f"extra={fn!r} must be a callable returning a mapping")
        self.step_metric = step_metric
        self.prefix = prefix
        self.grad_norm = grad_norm
        self.learning_rates = learning_rates
        self._run_source = run
        self._run: Any | None = None
        self._extras: list[ExtraMetrics] = extras
        self._rank = rank
        self.first_step = first_step
        self._target: Any | None = None
        self._acc: Any | None = None
        self._defined: set[str] = set()
        self._x = first_step - 1
        # window bookkeeping
        self._pending: list[tuple[str, Number, Number | None, Reduce]] = []
        self._sums: dict[str, list[Any]] = {}  # key -> [reduce, numerator, denominator]
        self._lr: dict[str, float] | None = None
        self._seen_items_in_window = 0
        self._seen_items_total = 0
        self._seen_micro = 0
        self._seen_dropped_micro = 0
        self._seen_dropped_windows = 0
        self._started = False

    # -- wiring ----------------------------------------------------------------

    def attach(self, target: Any) -> WandbLogger:
        """Listen to an accumulator (any gradaccum torch adapter's, through
        ``add_listener``) or to a `gradaccum_lightning.GradAccum` callback
        (added to its ``listeners`` before ``Trainer.fit``). The accumulator
        gives the normalization (the default reduction of staged metrics),
        the learning rates and the rank. Returns the logger."""
        if self._target is not None:
            raise UsageError("this WandbLogger is already attached; make one logger per run")
        if callable(getattr(target, "add_listener", None)) and hasattr(target, "machine"):
            if not any(x is self for x in target.machine.listeners):
                target.add_listener(self)  # not when it was given as listeners=[logger]
            self._acc = target
        elif isinstance(getattr(target, "listeners", None), list) and isinstance(
            getattr(type(target), "accumulator", None), property
        ):
            if self not in target.listeners:
                target.listeners.append(self)
        else:
            raise ConfigError(
                f"cannot attach to {type(target).__name__}: pass a gradaccum accumulator "
                f"(gradaccum_torch.Accumulator, DDPAccumulator, gradaccum_accelerate.Accumulator) "
                f"or a gradaccum_lightning.GradAccum callback"
            )
        self._target = target
        self._hook(self._acc)
        return self

    def add_extra(self, fn: ExtraMetrics) -> None:
        """Add a callable whose metrics join every step's row (read at the step)."""
        if not callable(fn):
            raise ConfigError(f"extra={fn!r} must be a callable returning a mapping")
        self._extras.append(fn)

    def _hook(self, acc: Any | None) -> None:
        add = getattr(acc, "add_before_step", None)
        if callable(add) and self.learning_rates and self.rank == 0:
            add(self._capture_lr)

    def _accumulator(self) -> Any | None:
        if self._acc is None and self._target is not None:
            try:
                acc = self._target.accumulator
            except UsageError:
                return None
            self._acc = acc
            self._hook(acc)
        return self._acc

    @property
    def rank(self) -> int:
        """This process's rank: only rank 0 logs."""
        if self._rank is None:
            acc = self._acc
            if acc is not None:
                self._rank = int(acc.distributed.rank)
            elif torch.distributed.is_available() and torch.distributed.is_initialized():
                self._rank = int(torch.distributed.get_rank())
            else:
                return 0
        return self._rank

    @property
    def run(self) -> Any:
        """The wandb run rows go to (resolved on first use, rank 0 only)."""
        if self._run is None:
            source = self._run_source
            if source is None:
                import wandb

                run = wandb.run
            elif callable(source) and not hasattr(source, "log"):
                run = source()
            else:
                run = source
            if run is None or not callable(getattr(run, "log", None)):
                raise UsageError(
                    f"no W&B run to log to (got {run!r}): call wandb.init() before training, "
                    f"or pass WandbLogger(run=...)"
                )
            self._run = run
        return self._run

    # -- staging ---------------------------------------------------------------

    def stage(
        self,
        metrics: Mapping[str, Number],
        *,
        items: int | torch.Tensor | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        """Stage a microbatch's metrics for the window's row; call it before
        that microbatch's ``backward`` (the boundary's backward logs the row).

        Values may be Python numbers or one-element tensors: tensors stay on
        the device (no host read per microbatch); the row's values are read
        in one transfer at the step. The window's value of a metric is, with
        ``v_j`` its value in contributing microbatch ``j`` and ``n_j`` that
        microbatch's item count (``items=``, else the accumulator's host
        count; pass ``items=`` when counts live on the device):

        * ``"items"``: ``Σ v_j / Σ n_j`` — ``v_j`` a sum over the microbatch's
          items (the loss under ``normalization="items"``, ACC-N2): the
          item-weighted mean of the per-item values;
        * ``"item_mean"``: ``Σ v_j n_j / Σ n_j`` — ``v_j`` already a per-item mean;
        * ``"mean"``: ``Σ v_j / c`` over the ``c`` contributing microbatches (ACC-N1);
        * ``"sum"``: ``Σ v_j`` (ACC-N4).

        The default ``reduce`` follows the accumulator's normalization
        (``items`` → ``"items"``, ``mean`` → ``"mean"``, ``sum`` → ``"sum"``),
        so the staged loss is reduced exactly as its gradient is. Microbatches
        dropped by ``non_finite="drop_microbatch"`` and dropped windows
        contribute nothing; a skipped window's staged metrics are discarded.
        """
        if self.rank != 0:
            return
        if not isinstance(metrics, Mapping):
            raise UsageError(f"stage() takes a mapping of metric names to values, got {metrics!r}")
        if reduce is None:
            reduce = self._default_reduce()
        elif reduce not in _REDUCES:
            raise ConfigError(f"reduce={reduce!r} must be one of {', '.join(_REDUCES)}")
        count: Number | None = None if items is None else _check_value("items", items)
        if isinstance(count, int | float) and not count >= 0:
            raise UsageError(f"items={items!r} must be >= 0 (the microbatch's item count)")
        checked = [(str(k), _check_value(k, v)) for k, v in metrics.items()]
        for key, _value in checked:
            if not key:
                raise UsageError("a staged metric needs a non-empty name")
            if key == self.step_metric:
                raise UsageError(f"{key!r} is the x-axis; stage it under another name")
            # One reduction per metric and window, refused here, before the microbatch's
            # backward counts it (not at that backward, after the gradient was summed).
            earlier = self._sums[key][0] if key in self._sums else None
            earlier = earlier or next((r for k, _, _, r in self._pending if k == key), None)
            if earlier is not None and earlier != reduce:
                raise UsageError(
                    f"metric {key!r} was staged with reduce={earlier!r} and now "
                    f"reduce={reduce!r} in one window; use one reduction per metric"
                )
        if not self._started:
            acc = self._accumulator()
            if acc is not None:
                # Before this microbatch's backward: the state the logger starts from (a
                # resumed run's counters, the items already in a resumed window).
                st = acc.stats
                self._sync(st, st.micro_steps - st.position, st.items_in_window)
        for key, value in checked:
            self._pending.append((key, value, count, reduce))

    def _default_reduce(self) -> Reduce:
        acc = self._accumulator()
        if acc is None:
            raise UsageError(
                "stage() without reduce= needs the accumulator's normalization: call "
                "logger.attach(acc) (or attach(grad_accum_callback) before Trainer.fit), or "
                "pass reduce='items' | 'item_mean' | 'mean' | 'sum'"
            )
        return _DEFAULT_REDUCE[acc.config.normalization]

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Log ``metrics`` now, in a row of their own at the current x value
        (the optimizer steps so far): validation metrics, for instance."""
        if self.rank != 0:
            return
        if not isinstance(metrics, Mapping):
            raise UsageError(f"log() takes a mapping of metric names to values, got {metrics!r}")
        acc = self._accumulator()
        if acc is not None:
            self._x = int(acc.stats.optimizer_steps) + self.first_step - 1
        row = {str(k): v for k, v in metrics.items()}
        self._emit(row)

    # -- events ------------------------------------------------------------------

    def _begin_event(self, stats: AccumulationStats) -> bool:
        """False on ranks other than 0. The first event of a run resumed from a checkpoint
        (possibly mid-window) sets the counters the row's differences start from."""
        if self.rank != 0:
            return False
        self._accumulator()
        if not self._started:
            # After the event's microbatch: the counters before it are not all known, but the
            # ones the rows difference are (no microbatch of this logger was weighted yet).
            self._sync(stats, stats.micro_steps - stats.position, 0)
        return True

    def _sync(self, stats: AccumulationStats, micro_before_window: int, items: int) -> None:
        self._started = True
        if micro_before_window > 0 or stats.optimizer_steps + stats.skipped_steps > 0:
            self._seen_micro = micro_before_window
            self._seen_items_total = stats.items_total
            self._seen_items_in_window = items
            self._seen_dropped_micro = stats.dropped_microbatches
            self._seen_dropped_windows = stats.dropped_windows
            self._x = stats.optimizer_steps + self.first_step - 1

    def on_microbatch(self, stats: AccumulationStats) -> None:
        """Give the pending staged values their microbatch's weight."""
        if not self._begin_event(stats):
            return
        self._check_dropped_windows(stats)
        dropped = stats.dropped_microbatches > self._seen_dropped_micro
        self._seen_dropped_micro = stats.dropped_microbatches
        before = 0 if stats.position <= 1 else self._seen_items_in_window
        host_items = stats.items_in_window - before
        self._seen_items_in_window = stats.items_in_window
        pending, self._pending = self._pending, []
        if dropped:
            return
        for key, value, items, reduce in pending:
            n: Number = host_items if items is None else items
            entry = self._sums.get(key)
            if entry is None:
                entry = self._sums[key] = [reduce, 0.0, 0.0]
            elif entry[0] != reduce:
                raise UsageError(
                    f"metric {key!r} was staged with reduce={entry[0]!r} and then "
                    f"reduce={reduce!r} in one window; use one reduction per metric"
                )
            if reduce == "items":
                entry[1] = entry[1] + _as_float(value)
                entry[2] = entry[2] + n
            elif reduce == "item_mean":
                entry[1] = entry[1] + _as_float(value) * n
                entry[2] = entry[2] + n
            elif reduce == "mean":
                entry[1] = entry[1] + _as_float(value)
                entry[2] = entry[2] + 1
            else:
                entry[1] = entry[1] + _as_float(value)

    def _check_dropped_windows(self, stats: AccumulationStats) -> None:
        if stats.dropped_windows > self._seen_dropped_windows:
            self._seen_dropped_windows = stats.dropped_windows
            self._sums.clear()
            self._lr = None

    def _capture_lr(self, acc: Any) -> None:
        self._lr = _learning_rates(acc.optimizer.param_groups)

    def on_step(self, stats: AccumulationStats) -> None:
        """Log the step's row (see the class docstring)."""
        if not self._begin_event(stats):
            return
        acc = self._accumulator()
        p = self.prefix
        row: dict[str, Any] = {
            p + "skipped": 0,
            p + "skipped_steps": stats.skipped_steps,
            p + "micro_steps": stats.micro_steps,
            p + "microbatches": stats.micro_steps - self._seen_micro,
            p + "items_in_window": stats.items_total - self._seen_items_total,
            p + "items_total": stats.items_total,
            p + "epoch": stats.epoch,
        }
        if stats.effective_batch_size is not None:
            row[p + "effective_batch_size"] = stats.effective_batch_size
        if self.learning_rates:
            lrs = self._lr
            if lrs is None and acc is not None:
                lrs = _learning_rates(acc.optimizer.param_groups)
            for name, lr in (lrs or {}).items():
                row[p + "lr" if name == "" else f"{p}lr/{name}"] = lr
        lazy: dict[str, torch.Tensor] = {}
        if self.grad_norm:
            norm = stats.grad_norm_value
            if norm is None:
                raise ConfigError(
                    "WandbLogger(grad_norm=True) but the accumulator computes no gradient norm: "
                    "build it with track_grad_norm=True (or clip by norm)"
                )
            if isinstance(norm, torch.Tensor):
                lazy[p + "grad_norm"] = norm
            else:
                row[p + "grad_norm"] = float(norm)
        sums, self._sums = self._sums, {}
        for key, (reduce, num, den) in sums.items():
            if reduce == "sum":
                value = num
            else:
                if not isinstance(den, torch.Tensor) and den == 0:
                    raise UsageError(
                        f"staged metric {key!r} has no item count in this window (reduce="
                        f"{reduce!r}): the item counts are on the device, so pass them to "
                        f"stage(..., items=n)"
                    )
                value = num / den
            _put(row, lazy, key, value)
        for fn in self._extras:
            metrics = fn()
            if not isinstance(metrics, Mapping):
                raise UsageError(
                    f"extra metrics callable {fn!r} returned {metrics!r}, not a mapping"
                )
            for key, value in metrics.items():
                _put(row, lazy, str(key), value)
        if lazy:
            first = next(iter(lazy.values()))
            stacked = torch.stack(
                [
                    t.detach().reshape(()).to(first.device, _dtype(first.device))
                    for t in lazy.values()
                ]
            )
            for key, value in zip(lazy, stacked.tolist(), strict=True):  # the one host read
                row[key] = value
        self._mark(stats)
        self._x = stats.optimizer_steps + self.first_step - 1
        self._emit(row)

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        """Log a skipped window at the last successful step's x value."""
        if not self._begin_event(stats):
            return
        self._sums.clear()
        self._pending.clear()
        p = self.prefix
        row = {
            p + "skipped": 1,
            p + "skip_reason": reason,
            p + "skipped_steps": stats.skipped_steps,
            p + "micro_steps": stats.micro_steps,
            p + "microbatches": stats.micro_steps - self._seen_micro,
            p + "epoch": stats.epoch,
        }
        self._mark(stats)
        self._x = stats.optimizer_steps + self.first_step - 1
        self._emit(row)

    def on_epoch_end(self, stats: AccumulationStats) -> None:
        """Forget what a dropped partial window staged."""
        if not self._begin_event(stats):
            return
        self._check_dropped_windows(stats)

    def _mark(self, stats: AccumulationStats) -> None:
        self._seen_micro = stats.micro_steps
        self._seen_items_total = stats.items_total
        self._seen_items_in_window = 0
        self._lr = None

    # -- writing -----------------------------------------------------------------

    def _emit(self, row: dict[str, Any]) -> None:
        run = self.run
        if self.step_metric not in self._defined:
            run.define_metric(self.step_metric)
            if self.prefix:
                run.define_metric(self.prefix + "*", step_metric=self.step_metric)
            self._defined.add(self.step_metric)
        for key in row:
            if key not in self._defined and not (self.prefix and key.startswith(self.prefix)):
                run.define_metric(key, step_metric=self.step_metric)
                self._defined.add(key)
        run.log({self.step_metric: self._x, **row})


def _check_value(key: object, value: object) -> Number:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise UsageError(
                f"metric {key!r}: a tensor must hold one real number, got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}; reduce it first (.mean(), .sum())"
            )
        return value.detach()
    if isinstance(value, bool):
        raise UsageError(f"metric {key!r}: {value!r} is a bool, not a number; log int(value)")
    if isinstance(value, int):
        return value
    if not isinstance(value, numbers.Real):
        raise UsageError(f"metric {key!r}: {value!r} is not a number or a one-element tensor")
    return float(value)


def _as_float(value: Number) -> Number:
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(_dtype(value.device))
    return float(value)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _put(row: dict[str, Any], lazy: dict[str, torch.Tensor], key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        lazy[key] = value
    else:
        row[key] = value


def _learning_rates(groups: list[dict[str, Any]]) -> dict[str, float]:
    if len(groups) == 1:
        return {"": float(groups[0]["lr"])}
    return {str(g.get("name") or i): float(g["lr"]) for i, g in enumerate(groups)}
