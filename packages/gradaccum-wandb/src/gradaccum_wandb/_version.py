"""The distribution's version and its name."""

from __future__ import annotations

__all__ = ["PRODUCER", "__version__"]

__version__ = "0.1.0"
PRODUCER = "gradaccum-wandb"
