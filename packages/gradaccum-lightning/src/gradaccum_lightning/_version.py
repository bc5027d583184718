"""The distribution's version and the producer name its checkpoints record."""

from __future__ import annotations

__all__ = ["PRODUCER", "__version__"]

__version__ = "0.1.0"
PRODUCER = "gradaccum-lightning"
