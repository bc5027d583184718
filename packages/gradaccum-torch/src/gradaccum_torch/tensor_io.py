"""Checkpoint tensors: torch objects to safetensors bytes and JSON, and back.

Everything is keyed by canonical parameter names, so a checkpoint written
under one wrapper (DDP, Lightning, Accelerate) loads under another. Nothing
here uses pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import safetensors.torch
import torch

from gradaccum.errors import CheckpointError, CheckpointMismatchError

__all__ = [
    "from_json",
    "load_optimizer_state",
    "optimizer_state",
    "split_aliases",
    "tensors_from_bytes",
    "tensors_to_bytes",
    "to_json",
]


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A safetensors file (as bytes) holding CPU copies of ``tensors``.

    Tensors that share memory (safetensors refuses them) are stored as
    separate copies; use `split_aliases` first to store tied tensors once.
    """
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        host = tensor.detach().to("cpu").contiguous()
        if host.numel():
            ptr = host.untyped_storage().data_ptr()
            if ptr in storages:
                host = host.clone()
            else:
                storages.add(ptr)
        out[name] = host
    return safetensors.torch.save(out)


def split_aliases(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once: returns the tensors without the aliases, and
    ``{alias: name}`` for every entry that is the same view of the same
    memory as an earlier one (an embedding shared with the output head)."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            unique[name] = tensor
            continue
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        first = seen.get(key)
        if first is None:
            seen[key] = name
            unique[name] = tensor
        else:
            aliases[name] = first
    return unique, aliases


# safetensors' own parser of its header-plus-raw-buffer format: no pickle, no code run.
_parse_safetensors = safetensors.torch.load


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into CPU tensors (no pickle)."""
    loaded: dict[str, torch.Tensor] = _parse_safetensors(data)
    return loaded


def to_json(value: Any, where: str) -> Any:
    """``value`` as strict JSON: non-finite floats become ``{"float": "inf"}``,
    tuples become lists, 0-d tensors become numbers. Raises
    `CheckpointError` naming ``where`` for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return to_json(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key {key!r} that JSON cannot hold")
            out[str(key)] = to_json(item, f"{where}.{key}")
        return out
    raise CheckpointError(
        f"{where} holds {type(value).__name__} {value!r}, which a pickle-free checkpoint "
        f"cannot store; keep such state out of the object or save it yourself"
    )


def from_json(value: Any) -> Any:
    """Inverse of `to_json` for floats (lists stay lists)."""
    if isinstance(value, dict):
        if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            return float(value["float"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def _param_names(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[str]:
    out = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in names:
                raise CheckpointMismatchError(
                    "the optimizer holds a parameter that is not part of the model; "
                    "build the optimizer from model.parameters()"
                )
            out.append(names[id(param)])
    return out


def optimizer_state(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors named
    ``state.<param>.<key>`` and JSON metadata (hyper-parameters, scalar
    state, groups as lists of canonical names). ``names`` maps ``id(param)``
    to its canonical name."""
    ordered = _param_names(optimizer, names)
    raw = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in raw["state"].items():
        name = ordered[index]
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{name}.{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = to_json(value, f"optimizer state {name}.{key}")
    groups = []
    for group in raw["param_groups"]:
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = [ordered[i] for i in group["params"]]
        groups.append(to_json(entry, "optimizer param_groups"))
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}
    return tensors, meta


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    names: Mapping[int, str],
) -> dict[str, Any]:
    """Rebuild a ``state_dict`` for ``optimizer`` from `optimizer_state`
    output, checking class, groups and parameter names first. Returns the
    state dict; the caller applies it with ``optimizer.load_state_dict``."""
    ordered = _param_names(optimizer, names)
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer is {meta.get('class')!r} but the optimizer given is "
            f"{type(optimizer).__name__!r}; build the same optimizer class to resume"
        )
    groups_meta: Sequence[Mapping[str, Any]] = meta["param_groups"]
    if len(groups_meta) != len(optimizer.param_groups):
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer has {len(groups_meta)} parameter groups, this one "
            f"has {len(optimizer.param_groups)}"
        )
    index_of = {name: i for i, name in enumerate(ordered)}
    param_groups = []
    for saved, live in zip(groups_meta, optimizer.param_groups, strict=True):
        live_names = [ordered[index_of[names[id(p)]]] for p in live["params"]]
        if list(saved["params"]) != live_names:
            raise CheckpointMismatchError(
                f"optimizer group parameters differ: checkpoint {list(saved['params'])[:4]}… "
                f"vs this optimizer {live_names[:4]}…"
            )
        group = {k: from_json(v) for k, v in saved.items() if k != "params"}
        group["params"] = [index_of[n] for n in live_names]
        param_groups.append(group)
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if not key.startswith("state."):
            raise CheckpointMismatchError(f"unexpected optimizer tensor {key!r}")
        name, _, field = key[len("state.") :].rpartition(".")
        if name not in index_of:
            raise CheckpointMismatchError(
                f"the checkpoint has optimizer state for {name!r}, which this model lacks"
            )
        state.setdefault(index_of[name], {})[field] = tensor
    for name, values in meta.get("scalars", {}).items():
        if name not in index_of:
            raise CheckpointMismatchError(
                f"the checkpoint has optimizer state for {name!r}, which this model lacks"
            )
        state.setdefault(index_of[name], {}).update(from_json(values))
    return {"state": state, "param_groups": param_groups}


def json_state(obj: Any, where: str) -> Any:
    """``obj.state_dict()`` as strict JSON (schedulers, GradScalers)."""
    return json.loads(json.dumps(to_json(obj.state_dict(), where)))
