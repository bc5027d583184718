"""A pure-Python reader and writer of safetensors files.

The safetensors layout: an 8-byte little-endian unsigned header length ``N``,
then ``N`` bytes of UTF-8 JSON (an object mapping each tensor name to
``{"dtype", "shape", "data_offsets"}`` plus an optional ``"__metadata__"``
object of string to string; writers may pad it with trailing spaces), then the
data buffer. ``data_offsets`` are ``[begin, end)`` byte offsets into the
buffer.

`read_safetensors_header` refuses anything the format does not allow
(spec promise CKPT-6): a header length beyond `MAX_HEADER_BYTES` or
beyond the file, a header that is not a JSON object, an unknown dtype, a byte
range that does not equal ``prod(shape) * itemsize``, ranges that overlap,
leave gaps, or do not cover the buffer exactly. It never executes code and
never unpickles anything. It accepts every file written by the reference
``safetensors`` library (sorted or unsorted keys, alignment padding).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gradaccum.checkpoint._json import loads_strict
from gradaccum.errors import CheckpointCorruptError, UsageError

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "RawTensor",
    "SafetensorsHeader",
    "TensorInfo",
    "decode_safetensors",
    "encode_safetensors",
    "read_safetensors_header",
]

#: Bytes per element of every dtype format version 1 allows.
DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 1,
        "U8": 1,
        "I8": 1,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
        "I16": 2,
        "U16": 2,
        "F16": 2,
        "BF16": 2,
        "I32": 4,
        "U32": 4,
        "F32": 4,
        "F64": 8,
        "I64": 8,
        "U64": 8,
    }
)

#: The largest header a reader accepts, in bytes (100 MB, as the reference library).
MAX_HEADER_BYTES = 100_000_000

_METADATA_KEY = "__metadata__"
_ALIGNMENT = 8
_FIX = "the file is corrupt or is not a safetensors file — restore it from a copy or write it again"


@dataclass(frozen=True)
class RawTensor:
    """One tensor as bytes: ``dtype`` (a safetensors dtype name such as
    ``"F32"``), ``shape`` and ``data`` (C-contiguous, little-endian,
    ``prod(shape) * itemsize`` bytes). Construction checks all three and
    raises `UsageError` on a mismatch."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise UsageError(
                f"tensor dtype {self.dtype!r} is not a safetensors dtype of format version 1; "
                f"use one of {', '.join(DTYPE_SIZES)}"
            )
        shape = tuple(self.shape)
        if any(type(d) is not int or d < 0 for d in shape):
            raise UsageError(f"tensor shape {self.shape!r} must be a tuple of integers >= 0")
        object.__setattr__(self, "shape", shape)
        data: object = self.data
        if not isinstance(data, bytes):
            if not isinstance(data, (bytearray, memoryview)):
                raise UsageError(f"tensor data must be bytes, got {type(data).__name__}")
            object.__setattr__(self, "data", bytes(data))
        expected = math.prod(shape) * DTYPE_SIZES[self.dtype]
        if len(self.data) != expected:
            raise UsageError(
                f"tensor of dtype {self.dtype} and shape {list(shape)} needs {expected} bytes "
                f"of data, got {len(self.data)}; pass exactly prod(shape) * itemsize bytes"
            )

    @property
    def nbytes(self) -> int:
        """Size of `data` in bytes."""
        return len(self.data)


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header: ``begin`` and ``end`` are byte
    offsets into the data buffer (which starts at
    `SafetensorsHeader.data_start` in the file)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of data, ``end - begin``."""
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    ``tensors`` is ordered by position in the buffer; ``data_start`` is
    ``8 + header_size``; ``file_size`` is ``data_start`` plus the buffer size
    (the exact size the file must have).
    """

    header_size: int
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]

    @property
    def data_start(self) -> int:
        """File offset of the data buffer."""
        return 8 + self.header_size

    @property
    def buffer_size(self) -> int:
        """Size of the data buffer in bytes (the end of the last tensor)."""
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def file_size(self) -> int:
        """The exact size of a file holding this header and its buffer."""
        return self.data_start + self.buffer_size

    def tensor_bytes(self, data: bytes | memoryview, name: str) -> bytes:
        """The data bytes of tensor ``name`` from the whole file's ``data``."""
        info = self.tensors[name]
        return bytes(data[self.data_start + info.begin : self.data_start + info.end])


def _corrupt(source: str, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{source}: {problem}; {_FIX}")


def _parse_header(raw: bytes, source: str) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise _corrupt(source, f"header does not start with '{{' (starts with {raw[:16]!r})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(source, f"header is not valid UTF-8 ({exc})") from exc
    try:
        obj = loads_strict(text)
    except ValueError as exc:
        raise _corrupt(source, f"header is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise _corrupt(source, f"header is JSON {type(obj).__name__}, not an object")
    return obj


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


def _validate_header(
    obj: dict[str, Any], header_size: int, available: int | None, source: str
) -> SafetensorsHeader:
    metadata: dict[str, str] = {}
    if _METADATA_KEY in obj:
        raw_meta = obj.pop(_METADATA_KEY)
        if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
            raise _corrupt(
                source, f"'__metadata__' must map strings to strings, got {raw_meta!r:.200}"
            )
        metadata = dict(raw_meta)

    entries: list[tuple[str, TensorInfo]] = []
    for name, entry in obj.items():
        if not name:
            raise _corrupt(source, "a tensor has an empty name")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _corrupt(
                source,
                f"tensor {name!r} entry {entry!r:.200} must be an object with exactly the keys "
                "'dtype', 'shape', 'data_offsets'",
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _corrupt(
                source,
                f"tensor {name!r} has dtype {dtype!r}; format version 1 allows "
                f"{', '.join(DTYPE_SIZES)}",
            )
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise _corrupt(
                source, f"tensor {name!r} has shape {shape!r:.200}; expected a list of ints >= 0"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_uint(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _corrupt(
                source,
                f"tensor {name!r} has data_offsets {offsets!r:.200}; expected [begin, end] "
                "with 0 <= begin <= end",
            )
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise _corrupt(
                source,
                f"tensor {name!r} ({dtype}, shape {shape}) spans {end - begin} bytes "
                f"[{begin}, {end}) but needs {expected}",
            )
        entries.append((name, TensorInfo(dtype, tuple(shape), begin, end)))

    entries.sort(key=lambda item: (item[1].begin, item[1].end))
    cursor = 0
    for name, info in entries:
        if info.begin != cursor:
            what = "overlaps the previous tensor" if info.begin < cursor else "leaves a gap"
            raise _corrupt(
                source,
                f"tensor {name!r} starts at buffer offset {info.begin} but the previous tensor "
                f"ends at {cursor}: it {what}",
            )
        cursor = info.end
    if available is not None and cursor != available:
        if cursor > available:
            raise _corrupt(
                source,
                f"the tensors need a data buffer of {cursor} bytes but the file holds only "
                f"{available} after the header (truncated?)",
            )
        raise _corrupt(
            source,
            f"the data buffer holds {available} bytes but the tensors cover only {cursor}: "
            f"{available - cursor} trailing bytes are not part of any tensor",
        )
    return SafetensorsHeader(
        header_size=header_size,
        tensors=MappingProxyType(dict(entries)),
        metadata=MappingProxyType(metadata),
    )


def _check_length(header_size: int, file_size: int, source: str) -> None:
    if header_size > MAX_HEADER_BYTES:
        raise _corrupt(
            source,
            f"header length field says {header_size} bytes, more than the "
            f"{MAX_HEADER_BYTES}-byte limit",
        )
    if header_size > file_size - 8:
        raise _corrupt(
            source,
            f"header length field says {header_size} bytes but only {file_size - 8} bytes "
            f"follow it (file size {file_size})",
        )


def read_safetensors_header(
    source: bytes | bytearray | memoryview | str | os.PathLike[str], *, name: str | None = None
) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    ``source`` is the whole file's bytes, or a path (then only the header is
    read, and the data buffer is checked against the file's size). ``name``
    labels the file in error messages. Raises
    `CheckpointCorruptError` naming the problem and
    the value seen for anything the format does not allow.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = memoryview(source)
        label = name or "safetensors data"
        if len(data) < 8:
            raise _corrupt(label, f"{len(data)} bytes, shorter than the 8-byte header length")
        (header_size,) = struct.unpack("<Q", data[:8])
        _check_length(header_size, len(data), label)
        obj = _parse_header(bytes(data[8 : 8 + header_size]), label)
        return _validate_header(obj, header_size, len(data) - 8 - header_size, label)

    label = name or f"safetensors file '{os.fspath(source)}'"
    try:
        fd = os.open(source, os.O_RDONLY | _NONBLOCK | _CLOEXEC | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise _corrupt(label, f"cannot open it ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _corrupt(label, f"it is {file_kind(info.st_mode)}, not a regular file")
        return read_header_fd(fd, info.st_size, label)
    finally:
        os.close(fd)


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def file_kind(mode: int) -> str:
    """``"a directory"``, ``"a FIFO"``, ... for an ``st_mode`` (for messages)."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Exactly ``size`` bytes of ``fd`` from ``offset`` (fewer only at end of
    file), in one ``bytes`` object allocated once; never reads beyond
    ``offset + size``."""
    if size <= _SMALL_READ:
        data = os.pread(fd, size, offset)
        if len(data) == size or not data:
            return data
    os.lseek(fd, offset, os.SEEK_SET)
    with open(fd, "rb", closefd=False) as fh:  # BufferedReader.read(n) loops until n or EOF
        return fh.read(size)


_SMALL_READ = 8 * 1024 * 1024


def read_header_fd(fd: int, size: int, label: str) -> SafetensorsHeader:
    """Read and validate the header of the regular file open at ``fd`` whose
    size is ``size``, reading only the 8-byte length and the header itself."""
    if size < 8:
        raise _corrupt(label, f"{size} bytes, shorter than the 8-byte header length")
    prefix = pread_exact(fd, 8, 0)
    if len(prefix) < 8:
        raise _corrupt(label, f"{len(prefix)} bytes, shorter than the 8-byte header length")
    (header_size,) = struct.unpack("<Q", prefix)
    _check_length(header_size, size, label)
    raw = pread_exact(fd, header_size, 8)
    if len(raw) < header_size:
        raise _corrupt(label, f"the file ended after {8 + len(raw)} of {size} bytes (truncated)")
    obj = _parse_header(raw, label)
    return _validate_header(obj, header_size, size - 8 - header_size, label)


def parse_header_prefix(
    head: bytes | bytearray | memoryview, file_size: int, label: str
) -> SafetensorsHeader:
    """The validated header of a safetensors file of ``file_size`` bytes, from
    its leading bytes ``head`` (the 8-byte length and at least the header);
    raises `CheckpointCorruptError` as `read_header_fd` does."""
    data = memoryview(head)
    if len(data) < 8:
        raise _corrupt(label, f"{len(data)} bytes, shorter than the 8-byte header length")
    (header_size,) = struct.unpack("<Q", data[:8])
    _check_length(header_size, file_size, label)
    if len(data) < 8 + header_size:
        raise _corrupt(label, f"the file ended after {len(data)} of {file_size} bytes (truncated)")
    obj = _parse_header(bytes(data[8 : 8 + header_size]), label)
    return _validate_header(obj, header_size, file_size - 8 - header_size, label)


def encode_safetensors(
    tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise ``tensors`` (and optional string ``metadata``) to safetensors bytes.

    The output is deterministic and readable by the reference library: tensors
    are laid out by descending itemsize then name (so every tensor is aligned
    to its itemsize), and the header is padded with spaces to a multiple of 8
    bytes. Raises `UsageError` for an empty or
    reserved name, a value that is not a `RawTensor`, or metadata that
    is not string to string.
    """
    for tname, tensor in tensors.items():
        if not isinstance(tname, str) or not tname or tname == _METADATA_KEY:
            raise UsageError(
                f"tensor name {tname!r} must be a non-empty string other than {_METADATA_KEY!r}"
            )
        if not isinstance(tensor, RawTensor):
            raise UsageError(f"tensor {tname!r} is a {type(tensor).__name__}; pass a RawTensor")
    header, order = encode_header(
        {tname: (t.dtype, t.shape) for tname, t in tensors.items()}, metadata
    )
    return b"".join([header, *(tensors[n].data for n in order)])


def encode_header(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """The first bytes of a safetensors file holding ``tensors`` (name ->
    (dtype, shape)): the 8-byte length and the padded JSON header, and the
    order in which the tensors' data must follow — exactly what
    `encode_safetensors` writes (descending itemsize, then name). The caller
    has validated names, dtypes and shapes."""
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise UsageError(
                f"safetensors metadata must map str to str, got {dict(metadata)!r:.200}"
            )
        header[_METADATA_KEY] = dict(metadata)
    order = sorted(tensors, key=lambda n: (-DTYPE_SIZES[tensors[n][0]], n))
    offset = 0
    for tname in order:
        dtype, shape = tensors[tname]
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[tname] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % _ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw, order


def decode_safetensors(
    data: bytes | bytearray | memoryview, *, name: str | None = None
) -> dict[str, RawTensor]:
    """Validate ``data`` (a whole safetensors file) and return its tensors,
    ordered by position in the buffer. Raises
    `CheckpointCorruptError` like
    `read_safetensors_header`."""
    header = read_safetensors_header(data, name=name)
    view = memoryview(data)
    return {
        tname: RawTensor(info.dtype, info.shape, header.tensor_bytes(view, tname))
        for tname, info in header.tensors.items()
    }
