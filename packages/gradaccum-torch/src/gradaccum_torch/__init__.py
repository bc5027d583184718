"""gradaccum-torch: exact, fast gradient accumulation for plain PyTorch loops.

>>> acc = Accumulator(model, optimizer, steps=4)           # doctest: +SKIP
>>> for x, y in acc.iterate(loader):                        # doctest: +SKIP
...     with acc.microbatch():
...         acc.backward(loss_fn(model(x), y))
"""

from __future__ import annotations

from gradaccum import (
    AccumulationConfig,
    AdaptiveMicrobatch,
    ByEpoch,
    ByStep,
    ClipPolicy,
    Fixed,
    GradientWeights,
    TargetBatch,
)
from gradaccum_torch._version import PRODUCER, __version__
from gradaccum_torch.accumulator import Accumulator
from gradaccum_torch.adaptive import AdaptiveOutOfMemoryError, OOMEvent, is_out_of_memory
from gradaccum_torch.boundary import BackwardResult
from gradaccum_torch.contract import (
    Distributed,
    DistributedCheckpoints,
    Framework,
    SingleProcess,
    TorchFramework,
)
from gradaccum_torch.memory import MemoryMonitor, Recommendations
from gradaccum_torch.naming import canonical_name, named_parameters
from gradaccum_torch.performance import PerformanceTracker

__all__ = [
    "PRODUCER",
    "AccumulationConfig",
    "Accumulator",
    "AdaptiveMicrobatch",
    "AdaptiveOutOfMemoryError",
    "BackwardResult",
    "ByEpoch",
    "ByStep",
    "ClipPolicy",
    "Distributed",
    "DistributedCheckpoints",
    "Fixed",
    "Framework",
    "GradientWeights",
    "MemoryMonitor",
    "OOMEvent",
    "PerformanceTracker",
    "Recommendations",
    "SingleProcess",
    "TargetBatch",
    "TorchFramework",
    "__version__",
    "canonical_name",
    "is_out_of_memory",
    "named_parameters",
]
