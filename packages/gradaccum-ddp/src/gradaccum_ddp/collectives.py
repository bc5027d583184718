"""The few collectives gradaccum-ddp makes besides DDP's own gradient all-reduce.

All of them run on the DDP model's process group, on the backend's device
(CUDA for NCCL, CPU otherwise). Every failure of a collective — a peer that
died, a timeout of the process group — becomes a
`DistributedError` naming the operation and the fix.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import struct
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from gradaccum.errors import DistributedError, GradAccumError

__all__ = [
    "ROW",
    "average_",
    "comm_device",
    "communication_errors",
    "gather_bytes",
    "gather_rows",
    "is_communication_error",
    "pack_files",
    "unpack_files",
]

ROW = 8
"""Length of the int64 row every rank contributes to a checkpoint's agreement step."""


_MARKERS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "peer",
    "processgroup",
    "process group",
    "c10d",
    "socket",
    "broken pipe",
)

FIX_DEAD = (
    "a peer rank probably died or stopped responding (the process-group timeout bounds the "
    "wait: pass timeout=datetime.timedelta(...) to init_process_group); restart the job and "
    "resume from the last checkpoint"
)


def is_communication_error(exc: BaseException) -> bool:
    """True for an error raised by a collective: ``torch.distributed.DistError``
    or a ``RuntimeError`` from the backend (gloo reports a dead peer as a plain
    ``RuntimeError`` "Connection closed by peer")."""
    if isinstance(exc, GradAccumError):
        return False
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _MARKERS)


@contextlib.contextmanager
def communication_errors(what: str, rank: int, *, always: bool = True) -> Iterator[None]:
    """Turn a failed collective inside the block into a `DistributedError`.

    ``always=False`` converts only errors that look like communication
    failures (for blocks that also run user code, such as a backward).
    """
    try:
        yield
    except GradAccumError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        if not always and not is_communication_error(exc):
            raise
        raise DistributedError(f"{what} failed on rank {rank}: {exc}. {FIX_DEAD}") from exc


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device of tensors the group's backend reduces: CUDA for NCCL, else CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _needs_move(tensor: torch.Tensor, device: torch.device) -> bool:
    return device.type == "cuda" and tensor.device.type != "cuda"


def average_(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None,
    device: torch.device,
    world_size: int,
) -> int:
    """Average ``tensors`` in place over the group's ranks: one all-reduce per
    (device, dtype) group of a flattened copy. Returns the number of collectives.

    Every rank must pass tensors of the same shapes in the same order.
    """
    by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_key.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group_tensors in by_key.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        work = flat.to(device) if _needs_move(flat, device) else flat
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
        work.div_(world_size)
        offset = 0
        for tensor in group_tensors:
            size = tensor.numel()
            tensor.copy_(work[offset : offset + size].view_as(tensor))
            offset += size
    return len(by_key)


def gather_rows(
    row: Sequence[int], group: dist.ProcessGroup | None, device: torch.device
) -> list[list[int]]:
    """All-gather one int64 row (at most `ROW` integers) per rank; every
    rank gets every rank's row, in rank order. One collective, one host read."""
    values = list(row) + [0] * (ROW - len(row))
    if len(values) != ROW:
        raise ValueError(f"a lockstep row holds at most {ROW} integers, got {len(row)}")
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [[int(v) for v in t.tolist()] for t in gathered]


def gather_bytes(
    blob: bytes, group: dist.ProcessGroup | None, device: torch.device, lengths: Sequence[int]
) -> list[bytes] | None:
    """Gather every rank's ``blob`` on group rank 0 as uint8 tensors (no pickle).

    ``lengths`` are every rank's blob length, already exchanged. Returns the
    blobs on rank 0 (in rank order) and ``None`` elsewhere.
    """
    rank = dist.get_rank(group)
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)
    if blob:
        padded[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    mine = padded.to(device)
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    if rank == 0:
        buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in lengths]
        dist.gather(mine, gather_list=buffers, dst=dst, group=group)
        return [_to_bytes(buf[:n]) for buf, n in zip(buffers, lengths, strict=True)]
    dist.gather(mine, gather_list=None, dst=dst, group=group)
    return None


def _to_bytes(tensor: torch.Tensor) -> bytes:
    host = tensor.detach().to("cpu").contiguous()
    if host.numel() == 0:
        return b""
    return ctypes.string_at(host.data_ptr(), host.numel())


def pack_files(files: Mapping[str, bytes]) -> bytes:
    """Concatenate ``{role: bytes}`` behind a JSON index (8-byte little-endian
    length first). A plain, pickle-free container for `gather_bytes`."""
    index = json.dumps([[role, len(data)] for role, data in files.items()]).encode()
    return struct.pack("<Q", len(index)) + index + b"".join(files.values())


def unpack_files(blob: bytes) -> dict[str, bytes]:
    """Inverse of `pack_files`."""
    (size,) = struct.unpack_from("<Q", blob, 0)
    index = json.loads(blob[8 : 8 + size].decode())
    out: dict[str, bytes] = {}
    offset = 8 + size
    for role, length in index:
        out[str(role)] = blob[offset : offset + int(length)]
        offset += int(length)
    return out
