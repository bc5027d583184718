"""`MemoryMonitor`: memory at the points that matter, a trend, and advice with numbers.

A listener (``Accumulator(..., listeners=[monitor])``) that records memory

* after a forward (`Accumulator.run` calls ``on_forward(rows)``; in a loop of
  your own call ``monitor.on_forward(rows)`` after computing the loss),
* after each backward (``on_microbatch``),
* at each boundary (``on_step`` / ``on_skip``).

On CUDA it reads the caching allocator's counters (allocated, reserved, peak:
host-side bookkeeping, no device synchronisation); on the CPU the process's
resident set (``/proc/self/statm``, else ``psutil`` when installed; peak from
``VmHWM``). The boundary values form the trend (bytes per optimizer step, a
least-squares slope over the last ``window`` steps). `recommendations`
turns the numbers into advice: memory per row of a microbatch, the largest
microbatch under ``budget_bytes``, and whether ``offload=True`` or
``accumulation_dtype="float32"`` pays.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from gradaccum.errors import ConfigError
from gradaccum.stats import AccumulationCallback, AccumulationStats

__all__ = ["CPU_PEAK_FACTOR", "MemoryMonitor", "MemorySample", "Recommendations"]

CPU_PEAK_FACTOR = 3.0
"""On the CPU: estimated peak bytes of a row = this × its saved activations."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One reading: ``point`` is ``"forward"``, ``"backward"`` or ``"boundary"``;
    bytes; ``peak`` is the high-water mark so far (CUDA: since the last boundary)."""

    point: str
    step: int
    rows: int
    current: int
    reserved: int
    peak: int


@dataclass(frozen=True, slots=True)
class Recommendations:
    """What the numbers say (bytes unless named otherwise).

    Attributes:
        activation_bytes_per_row: the bytes autograd saved for the backward
            per row of a microbatch (exact, under `Accumulator.run`: see
            `MemoryMonitor.forward_context`); ``None`` before such a forward.
        bytes_per_row: the estimated *peak* memory one row adds: on CUDA
            measured (the allocator's peak between boundaries minus the
            boundary baseline, per row, the largest seen); on the CPU, where no
            peak counter exists, ``CPU_PEAK_FACTOR`` × the activations (the
            backward holds the saved activations, their gradients and the
            inputs' gradients at once); ``None`` before a forward.
        largest_microbatch: the most rows whose activations fit under
            ``budget_bytes`` on top of the baseline, or ``None``.
        gradient_bytes: the gradient of the optimized parameters.
        offload_pays: moving the window's gradient to the CPU frees at least
            one row's worth of device memory (CUDA only; CPU memory is the
            same memory).
        float32_pays: the parameters are fp16/bf16 and the window holds more
            than one microbatch: fp32 accumulation avoids rounding each
            addition, at ``float32_extra_bytes`` of extra memory.
        float32_extra_bytes: the extra buffer fp32 accumulation would hold.
        trend_bytes_per_step: boundary memory growth per optimizer step
            (a leak if persistently > 0).
        advice: the same as sentences.
    """

    activation_bytes_per_row: float | None
    bytes_per_row: float | None
    largest_microbatch: int | None
    gradient_bytes: int
    offload_pays: bool
    float32_pays: bool
    float32_extra_bytes: int
    trend_bytes_per_step: float
    advice: tuple[str, ...]


class MemoryMonitor(AccumulationCallback):
    """Record memory after forward, after backward and at the boundary.

    Args:
        model: the trained module (its parameters size the gradient).
        device: where to measure; the parameters' device by default.
        budget_bytes: the memory you allow; on CUDA the device's total memory
            by default, on the CPU ``MemTotal``.
        threshold: the fraction of ``budget_bytes`` to plan for (0.9).
        window: boundary readings kept for the trend.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device | str | None = None,
        budget_bytes: int | None = None,
        threshold: float = 0.9,
        window: int = 50,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0.0 < threshold <= 1.0
        ):
            raise ConfigError(f"threshold={threshold!r} must lie in (0, 1], e.g. 0.9")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigError(f"window={window!r} must be an int >= 2")
        if budget_bytes is not None and (
            isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0
        ):
            raise ConfigError(
                f"budget_bytes={budget_bytes!r} must be a positive int (bytes) or None for the "
                f"device's total memory"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            self.device = torch.device(
                device if device is not None else (params[0].device if params else "cpu")
            )
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device={device!r} is not a torch device ({exc}); pass e.g. 'cpu' or 'cuda:0'"
            ) from None
        self._cuda = self.device.type == "cuda"
        self._params = params
        self._param_ptrs = [p.untyped_storage().data_ptr() for p in params]
        self._saved: int | None = None
        self._cpu_peak = 0
        self.threshold = threshold
        self.budget_bytes = budget_bytes if budget_bytes is not None else self._total()
        self.samples: list[MemorySample] = []
        """Every reading, in order (bounded: the last 10,000)."""
        self._boundaries: deque[tuple[int, int]] = deque(maxlen=window)
        self._baseline: int | None = None
        self._per_row: list[float] = []
        self._peak_per_row: list[float] = []
        self._rows = 0
        self._step = 0
        self._microbatches_in_window = 0
        self._max_window = 0

    # -- reading memory ---------------------------------------------------------

    def _total(self) -> int:
        if self._cuda:
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemTotal:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        psutil = _psutil()
        return 0 if psutil is None else int(psutil.virtual_memory().total)

    def read(self) -> tuple[int, int, int]:
        """``(current, reserved, peak)`` bytes now. CUDA: allocated, reserved,
        max allocated; CPU: resident set, resident set, peak resident set
        (the peak as of the last boundary)."""
        if self._cuda:
            return (
                int(torch.cuda.memory_allocated(self.device)),
                int(torch.cuda.memory_reserved(self.device)),
                int(torch.cuda.max_memory_allocated(self.device)),
            )
        rss = _cpu_rss()
        return rss, rss, max(rss, self._cpu_peak)

    def _record(self, point: str, rows: int = 0) -> MemorySample:
        current, reserved, peak = self.read()
        sample = MemorySample(point, self._step, rows, current, reserved, peak)
        if len(self.samples) >= 10_000:
            del self.samples[:1000]
        self.samples.append(sample)
        return sample

    # -- listener events ----------------------------------------------------------

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        """Wrap a forward in it to measure its activations exactly: the bytes
        of the tensors autograd saves for the backward (each storage once,
        parameters excluded). `Accumulator.run` does it for you."""
        self._saved = 0
        seen: set[int] = set(self._param_ptrs)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                self._saved = (self._saved or 0) + storage.nbytes()
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def on_forward(self, rows: int) -> None:
        """After a microbatch's forward of ``rows`` rows (its activations alive)."""
        sample = self._record("forward", rows)
        if rows > 0:
            if self._saved is not None:
                self._per_row.append(self._saved / rows)
            elif self._baseline is not None:
                self._per_row.append(max(0, sample.current - self._baseline) / rows)
            del self._per_row[:-100]
        self._saved = None
        self._rows = rows

    def on_microbatch(self, stats: AccumulationStats) -> None:
        sample = self._record("backward", self._rows)
        if self._cuda and self._baseline is not None and self._rows > 0:
            self._peak_per_row.append(max(0, sample.peak - self._baseline) / self._rows)
            del self._peak_per_row[:-100]
            torch.cuda.reset_peak_memory_stats(self.device)
        self._microbatches_in_window += 1

    def on_step(self, stats: AccumulationStats) -> None:
        self._boundary(stats)

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        self._boundary(stats)

    def _boundary(self, stats: AccumulationStats) -> None:
        self._step = stats.optimizer_steps
        if not self._cuda:
            self._cpu_peak = _cpu_peak()  # /proc/self/status: read once per window
        sample = self._record("boundary")
        self._baseline = sample.current
        self._boundaries.append((stats.optimizer_steps, sample.current))
        self._max_window = max(self._max_window, self._microbatches_in_window)
        self._microbatches_in_window = 0
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    # -- conclusions ----------------------------------------------------------------

    def trend(self) -> float:
        """Boundary memory growth in bytes per optimizer step (least squares)."""
        points = list(self._boundaries)
        if len(points) < 2:
            return 0.0
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        var = sum((p[0] - mx) ** 2 for p in points)
        if var == 0:
            return 0.0
        return sum((p[0] - mx) * (p[1] - my) for p in points) / var

    def recommendations(self) -> Recommendations:
        """Advice from the readings so far (see `Recommendations`)."""
        activations = max(self._per_row) if self._per_row else None
        if self._peak_per_row:
            per_row: float | None = max(self._peak_per_row)
        else:
            per_row = None if activations is None else activations * CPU_PEAK_FACTOR
        grad_bytes = sum(p.numel() * p.element_size() for p in self._params)
        low = [p for p in self._params if p.dtype in (torch.float16, torch.bfloat16)]
        extra32 = sum(p.numel() * 4 for p in low)
        largest: int | None = None
        advice: list[str] = []
        budget = int(self.budget_bytes * self.threshold)
        if per_row is not None and per_row > 0 and self._baseline is not None:
            largest = max(0, int((budget - self._baseline) // per_row))
            advice.append(
                f"a row of a microbatch takes about {per_row / 2**20:.3f} MiB at the peak; "
                f"above the {self._baseline / 2**20:.0f} MiB baseline, {largest} rows fit under "
                f"{self.threshold:.0%} of {self.budget_bytes / 2**20:.0f} MiB"
            )
        offload = bool(self._cuda and per_row and grad_bytes >= per_row)
        if offload and per_row:
            advice.append(
                f"offload=True frees {grad_bytes / 2**20:.1f} MiB of device gradient, room for "
                f"{int(grad_bytes // per_row)} more rows per microbatch"
            )
        float32 = bool(low) and self._max_window > 1
        if float32:
            advice.append(
                f"{len(low)} fp16/bf16 parameter(s) summed over {self._max_window} microbatches: "
                f"accumulation_dtype='float32' keeps the sum exact for "
                f"{extra32 / 2**20:.1f} MiB more"
            )
        slope = self.trend()
        if slope > 0 and len(self._boundaries) >= 10:
            advice.append(f"memory at the boundary grows {slope / 2**20:.2f} MiB per step")
        return Recommendations(
            activation_bytes_per_row=activations,
            bytes_per_row=per_row,
            largest_microbatch=largest,
            gradient_bytes=grad_bytes,
            offload_pays=offload,
            float32_pays=float32,
            float32_extra_bytes=extra32,
            trend_bytes_per_step=slope,
            advice=tuple(advice),
        )

    def metrics(self) -> dict[str, float]:
        """Numbers for a logger (e.g. ``gradaccum_wandb``'s ``extra``), all floats:
        ``mem/current_mib`` and ``mem/peak_mib`` at the last boundary,
        ``mem/trend_mib_per_step``, and once a forward was seen
        ``mem/bytes_per_row`` and ``mem/largest_microbatch``."""
        out: dict[str, float] = {}
        boundary = next((s for s in reversed(self.samples) if s.point == "boundary"), None)
        if boundary is not None:
            out["mem/current_mib"] = boundary.current / 2**20
            out["mem/peak_mib"] = boundary.peak / 2**20
        rec = self.recommendations()
        out["mem/trend_mib_per_step"] = rec.trend_bytes_per_step / 2**20
        if rec.bytes_per_row is not None:
            out["mem/bytes_per_row"] = float(rec.bytes_per_row)
        if rec.largest_microbatch is not None:
            out["mem/largest_microbatch"] = float(rec.largest_microbatch)
        return out

    def summary(self) -> dict[str, Any]:
        """The latest reading of each point and the recommendations, as plain data."""
        last: dict[str, Any] = {}
        for sample in self.samples:
            last[sample.point] = {
                "current_mib": sample.current / 2**20,
                "reserved_mib": sample.reserved / 2**20,
                "peak_mib": sample.peak / 2**20,
            }
        rec = self.recommendations()
        return {
            "points": last,
            "activation_bytes_per_row": rec.activation_bytes_per_row,
            "bytes_per_row": rec.bytes_per_row,
            "largest_microbatch": rec.largest_microbatch,
            "trend_bytes_per_step": rec.trend_bytes_per_step,
            "advice": list(rec.advice),
        }


_STATM: list[int] = []  # an open descriptor of /proc/self/statm (pread: no open per read)


def _cpu_rss() -> int:
    try:
        if not _STATM:
            _STATM.append(os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_STATM[0], 128, 0).split()[1]) * _PAGE
    except OSError:
        pass
    psutil = _psutil()
    return 0 if psutil is None else int(psutil.Process().memory_info().rss)


def _psutil() -> Any:
    """psutil when installed (not a dependency: used where /proc is missing)."""
    try:
        return importlib.import_module("psutil")
    except ImportError:  # pragma: no cover
        return None


def _cpu_peak() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
