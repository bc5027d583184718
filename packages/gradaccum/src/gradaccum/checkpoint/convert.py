"""Rewrite a checkpoint in another format version (``gradaccum convert``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gradaccum.checkpoint.format import FORMAT_VERSION, Manifest
from gradaccum.checkpoint.store import (
    Checkpoint,
    FileSource,
    TensorSource,
    _check_target,
    _target,
    check_format_version,
    open_checkpoint,
    write_checkpoint,
)
from gradaccum.errors import UsageError

__all__ = ["convert_checkpoint"]


def convert_checkpoint(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    format_version: int = FORMAT_VERSION,
    overwrite: bool = False,
) -> Manifest:
    """Write the checkpoint at ``source`` again at ``target`` in format
    ``format_version`` (3, the default; 2; or 1 for readers older than
    format 2) and return the new manifest.

    Everything a resume reads carries over unchanged: the producer, world
    size, accumulation state, config, metadata and every tensor of every
    file, bit for bit (the tensors' order inside a file may change; readers
    find tensors by name). ``created_unix`` is the time of the conversion.
    ``target`` is checked before the source is read. The source is opened
    through descriptors and each tensor is read with
    ``pread`` and its digest checked as it is copied (CKPT-7, CKPT-23), one
    tensor at a time, so memory stays bounded by the largest tensors, not
    the files — except for a file whose safetensors header carries
    ``__metadata__``, which is read whole to keep that metadata. A format-1
    source is read once more first: its one file digest covers every byte.
    The target
    is written atomically (CKPT-12): a source that fails verification raises
    its `CheckpointError` (`CheckpointChecksumError` naming the tensor) and
    ``target`` keeps what it held. ``target`` may be ``source`` itself with
    ``overwrite=True``: the descriptors keep the old files readable until the
    new directory has replaced them.

    Raises:
        UsageError: a format version this release does not write,
            ``overwrite`` not a bool, a path that is not a non-empty str or
            ``os.PathLike`` — before anything is read — or a target inside
            the source directory.
        CheckpointError: ``source`` is not a valid checkpoint, or ``target``
            is a file, a link, a non-empty directory that is not a
            checkpoint, or an existing checkpoint without ``overwrite``; a
            disk failure while writing.
    """
    where = "cannot convert a checkpoint"
    version = check_format_version(format_version, where)
    if not isinstance(overwrite, bool):
        raise UsageError(f"{where}: overwrite={overwrite!r:.40} must be True or False")
    source_path = _target(source)  # UsageError for what is not a path
    target_path = _target(target)
    shown = os.fspath(target)
    # The target first: a refusal costs no read of the source.
    _check_target(target_path, shown, overwrite)
    with open_checkpoint(source, verify=False) as ckpt:
        inside = Path(os.path.realpath(target_path)).parents  # realpath: no error on loops
        for directory in {source_path, Path(os.path.abspath(ckpt.source))}:
            if Path(os.path.realpath(directory)) in inside:
                raise UsageError(
                    f"{where}: the target '{shown}' lies inside the source checkpoint "
                    f"'{directory}', whose reader would refuse the files it does not list; "
                    "choose a path outside it (or the source itself, with overwrite=True)"
                )
        manifest = ckpt.manifest
        files = {role: _file_source(ckpt, role) for role in manifest.roles}
        return write_checkpoint(
            target,
            state=manifest.state,
            config=manifest.config,
            files=files,
            producer=manifest.producer,
            world_size=manifest.world_size,
            metadata=manifest.metadata,
            overwrite=overwrite,
            format_version=version,
        )


def _file_source(ckpt: Checkpoint, role: str) -> FileSource:
    """``role``'s file as tensor sources read (and checked) when the writer
    reaches them, or — when its header carries ``__metadata__`` — as its
    verified bytes."""
    header = ckpt.verify_header(role)
    if header.metadata:
        return ckpt.read_file(role)
    return {
        name: TensorSource(info.dtype, info.shape, _reader(ckpt, role, name, info.end - info.begin))
        for name, info in header.tensors.items()
    }


def _reader(ckpt: Checkpoint, role: str, name: str, size: int) -> Callable[[], bytearray]:
    def read() -> bytearray:
        buffer = bytearray(size)
        ckpt.read_into(role, name, buffer, verify=True)
        return buffer

    return read
