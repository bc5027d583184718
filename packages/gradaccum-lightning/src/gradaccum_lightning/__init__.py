"""gradaccum-lightning: exact, fast gradient accumulation for the Lightning Trainer and Fabric.

>>> trainer = Trainer(callbacks=[GradAccum(steps=8, normalization="items")])  # doctest: +SKIP
>>> trainer.fit(model, datamodule)                                            # doctest: +SKIP

Fabric: ``FabricAccumulator(fabric, model, optimizer, steps=8)`` and the plain-torch loop.
See ``docs/lightning.md``.
"""

from __future__ import annotations

from gradaccum import AccumulationConfig, ByEpoch, ByStep, ClipPolicy, Fixed, GradientWeights
from gradaccum_lightning._version import PRODUCER, __version__
from gradaccum_lightning.callback import GradAccum, LightningFramework
from gradaccum_lightning.fabric import FabricAccumulator, FabricFramework, FabricProcessGroup

__all__ = [
    "PRODUCER",
    "AccumulationConfig",
    "ByEpoch",
    "ByStep",
    "ClipPolicy",
    "FabricAccumulator",
    "FabricFramework",
    "FabricProcessGroup",
    "Fixed",
    "GradAccum",
    "GradientWeights",
    "LightningFramework",
    "__version__",
]
