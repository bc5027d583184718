"""gradaccum-accelerate: exact, fast gradient accumulation for Hugging Face Accelerate.

>>> model, optimizer, dataloader, scheduler = accelerator.prepare(            # doctest: +SKIP
...     model, optimizer, dataloader, scheduler)
>>> acc = Accumulator(accelerator, model, optimizer, steps=8, scheduler=scheduler)  # doctest: +SKIP
>>> for batch in acc.iterate(dataloader):                                      # doctest: +SKIP
...     with acc.microbatch():
...         acc.backward(loss_fn(model(batch["x"]), batch["y"]))

Several processes on CPUs: ``ACCELERATE_USE_CPU=1 torchrun --nproc-per-node=2 train.py``;
see ``docs/accelerate.md``.
"""

from __future__ import annotations

from gradaccum import AccumulationConfig, ClipPolicy, Fixed, GradientWeights
from gradaccum_accelerate._version import PRODUCER, __version__
from gradaccum_accelerate.accumulator import (
    SUPPORTED,
    AccelerateFramework,
    AcceleratorProcesses,
    Accumulator,
    ProcessGroupOfAccelerator,
)

__all__ = [
    "PRODUCER",
    "SUPPORTED",
    "AccelerateFramework",
    "AcceleratorProcesses",
    "AccumulationConfig",
    "Accumulator",
    "ClipPolicy",
    "Fixed",
    "GradientWeights",
    "ProcessGroupOfAccelerator",
    "__version__",
]
