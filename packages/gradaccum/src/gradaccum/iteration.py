"""Knowing the last microbatch of a pass without prefetching a window."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["mark_last"]

T = TypeVar("T")


def mark_last(iterable: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yield ``(item, is_last)``, looking exactly one item ahead.

    The one-item look-ahead is what lets the last microbatch of a pass be a
    boundary (synced, stepped) even when the pass length is unknown; it
    never holds more than one extra item, unlike prefetching a whole window.
    """
    iterator = iter(iterable)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True
