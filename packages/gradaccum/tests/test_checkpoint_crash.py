"""A writer killed with SIGKILL at any stage of a write never leaves a broken
checkpoint (spec promises CKPT-12, CKPT-13).

No timing is involved: the writer runs in a child process whose
``atomic._stage_hook`` (a test-only hook) prints each stage the write reaches
and then blocks until the parent answers. The parent answers every stage but
one and kills the child while it waits at that one, so each kill lands at a
known point of the write; one child per stage covers them all.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gradaccum.checkpoint import Checkpoint, atomic, read_checkpoint, write_checkpoint
from gradaccum.checkpoint.atomic import OLD_INFIX, TMP_INFIX
from gradaccum.errors import CheckpointError

SRC = Path(__file__).resolve().parents[1] / "src"

# The checkpoint number `tag`: every tensor's first 8 bytes and
# state.micro_steps are `tag`. Run by this module and by the child.
BUILD = r"""
import struct
from gradaccum.checkpoint import Producer, RawTensor, encode_safetensors

def tensor(size, tag):
    return RawTensor("U8", (size,), struct.pack("<Q", tag) + bytes(size - 8))

def build(tag):
    return {
        "state": {"version": 1, "epoch": 0, "position": tag % 4, "window_size": 4,
                  "contributing": tag % 4, "items_in_window": 0, "items_total": 0,
                  "micro_steps": tag, "optimizer_steps": tag // 4, "skipped_steps": 0,
                  "windows": tag // 4, "dropped_microbatches": 0, "dropped_windows": 0,
                  "synced_in_window": False, "schedule_state": {}},
        "config": {"schedule": {"kind": "fixed", "steps": 4}, "normalization": "mean",
                   "partial_window": "step", "non_finite": "skip"},
        "files": {
            "gradients": encode_safetensors({"g": tensor(1 << 16, tag)}),
            "model": encode_safetensors({"w": tensor(1 << 15, tag)}),
        },
        "producer": Producer("crash-test", "0"),
    }
"""

# Writes checkpoint `tag` at `path`, printing each stage and waiting for a
# line on stdin before going on; prints "returned" when write_checkpoint returns.
CHILD = (
    BUILD
    + r"""
import sys
from gradaccum.checkpoint import atomic, write_checkpoint

path, mode, tag = sys.argv[1], sys.argv[2], int(sys.argv[3])
atomic._USE_EXCHANGE = mode != "fallback"

def wait_at(stage):
    print(stage, flush=True)
    if not sys.stdin.readline():
        raise SystemExit("the parent went away")

atomic._stage_hook = wait_at
write_checkpoint(path, **build(tag))
print("returned", flush=True)
"""
)

_namespace: dict[str, Any] = {}
exec(BUILD, _namespace)
build: Callable[[int], dict[str, Any]] = _namespace["build"]

OLD, NEW, RECOVERY = 5, 6, 7
FILES = ["gradients.safetensors", "model.safetensors", "manifest.json", "manifest.sha256"]
PREPARE = [
    "tmp-created",
    *(f"{what}:{name}" for name in FILES for what in ("written", "fsynced")),
    "tmp-synced",
]
CLEANUP = [*(f"removed-old:{name}" for name in sorted(FILES)), "old-removed", "done"]
# Every stage of a write, in order, for each way of putting the new directory in place.
STAGES = {
    "create": [*PREPARE, "renamed", "installed", "done"],
    "exchange": [*PREPARE, "exchanged", "installed", *CLEANUP],
    "fallback": [*PREPARE, "renamed-aside", "aside-synced", "renamed", "installed", *CLEANUP],
}
# The first stage at which the new checkpoint is the one at the path.
INSTALLED_AT = {"create": "renamed", "exchange": "exchanged", "fallback": "renamed"}


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }


def drive(path: Path, mode: str, kill_at: int | None) -> tuple[list[str], int, str]:
    """Run a child writing checkpoint NEW at ``path``; let it through every
    stage, except that it is SIGKILLed while it waits at stage number
    ``kill_at``. Returns the stages it reported, its exit status, its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, str(NEW)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # Only against a hung child, so that the test fails instead of hanging.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    stages: list[str] = []
    try:
        while line := proc.stdout.readline():
            stage = line.rstrip("\n")
            if stage == "returned":
                break
            stages.append(stage)
            if len(stages) - 1 == kill_at:
                proc.kill()  # the child is blocked in its hook at this very stage
                break
            proc.stdin.write("go\n")
            proc.stdin.flush()
        proc.wait()
        err = proc.stderr.read()
    finally:
        watchdog.cancel()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    return stages, proc.returncode, err


def tag_of(ck: Checkpoint) -> int:
    """The checkpoint's number, checked to agree between the state and every file."""
    tag = ck.state["micro_steps"]
    for role in ("gradients", "model"):
        data = ck.file_bytes(role)
        header_size = struct.unpack("<Q", data[:8])[0]
        assert struct.unpack("<Q", data[8 + header_size : 16 + header_size])[0] == tag, role
    assert isinstance(tag, int)
    return tag


def leftovers(root: Path) -> list[str]:
    """The infixes of the siblings a write left beside ``root / 'ckpt'``."""
    names = sorted(n for n in os.listdir(root) if n != "ckpt")
    assert all(TMP_INFIX in n or OLD_INFIX in n for n in names), names
    return sorted(TMP_INFIX if TMP_INFIX in n else OLD_INFIX for n in names)


def expected_leftovers(mode: str, stage: int) -> list[str]:
    """What a writer killed at stage number ``stage`` leaves beside the checkpoint."""
    stages = STAGES[mode]
    if mode == "create":
        return [TMP_INFIX] if stage < stages.index("renamed") else []
    if stage >= stages.index("old-removed"):
        return []
    if mode == "fallback" and stage >= stages.index("renamed-aside"):
        # The new one waits as a temporary until it is renamed into place.
        return sorted([OLD_INFIX, TMP_INFIX]) if stage < stages.index("renamed") else [OLD_INFIX]
    return [TMP_INFIX]  # before the install, or the old one after an exchange


def skip_without_exchange(root: Path) -> None:
    """Skip unless ``renameat2(RENAME_EXCHANGE)`` works in ``root``: probe it
    on two empty directories (the kernel or the file system may lack it)."""
    if not atomic.exchange_supported():
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available")
    a, b = root / "probe-a", root / "probe-b"
    a.mkdir()
    b.mkdir()
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        swapped = atomic._exchange(fd, a.name, b.name)
    finally:
        os.close(fd)
        a.rmdir()
        b.rmdir()
    if not swapped:
        pytest.skip("this file system does not support RENAME_EXCHANGE")


def test_stage_hook_is_off_by_default() -> None:
    """The hook is for tests only: unset, a write reports nothing."""
    assert atomic._stage_hook is None


@pytest.mark.parametrize("mode", ["create", "exchange", "fallback"])
def test_stages_in_process(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook reports exactly the documented stages, in order."""
    if mode == "exchange":
        skip_without_exchange(tmp_path)
    monkeypatch.setattr(atomic, "_USE_EXCHANGE", mode != "fallback")
    path = tmp_path / "ckpt"
    if mode != "create":
        write_checkpoint(path, **build(OLD))
    seen: list[str] = []
    monkeypatch.setattr(atomic, "_stage_hook", seen.append)
    write_checkpoint(path, **build(NEW))
    assert seen == STAGES[mode]
    assert tag_of(read_checkpoint(path)) == NEW
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("mode", ["create", "exchange", "fallback"])
def test_sigkill_at_every_stage_leaves_old_or_new(tmp_path: Path, mode: str) -> None:
    """CKPT-12, CKPT-13: a writer SIGKILLed at each stage of a write in turn —
    temporary created, each file written, each fsynced, directories synced,
    the rename or exchange (``renameat2`` path, rename-aside fallback, or no
    previous checkpoint), the fsync after it, each deletion of the old
    copy — leaves at the path the complete old checkpoint (before the new
    one is in place; in the fallback's gap, from its set-aside copy) or the
    complete new one (after), every checksum verified; and the next write
    removes whatever it left behind."""
    if mode == "exchange":
        skip_without_exchange(tmp_path)

    def prepared(root: Path) -> Path:
        root.mkdir()
        path = root / "ckpt"
        if mode != "create":
            write_checkpoint(path, **build(OLD))
        return path

    # A write let through every stage: the stages, in order, and a clean result.
    path = prepared(tmp_path / "whole")
    stages, status, err = drive(path, mode, kill_at=None)
    assert status == 0, err
    assert stages == STAGES[mode]
    assert tag_of(read_checkpoint(path)) == NEW
    assert leftovers(path.parent) == []

    installed_at = stages.index(INSTALLED_AT[mode])
    for i, stage in enumerate(stages):
        path = prepared(tmp_path / f"kill-{i}")
        seen, status, err = drive(path, mode, kill_at=i)
        # The child reached this stage, and no further, and died by the kill.
        assert seen == stages[: i + 1], (stage, err)
        assert status == -signal.SIGKILL, (stage, status, err)
        assert leftovers(path.parent) == expected_leftovers(mode, i), stage

        if i < installed_at and mode == "create":
            with pytest.raises(CheckpointError, match="the path does not exist"):
                read_checkpoint(path)
        else:
            ck = read_checkpoint(path)  # verifies every size and checksum
            assert tag_of(ck) == (NEW if i >= installed_at else OLD), stage
            # Between the fallback's two renames the old one is read from its set-aside copy.
            aside = mode == "fallback" and stages.index("renamed-aside") <= i < installed_at
            assert (ck.source != path) == aside, stage
            if aside:
                assert OLD_INFIX in ck.source.name

        # The next write succeeds and removes every leftover.
        write_checkpoint(path, **build(RECOVERY))
        assert os.listdir(path.parent) == ["ckpt"], stage
        assert tag_of(read_checkpoint(path)) == RECOVERY
