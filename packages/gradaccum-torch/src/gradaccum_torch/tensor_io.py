"""Checkpoint tensors: torch objects to safetensors bytes and JSON, and back.

Everything is keyed by canonical parameter names, so a checkpoint written
under one wrapper (DDP, Lightning, Accelerate) loads under another. Nothing
here uses pickle.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from gradaccum.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError

if TYPE_CHECKING:
    from gradaccum.checkpoint import TensorFile, TensorSource

__all__ = [
    "SCALER_RANGES",
    "SCHEDULER_INTS",
    "SCHEDULER_RANGES",
    "TORCH_DTYPES",
    "check_like",
    "check_ranges",
    "from_json",
    "json_state",
    "load_optimizer_state",
    "optimizer_state",
    "split_aliases",
    "tensor_sources",
    "tensor_views",
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


#: safetensors dtype names (``gradaccum.checkpoint.DTYPE_SIZES``) to torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}


_SAFETENSORS_DTYPES = {torch_dtype: name for name, torch_dtype in TORCH_DTYPES.items()}


def tensor_sources(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSource]:
    """``tensors`` as `gradaccum.checkpoint.TensorSource` objects for a
    streaming `write_checkpoint`/`write_shard`: each tensor's bytes are taken
    (a host copy for a device tensor, none for a contiguous CPU one) only when
    the writer reaches it, so a save never holds a second copy of a whole
    file. Raises `CheckpointError` for a dtype safetensors cannot store."""
    from gradaccum.checkpoint import TensorSource

    out: dict[str, TensorSource] = {}
    for name, tensor in tensors.items():
        dtype = _SAFETENSORS_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise CheckpointError(
                f"tensor {name!r} has dtype {tensor.dtype}, which a safetensors checkpoint "
                f"cannot store; keep it out of the saved state or convert it"
            )
        out[name] = TensorSource(dtype, tuple(tensor.shape), _host_bytes(tensor))
    return out


def _host_bytes(tensor: torch.Tensor) -> Callable[[], memoryview]:
    def read() -> memoryview:
        host = tensor.detach().to("cpu").contiguous().reshape(-1)
        if host.numel() == 0:
            return memoryview(b"")
        view: memoryview = host.view(torch.uint8).numpy().data
        return view

    return read


def tensor_views(tf: TensorFile) -> dict[str, torch.Tensor]:
    """The tensors of a mapped checkpoint file (`gradaccum.checkpoint.TensorFile`)
    as CPU tensors viewing its read-only bytes: no copy, no pickle. Never
    write into them (copy or ``clone()`` what must outlive or change); drop
    them before the file is closed so it can be unmapped."""
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is read-only
        for name, info in tf.header.tensors.items():
            dtype = TORCH_DTYPES[info.dtype]
            if info.end == info.begin:
                out[name] = torch.empty(info.shape, dtype=dtype)
            else:
                flat = torch.frombuffer(tf.tensor_view(name), dtype=dtype)
                out[name] = flat.view(info.shape)
    return out


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
    meta: Any,
    names: Mapping[int, str],
) -> dict[str, Any]:
    """Rebuild a ``state_dict`` for ``optimizer`` from `optimizer_state`
    output, checking everything against the live optimizer first: class,
    groups and parameter names; every hyper-parameter has the live value's
    kind (a number stays a finite number, a flag a bool, a pair a pair), a
    valid range (``lr``, ``eps``, ``weight_decay``, ``momentum`` >= 0, each
    beta in [0, 1), every number within the parameters' dtype), and every
    flag that changes the algorithm (``amsgrad``, ``nesterov``, ...) the live
    value; keys the live optimizer lacks (a scheduler's ``initial_lr``) are
    kept when they hold plain values; every state tensor belongs to a parameter, has its shape
    (or is 0-d), a floating or integer dtype, and the fields the live state
    has; ``step`` is finite and >= 0. Raises `CheckpointMismatchError` or
    `CheckpointCorruptError`; returns the state dict for
    ``optimizer.load_state_dict``."""
    ordered = _param_names(optimizer, names)
    if not isinstance(meta, Mapping):
        raise CheckpointCorruptError(
            f"the checkpoint's optimizer metadata is {_show(meta)}, not an object; {_FIX}"
        )
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer is {_show(meta.get('class'))} but the optimizer given is "
            f"{type(optimizer).__name__!r}; build the same optimizer class to resume"
        )
    groups_meta = meta.get("param_groups")
    if not isinstance(groups_meta, list) or not all(isinstance(g, Mapping) for g in groups_meta):
        raise CheckpointCorruptError(
            f"the checkpoint's optimizer param_groups is {_show(groups_meta)}, not a list of "
            f"objects; {_FIX}"
        )
    if len(groups_meta) != len(optimizer.param_groups):
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer has {len(groups_meta)} parameter groups, this one "
            f"has {len(optimizer.param_groups)}"
        )
    live_dict = optimizer.state_dict()
    index_of = {name: i for i, name in enumerate(ordered)}
    param_groups = []
    for g, (saved, live) in enumerate(zip(groups_meta, live_dict["param_groups"], strict=True)):
        live_names = [ordered[i] for i in live["params"]]
        saved_names = saved.get("params")
        if not isinstance(saved_names, list) or saved_names != live_names:
            shown = saved_names[:4] if isinstance(saved_names, list) else _show(saved_names)
            raise CheckpointMismatchError(
                f"optimizer group {g} parameters differ: checkpoint {shown}… "
                f"vs this optimizer {live_names[:4]}…; load it into the model and optimizer "
                f"it was saved from"
            )
        live_hyper = {k: v for k, v in live.items() if k not in ("params", "param_names")}
        saved_hyper = {k: from_json(v) for k, v in saved.items() if k != "params"}
        saved_hyper.pop("param_names", None)
        where = f"optimizer param_groups[{g}]"
        # keys this optimizer lacks (a scheduler's initial_lr) are kept: torch ignores them
        group = check_like(saved_hyper, live_hyper, where, partial=True, extra=True)
        check_ranges(group, _GROUP_RANGES, where)
        _check_representable(group, list(optimizer.param_groups[g]["params"]), where)
        for key, value in live_hyper.items():
            if isinstance(value, bool) and key not in _FREE_FLAGS and group[key] != value:
                raise CheckpointMismatchError(
                    f"{where}.{key} is {group[key]!r} in the checkpoint but {value!r} in this "
                    f"optimizer; the option changes the algorithm and its state — build the "
                    f"optimizer with the options it was saved with"
                )
        group["params"] = list(live["params"])
        if "param_names" in live:
            group["param_names"] = live["param_names"]
        param_groups.append(group)
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, field = key[len("state.") :].rpartition(".")
        if not key.startswith("state.") or not name or not field:
            raise CheckpointMismatchError(f"unexpected optimizer tensor {key!r}; {_FIX}")
        if name not in index_of:
            raise CheckpointMismatchError(
                f"the checkpoint has optimizer state for {name!r}, which this model lacks"
            )
        state.setdefault(index_of[name], {})[field] = tensor
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, Mapping):
        raise CheckpointCorruptError(
            f"the checkpoint's optimizer scalars are {_show(scalars)}, not an object; {_FIX}"
        )
    for name, values in scalars.items():
        if name not in index_of:
            raise CheckpointMismatchError(
                f"the checkpoint has optimizer state for {name!r}, which this model lacks"
            )
        if not isinstance(values, Mapping):
            raise CheckpointCorruptError(
                f"optimizer state of {name!r} is {_show(values)}, not an object; {_FIX}"
            )
        for field, value in values.items():
            value = from_json(value)
            if value is not None and not _is_number(value) and not isinstance(value, bool):
                raise CheckpointCorruptError(
                    f"optimizer state {name}.{field} is {_show(value)}; it must be a finite "
                    f"number, a bool or null; {_FIX}"
                )
            if field in state.get(index_of[name], {}):
                raise CheckpointCorruptError(
                    f"optimizer state {name}.{field} is stored twice; {_FIX}"
                )
            state.setdefault(index_of[name], {})[field] = value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    live_state = live_dict["state"]
    group_of = {i: g for g, group in enumerate(param_groups) for i in group["params"]}
    fields_seen: tuple[str, ...] | None = None
    for index in sorted(state):
        _check_param_state(state[index], params[index], live_state.get(index), ordered[index])
        needed = _needed_fields(type(optimizer).__name__, param_groups[group_of[index]])
        if needed - set(state[index]):
            raise CheckpointCorruptError(
                f"optimizer state of {ordered[index]!r} lacks {sorted(needed - set(state[index]))}"
                f", which {type(optimizer).__name__} with these options needs; {_FIX}"
            )
        fields = tuple(sorted(state[index]))
        if fields_seen is not None and fields != fields_seen:
            raise CheckpointCorruptError(
                f"optimizer state of {ordered[index]!r} has fields {list(fields)} but other "
                f"parameters have {list(fields_seen)}; {_FIX}"
            )
        fields_seen = fields
    return {"state": state, "param_groups": param_groups}


def _check_param_state(
    values: Mapping[str, Any],
    param: torch.Tensor,
    live: Mapping[str, Any] | None,
    name: str,
) -> None:
    """One parameter's saved optimizer state against the parameter and its live state."""
    if live is not None and set(live) != set(values):
        raise CheckpointMismatchError(
            f"optimizer state of {name!r} has fields {sorted(values)} in the checkpoint but "
            f"{sorted(live)} in this optimizer; build the same optimizer (same options) to resume"
        )
    for field, value in values.items():
        where = f"optimizer state {name}.{field}"
        live_value = None if live is None else live.get(field)
        if not isinstance(value, torch.Tensor):
            if isinstance(live_value, torch.Tensor):
                raise CheckpointMismatchError(
                    f"{where} is {_show(value)} in the checkpoint but a tensor in this optimizer"
                )
            continue
        if value.dtype == torch.bool or value.is_complex() != (
            isinstance(live_value, torch.Tensor) and live_value.is_complex()
        ):
            raise CheckpointMismatchError(f"{where} has dtype {value.dtype}; {_FIX}")
        if value.dim() != 0 and tuple(value.shape) != tuple(param.shape):
            raise CheckpointMismatchError(
                f"{where} has shape {tuple(value.shape)} but the parameter has shape "
                f"{tuple(param.shape)}; load it into the model it was saved from"
            )
        if isinstance(live_value, torch.Tensor):
            if tuple(live_value.shape) != tuple(value.shape):
                raise CheckpointMismatchError(
                    f"{where} has shape {tuple(value.shape)} in the checkpoint but "
                    f"{tuple(live_value.shape)} in this optimizer"
                )
            if live_value.is_floating_point() != value.is_floating_point():
                raise CheckpointMismatchError(
                    f"{where} has dtype {value.dtype} in the checkpoint but {live_value.dtype} "
                    f"in this optimizer"
                )
        elif live_value is not None:
            raise CheckpointMismatchError(
                f"{where} is a tensor in the checkpoint but {_show(live_value)} in this optimizer"
            )
        if field == "step":
            if value.numel() != 1:
                raise CheckpointMismatchError(f"{where} must hold one number, got {value.shape}")
            step = float(value.item())
            if not math.isfinite(step) or step < 0:
                raise CheckpointCorruptError(f"{where} is {step}; it must be >= 0; {_FIX}")


def _check_representable(group: Mapping[str, Any], params: list[torch.Tensor], where: str) -> None:
    """Every number of ``group`` fits the floating dtypes of its parameters
    (torch converts hyper-parameters to them: a weight decay of 1e300 on
    float32 parameters cannot be applied)."""
    limits = [torch.finfo(p.dtype).max for p in params if p.is_floating_point()]
    if not limits:
        return
    limit = min(limits)
    for key, value in group.items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, torch.Tensor) and item.numel() == 1:
                item = item.item()
            if isinstance(item, (int, float)) and not isinstance(item, bool) and abs(item) > limit:
                raise CheckpointCorruptError(
                    f"{where}.{key} is {_show(value)}, beyond the largest value ({limit:g}) of "
                    f"the parameters' dtype; {_FIX}"
                )


#: Boolean optimizer options that change only how the step is computed, not what.
_FREE_FLAGS = frozenset({"foreach", "fused", "differentiable"})


def _needed_fields(cls: str, group: Mapping[str, Any]) -> set[str]:
    """The per-parameter state fields torch's built-in optimizer ``cls`` reads
    once a parameter has state (empty for other classes: not checked)."""
    if cls in ("Adam", "AdamW"):
        extra = {"max_exp_avg_sq"} if group.get("amsgrad") else set()
        return {"step", "exp_avg", "exp_avg_sq", *extra}
    if cls == "SGD":
        return {"momentum_buffer"} if group.get("momentum") else set()
    return set()


_FIX = "the checkpoint is corrupt or was edited — restore it from a copy or take a new checkpoint"

_NONNEG = (0.0, math.inf, True)
#: Ranges of optimizer hyper-parameters: (low, high, high inclusive); low is inclusive.
_GROUP_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": _NONNEG,
    "initial_lr": _NONNEG,
    "eps": _NONNEG,
    "weight_decay": _NONNEG,
    "momentum": _NONNEG,
    "dampening": _NONNEG,
    "alpha": _NONNEG,
    "lr_decay": _NONNEG,
    "initial_accumulator_value": _NONNEG,
    "betas": (0.0, 1.0, False),
    "rho": (0.0, 1.0, True),
}
#: Ranges of LR-scheduler fields (any scheduler class that has them).
SCHEDULER_RANGES: dict[str, tuple[float, float, bool]] = {
    "step_size": (1.0, math.inf, True),
    "T_max": (1e-300, math.inf, True),
    "T_0": (1.0, math.inf, True),
    "T_mult": (1.0, math.inf, True),
    "total_iters": (0.0, math.inf, True),
    "total_steps": (1.0, math.inf, True),
    "last_epoch": (-1.0, math.inf, True),
    "_step_count": (0.0, math.inf, True),
    "gamma": _NONNEG,
    "base_lrs": _NONNEG,
    "_last_lr": _NONNEG,
    "eta_min": _NONNEG,
    "milestones": _NONNEG,
}
#: Fields of schedulers that must be integers.
SCHEDULER_INTS = frozenset({"step_size", "T_0", "T_mult", "last_epoch", "_step_count"})
#: Ranges of GradScaler state.
SCALER_RANGES: dict[str, tuple[float, float, bool]] = {
    "scale": (1e-300, float(torch.finfo(torch.float32).max), True),  # kept in float32
    "growth_factor": (1.0, math.inf, False),
    "backoff_factor": (1e-300, 1.0, False),
    "growth_interval": (1.0, math.inf, True),
    "_growth_tracker": (0.0, math.inf, True),
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (isinstance(value, int) or math.isfinite(value))
    )


def check_like(
    saved: Any, live: Any, where: str, *, partial: bool = False, extra: bool = False
) -> Any:
    """``saved`` (decoded JSON) checked against the live value's kind and
    returned in the live value's form.

    A live bool needs a bool; a live number a finite number (int or float);
    a live string a string; a live ``None`` accepts ``None``, a bool or a
    finite number; a live list or tuple a list of the same length (checked
    item by item, returned as the live type); a live mapping a mapping
    without unknown keys (with ``partial``, keys the checkpoint lacks keep
    the live value; otherwise they are refused; with ``extra``, keys the live
    mapping lacks are kept when they hold plain values); a live 0-d tensor a finite
    number (returned as a tensor of its dtype). Raises
    `CheckpointMismatchError` naming ``where``."""
    if isinstance(live, bool):
        if not isinstance(saved, bool):
            raise _kind(where, saved, "a bool")
        return saved
    if isinstance(live, (int, float)):
        if not _is_number(saved) or (isinstance(saved, float) and not math.isfinite(saved)):
            raise _kind(where, saved, "a finite number")
        if isinstance(saved, int) and abs(saved) > 2**63:
            raise _kind(where, saved, "a number of at most 64 bits")
        return saved
    if isinstance(live, str):
        if not isinstance(saved, str):
            raise _kind(where, saved, "a string")
        return saved
    if live is None:
        if saved is not None and not isinstance(saved, bool) and not _is_number(saved):
            raise _kind(where, saved, "null, a bool or a finite number")
        return saved
    if isinstance(live, torch.Tensor) and live.numel() == 1:
        if not _is_number(saved):
            raise _kind(where, saved, "a finite number")
        return torch.tensor(saved, dtype=live.dtype, device=live.device).reshape(live.shape)
    if isinstance(live, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(live):
            raise _kind(where, saved, f"a list of {len(live)} items")
        items = [
            check_like(s, v, f"{where}[{i}]")
            for i, (s, v) in enumerate(zip(saved, live, strict=True))
        ]
        return tuple(items) if isinstance(live, tuple) else items
    if isinstance(live, Mapping):
        if not isinstance(saved, Mapping):
            raise _kind(where, saved, "an object")
        unknown = sorted(str(k) for k in set(saved) - set(live))
        if unknown and extra:
            for key in unknown:
                _check_plain(saved[key], f"{where}.{key}")
        elif unknown:
            raise CheckpointMismatchError(
                f"{where} has keys {unknown[:5]} that this object does not have; load it into "
                f"the same kind of object it was saved from"
            )
        missing = sorted(str(k) for k in set(live) - set(saved))
        if missing and not partial:
            raise CheckpointMismatchError(f"{where} lacks {missing[:5]}; {_FIX}")
        out = {k: live[k] for k in live if k not in saved}
        out.update({k: check_like(saved[k], live[k], f"{where}.{k}") for k in saved if k in live})
        out.update({k: saved[k] for k in saved if k not in live})
        return out
    raise CheckpointMismatchError(
        f"{where}: this object's value {_show(live)} is a {type(live).__name__}, which a "
        f"checkpoint cannot restore"
    )


def _check_plain(value: Any, where: str) -> None:
    """A value of a key the live object lacks: null, a bool, a string, a
    finite number, or a list of those."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not (item is None or isinstance(item, (bool, str)) or _is_number(item)) or (
            isinstance(item, int) and not isinstance(item, bool) and abs(item) > 2**63
        ):
            raise _kind(where, value, "null, a bool, a string, a finite number or a list of them")


def _kind(where: str, saved: Any, wanted: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{where} is {_show(saved)} in the checkpoint; it must be {wanted} like this object's "
        f"value; {_FIX}"
    )


def check_ranges(
    values: Mapping[str, Any],
    ranges: Mapping[str, tuple[float, float, bool]],
    where: str,
    ints: frozenset[str] = frozenset(),
) -> None:
    """Each key of ``ranges`` present in ``values`` (a number or a list of
    numbers) lies in ``[low, high]`` (``high`` excluded unless inclusive);
    keys in ``ints`` must be integers. Raises `CheckpointCorruptError`."""
    for key, (low, high, inclusive) in ranges.items():
        if key not in values:
            continue
        value = values[key]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, torch.Tensor) and item.numel() == 1:
                item = item.item()
            ok = _is_number(item) and (key not in ints or isinstance(item, int))
            if ok:
                ok = low <= item and (item <= high if inclusive else item < high)
            if not ok:
                bracket = "]" if inclusive else ")"
                kind = "an integer" if key in ints else "a number"
                raise CheckpointCorruptError(
                    f"{where}.{key} is {_show(value)}; it must be {kind} in [{low:g}, "
                    f"{high:g}{bracket}; {_FIX}"
                )


def json_state(obj: Any, where: str) -> Any:
    """``obj.state_dict()`` as strict JSON (schedulers, GradScalers)."""
    return json.loads(json.dumps(to_json(obj.state_dict(), where)))
