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


def canonical_name(name: str, prefix: str = "") -> str:
    """Strip every wrapper segment from a dotted parameter name, then ``prefix``.

    ``"module._orig_mod.encoder.weight"`` becomes ``"encoder.weight"``. A model
    whose own submodule is literally called ``module`` loses that segment too;
    names stay unique because wrappers never add parameters of their own, and
    `named_parameters` refuses a model whose names would collide.
    ``prefix`` (a framework's `name_prefix`, such as
    ``"model."`` for a ``LightningModule`` holding the user's model as
    ``self.model``) is removed from names that start with it, so the names are
    the user's model's own and other stacks can read them.
    """
    parts = name.split(".")
    if not any(part in WRAPPER_SEGMENTS for part in parts):
        canonical = name
    else:
        canonical = ".".join(part for part in parts if part not in WRAPPER_SEGMENTS)
    if prefix and canonical.startswith(prefix):
        return canonical[len(prefix) :]
    return canonical


def named_parameters(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Parameter]:
    """``{canonical name: parameter}`` for every parameter of ``model``, in order
    (a parameter shared by several modules, such as tied embeddings, once)."""
    out: dict[str, torch.nn.Parameter] = {}
    for raw, param in model.named_parameters():
        name = canonical_name(raw, prefix)
        if name in out and out[name] is not param:
            from gradaccum.errors import ConfigError

            raise ConfigError(
                f"parameters {raw!r} and another map to the same canonical name {name!r}; "
                f"rename the submodule so that wrapper names ({', '.join(WRAPPER_SEGMENTS)}) "
                f"are not used as attribute names"
            )
        out[name] = param
    return out
