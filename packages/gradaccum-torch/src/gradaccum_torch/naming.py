"""Canonical parameter names: the same for a model however it is wrapped."""

from __future__ import annotations

import torch

__all__ = ["WRAPPER_SEGMENTS", "canonical_name", "named_parameters"]

WRAPPER_SEGMENTS: tuple[str, ...] = (
    "module",  # DistributedDataParallel, DataParallel, Accelerate
    "_orig_mod",  # torch.compile
    "_forward_module",  # Lightning Fabric / Trainer strategy wrappers
    "_fsdp_wrapped_module",  # FSDP
    "_checkpoint_wrapped_module",  # activation checkpointing wrapper
)
"""Attribute names that wrappers insert; they never appear in canonical names."""


def canonical_name(name: str) -> str:
    """Strip every wrapper segment from a dotted parameter name.

    ``"module._orig_mod.encoder.weight"`` becomes ``"encoder.weight"``. A model
    whose own submodule is literally called ``module`` loses that segment too;
    names stay unique because wrappers never add parameters of their own, and
    :func:`named_parameters` refuses a model whose names would collide.
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{canonical name: parameter}`` for every parameter of ``model``, in order."""
    out: dict[str, torch.nn.Parameter] = {}
    for raw, param in model.named_parameters():
        name = canonical_name(raw)
        if name in out and out[name] is not param:
            from gradaccum.errors import ConfigError

            raise ConfigError(
                f"parameters {raw!r} and another map to the same canonical name {name!r}; "
                f"rename the submodule so that wrapper names ({', '.join(WRAPPER_SEGMENTS)}) "
                f"are not used as attribute names"
            )
        out[name] = param
    return out
