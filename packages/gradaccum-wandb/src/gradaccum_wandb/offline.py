"""Read an offline W&B run's ``.wandb`` file back (a test utility).

wandb 0.30+ has no public reader for offline runs (``wandb.Api`` reads only
synced runs). This module decodes the file the Go core writes, so tests and
users can check what a run recorded without a network:

* a 7-byte header: ``b":W&B"``, the magic ``0xBEE1`` (little-endian uint16),
  a version byte;
* then LevelDB-log framing in 32 KiB blocks: each chunk has a 7-byte header
  (the CRC-32 of the type byte and the payload, a little-endian uint32; the
  payload's length, a little-endian uint16; the type: 1 full, 2 first,
  3 middle, 4 last);
  a block's tail shorter than 7 bytes is padding;
* each reassembled payload is a ``wandb.proto.wandb_internal_pb2.Record``.

Every chunk's checksum is verified; a damaged or truncated file raises
`OfflineRunError`. Finish the run with ``run.finish()`` and then
``wandb.teardown()`` before reading: without the teardown the file can still
be only its header.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradaccum.errors import GradAccumError

__all__ = [
    "OfflineRun",
    "OfflineRunError",
    "find_run_file",
    "read_history",
    "read_records",
    "read_run",
]

_HEADER = b":W&B" + struct.pack("<H", 0xBEE1)
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class OfflineRunError(GradAccumError):
    """A ``.wandb`` file that is missing, truncated or damaged."""


def _check_crc(stored: int, kind: int, payload: bytes) -> bool:
    return stored == zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF


def _payloads(data: bytes, name: str) -> Iterator[bytes]:
    if len(data) < 7 or data[:6] != _HEADER:
        raise OfflineRunError(
            f"{name} is not a W&B run log (header {data[:7]!r}); pass the run-<id>.wandb file "
            f"of an offline run"
        )
    offset = 7
    pending: bytearray | None = None
    while offset < len(data):
        left_in_block = _BLOCK - (offset % _BLOCK)
        if left_in_block < _CHUNK_HEADER:
            offset += left_in_block  # block padding
            continue
        if len(data) - offset < _CHUNK_HEADER:
            break  # zero padding at the very end
        stored, length, kind = struct.unpack_from("<IHB", data, offset)
        if stored == 0 and length == 0 and kind == 0:
            offset += left_in_block  # zero-filled rest of the block
            continue
        start = offset + _CHUNK_HEADER
        payload = data[start : start + length]
        if len(payload) != length or not _check_crc(stored, kind, payload):
            raise OfflineRunError(
                f"{name}: damaged chunk at byte {offset} (type {kind}, length {length}): the "
                f"checksum does not match or the file is truncated; was the run finished with "
                f"run.finish() and wandb.teardown() before reading?"
            )
        offset = start + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = bytearray(payload)
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += payload
            if kind == _LAST:
                yield bytes(pending)
                pending = None
        else:
            raise OfflineRunError(f"{name}: unexpected chunk type {kind} at byte {offset}")


def find_run_file(path: str | os.PathLike[str]) -> Path:
    """The ``run-<id>.wandb`` file: ``path`` itself, or the only one under
    ``path`` (a ``dir=`` given to ``wandb.init`` or a run directory)."""
    target = Path(path)
    if target.is_file():
        return target
    found = sorted(
        p for p in target.rglob("run-*.wandb") if "latest-run" not in p.parts and p.is_file()
    )
    if len(found) != 1:
        raise OfflineRunError(
            f"expected exactly one run-*.wandb file under {target}, found {len(found)}: "
            f"{[str(p) for p in found]}; pass the file itself"
        )
    return found[0]


def read_records(path: str | os.PathLike[str]) -> list[Any]:
    """Every record of the run as ``wandb_internal_pb2.Record`` messages, in order."""
    from wandb.proto import wandb_internal_pb2

    file = find_run_file(path)
    records = []
    for payload in _payloads(file.read_bytes(), str(file)):
        record: Any = wandb_internal_pb2.Record()  # type: ignore[attr-defined,unused-ignore]
        try:
            record.ParseFromString(payload)
        except Exception as exc:  # protobuf's DecodeError
            raise OfflineRunError(f"{file}: a record does not parse: {exc}") from None
        records.append(record)
    return records


def _item_key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


@dataclass(frozen=True)
class OfflineRun:
    """What `read_run` found: the history rows (``_step``, ``_runtime`` and
    ``_timestamp`` removed), the metric definitions (name to step metric),
    whether the run's ``exit`` record is present, and its exit code."""

    history: list[dict[str, Any]]
    metrics: dict[str, str] = field(default_factory=dict)
    has_exit: bool = False
    exit_code: int | None = None


def read_run(path: str | os.PathLike[str]) -> OfflineRun:
    """Decode a finished offline run (see the module docstring)."""
    history: list[dict[str, Any]] = []
    metrics: dict[str, str] = {}
    has_exit = False
    exit_code: int | None = None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            for private in ("_step", "_runtime", "_timestamp"):
                row.pop(private, None)
            history.append(row)
        elif kind == "metric":
            name = record.metric.name or record.metric.glob_name
            metrics[name] = record.metric.step_metric
        elif kind == "exit":
            has_exit = True
            exit_code = int(record.exit.exit_code)
    return OfflineRun(history, metrics, has_exit, exit_code)


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The history rows of a finished offline run, one dict per ``run.log``
    row, without wandb's private ``_step``/``_runtime``/``_timestamp``."""
    return read_run(path).history
