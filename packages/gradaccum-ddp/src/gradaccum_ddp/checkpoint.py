"""Checkpoints of a `Accumulator` in the shared format.

Any accumulator whose distributed side is a `DDPDistributed` (``DDPAccumulator``,
the Accelerate and Lightning adapters on several processes) saves and loads
through these two functions.

One directory per checkpoint, installed once, by rank 0, atomically
(``spec/checkpoint-v1.md``): the common accumulation state and config, the
model, optimizer, scheduler and scaler state (identical on every rank), and
each rank's own in-flight gradients as ``gradients.rank<r>``
(they differ until the boundary's all-reduce). Under ``normalization="items"``
a mid-window checkpoint also holds each rank's item count of the open window
as ``items.rank<r>`` (a float64 scalar named ``items``); the manifest's state
then records ``items_in_window = 0`` and ``device_items = true``, so the one
state in the manifest is true for every rank and the count each rank resumes
with is its own.

Saving (every rank calls `save_distributed` at the same point):

1. every rank describes its own files (tensor sources, no bytes yet) and
   all-gathers one row: a digest of the state and config it would write,
   whether it got this far, and a random number — ranks that disagree raise
   before anything is written; rank 0's number names the staging directory;
2. rank 0 stages the checkpoint (``stage_checkpoint``: everything validated,
   an empty temporary sibling of the target created);
3. every rank that sees the staging directory (a file system all ranks share,
   the assumption ``torch.distributed.checkpoint`` makes) writes its own files
   into it straight from its tensors, hashing while it writes
   (``write_shard``); the optimizer file, which every rank holds identically,
   goes to the rank with the fewest bytes to write (ties: the lowest rank;
   rank 0 counts the model file, which it always writes: a model's buffers,
   such as BatchNorm running statistics, may differ between ranks until the
   next forward), as ``torch.distributed.checkpoint`` spreads replicated
   tensors, so that no rank writes everything while the others wait (the
   ranks first all-gather who sees the directory, how many bytes of its own
   it writes and a digest of the spread files' names and sizes; if those
   digests differ, rank 0 writes them); the files of a rank that does not see the
   directory (one only rank 0 sees) travel to rank 0 as uint8 tensors, one
   rank at a time, and rank 0 writes them — so rank 0 never holds more than
   one other rank's files;
4. rank 0 gathers the files' manifest entries and commits (``manifest.json``,
   its checksum, fsync, atomic rename); on any failure it removes the staging
   directory;
5. all ranks all-gather rank 0's verdict: the call returns on every rank only
   once the checkpoint is complete on disk, and raises on every rank if it is
   not. A rank that dies in between makes the others raise
   `DistributedError`; the target is then either absent or the previous
   complete checkpoint.

Loading (every rank calls `load_distributed`): the ranks first agree that
they read the same manifest — read by path, then once more as opened, so a
directory replaced in between is caught —; every rank then verifies and
checks, against its own live objects, everything it will restore
(`prepare_load`): its own files whole, and of the model and optimizer files,
when other ranks opened the very same files on the same machine (same kernel
boot id, device, inode, size, modification time), only its share of the
tensors (`gradaccum_torch.checkpoint.verification_share`) and every header;
the ranks all-gather an ok flag and only when every rank is ready does any
rank apply, so every share's verdict is every rank's.
If any rank refuses, every rank raises and none changed anything; if applying
fails on some rank, the ranks that applied put their optimizer, scheduler,
scaler and accumulation state back before the model is touched, and every
rank raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gradaccum.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Checkpoint,
    FileEntry,
    Producer,
    abort_checkpoint,
    check_format_version,
    commit_checkpoint,
    decode_file_entries,
    encode_file_entries,
    stage_checkpoint,
    write_shard,
)
from gradaccum.checkpoint.atomic import temporary_path
from gradaccum.errors import CheckpointError, DistributedError, UsageError
from gradaccum.lockstep import Tag, describe, digest
from gradaccum_ddp.collectives import (
    communication_errors,
    gather_bytes,
    gather_rows,
    pack_files,
)
from gradaccum_ddp.distributed import DDPDistributed
from gradaccum_torch.checkpoint import (
    REPLICATED_ROLES,
    LoadPlan,
    collect,
    items_role,
    open_for_load,
    prepare_load,
)
from gradaccum_torch.tensor_io import tensors_to_bytes

if TYPE_CHECKING:
    from gradaccum_torch import Accumulator

__all__ = ["SPREAD_ROLES", "assign_replicated", "load_distributed", "save_distributed"]

_PER_RANK_KEYS = ("items_in_window", "items_total")


def _common_state(acc: Accumulator, state: dict[str, Any]) -> dict[str, Any]:
    """The part of the state every rank must agree on. Outside ``items``
    normalization item counts are informational and this rank's own."""
    if acc.config.normalization == "items":
        return state
    return {k: v for k, v in state.items() if k not in _PER_RANK_KEYS}


def _ranks(acc: Accumulator) -> DDPDistributed:
    """The accumulator's process group (its distributed side must be a DDPDistributed)."""
    ranks = acc.distributed
    if not isinstance(ranks, DDPDistributed):
        raise UsageError(
            f"a checkpoint of several ranks needs the accumulator's distributed side to be a "
            f"gradaccum_ddp.DDPDistributed, got {type(ranks).__name__}"
        )
    return ranks


def _fold_items(acc: Accumulator, state: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """Move this rank's item count of the open window into ``items.rank<r>``."""
    if acc.config.normalization != "items" or state["position"] == 0:
        return state
    local = torch.zeros((), dtype=torch.float64)
    device_items = acc.inflight_items()
    if device_items is not None:
        local = local + device_items.detach().to("cpu", torch.float64)
    local = local + float(state["items_in_window"])
    ranks = acc.distributed
    files[items_role(ranks.rank, ranks.world_size)] = tensors_to_bytes({"items": local})
    return {**state, "items_in_window": 0, "device_items": True}


def save_distributed(
    acc: Accumulator,
    path: str | os.PathLike[str],
    *,
    model: bool = True,
    optimizer: bool = True,
    scheduler: bool = True,
    scaler: bool = True,
    shared: bool | None = None,
    format_version: int = FORMAT_VERSION,
) -> None:
    """Write ``acc``'s checkpoint (see the module docstring) in
    ``format_version`` (every rank must pass the same: the ranks compare it
    before anything is written); call on every rank.

    ``shared=None`` (the default) lets each rank write its own files when it
    sees rank 0's staging directory and sends them through rank 0 otherwise;
    ``False`` always sends them through rank 0; ``True`` requires every rank
    to see the directory (a rank that does not raises, on every rank)."""
    ranks = _ranks(acc)
    rank, world = ranks.rank, ranks.world_size
    group, device = ranks.group, ranks.device
    config = acc.config.to_dict()
    state = acc.machine.state_dict()
    files: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        if shared not in (None, True, False):
            raise UsageError(f"shared={shared!r} must be None, True or False")
        check_format_version(format_version, "save_distributed")
        # Every rank describes the replicated files too (tensor sources: no
        # bytes yet), so that any rank can write them (step 3).
        files, metadata = collect(
            acc,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler and rank == 0,
            scaler=scaler and rank == 0,
            rank=rank,
            world_size=world,
            stream=True,
        )
        state = _fold_items(acc, state, files)
    except Exception as exc:
        error = exc
    state_digest = digest(
        {
            "state": _common_state(acc, state),
            "config": config,
            "format_version": format_version if type(format_version) is int else -1,
        }
    )
    nonce = secrets.randbits(62)
    with communication_errors("the checkpoint's agreement step", rank):
        rows = gather_rows([Tag.SAVE, state_digest, int(error is None), nonce], group, device)
    _raise_failures(rows, Tag.SAVE, rank, error, "no checkpoint was written")
    if any(row[:2] != rows[0][:2] for row in rows):
        raise DistributedError(describe([row[:2] for row in rows]))
    token = f"{rows[0][3]:016x}"
    producer = Producer(*acc.producer)
    staged = False
    try:
        # 2. rank 0 stages
        if rank == 0:
            try:
                stage_checkpoint(
                    path,
                    token=token,
                    state=state,
                    config=config,
                    producer=producer,
                    world_size=world,
                    metadata=metadata,
                )
                staged = True
            except Exception as exc:
                error = exc
        _agree(Tag.SAVE, rank, group, device, error, 1, "rank 0 could not stage the checkpoint")
        # 3. every rank that sees the staging directory writes its own files
        sees = shared is not False and os.path.isdir(
            temporary_path(Path(os.path.abspath(os.fspath(path))), token)
        )
        own_files = {role: src for role, src in files.items() if role.endswith(f".rank{rank}")}
        shared_files = {r: s for r, s in files.items() if r not in own_files}
        writes = sees or rank == 0
        shared_sizes = {
            role: _file_size(src) for role, src in shared_files.items() if role in SPREAD_ROLES
        }
        own_bytes = sum(_file_size(src) for src in own_files.values())
        if rank == 0:  # rank 0 writes every replicated file that is not spread (the model)
            own_bytes += sum(
                _file_size(src) for role, src in shared_files.items() if role not in SPREAD_ROLES
            )
        with communication_errors("the checkpoint's write plan", rank):
            plan = gather_rows(
                [Tag.SAVE, int(writes), own_bytes, digest(sorted(shared_sizes.items()))],
                group,
                device,
            )
        spread = assign_replicated(shared_sizes, plan)
        mine = [role for role in shared_files if spread.get(role, 0) == rank]  # else rank 0's
        entries: dict[str, FileEntry] = {}
        blob = b""
        try:
            if shared is True and not sees:
                raise CheckpointError(
                    f"rank {rank} does not see the staging directory of {os.fspath(path)!r}; "
                    f"shared=True needs a directory every rank sees — pass shared=None"
                )
            if writes:
                assigned = {role: shared_files[role] for role in mine}
                entries = write_shard(
                    path,
                    token=token,
                    files={**own_files, **assigned},
                    format_version=format_version,
                )
                blob = encode_file_entries(entries) if rank != 0 else b""
            else:
                blob = b""
        except Exception as exc:
            error = exc
        row = [Tag.SAVE, int(error is None), int(sees or rank == 0), len(blob)]
        with communication_errors("the checkpoint's shard step", rank):
            rows = gather_rows(row, group, device)
        _raise_failures(rows, Tag.SAVE, rank, error, "no checkpoint was written", ok_at=1)
        # ... and the files of ranks that do not see it go through rank 0, one rank at a time
        for other in (r for r, row in enumerate(rows) if not row[2]):
            data = None
            if rank == other:
                data = pack_files({role: _source_bytes(src) for role, src in own_files.items()})
            with communication_errors(f"sending rank {other}'s files to rank 0", rank):
                received = _relay(data, other, group, device)
            if rank == 0 and received is not None:
                try:
                    entries.update(
                        write_shard(
                            path,
                            token=token,
                            files=_unpack(received),
                            format_version=format_version,
                        )
                    )
                except Exception as exc:
                    error = exc
                del received
        with communication_errors("gathering the files' manifest entries", rank):
            blobs = gather_bytes(blob, group, device, [row[3] for row in rows])
        # 4. rank 0 commits
        if rank == 0 and error is None and blobs is not None:
            try:
                for other, data in enumerate(blobs):
                    if other != 0 and data:
                        entries.update(decode_file_entries(data))
                commit_checkpoint(
                    path,
                    token=token,
                    state=state,
                    config=config,
                    producer=producer,
                    entries=entries,
                    world_size=world,
                    metadata=metadata,
                    format_version=format_version,
                )
                staged = False
            except Exception as exc:
                error = exc
    finally:
        if staged:
            with contextlib.suppress(Exception):
                abort_checkpoint(path, token=token)
    # 5. everyone learns rank 0's verdict
    with communication_errors("the checkpoint's completion step", rank):
        rows = gather_rows([Tag.SAVED, int(error is None)], group, device)
    _raise_failures(
        rows,
        Tag.SAVED,
        rank,
        error,
        "rank 0 could not write the checkpoint (the previous one, if any, is intact)",
    )


def _file_size(source: Any) -> int:
    """The bytes of a role's file: ``source`` is its bytes or its tensor sources."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    return int(sum(t.nbytes for t in source.values()))


#: The replicated files a save spreads over the ranks (`assign_replicated`);
#: the others (the model) rank 0 writes.
SPREAD_ROLES = ("optimizer",)


def assign_replicated(sizes: dict[str, int], plan: list[list[int]]) -> dict[str, int]:
    """Which rank writes each spread file (`SPREAD_ROLES`: the optimizer's),
    given each rank's row ``[tag, writes, own bytes, digest of the spread
    files' names and sizes]``: largest file first, to the writing rank with the
    fewest bytes so far (ties: the lowest rank). Every rank computes the same
    answer from the same rows; when the ranks' digests differ (their
    replicated files are not alike), rank 0 writes them all."""
    if any(row[3] != plan[0][3] for row in plan):
        return dict.fromkeys(sizes, 0)
    loads = {r: row[2] for r, row in enumerate(plan) if row[1] or r == 0}
    out: dict[str, int] = {}
    for role in sorted(sizes, key=lambda r: (-sizes[r], r)):
        writer = min(loads, key=lambda r: (loads[r], r))
        out[role] = writer
        loads[writer] += sizes[role]
    return out


def _source_bytes(files: Any) -> bytes:
    """A role's safetensors bytes: ``files`` is already bytes, or tensor sources."""
    if isinstance(files, (bytes, bytearray, memoryview)):
        return bytes(files)
    from gradaccum.checkpoint import RawTensor, encode_safetensors

    raw = {}
    for name, src in files.items():
        data = src.data() if callable(src.data) else src.data
        raw[name] = RawTensor(src.dtype, src.shape, bytes(data))
    return encode_safetensors(raw)


def _unpack(blob: memoryview) -> dict[str, memoryview]:
    """`unpack_files` without copies: each role's bytes as a view of ``blob``."""
    (size,) = struct.unpack_from("<Q", blob, 0)
    index = json.loads(bytes(blob[8 : 8 + size]).decode())
    out: dict[str, memoryview] = {}
    offset = 8 + size
    for role, length in index:
        out[str(role)] = blob[offset : offset + int(length)]
        offset += int(length)
    return out


def _relay(data: bytes | None, src: int, group: Any, device: torch.device) -> memoryview | None:
    """Send ``data`` from group rank ``src`` to rank 0 (length first); rank 0
    returns a view of the bytes received (no further copy), every other rank
    ``None``."""
    rank = dist.get_rank(group)
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    src_global = dist.get_global_rank(group, src) if group is not None else src
    dst_global = dist.get_global_rank(group, 0) if group is not None else 0
    if rank == src:
        dist.send(length.to(device), dst=dst_global, group=group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only bytes: send only reads them
            payload = torch.frombuffer(data or b"\0", dtype=torch.uint8)
        dist.send(payload.to(device), dst=dst_global, group=group)
        return None
    if rank == 0:
        size = torch.zeros(1, dtype=torch.int64, device=device)
        dist.recv(size, src=src_global, group=group)
        n = int(size.item())
        buf = torch.empty(max(n, 1), dtype=torch.uint8, device=device)
        dist.recv(buf, src=src_global, group=group)
        host = buf[:n].to("cpu")
        view: memoryview = host.numpy().data
        return view
    return None


def load_distributed(acc: Accumulator, path: str | os.PathLike[str]) -> None:
    """Restore ``acc`` on every rank from ``path``, all or nothing (see the
    module docstring); every rank must see the same directory (on several
    nodes: a shared file system)."""
    ranks = _ranks(acc)
    rank, group, device = ranks.rank, ranks.group, ranks.device
    try:
        manifest = (Path(os.fspath(path)) / MANIFEST_NAME).read_bytes()
    except (OSError, TypeError, ValueError):
        manifest = b""
    manifest_digest = int.from_bytes(hashlib.sha256(manifest).digest()[:7], "little")
    with communication_errors("the checkpoint's agreement step", rank):
        rows = gather_rows([Tag.LOAD, manifest_digest], group, device)
    if any(row != rows[0] for row in rows):
        raise DistributedError(describe(rows))
    plan: LoadPlan | None = None
    error: BaseException | None = None
    ckpt: Checkpoint | None = None
    try:
        try:
            ckpt = open_for_load(path)
        except Exception as exc:
            error = exc
        # Ranks on one machine that opened the very same replicated files split
        # their verification (each hashes its part; step 1 below makes every
        # rank's verdict everyone's before anything is applied).
        mine = _replica_identity(ckpt) if ckpt is not None else 0
        opened = digest(ckpt.manifest.to_json_dict()) if ckpt is not None else 0
        with communication_errors("the checkpoint's agreement step", rank):
            rows = gather_rows([Tag.LOADED, int(error is None), 0, mine, opened], group, device)
        if any(row[2] != 0 for row in rows):
            raise DistributedError(describe(rows))
        if error is None and any(row[1] and row[4] != opened for row in rows):
            error = DistributedError(
                f"rank {rank}: the ranks opened different checkpoints at "
                f"{str(os.fspath(path))!r} (the directory was replaced while they opened "
                "it); nothing was changed — load again when no process is writing it"
            )
        peers = [r for r, row in enumerate(rows) if row[1] and row[3] == mine]
        share = (peers.index(rank), len(peers)) if mine != 0 and len(peers) > 1 else None
        if error is None and ckpt is not None and all(row[1] for row in rows):
            try:
                plan = prepare_load(acc, ckpt, rank=rank, share=share)
            except Exception as exc:
                error = exc
            ckpt = None  # the plan holds it now (prepare_load closes it on failure)
        _agree(Tag.LOADED, rank, group, device, error, 1, "nothing was changed on any rank")
        assert plan is not None
        try:
            plan.apply_reversible()
        except Exception as exc:
            error = exc
        try:
            _agree(
                Tag.LOADED,
                rank,
                group,
                device,
                error,
                2,
                "every rank put its optimizer, scheduler, scaler and accumulation state back; "
                "nothing was changed",
            )
        except BaseException:
            if error is None:
                plan.undo()
            raise
        try:
            plan.apply_in_place()
        except Exception as exc:
            error = exc
        _agree(
            Tag.LOADED,
            rank,
            group,
            device,
            error,
            3,
            "the other ranks loaded the checkpoint but the ranks are no longer consistent: "
            "fix the cause and load again on every rank",
        )
    finally:
        if plan is not None:
            plan.close()
        if ckpt is not None:
            ckpt.close()


def _replica_identity(ckpt: Checkpoint) -> int:
    """A digest of this machine's boot id and the replicated files' identities
    (device, inode, size, mtime): equal on two ranks only if they read the same
    files on the same running kernel; 0 (never shared) when unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        files = [
            [role, *identity]
            for role in REPLICATED_ROLES
            if role in ckpt.roles and (identity := ckpt.file_identity(role)) is not None
        ]
    except (OSError, UnicodeDecodeError):
        return 0
    if not boot or not files:
        return 0
    return digest([boot, files]) or 1


def _agree(
    tag: int,
    rank: int,
    group: Any,
    device: torch.device,
    error: BaseException | None,
    phase: int,
    consequence: str,
) -> None:
    """One agreement row ``[tag, ok, phase]`` (``SAVE`` or ``LOADED``): raise on
    every rank unless every rank is ok and at the same phase."""
    with communication_errors("the checkpoint's agreement step", rank):
        rows = gather_rows([tag, int(error is None), phase], group, device)
    if any(row[2] != phase for row in rows):
        raise DistributedError(describe(rows))
    _raise_failures(rows, tag, rank, error, consequence, ok_at=1)


def _raise_failures(
    rows: list[list[int]],
    tag: int,
    rank: int,
    error: BaseException | None,
    consequence: str,
    *,
    ok_at: int | None = None,
) -> None:
    """Raise on every rank when the rows are not all ``tag`` (ranks out of step)
    or some rank reports a failure: this rank's own error where it failed, a
    `DistributedError` naming the failed ranks elsewhere."""
    if any(row[0] != tag for row in rows):
        raise DistributedError(describe(rows))
    if ok_at is None:
        ok_at = 2 if tag == Tag.SAVE else 1
    failed = [r for r, row in enumerate(rows) if not row[ok_at]]
    if not failed:
        return
    if error is not None:
        raise error
    raise DistributedError(
        f"rank(s) {failed} failed (their own error says why); {consequence} on rank {rank}"
    )
