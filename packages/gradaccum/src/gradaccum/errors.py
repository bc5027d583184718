"""The exception hierarchy.

Every error gradaccum raises on purpose is a `GradAccumError`. Each
message names the problem, the value that was seen, and the fix. Errors about
bad input are raised *before* any state changes: a call that raises leaves the
accumulator, the model, the optimizer and any checkpoint on disk exactly as
they were.

Subclasses also derive from the closest built-in exception (``ValueError``,
``TypeError``, ``RuntimeError``, ...) so that code written against the
standard library's conventions keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointChecksumError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointVersionError",
    "ConfigError",
    "DistributedError",
    "GradAccumError",
    "ItemCountError",
    "NonFiniteGradientError",
    "UsageError",
]


class GradAccumError(Exception):
    """Base class of every error gradaccum raises on purpose."""


class ConfigError(GradAccumError, ValueError):
    """A configuration value is invalid: accumulation steps, a schedule, a
    policy name, a clipping threshold, a gradient weight, ..."""


class ItemCountError(GradAccumError, ValueError):
    """An item count is missing, negative or not an integer in ``items``
    normalization (or given where it cannot be used)."""


class UsageError(GradAccumError, RuntimeError):
    """The accumulator was driven out of order: backward called twice in one
    microbatch, backward outside the microbatch context, a checkpoint taken
    inside a microbatch, a loss that is not a scalar, ..."""


class NonFiniteGradientError(GradAccumError, FloatingPointError):
    """A window's gradient holds ``inf`` or ``nan`` and the non-finite policy
    is ``raise``."""


class DistributedError(GradAccumError, RuntimeError):
    """Ranks disagree (different numbers of microbatches, different
    configurations) or a peer is gone."""


class CheckpointError(GradAccumError):
    """A checkpoint cannot be written or read."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """A checkpoint is truncated, has a malformed manifest or safetensors
    header, a missing or extra file, or a manifest that fails the schema."""


class CheckpointVersionError(CheckpointError, ValueError):
    """A checkpoint's format version is not one this release can read."""


class CheckpointChecksumError(CheckpointCorruptError):
    """A file's, header's or tensor's digest (SHA-256, or a tensor's CRC-32 in
    format 3) does not match the manifest."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A valid checkpoint does not fit what it is loaded into: different
    parameter names, shapes or dtypes, or a different configuration."""
