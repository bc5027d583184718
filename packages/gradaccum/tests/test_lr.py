"""Learning-rate scaling helpers (ACC-S4) and the one-ahead iterator (ACC-W4)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from gradaccum import ConfigError, linear_scaled_lr, mark_last, sqrt_scaled_lr


def test_linear_rule() -> None:
    """ACC-S4: lr × B / B_ref, exactly."""
    assert linear_scaled_lr(0.5, 8, 2) == 2.0
    assert linear_scaled_lr(0.25, 64, 256) == 0.0625
    assert linear_scaled_lr(1, 3, 3) == 1.0


def test_sqrt_rule() -> None:
    """ACC-S4: lr × sqrt(B / B_ref), exactly."""
    assert sqrt_scaled_lr(0.5, 8, 2) == 1.0
    assert sqrt_scaled_lr(3.0, 16, 64) == 1.5
    assert sqrt_scaled_lr(1.0, 2, 1) == math.sqrt(2)


@pytest.mark.parametrize("rule", [linear_scaled_lr, sqrt_scaled_lr])
@pytest.mark.parametrize(
    ("args", "shown"),
    [
        ((0.0, 8, 2), "0.0"),
        ((-0.1, 8, 2), "-0.1"),
        ((math.nan, 8, 2), "nan"),
        ((math.inf, 8, 2), "inf"),
        (("0.1", 8, 2), "'0.1'"),
        ((0.1, 0, 2), "effective_batch=0"),
        ((0.1, 8, 2.0), "reference_batch=2.0"),
        ((0.1, True, 2), "effective_batch=True"),
    ],
)
def test_bad_lr_inputs(rule: Any, args: tuple[Any, ...], shown: str) -> None:
    """ACC-S4, ACC-E4: lr finite > 0, batches int >= 1; the message names the value."""
    with pytest.raises(ConfigError) as info:
        rule(*args)
    assert shown in str(info.value)


def test_mark_last_empty() -> None:
    """ACC-W4: nothing in, nothing out."""
    assert list(mark_last([])) == []


def test_mark_last_one() -> None:
    """ACC-W4: a single item is the last."""
    assert list(mark_last(["a"])) == [("a", True)]


def test_mark_last_many() -> None:
    """ACC-W4: only the final item is marked last."""
    assert list(mark_last(range(4))) == [(0, False), (1, False), (2, False), (3, True)]


def test_mark_last_looks_one_ahead_only() -> None:
    """ACC-W4: on a generator, at most one item is read ahead — never a window."""
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in range(5):
            pulled.append(i)
            yield i

    marked = mark_last(source())
    assert next(marked) == (0, False)
    assert pulled == [0, 1]
    assert next(marked) == (1, False)
    assert pulled == [0, 1, 2]
    assert list(marked) == [(2, False), (3, False), (4, True)]
