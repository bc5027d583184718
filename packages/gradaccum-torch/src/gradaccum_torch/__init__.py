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
from gradaccum_torch.boundary import BackwardResult
from gradaccum_torch.contract import (
    Distributed,
    DistributedCheckpoints,
    Framework,
    SingleProcess,
    TorchFramework,
)
from gradaccum_torch.naming import canonical_name, named_parameters

__all__ = [
    "PRODUCER",
    "AccumulationConfig",
    "Accumulator",
    "AdaptiveMicrobatch",
    "BackwardResult",
    "ByEpoch",
    "ByStep",
    "ClipPolicy",
    "Distributed",
    "DistributedCheckpoints",
    "Fixed",
    "Framework",
    "GradientWeights",
    "SingleProcess",
    "TargetBatch",
    "TorchFramework",
    "__version__",
    "canonical_name",
    "named_parameters",
]
