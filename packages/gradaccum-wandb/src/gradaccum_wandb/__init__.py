"""gradaccum-wandb: Weights & Biases logging at optimizer steps.

>>> logger = WandbLogger(wandb.init(project="demo")).attach(acc)   # doctest: +SKIP
>>> with acc.microbatch(items=n):                                  # doctest: +SKIP
...     loss = loss_fn(model(x), y)
...     logger.stage({"loss": loss})
...     acc.backward(loss)

One row per optimizer step on the ``optimizer_step`` axis; see ``docs/wandb.md``.
`gradaccum_wandb.offline.read_history` reads an offline run back (for tests).
"""

from __future__ import annotations

from gradaccum_wandb._version import PRODUCER, __version__
from gradaccum_wandb.logger import ExtraMetrics, Reduce, WandbLogger

__all__ = ["PRODUCER", "ExtraMetrics", "Reduce", "WandbLogger", "__version__"]
