"""Writing, reading and refusing checkpoints (spec promises CKPT-1 … CKPT-17)."""

from __future__ import annotations

import binascii
import hashlib
import itertools
import json
import os
import random
import shutil
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from gradaccum.checkpoint import (
    FORMAT_VERSION,
    SPEC_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    Manifest,
    Producer,
    RawTensor,
    atomic,
    encode_safetensors,
    read_checkpoint,
    read_safetensors_header,
    validate_checkpoint,
    write_checkpoint,
)
from gradaccum.checkpoint.format import manifest_sidecar
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    UsageError,
)

PRODUCER = Producer("gradaccum-test", "9.9.9")
CONFIG: dict[str, Any] = {
    "schedule": {"kind": "fixed", "steps": 4},
    "normalization": "mean",
    "partial_window": "step",
    "non_finite": "skip",
}


def make_state(**changes: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "version": 1,
        "epoch": 1,
        "position": 3,
        "window_size": 4,
        "contributing": 2,
        "items_in_window": 96,
        "items_total": 1024,
        "micro_steps": 35,
        "optimizer_steps": 8,
        "skipped_steps": 0,
        "windows": 8,
        "dropped_microbatches": 1,
        "dropped_windows": 0,
        "synced_in_window": False,
        "schedule_state": {},
    }
    state.update(changes)
    return state


def f32(shape: tuple[int, ...], start: float = 0.0) -> RawTensor:
    n = 1
    for d in shape:
        n *= d
    return RawTensor("F32", shape, struct.pack(f"<{n}f", *(start + i for i in range(n))))


GRADIENTS = {"fc.weight": f32((2, 3), 0.5), "fc.bias": f32((3,), -1.0)}
OPTIMIZER = {
    "state.fc.weight.exp_avg": f32((2, 3)),
    "state.fc.weight.step": RawTensor("I64", (), struct.pack("<q", 8)),
}


def files() -> dict[str, bytes]:
    return {
        "gradients": encode_safetensors(GRADIENTS),
        "gradients.rank1": encode_safetensors({"fc.weight": f32((2, 3), 9.0)}),
        "optimizer": encode_safetensors(OPTIMIZER, {"kind": "adam"}),
    }


def write(path: Path, **changes: Any) -> Manifest:
    kwargs: dict[str, Any] = {
        "state": make_state(),
        "config": CONFIG,
        "files": files(),
        "producer": PRODUCER,
        "world_size": 2,
        "metadata": {"optimizer": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]}},
    }
    kwargs.update(changes)
    return write_checkpoint(path, **kwargs)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def reseal(ckpt: Path) -> None:
    """Rewrite ``manifest.sha256`` for the manifest as it now is, so that an
    edit on purpose reaches the checks behind the manifest checksum (CKPT-21)."""
    raw = (ckpt / "manifest.json").read_bytes()
    (ckpt / "manifest.sha256").write_bytes(manifest_sidecar(raw))


def edit_manifest(ckpt: Path, edit: Any) -> None:
    path = ckpt / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    reseal(ckpt)


def version_of(ckpt: Path) -> int:
    version: int = json.loads((ckpt / "manifest.json").read_text())["format_version"]
    return version


def recorded_digest(blob: bytes, version: int) -> str:
    """What the manifest records for a file of these bytes: the SHA-256 of
    all of them (format 1, CKPT-7) or of the length prefix and header
    (format 2, CKPT-25)."""
    if version == 1:
        return hashlib.sha256(blob).hexdigest()
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[: 8 + min(n, 100_000_000)]).hexdigest()


def tensor_digest(data: bytes, version: int) -> str:
    """A tensor's recorded digest: SHA-256 (formats 1 and 2, CKPT-7) or
    CRC-32 as zlib computes it (format 3, CKPT-26)."""
    if version == 3:
        return f"{zlib.crc32(data):08x}"
    return hashlib.sha256(data).hexdigest()


def rehash(ckpt: Path, role: str) -> None:
    """Make the manifest's size and file (format 1) or header (format 2)
    SHA-256 match a file edited on purpose, so that the checks behind them
    are reached."""
    blob = (ckpt / f"{role}.safetensors").read_bytes()
    version = version_of(ckpt)

    def edit(doc: dict[str, Any]) -> None:
        doc["files"][role]["size"] = len(blob)
        key = "sha256" if version == 1 else "header_sha256"
        doc["files"][role][key] = recorded_digest(blob, version)

    edit_manifest(ckpt, edit)


@pytest.fixture(params=[3, 2, 1], ids=["v3", "v2", "v1"])
def ckpt(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A checkpoint of each format version this release writes: every test
    of a damaged checkpoint runs against both readers."""
    path = tmp_path / "ckpt"
    write(path, format_version=request.param)
    return path


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("version", [3, 2, 1])
def test_round_trip(tmp_path: Path, version: int) -> None:
    """CKPT-1, CKPT-7, CKPT-9, CKPT-11, CKPT-25, CKPT-26: what is written is
    read back exactly, and every recorded digest equals hashlib's or zlib's —
    format 3 (the default) records the header's SHA-256 and the tensors'
    CRC-32, format 2 (on request) the header's and the tensors' SHA-256,
    format 1 (on request) the whole file's and the tensors' SHA-256."""
    path = tmp_path / "ckpt"
    before = time.time()
    written = write(path, **({} if version == 3 else {"format_version": version}))
    after = time.time()
    ck = read_checkpoint(path)
    assert sorted(os.listdir(path)) == [
        "gradients.rank1.safetensors",
        "gradients.safetensors",
        "manifest.json",
        "manifest.sha256",
        "optimizer.safetensors",
    ]
    assert ck.manifest == written
    assert dict(ck.state) == make_state()
    assert dict(ck.config) == CONFIG
    assert ck.metadata == {"optimizer": {"param_groups": [{"lr": 1e-3, "betas": [0.9, 0.999]}]}}
    assert ck.producer == PRODUCER
    assert ck.world_size == 2
    assert ck.roles == ("gradients", "gradients.rank1", "optimizer")
    assert FORMAT_VERSION == 3
    assert SPEC_VERSION == "3.0.0"
    assert ck.manifest.format_version == version
    assert ck.manifest.spec_version == {1: "1.2.0", 2: "2.0.0", 3: "3.0.0"}[version]
    assert before <= ck.manifest.created_unix <= after
    assert ck.path == path
    assert ck.source == path
    for role, blob in files().items():
        assert ck.file_bytes(role) == blob
        entry = ck.manifest.files[role]
        assert entry.path == f"{role}.safetensors"
        assert entry.size == len(blob)
        header = read_safetensors_header(blob)
        if version == 1:
            assert entry.sha256 == hashlib.sha256(blob).hexdigest()
            assert entry.header_sha256 is None
        else:
            assert entry.sha256 is None
            assert entry.header_sha256 == hashlib.sha256(blob[: header.data_start]).hexdigest()
        assert entry.format_version == version
        assert entry.tensor_digest == ("crc32" if version == 3 else "sha256")
        for name, tensor in entry.tensors.items():
            info = header.tensors[name]
            data = blob[header.data_start + info.begin : header.data_start + info.end]
            assert tensor.digest == tensor_digest(data, version)
            assert len(tensor.digest) == (8 if version == 3 else 64)
            assert (tensor.dtype, tensor.shape) == (info.dtype, info.shape)
    assert ck.tensors("gradients") == GRADIENTS
    assert ck.tensors("optimizer") == OPTIMIZER
    assert validate_checkpoint(path) == written
    assert Manifest.from_json_dict(written.to_json_dict()) == written
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk == written.to_json_dict()
    assert list(on_disk) == [
        "format", "format_version", "spec_version", "producer", "created_unix",
        "world_size", "state", "config", "files", "metadata",
    ]  # fmt: skip


def test_boundary_checkpoint_without_files(tmp_path: Path) -> None:
    """CKPT-1: a checkpoint at a window boundary may hold no tensor file."""
    state = make_state(position=0, window_size=0, contributing=0, items_in_window=0)
    write(tmp_path / "c", files={}, state=state, metadata=None)
    ck = read_checkpoint(tmp_path / "c")
    assert ck.roles == ()
    assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json", "manifest.sha256"]
    assert ck.state["position"] == 0
    assert dict(ck.metadata) == {}


ADAPTIVE_CONFIG: dict[str, Any] = {
    "schedule": {"kind": "adaptive", "target": 8, "micro_batch": 2},
    "normalization": "items",
    "partial_window": "step",
    "non_finite": "skip",
}


def test_manifest_is_independent_of_later_mutation(tmp_path: Path) -> None:
    state = make_state(schedule_state={"micro_batch": 2, "clean_windows": 0, "ooms": 0})
    manifest = write(tmp_path / "c", state=state, config=ADAPTIVE_CONFIG)
    state["schedule_state"]["ooms"] = 99
    assert manifest.state["schedule_state"] == {"micro_batch": 2, "clean_windows": 0, "ooms": 0}
    with pytest.raises(TypeError):
        manifest.state["epoch"] = 5  # type: ignore[index]


def test_file_bytes_of_unknown_role(ckpt: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"has no 'model' file; it holds 'gradients'"):
        read_checkpoint(ckpt).file_bytes("model")


def test_overwrite_replaces_everything(ckpt: Path) -> None:
    """CKPT-12: a second write replaces the whole directory and leaves no sibling."""
    write(ckpt, files={"model": encode_safetensors({"w": f32((1,))})}, state=make_state(epoch=7))
    ck = read_checkpoint(ckpt)
    assert ck.roles == ("model",)
    assert ck.state["epoch"] == 7
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]


def test_optional_device_items(tmp_path: Path) -> None:
    """CKPT-9: ``device_items`` is optional; present, it round-trips."""
    write(tmp_path / "c", state=make_state(device_items=True))
    assert read_checkpoint(tmp_path / "c").state["device_items"] is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_is_used_on_linux(ckpt: Path) -> None:
    """CKPT-12: on Linux the old directory is swapped out atomically."""
    assert atomic.exchange_supported()
    inode = os.stat(ckpt).st_ino
    write(ckpt, state=make_state(epoch=3))
    assert os.stat(ckpt).st_ino != inode
    assert read_checkpoint(ckpt).state["epoch"] == 3


def test_fallback_without_exchange(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CKPT-12: without renameat2 the rename-aside fallback replaces the
    checkpoint and leaves no set-aside copy."""
    monkeypatch.setattr(atomic, "_USE_EXCHANGE", False)
    assert not atomic.exchange_supported()
    write(ckpt, state=make_state(epoch=5))
    assert read_checkpoint(ckpt).state["epoch"] == 5
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]


def test_recovers_set_aside_copy(ckpt: Path) -> None:
    """CKPT-13: a fallback writer killed between its renames leaves no
    ``path`` but a complete ``.old-`` copy, which readers read; leftover
    temporaries are ignored, and the next write cleans everything up."""
    old = ckpt.parent / ".ckpt.old-0123abcd"
    os.rename(ckpt, old)
    junk = ckpt.parent / ".ckpt.tmp-deadbeef"
    junk.mkdir()
    (junk / "manifest.json").write_text("{ half written")
    ck = read_checkpoint(ckpt)
    assert ck.source == old
    assert ck.path == ckpt
    assert ck.state == make_state()
    write(ckpt, state=make_state(epoch=9))
    assert read_checkpoint(ckpt).state["epoch"] == 9
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]


def test_incomplete_set_aside_copy_is_not_read(ckpt: Path) -> None:
    """CKPT-13: a set-aside copy that does not verify is refused, not returned."""
    old = ckpt.parent / ".ckpt.old-0123abcd"
    os.rename(ckpt, old)
    (old / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"'optimizer\.safetensors'"):
        read_checkpoint(ckpt)


def test_stale_temporary_is_ignored_then_cleaned(ckpt: Path) -> None:
    """CKPT-13: readers ignore a killed writer's temporary; the next write removes it."""
    junk = ckpt.parent / ".ckpt.tmp-0000"
    junk.mkdir()
    (junk / "gradients.safetensors").write_bytes(b"partial")
    assert read_checkpoint(ckpt).state == make_state()
    write(ckpt)
    assert not junk.exists()


def test_concurrent_reader_sees_complete_checkpoints(tmp_path: Path) -> None:
    """CKPT-12: a reader racing a writer always gets one complete checkpoint:
    the state and the tensor bytes belong to the same write."""
    path = tmp_path / "c"
    write(path, state=make_state(micro_steps=0, dropped_microbatches=0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(1, 40):
                blob = encode_safetensors({"g": RawTensor("I64", (1,), struct.pack("<q", i))})
                write(
                    path,
                    state=make_state(micro_steps=i, dropped_microbatches=0),
                    files={"gradients": blob},
                )
                time.sleep(0.001)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not stop.is_set():
        ck = read_checkpoint(path)
        step = ck.state["micro_steps"]
        if step:
            assert ck.tensors("gradients")["g"].data == struct.pack("<q", step)
        reads += 1
    thread.join()
    assert not errors
    assert reads > 0
    assert read_checkpoint(path).state["micro_steps"] == 39


# ---------------------------------------------------------------- refusals on read


def test_truncated_file(ckpt: Path) -> None:
    """CKPT-7, CKPT-17: a truncated file is refused by its size; the message
    names the checkpoint, both sizes and the fix."""
    f = ckpt / "gradients.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(CheckpointCorruptError) as info:
        read_checkpoint(ckpt)
    assert not isinstance(info.value, CheckpointChecksumError)
    msg = str(info.value)
    assert f"'gradients.safetensors' is {size - 5} bytes but the manifest records {size}" in msg
    assert msg.startswith(f"checkpoint at '{ckpt}': ")
    assert "truncated" in msg


@pytest.mark.parametrize("offset", [-1, 12], ids=["data-byte", "header-byte"])
def test_flipped_byte(ckpt: Path, offset: int) -> None:
    """CKPT-7, CKPT-17, CKPT-25, CKPT-26: one flipped byte, in the data or in
    the header, fails a digest — format 1: the file's SHA-256; formats 2 and
    3: the header's SHA-256 or the last tensor's (SHA-256 in format 2,
    CRC-32 in format 3) —; the message names both digests and the fix."""
    f = ckpt / "gradients.safetensors"
    blob = bytearray(f.read_bytes())
    header = read_safetensors_header(bytes(blob))
    last = max(header.tensors, key=lambda n: header.tensors[n].end)
    span = slice(header.data_start + header.tensors[last].begin, len(blob))
    version = version_of(ckpt)
    if version == 1 or offset == 12:
        recorded = recorded_digest(bytes(blob), version)
    else:
        recorded = tensor_digest(bytes(blob[span]), version)
    blob[offset] ^= 0x01
    f.write_bytes(blob)
    algorithm = "SHA-256"
    if version == 1:
        what, actual = "file 'gradients.safetensors'", hashlib.sha256(blob).hexdigest()
    elif offset == 12:
        what = "the header of file 'gradients.safetensors'"
        actual = recorded_digest(bytes(blob), 2)
    else:
        what = f"tensor '{last}' in 'gradients.safetensors'"
        actual = tensor_digest(bytes(blob[span]), version)
        algorithm = "CRC-32" if version == 3 else "SHA-256"
    assert actual != recorded
    for read in (read_checkpoint, validate_checkpoint):
        with pytest.raises(CheckpointChecksumError) as info:
            read(ckpt)
        msg = str(info.value)
        assert f"{what} has {algorithm} {actual[:16]}" in msg
        assert f"but the manifest records {recorded[:16]}" in msg
        assert "restore it from a copy or take a new checkpoint" in msg


def test_every_byte_is_covered(ckpt: Path) -> None:
    """CKPT-7, CKPT-25, CKPT-26: flipping any single byte of a tensor file —
    length prefix, header, padding or data — is refused with
    CheckpointChecksumError by every reader, in every format version; in
    formats 2 and 3 the header digest and the tensors' digests cover the file
    exactly once between them (their spans tile it)."""
    f = ckpt / "optimizer.safetensors"
    original = f.read_bytes()
    header = read_safetensors_header(original)
    start = header.data_start
    spans = sorted(
        [(0, start)] + [(start + t.begin, start + t.end) for t in header.tensors.values()]
    )
    assert spans[0][0] == 0 and spans[-1][1] == len(original)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    for offset in range(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x20
        f.write_bytes(damaged)
        for read in (read_checkpoint, validate_checkpoint):
            with pytest.raises(CheckpointChecksumError):
                read(ckpt)
    f.write_bytes(original)
    assert read_checkpoint(ckpt).tensors("optimizer") == OPTIMIZER


def test_crc32_is_zlibs_and_every_short_burst_is_caught(tmp_path: Path) -> None:
    """CKPT-26: a format-3 tensor's digest is its CRC-32/ISO-HDLC as 8
    lowercase hex digits — the check value of ``123456789`` is ``cbf43926``,
    of no bytes ``00000000``, of other data binascii's — and every error
    burst of at most 32 bits in a tensor's data (300 seeded bursts, every
    length 1..32) is refused with CheckpointChecksumError naming the tensor,
    by the in-memory and the streaming reader."""
    rng = random.Random(26)
    data = rng.randbytes(4096)
    tensors = {
        "ascii": RawTensor("U8", (9,), b"123456789"),
        "empty": RawTensor("U8", (0,), b""),
        "data": RawTensor("U8", (4096,), data),
    }
    path = tmp_path / "crc"
    manifest = write_checkpoint(
        path, state=make_state(), config=CONFIG, files={"check": encode_safetensors(tensors)},
        producer=PRODUCER,
    )  # fmt: skip
    digests = {n: t.digest for n, t in manifest.files["check"].tensors.items()}
    assert digests == {
        "ascii": "cbf43926",
        "empty": "00000000",
        "data": f"{binascii.crc32(data) & 0xFFFFFFFF:08x}",
    }
    f = path / "check.safetensors"
    original = f.read_bytes()
    header = read_safetensors_header(original)
    begin = header.data_start + header.tensors["data"].begin
    for i in range(300):
        length = 1 + i % 32
        pattern = 1 | (1 << (length - 1)) | rng.getrandbits(length)
        shift = rng.randrange(4096 * 8 - length + 1)
        value = int.from_bytes(data, "little") ^ (pattern << shift)
        damaged = bytearray(original)
        damaged[begin : begin + 4096] = value.to_bytes(4096, "little")
        assert damaged != bytearray(original)
        f.write_bytes(damaged)
        check = (read_checkpoint, validate_checkpoint)[i % 2]
        with pytest.raises(CheckpointChecksumError, match=r"tensor 'data' in 'check.safetensors'"):
            check(path)
    f.write_bytes(original)
    assert read_checkpoint(path).tensors("check") == tensors


def test_damaged_header_of_a_large_file_is_a_checksum_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CKPT-7, CKPT-25, CKPT-26: a format-2 or format-3 file whose header no
    longer parses is reported as a checksum mismatch whatever the file's size (its header
    digest reads at most 8 + 100 MB); format 1 digests the whole file on
    that path only up to a size limit (here patched to 100 bytes), beyond
    it the header's defect itself is reported."""
    import gradaccum.checkpoint.store as store

    monkeypatch.setattr(store, "_DIGEST_ON_ERROR_LIMIT", 100)
    for version in (3, 2, 1):
        path = tmp_path / f"v{version}"
        write(path, format_version=version)
        f = path / "optimizer.safetensors"
        blob = bytearray(f.read_bytes())
        assert len(blob) > 100
        blob[9] = ord("[")  # the header's second byte, '"', becomes '[': no longer JSON
        f.write_bytes(blob)
        for read in (read_checkpoint, validate_checkpoint):
            with pytest.raises(CheckpointCorruptError) as info:
                read(path)
            assert isinstance(info.value, CheckpointChecksumError) == (version >= 2), version
            if version >= 2:
                assert "the header of file 'optimizer.safetensors'" in str(info.value)


def test_flipped_data_byte_with_consistent_file_hash(ckpt: Path) -> None:
    """CKPT-7: a tensor whose bytes differ from its recorded SHA-256 is
    refused even when the file-level fields were updated to match."""
    f = ckpt / "gradients.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0x80
    f.write_bytes(blob)
    rehash(ckpt, "gradients")
    with pytest.raises(CheckpointChecksumError, match=r"tensor '\S+' in 'gradients.safetensors'"):
        read_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("length", "match"),
    [
        (10**12, r"header length field says 1000000000000 bytes, more than the 100000000-byte"),
        (5000, r"header length field says 5000 bytes but only \d+ bytes follow it"),
    ],
    ids=["over-bound", "beyond-file"],
)
def test_absurd_header_length(ckpt: Path, length: int, match: str) -> None:
    """CKPT-6: an absurd header length is refused (here with the manifest's
    size and checksum updated, so the header check itself is reached)."""
    f = ckpt / "gradients.safetensors"
    blob = f.read_bytes()
    f.write_bytes(struct.pack("<Q", length) + blob[8:])
    with pytest.raises(CheckpointChecksumError):
        read_checkpoint(ckpt)
    rehash(ckpt, "gradients")
    with pytest.raises(CheckpointCorruptError, match=match):
        read_checkpoint(ckpt)


def test_malformed_header_with_consistent_hash(ckpt: Path) -> None:
    """CKPT-6: a header edited into an invalid one is refused with its value."""
    f = ckpt / "gradients.safetensors"
    f.write_bytes(f.read_bytes().replace(b'"F32"', b'"F31"', 1))
    rehash(ckpt, "gradients")
    with pytest.raises(CheckpointCorruptError, match=r"has dtype 'F31'"):
        read_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (
            4,
            CheckpointVersionError,
            r"format version 4 is not supported; this release reads "
            r"format version\(s\) 1, 2, 3; upgrade gradaccum",
        ),
        (0, CheckpointVersionError, r"format version 0 is not supported.*upgrade gradaccum"),
        ("1", CheckpointCorruptError, r"'format_version' is '1' \(str\), expected an integer"),
        (1.0, CheckpointCorruptError, r"'format_version' is 1.0 \(float\)"),
        (None, CheckpointCorruptError, r"'format_version' is None"),
    ],
)
def test_wrong_format_version(ckpt: Path, value: Any, error: type[Exception], match: str) -> None:
    """CKPT-3: an unsupported version is a CheckpointVersionError naming the
    version seen and those supported; a malformed one is corrupt."""
    edit_manifest(ckpt, lambda d: d.update(format_version=value))
    with pytest.raises(error, match=match):
        read_checkpoint(ckpt)
    assert 1 in SUPPORTED_FORMAT_VERSIONS


def test_newer_version_reported_before_schema(ckpt: Path) -> None:
    """CKPT-3: a newer manifest with new keys is reported as newer, not invalid."""
    edit_manifest(ckpt, lambda d: d.update(format_version=4, new_key={"x": 1}))
    with pytest.raises(CheckpointVersionError, match="format version 4"):
        read_checkpoint(ckpt)


def test_missing_format_version(ckpt: Path) -> None:
    edit_manifest(ckpt, lambda d: d.pop("format_version"))
    with pytest.raises(CheckpointCorruptError, match="has no 'format_version'"):
        read_checkpoint(ckpt)


def test_not_a_gradaccum_manifest(ckpt: Path) -> None:
    edit_manifest(ckpt, lambda d: d.update(format="other-thing"))
    with pytest.raises(CheckpointCorruptError, match=r"'format' is 'other-thing'"):
        read_checkpoint(ckpt)


def test_missing_tensor_file(ckpt: Path) -> None:
    """CKPT-8: a listed file that is missing is refused, naming it."""
    (ckpt / "gradients.rank1.safetensors").unlink()
    with pytest.raises(
        CheckpointCorruptError,
        match=r"lists 'gradients.rank1.safetensors' but the directory does not hold it",
    ):
        read_checkpoint(ckpt)


def test_extra_tensor_file(ckpt: Path) -> None:
    """CKPT-8: an unlisted ``.safetensors`` file is refused, naming it;
    other files are ignored (CKPT-1)."""
    (ckpt / "notes.txt").write_text("ignored")
    assert read_checkpoint(ckpt).roles == ("gradients", "gradients.rank1", "optimizer")
    shutil.copy(ckpt / "gradients.safetensors", ckpt / "model.safetensors")
    with pytest.raises(
        CheckpointCorruptError, match=r"holds 'model.safetensors', which the manifest does not list"
    ):
        read_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{ not json", r"manifest.json is not valid JSON"),
        (b"\xff\xfe", r"manifest.json is not valid JSON"),
        (b"[1, 2]", r"the manifest is a JSON list, not an object"),
        (b'{"format": "gradaccum-checkpoint", "format": "x"}', r"duplicate key 'format'"),
    ],
)
def test_manifest_not_json(ckpt: Path, raw: bytes, match: str) -> None:
    """CKPT-2: a manifest that is not one strict JSON object is refused."""
    (ckpt / "manifest.json").write_bytes(raw)
    reseal(ckpt)
    with pytest.raises(CheckpointCorruptError, match=match):
        read_checkpoint(ckpt)


def test_manifest_with_nan(ckpt: Path) -> None:
    """CKPT-2: ``NaN`` is not JSON."""
    text = (ckpt / "manifest.json").read_text()
    (ckpt / "manifest.json").write_text(
        text.replace('"created_unix": ', '"created_unix": NaN, "x":')
    )
    reseal(ckpt)
    with pytest.raises(CheckpointCorruptError, match="NaN is not valid JSON"):
        read_checkpoint(ckpt)


def test_missing_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"has no manifest\.json"):
        read_checkpoint(ckpt)


def _state_edit(**changes: Any) -> Any:
    return lambda d: d["state"].update(changes)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_state_edit(epoch="1"), r"at \$\.state\.epoch: expected integer, got string \"1\""),
        (_state_edit(synced_in_window=1), r"at \$\.state\.synced_in_window: expected boolean"),
        (lambda d: d.update(world_size=True), r"at \$\.world_size: expected integer"),
        (lambda d: d.update(surprise=1), r"at \$: unexpected key 'surprise'"),
        (_state_edit(phase="idle"), r"at \$\.state: unexpected key 'phase'"),
        (lambda d: d["state"].pop("windows"), r"at \$\.state: missing required key 'windows'"),
        (_state_edit(micro_steps=-3), r"at \$\.state\.micro_steps: expected a number >= 0, got -3"),
        (
            _state_edit(position=5),
            r"\$\.state is invalid: accumulation state position=5 with window_size=4 is "
            r"impossible",
        ),
        (
            _state_edit(contributing=4, position=3),
            r"\$\.state is invalid: accumulation state contributing=4 exceeds position=3",
        ),
        (
            _state_edit(epoch=1.0),
            r"\$\.state is invalid: accumulation state epoch=1\.0 must be an integer >= 0",
        ),
        (
            lambda d: d["files"]["gradients"].update(path="optimizer.safetensors"),
            r"files\['gradients'\]\.path is 'optimizer.safetensors', "
            r"expected 'gradients.safetensors'",
        ),
        (
            lambda d: d["files"]["gradients"]["tensors"]["fc.bias"].update(dtype="F16"),
            r"tensor 'fc.bias' in 'gradients.safetensors' is F32 \[3\] "
            r"but the manifest records F16",
        ),
        (
            lambda d: d["files"]["gradients"]["tensors"].pop("fc.bias"),
            r"holds tensors the manifest does not list \(\['fc.bias'\]\)",
        ),
        (lambda d: d["config"].pop("schedule"), r"at \$\.config: missing required key 'schedule'"),
        (
            lambda d: d["files"]["gradients"].update(
                {k: "A" * 64 for k in ("sha256", "header_sha256") if k in d["files"]["gradients"]}
            ),
            r"at \$\.files\.gradients\.(header_)?sha256: \"A{64}\" does not match",
        ),
        (lambda d: d["metadata"].update({"Bad Role": 1}), r"at \$\.metadata: unexpected key"),
    ],
    ids=[
        "counter-string",
        "bool-int",
        "world-size-bool",
        "unknown-top-key",
        "unknown-state-key",
        "missing-state-key",
        "negative-counter",
        "position-gt-window",
        "contributing-gt-position",
        "float-counter",
        "wrong-path",
        "index-dtype",
        "index-missing-tensor",
        "config-key",
        "sha-uppercase",
        "metadata-role",
    ],
)
def test_manifest_failing_validation(ckpt: Path, edit: Any, match: str) -> None:
    """CKPT-2, CKPT-4, CKPT-5, CKPT-9, CKPT-10: a manifest that fails the
    schema or the rules beyond it is refused, naming the JSON path and value."""
    edit_manifest(ckpt, edit)
    with pytest.raises(CheckpointCorruptError, match=match) as info:
        read_checkpoint(ckpt)
    assert str(info.value).startswith(f"checkpoint at '{ckpt}': ")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"no checkpoint at '.*nope': the path does not exist"
    ):
        read_checkpoint(tmp_path / "nope")


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointCorruptError, match="is a file, not a checkpoint directory"):
        read_checkpoint(tmp_path / "f")


def test_reading_never_unpickles(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CKPT-15: reading and verifying a checkpoint never touches pickle."""
    import pickle

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used while reading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    ck = read_checkpoint(ckpt)
    assert ck.tensors("gradients") == GRADIENTS


def test_frozen_and_read_only_records(ckpt: Path) -> None:
    manifest = read_checkpoint(ckpt).manifest
    with pytest.raises(AttributeError):
        manifest.world_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        manifest.files["x"] = manifest.files["gradients"]  # type: ignore[index]


# ---------------------------------------------------------------- refusals on write


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"files": {"Gradients": encode_safetensors({})}}, r"role 'Gradients' does not match"),
        ({"files": {"grad-ients": encode_safetensors({})}}, r"role 'grad-ients' does not match"),
        ({"files": {"": encode_safetensors({})}}, r"role '' does not match"),
        ({"files": {"gradients": b"not safetensors"}}, r"files\['gradients'\]: header length"),
        (
            {"files": {"gradients": encode_safetensors(GRADIENTS)[:-1]}},
            r"files\['gradients'\]: .* but the file holds only",
        ),
        ({"files": {"gradients": "text"}}, r"files\['gradients'\] is a str; pass the bytes"),
        (
            {"state": make_state(schedule_state={"s": {1, 2}})},
            r"state\['schedule_state'\]\['s'\] is a set",
        ),
        ({"state": make_state(schedule_state={1: "a"})}, r"has the key 1 of type int"),
        ({"state": make_state(schedule_state={"x": float("nan")})}, r"is nan, which JSON"),
        ({"state": make_state(epoch=_Opaque())}, r"state\['epoch'\] is a _Opaque"),
        (
            {"state": make_state(position=9)},
            r"\$\.state is invalid: accumulation state position=9 with window_size=4",
        ),
        ({"state": make_state(micro_steps=-1)}, r"\$\.state\.micro_steps: expected a number >= 0"),
        ({"state": {"version": 1}}, r"\$\.state: missing required key 'epoch'"),
        ({"state": [1]}, r"state is a list; pass a mapping"),
        ({"config": {"schedule": 4}}, r"\$\.config: missing required key 'normalization'"),
        ({"metadata": {"Optimizer": {}}}, r"\$\.metadata: unexpected key 'Optimizer'"),
        ({"metadata": {"optimizer": {"t": (1, float("inf"))}}}, r"is inf, which JSON"),
        ({"world_size": 0}, r"world_size is 0; pass an integer >= 1"),
        ({"producer": ("x", "1")}, r"producer is \('x', '1'\); pass"),
        ({"producer": Producer("", "1")}, r"\$\.producer\.name: \"\" does not match"),
    ],
)
def test_bad_input_writes_nothing(tmp_path: Path, changes: dict[str, Any], match: str) -> None:
    """CKPT-14, CKPT-11: bad input raises UsageError before anything is created: no
    target, no temporary, and an existing checkpoint stays byte-identical."""
    fresh = tmp_path / "fresh" / "ckpt"
    with pytest.raises(UsageError, match=match):
        write(fresh, **changes)
    assert not (tmp_path / "fresh").exists()

    existing = tmp_path / "existing"
    write(existing)
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match=match):
        write(existing, **changes)
    assert snapshot(tmp_path) == before


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    """CKPT-14: a file, a symbolic link, a non-empty directory without a
    manifest, or an existing checkpoint with overwrite=False is not replaced."""
    (tmp_path / "file").write_text("precious")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "thesis.tex").write_text("precious")
    write(tmp_path / "ckpt")
    os.symlink(tmp_path / "ckpt", tmp_path / "link")
    before = snapshot(tmp_path)
    for name, match in [
        ("file", "the path is a file"),
        ("dir", r"non-empty directory without manifest.json.*'thesis.tex'"),
        ("link", "symbolic link"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            write(tmp_path / name)
    with pytest.raises(CheckpointError, match="already exists and overwrite=False"):
        write(tmp_path / "ckpt", overwrite=False)
    assert snapshot(tmp_path) == before
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty")  # an empty directory may be filled
    assert read_checkpoint(tmp_path / "empty").roles


def test_disk_failure_keeps_previous(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CKPT-14: a disk failure mid-write raises CheckpointError, leaves the
    previous checkpoint in place and no temporary behind."""
    before = snapshot(ckpt.parent)
    real = atomic.write_file
    calls = {"n": 0}

    def failing(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(atomic, "write_file", failing)
    with pytest.raises(CheckpointError, match=r"No space left on device.*unchanged"):
        write(ckpt, state=make_state(epoch=4))
    assert snapshot(ckpt.parent) == before


def test_bad_path_argument(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"must be a str or os\.PathLike"):
        write(123)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="must name a directory"):
        write(Path("/"))
