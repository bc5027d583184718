"""gradaccum-ddp: exact, fast gradient accumulation for torch DistributedDataParallel.

>>> acc = DDPAccumulator(ddp_model, optimizer, steps=8)    # doctest: +SKIP
>>> for x, y in acc.iterate(loader):                        # doctest: +SKIP
...     with acc.microbatch():
...         acc.backward(loss_fn(ddp_model(x), y))

Launch with ``torchrun --nproc-per-node=N train.py``; see ``docs/ddp.md``.
"""

from __future__ import annotations

from gradaccum import (
    AccumulationConfig,
    ClipPolicy,
    DistributedError,
    Fixed,
    GradientWeights,
)
from gradaccum_ddp._version import PRODUCER, __version__
from gradaccum_ddp.accumulator import DDPAccumulator, Lockstep

__all__ = [
    "PRODUCER",
    "AccumulationConfig",
    "ClipPolicy",
    "DDPAccumulator",
    "DistributedError",
    "Fixed",
    "GradientWeights",
    "Lockstep",
    "__version__",
]
