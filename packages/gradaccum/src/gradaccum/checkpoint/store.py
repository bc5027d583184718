"""Writing, reading and validating checkpoint directories.

`write_checkpoint` validates everything before it touches the disk
(CKPT-14) and replaces the directory atomically (CKPT-12).
`read_checkpoint` verifies every byte against the manifest before it
returns anything (CKPT-7, CKPT-8) and never unpickles (CKPT-15).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradaccum.checkpoint import atomic
from gradaccum.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ROLE_PATTERN,
    SPEC_VERSION,
    Manifest,
    Producer,
    is_role,
    parse_manifest_bytes,
    to_json_value,
    validate_manifest_dict,
)
from gradaccum.checkpoint.safetensors_io import (
    RawTensor,
    decode_safetensors,
    read_safetensors_header,
)
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    UsageError,
)

__all__ = ["Checkpoint", "read_checkpoint", "validate_checkpoint", "write_checkpoint"]

_SUFFIX = ".safetensors"
_RESTORE = "the file is corrupt — restore it from a copy or take a new checkpoint"
_READ_ATTEMPTS = 3


def _short(digest: str) -> str:
    return digest[:16] + "…"


class Checkpoint:
    """A checkpoint read from disk whose every file has been verified.

    ``path`` is the path that was asked for; ``source`` is the directory the
    bytes came from (the same, unless a writer died mid-replacement and the
    previous checkpoint was recovered from its set-aside copy, CKPT-13).
    """

    def __init__(
        self, path: Path, source: Path, manifest: Manifest, data: Mapping[str, bytes]
    ) -> None:
        self.path = path
        self.source = source
        self.manifest = manifest
        self._data = dict(data)

    def __repr__(self) -> str:
        return f"Checkpoint(path={str(self.path)!r}, roles={list(self.roles)!r})"

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

    def file_bytes(self, role: str) -> bytes:
        """The verified bytes of ``<role>.safetensors``. Raises
        `CheckpointMismatchError` for a role the
        checkpoint does not hold."""
        try:
            return self._data[role]
        except KeyError:
            raise CheckpointMismatchError(
                f"checkpoint at '{self.path}' has no {role!r} file; it holds "
                f"{', '.join(repr(r) for r in self.roles) or 'no tensor files'} — "
                "load only roles the checkpoint has, or take a checkpoint that includes it"
            ) from None

    def tensors(self, role: str) -> dict[str, RawTensor]:
        """The tensors of ``role`` as `RawTensor` (pure Python, for
        tools and tests; framework adapters load `file_bytes` with the
        ``safetensors`` library)."""
        return decode_safetensors(self.file_bytes(role), name=f"{role}{_SUFFIX}")


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


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    files: Mapping[str, bytes],
    producer: Producer,
    world_size: int = 1,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> Manifest:
    """Write a checkpoint directory at ``path`` and return its manifest.

    ``files`` maps each role (``gradients``, ``gradients.rank1``,
    ``optimizer``, ...) to the bytes of a safetensors file. Every argument is
    validated first — roles, JSON values (string keys, finite floats; tuples
    are stored as arrays), the state's schema and invariants and the config
    (as `check_state_and_config` parses
    them for readers), each file's safetensors header — and a problem raises
    `UsageError` with nothing written (CKPT-14).
    A path that is a file, a symbolic link, a non-empty directory that is not
    a checkpoint, or an existing checkpoint with ``overwrite=False`` raises
    `CheckpointError`, also before any write.

    The directory is then replaced atomically (CKPT-12): whatever happens,
    ``path`` holds the previous complete checkpoint or the new complete one.
    A disk failure raises `CheckpointError` and
    leaves the previous checkpoint in place.
    """
    target = _target(path)
    shown = os.fspath(path)
    where = f"cannot write checkpoint at '{shown}'"
    fix = "pass a valid value to write_checkpoint; nothing was written"
    if not isinstance(producer, Producer):
        raise UsageError(
            f"{where}: producer is {producer!r}; pass gradaccum.checkpoint.Producer(name, version)"
        )
    if type(world_size) is not int or world_size < 1:
        raise UsageError(f"{where}: world_size is {world_size!r}; pass an integer >= 1")
    for name, value in (("state", state), ("config", config), ("files", files)):
        if not isinstance(value, Mapping):
            raise UsageError(f"{where}: {name} is a {type(value).__name__}; pass a mapping")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise UsageError(f"{where}: metadata is a {type(metadata).__name__}; pass a mapping")
    json_state = to_json_value(state, "state")
    json_config = to_json_value(config, "config")
    json_metadata = to_json_value(metadata or {}, "metadata")

    payload: dict[str, bytes] = {}
    entries: dict[str, Any] = {}
    for role in sorted(files, key=str):
        data = files[role]
        if not is_role(role):
            raise UsageError(
                f"{where}: role {role!r} does not match {ROLE_PATTERN}; use lowercase names "
                "such as 'gradients', 'gradients.rank1', 'model' or 'optimizer'"
            )
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(
                f"{where}: files[{role!r}] is a {type(data).__name__}; pass the bytes of a "
                "safetensors file (e.g. safetensors.torch.save(tensors))"
            )
        blob = bytes(data)
        try:
            header = read_safetensors_header(blob, name=f"files[{role!r}]")
        except CheckpointCorruptError as exc:
            raise UsageError(f"{where}: {exc}; nothing was written") from exc
        view = memoryview(blob)
        start = header.data_start
        entries[role] = {
            "path": role + _SUFFIX,
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "tensors": {
                name: {
                    "dtype": info.dtype,
                    "shape": list(info.shape),
                    "sha256": hashlib.sha256(
                        view[start + info.begin : start + info.end]
                    ).hexdigest(),
                }
                for name, info in sorted(header.tensors.items())
            },
        }
        payload[role + _SUFFIX] = blob

    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec_version": SPEC_VERSION,
        "producer": {"name": producer.name, "version": producer.version},
        "created_unix": time.time(),
        "world_size": world_size,
        "state": json_state,
        "config": json_config,
        "files": entries,
        "metadata": json_metadata,
    }
    try:
        manifest = validate_manifest_dict(document, where, fix)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc

    _check_target(target, shown, overwrite)
    payload[MANIFEST_NAME] = manifest.to_json_bytes()
    try:
        atomic.replace_directory(target, payload)
    except OSError as exc:
        raise CheckpointError(
            f"{where}: {exc}; the previous checkpoint (if any) is unchanged — check free space "
            "and permissions, then try again"
        ) from exc
    return manifest


# --------------------------------------------------------------------------- reading


class _SwappedError(Exception):
    """The directory was replaced by a writer while it was being read."""


class _Dir:
    """Reads files of one directory through a descriptor, so that a
    concurrent replacement of the path cannot mix two checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def names(self) -> list[str]:
        return os.listdir(self.fd if self.fd is not None else self.path)

    def read(self, name: str) -> bytes:
        if self.fd is None:
            return (self.path / name).read_bytes()
        fd = os.open(name, os.O_RDONLY, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def replaced(self) -> bool:
        if self.fd is None:
            return False
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        then = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def _read_directory(directory: Path, label: str) -> tuple[Manifest, dict[str, bytes]]:
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
            return _verify(handle, label)
        except (CheckpointError, FileNotFoundError):
            if handle.replaced():
                raise _SwappedError from None
            raise
    finally:
        handle.close()


def _verify(handle: _Dir, label: str) -> tuple[Manifest, dict[str, bytes]]:
    names = set(handle.names())
    if MANIFEST_NAME not in names:
        raise CheckpointCorruptError(
            f"{label}: the directory has no {MANIFEST_NAME}; it is not a gradaccum checkpoint "
            "(or the manifest was deleted) — pass a checkpoint directory or restore it from a copy"
        )
    manifest = parse_manifest_bytes(handle.read(MANIFEST_NAME), label)

    present = {n for n in names if n.endswith(_SUFFIX)}
    listed = {entry.path for entry in manifest.files.values()}
    if listed - present:
        missing = ", ".join(repr(n) for n in sorted(listed - present))
        raise CheckpointCorruptError(
            f"{label}: the manifest lists {missing} but the directory does not hold it; "
            "restore the missing file from a copy or take a new checkpoint"
        )
    if present - listed:
        extra = ", ".join(repr(n) for n in sorted(present - listed))
        raise CheckpointCorruptError(
            f"{label}: the directory holds {extra}, which the manifest does not list; remove the "
            "stray file or take a new checkpoint"
        )

    data: dict[str, bytes] = {}
    for role, entry in manifest.files.items():
        blob = handle.read(entry.path)
        if len(blob) != entry.size:
            raise CheckpointCorruptError(
                f"{label}: file {entry.path!r} is {len(blob)} bytes but the manifest records "
                f"{entry.size}; the file is truncated or was replaced — restore it from a copy "
                "or take a new checkpoint"
            )
        digest = hashlib.sha256(blob).hexdigest()
        if digest != entry.sha256:
            raise CheckpointChecksumError(
                f"{label}: file {entry.path!r} has SHA-256 {_short(digest)} but the manifest "
                f"records {_short(entry.sha256)}; {_RESTORE}"
            )
        header = read_safetensors_header(blob, name=f"{label}: file {entry.path!r}")
        if set(header.tensors) != set(entry.tensors):
            only_file = sorted(set(header.tensors) - set(entry.tensors))
            only_manifest = sorted(set(entry.tensors) - set(header.tensors))
            raise CheckpointCorruptError(
                f"{label}: file {entry.path!r} holds tensors the manifest does not list "
                f"({only_file[:5]}) or lacks tensors it lists ({only_manifest[:5]}); "
                f"{_RESTORE}"
            )
        view = memoryview(blob)
        for name, expected in entry.tensors.items():
            info = header.tensors[name]
            if (info.dtype, info.shape) != (expected.dtype, expected.shape):
                raise CheckpointCorruptError(
                    f"{label}: tensor {name!r} in {entry.path!r} is {info.dtype} "
                    f"{list(info.shape)} but the manifest records {expected.dtype} "
                    f"{list(expected.shape)}; {_RESTORE}"
                )
            start = header.data_start
            tensor_digest = hashlib.sha256(view[start + info.begin : start + info.end]).hexdigest()
            if tensor_digest != expected.sha256:
                raise CheckpointChecksumError(
                    f"{label}: tensor {name!r} in {entry.path!r} has SHA-256 "
                    f"{_short(tensor_digest)} but the manifest records {_short(expected.sha256)}; "
                    f"{_RESTORE}"
                )
        data[role] = blob
    return manifest, data


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read the checkpoint directory at ``path`` and verify all of it.

    Before returning, the manifest is checked (format version, schema, and
    the state and config exactly as an adapter's ``load`` parses them:
    `from_state_dict`,
    `from_dict` and the schedule's
    ``check_state``), the set of ``*.safetensors`` files is compared with the
    manifest's, and every file's size, SHA-256, safetensors header, tensor
    index and per-tensor SHA-256 are verified. Raises
    `CheckpointVersionError` for an unsupported format
    version, `CheckpointChecksumError` for a checksum
    mismatch, `CheckpointCorruptError` for any other
    defect, and `CheckpointError` when there is no
    checkpoint at ``path``. If ``path`` is missing because a writer died
    between its two renames, the previous complete checkpoint is read from its
    set-aside copy (CKPT-13).
    """
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
                manifest, data = _read_directory(directory, label)
            except _SwappedError:
                break  # replaced under us: locate again
            except CheckpointError as exc:
                if directory == target:
                    raise
                error = exc  # a set-aside copy that does not verify: try the next
                continue
            except OSError as exc:
                raise CheckpointError(
                    f"{label}: cannot read it ({exc}); check the path and its permissions"
                ) from exc
            return Checkpoint(target, directory, manifest, data)
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


def validate_checkpoint(path: str | os.PathLike[str]) -> Manifest:
    """Verify the checkpoint at ``path`` exactly as `read_checkpoint`
    does and return its manifest; raises the same errors."""
    return read_checkpoint(path).manifest
