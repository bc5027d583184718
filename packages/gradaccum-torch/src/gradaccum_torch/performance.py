"""`PerformanceTracker`: time per microbatch and per boundary, items/s, steps/s.

A listener (``Accumulator(..., listeners=[tracker])``). On the CPU it reads
``time.perf_counter`` at each event. On CUDA it records a CUDA event per
microbatch and reads their times only at the boundary, after synchronising on
the boundary's event: no host sync per microbatch (the boundary already makes
its one read). ``metrics()`` returns ``dict[str, float]`` for loggers (e.g. the
``extra`` hook of ``gradaccum_wandb``); ``postfix()`` is the progress bar's
text (optimizer steps, items/s).

"Host reads per step" counts the device-to-host reads gradaccum made per
optimizer step: the boundary's one read (ACC-B3), plus, on several ranks
while `Accumulator.run` is active, one status exchange per microbatch attempt
(read from ``acc.adaptive.flag_exchanges``).
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

import torch

from gradaccum.errors import ConfigError
from gradaccum.stats import AccumulationCallback, AccumulationStats

if TYPE_CHECKING:
    from gradaccum_torch.accumulator import Accumulator

__all__ = ["PerformanceTracker"]


class PerformanceTracker(AccumulationCallback):
    """Throughput and latency of the accumulation loop.

    Args:
        acc: the accumulator (for its adaptive exchanges and device); the
            tracker registers itself as its listener.
        device: CUDA events are used when this is a CUDA device (the
            accumulator's parameters' device by default).
    """

    def __init__(self, acc: Accumulator, *, device: torch.device | str | None = None) -> None:
        from gradaccum_torch.accumulator import Accumulator

        if not isinstance(acc, Accumulator):
            raise ConfigError(
                f"PerformanceTracker(acc={acc!r}) needs a gradaccum_torch Accumulator (or an "
                f"adapter's, which is one)"
            )
        try:
            chosen = torch.device(device) if device is not None else acc._device()
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device={device!r} is not a torch device ({exc}); pass e.g. 'cpu' or 'cuda:0'"
            ) from None
        self._acc = acc
        self.device = chosen
        self._cuda = self.device.type == "cuda"
        self._events: list[Any] = []
        self._started = time.perf_counter()
        self._last = self._started
        self._window_start = self._started
        self._microbatch_seconds = 0.0
        self._boundary_seconds = 0.0
        self._microbatches = 0
        self._steps = 0
        self._windows = 0
        self._items = 0
        self._exchanges_at_start = 0
        self._last_mark = self._started
        self.last_microbatch_seconds = 0.0
        """Mean time of the last window's microbatches."""
        self.last_boundary_seconds = 0.0
        """Time of the last boundary (normalize, check, step, zero)."""
        acc.add_listener(self)
        self._boundary_began: float | None = None
        if self._cuda:
            self._events.append(_cuda_event())

    def on_microbatch(self, stats: AccumulationStats) -> None:
        if self._cuda:
            self._events.append(_cuda_event())
        else:
            now = time.perf_counter()
            self._events.append(now)
        self._microbatches += 1
        if self._is_boundary(stats):
            self._boundary_began = time.perf_counter()

    def _is_boundary(self, stats: AccumulationStats) -> bool:
        return stats.position >= stats.window_size

    def on_step(self, stats: AccumulationStats) -> None:
        self._close(stats)

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        self._close(stats)

    def _close(self, stats: AccumulationStats) -> None:
        now = time.perf_counter()
        marks = self._events
        if self._cuda and marks:
            marks[-1].synchronize()  # the boundary's read already waited for this work
            first = marks[0]
            seconds = [first.elapsed_time(e) / 1e3 for e in marks[1:]]
            per = [b - a for a, b in zip([0.0, *seconds[:-1]], seconds, strict=True)]
        else:
            per = [b - a for a, b in itertools.pairwise([self._last_mark, *marks])]
        if per:
            self.last_microbatch_seconds = sum(per) / len(per)
            self._microbatch_seconds += sum(per)
        began = self._boundary_began if self._boundary_began is not None else now
        self.last_boundary_seconds = max(0.0, now - began)
        self._boundary_seconds += self.last_boundary_seconds
        self._boundary_began = None
        self._windows += 1
        self._steps = stats.optimizer_steps
        self._items = stats.items_total
        self._last_mark = time.perf_counter()
        self._events = [_cuda_event()] if self._cuda else []
        self._last = now

    def metrics(self) -> dict[str, float]:
        """Numbers for a logger, all floats: ``perf/items_per_s``,
        ``perf/steps_per_s``, ``perf/microbatch_ms``, ``perf/boundary_ms``,
        ``perf/host_reads_per_step``."""
        elapsed = max(self._last - self._started, 1e-12)
        windows = max(self._windows, 1)
        exchanges = self._acc._adaptive.flag_exchanges if self._acc._adaptive is not None else 0
        return {
            "perf/items_per_s": self._items / elapsed,
            "perf/steps_per_s": self._steps / elapsed,
            "perf/microbatch_ms": 1e3 * self._microbatch_seconds / max(self._microbatches, 1),
            "perf/boundary_ms": 1e3 * self._boundary_seconds / windows,
            "perf/host_reads_per_step": 1.0 + exchanges / windows,
        }

    def postfix(self) -> str:
        """A progress bar's text: optimizer steps and items/s."""
        m = self.metrics()
        return f"step {self._steps}, {m['perf/items_per_s']:.0f} items/s"


def _cuda_event() -> Any:
    event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    event.record()
    return event
