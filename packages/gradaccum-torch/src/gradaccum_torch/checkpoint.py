"""Save and load an `Accumulator` in the shared checkpoint
format (``spec/checkpoint-v1.md``): the core writes the directory atomically
and verifies it on read; this module turns torch objects into safetensors
bytes and JSON and back, keyed by canonical names. No pickle.

It uses only the accumulator's public API (``model``, ``optimizer``,
``scheduler``, ``scaler``, ``machine``, ``gradients``, ``inflight_items``,
``named_parameters``, ``restore``), so any adapter built on the contract
saves and loads through it.

Scale: a save streams every tensor from its live memory into its file
(`TensorSource`), hashing while writing; a load reads the optimizer state
and the in-flight gradients with ``pread`` straight into the new tensors
they become, checking each tensor's digest as its bytes arrive
(`read_tensors`), and streams the model's file through its digests before
copying it into the live parameters from a read-only mapping, so neither
holds a second copy of any file.

A load is all or nothing (ACC-E2, CKPT-17): `prepare_load` verifies and
checks everything it will restore against the live objects — names, shapes,
dtypes, value kinds and ranges of the model, optimizer, scheduler, scaler,
accumulation state, in-flight gradients and item count — before anything
changes; `LoadPlan.apply` then installs it, puts everything back if a step
fails, and turns any exception into a `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from gradaccum.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    Producer,
    open_checkpoint,
    write_checkpoint,
)
from gradaccum.config import AccumulationConfig
from gradaccum.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    GradAccumError,
    UsageError,
)
from gradaccum.state import AccumulationState
from gradaccum_torch.naming import canonical_name
from gradaccum_torch.tensor_io import (
    SCALER_RANGES,
    SCHEDULER_INTS,
    SCHEDULER_RANGES,
    TORCH_DTYPES,
    check_like,
    check_ranges,
    from_json,
    json_state,
    load_optimizer_state,
    optimizer_state,
    split_aliases,
    tensor_sources,
    tensor_views,
    tensors_to_bytes,
)

if TYPE_CHECKING:
    from gradaccum_torch.accumulator import Accumulator

__all__ = [
    "REPLICATED_ROLES",
    "LoadPlan",
    "collect",
    "gradient_role",
    "items_role",
    "load_checkpoint",
    "model_tensors",
    "open_for_load",
    "prepare_load",
    "save_checkpoint",
    "verification_share",
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
    stream: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The files and metadata of a checkpoint of ``acc`` (this rank's gradients).

    Each file is the bytes of a safetensors file, or with ``stream`` a
    mapping of tensor names to `gradaccum.checkpoint.TensorSource` that
    `write_checkpoint`/`write_shard` write tensor by tensor, hashing while
    they write (no second copy of the file in memory)."""
    encode = tensor_sources if stream else tensors_to_bytes
    files: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    inflight = acc.gradients.export()
    if inflight:
        files[gradient_role(rank, world_size)] = encode(inflight)
    items = acc.inflight_items()
    if items is not None:
        files[items_role(rank, world_size)] = encode({"items": items})
    if model:
        tensors, aliases = split_aliases(model_tensors(acc.model, acc.framework.name_prefix))
        files["model"] = encode(tensors)
        if aliases:
            metadata["model"] = {"aliases": aliases}
    if optimizer:
        tensors, meta = optimizer_state(acc.optimizer, _names_by_id(acc))
        files["optimizer"] = encode(tensors)
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
    format_version: int = FORMAT_VERSION,
) -> None:
    """Write ``acc``'s checkpoint atomically (see `Accumulator.save`),
    streaming each tensor from its live memory into its file (hashes computed
    while writing; no file is built in memory first), in ``format_version``
    (`write_checkpoint` refuses one it does not write before writing)."""
    files, metadata = collect(
        acc, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, stream=True
    )
    write_checkpoint(
        path,
        state=acc.machine.state_dict(),
        config=acc.config.to_dict(),
        files=files,
        producer=Producer(*acc.producer),
        world_size=1,
        metadata=metadata,
        format_version=format_version,
    )


class LoadPlan:
    """A checkpoint opened, verified and checked against the live objects of
    an accumulator, nothing applied yet (`prepare_load`).

    It holds the open checkpoint (one descriptor per file), the small decoded
    values (accumulation state, hyper-parameters, scheduler and scaler state,
    item count), and the optimizer state and in-flight gradients either
    already read into new tensors or, for a running accumulator, as the live
    tensors to read into (``in_place``). `apply` installs it, all or
    nothing: `apply_reversible` (new tensors installed as they are, live ones
    kept; undone if anything fails), then `apply_in_place` (the model's
    tensors copied from a read-only mapping of its file, then the bytes read
    into the live tensors). The distributed loader calls the two itself, with
    an agreement of all ranks between them. `undo` puts back what
    `apply_reversible` replaced; `close` releases the files and the tensors
    read (`apply` does it when done)."""

    def __init__(
        self,
        acc: Accumulator,
        ckpt: Checkpoint,
        *,
        state: AccumulationState,
        saved_config: AccumulationConfig,
        gradients: dict[str, torch.Tensor] | None,
        items: torch.Tensor | None,
        has_model: bool,
        optim_state: dict[str, Any] | None,
        sched_state: dict[str, Any] | None,
        scaler_state: dict[str, Any] | None,
        where: str,
        in_place: list[tuple[str, dict[str, torch.Tensor]]] | None = None,
    ) -> None:
        self.acc = acc
        self.ckpt = ckpt
        self.state = state
        self.saved_config = saved_config
        self.gradients = gradients
        self.items = items
        self.has_model = has_model
        self.optim_state = optim_state
        self.sched_state = sched_state
        self.scaler_state = scaler_state
        self.where = where
        self.in_place = list(in_place or [])
        self._undo: list[Callable[[], None]] = []
        self._reversible_done = False

    def close(self) -> None:
        """Release the checkpoint's files and the tensors read but not installed."""
        self.gradients = self.optim_state = None
        self.in_place = []
        self.ckpt.close()

    def apply(self) -> None:
        """Install the plan, all or nothing: `apply_reversible`, then
        `apply_in_place`; the files are closed afterwards."""
        try:
            self.apply_reversible()
            self.apply_in_place()
        finally:
            self.close()

    def apply_reversible(self) -> None:
        """Install everything but the model's tensors: optimizer, scheduler
        (then one trial step of it, undone, whose learning rates must be
        finite numbers >= 0), scaler, and the accumulation state with its
        in-flight gradients and item count. Each part's previous state is
        recorded, by reference (no copy), before it is replaced; if any step
        raises, every part is put back and a `CheckpointError` (or the
        `GradAccumError` raised) propagates. `undo` puts them back later."""
        acc = self.acc
        self._undo = []
        self._reversible_done = False
        try:
            optim_state, self.optim_state = self.optim_state, None
            if optim_state is not None:
                before_optim = acc.optimizer.state_dict()
                self._undo.append(lambda: acc.optimizer.load_state_dict(before_optim))
                # the tensors were read into new memory by prepare_load, or are the live
                # ones apply_in_place fills: installed, not copied
                acc.optimizer.load_state_dict(optim_state)
                _check_kept(
                    self._targets("optimizer"),
                    [v for per in acc.optimizer.state.values() for v in per.values()],
                    "the optimizer's load_state_dict",
                )
                del optim_state
            scheduler = acc.scheduler
            if self.sched_state is not None and scheduler is not None:
                before_sched = copy.deepcopy(scheduler.state_dict())
                groups = _hyper(acc.optimizer)
                self._undo.append(lambda: _set_hyper(acc.optimizer, groups))
                self._undo.append(lambda: scheduler.load_state_dict(before_sched))
                scheduler.load_state_dict(copy.deepcopy(self.sched_state))
                _probe_scheduler(scheduler, acc.optimizer, self.where)
            scaler = acc.scaler
            if self.scaler_state is not None and scaler is not None:
                before_scaler = copy.deepcopy(scaler.state_dict())
                self._undo.append(lambda: scaler.load_state_dict(before_scaler))
                scaler.load_state_dict(dict(self.scaler_state))
            before_acc = acc.machine.state_dict()
            before_grads = dict(acc.gradients.export())
            before_items = acc.inflight_items()
            before_config = acc.config
            self._undo.append(
                lambda: acc.restore(
                    AccumulationState.from_state_dict(before_acc),
                    before_config,
                    before_grads,
                    before_items,
                    owned=True,  # the store's own tensors, given back as they are
                )
            )
            gradients, self.gradients = self.gradients or {}, None
            # new tensors read by prepare_load: restore() installs them without a copy
            acc.restore(self.state, self.saved_config, gradients, self.items, owned=True)
            del gradients
            _check_kept(
                self._targets("gradients"),
                list(acc.gradients.export().values()),
                "the accumulator's gradient store",
            )
            self._reversible_done = True
        except Exception as exc:
            self.undo()
            if isinstance(exc, GradAccumError):
                raise
            raise CheckpointError(
                f"{self.where}: applying it failed ({type(exc).__name__}: {_clip(str(exc))}); "
                f"the model, optimizer, scheduler, scaler and accumulation state are as they "
                f"were — check that the objects match the ones it was saved from"
            ) from exc
        except BaseException:
            self.undo()
            raise

    def apply_in_place(self) -> None:
        """Copy into the live tensors what is loaded in place, after a
        successful `apply_reversible` (else `UsageError`): first the model's
        tensors (``load_state_dict``, its hooks run) from its file's
        read-only mapping, then — where `prepare_load` found live tensors for
        them (same shape and dtype, contiguous on the CPU: a running process)
        — the optimizer state and in-flight gradients, read from their files
        with ``pread`` into those tensors. Last, since the previous values are
        not kept (that would double their memory). Everything was verified
        and checked by `prepare_load` through the descriptors the plan holds
        (bytes changed in place in those very files since then are copied
        unchecked), so only an I/O or device fault or a failing hook of the
        model can stop it; then everything else is put back (`undo`) and a
        `CheckpointError` says what may be partly loaded: the model (a hook
        or fault while copying it: the rest is as it was), or the optimizer
        state and gradients (the model loaded)."""
        acc = self.acc
        if not self._reversible_done:
            raise UsageError(
                "LoadPlan.apply_in_place() needs a successful apply_reversible() first (it "
                "installs the tensors this fills); call apply()"
            )
        self._reversible_done = False
        filled = [(role, t) for role, t in self.in_place if t]
        partly = "the model"
        try:
            if self.has_model:  # first: a failing hook of the model leaves the rest untouched
                with self._views("model") as stored:
                    model_state = _model_plan(acc, stored, self.ckpt.metadata)
                    del stored
                    acc.model.load_state_dict(model_state)
                    del model_state
            partly = "the optimizer state and in-flight gradients (the model is loaded)"
            for role, targets in filled:
                for name, target in targets.items():
                    self.ckpt.read_into(role, name, _bytes_of(target), verify=False)
        except Exception as exc:
            self.undo()
            raise CheckpointError(
                f"{self.where}: copying tensors in place failed ({type(exc).__name__}: "
                f"{_clip(str(exc))}); the optimizer's hyper-parameters, scheduler, scaler and "
                f"accumulation state were put back but {partly} may be partly loaded — load a "
                f"checkpoint again"
            ) from exc

    def _targets(self, kind: str) -> list[torch.Tensor]:
        return [
            t
            for role, targets in self.in_place
            if (role == "optimizer") == (kind == "optimizer")
            for t in targets.values()
        ]

    def undo(self) -> None:
        """Put back, newest first, what `apply_reversible` had installed (not the model)."""
        while self._undo:
            step = self._undo.pop()
            with contextlib.suppress(Exception):
                step()

    @contextlib.contextmanager
    def _views(self, role: str) -> Iterator[dict[str, torch.Tensor]]:
        """Read-only tensors over ``role``'s mapped file (verified when the plan
        was prepared); unmapped when the block ends and its views are gone."""
        with self.ckpt.open_file(role, verify=False) as tf:
            yield tensor_views(tf)


def load_checkpoint(acc: Accumulator, path: str | os.PathLike[str], *, rank: int = 0) -> None:
    """Restore ``acc`` (and its model, optimizer, scheduler, scaler) from ``path``,
    all or nothing (ACC-E, CKPT-17).

    Everything is verified and checked against the live objects first
    (`prepare_load`); only then is anything changed (`LoadPlan.apply`), one
    file at a time, and a failure while applying puts the previous state back.
    Every error is a `CheckpointError` (or another `GradAccumError`)."""
    prepare_load(acc, path, rank=rank).apply()


def open_for_load(path: str | os.PathLike[str]) -> Checkpoint:
    """`open_checkpoint` ``path`` for `prepare_load` (files opened, manifest
    and headers checked, nothing hashed yet); any failure is a
    `GradAccumError`."""
    where = f"checkpoint at {_shown(path)!r}"
    try:
        return open_checkpoint(path, verify=False)
    except GradAccumError:
        raise
    except Exception as exc:
        raise CheckpointCorruptError(
            f"{where}: it cannot be opened ({type(exc).__name__}: {_clip(str(exc))}); nothing "
            f"was changed — check the path, or restore it from a copy"
        ) from exc


#: The roles every rank of a distributed run loads identically.
REPLICATED_ROLES = ("model", "optimizer")


def verification_share(ckpt: Checkpoint, role: str, share: tuple[int, int]) -> frozenset[str]:
    """The tensors of ``role`` that process ``share[0]`` of ``share[1]``
    hashes when they split one file's verification: largest first, each to
    the process with the fewest bytes so far (ties: the lowest index) — the
    same answer in every process for the same file."""
    index, count = share
    entry = ckpt.manifest.files[role]
    loads = [0] * count
    mine: set[str] = set()
    sizes = {name: ckpt.header(role).tensors[name].nbytes for name in entry.tensors}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        who = min(range(count), key=lambda i: (loads[i], i))
        loads[who] += sizes[name]
        if who == index:
            mine.add(name)
    return frozenset(mine)


def prepare_load(
    acc: Accumulator,
    path: str | os.PathLike[str] | Checkpoint,
    *,
    rank: int = 0,
    share: tuple[int, int] | None = None,
) -> LoadPlan:
    """Open ``path`` and check everything this rank will restore against
    ``acc``'s live objects, without changing anything.

    Each file this rank reads (model, optimizer, its own in-flight gradients
    and item count) is verified against the manifest (CKPT-7, CKPT-25,
    CKPT-26), one file at a time, and its names, shapes, dtypes, value kinds
    and ranges checked — with the accumulation state, config, scheduler and
    scaler state. The optimizer state and in-flight gradients go one of two
    ways. Where the accumulator already holds a live tensor for every one of
    a file's tensors (same shape and dtype, contiguous on the CPU: a load
    into a running process), the file is streamed through its digests
    (`Checkpoint.verify_file`, two 8 MiB buffers) and read into those
    tensors only by `LoadPlan.apply_in_place` — no second copy of the state
    exists at any time. Otherwise (a fresh process, another dtype, a GPU)
    they are read with ``pread`` into new tensors the plan will install,
    each tensor's digest checked as it is read (`read_tensors`); the item
    count always is. The model's file is streamed through its digests and
    copied into the parameters by `LoadPlan.apply_in_place`. Any problem
    raises a `GradAccumError` (a `CheckpointError` for anything the
    checkpoint holds) and frees what was read; the returned plan holds the
    open files and the new tensors until it is applied or closed.

    ``path`` may be a checkpoint `open_for_load` opened. ``share=(i, n)``
    — only for processes that read the very same files (same machine, same
    inodes) and then agree on their verdicts before anything is applied, as
    `gradaccum_ddp` does — makes this process hash, of the replicated
    format-2 and format-3 files (`REPLICATED_ROLES`), only its part
    (`verification_share`) and every header; its own files it always
    verifies whole."""
    if share is not None and not (
        isinstance(share, tuple)
        and len(share) == 2
        and all(type(v) is int for v in share)
        and 0 <= share[0] < share[1]
    ):
        raise UsageError(
            f"share={share!r:.60} must be (index, count) with 0 <= index < count, or None"
        )
    ckpt = path if isinstance(path, Checkpoint) else open_for_load(path)
    where = f"checkpoint at {_shown(ckpt.path)!r}"
    try:
        return _prepare(acc, ckpt, rank, where, share)
    except BaseException as exc:
        ckpt.close()
        if isinstance(exc, GradAccumError) or not isinstance(exc, Exception):
            raise
        raise CheckpointCorruptError(
            f"{where}: it cannot be decoded for this accumulator ({type(exc).__name__}: "
            f"{_clip(str(exc))}); nothing was changed — restore it from a copy or take a new "
            f"checkpoint"
        ) from exc


def _shown(path: Any) -> str:
    try:
        return str(os.fspath(path))
    except TypeError:
        return repr(path)


def _clip(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _prepare(
    acc: Accumulator, ckpt: Checkpoint, rank: int, where: str, share: tuple[int, int] | None
) -> LoadPlan:
    state = AccumulationState.from_state_dict(ckpt.state)
    saved_config = AccumulationConfig.from_dict(ckpt.config)
    world = acc.distributed.world_size
    mid_window = state.position > 0
    if mid_window and ckpt.world_size != world:
        raise CheckpointMismatchError(
            f"{where} was taken mid-window on {ckpt.world_size} rank(s); "
            f"it can resume only on {ckpt.world_size} rank(s), not {world}. Checkpoints taken "
            f"at a window boundary move between world sizes"
        )
    if mid_window and saved_config.normalization != acc.config.normalization:
        raise CheckpointMismatchError(
            f"{where} was taken mid-window under normalization="
            f"{saved_config.normalization!r}; this accumulator uses "
            f"{acc.config.normalization!r}: resume with the same normalization"
        )
    acc.config.schedule.check_state(state.schedule_state)
    metadata = ckpt.metadata
    if not isinstance(metadata, Mapping):
        raise CheckpointCorruptError(f"{where}: its metadata is not an object; {_FIX}")
    in_place: list[tuple[str, dict[str, torch.Tensor]]] = []
    grad_role = gradient_role(rank, ckpt.world_size)
    has_optim = "optimizer" in ckpt.roles
    if has_optim and "optimizer" not in metadata:
        raise CheckpointCorruptError(
            f"{where}: it has an optimizer file but no optimizer metadata; {_FIX}"
        )
    # live tensors to read into, decided before anything is read: None = new tensors
    grad_targets = (
        _gradient_targets(acc, ckpt.verify_header(grad_role)) if grad_role in ckpt.roles else None
    )
    optim_targets = (
        _optimizer_targets(acc, ckpt.verify_header("optimizer"), metadata["optimizer"])
        if has_optim
        else None
    )
    if not _disjoint([grad_targets, optim_targets], acc.model.state_dict().values()):
        grad_targets = optim_targets = None  # overlapping memory: fill nothing in place
    gradients = None
    if grad_role in ckpt.roles:
        targets = grad_targets
        if targets is None:  # nothing to load into: new tensors
            gradients = read_tensors(ckpt, grad_role)
            _check_gradients(acc, gradients, where)
        else:  # the live gradients: verified here, filled by apply_in_place
            ckpt.verify_file(grad_role)
            with ckpt.open_file(grad_role, verify=False) as tf:
                views = tensor_views(tf)  # names, shapes and dtypes only
                _check_gradients(acc, views, where)
                del views
            gradients = dict(targets)
            in_place.append((grad_role, targets))
    items_file = items_role(rank, ckpt.world_size)
    items = None
    if items_file in ckpt.roles:
        items = _items_tensor(read_tensors(ckpt, items_file), items_file)
    has_model = "model" in ckpt.roles
    if has_model:
        ckpt.verify_file("model", only=_share_of(ckpt, "model", share))
        with ckpt.open_file("model", verify=False) as tf:
            stored = tensor_views(tf)  # names, shapes and dtypes only: no byte is touched
            _model_plan(acc, stored, metadata)
            del stored
    optim_state = None
    if has_optim:
        only = _share_of(ckpt, "optimizer", share)
        targets = optim_targets
        if targets is None:  # no live state to load into: new tensors
            optim_tensors = read_tensors(ckpt, "optimizer", only)
            optim_state = _optimizer_plan(acc, optim_tensors, metadata["optimizer"])
            del optim_tensors
        else:  # the live state tensors: verified and checked here, filled by apply_in_place
            ckpt.verify_file("optimizer", only=only)
            with ckpt.open_file("optimizer", verify=False) as tf:
                views = tensor_views(tf)  # a value is read only where a check needs it (step)
                optim_state = _with_targets(
                    _optimizer_plan(acc, views, metadata["optimizer"]), views, targets
                )
                del views
            in_place.append(("optimizer", targets))
    sched_state = None
    if "scheduler" in metadata and acc.scheduler is not None:
        sched_state = _check_scheduler_meta(acc.scheduler, metadata["scheduler"], where)
    scaler_state = None
    if "scaler" in metadata and acc.scaler is not None:
        scaler_state = _check_scaler_meta(acc.scaler, metadata["scaler"], where)
    return LoadPlan(
        acc,
        ckpt,
        state=state,
        saved_config=saved_config,
        gradients=gradients,
        items=items,
        has_model=has_model,
        optim_state=optim_state,
        sched_state=sched_state,
        scaler_state=scaler_state,
        where=where,
        in_place=in_place,
    )


def _share_of(ckpt: Checkpoint, role: str, share: tuple[int, int] | None) -> frozenset[str] | None:
    """The tensors of a replicated ``role`` this process verifies (all: ``None``)."""
    return verification_share(ckpt, role, share) if share is not None else None


def _fits(target: Any, info: Any) -> bool:
    """Whether the live tensor ``target`` can take the stored tensor described
    by ``info`` (`gradaccum.checkpoint.TensorInfo`) in place, byte for byte:
    a plain contiguous CPU tensor of its dtype and shape."""
    return (
        type(target) is torch.Tensor  # no subclass: its bytes may not be its values
        and target.layout is torch.strided
        and target.device.type == "cpu"
        and not target.requires_grad
        and not target.is_conj()
        and not target.is_neg()
        and target.is_contiguous()
        and target.dtype == TORCH_DTYPES[info.dtype]
        and tuple(target.shape) == tuple(info.shape)
    )


def _disjoint(
    target_sets: list[dict[str, torch.Tensor] | None], others: Iterable[torch.Tensor]
) -> bool:
    """No byte of memory is in two targets, or in a target and one of
    ``others`` (the model's tensors): each target is filled on its own."""
    spans = [
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), True)
        for targets in target_sets
        for t in (targets or {}).values()
        if t.numel()
    ]
    if not spans:
        return True
    spans += [
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), False)
        for t in others
        if t.device.type == "cpu" and t.numel() and t.layout is torch.strided
    ]
    spans.sort()
    reach, reach_is_target = 0, False
    for start, end, is_target in spans:
        if start < reach and (is_target or reach_is_target):
            return False
        if end > reach:
            reach, reach_is_target = end, is_target
    return True


def _gradient_targets(acc: Accumulator, header: Any) -> dict[str, torch.Tensor] | None:
    """The live in-flight gradients a checkpoint's gradients can be read into
    (`_fits`, by canonical name), or ``None`` unless every one has one."""
    live = acc.gradients.export()
    targets = {name: live.get(name) for name in header.tensors}
    if all(_fits(t, header.tensors[n]) for n, t in targets.items()):
        return {n: t for n, t in targets.items() if t is not None}
    return None


def _optimizer_targets(acc: Accumulator, header: Any, meta: Any) -> dict[str, torch.Tensor] | None:
    """The live optimizer state tensors a checkpoint's optimizer file can be
    read into — every ``state.<parameter>.<field>`` must exist (`_fits`) and
    be what ``load_state_dict`` keeps as it is (the parameter's dtype and
    device; ``step`` is kept unless a saved group is ``fused`` or
    ``capturable``, when torch converts it: then nothing is) — or ``None``."""
    groups = meta.get("param_groups") if isinstance(meta, Mapping) else None
    if not isinstance(groups, list) or any(
        not isinstance(g, Mapping) or g.get("fused") or g.get("capturable") for g in groups
    ):
        return None
    params = acc.named_parameters()
    state = acc.optimizer.state
    targets: dict[str, torch.Tensor] = {}
    for key, info in header.tensors.items():
        name, _, field = key[len("state.") :].rpartition(".")
        param = params.get(name) if key.startswith("state.") else None
        if param is None or param not in state:
            return None
        target = state[param].get(field)
        if not _fits(target, info):
            return None
        if field != "step" and (target.device != param.device or target.dtype != param.dtype):
            return None
        targets[key] = target
    return targets


def _with_targets(
    plan: dict[str, Any], views: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """``plan`` (a state dict built from the file's views) with every view
    replaced by the live tensor it will be read into."""
    by_view = {id(views[key]): target for key, target in targets.items()}
    for per_param in plan["state"].values():
        for field, value in per_param.items():
            if isinstance(value, torch.Tensor):
                per_param[field] = by_view[id(value)]
    return plan


def _check_kept(targets: list[torch.Tensor], installed: list[Any], what: str) -> None:
    """Every in-place target is what ``what`` now holds (it was not replaced by a copy)."""
    held = {id(t) for t in installed}
    if any(id(t) not in held for t in targets):
        raise CheckpointError(
            f"{what} replaced the tensors the checkpoint was to be read into; nothing was "
            f"loaded — report this with the optimizer and accumulator options used"
        )


def _bytes_of(tensor: torch.Tensor) -> Any:
    """A contiguous CPU tensor's memory as a writable NumPy byte array (no copy)."""
    return tensor.view(-1).view(torch.uint8).numpy()


def read_tensors(
    ckpt: Checkpoint, role: str, verify: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """``role``'s tensors read straight from the file into new CPU tensors
    (`Checkpoint.read_into`: ``pread``, no mapping, no second copy), the
    header verified first and each tensor's digest while it is read (CKPT-7,
    CKPT-25, CKPT-26) — only the tensors named in ``verify`` when given (the
    rest read unchecked: another process verifies them, see `prepare_load`'s
    ``share``). A format-1 file is verified whole first (its one digest
    protects the header) and every tensor again as it is read, so the bytes
    kept are bytes checked. Raises `CheckpointError` (nothing else is
    changed); the tensors are the caller's to keep."""
    header = ckpt.verify_header(role)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        tensor = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
        check = verify is None or name in verify
        ckpt.read_into(role, name, _bytes_of(tensor), verify=check)
        out[name] = tensor
    return out


def _check_gradients(acc: Accumulator, gradients: Mapping[str, torch.Tensor], where: str) -> None:
    acc.gradients.check(gradients)
    for name, tensor in gradients.items():
        if not tensor.is_floating_point():
            raise CheckpointCorruptError(
                f"{where}: in-flight gradient {name!r} has dtype {tensor.dtype}; gradients are "
                f"floating point; {_FIX}"
            )


def _model_plan(
    acc: Accumulator, stored: dict[str, torch.Tensor], metadata: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    model_meta = metadata.get("model") or {}
    if not isinstance(model_meta, Mapping):
        raise CheckpointCorruptError(f"the checkpoint's model metadata is not an object; {_FIX}")
    aliases = model_meta.get("aliases") or {}
    return _check_model(acc.model, _with_aliases(stored, aliases), acc.framework.name_prefix)


def _optimizer_plan(
    acc: Accumulator, tensors: Mapping[str, torch.Tensor], meta: Any
) -> dict[str, Any]:
    return load_optimizer_state(acc.optimizer, tensors, meta, _names_by_id(acc))


_FIX = "the checkpoint is corrupt or was edited — restore it from a copy or take a new checkpoint"


def _check_scheduler_meta(scheduler: Any, meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, Mapping) or not isinstance(meta.get("state"), Mapping):
        raise CheckpointCorruptError(
            f"{where}: its scheduler metadata must be an object with 'class' and 'state', got "
            f"{_clip(repr(meta))}; {_FIX}"
        )
    if meta.get("class") != type(scheduler).__name__:
        raise CheckpointMismatchError(
            f"the checkpoint's scheduler is {_clip(repr(meta.get('class')))} but the "
            f"accumulator's is {type(scheduler).__name__!r}; build the same scheduler to resume"
        )
    live = scheduler.state_dict()
    saved = check_like(from_json(dict(meta["state"])), live, "scheduler state", partial=True)
    check_ranges(saved, SCHEDULER_RANGES, "scheduler state", SCHEDULER_INTS)
    out: dict[str, Any] = saved
    return out


def _check_scaler_meta(scaler: Any, meta: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(meta, Mapping) or not isinstance(meta.get("state"), Mapping):
        raise CheckpointCorruptError(
            f"{where}: its scaler metadata must be an object with 'state', got "
            f"{_clip(repr(meta))}; {_FIX}"
        )
    live = scaler.state_dict()
    if not live:
        return None  # a disabled scaler keeps no state
    saved = from_json(dict(meta["state"]))
    if not saved:
        raise CheckpointMismatchError(
            f"{where}: its scaler state is empty (saved from a disabled GradScaler) but this "
            f"scaler is enabled; build the scaler as it was saved"
        )
    checked = check_like(saved, live, "scaler state")
    check_ranges(
        checked, SCALER_RANGES, "scaler state", frozenset({"growth_interval", "_growth_tracker"})
    )
    out: dict[str, Any] = checked
    return out


def _hyper(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's hyper-parameters (every group without its params)."""
    return [
        {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        for group in optimizer.param_groups
    ]


def _set_hyper(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        group.update(saved)


def _probe_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, where: str) -> None:
    """One trial ``scheduler.step()`` on the installed state, undone: the
    learning rates it sets must be finite numbers >= 0."""
    state = copy.deepcopy(scheduler.state_dict())
    groups = _hyper(optimizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step()
        lrs = [group["lr"] for group in optimizer.param_groups]
    finally:
        scheduler.load_state_dict(state)
        _set_hyper(optimizer, groups)
    for lr in lrs:
        value = lr.item() if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise CheckpointCorruptError(
                f"{where}: its scheduler state gives the learning rate {_clip(repr(lr))} at the "
                f"next step; {_FIX}"
            )


def _items_tensor(tensors: Mapping[str, torch.Tensor], role: str) -> torch.Tensor:
    """The item count of ``role``: one 0-d floating tensor, NaN (a bad count,
    refused at the resumed boundary) or a finite number >= 0."""
    count = tensors.get("items")
    if (
        set(tensors) != {"items"}
        or count is None
        or count.dim() != 0
        or not count.is_floating_point()
    ):
        raise CheckpointCorruptError(
            f"the {role!r} file must hold one 0-d floating tensor named 'items', got "
            f"{ {k: (tuple(v.shape), str(v.dtype)) for k, v in list(tensors.items())[:5]} }; "
            f"{_FIX}"
        )
    value = float(count.item())
    if not math.isnan(value) and not (math.isfinite(value) and value >= 0):
        raise CheckpointCorruptError(
            f"the {role!r} file holds the item count {value}; it must be >= 0 and finite; {_FIX}"
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
        if not isinstance(name, str) or name not in tensors or alias in out:
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
        if _dtype_kind(live[key].dtype) != _dtype_kind(tensor.dtype):
            raise CheckpointMismatchError(
                f"model tensor {name!r} has dtype {tensor.dtype} in the checkpoint but "
                f"{live[key].dtype} in the model; load it into the model it was saved from"
            )
        out[key] = tensor
    return out


def _dtype_kind(dtype: torch.dtype) -> str:
    """bool, complex, floating or integer: precisions within a kind convert on load."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"
