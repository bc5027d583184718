"""Atomic replacement of a whole directory (spec promises CKPT-12, CKPT-13).

The new content is written into a temporary sibling ``.<name>.tmp-<random>``
(each file written and fsynced, then the directory fsynced) and put in place:

* target absent: ``rename(tmp, target)``;
* target present, Linux ``renameat2(RENAME_EXCHANGE)`` available: the two
  directories swap in one atomic step, then the old one (now at the temporary
  name) is deleted;
* otherwise: ``rename(target, .<name>.old-<random>)`` then
  ``rename(tmp, target)``. A crash between the two leaves no ``target`` but a
  complete ``.old-`` sibling, which `locate` returns to readers.

The parent directory is fsynced after each rename. A crash at any moment
therefore leaves at ``target`` (or, in the fallback's one gap, at the
``.old-`` sibling) either the old complete directory or the new complete one.
Leftover temporaries are ignored by readers and removed by the next write.
Only one writer per target at a time is supported.

For crash tests only, `_stage_hook` (``None`` in normal use) is called
with the name of each stage the write reaches, so that a test can stop a
writer at every stage in turn; see `_stage`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = [
    "OLD_INFIX",
    "TMP_INFIX",
    "create_staging",
    "exchange_supported",
    "install_staging",
    "locate",
    "remove_staging",
    "replace_directory",
    "stale_siblings",
    "temporary_path",
    "write_file",
]

TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"

_RENAME_EXCHANGE = 2
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MAX_WRITE = 1 << 30

_renameat2: Callable[..., int] | None = None
if sys.platform.startswith("linux"):  # pragma: no branch
    try:
        _libc = ctypes.CDLL(None, use_errno=True)  # the running process: libc included
        _renameat2 = _libc.renameat2
        _renameat2.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28, musl, ...
        _renameat2 = None

# Set to False (tests do) to force the rename-aside fallback.
_USE_EXCHANGE = True

# TEST HOOK, not an API: tests (tests/test_checkpoint_crash.py) set it to a
# callable that a writer calls with the name of each stage it reaches; the
# crash test's hook reports the stage to its parent and blocks until the parent
# lets it go on or kills it there. None in normal use, when it costs a function
# call per stage (a few per file) and formats nothing.
_stage_hook: Callable[[str], None] | None = None


def _stage(stage: str, name: str = "") -> None:
    """Report ``stage`` (``"<stage>:<name>"`` when ``name`` is given) to
    `_stage_hook`. The stages, in order (those that do not apply are
    skipped):

    ``tmp-created``
        the temporary directory exists, empty;
    ``written:<file>``, ``fsynced:<file>``
        each file's bytes are written, then fsynced and closed;
    ``tmp-synced``
        the temporary and the parent directory are fsynced: everything is
        ready, next is the rename or the exchange;
    ``renamed``
        (no previous directory) the temporary is renamed into place;
    ``exchanged``
        (``renameat2`` path) the new and the old directories are swapped;
    ``renamed-aside``, ``aside-synced``, ``renamed``
        (fallback path) the old directory is renamed to ``.<name>.old-*``, the
        parent fsynced, then the temporary renamed into place;
    ``installed``
        the parent directory is fsynced after the last rename;
    ``removed-old:<file>``, ``old-removed``
        the old directory's files are deleted one by one, then the directory;
    ``done``
        set-aside copies left by earlier writers are removed too.
    """
    hook = _stage_hook
    if hook is not None:
        hook(f"{stage}:{name}" if name else stage)


def exchange_supported() -> bool:
    """True when ``renameat2(RENAME_EXCHANGE)`` is reachable through libc."""
    return _renameat2 is not None and _USE_EXCHANGE


def _exchange(parent_fd: int, a: str, b: str) -> bool:
    """Swap ``a`` and ``b`` inside ``parent_fd``; False when the kernel or
    file system does not support it (then nothing happened)."""
    if _renameat2 is None or not _USE_EXCHANGE:
        return False
    if _renameat2(parent_fd, os.fsencode(a), parent_fd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def _fsync_dir(path: Path | str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. file systems that refuse directory fsync
        pass
    finally:
        os.close(fd)


Chunks = Iterable["bytes | bytearray | memoryview"]


def write_file(path: Path, data: bytes | bytearray | memoryview | Chunks) -> None:
    """Create ``path`` (it must not exist: ``O_EXCL``) holding ``data`` — one
    bytes-like object or an iterable of them, written in order as they come —
    then fsync and close it. On any error the partial file is removed."""
    fd = os.open(
        path,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | _CLOEXEC,
        0o666,
    )
    chunks: Chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    written = os.write(fd, view[:_MAX_WRITE])
                    view = view[written:]
            _stage("written", path.name)
            os.fsync(fd)
        finally:
            os.close(fd)
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator: join its hashing threads and drop its buffers now
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    _stage("fsynced", path.name)


def stale_siblings(target: Path, infix: str) -> list[Path]:
    """Siblings ``.<name><infix>*`` of ``target`` (temporaries or set-aside copies)."""
    prefix = f".{target.name}{infix}"
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    return [target.parent / n for n in sorted(names) if n.startswith(prefix)]


def _remove(path: Path, stage: str | None = None) -> None:
    """Delete ``path`` (a file, a link or a directory tree), ignoring errors.
    With ``stage``, a directory's files are deleted one by one, each reported
    as ``<stage>:<file>``, before the rest of the tree (as ``rmtree`` would)."""
    if path.is_dir() and not path.is_symlink():
        if stage is not None:
            with contextlib.suppress(OSError):
                for entry in sorted(os.scandir(path), key=lambda e: e.name):
                    if not entry.is_dir(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                        _stage(stage, entry.name)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def temporary_path(target: Path, token: str) -> Path:
    """The temporary sibling ``.<name>.tmp-<token>`` a writer of ``target`` stages into."""
    return target.parent / f".{target.name}{TMP_INFIX}{token}"


def create_staging(target: Path, token: str | None = None) -> Path:
    """Remove leftover temporaries of ``target``, then create and return the
    empty temporary sibling (``token``, or a random one, names it)."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_siblings(target, TMP_INFIX):
        _remove(stale)
    tmp = temporary_path(target, token or secrets.token_hex(8))
    os.mkdir(tmp)
    _stage("tmp-created")
    return tmp


def install_staging(tmp: Path, target: Path) -> None:
    """fsync the complete temporary ``tmp`` and its parent, then put it in
    place of ``target`` atomically and remove set-aside copies (the stages
    ``tmp-synced`` ... ``done``). Raises `OSError` on a disk failure; then
    ``target`` is unchanged (the caller removes ``tmp``)."""
    _fsync_dir(tmp)
    _fsync_dir(target.parent)
    _stage("tmp-synced")
    _install(tmp, target)
    for old in stale_siblings(target, OLD_INFIX):
        _remove(old)
    _stage("done")


def remove_staging(tmp: Path) -> None:
    """Delete the temporary ``tmp`` and everything in it, ignoring errors."""
    _remove(tmp)


def replace_directory(
    target: Path,
    files: Mapping[str, bytes | bytearray | memoryview | Chunks | Callable[[], bytes]],
) -> None:
    """Atomically make ``target`` a directory holding exactly ``files``
    (file name -> bytes, an iterable of bytes-like chunks written as they
    come, or a zero-argument callable returning the bytes — called after the
    files before it are written, so a manifest can record their digests).
    The caller has validated everything and checked that replacing
    ``target`` is allowed. Raises `OSError` on a disk failure, or whatever a
    chunk iterator raises; then ``target`` is unchanged and the temporary is
    removed."""
    tmp = create_staging(target)
    try:
        for name, data in files.items():
            write_file(tmp / name, data() if callable(data) else data)
        install_staging(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _install(tmp: Path, target: Path) -> None:
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(tmp, target)
        _stage("renamed")
        _fsync_dir(parent)
        _stage("installed")
        return
    swapped = False
    if exchange_supported():
        parent_fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            swapped = _exchange(parent_fd, tmp.name, target.name)
        finally:
            os.close(parent_fd)
    if swapped:
        _stage("exchanged")
        _fsync_dir(parent)
        _stage("installed")
        _remove(tmp, "removed-old")  # now the old checkpoint
        _stage("old-removed")
        return
    aside = parent / f".{target.name}{OLD_INFIX}{secrets.token_hex(8)}"
    os.rename(target, aside)
    _stage("renamed-aside")
    _fsync_dir(parent)
    _stage("aside-synced")
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(aside, target)  # put the old one back; the caller removes tmp
        raise
    _stage("renamed")
    _fsync_dir(parent)
    _stage("installed")
    _remove(aside, "removed-old")
    _stage("old-removed")


def locate(target: Path) -> list[Path]:
    """The directories a reader should try for ``target``, best first:
    ``target`` itself when it exists; otherwise the set-aside ``.old-``
    siblings, newest first — a writer using the fallback that dies between
    its two renames leaves the previous complete checkpoint there."""
    if os.path.lexists(target):
        return [target]
    olds = [p for p in stale_siblings(target, OLD_INFIX) if p.is_dir() and not p.is_symlink()]
    olds.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return olds
