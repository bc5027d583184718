"""Writing, reading and validating checkpoint directories.

`write_checkpoint` validates everything before it touches the disk
(CKPT-14) and replaces the directory atomically (CKPT-12); it takes each
tensor file as bytes or as `TensorSource` objects streamed to disk one
tensor at a time. `stage_checkpoint`, `write_shard` and
`commit_checkpoint` do the same for a directory every rank sees, each rank
writing its own files. `read_checkpoint` verifies every byte against the
manifest before it returns anything (CKPT-7, CKPT-8) and never unpickles
(CKPT-15); `open_checkpoint` verifies the same without holding any file's
bytes, which are then read or memory-mapped one file at a time. Readers
open only regular files inside the directory, without following links, and
never read more bytes than the manifest declares (CKPT-20).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import stat
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gradaccum.checkpoint import atomic
from gradaccum.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MANIFEST_SHA256_NAME,
    MAX_MANIFEST_BYTES,
    ROLE_PATTERN,
    SPEC_VERSIONS,
    SUPPORTED_FORMAT_VERSIONS,
    TENSOR_DIGESTS,
    FileEntry,
    Manifest,
    Producer,
    TensorEntry,
    check_manifest_sidecar,
    is_role,
    manifest_sidecar,
    parse_manifest_bytes,
    requires_sidecar,
    to_json_value,
    validate_manifest_dict,
)
from gradaccum.checkpoint.safetensors_io import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    RawTensor,
    SafetensorsHeader,
    decode_safetensors,
    encode_header,
    file_kind,
    parse_header_prefix,
    pread_exact,
    read_header_fd,
    read_safetensors_header,
)
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    UsageError,
)

__all__ = [
    "Checkpoint",
    "TensorFile",
    "TensorSource",
    "abort_checkpoint",
    "check_format_version",
    "commit_checkpoint",
    "open_checkpoint",
    "read_checkpoint",
    "stage_checkpoint",
    "validate_checkpoint",
    "write_checkpoint",
    "write_shard",
]

_SUFFIX = ".safetensors"
_RESTORE = "the file is corrupt — restore it from a copy or take a new checkpoint"
_READ_ATTEMPTS = 3
_CHUNK = 8 * 1024 * 1024
_MAX_SIDECAR_BYTES = 4096
_DIGEST_ON_ERROR_LIMIT = 256 * 1024 * 1024
_PARALLEL_HASH_BYTES = 16 * 1024 * 1024  # files at least this large hash on helper threads
_PIPELINE_BYTES = 1024 * 1024  # chunks at least this large hash while the next is read
# A streamed write hashes on helper threads while the tensors are written: at
# most this many tensors may be written ahead of their digests, and no more
# than _LOOKAHEAD_BYTES of them beyond one (a callable TensorSource's host
# copy stays alive until its digest is done).
_LOOKAHEAD = 2
_LOOKAHEAD_BYTES = 256 * 1024 * 1024
_TOKEN = re.compile(r"[0-9a-f]{8,64}")
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)

BytesLike = bytes | bytearray | memoryview


def _short(digest: str) -> str:
    return digest[:16] + "…"


class _Side:
    """Feeds one hash object on a helper thread, so that a file's SHA-256 and
    its tensors' are computed at once on two cores (hashlib releases the GIL
    for large updates). Without ``parallel`` it hashes inline. The data given
    to `update` must stay unchanged until `wait` returns."""

    def __init__(self, hasher: Any, parallel: bool) -> None:
        self.hasher = hasher
        self._pool = ThreadPoolExecutor(1) if parallel and (os.cpu_count() or 1) > 1 else None
        self._pending: Future[None] | None = None

    def update(self, data: BytesLike) -> None:
        self.wait()
        if self._pool is None:
            self.hasher.update(data)
        else:
            self._pending = self._pool.submit(self.hasher.update, data)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


# --------------------------------------------------------------------------- tensor sources


@dataclass(frozen=True)
class TensorSource:
    """One tensor to be written, without its bytes in a safetensors file yet.

    ``dtype`` is a safetensors dtype name (``"F32"``, ``"BF16"``, ...),
    ``shape`` its shape, ``data`` its C-contiguous little-endian bytes — any
    buffer (``bytes``, ``memoryview``, a NumPy array) — or a zero-argument
    callable returning them, called once, when the writer reaches this
    tensor. The buffer must not change until the write returns: it is hashed
    on a helper thread while it is written and while the next tensors are
    produced — at most two tensors ahead and, beyond the first, 256 MiB — so
    a writer holds at most three host copies, never a whole file (a callable
    must return a fresh buffer each time, not reuse one). Construction checks
    ``dtype`` and ``shape`` (`UsageError`); the length of ``data`` is checked
    when it is written (``prod(shape) * itemsize`` bytes, else `UsageError`).
    """

    dtype: str
    shape: tuple[int, ...]
    data: BytesLike | Callable[[], BytesLike]

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_SIZES:
            raise UsageError(
                f"tensor dtype {self.dtype!r} is not a safetensors dtype of format version 1; "
                f"use one of {', '.join(DTYPE_SIZES)}"
            )
        try:
            shape = tuple(self.shape)
        except TypeError:
            shape = (-1,)
        if any(type(d) is not int or d < 0 or d > 2**63 for d in shape):
            raise UsageError(f"tensor shape {self.shape!r:.100} must be a tuple of integers >= 0")
        object.__setattr__(self, "shape", shape)

    @property
    def nbytes(self) -> int:
        """The number of data bytes, ``prod(shape) * itemsize``."""
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


FileSource = BytesLike | Mapping[str, TensorSource]


@dataclass
class _Planned:
    """A tensor file to write: its manifest entry (digests filled in once
    written, for streamed files) and its bytes as chunks."""

    role: str
    size: int
    tensors: dict[str, TensorEntry]
    sha256: str | None  # format version 1: the whole file's digest
    chunks: Any  # bytes, or an iterator of buffers that fills in the digests
    header_sha256: str | None = None  # format versions 2 and 3: the header's digest
    tensor_digest: str = "sha256"  # the tensors' digest algorithm ("crc32": format 3)

    def entry(self) -> FileEntry:
        return FileEntry(
            self.role + _SUFFIX,
            self.size,
            self.sha256,
            MappingProxyType(dict(self.tensors)),
            header_sha256=self.header_sha256,
            tensor_digest=self.tensor_digest,
        )


_PENDING = "0" * 64  # placeholder digest of a streamed file before it is written


def _hex(data: BytesLike) -> str:
    return hashlib.sha256(data).hexdigest()


def _crc_hex(data: BytesLike) -> str:
    return f"{zlib.crc32(data):08x}"


class _Crc32:
    """A running CRC-32 (zlib's: CRC-32/ISO-HDLC, as in ZIP, gzip and PNG)
    with hashlib's ``update`` / ``hexdigest``; zlib releases the GIL for
    updates over 5 KiB."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: BytesLike) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


#: The tensor digest of each algorithm a file entry's ``tensor_digest`` names,
#: as a function of the bytes and as a running hash object (CKPT-7, CKPT-26).
_TENSOR_HEX: dict[str, Callable[[BytesLike], str]] = {"sha256": _hex, "crc32": _crc_hex}
_TENSOR_HASHER: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "crc32": _Crc32}
_TENSOR_LABEL = {"sha256": "SHA-256", "crc32": "CRC-32"}


def check_format_version(version: Any, where: str) -> int:
    """``version`` when it is a format version this release writes (1, 2 or
    3; an ``int``, not a ``bool``), else `UsageError` naming it, prefixed by
    ``where``, and the choices."""
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise UsageError(
            f"{where}: format_version={version!r:.40} is not one this release writes; pass "
            f"{', '.join(str(v) for v in sorted(SUPPORTED_FORMAT_VERSIONS))} (the default, "
            f"{FORMAT_VERSION}, checks tensor data with CRC-32; 2 with SHA-256; 1 is for "
            "readers older than format 2)"
        )
    return version


def _plan_file(role: Any, data: Any, where: str, version: int) -> _Planned:
    if not is_role(role):
        raise UsageError(
            f"{where}: role {role!r} does not match {ROLE_PATTERN}; use lowercase names "
            "such as 'gradients', 'gradients.rank1', 'model' or 'optimizer'"
        )
    if isinstance(data, (bytes, bytearray, memoryview)):
        blob = bytes(data)
        try:
            header = read_safetensors_header(blob, name=f"files[{role!r}]")
        except CheckpointCorruptError as exc:
            raise UsageError(f"{where}: {exc}; nothing was written") from exc
        view = memoryview(blob)
        start = header.data_start
        algorithm = TENSOR_DIGESTS[version]
        digests = _tensor_digests(view, header, algorithm=algorithm)
        tensors = {
            name: TensorEntry(info.dtype, info.shape, digests[name])
            for name, info in sorted(header.tensors.items())
        }
        if version == 1:
            return _Planned(role, len(blob), tensors, _hex(blob), blob)
        return _Planned(role, len(blob), tensors, None, blob, _hex(view[:start]), algorithm)
    if isinstance(data, Mapping):
        sources: dict[str, TensorSource] = {}
        for name, source in data.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise UsageError(
                    f"{where}: files[{role!r}] has the tensor name {name!r:.80}; names must be "
                    "non-empty strings other than '__metadata__'"
                )
            if not isinstance(source, TensorSource):
                raise UsageError(
                    f"{where}: files[{role!r}][{name!r}] is a {type(source).__name__}; pass a "
                    "gradaccum.checkpoint.TensorSource(dtype, shape, data)"
                )
            sources[name] = source
        header_bytes, order = encode_header({n: (t.dtype, t.shape) for n, t in sources.items()})
        size = len(header_bytes) + sum(t.nbytes for t in sources.values())
        pending = _PENDING[: 8 if TENSOR_DIGESTS[version] == "crc32" else 64]
        planned = _Planned(
            role,
            size,
            {n: TensorEntry(t.dtype, t.shape, pending) for n, t in sorted(sources.items())},
            _PENDING if version == 1 else None,
            None,
            None if version == 1 else _hex(header_bytes),
            TENSOR_DIGESTS[version],
        )
        planned.chunks = _stream(planned, header_bytes, order, sources, where)
        return planned
    raise UsageError(
        f"{where}: files[{role!r}] is a {type(data).__name__}; pass the bytes of a safetensors "
        "file or a mapping of tensor names to TensorSource"
    )


def _stream(
    planned: _Planned,
    header: bytes,
    order: list[str],
    sources: Mapping[str, TensorSource],
    where: str,
) -> Iterator[BytesLike]:
    """Yield the file's bytes tensor by tensor while helper threads hash them;
    once exhausted, ``planned`` holds the real digests.

    Each tensor's digest (SHA-256, or CRC-32 in format version 3; and, for
    format version 1, the running digest of the whole file, fed in order on
    one thread of its own) is computed on helper threads while the caller
    writes the same, unchanged, buffer (hashlib, zlib and ``os.write`` all
    release the GIL), with at most `_LOOKAHEAD` tensors written ahead of
    their digests."""
    tensor_hex = _TENSOR_HEX[planned.tensor_digest]
    parallel = planned.size >= _PARALLEL_HASH_BYTES and (os.cpu_count() or 1) > 1
    file_hash = hashlib.sha256(header) if planned.sha256 is not None else None
    tensor_pool = ThreadPoolExecutor(2) if parallel else None
    file_pool = ThreadPoolExecutor(1) if parallel and file_hash is not None else None
    pending: deque[tuple[str, TensorSource, int, Future[str] | str, Future[None] | None]]
    pending = deque()
    in_flight = 0

    def settle(keep: int) -> None:
        nonlocal in_flight
        while len(pending) > keep or (len(pending) > 1 and in_flight > _LOOKAHEAD_BYTES):
            name, source, nbytes, digest, fed = pending.popleft()
            if fed is not None:
                fed.result()
            value = digest if isinstance(digest, str) else digest.result()
            planned.tensors[name] = TensorEntry(source.dtype, source.shape, value)
            in_flight -= nbytes

    try:
        yield header
        for name in order:
            source = sources[name]
            view = _source_view(planned, name, source, where)
            fed: Future[None] | None = None
            if file_hash is not None:
                if file_pool is not None:
                    fed = file_pool.submit(file_hash.update, view)
                else:
                    file_hash.update(view)
            digest: Future[str] | str = (
                tensor_pool.submit(tensor_hex, view)
                if tensor_pool is not None
                else tensor_hex(view)
            )
            pending.append((name, source, view.nbytes, digest, fed))
            in_flight += view.nbytes
            yield view
            del view
            settle(_LOOKAHEAD)
        settle(0)
        if file_hash is not None:
            planned.sha256 = file_hash.hexdigest()
    finally:
        for pool in (tensor_pool, file_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _source_view(planned: _Planned, name: str, source: TensorSource, where: str) -> memoryview:
    data = source.data() if callable(source.data) else source.data
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise UsageError(
            f"{where}: the data of tensor {name!r} in files[{planned.role!r}] is a "
            f"{type(data).__name__} that is not a C-contiguous buffer ({exc}); pass bytes, "
            "a memoryview or a contiguous array"
        ) from None
    if view.nbytes != source.nbytes:
        raise UsageError(
            f"{where}: tensor {name!r} in files[{planned.role!r}] ({source.dtype}, shape "
            f"{list(source.shape)}) needs {source.nbytes} bytes of data, got {view.nbytes}; "
            "nothing was installed"
        )
    return view


# --------------------------------------------------------------------------- checkpoints


class TensorFile:
    """One verified tensor file, memory-mapped read-only (`Checkpoint.open_file`).

    ``buffer`` is the whole file, ``tensor_view(name)`` one tensor's data
    bytes; both are read-only views of the mapping (no copy). Use it as a
    context manager or call `close`; release your own views (or copy them)
    first.
    """

    def __init__(self, role: str, header: SafetensorsHeader, mapping: mmap.mmap) -> None:
        self.role = role
        self.header = header
        self._mmap: mmap.mmap | None = mapping
        self._view: memoryview | None = memoryview(mapping)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def buffer(self) -> memoryview:
        """The whole file, read-only."""
        if self._view is None:
            raise UsageError(f"tensor file {self.role!r} is closed; open it again")
        return self._view

    def tensor_view(self, name: str) -> memoryview:
        """The data bytes of tensor ``name`` (read-only, no copy); raises
        `CheckpointMismatchError` for a name the file does not hold."""
        info = self.header.tensors.get(name)
        if info is None:
            raise CheckpointMismatchError(
                f"tensor file {self.role!r} has no tensor {name!r}; it holds "
                f"{sorted(self.header.tensors)[:10]!r}"
            )
        start = self.header.data_start
        return self.buffer[start + info.begin : start + info.end]

    def close(self) -> None:
        """Release the mapping (it stays alive while views of it exist)."""
        view, mapping = self._view, self._mmap
        self._view = self._mmap = None
        if view is not None:
            try:
                view.release()
            except BufferError:  # the caller still holds slices: the GC unmaps later
                return
        if mapping is not None:
            with contextlib.suppress(BufferError):  # slices still exported: the GC unmaps
                mapping.close()


def _close_fds(fds: dict[str, int], spans: _Spans | None = None) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    if spans is not None:
        spans.close()


class Checkpoint:
    """A checkpoint read from disk whose every file has been verified.

    ``path`` is the path that was asked for; ``source`` is the directory the
    bytes came from (the same, unless a writer died mid-replacement and the
    previous checkpoint was recovered from its set-aside copy, CKPT-13).
    `read_checkpoint` returns one holding every file's bytes;
    `open_checkpoint` one holding an open descriptor per file and no bytes
    (close it, or use it as a context manager). ``manifest_protected`` says
    whether the manifest had a matching ``manifest.sha256`` (CKPT-21).
    """

    def __init__(
        self,
        path: Path,
        source: Path,
        manifest: Manifest,
        data: Mapping[str, bytes] | None = None,
        *,
        headers: Mapping[str, SafetensorsHeader] | None = None,
        fds: dict[str, int] | None = None,
        verified: bool = True,
        manifest_protected: bool = True,
    ) -> None:
        self.path = path
        self.source = source
        self.manifest = manifest
        self.manifest_protected = manifest_protected
        self._data = dict(data or {})
        self._headers = dict(headers or {})
        self._fds: dict[str, int] = fds if fds is not None else {}
        self._verified = verified
        self._lazy = fds is not None
        # roles whose header is known to be the recorded one (verify_header)
        self._checked: set[str] = set(manifest.files) if verified else set()
        self._spans = _Spans(f"checkpoint at '{path}'")
        self._finalizer = weakref.finalize(self, _close_fds, self._fds, self._spans)

    def __repr__(self) -> str:
        return f"Checkpoint(path={str(self.path)!r}, roles={list(self.roles)!r})"

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file descriptors of an opened checkpoint (a no-op for a
        `read_checkpoint` one, and when already closed)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True once an opened checkpoint is closed."""
        return self._lazy and not self._fds

    @property
    def label(self) -> str:
        return f"checkpoint at '{self.path}'"

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles of the tensor files, sorted."""
        return self.manifest.roles

    @property
    def state(self) -> Mapping[str, Any]:
        """The accumulation state (read-only JSON)."""
        return self.manifest.state

    @property
    def config(self) -> Mapping[str, Any]:
        """The accumulation config (read-only JSON, as written)."""
        return self.manifest.config

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Per-role JSON metadata (read-only)."""
        return self.manifest.metadata

    @property
    def producer(self) -> Producer:
        """The software that wrote the checkpoint."""
        return self.manifest.producer

    @property
    def world_size(self) -> int:
        """The number of data-parallel ranks of the run that wrote it."""
        return self.manifest.world_size

    def _entry(self, role: str) -> FileEntry:
        entry = self.manifest.files.get(role)
        if entry is None:
            raise CheckpointMismatchError(
                f"checkpoint at '{self.path}' has no {role!r} file; it holds "
                f"{', '.join(repr(r) for r in self.roles) or 'no tensor files'} — "
                "load only roles the checkpoint has, or take a checkpoint that includes it"
            )
        return entry

    def _fd(self, role: str) -> int:
        if not self._fds:
            raise UsageError(
                f"checkpoint at '{self.path}' is closed; open it again with open_checkpoint"
            )
        return self._fds[role]

    def file_identity(self, role: str) -> tuple[int, int, int, int] | None:
        """``(st_dev, st_ino, st_size, st_mtime_ns)`` of the open file of
        ``role`` (an `open_checkpoint` checkpoint), or ``None`` for a
        checkpoint read into memory. Processes on one machine (one kernel)
        whose identities are equal read the same file."""
        self._entry(role)
        if not self._lazy:
            return None
        st = os.fstat(self._fd(role))
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def header(self, role: str) -> SafetensorsHeader:
        """The validated safetensors header of ``<role>.safetensors`` (no I/O)."""
        entry = self._entry(role)
        header = self._headers.get(role)
        if header is None:
            header = read_safetensors_header(self._data[role], name=entry.path)
            self._headers[role] = header
        return header

    def read_file(self, role: str) -> bytes:
        """The bytes of ``<role>.safetensors``, verified against the manifest
        (size, header, the file's SHA-256 — format 1 — or header's — formats 2
        and 3 — and every tensor's digest: SHA-256, or CRC-32 in format 3;
        CKPT-7, CKPT-25, CKPT-26). An opened
        checkpoint reads exactly the declared size from the file and holds
        nothing afterwards; raises `CheckpointMismatchError` for a role the
        checkpoint does not hold, `CheckpointChecksumError` when the bytes
        changed since the checkpoint was opened."""
        entry = self._entry(role)
        if not self._lazy:
            return self._data[role]
        blob = pread_exact(self._fd(role), entry.size, 0)
        _verify_blob(blob, entry, self.label)
        return blob

    def file_bytes(self, role: str) -> bytes:
        """The verified bytes of ``<role>.safetensors`` (= `read_file`). Raises
        `CheckpointMismatchError` for a role the checkpoint does not hold."""
        return self.read_file(role)

    def open_file(
        self, role: str, *, verify: bool = True, only: Collection[str] | None = None
    ) -> TensorFile:
        """``<role>.safetensors`` memory-mapped read-only, as a `TensorFile`.

        With ``verify`` (the default) the mapped bytes are hashed against the
        manifest first (the file's or header's SHA-256 and every tensor's
        digest, CKPT-7, CKPT-25, CKPT-26; a format-2 or -3 file's tensors on
        two threads) — pass ``False``
        only when `open_checkpoint` already verified them and the file cannot
        have changed since. The header is always re-read from the mapping
        and checked against the manifest's index.

        ``only`` (with ``verify``) hashes, of a format-2 or -3 file, the header and
        just the named tensors — for callers that share one file's
        verification among processes reading the same file and agree on the
        verdict (the DDP loader); a name the file does not hold raises
        `UsageError`. A format-1 file is always verified whole (its one
        digest covers every byte)."""
        entry = self._entry(role)
        _check_only(only, entry, f"open_file({role!r}, only=...)")
        label = self.label
        if not self._lazy:
            data = self._data[role]
            mapping = mmap.mmap(-1, len(data))
            mapping.write(data)
        else:
            try:
                mapping = mmap.mmap(self._fd(role), entry.size, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise CheckpointError(
                    f"{label}: cannot map file {entry.path!r} ({exc}); check the file system"
                ) from exc
        view = memoryview(mapping)
        try:
            if len(view) != entry.size:
                raise CheckpointCorruptError(
                    f"{label}: file {entry.path!r} maps to {len(view)} bytes but the manifest "
                    f"records {entry.size}; {_RESTORE}"
                )
            header = read_safetensors_header(view, name=f"{label}: file {entry.path!r}")
            _check_index(header, entry, label)
            if verify:
                _verify_digests(view, header, entry, label, only=only)
        except BaseException:
            view.release()
            with contextlib.suppress(BufferError):  # a traceback may still hold a slice
                mapping.close()
            raise
        view.release()
        return TensorFile(role, header, mapping)

    def verify_header(self, role: str) -> SafetensorsHeader:
        """Check ``role``'s header against the manifest and return it.

        Formats 2 and 3 read just the header's bytes, compare their SHA-256
        with the manifest (CKPT-25) and parse the header from the very bytes
        hashed; format 1, whose one digest covers the whole file, streams every
        byte through it and through its tensors' digests (CKPT-7). Done once
        per file (a checkpoint opened with ``verify`` has done it). After it,
        `read_into` with ``verify`` checks each tensor it reads, so reading
        every tensor that way verifies the file. Raises
        `CheckpointChecksumError` or `CheckpointCorruptError`."""
        entry = self._entry(role)
        if role in self._checked:
            return self.header(role)
        if entry.header_sha256 is None:
            self.verify_file(role)
            return self.header(role)
        label = self.label
        start = self.header(role).data_start
        if self._lazy:
            try:
                head = pread_exact(self._fd(role), start, 0)
            except OSError as exc:
                raise CheckpointError(
                    f"{label}: cannot read file {entry.path!r} ({exc.strerror or exc}); check "
                    "the file system"
                ) from exc
        else:
            head = self._data[role][:start]
        digest = _hex(head)
        if digest != entry.header_sha256:
            raise _file_mismatch(label, entry, digest)
        header = parse_header_prefix(head, entry.size, f"{label}: file {entry.path!r}")
        _check_index(header, entry, label)
        self._headers[role] = header
        self._checked.add(role)
        return header

    def verify_file(self, role: str, *, only: Collection[str] | None = None) -> None:
        """Verify ``role``'s file against the manifest without keeping its
        bytes: the header (`verify_header`) and every tensor's digest, reading
        with ``pread`` through two 8 MiB buffers while a helper thread hashes
        (CKPT-7, CKPT-25, CKPT-26). ``only`` limits a format-2 or -3 file's
        tensors to those named, as in `open_file` (the others are not read); a
        format-1 file is always verified whole. Raises what `verify_header`
        raises, `CheckpointChecksumError` naming the first tensor that differs,
        `UsageError` for names the file does not hold."""
        entry = self._entry(role)
        _check_only(only, entry, f"verify_file({role!r}, only=...)")
        label = self.label
        source: int | bytes = self._fd(role) if self._lazy else self._data[role]
        if entry.header_sha256 is None:
            if role in self._checked:  # format 1: verify_header checked every byte already
                return
            if isinstance(source, int):
                try:
                    _verify_fd(source, self.header(role), entry, label)
                except OSError as exc:
                    raise CheckpointError(
                        f"{label}: cannot read file {entry.path!r} ({exc.strerror or exc}); "
                        "check the file system"
                    ) from exc
            else:
                _verify_blob(source, entry, label)
            self._checked.add(role)
            return
        header = self.verify_header(role)
        new_hasher = _TENSOR_HASHER[entry.tensor_digest]
        for name, info in header.tensors.items():
            if only is not None and name not in only:
                continue
            hasher = new_hasher()
            self._spans.read(
                source, entry.path, header.data_start + info.begin, None, info.nbytes, hasher
            )
            digest = hasher.hexdigest()
            if digest != entry.tensors[name].digest:
                raise _tensor_mismatch(label, entry, name, digest)

    def read_into(self, role: str, name: str, out: Any, *, verify: bool = True) -> None:
        """Read tensor ``name`` of ``role`` into ``out``: any writable,
        C-contiguous buffer of exactly its byte size (a ``bytearray``, a NumPy
        array, a CPU tensor's bytes), with ``pread`` — no mapping and no
        intermediate copy, so a loader fills the tensors it will keep directly.

        With ``verify`` (the default) the header is checked first
        (`verify_header`, once per file) and the tensor's digest (CRC-32 or
        SHA-256, by format) is computed while its bytes arrive, on a helper
        thread, and compared with the manifest (CKPT-7, CKPT-26). On a mismatch
        `CheckpointChecksumError` is raised and ``out`` holds the unverified
        bytes: read into memory nothing else uses yet. Raises
        `CheckpointMismatchError` for a name the file does not hold and
        `UsageError` for an ``out`` that is not a writable, contiguous buffer
        of the tensor's size."""
        entry = self._entry(role)
        if not isinstance(verify, bool):
            raise UsageError(f"verify={verify!r} must be True or False")
        header = self.verify_header(role) if verify else self.header(role)
        info = header.tensors.get(name)
        if info is None:
            raise CheckpointMismatchError(
                f"{self.label}: file {entry.path!r} has no tensor {name!r}; it holds "
                f"{sorted(header.tensors)[:10]!r}"
            )
        try:
            view = memoryview(out)
        except (TypeError, ValueError):
            raise UsageError(
                f"read_into({role!r}, {name!r}, out): out is a {type(out).__name__}, not a "
                "buffer; pass a bytearray, a NumPy array or a tensor's bytes"
            ) from None
        with view:
            if view.readonly or not view.c_contiguous or view.nbytes != info.nbytes:
                raise UsageError(
                    f"read_into({role!r}, {name!r}, out): out must be a writable, contiguous "
                    f"buffer of {info.nbytes} bytes; it is "
                    f"{'read-only, ' if view.readonly else ''}"
                    f"{'' if view.c_contiguous else 'not contiguous, '}{view.nbytes} bytes"
                )
            try:
                flat = view.cast("B")
            except (TypeError, ValueError):
                raise UsageError(
                    f"read_into({role!r}, {name!r}, out): out's items (format "
                    f"{view.format!r}) cannot be written as bytes; pass a bytearray or a uint8 "
                    "array"
                ) from None
            source: int | bytes = self._fd(role) if self._lazy else self._data[role]
            hasher = _TENSOR_HASHER[entry.tensor_digest]() if verify else None
            with flat:
                self._spans.read(
                    source, entry.path, header.data_start + info.begin, flat, info.nbytes, hasher
                )
        if hasher is not None:
            digest = hasher.hexdigest()
            if digest != entry.tensors[name].digest:
                raise _tensor_mismatch(self.label, entry, name, digest)

    def tensors(self, role: str) -> dict[str, RawTensor]:
        """The tensors of ``role`` as `RawTensor` (pure Python, for
        tools and tests; framework adapters load `file_bytes` with the
        ``safetensors`` library)."""
        return decode_safetensors(self.read_file(role), name=f"{role}{_SUFFIX}")


# --------------------------------------------------------------------------- writing


def _target(path: str | os.PathLike[str]) -> Path:
    try:
        raw = os.fspath(path)
    except TypeError:
        raise UsageError(
            f"checkpoint path {path!r} must be a str or os.PathLike, not {type(path).__name__}"
        ) from None
    if not isinstance(raw, str) or not raw:
        raise UsageError(f"checkpoint path {raw!r} must be a non-empty str path")
    target = Path(os.path.abspath(raw))
    if target.name in ("", ".", ".."):
        raise UsageError(f"checkpoint path {raw!r} must name a directory inside a parent directory")
    return target


def _check_target(target: Path, shown: str, overwrite: bool) -> None:
    where = f"cannot write checkpoint at '{shown}'"
    try:
        _check_target_path(target, where, overwrite)
    except OSError as exc:  # e.g. a parent that is a symbolic-link loop, or unreadable
        raise _disk_error(where, exc) from exc


def _check_target_path(target: Path, where: str, overwrite: bool) -> None:
    if os.path.islink(target):
        raise CheckpointError(
            f"{where}: the path is a symbolic link; pass the directory it points to, "
            "or another path"
        )
    if not os.path.lexists(target):
        if not overwrite and atomic.locate(target):
            raise CheckpointError(
                f"{where}: a previous checkpoint is recoverable there and overwrite=False; "
                "pass overwrite=True or choose another path"
            )
        return
    if not target.is_dir():
        raise CheckpointError(
            f"{where}: the path is a file, not a checkpoint directory; choose another path "
            "or remove the file"
        )
    if not overwrite:
        raise CheckpointError(
            f"{where}: the path already exists and overwrite=False; pass overwrite=True or "
            "choose another path"
        )
    entries = os.listdir(target)
    if entries and MANIFEST_NAME not in entries:
        raise CheckpointError(
            f"{where}: the path is a non-empty directory without {MANIFEST_NAME}, not a "
            f"checkpoint (it holds e.g. {sorted(entries)[0]!r}); refusing to replace it — "
            "choose another path or empty it"
        )


class _Document:
    """The validated JSON parts of a manifest, before the files are known."""

    def __init__(
        self,
        where: str,
        state: Any,
        config: Any,
        producer: Any,
        world_size: Any,
        metadata: Any,
    ) -> None:
        if not isinstance(producer, Producer):
            raise UsageError(
                f"{where}: producer is {producer!r:.100}; pass "
                "gradaccum.checkpoint.Producer(name, version)"
            )
        if type(world_size) is not int or world_size < 1:
            raise UsageError(f"{where}: world_size is {world_size!r:.40}; pass an integer >= 1")
        for name, value in (("state", state), ("config", config)):
            if not isinstance(value, Mapping):
                raise UsageError(f"{where}: {name} is a {type(value).__name__}; pass a mapping")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise UsageError(f"{where}: metadata is a {type(metadata).__name__}; pass a mapping")
        self.where = where
        self.producer = producer
        self.world_size = world_size
        self.state = to_json_value(state, "state")
        self.config = to_json_value(config, "config")
        self.metadata = to_json_value(metadata or {}, "metadata")
        self.created = time.time()

    def manifest(self, files: Mapping[str, FileEntry], version: int) -> Manifest:
        """The validated manifest of format ``version`` listing ``files``
        (entries of that version); `UsageError` if invalid."""
        for role in sorted(files):
            if files[role].format_version != version:
                raise UsageError(
                    f"{self.where}: the entry of {role!r} is one of format version "
                    f"{files[role].format_version}, the checkpoint's is {version}; write every "
                    "shard with the same format_version"
                )
        document = {
            "format": FORMAT_NAME,
            "format_version": version,
            "spec_version": SPEC_VERSIONS[version],
            "producer": {"name": self.producer.name, "version": self.producer.version},
            "created_unix": self.created,
            "world_size": self.world_size,
            "state": self.state,
            "config": self.config,
            "files": {role: files[role].to_json_dict() for role in sorted(files)},
            "metadata": self.metadata,
        }
        fix = "pass a valid value to write_checkpoint; nothing was written"
        try:
            return validate_manifest_dict(document, self.where, fix)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from exc


def _disk_error(where: str, exc: OSError) -> CheckpointError:
    return CheckpointError(
        f"{where}: {exc}; the previous checkpoint (if any) is unchanged — check free space "
        "and permissions, then try again"
    )


def _plan_files(files: Any, where: str, version: int) -> list[_Planned]:
    if not isinstance(files, Mapping):
        raise UsageError(f"{where}: files is a {type(files).__name__}; pass a mapping")
    return [_plan_file(role, files[role], where, version) for role in sorted(files, key=str)]


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    files: Mapping[str, FileSource],
    producer: Producer,
    world_size: int = 1,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    format_version: int = FORMAT_VERSION,
) -> Manifest:
    """Write a checkpoint directory at ``path`` and return its manifest.

    ``files`` maps each role (``gradients``, ``gradients.rank1``,
    ``optimizer``, ...) to the bytes of a safetensors file, or to a mapping
    of tensor names to `TensorSource` — then the file is written tensor by
    tensor as `encode_safetensors` would lay it out, hashing while writing,
    without ever holding the whole file. Every argument is validated first —
    roles, JSON values (string keys, finite floats, bounded integers and
    depth; tuples are stored as arrays), the state's schema and invariants
    and the config (as `check_state_and_config` parses them for readers),
    each file's safetensors header or tensor sources — and a problem raises
    `UsageError` with nothing written (CKPT-14); a streamed tensor whose data
    has the wrong length raises `UsageError` while writing, with the target
    unchanged and the temporary removed. A path that is a file, a symbolic
    link, a non-empty directory that is not a checkpoint, or an existing
    checkpoint with ``overwrite=False`` raises `CheckpointError`, also before
    any write.

    ``format_version`` 3 (the default, ``spec/checkpoint-v3.md``) records
    each file's header SHA-256 and each tensor's CRC-32, so every byte is
    checked once, on helper threads while it is written (CKPT-25, CKPT-26);
    2 records each tensor's SHA-256 instead (every byte under a cryptographic
    digest, at about a third of CRC-32's speed); 1 also records each file's
    whole-file SHA-256 (every byte hashed twice), for readers older than
    format 2. Another value raises `UsageError`.

    The directory — the tensor files, ``manifest.json`` and its checksum
    ``manifest.sha256`` (CKPT-21) — is then replaced atomically (CKPT-12):
    whatever happens, ``path`` holds the previous complete checkpoint or the
    new complete one. A disk failure raises `CheckpointError` and leaves the
    previous checkpoint in place.
    """
    target = _target(path)
    shown = os.fspath(path)
    where = f"cannot write checkpoint at '{shown}'"
    version = check_format_version(format_version, where)
    doc = _Document(where, state, config, producer, world_size, metadata)
    planned = _plan_files(files, where, version)
    doc.manifest({p.role: p.entry() for p in planned}, version)  # all but streamed digests
    _check_target(target, shown, overwrite)

    result: list[Manifest] = []

    def manifest_bytes() -> bytes:
        manifest = doc.manifest({p.role: p.entry() for p in planned}, version)
        result.append(manifest)
        return manifest.to_json_bytes()

    raw: list[bytes] = []

    def manifest_file() -> bytes:
        raw.append(manifest_bytes())
        return raw[0]

    payload: dict[str, Any] = {p.role + _SUFFIX: p.chunks for p in planned}
    payload[MANIFEST_NAME] = manifest_file
    payload[MANIFEST_SHA256_NAME] = lambda: manifest_sidecar(raw[0])
    try:
        atomic.replace_directory(target, payload)
    except OSError as exc:
        raise _disk_error(where, exc) from exc
    return result[0]


def _check_token(token: Any, where: str) -> str:
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise UsageError(
            f"{where}: token {token!r:.80} must be 8 to 64 lowercase hex digits, the same on "
            "every rank (e.g. rank 0's secrets.token_hex(8), broadcast)"
        )
    return token


def stage_checkpoint(
    path: str | os.PathLike[str],
    *,
    token: str,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    producer: Producer,
    world_size: int = 1,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> None:
    """Begin a checkpoint that several ranks write into a directory they all
    see (rank 0 calls it, before any rank calls `write_shard`).

    Validates the state, config, metadata, producer and world size and checks
    the target exactly as `write_checkpoint` does (CKPT-14: `UsageError` or
    `CheckpointError` with nothing created), removes leftover temporaries of
    ``path`` (CKPT-13) and creates the empty staging directory
    ``.<name>.tmp-<token>`` next to it. ``token`` (8–64 lowercase hex digits)
    must be the same on every rank."""
    target = _target(path)
    shown = os.fspath(path)
    where = f"cannot write checkpoint at '{shown}'"
    _check_token(token, where)
    doc = _Document(where, state, config, producer, world_size, metadata)
    doc.manifest({}, FORMAT_VERSION)
    _check_target(target, shown, overwrite)
    try:
        atomic.create_staging(target, token)
    except OSError as exc:
        raise _disk_error(where, exc) from exc


def write_shard(
    path: str | os.PathLike[str],
    *,
    token: str,
    files: Mapping[str, FileSource],
    format_version: int = FORMAT_VERSION,
) -> dict[str, FileEntry]:
    """Write this rank's tensor files into the staging directory that
    `stage_checkpoint` created for ``path`` and return their manifest entries.

    Each role's file (bytes of a safetensors file, or `TensorSource` objects
    streamed tensor by tensor) is created exclusively (two ranks writing the
    same role fail), hashed while written, and fsynced. Roles and headers are
    validated first (`UsageError`, nothing written). Send the returned
    entries to rank 0 (`encode_file_entries` / `decode_file_entries`) for
    `commit_checkpoint`. A missing staging directory raises `CheckpointError`.
    ``format_version`` is `write_checkpoint`'s; every rank must pass the same.
    """
    target = _target(path)
    where = f"cannot write checkpoint at '{os.fspath(path)}'"
    tmp = atomic.temporary_path(target, _check_token(token, where))
    version = check_format_version(format_version, where)
    planned = _plan_files(files, where, version)
    if not tmp.is_dir() or tmp.is_symlink():
        raise CheckpointError(
            f"{where}: the staging directory '{tmp}' does not exist; rank 0 must call "
            "stage_checkpoint with the same token before any rank writes its shard"
        )
    try:
        for p in planned:
            atomic.write_file(tmp / (p.role + _SUFFIX), p.chunks)
    except FileExistsError as exc:
        raise UsageError(
            f"{where}: {exc.filename!r} was already written by another rank; give each rank "
            "its own roles (e.g. 'gradients.rank<r>')"
        ) from exc
    except OSError as exc:
        raise _disk_error(where, exc) from exc
    return {p.role: p.entry() for p in planned}


def commit_checkpoint(
    path: str | os.PathLike[str],
    *,
    token: str,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    producer: Producer,
    entries: Mapping[str, FileEntry],
    world_size: int = 1,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    verify: bool = False,
    format_version: int | None = None,
) -> Manifest:
    """Finish a checkpoint staged with `stage_checkpoint` (rank 0, after every
    rank's `write_shard` returned) and return its manifest.

    Checks that the staging directory holds exactly the files of
    ``entries`` — regular files of the recorded sizes whose safetensors
    headers match the recorded tensor index; with ``verify`` also re-hashed —
    that every entry is of the same format version, the checkpoint's
    (``format_version``, the one passed to `write_shard`; ``None``: the
    entries', or the default when there are none), and that the manifest is
    valid, then writes ``manifest.json`` and
    ``manifest.sha256`` and installs the directory atomically (CKPT-12).
    Any failure raises (`UsageError`, `CheckpointError`), removes the staging
    directory and leaves ``path`` unchanged."""
    target = _target(path)
    shown = os.fspath(path)
    where = f"cannot write checkpoint at '{shown}'"
    tmp = atomic.temporary_path(target, _check_token(token, where))
    try:
        doc = _Document(where, state, config, producer, world_size, metadata)
        if not isinstance(entries, Mapping) or not all(
            is_role(r) and isinstance(e, FileEntry) for r, e in entries.items()
        ):
            raise UsageError(
                f"{where}: entries must map roles to the FileEntry objects write_shard returned"
            )
        if format_version is not None:
            version = check_format_version(format_version, where)
        else:
            versions = {e.format_version for e in entries.values()}
            version = versions.pop() if len(versions) == 1 else FORMAT_VERSION
        manifest = doc.manifest(entries, version)
        _check_target(target, shown, overwrite)
        _check_staged(tmp, manifest, where, verify)
        raw = manifest.to_json_bytes()
        atomic.write_file(tmp / MANIFEST_NAME, raw)
        atomic.write_file(tmp / MANIFEST_SHA256_NAME, manifest_sidecar(raw))
        atomic.install_staging(tmp, target)
    except OSError as exc:
        atomic.remove_staging(tmp)
        raise _disk_error(where, exc) from exc
    except BaseException:
        atomic.remove_staging(tmp)
        raise
    return manifest


def abort_checkpoint(path: str | os.PathLike[str], *, token: str) -> None:
    """Remove the staging directory of a checkpoint begun with
    `stage_checkpoint` (after a failure on any rank); ``path`` is untouched.
    Calling it when the staging directory is gone does nothing."""
    target = _target(path)
    where = f"cannot abort checkpoint at '{os.fspath(path)}'"
    atomic.remove_staging(atomic.temporary_path(target, _check_token(token, where)))


def _check_staged(tmp: Path, manifest: Manifest, where: str, verify: bool) -> None:
    try:
        handle = _Dir(tmp)
    except OSError as exc:
        raise CheckpointError(
            f"{where}: the staging directory '{tmp}' cannot be opened ({exc.strerror}); "
            "call stage_checkpoint first, with the same token"
        ) from exc
    try:
        present = set(handle.names())
        listed = {e.path for e in manifest.files.values()}
        if present != listed:
            raise CheckpointError(
                f"{where}: the staging directory holds {sorted(present - listed)[:5]} that no "
                f"entry lists and lacks {sorted(listed - present)[:5]}; every rank must "
                "write_shard its files and rank 0 must pass all their entries"
            )
        for entry in manifest.files.values():
            fd = handle.open_regular(entry.path, where)
            try:
                size = os.fstat(fd).st_size
                if size != entry.size:
                    raise CheckpointError(
                        f"{where}: staged file {entry.path!r} is {size} bytes but its entry "
                        f"records {entry.size}; write the shard again"
                    )
                header = read_header_fd(fd, size, f"{where}: staged file {entry.path!r}")
                _check_index(header, entry, where)
                if verify:
                    _verify_fd(fd, header, entry, where)
            finally:
                os.close(fd)
    finally:
        handle.close()


# --------------------------------------------------------------------------- verification


def _check_only(only: Collection[str] | None, entry: FileEntry, call: str) -> None:
    if only is None:
        return
    unknown = sorted(set(only) - set(entry.tensors))
    if isinstance(only, (str, bytes)) or unknown:
        raise UsageError(
            f"{call}: {unknown[:3] or only!r:.100} are not tensors of {entry.path!r}; pass a "
            "collection of its tensor names"
        )


def _check_index(header: SafetensorsHeader, entry: FileEntry, label: str) -> None:
    """The header lists exactly the manifest's tensors, with its dtypes and shapes (CKPT-5)."""
    if set(header.tensors) != set(entry.tensors):
        only_file = sorted(set(header.tensors) - set(entry.tensors))
        only_manifest = sorted(set(entry.tensors) - set(header.tensors))
        raise CheckpointCorruptError(
            f"{label}: file {entry.path!r} holds tensors the manifest does not list "
            f"({only_file[:5]}) or lacks tensors it lists ({only_manifest[:5]}); "
            f"{_RESTORE}"
        )
    for name, expected in entry.tensors.items():
        info = header.tensors[name]
        if (info.dtype, info.shape) != (expected.dtype, expected.shape):
            raise CheckpointCorruptError(
                f"{label}: tensor {name!r} in {entry.path!r} is {info.dtype} "
                f"{list(info.shape)} but the manifest records {expected.dtype} "
                f"{list(expected.shape)}; {_RESTORE}"
            )


def _file_mismatch(label: str, entry: FileEntry, digest: str) -> CheckpointChecksumError:
    if entry.header_sha256 is not None:
        return CheckpointChecksumError(
            f"{label}: the header of file {entry.path!r} has SHA-256 {_short(digest)} but the "
            f"manifest records {_short(entry.header_sha256)}; {_RESTORE}"
        )
    return CheckpointChecksumError(
        f"{label}: file {entry.path!r} has SHA-256 {_short(digest)} but the manifest "
        f"records {_short(entry.sha256 or '')}; {_RESTORE}"
    )


def _tensor_mismatch(
    label: str, entry: FileEntry, name: str, digest: str
) -> CheckpointChecksumError:
    return CheckpointChecksumError(
        f"{label}: tensor {name!r} in {entry.path!r} has {_TENSOR_LABEL[entry.tensor_digest]} "
        f"{_short(digest)} but the manifest records {_short(entry.tensors[name].digest)}; "
        f"{_RESTORE}"
    )


def _tensor_digests(
    view: memoryview,
    header: SafetensorsHeader,
    only: Collection[str] | None = None,
    *,
    algorithm: str,
) -> dict[str, str]:
    """Every tensor's digest with ``algorithm`` (or those named in ``only``),
    in the header's order, on two threads when the file is large (the
    digests are independent: CKPT-25)."""
    hex_of = _TENSOR_HEX[algorithm]
    start = header.data_start
    spans = [
        (name, start + info.begin, start + info.end)
        for name, info in header.tensors.items()
        if only is None or name in only
    ]
    total = sum(end - begin for _, begin, end in spans)
    if total < _PARALLEL_HASH_BYTES or len(spans) < 2 or (os.cpu_count() or 1) < 2:
        return {name: hex_of(view[begin:end]) for name, begin, end in spans}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(hex_of, view[begin:end]) for name, begin, end in spans}
        return {name: future.result() for name, future in futures.items()}


def _verify_digests(
    view: BytesLike,
    header: SafetensorsHeader,
    entry: FileEntry,
    label: str,
    *,
    file_verified: bool = False,
    only: Collection[str] | None = None,
) -> None:
    """Compare the file's digest (format 1: of all its bytes; formats 2 and 3:
    of its header) unless ``file_verified``, then every tensor's (formats 2 and 3:
    those in ``only``, when given), with the manifest — the file's first."""
    data = memoryview(view)
    try:
        if entry.header_sha256 is not None:
            if not file_verified:
                digest = _hex(data[: header.data_start])
                if digest != entry.header_sha256:
                    raise _file_mismatch(label, entry, digest)
            digests = _tensor_digests(data, header, only, algorithm=entry.tensor_digest)
        else:
            side = _Side(hashlib.sha256(), not file_verified and len(data) >= _PARALLEL_HASH_BYTES)
            try:
                if not file_verified:
                    side.update(data)
                start = header.data_start
                digests = {
                    name: _hex(data[start + info.begin : start + info.end])
                    for name, info in header.tensors.items()
                }
                side.wait()
            finally:
                side.close()
            if not file_verified:
                digest = side.hasher.hexdigest()
                if digest != entry.sha256:
                    raise _file_mismatch(label, entry, digest)
    finally:
        data.release()
    for name, tensor_digest in digests.items():
        if tensor_digest != entry.tensors[name].digest:
            raise _tensor_mismatch(label, entry, name, tensor_digest)


def _verify_blob(blob: bytes, entry: FileEntry, label: str) -> SafetensorsHeader:
    """Verify a whole file's bytes: size, file (or header) digest, header,
    index, tensor digests."""
    if len(blob) != entry.size:
        raise CheckpointCorruptError(
            f"{label}: file {entry.path!r} is {len(blob)} bytes but the manifest records "
            f"{entry.size}; the file is truncated or was replaced — restore it from a copy "
            "or take a new checkpoint"
        )
    digest = _recorded_digest(memoryview(blob), entry)
    if digest != (entry.sha256 or entry.header_sha256):
        raise _file_mismatch(label, entry, digest)
    header = read_safetensors_header(blob, name=f"{label}: file {entry.path!r}")
    _check_index(header, entry, label)
    _verify_digests(blob, header, entry, label, file_verified=True)
    return header


def _header_span(prefix: BytesLike, size: int) -> int:
    """How many leading bytes a format-2 or -3 header digest covers, judged from
    the file's length prefix (at most the file and CKPT-6's header limit)."""
    if size < 8 or len(prefix) < 8:
        return min(size, len(prefix))
    n = int.from_bytes(bytes(prefix[:8]), "little")
    return min(size, 8 + min(n, MAX_HEADER_BYTES))


def _recorded_digest(data: memoryview, entry: FileEntry) -> str:
    """The digest the manifest records for a file whose bytes are ``data``:
    of all of it (format 1) or of its header (formats 2 and 3)."""
    if entry.header_sha256 is None:
        return _hex(data)
    return _hex(data[: _header_span(data, len(data))])


def _file_digest(fd: int, size: int, entry: FileEntry) -> str:
    """The digest the manifest records for the first ``size`` bytes of
    ``fd`` (format 1: all of them; formats 2 and 3: the header's), read in bounded
    chunks."""
    if entry.header_sha256 is not None:
        size = _header_span(os.pread(fd, 8, 0), size)
    file_hash = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            break
        file_hash.update(chunk)
        offset += len(chunk)
    return file_hash.hexdigest()


def _verify_fd(fd: int, header: SafetensorsHeader, entry: FileEntry, label: str) -> None:
    """Stream the file open at ``fd`` in bounded chunks through its digests (the
    file's SHA-256 — format 1: of every byte, on a helper thread; formats 2 and 3: of
    the header — and every tensor's at once) and compare with the manifest."""
    side = _Side(
        hashlib.sha256(), entry.header_sha256 is None and entry.size >= _PARALLEL_HASH_BYTES
    )
    try:
        _stream_digests(fd, header, entry, label, side)
    finally:
        side.close()


def _stream_digests(
    fd: int, header: SafetensorsHeader, entry: FileEntry, label: str, side: _Side
) -> None:
    v1 = entry.header_sha256 is None
    spans = [
        (header.data_start + info.begin, header.data_start + info.end, name)
        for name, info in header.tensors.items()
    ]
    new_hasher = _TENSOR_HASHER[entry.tensor_digest]
    hashes = {name: new_hasher() for _, _, name in spans}
    if not v1:  # formats 2 and 3: the header's bytes are a span of their own (CKPT-25)
        spans.insert(0, (0, header.data_start, ""))
        hashes[""] = side.hasher
    buffer = bytearray(min(_CHUNK, max(entry.size, 1)))
    view = memoryview(buffer)
    offset = 0
    index = 0
    while offset < entry.size:
        want = min(len(buffer), entry.size - offset)
        got = os.preadv(fd, [view[:want]], offset)
        if got <= 0:
            raise CheckpointCorruptError(
                f"{label}: file {entry.path!r} ended after {offset} of {entry.size} bytes "
                f"(truncated while being read); {_RESTORE}"
            )
        chunk = view[:got]
        if v1:
            side.update(chunk)
        end = offset + got
        while index < len(spans) and spans[index][0] < end:
            begin, stop, name = spans[index]
            lo, hi = max(begin, offset), min(stop, end)
            if hi > lo:
                hashes[name].update(chunk[lo - offset : hi - offset])
            if stop <= end:
                index += 1
            else:
                break
        side.wait()  # the buffer is reused for the next chunk
        offset = end
    digest = side.hasher.hexdigest()
    if digest != (entry.sha256 if v1 else entry.header_sha256):
        raise _file_mismatch(label, entry, digest)
    for _, _, name in spans:
        if not name:
            continue
        tensor_digest = hashes[name].hexdigest()
        if tensor_digest != entry.tensors[name].digest:
            raise _tensor_mismatch(label, entry, name, tensor_digest)


def _pread_into(fd: int, dest: memoryview, offset: int, label: str, path: str) -> None:
    """Fill ``dest`` from ``fd`` at ``offset`` (``preadv`` until full)."""
    pos = 0
    while pos < len(dest):
        try:
            got = os.preadv(fd, [dest[pos:]], offset + pos)
        except OSError as exc:
            raise CheckpointError(
                f"{label}: cannot read file {path!r} ({exc.strerror or exc}); check the file system"
            ) from exc
        if got <= 0:
            raise CheckpointCorruptError(
                f"{label}: file {path!r} ended at byte {offset + pos}, before the "
                f"{offset + len(dest)} its header declares (truncated while being read); "
                f"{_RESTORE}"
            )
        pos += got


class _Spans:
    """Reads spans of one open file into the caller's memory — or, to verify
    without keeping them, through two scratch buffers — in ``_CHUNK`` pieces
    with ``preadv``, feeding each piece to a hash object on a helper thread
    while the next one is read (both release the GIL), so that reading and
    hashing overlap on two cores. No mapping: every byte is read once."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._pool: ThreadPoolExecutor | None = None
        self._scratch: list[memoryview] = []
        self._pending: Future[None] | None = None
        self._closed = False  # after close (an in-memory checkpoint stays usable): hash inline

    def _submit(self, hasher: Any, chunk: memoryview) -> None:
        self._wait()
        if self._pool is None and not self._closed and (os.cpu_count() or 1) > 1:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradaccum-verify")
        if self._pool is None:
            hasher.update(chunk)
        else:
            self._pending = self._pool.submit(hasher.update, chunk)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def read(
        self,
        source: int | bytes,
        path: str,
        offset: int,
        dest: memoryview | None,
        size: int,
        hasher: Any,
    ) -> None:
        """Read ``size`` bytes at ``offset`` of ``source`` (a descriptor, or a
        file's bytes) into ``dest`` (``None``: into scratch, hashed and
        dropped), updating ``hasher`` (or nothing) with them in order."""
        pos = 0
        slot = 0
        try:
            while pos < size:
                want = min(_CHUNK, size - pos)
                if dest is not None:
                    chunk = dest[pos : pos + want]
                else:
                    while len(self._scratch) < 2:
                        self._scratch.append(memoryview(bytearray(_CHUNK)))
                    chunk = self._scratch[slot][:want]
                    slot ^= 1
                if isinstance(source, int):
                    _pread_into(source, chunk, offset + pos, self.label, path)
                else:
                    piece = memoryview(source)[offset + pos : offset + pos + want]
                    if len(piece) < want:
                        raise CheckpointCorruptError(
                            f"{self.label}: file {path!r} ends before the bytes its header "
                            f"declares; {_RESTORE}"
                        )
                    if dest is None:
                        chunk = piece
                    else:
                        chunk[:] = piece
                if hasher is not None:
                    if want < _PIPELINE_BYTES:
                        self._wait()
                        hasher.update(chunk)
                    else:
                        self._submit(hasher, chunk)
                pos += want
        finally:
            self._wait()

    def close(self) -> None:
        self._closed = True
        self._wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._scratch.clear()


# --------------------------------------------------------------------------- reading


class _SwappedError(Exception):
    """The directory was replaced by a writer while it was being read."""


class _Dir:
    """Opens files of one directory through a descriptor, so that a
    concurrent replacement of the path cannot mix two checkpoints, and only
    regular files, never following a link and never blocking (CKPT-20)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        elif not path.is_dir():  # pragma: no cover - platforms without dir_fd
            raise NotADirectoryError(str(path))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def names(self) -> list[str]:
        return os.listdir(self.fd if self.fd is not None else self.path)

    def open_regular(self, name: str, label: str) -> int:
        """A read-only descriptor of the regular file ``name`` in the directory.

        A symbolic link, FIFO, device, socket or directory is refused with
        `CheckpointCorruptError` naming the file, without opening it (and
        without blocking, should it turn into a FIFO in between)."""
        where: dict[str, Any] = {"dir_fd": self.fd} if self.fd is not None else {}
        target: str | Path = name if self.fd is not None else self.path / name
        info = os.stat(target, follow_symlinks=False, **where)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(label, name, info.st_mode)
        try:
            fd = os.open(target, _OPEN_FLAGS, **where)
        except OSError as exc:
            if os.path.islink(self.path / name):
                raise _not_regular(label, name, stat.S_IFLNK) from None
            if isinstance(exc, FileNotFoundError):
                raise
            raise CheckpointError(
                f"{label}: cannot open file {name!r} ({exc.strerror or exc}); check its permissions"
            ) from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise _not_regular(label, name, info.st_mode)
        return fd

    def read_small(self, name: str, limit: int, label: str) -> bytes:
        """The whole regular file ``name``, refused when larger than ``limit``."""
        fd = self.open_regular(name, label)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise CheckpointCorruptError(
                    f"{label}: {name!r} is {size} bytes, more than the {limit}-byte limit for "
                    f"it; the file is corrupt or not part of a checkpoint — restore it from a "
                    "copy or take a new checkpoint"
                )
            return pread_exact(fd, size, 0)
        finally:
            os.close(fd)

    def replaced(self) -> bool:
        if self.fd is None:
            return False
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        then = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def _not_regular(label: str, name: str, mode: int) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{label}: {name!r} is {file_kind(mode)}, not a regular file; a checkpoint directory "
        "holds only regular files — replace it with the file itself, or take a new checkpoint"
    )


@dataclass
class _Opened:
    manifest: Manifest
    protected: bool
    fds: dict[str, int]
    headers: dict[str, SafetensorsHeader]


def _open_directory(handle: _Dir, label: str) -> _Opened:
    """Read and check the manifest (and its sidecar), and open every tensor
    file: regular, of the declared size, header matching the index."""
    names = set(handle.names())
    if MANIFEST_NAME not in names:
        raise CheckpointCorruptError(
            f"{label}: the directory has no {MANIFEST_NAME}; it is not a gradaccum checkpoint "
            "(or it was not written completely) — pass the directory written by write_checkpoint"
        )
    raw = handle.read_small(MANIFEST_NAME, MAX_MANIFEST_BYTES, label)
    protected = MANIFEST_SHA256_NAME in names
    if protected:
        sidecar = handle.read_small(MANIFEST_SHA256_NAME, _MAX_SIDECAR_BYTES, label)
        check_manifest_sidecar(raw, sidecar, label)
    manifest = parse_manifest_bytes(raw, label)
    if not protected and (manifest.format_version >= 2 or requires_sidecar(manifest.spec_version)):
        kind = (
            f"spec {manifest.spec_version}"
            if manifest.format_version == 1
            else f"format version {manifest.format_version} (spec {manifest.spec_version})"
        )
        raise CheckpointCorruptError(
            f"{label}: the manifest says {kind}, whose checkpoints always "
            f"have {MANIFEST_SHA256_NAME}, but the directory has none (deleted, or the manifest "
            "was edited); restore it from a copy or take a new checkpoint"
        )

    present = {n for n in names if n.endswith(_SUFFIX)}
    listed = {entry.path for entry in manifest.files.values()}
    if listed - present:
        missing = ", ".join(repr(n) for n in sorted(listed - present))
        raise CheckpointCorruptError(
            f"{label}: the manifest lists {missing} but the directory does not hold it; "
            "restore the missing file from a copy or take a new checkpoint"
        )
    if present - listed:
        extra = ", ".join(repr(n) for n in sorted(present - listed)[:5])
        raise CheckpointCorruptError(
            f"{label}: the directory holds {extra}, which the manifest does not list; remove the "
            "stray file or take a new checkpoint"
        )

    fds: dict[str, int] = {}
    headers: dict[str, SafetensorsHeader] = {}
    try:
        for role, entry in manifest.files.items():
            fd = handle.open_regular(entry.path, label)
            fds[role] = fd
            size = os.fstat(fd).st_size
            if size != entry.size:
                raise CheckpointCorruptError(
                    f"{label}: file {entry.path!r} is {size} bytes but the manifest records "
                    f"{entry.size}; the file is truncated or was replaced — restore it from a "
                    "copy or take a new checkpoint"
                )
            try:
                header = read_header_fd(fd, size, f"{label}: file {entry.path!r}")
                _check_index(header, entry, label)
            except CheckpointCorruptError:
                # CKPT-7's order: a (small enough) file whose bytes are not the
                # recorded ones is reported as a checksum mismatch, not by its
                # first symptom.
                # (format 2's and 3's digest covers only the header: at most 8 + 100 MB)
                if size <= _DIGEST_ON_ERROR_LIMIT or entry.header_sha256 is not None:
                    digest = _file_digest(fd, size, entry)
                    if digest != (entry.sha256 or entry.header_sha256):
                        raise _file_mismatch(label, entry, digest) from None
                raise
            headers[role] = header
    except BaseException:
        _close_fds(fds)
        raise
    return _Opened(manifest, protected, fds, headers)


def _attempt(directory: Path, label: str, action: Callable[[_Dir], Any]) -> Any:
    try:
        handle = _Dir(directory)
    except NotADirectoryError:
        raise CheckpointCorruptError(
            f"{label}: the path is a file, not a checkpoint directory; pass the directory "
            "written by write_checkpoint"
        ) from None
    except FileNotFoundError:
        raise _SwappedError from None
    try:
        try:
            return action(handle)
        except FileNotFoundError as exc:
            if handle.replaced():
                raise _SwappedError from None
            raise CheckpointCorruptError(
                f"{label}: {exc.filename or 'a file'!r} disappeared while it was being read; "
                "another process is changing the directory — try again when it is done"
            ) from exc
        except CheckpointError:
            if handle.replaced():
                raise _SwappedError from None
            raise
    finally:
        handle.close()


def _locate_and_read(path: str | os.PathLike[str], action: Callable[[_Dir, str], Any]) -> Any:
    target = _target(path)
    shown = os.fspath(path)
    label = f"checkpoint at '{shown}'"
    error: CheckpointError | None = None
    for _ in range(_READ_ATTEMPTS):
        candidates = atomic.locate(target)
        if not candidates:
            break
        for directory in candidates:
            try:
                return target, directory, _attempt(directory, label, lambda h: action(h, label))
            except _SwappedError:
                break  # replaced under us: locate again
            except CheckpointError as exc:
                if directory == target:
                    raise
                error = exc  # a set-aside copy that does not verify: try the next
                continue
            except OSError as exc:
                raise CheckpointError(
                    f"{label}: cannot read it ({exc.strerror or exc}); check the path and its "
                    "permissions"
                ) from exc
        else:
            break
    if error is not None:
        raise error
    if os.path.lexists(target):
        raise CheckpointError(
            f"{label}: it kept changing while being read (another process is writing it); "
            "try again when the writer is done"
        )
    raise CheckpointError(
        f"no checkpoint at '{shown}': the path does not exist; check the path, or take a "
        "checkpoint first"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read the checkpoint directory at ``path`` and verify all of it.

    Before returning, the manifest is checked (its ``manifest.sha256``,
    CKPT-21; strict bounded JSON, CKPT-20; format version, schema, and the
    state and config exactly as an adapter's ``load`` parses them:
    `from_state_dict`, `from_dict` and the schedule's ``check_state``), the
    set of ``*.safetensors`` files is compared with the manifest's, and every
    file — opened only if it is a regular file, without following links, and
    read only up to its declared size — has its size, SHA-256 (format 1: of
    the file; formats 2 and 3: of its header, CKPT-25), safetensors
    header, tensor index and per-tensor digest (SHA-256; CRC-32 in format 3,
    CKPT-26) verified. The returned
    checkpoint holds every file's bytes (`open_checkpoint` holds none).
    Raises `CheckpointVersionError` for an unsupported format version,
    `CheckpointChecksumError` for a checksum mismatch,
    `CheckpointCorruptError` for any other defect, and `CheckpointError`
    when there is no checkpoint at ``path``. If ``path`` is missing because a
    writer died between its two renames, the previous complete checkpoint is
    read from its set-aside copy (CKPT-13).
    """

    def action(handle: _Dir, label: str) -> tuple[_Opened, dict[str, bytes]]:
        opened = _open_directory(handle, label)
        try:
            data: dict[str, bytes] = {}
            for role, entry in opened.manifest.files.items():
                blob = pread_exact(opened.fds[role], entry.size, 0)
                opened.headers[role] = _verify_blob(blob, entry, label)
                data[role] = blob
            return opened, data
        finally:
            _close_fds(opened.fds)

    target, directory, (opened, data) = _locate_and_read(path, action)
    return Checkpoint(
        target,
        directory,
        opened.manifest,
        data,
        headers=opened.headers,
        manifest_protected=opened.protected,
    )


def open_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Open the checkpoint directory at ``path`` without holding its files' bytes.

    Makes every check `read_checkpoint` makes on the manifest and the set of
    files, opens each tensor file (regular, not through a link, of the
    declared size) and validates its header against the manifest's index,
    reading only the headers. With ``verify`` (the default) each file is then
    streamed once in bounded chunks and its file's (format 1) or header's
    (formats 2 and 3) SHA-256 and its tensors' digests compared with the
    manifest before this returns (CKPT-7, CKPT-25);
    without it they are checked when a file is read
    (`Checkpoint.read_file`, `Checkpoint.open_file`). The returned
    `Checkpoint` holds one descriptor per file, which keeps the files it
    verified even if the directory is replaced meanwhile; close it (or use
    ``with``). Raises what `read_checkpoint` raises.
    """
    if not isinstance(verify, bool):
        raise UsageError(f"verify={verify!r} must be True or False")

    def action(handle: _Dir, label: str) -> _Opened:
        opened = _open_directory(handle, label)
        if verify:
            try:
                for role, entry in opened.manifest.files.items():
                    _verify_fd(opened.fds[role], opened.headers[role], entry, label)
            except BaseException:
                _close_fds(opened.fds)
                raise
        return opened

    target, directory, opened = _locate_and_read(path, action)
    return Checkpoint(
        target,
        directory,
        opened.manifest,
        headers=opened.headers,
        fds=opened.fds,
        verified=verify,
        manifest_protected=opened.protected,
    )


def validate_checkpoint(path: str | os.PathLike[str]) -> Manifest:
    """Verify the checkpoint at ``path`` exactly as `read_checkpoint` does
    (streaming each file, so without holding its bytes) and return its
    manifest; raises the same errors."""
    with open_checkpoint(path, verify=True) as ckpt:
        return ckpt.manifest
