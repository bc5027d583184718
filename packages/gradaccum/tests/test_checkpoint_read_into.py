"""Reading tensors straight into the caller's memory: `Checkpoint.verify_header`,
`Checkpoint.verify_file` and `Checkpoint.read_into` (CKPT-7, CKPT-25, CKPT-26)."""

from __future__ import annotations

import array
import os
import struct
import threading
import tracemalloc
from pathlib import Path

import pytest
from test_checkpoint_stream import CONFIG, PRODUCER, STATE

from gradaccum.checkpoint import (
    RawTensor,
    TensorSource,
    encode_safetensors,
    open_checkpoint,
    read_checkpoint,
    read_safetensors_header,
    write_checkpoint,
)
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    UsageError,
)

# 20 MiB: more than two 8 MiB read chunks, each hashed on the helper thread
BIG = 5 * 1024 * 1024


def tensors() -> dict[str, RawTensor]:
    big = bytes(range(256)) * (4 * BIG // 256)
    return {
        "big": RawTensor("F32", (BIG,), big),
        "fc.bias": RawTensor("F32", (3,), struct.pack("<3f", -1.0, 0.5, 2.0)),
        "step": RawTensor("I64", (), struct.pack("<q", 7)),
        "mask": RawTensor("BOOL", (4,), b"\x01\x00\x01\x01"),
        "empty": RawTensor("F16", (0, 3), b""),
    }


def write(path: Path, version: int) -> dict[str, RawTensor]:
    raw = tensors()
    write_checkpoint(
        path,
        state=STATE,
        config=CONFIG,
        files={"model": encode_safetensors(raw), "gradients": encode_safetensors(raw)},
        producer=PRODUCER,
        format_version=version,
    )
    return raw


def flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(blob)


def data_offset(path: Path, name: str) -> int:
    header = read_safetensors_header(path.read_bytes())
    return header.data_start + header.tensors[name].begin


@pytest.mark.parametrize("version", [3, 2, 1])
@pytest.mark.parametrize("opener", ["open", "read"])
def test_read_into_yields_every_tensor_exactly(tmp_path: Path, version: int, opener: str) -> None:
    """CKPT-7, CKPT-23: read_into fills the caller's buffer with exactly the stored
    bytes of every tensor (a 20 MiB one read in three chunks, hashed on a
    helper thread while the next is read), from an opened checkpoint and from
    one held in memory, in every format."""
    raw = write(tmp_path / "c", version)
    ck = open_checkpoint(tmp_path / "c", verify=False) if opener == "open" else None
    with ck or read_checkpoint(tmp_path / "c") as ckpt:
        assert ckpt.manifest.format_version == version
        for role in ("model", "gradients"):
            header = ckpt.verify_header(role)
            assert set(header.tensors) == set(raw)
            for name, tensor in raw.items():
                out = bytearray(len(tensor.data))
                ckpt.read_into(role, name, out)
                assert bytes(out) == tensor.data, (role, name)
        # a typed buffer of the right byte size works too (its items are reinterpreted)
        floats = array.array("f", [0.0] * 3)
        ckpt.read_into("model", "fc.bias", floats)
        assert floats.tolist() == [-1.0, 0.5, 2.0]


@pytest.mark.parametrize("version", [3, 2])
def test_read_into_finds_a_flipped_byte_in_the_tensor_it_reads(
    tmp_path: Path, version: int
) -> None:
    """CKPT-7, CKPT-23, CKPT-26: a byte flipped in the middle chunk of the 20 MiB
    tensor makes read_into(verify=True) raise CheckpointChecksumError naming
    that tensor and its digest; other tensors of the file still read and
    verify; verify=False hands back the flipped byte (the check is what
    catches it)."""
    raw = write(tmp_path / "c", version)
    f = tmp_path / "c" / "model.safetensors"
    at = data_offset(f, "big") + 12 * 1024 * 1024 + 5
    flip(f, at)
    label = "CRC-32" if version == 3 else "SHA-256"
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        out = bytearray(4 * BIG)
        with pytest.raises(
            CheckpointChecksumError, match=f"tensor 'big' in 'model.safetensors' has {label}"
        ):
            ck.read_into("model", "big", out)
        small = bytearray(12)
        ck.read_into("model", "fc.bias", small)
        assert bytes(small) == raw["fc.bias"].data
        ck.read_into("model", "big", out, verify=False)
        expected = bytearray(raw["big"].data)
        expected[12 * 1024 * 1024 + 5] ^= 0x10
        assert out == expected
        ck.read_into("gradients", "big", out)  # the other file is intact
        assert bytes(out) == raw["big"].data


def test_format_1_read_into_checks_the_whole_file_first(tmp_path: Path) -> None:
    """CKPT-7: in format 1 one SHA-256 covers the whole file (header
    included), so the first verified read of a file streams all of it: a
    flipped byte in another tensor refuses the read of an intact one."""
    write(tmp_path / "c", 1)
    f = tmp_path / "c" / "model.safetensors"
    flip(f, data_offset(f, "big") + 3)
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        with pytest.raises(CheckpointChecksumError, match=r"file 'model\.safetensors' has SHA"):
            ck.read_into("model", "fc.bias", bytearray(12))
        ck.read_into("model", "fc.bias", bytearray(12), verify=False)


@pytest.mark.parametrize("version", [3, 2])
def test_verify_header_refuses_an_edited_header(tmp_path: Path, version: int) -> None:
    """CKPT-23, CKPT-25: the header's SHA-256 is checked before any tensor is read: a
    header edited so that it stays valid and matches the manifest's index (a
    letter of its metadata) passes open_checkpoint(verify=False) but raises
    CheckpointChecksumError on verify_header and on a verified read_into."""
    raw = tensors()
    write_checkpoint(
        tmp_path / "c",
        state=STATE,
        config=CONFIG,
        files={"model": encode_safetensors(raw, {"note": "abc"})},
        producer=PRODUCER,
        format_version=version,
    )
    f = tmp_path / "c" / "model.safetensors"
    blob = bytearray(f.read_bytes())
    at = blob.index(b'"abc"')
    blob[at + 1 : at + 4] = b"abd"
    f.write_bytes(bytes(blob))
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        assert ck.header("model").metadata == {"note": "abd"}
        with pytest.raises(CheckpointChecksumError, match="the header of file"):
            ck.verify_header("model")
        with pytest.raises(CheckpointChecksumError, match="the header of file"):
            ck.read_into("model", "step", bytearray(8))
        ck.read_into("model", "step", out := bytearray(8), verify=False)
        assert bytes(out) == raw["step"].data


def test_verify_header_catches_a_header_changed_after_open(tmp_path: Path) -> None:
    """CKPT-25: the header a verified read uses is the one whose bytes were
    hashed: a header rewritten in place after the checkpoint was opened (the
    same length, a different tensor order) is a CheckpointChecksumError."""
    raw = write(tmp_path / "c", 3)
    f = tmp_path / "c" / "model.safetensors"
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        blob = bytearray(f.read_bytes())
        header_len = struct.unpack("<Q", blob[:8])[0]
        pos = blob.index(b'"BOOL"', 8, 8 + header_len)
        blob[pos : pos + 6] = b'"BOOl"'
        with open(f, "r+b") as fh:
            fh.write(blob)
        with pytest.raises(CheckpointChecksumError, match="the header of file"):
            ck.read_into("model", "mask", bytearray(4))
        out = bytearray(4)
        ck.read_into("gradients", "mask", out)
        assert bytes(out) == raw["mask"].data


@pytest.mark.parametrize("version", [3, 2])
def test_verify_file_checks_only_what_it_is_asked(tmp_path: Path, version: int) -> None:
    """CKPT-7, CKPT-25: verify_file hashes the header and every tensor; with
    ``only`` just the named ones (a flipped byte elsewhere goes unseen by
    that call and is found by one naming its tensor); unknown names are a
    UsageError."""
    write(tmp_path / "c", version)
    f = tmp_path / "c" / "model.safetensors"
    flip(f, data_offset(f, "big") + 4 * BIG - 2)  # the last chunk of 'big'
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        ck.verify_file("model", only=["fc.bias", "step", "mask", "empty"])
        with pytest.raises(CheckpointChecksumError, match="tensor 'big'"):
            ck.verify_file("model", only=["big"])
        with pytest.raises(CheckpointChecksumError, match="tensor 'big'"):
            ck.verify_file("model")
        ck.verify_file("gradients")
        with pytest.raises(UsageError, match=r"are not tensors of 'model\.safetensors'"):
            ck.verify_file("model", only=["nope"])
        with pytest.raises(UsageError, match="pass a collection of its tensor names"):
            ck.verify_file("model", only="big")


def test_verify_file_memory_is_two_chunks(tmp_path: Path) -> None:
    """CKPT-23: verifying a 48 MiB file with verify_file allocates two 8 MiB
    read buffers and nothing per byte of the file (tracemalloc peak under
    18 MiB, where read_checkpoint holds the whole file)."""
    n = 12 * 1024 * 1024
    data = b"\x01" * (4 * n)
    write_checkpoint(
        tmp_path / "big",
        state=STATE,
        config=CONFIG,
        files={"model": {"w": TensorSource("F32", (n,), memoryview(data))}},
        producer=PRODUCER,
    )
    del data
    tracemalloc.start()
    try:
        with open_checkpoint(tmp_path / "big", verify=False) as ck:
            ck.verify_file("model")
            _, peak = tracemalloc.get_traced_memory()
        assert peak < 18 * 1024 * 1024, peak
    finally:
        tracemalloc.stop()


def test_read_into_refuses_bad_arguments_before_reading(tmp_path: Path) -> None:
    """ACC-E: an ``out`` of the wrong size, read-only, not contiguous or not
    a buffer is a UsageError naming the size wanted; an unknown tensor a
    CheckpointMismatchError; a closed checkpoint a UsageError — and ``out``
    is left untouched."""
    write(tmp_path / "c", 3)
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        out = bytearray(b"\xaa" * 11)
        with pytest.raises(UsageError, match="buffer of 12 bytes; it is 11 bytes"):
            ck.read_into("model", "fc.bias", out)
        assert out == bytearray(b"\xaa" * 11)
        with pytest.raises(UsageError, match="read-only"):
            ck.read_into("model", "fc.bias", bytes(12))
        strided = memoryview(bytearray(24))[::2]
        with pytest.raises(UsageError, match="not contiguous"):
            ck.read_into("model", "fc.bias", strided)
        with pytest.raises(UsageError, match="not a buffer"):
            ck.read_into("model", "fc.bias", [0] * 12)
        with pytest.raises(UsageError, match="must be True or False"):
            ck.read_into("model", "fc.bias", bytearray(12), verify="yes")  # type: ignore[arg-type]
        with pytest.raises(CheckpointMismatchError, match="has no tensor 'nope'"):
            ck.read_into("model", "nope", bytearray(12))
        with pytest.raises(CheckpointMismatchError, match="has no 'optimizer' file"):
            ck.read_into("optimizer", "fc.bias", bytearray(12))
    with pytest.raises(UsageError, match="is closed"):
        ck.read_into("model", "fc.bias", bytearray(12))


def test_read_into_reports_a_file_truncated_after_open(tmp_path: Path) -> None:
    """CKPT-17: a file cut short after the checkpoint was opened (its header
    checked) is a CheckpointCorruptError naming the file and where it ended,
    not a short buffer or an endless loop."""
    write(tmp_path / "c", 3)
    f = tmp_path / "c" / "model.safetensors"
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        ck.verify_header("model")
        begin = data_offset(f, "big")
        os.truncate(f, begin + 9 * 1024 * 1024)
        with pytest.raises(CheckpointCorruptError, match=r"'model\.safetensors' ended at byte"):
            ck.read_into("model", "big", bytearray(4 * BIG))
        with pytest.raises(CheckpointCorruptError, match="ended at byte"):
            ck.verify_file("model")


def test_format_1_read_into_checks_each_tensor_read_after_the_whole_file(tmp_path: Path) -> None:
    """CKPT-7: the bytes a format-1 read keeps are bytes checked — a tensor
    changed on disk after verify_header streamed the whole file is caught by
    its own SHA-256 when read_into reads it."""
    write(tmp_path / "c", 1)
    f = tmp_path / "c" / "model.safetensors"
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        ck.verify_header("model")
        at = data_offset(f, "fc.bias")
        with open(f, "r+b") as fh:
            fh.seek(at)
            fh.write(b"\x00\x00\x80\x7f")
        with pytest.raises(CheckpointChecksumError, match=r"tensor 'fc\.bias'"):
            ck.read_into("model", "fc.bias", bytearray(12))


def test_in_memory_checkpoint_reads_after_close_without_a_helper_thread(tmp_path: Path) -> None:
    """CKPT-23: closing an in-memory checkpoint (a no-op for its bytes) stops
    its hashing thread; reading afterwards still verifies, inline, and leaves
    no thread behind."""
    raw = write(tmp_path / "c", 3)
    ck = read_checkpoint(tmp_path / "c")
    out = bytearray(4 * BIG)
    ck.read_into("model", "big", out)
    ck.close()
    ck.read_into("gradients", "big", out)
    assert bytes(out) == raw["big"].data
    assert not [t for t in threading.enumerate() if t.name.startswith("gradaccum-verify")]
