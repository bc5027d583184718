"""Statistics and the event protocol that loggers consume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, SupportsFloat, runtime_checkable

__all__ = ["AccumulationCallback", "AccumulationListener", "AccumulationStats"]


@dataclass(frozen=True, slots=True)
class AccumulationStats:
    """A snapshot of accumulation progress.

    ``optimizer_steps`` is the *effective step*: the x-axis loggers should
    use, one point per optimizer update whatever the accumulation.
    ``last_grad_norm`` is the total gradient norm of the last closed window
    before clipping (``None`` until a window closes with clipping by norm);
    it is read from the device only when this attribute is accessed, so
    building stats never forces a host sync.
    """

    micro_steps: int
    optimizer_steps: int
    skipped_steps: int
    dropped_microbatches: int
    dropped_windows: int
    position: int
    window_size: int
    items_in_window: int
    items_total: int
    epoch: int
    is_accumulating: bool
    effective_batch_size: int | None
    world_size: int
    _grad_norm: SupportsFloat | None = field(default=None, repr=False)

    @property
    def effective_step(self) -> int:
        """Successful optimizer steps (alias of ``optimizer_steps``)."""
        return self.optimizer_steps

    @property
    def last_grad_norm(self) -> float | None:
        """Pre-clip gradient norm of the last closed window (reads the device)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    @property
    def grad_norm_value(self) -> SupportsFloat | None:
        """The same norm without reading it: the device tensor (or number) as the
        boundary left it, for a logger that batches its host reads; ``None``
        when no norm was computed."""
        return self._grad_norm

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for logging (reads ``last_grad_norm`` from the device)."""
        data = asdict(self)
        data.pop("_grad_norm")
        data["last_grad_norm"] = self.last_grad_norm
        data["effective_step"] = self.effective_step
        return data


@runtime_checkable
class AccumulationListener(Protocol):
    """Receives accumulation events. Implement any subset by subclassing
    `AccumulationCallback`, whose methods do nothing."""

    def on_microbatch(self, stats: AccumulationStats) -> None:
        """After every microbatch's backward (before the boundary's step)."""

    def on_step(self, stats: AccumulationStats) -> None:
        """After a successful optimizer step (and scheduler step)."""

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        """After a closed window did not step; ``reason`` is the outcome
        (``"amp_overflow"``, ``"non_finite"`` or ``"empty"``)."""

    def on_epoch_end(self, stats: AccumulationStats) -> None:
        """After a pass ends and its partial-window policy is applied."""


class AccumulationCallback:
    """A listener whose methods do nothing; override the ones you need."""

    def on_microbatch(self, stats: AccumulationStats) -> None:
        """Called after each microbatch."""

    def on_step(self, stats: AccumulationStats) -> None:
        """Called after each optimizer step."""

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        """Called after each skipped window."""

    def on_epoch_end(self, stats: AccumulationStats) -> None:
        """Called after each pass."""
