"""Learning-rate scaling rules for a changed effective batch."""

from __future__ import annotations

import math

from gradaccum.errors import ConfigError

__all__ = ["linear_scaled_lr", "sqrt_scaled_lr"]


def _check(base_lr: float, effective_batch: int, reference_batch: int) -> None:
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)):
        raise ConfigError(f"base_lr={base_lr!r} must be a number")
    if not math.isfinite(base_lr) or base_lr <= 0:
        raise ConfigError(f"base_lr={base_lr!r} must be finite and > 0")
    for name, value in (("effective_batch", effective_batch), ("reference_batch", reference_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def linear_scaled_lr(base_lr: float, effective_batch: int, reference_batch: int) -> float:
    """``base_lr × effective_batch / reference_batch`` (Goyal et al., 2017):
    the rule for SGD when the batch grows by accumulation or more ranks."""
    _check(base_lr, effective_batch, reference_batch)
    return base_lr * effective_batch / reference_batch


def sqrt_scaled_lr(base_lr: float, effective_batch: int, reference_batch: int) -> float:
    """``base_lr × sqrt(effective_batch / reference_batch)``: the rule often
    preferred for Adam-family optimizers."""
    _check(base_lr, effective_batch, reference_batch)
    return base_lr * math.sqrt(effective_batch / reference_batch)
