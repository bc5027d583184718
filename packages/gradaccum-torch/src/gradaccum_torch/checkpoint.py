"""Save and load an `Accumulator` in the shared checkpoint
format (``spec/checkpoint-v1.md``): the core writes the directory atomically
and verifies it on read; this module turns torch objects into safetensors
bytes and JSON and back, keyed by canonical names. No pickle.

It uses only the accumulator's public API (``model``, ``optimizer``,
``scheduler``, ``scaler``, ``machine``, ``gradients``, ``inflight_items``,
``named_parameters``, ``restore``), so any adapter built on the contract
saves and loads through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from gradaccum.checkpoint import Producer, read_checkpoint, write_checkpoint
from gradaccum.config import AccumulationConfig
from gradaccum.errors import CheckpointCorruptError, CheckpointMismatchError
from gradaccum.state import AccumulationState
from gradaccum_torch.naming import canonical_name
from gradaccum_torch.tensor_io import (
    from_json,
    json_state,
    load_optimizer_state,
    optimizer_state,
    split_aliases,
    tensors_from_bytes,
    tensors_to_bytes,
)

if TYPE_CHECKING:
    from gradaccum_torch.accumulator import Accumulator

__all__ = [
    "collect",
    "gradient_role",
    "items_role",
    "load_checkpoint",
    "model_tensors",
    "save_checkpoint",
]


def gradient_role(rank: int, world_size: int) -> str:
    """The role of a rank's in-flight gradients: ``gradients`` on one process,
    ``gradients.rank<r>`` when several ranks each hold their own."""
    return "gradients" if world_size == 1 else f"gradients.rank{rank}"


def items_role(rank: int, world_size: int) -> str:
    """The role of a rank's device item count of the open window: ``items`` on
    one process, ``items.rank<r>`` on several."""
    return "items" if world_size == 1 else f"items.rank{rank}"


def model_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under canonical names (``prefix`` stripped)."""
    return {canonical_name(k, prefix): v for k, v in model.state_dict().items()}


def _names_by_id(acc: Accumulator) -> dict[int, str]:
    return {id(p): n for n, p in acc.named_parameters().items()}


def collect(
    acc: Accumulator,
    *,
    model: bool,
    optimizer: bool,
    scheduler: bool,
    scaler: bool,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files and metadata of a checkpoint of ``acc`` (this rank's gradients)."""
    files: dict[str, bytes] = {}
    metadata: dict[str, Any] = {}
    inflight = acc.gradients.export()
    if inflight:
        files[gradient_role(rank, world_size)] = tensors_to_bytes(inflight)
    items = acc.inflight_items()
    if items is not None:
        files[items_role(rank, world_size)] = tensors_to_bytes({"items": items})
    if model:
        tensors, aliases = split_aliases(model_tensors(acc.model, acc.framework.name_prefix))
        files["model"] = tensors_to_bytes(tensors)
        if aliases:
            metadata["model"] = {"aliases": aliases}
    if optimizer:
        tensors, meta = optimizer_state(acc.optimizer, _names_by_id(acc))
        files["optimizer"] = tensors_to_bytes(tensors)
        metadata["optimizer"] = meta
    if scheduler and acc.scheduler is not None:
        metadata["scheduler"] = {
            "class": type(acc.scheduler).__name__,
            "state": json_state(acc.scheduler, "scheduler state"),
        }
    if scaler and acc.scaler is not None:
        metadata["scaler"] = {"state": json_state(acc.scaler, "scaler state")}
    return files, metadata


def save_checkpoint(
    acc: Accumulator,
    path: str | os.PathLike[str],
    *,
    model: bool = True,
    optimizer: bool = True,
    scheduler: bool = True,
    scaler: bool = True,
) -> None:
    """Write ``acc``'s checkpoint atomically (see `Accumulator.save`)."""
    files, metadata = collect(
        acc, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
    )
    write_checkpoint(
        path,
        state=acc.machine.state_dict(),
        config=acc.config.to_dict(),
        files=files,
        producer=Producer(*acc.producer),
        world_size=1,
        metadata=metadata,
    )


def load_checkpoint(acc: Accumulator, path: str | os.PathLike[str], *, rank: int = 0) -> None:
    """Restore ``acc`` (and its model, optimizer, scheduler, scaler) from ``path``.

    Everything is read, verified and checked against the live objects first;
    only then is anything changed, so a mismatch leaves all objects as they were.
    """
    ckpt = read_checkpoint(path)
    state = AccumulationState.from_state_dict(ckpt.state)
    saved_config = AccumulationConfig.from_dict(ckpt.config)
    world = acc.distributed.world_size
    mid_window = state.position > 0
    if mid_window and ckpt.world_size != world:
        raise CheckpointMismatchError(
            f"checkpoint {os.fspath(path)!r} was taken mid-window on {ckpt.world_size} rank(s); "
            f"it can resume only on {ckpt.world_size} rank(s), not {world}. Checkpoints taken "
            f"at a window boundary move between world sizes"
        )
    if mid_window and saved_config.normalization != acc.config.normalization:
        raise CheckpointMismatchError(
            f"checkpoint {os.fspath(path)!r} was taken mid-window under normalization="
            f"{saved_config.normalization!r}; this accumulator uses "
            f"{acc.config.normalization!r}: resume with the same normalization"
        )
    role = gradient_role(rank, ckpt.world_size)
    gradients = tensors_from_bytes(ckpt.file_bytes(role)) if role in ckpt.roles else {}
    acc.gradients.check(gradients)
    items_file = items_role(rank, ckpt.world_size)
    items = (
        _items_tensor(tensors_from_bytes(ckpt.file_bytes(items_file)), items_file)
        if items_file in ckpt.roles
        else None
    )
    prefix = acc.framework.name_prefix
    model_state = None
    if "model" in ckpt.roles:
        stored = tensors_from_bytes(ckpt.file_bytes("model"))
        aliases = (ckpt.metadata.get("model") or {}).get("aliases") or {}
        model_state = _check_model(acc.model, _with_aliases(stored, aliases), prefix)
    optim_state = None
    if "optimizer" in ckpt.roles:
        optim_state = load_optimizer_state(
            acc.optimizer,
            tensors_from_bytes(ckpt.file_bytes("optimizer")),
            ckpt.metadata["optimizer"],
            _names_by_id(acc),
        )
    sched_meta = ckpt.metadata.get("scheduler")
    if (
        sched_meta is not None
        and acc.scheduler is not None
        and sched_meta["class"] != type(acc.scheduler).__name__
    ):
        raise CheckpointMismatchError(
            f"the checkpoint's scheduler is {sched_meta['class']!r} but the accumulator's "
            f"is {type(acc.scheduler).__name__!r}; build the same scheduler to resume"
        )
    # Everything is verified: apply.
    if model_state is not None:
        acc.model.load_state_dict(model_state)
    if optim_state is not None:
        acc.optimizer.load_state_dict(optim_state)
    if sched_meta is not None and acc.scheduler is not None:
        acc.scheduler.load_state_dict(from_json(dict(sched_meta["state"])))
    scaler_meta = ckpt.metadata.get("scaler")
    if scaler_meta is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(from_json(dict(scaler_meta["state"])))
    acc.restore(state, saved_config, gradients, items)


def _items_tensor(tensors: Mapping[str, torch.Tensor], role: str) -> torch.Tensor:
    count = tensors.get("items")
    if set(tensors) != {"items"} or count is None or count.dim() != 0:
        raise CheckpointCorruptError(
            f"the {role!r} file must hold one 0-d tensor named 'items', got "
            f"{ {k: tuple(v.shape) for k, v in tensors.items()} }"
        )
    return count


def _with_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """The stored tensors plus every alias (a tied tensor stored once)."""
    if not isinstance(aliases, Mapping):
        raise CheckpointCorruptError(f"model aliases must be an object, got {aliases!r}")
    out = dict(tensors)
    for alias, name in aliases.items():
        if not isinstance(name, str) or name not in tensors or alias in tensors:
            raise CheckpointCorruptError(
                f"model alias {alias!r} -> {name!r} does not name a stored tensor"
            )
        out[alias] = tensors[name]
    return out


def _check_model(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """Map canonical names back to ``model``'s own keys, checking names and shapes."""
    live = model.state_dict()
    by_canonical = {canonical_name(k, prefix): k for k in live}
    missing = sorted(set(by_canonical) - set(tensors))
    unexpected = sorted(set(tensors) - set(by_canonical))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"the checkpoint's model does not match: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; load it into the model it was saved from"
        )
    out = {}
    for name in by_canonical:  # the model's order: the first mismatch reported is stable
        tensor = tensors[name]
        key = by_canonical[name]
        if tuple(live[key].shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"model tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(live[key].shape)} in the model"
            )
        out[key] = tensor
    return out
