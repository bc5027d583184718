"""gradaccum: exact, fast, portable gradient accumulation — the core.

This package imports no framework. It owns the *decisions* (when to sync,
what to multiply, whether to step); adapters such as ``gradaccum_torch``
own the tensors and apply them.
"""

from __future__ import annotations

from gradaccum.checkpoint.format import SPEC_VERSION
from gradaccum.config import AccumulationConfig
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    ConfigError,
    DistributedError,
    GradAccumError,
    ItemCountError,
    NonFiniteGradientError,
    UsageError,
)
from gradaccum.iteration import mark_last
from gradaccum.lr import linear_scaled_lr, sqrt_scaled_lr
from gradaccum.machine import AccumulationMachine
from gradaccum.policies import ClipPolicy, GradientWeights
from gradaccum.schedules import (
    AdaptiveMicrobatch,
    ByEpoch,
    ByStep,
    Fixed,
    Schedule,
    TargetBatch,
    schedule_from_dict,
)
from gradaccum.state import (
    AccumulationState,
    CommitDecision,
    MicrobatchDecision,
    PassDecision,
    Phase,
    Topology,
    WindowDecision,
)
from gradaccum.stats import AccumulationCallback, AccumulationListener, AccumulationStats

__version__ = "0.1.0"

__all__ = [
    "SPEC_VERSION",
    "AccumulationCallback",
    "AccumulationConfig",
    "AccumulationListener",
    "AccumulationMachine",
    "AccumulationState",
    "AccumulationStats",
    "AdaptiveMicrobatch",
    "ByEpoch",
    "ByStep",
    "CheckpointChecksumError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointVersionError",
    "ClipPolicy",
    "CommitDecision",
    "ConfigError",
    "DistributedError",
    "Fixed",
    "GradAccumError",
    "GradientWeights",
    "ItemCountError",
    "MicrobatchDecision",
    "NonFiniteGradientError",
    "PassDecision",
    "Phase",
    "Schedule",
    "TargetBatch",
    "Topology",
    "UsageError",
    "WindowDecision",
    "__version__",
    "linear_scaled_lr",
    "mark_last",
    "schedule_from_dict",
    "sqrt_scaled_lr",
]
