"""Hostile checkpoints (issue 8, section 1): every one is refused with a
`CheckpointError` naming the problem — never another exception, a hang or
a read beyond the declared size — and the command line prints
``invalid: ...``, never a traceback (spec CKPT-2, CKPT-6, CKPT-17, CKPT-20,
CKPT-21)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gradaccum.checkpoint import (
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    Producer,
    RawTensor,
    encode_safetensors,
    open_checkpoint,
    read_checkpoint,
    read_safetensors_header,
    validate_checkpoint,
    write_checkpoint,
)
from gradaccum.checkpoint.format import manifest_sidecar
from gradaccum.cli import main
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointError,
    GradAccumError,
    UsageError,
)

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
FIXTURE = TESTS / "fixtures" / "checkpoint-v1-minimal"
PRODUCER = Producer("gradaccum-test", "1.0.0")
CONFIG: dict[str, Any] = {
    "schedule": {"kind": "fixed", "steps": 4},
    "normalization": "mean",
    "partial_window": "step",
    "non_finite": "skip",
}
STATE: dict[str, Any] = {
    "version": 1,
    "epoch": 0,
    "position": 3,
    "window_size": 4,
    "contributing": 3,
    "items_in_window": 96,
    "items_total": 256,
    "micro_steps": 11,
    "optimizer_steps": 2,
    "skipped_steps": 0,
    "windows": 2,
    "dropped_microbatches": 0,
    "dropped_windows": 0,
    "synced_in_window": False,
    "schedule_state": {},
}
GRADIENTS = {
    "fc.weight": RawTensor("F32", (2, 3), struct.pack("<6f", *range(6))),
    "fc.bias": RawTensor("F32", (3,), struct.pack("<3f", 0.25, -0.25, 0.0)),
}


def write_small(path: Path, format_version: int = 3) -> Path:
    """A small mid-window checkpoint (gradients and optimizer metadata) at ``path``."""
    write_checkpoint(
        path,
        state=STATE,
        config=CONFIG,
        files={"gradients": encode_safetensors(GRADIENTS)},
        producer=PRODUCER,
        metadata={"optimizer": {"param_groups": [{"lr": 0.01, "betas": [0.9, 0.999]}]}},
        format_version=format_version,
    )
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_small(tmp_path / "ckpt")


def reseal(ckpt: Path) -> None:
    """Make ``manifest.sha256`` match the edited manifest (CKPT-21), so the
    checks behind it are reached."""
    raw = (ckpt / "manifest.json").read_bytes()
    (ckpt / "manifest.sha256").write_bytes(manifest_sidecar(raw))


def set_manifest_text(ckpt: Path, text: str) -> None:
    (ckpt / "manifest.json").write_text(text, encoding="utf-8")
    reseal(ckpt)


def rehash_file(ckpt: Path, role: str) -> None:
    """Record the edited file's size and digest — format 1: of the whole
    file; formats 2 and 3: of its length prefix and header (CKPT-25) — in the
    manifest, reseal it."""
    blob = (ckpt / f"{role}.safetensors").read_bytes()
    doc = json.loads((ckpt / "manifest.json").read_text())
    doc["files"][role]["size"] = len(blob)
    if doc["format_version"] == 1:
        doc["files"][role]["sha256"] = hashlib.sha256(blob).hexdigest()
    else:
        n = int.from_bytes(blob[:8], "little")
        doc["files"][role]["header_sha256"] = hashlib.sha256(blob[: 8 + n]).hexdigest()
    set_manifest_text(ckpt, json.dumps(doc))


def bounded(fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` in a thread and return what it raised (None if nothing).
    The join limit only guards the test run against a regression that
    hangs; the assertion is that ``fn`` finished."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            result.append(exc)
        else:
            result.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the reader blocked"
    return result[0]


def refused(path: Path, match: str, kind: type[Exception] = CheckpointCorruptError) -> None:
    """read_checkpoint, open_checkpoint, validate_checkpoint and both
    commands refuse ``path`` with ``kind`` matching ``match``."""
    for reader in (read_checkpoint, open_checkpoint, validate_checkpoint):
        error = bounded(lambda reader=reader: reader(path))  # type: ignore[misc]
        assert isinstance(error, kind), (reader.__name__, repr(error))
        assert isinstance(error, GradAccumError)
        assert __import__("re").search(match, str(error)), (match, str(error))
    for command in (["validate"], ["inspect"], ["inspect", "--json"]):
        assert main([*command, str(path)]) == 1


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "gradaccum", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# --------------------------------------------------------------------------- JSON depth


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    ("where", "depth"),
    [("top", 1000), ("metadata", 600), ("config", 500), ("schedule_state", 550)],
)
def test_deep_manifest_refused(ckpt: Path, where: str, depth: int) -> None:
    """CKPT-20: a manifest nesting 500–1,000 levels (at the top, in metadata,
    config or schedule_state) is refused as CheckpointCorruptError naming the
    limit — not RecursionError — by the readers and both commands."""
    text = (ckpt / "manifest.json").read_text()
    if where == "top":
        text = "[" * depth + text + "]" * depth
    elif where == "metadata":
        text = text.replace('"metadata": {', f'"metadata": {{"deep": {nested(depth)}, ', 1)
    elif where == "config":
        text = text.replace('"config": {', f'"config": {{"deep": {nested(depth)}, ', 1)
    else:
        text = text.replace('"schedule_state": {}', f'"schedule_state": {nested(depth)}', 1)
    set_manifest_text(ckpt, text)
    total = depth + (6 if where == "top" else 2)  # plus the levels around the bomb
    refused(ckpt, rf"nest {total} levels deep, more than the {MAX_JSON_DEPTH} levels")


def test_depth_limit_is_exact(ckpt: Path) -> None:
    """CKPT-20: metadata nesting to exactly MAX_JSON_DEPTH levels reads; one more is refused."""
    text = (ckpt / "manifest.json").read_text()
    # the value under metadata["x"] starts below two levels (manifest, metadata)
    ok = MAX_JSON_DEPTH - 2
    set_manifest_text(ckpt, text.replace('"metadata": {', f'"metadata": {{"x": {nested(ok)}, ', 1))
    assert read_checkpoint(ckpt).metadata["x"]["a"]
    set_manifest_text(
        ckpt, text.replace('"metadata": {', f'"metadata": {{"x": {nested(ok + 1)}, ', 1)
    )
    refused(ckpt, "more than the 64 levels")


def test_deep_safetensors_header_refused(ckpt: Path) -> None:
    """CKPT-6, CKPT-20: a safetensors header 1,200 levels deep is refused by
    the public read_safetensors_header and by the reader (manifest resealed
    so that the header check is reached)."""
    header = ('{"x": ' + "[" * 1200 + "]" * 1200 + "}").encode()
    blob = struct.pack("<Q", len(header)) + header
    with pytest.raises(CheckpointCorruptError, match="nest 1201 levels deep"):
        read_safetensors_header(blob)
    (ckpt / "gradients.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointCorruptError, match="nest 1201 levels deep"):
        read_safetensors_header(ckpt / "gradients.safetensors")
    rehash_file(ckpt, "gradients")
    refused(ckpt, "nest 1201 levels deep")


def test_deep_values_refused_by_writer(tmp_path: Path) -> None:
    """CKPT-14, CKPT-20: a writer refuses metadata readers would refuse —
    too deep, or containing itself — with UsageError, writing nothing."""
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    for metadata in ({"optimizer": deep}, {"optimizer": cyclic}, {"scaler": {"n": 10**30}}):
        with pytest.raises(UsageError, match=r"levels deep|outside \[-2\*\*63"):
            write_checkpoint(
                tmp_path / "c", state=STATE, config=CONFIG, files={}, producer=PRODUCER,
                metadata=metadata,
            )  # fmt: skip
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('"created_unix": ', '"created_unix": 1' + "0" * 400 + ', "x": ', r"integer 1000.*outside"),
        ('"lr": 0.01', '"lr": 1e400', r"the number 1e400 is too large"),
        ('"lr": 0.01', '"lr": -1e400', r"the number -1e400 is too large"),
        ('"lr": 0.01', '"lr": 99999999999999999999999', r"integer 9999.*outside"),
        ('"lr": 0.01', '"lr": Infinity', r"Infinity is not valid JSON"),
        ('"lr": 0.01', '"lr": NaN', r"NaN is not valid JSON"),
        ('"lr": 0.01', '"lr": "\\ud800"', r"lone surrogate"),
    ],
    ids=["int-10e400", "1e400", "-1e400", "int-23-digits", "Infinity", "NaN", "surrogate"],
)
def test_out_of_range_numbers_refused(ckpt: Path, old: str, new: str, match: str) -> None:
    """CKPT-2, CKPT-20: integers outside int64/uint64, numbers that overflow
    a float, non-finite constants and lone surrogates are refused — never
    read as inf, never OverflowError."""
    text = (ckpt / "manifest.json").read_text()
    assert old in text
    set_manifest_text(ckpt, text.replace(old, new, 1))
    refused(ckpt, match)


def test_created_unix_1e300(ckpt: Path) -> None:
    """CKPT-2: created_unix beyond year 9999 fails the schema (maximum
    253402300799); inspect never crashes on it."""
    text = (ckpt / "manifest.json").read_text()
    doc = json.loads(text)
    doc["created_unix"] = 1e300
    set_manifest_text(ckpt, json.dumps(doc))
    refused(ckpt, r"\$\.created_unix: expected a number <= 253402300799, got 1e\+300")


def test_finite_large_metadata_round_trips(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CKPT-20: a large but finite number is accepted and printed as itself."""
    doc = json.loads((ckpt / "manifest.json").read_text())
    doc["metadata"]["optimizer"]["param_groups"][0]["lr"] = 1e300
    set_manifest_text(ckpt, json.dumps(doc))
    assert read_checkpoint(ckpt).metadata["optimizer"]["param_groups"][0]["lr"] == 1e300
    assert main(["inspect", "--json", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["metadata"]["optimizer"]["param_groups"][0]["lr"] == 1e300
    assert "Infinity" not in out


# --------------------------------------------------------------------------- header types


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
        {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]},
        {"dtype": None, "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [[0], 4]},
        {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]},
    ],
)
def test_header_entry_of_wrong_types(entry: dict[str, Any]) -> None:
    """CKPT-6, CKPT-20: a header whose dtype is a list (or object, null), or whose
    shape or offsets hold lists or huge numbers, raises CheckpointCorruptError
    from the public read_safetensors_header — not TypeError."""
    header = json.dumps({"w": entry}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\x00" * 4
    with pytest.raises(CheckpointCorruptError, match=r"tensor 'w'|header is not valid JSON"):
        read_safetensors_header(blob)


# --------------------------------------------------------------------------- file-system tricks


def test_fifo_tensor_file_refused_without_blocking(ckpt: Path) -> None:
    """CKPT-20: a tensor file that is a FIFO is refused (naming it) at once,
    never opened for a blocking read."""
    f = ckpt / "gradients.safetensors"
    f.unlink()
    os.mkfifo(f)
    refused(ckpt, r"'gradients.safetensors' is a FIFO \(named pipe\), not a regular file")


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sha256"])
def test_fifo_manifest_refused_without_blocking(ckpt: Path, name: str) -> None:
    """CKPT-20: a manifest (or its checksum file) that is a FIFO is refused at once."""
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    refused(ckpt, rf"'{name}' is a FIFO")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_symlink_to_device_refused(ckpt: Path, device: str) -> None:
    """CKPT-20: a tensor file linked to an endless device is refused without
    reading from it (it is a link, and links are not followed)."""
    f = ckpt / "gradients.safetensors"
    f.unlink()
    f.symlink_to(device)
    refused(ckpt, r"'gradients.safetensors' is a symbolic link, not a regular file")


def test_symlink_outside_directory_refused(ckpt: Path, tmp_path: Path) -> None:
    """CKPT-20: a tensor file or manifest linked to an identical file outside
    the directory is refused although its bytes would verify."""
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / "gradients.safetensors", outside)
    (ckpt / "gradients.safetensors").symlink_to(outside)
    refused(ckpt, r"'gradients.safetensors' is a symbolic link")
    (ckpt / "gradients.safetensors").unlink()
    shutil.move(outside, ckpt / "gradients.safetensors")
    assert read_checkpoint(ckpt).roles == ("gradients",)
    shutil.move(ckpt / "manifest.json", tmp_path / "manifest.json")
    (ckpt / "manifest.json").symlink_to(tmp_path / "manifest.json")
    refused(ckpt, r"'manifest.json' is a symbolic link")


def test_device_node_refused(ckpt: Path) -> None:
    """CKPT-20: a character device inside the directory is refused unopened."""
    f = ckpt / "gradients.safetensors"
    f.unlink()
    try:
        os.mknod(f, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here: {exc}")
    refused(ckpt, r"'gradients.safetensors' is a character device, not a regular file")


def test_directory_as_tensor_file_names_the_file(ckpt: Path) -> None:
    """CKPT-17, CKPT-20: a tensor file that is a directory is reported by
    its name, not by a descriptor number."""
    f = ckpt / "gradients.safetensors"
    f.unlink()
    f.mkdir()
    refused(ckpt, r"'gradients.safetensors' is a directory, not a regular file")


def test_never_reads_beyond_declared_size(ckpt: Path) -> None:
    """CKPT-20: a tensor file grown to 1 TiB (sparse) is refused from its
    size alone; a 300 MB manifest from its size alone — neither is read."""
    f = ckpt / "gradients.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(2**40)
    refused(ckpt, r"is 1099511627776 bytes but the manifest records \d+")
    f.write_bytes(encode_safetensors(GRADIENTS))
    assert read_checkpoint(ckpt)
    with open(ckpt / "manifest.json", "r+b") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    refused(ckpt, rf"'manifest.json' is {MAX_MANIFEST_BYTES + 1} bytes, more than the")


# --------------------------------------------------------------------------- manifest protection


def test_mutated_manifest_detected(ckpt: Path) -> None:
    """CKPT-21: changing the learning rate in the manifest (valid JSON, valid
    schema) is detected by manifest.sha256 as CheckpointChecksumError."""
    text = (ckpt / "manifest.json").read_text()
    assert '"lr": 0.01' in text
    (ckpt / "manifest.json").write_text(text.replace('"lr": 0.01', '"lr": 0.02'))
    refused(
        ckpt, r"manifest.json has SHA-256 \w+… but manifest.sha256 records", CheckpointChecksumError
    )


@pytest.mark.parametrize(
    "sidecar",
    [b"", b"abc", b"A" * 64 + b"  manifest.json\n", b"0" * 64 + b"  manifest.json", b"\xff" * 80],
)
def test_malformed_sidecar_refused(ckpt: Path, sidecar: bytes) -> None:
    """CKPT-21: a manifest.sha256 that is not exactly the sha256sum line is refused."""
    (ckpt / "manifest.sha256").write_bytes(sidecar)
    refused(ckpt, r"manifest.sha256 is .* not '<64 lowercase hex digits>  manifest.json")


@pytest.mark.parametrize("version", [3, 2])
def test_deleted_sidecar_of_new_manifest_refused(tmp_path: Path, version: int) -> None:
    """CKPT-21, CKPT-25, CKPT-26: a spec-3.0.0 manifest (format 3), a
    spec-2.0.0 one (format 2) and a spec-1.2.0 one (format 1) without their
    manifest.sha256 are refused."""
    ckpt = write_small(tmp_path / "new", format_version=version)
    (ckpt / "manifest.sha256").unlink()
    refused(
        ckpt,
        rf"says format version {version} \(spec {version}\.0\.0\), whose checkpoints always "
        "have manifest.sha256",
    )
    old = write_small(tmp_path / "format1", format_version=1)
    (old / "manifest.sha256").unlink()
    refused(old, r"says spec 1\.2\.0, whose checkpoints always have manifest.sha256")


@pytest.mark.parametrize("version", [3, 2])
def test_format_2_manifest_cannot_opt_out_of_its_sidecar(tmp_path: Path, version: int) -> None:
    """CKPT-21, CKPT-25, CKPT-26: a format-2 or format-3 manifest edited to
    claim an old spec version (whose checkpoints had no manifest.sha256) and
    stripped of its manifest.sha256 is still refused: every format-2 and
    format-3 checkpoint has one."""
    ckpt = write_small(tmp_path / "new", format_version=version)
    doc = json.loads((ckpt / "manifest.json").read_text())
    doc["spec_version"] = "1.0.0"
    (ckpt / "manifest.json").write_text(json.dumps(doc))
    (ckpt / "manifest.sha256").unlink()
    refused(ckpt, rf"says format version {version} \(spec 1\.0\.0\), whose checkpoints always")


def test_old_checkpoint_without_sidecar_reads_unprotected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CKPT-16, CKPT-21: the frozen 1.0.0 fixture (no manifest.sha256) still
    reads and is reported as unprotected; given a correct sidecar it is
    protected; given a wrong one it is refused."""
    assert not read_checkpoint(FIXTURE).manifest_protected
    assert main(["inspect", str(FIXTURE)]) == 0
    assert "manifest         not protected (no manifest.sha256" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    reseal(copy)
    assert read_checkpoint(copy).manifest_protected
    (copy / "manifest.sha256").write_bytes(manifest_sidecar(b"other"))
    refused(copy, "manifest.sha256 records", CheckpointChecksumError)


def test_new_checkpoint_has_sidecar(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CKPT-21: a writer writes manifest.sha256 in sha256sum format."""
    raw = (ckpt / "manifest.json").read_bytes()
    assert (ckpt / "manifest.sha256").read_bytes() == (
        hashlib.sha256(raw).hexdigest().encode() + b"  manifest.json\n"
    )
    assert read_checkpoint(ckpt).manifest_protected
    assert main(["inspect", str(ckpt)]) == 0
    assert "manifest         protected by manifest.sha256" in capsys.readouterr().out


# --------------------------------------------------------------------------- command line


def test_cli_prints_invalid_never_a_traceback(ckpt: Path) -> None:
    """CKPT-17, CKPT-20: ``python -m gradaccum validate|inspect`` on a
    depth-bomb manifest exits 1 with ``invalid: ...`` and no traceback."""
    text = (ckpt / "manifest.json").read_text()
    set_manifest_text(ckpt, "[" * 5000 + text + "]" * 5000)
    for argv in (["validate"], ["inspect"], ["inspect", "--json"]):
        result = cli(*argv, str(ckpt))
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr.startswith(f"invalid: checkpoint at '{ckpt}': manifest.json is not")
        assert "Traceback" not in result.stderr


def test_inspect_shows_producer_and_resume_needs(tmp_path: Path, capsys: Any) -> None:
    """Issue 11: inspect names the producer's stack and what a resume needs:
    the world size (fixed mid-window, CKPT-18), the normalization, per-rank
    gradient and item files, and which states it restores."""
    state = {**STATE, "items_in_window": 0, "device_items": True}
    items = encode_safetensors({"items": RawTensor("F64", (), struct.pack("<d", 64.0))})
    write_checkpoint(
        tmp_path / "mid",
        state=state,
        config={**CONFIG, "normalization": "items"},
        files={
            "gradients.rank0": encode_safetensors(GRADIENTS),
            "gradients.rank1": encode_safetensors(GRADIENTS),
            "items.rank0": items,
            "items.rank1": items,
            "model": encode_safetensors(GRADIENTS),
        },
        producer=Producer("gradaccum-ddp", "0.3.0"),
        world_size=2,
        metadata={"scheduler": {"class": "StepLR", "state": {}}, "scaler": {"state": {}}},
    )
    assert main(["inspect", str(tmp_path / "mid")]) == 0
    out = capsys.readouterr().out
    for line in [
        "producer         gradaccum-ddp 0.3.0 (stack: ddp)",
        "  world size       exactly 2 (taken mid-window",
        "  normalization    items (must match mid-window)",
        "  in-flight grads  gradients.rank0 (2 tensors), gradients.rank1 (2 tensors)",
        "  device items     2 count(s): items.rank0, items.rank1 (state.device_items = true)",
        "  model state      yes (2 tensors)",
        "  optimizer state  no",
        "  scheduler state  yes (StepLR)",
        "  scaler state     yes",
    ]:
        assert line in out, (line, out)
    boundary = {**STATE, "position": 0, "window_size": 0, "contributing": 0, "items_in_window": 0}
    write_checkpoint(tmp_path / "b", state=boundary, config=CONFIG, files={}, producer=PRODUCER,
                     world_size=8)  # fmt: skip
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "  world size       any (taken at a window boundary; written by 8)" in out
    assert "  in-flight grads  none" in out
    assert "normalization    " not in out.split("counters")[0]


def test_unreadable_path_is_a_checkpoint_error(tmp_path: Path) -> None:
    """CKPT-17: a path that is a FIFO itself is refused, not blocked on."""
    os.mkfifo(tmp_path / "pipe")
    error = bounded(lambda: read_checkpoint(tmp_path / "pipe"))
    assert isinstance(error, CheckpointError)


def test_read_safetensors_header_path_refuses_non_regular(tmp_path: Path) -> None:
    """CKPT-20: the public header reader, given a path, refuses a FIFO or a
    directory at once (naming what it is) instead of blocking or crashing."""
    os.mkfifo(tmp_path / "pipe.safetensors")
    error = bounded(lambda: read_safetensors_header(tmp_path / "pipe.safetensors"))
    assert isinstance(error, CheckpointCorruptError)
    assert "it is a FIFO (named pipe), not a regular file" in str(error)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointCorruptError, match="it is a directory, not a regular file"):
        read_safetensors_header(tmp_path / "dir.safetensors")
    with pytest.raises(CheckpointCorruptError, match="cannot open it"):
        read_safetensors_header(tmp_path / "missing.safetensors")


def test_linked_set_aside_copy_is_not_followed(ckpt: Path, tmp_path: Path) -> None:
    """CKPT-13, CKPT-20: a `.<name>.old-*` sibling that is a symbolic link to
    a valid checkpoint is not read as a recovered copy."""
    elsewhere = tmp_path / "elsewhere"
    shutil.move(ckpt, elsewhere)
    (tmp_path / ".ckpt.old-0123").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*the path does not exist"):
        read_checkpoint(ckpt)
