"""Item counts held in tensors (``normalization="items"``, ACC-N3).

A count given as a tensor stays on the device: no host read per microbatch.
What can be checked without a read is checked when the microbatch begins (a
0-d tensor of a real or integer dtype); its value — finite, ``>= 0``,
integral — is checked at the boundary, inside the boundary's one read, on
every rank at once (a bad count on one rank fails the window on all).
"""

from __future__ import annotations

import torch

from gradaccum.errors import ItemCountError

__all__ = ["ItemCounter", "check_count_tensor"]


def check_count_tensor(count: torch.Tensor) -> None:
    """Raise `ItemCountError` unless ``count`` is a 0-d tensor of an integer or
    floating dtype (no host read: its value is checked at the boundary)."""
    if count.dim() != 0:
        raise ItemCountError(
            f"items= tensor of shape {tuple(count.shape)} must be 0-d (one count for the "
            f"microbatch): sum it first, e.g. mask.sum()"
        )
    if count.dtype == torch.bool or count.is_complex():
        raise ItemCountError(
            f"items= tensor of dtype {count.dtype} is not a count; give an integer or "
            f"floating tensor, e.g. mask.sum()"
        )


class ItemCounter:
    """The device item counts of the open window on this rank."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: list[torch.Tensor] = []

    def add(self, count: torch.Tensor) -> None:
        """Record a microbatch's count (kept as given: no device work now)."""
        self._counts.append(count)

    def __bool__(self) -> bool:
        """True when the open window has a device count."""
        return bool(self._counts)

    def clear(self) -> None:
        """Forget the window's counts (after its boundary, or when it is discarded)."""
        self._counts.clear()

    def local(self, device: torch.device, host: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, bad)``: this rank's item count of the window (the device
        counts plus the ``host`` count) and a flag, ``> 0`` when some device
        count is not a finite integer ``>= 0``; both 0-d float64 on ``device``.
        No host read."""
        total = torch.full((), float(host), dtype=torch.float64, device=device)
        if not self._counts:
            return total, torch.zeros((), dtype=torch.float64, device=device)
        counts = torch.stack([c.to(device=device, dtype=torch.float64) for c in self._counts])
        bad = (~torch.isfinite(counts) | (counts < 0) | (counts != torch.round(counts))).any()
        return total + counts.sum(), bad.to(torch.float64)

    def export(self, device: torch.device) -> torch.Tensor | None:
        """The window's device count as one 0-d float64 tensor for a checkpoint,
        NaN when some count is bad (so the resumed boundary refuses it), or
        ``None`` without device counts."""
        if not self._counts:
            return None
        total, bad = self.local(device, 0)
        return torch.where(bad > 0, torch.full_like(total, float("nan")), total)

    def load(self, count: torch.Tensor | None) -> None:
        """Replace the counts with a checkpoint's (`export` output)."""
        self._counts = [] if count is None else [count.detach().clone()]

    def counts(self) -> list[torch.Tensor]:
        """The recorded counts (memory probes)."""
        return list(self._counts)


def bad_count_error(rank_flags: list[float]) -> ItemCountError:
    """The error for a window whose device item counts were bad on some ranks."""
    ranks = [r for r, flag in enumerate(rank_flags) if flag > 0]
    where = "" if len(rank_flags) == 1 else f" on rank(s) {ranks}"
    return ItemCountError(
        f"an item count given as a tensor{where} was negative, non-integral, inf or nan; the "
        f"window was discarded (gradients zeroed, no step, counted in stats.dropped_windows) "
        f"and training can go on. Give counts such as mask.sum() of the items the summed "
        f"loss covers"
    )
