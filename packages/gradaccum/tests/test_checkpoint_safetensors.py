"""The pure-Python safetensors reader and writer (spec promise CKPT-6)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradaccum.checkpoint import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    RawTensor,
    decode_safetensors,
    encode_safetensors,
    read_safetensors_header,
)
from gradaccum.errors import CheckpointCorruptError, UsageError

FIXTURES = Path(__file__).parent / "fixtures"


def _raw_file(header: dict[str, object], buffer: bytes, pad: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(raw)) + raw + buffer


def _f32(*values: float) -> RawTensor:
    return RawTensor("F32", (len(values),), struct.pack(f"<{len(values)}f", *values))


# ----------------------------------------------------------------------------- writer


def test_encode_layout_is_exact() -> None:
    """CKPT-6: the writer emits the documented layout: u64 length, JSON
    header padded with spaces to 8 bytes, tensors by descending itemsize."""
    blob = encode_safetensors({"b": RawTensor("I8", (2,), b"\x01\x02"), "a": _f32(1.0)}, {"k": "v"})
    (n,) = struct.unpack("<Q", blob[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(blob[8 : 8 + n])
    assert header == {
        "__metadata__": {"k": "v"},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "I8", "shape": [2], "data_offsets": [4, 6]},
    }
    assert blob[8 + n :] == struct.pack("<f", 1.0) + b"\x01\x02"
    assert len(blob) == 8 + n + 6


def test_round_trip_values() -> None:
    """CKPT-6: decode(encode(t)) == t, byte for byte, with metadata."""
    tensors = {
        "w": RawTensor("F32", (2, 3), struct.pack("<6f", *range(6))),
        "scalar": RawTensor("I64", (), struct.pack("<q", -5)),
        "empty": RawTensor("BF16", (0, 7), b""),
        "mask": RawTensor("BOOL", (3,), b"\x01\x00\x01"),
    }
    blob = encode_safetensors(tensors, {"format": "pt"})
    assert decode_safetensors(blob) == tensors
    header = read_safetensors_header(blob)
    assert dict(header.metadata) == {"format": "pt"}
    assert header.file_size == len(blob)
    assert header.buffer_size == 24 + 8 + 3


def test_raw_tensor_checks_its_bytes() -> None:
    with pytest.raises(UsageError, match=r"needs 24 bytes of data, got 20"):
        RawTensor("F32", (2, 3), bytes(20))
    with pytest.raises(UsageError, match=r"'F31' is not a safetensors dtype"):
        RawTensor("F31", (1,), bytes(4))
    with pytest.raises(UsageError, match=r"shape \(-1,\)"):
        RawTensor("F32", (-1,), b"")
    assert RawTensor("U8", (2,), bytearray(b"ab")).data == b"ab"  # type: ignore[arg-type]


def test_encode_refuses_bad_names() -> None:
    with pytest.raises(UsageError, match="'__metadata__'"):
        encode_safetensors({"__metadata__": _f32(1.0)})
    with pytest.raises(UsageError, match="non-empty"):
        encode_safetensors({"": _f32(1.0)})
    with pytest.raises(UsageError, match="map str to str"):
        encode_safetensors({"a": _f32(1.0)}, {"k": 1})  # type: ignore[dict-item]


_dtypes = st.sampled_from(sorted(DTYPE_SIZES))
_shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def _tensors(draw: st.DrawFn) -> dict[str, RawTensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=5, unique=True))
    out: dict[str, RawTensor] = {}
    for name in names:
        if name == "__metadata__":
            continue
        dtype, shape = draw(_dtypes), draw(_shapes)
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        out[name] = RawTensor(dtype, shape, draw(st.binary(min_size=size, max_size=size)))
    return out


@settings(max_examples=150, deadline=None)
@given(
    tensors=_tensors(),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_round_trip_property(
    tensors: dict[str, RawTensor], metadata: dict[str, str] | None
) -> None:
    """CKPT-6: any tensors (any dtype, shape, name, including empty and
    unicode names) survive encode/decode unchanged; offsets are aligned."""
    blob = encode_safetensors(tensors, metadata)
    header = read_safetensors_header(blob)
    assert decode_safetensors(blob) == tensors
    assert dict(header.metadata) == (metadata or {})
    assert header.data_start % 8 == 0
    for info in header.tensors.values():
        assert info.begin % DTYPE_SIZES[info.dtype] == 0


# ----------------------------------------------------------------------- reference library


def test_reads_file_written_by_safetensors_torch_save() -> None:
    """CKPT-6: a file written by ``safetensors.torch.save`` (frozen in the
    fixtures; header padded, keys unsorted) is read with the exact values."""
    blob = (FIXTURES / "torch-saved.safetensors").read_bytes()
    header = read_safetensors_header(blob)
    assert dict(header.metadata) == {"format": "pt"}
    tensors = decode_safetensors(blob)
    expected = {
        "f32": RawTensor("F32", (2, 3), struct.pack("<6f", 0, 1, 2, 3, 4, 5)),
        "bf16": RawTensor("BF16", (2,), struct.pack("<2H", 0x3F80, 0xC000)),
        "f16": RawTensor("F16", (1,), struct.pack("<e", 0.5)),
        "i64": RawTensor("I64", (3,), struct.pack("<3q", 1, -1, 7)),
        "i8": RawTensor("I8", (2,), struct.pack("<2b", -3, 4)),
        "u8": RawTensor("U8", (1,), b"\xff"),
        "bool": RawTensor("BOOL", (3,), b"\x01\x00\x01"),
        "f64": RawTensor("F64", (1,), struct.pack("<d", 3.25)),
        "scalar": RawTensor("I32", (), struct.pack("<i", 9)),
        "empty": RawTensor("F32", (0, 4), b""),
        "model.layers.0.attn.q_proj.weight": RawTensor("F32", (1, 2), struct.pack("<2f", 1, 1)),
    }
    assert tensors == expected
    assert next(iter(header.tensors)) == "i64"  # laid out by the library, not by name


def test_cross_check_with_reference_library() -> None:
    """CKPT-6: our bytes are read by the reference library, and its bytes by us."""
    safetensors = pytest.importorskip("safetensors")
    ctypes = pytest.importorskip("ctypes")
    tensors = {
        "w": RawTensor("F32", (2, 2), struct.pack("<4f", 1, 2, 3, 4)),
        "idx": RawTensor("I64", (3,), struct.pack("<3q", 0, 1, 2)),
        "h": RawTensor("F16", (1,), struct.pack("<e", 2.0)),
    }
    ours = encode_safetensors(tensors, {"who": "us"})
    theirs_view = {
        name: {"dtype": t["dtype"], "shape": list(t["shape"]), "data": bytes(t["data"])}
        for name, t in safetensors.deserialize(ours)
    }
    assert theirs_view == {
        n: {"dtype": t.dtype, "shape": list(t.shape), "data": t.data} for n, t in tensors.items()
    }
    if not hasattr(safetensors, "TensorSpec"):  # pragma: no cover - older releases
        pytest.skip("safetensors.TensorSpec is not available in this release")
    names = {"F32": "float32", "I64": "int64", "F16": "float16"}
    buffers = {n: ctypes.create_string_buffer(t.data, len(t.data)) for n, t in tensors.items()}
    specs = {
        n: safetensors.TensorSpec(
            dtype=names[t.dtype],
            shape=list(t.shape),
            data_ptr=ctypes.addressof(buffers[n]),
            data_len=len(t.data),
        )
        for n, t in tensors.items()
    }
    theirs = safetensors.serialize(specs, {"who": "them"})
    assert decode_safetensors(theirs) == tensors
    assert dict(read_safetensors_header(theirs).metadata) == {"who": "them"}


def test_reads_header_from_path(tmp_path: Path) -> None:
    """CKPT-6: reading from a path checks the buffer against the file size."""
    blob = encode_safetensors({"a": _f32(1.0, 2.0)})
    path = tmp_path / "a.safetensors"
    path.write_bytes(blob)
    assert read_safetensors_header(path).tensors["a"].nbytes == 8
    path.write_bytes(blob[:-1])
    with pytest.raises(CheckpointCorruptError, match=r"need a data buffer of 8 bytes .* only 7"):
        read_safetensors_header(path)


# ----------------------------------------------------------------------------- refusals

_GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        pytest.param(b"\x01\x00", r"2 bytes, shorter than the 8-byte header length", id="short"),
        pytest.param(
            struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
            rf"says {MAX_HEADER_BYTES + 1} bytes, more than the {MAX_HEADER_BYTES}-byte limit",
            id="length-over-bound",
        ),
        pytest.param(
            struct.pack("<Q", 2**63) + b"{}",
            rf"says {2**63} bytes",
            id="length-huge",
        ),
        pytest.param(
            struct.pack("<Q", 50) + b"{}",
            r"says 50 bytes but only 2 bytes follow it \(file size 10\)",
            id="length-beyond-file",
        ),
        pytest.param(
            struct.pack("<Q", 4) + b"[1] ",
            r"does not start with '\{' \(starts with b'\[1\] '\)",
            id="not-object",
        ),
        pytest.param(struct.pack("<Q", 3) + b"{\xff}", r"not valid UTF-8", id="not-utf8"),
        pytest.param(struct.pack("<Q", 3) + b'{"a', r"not valid JSON", id="not-json"),
        pytest.param(
            _raw_file({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
            r"tensor 'a' has dtype 'F31'",
            id="unknown-dtype",
        ),
        pytest.param(
            _raw_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
            r"tensor 'a' has shape \[-2\]",
            id="negative-shape",
        ),
        pytest.param(
            _raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)),
            r"data_offsets \[8, 0\]",
            id="reversed-offsets",
        ),
        pytest.param(
            _raw_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
            r"spans 8 bytes \[0, 8\) but needs 12",
            id="size-mismatch",
        ),
        pytest.param(
            _raw_file(
                {"a": _GOOD_ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                bytes(12),
            ),
            r"tensor 'b' starts at buffer offset 4 but the previous tensor ends at 8: it overlaps",
            id="overlap",
        ),
        pytest.param(
            _raw_file(
                {"a": _GOOD_ENTRY, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
                bytes(16),
            ),
            r"starts at buffer offset 12 but the previous tensor ends at 8: it leaves a gap",
            id="gap",
        ),
        pytest.param(
            _raw_file({"a": _GOOD_ENTRY}, bytes(11)),
            r"holds 11 bytes but the tensors cover only 8: 3 trailing bytes",
            id="trailing-bytes",
        ),
        pytest.param(
            _raw_file({"a": _GOOD_ENTRY}, bytes(5)),
            r"need a data buffer of 8 bytes but the file holds only 5",
            id="truncated",
        ),
        pytest.param(
            _raw_file({"a": {**_GOOD_ENTRY, "extra": 1}}, bytes(8)),
            r"must be an object with exactly the keys",
            id="extra-entry-key",
        ),
        pytest.param(
            _raw_file({"__metadata__": {"k": 1}, "a": _GOOD_ENTRY}, bytes(8)),
            r"'__metadata__' must map strings to strings, got \{'k': 1\}",
            id="metadata-not-str",
        ),
        pytest.param(
            _raw_file({"": _GOOD_ENTRY}, bytes(8)), r"a tensor has an empty name", id="empty-name"
        ),
        pytest.param(
            struct.pack("<Q", 15) + b'{"a":1, "a":2}' + b" ",
            r"duplicate key 'a'",
            id="duplicate-key",
        ),
    ],
)
def test_refuses_malformed(blob: bytes, match: str) -> None:
    """CKPT-6: every malformed header is refused, naming the value seen."""
    with pytest.raises(CheckpointCorruptError, match=match):
        read_safetensors_header(blob, name="x.safetensors")
    with pytest.raises(CheckpointCorruptError, match=r"^x\.safetensors: .*restore it"):
        decode_safetensors(blob, name="x.safetensors")


def test_accepts_padding_and_zero_sized_tensors() -> None:
    """CKPT-6: trailing spaces in the header and empty tensors sharing an
    offset are allowed, as the reference library writes them."""
    blob = _raw_file(
        {
            "e1": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
            "a": _GOOD_ENTRY,
            "e2": {"dtype": "I64", "shape": [3, 0], "data_offsets": [8, 8]},
        },
        bytes(8),
        pad=b"     ",
    )
    header = read_safetensors_header(blob)
    assert list(header.tensors) == ["e1", "a", "e2"]
    assert decode_safetensors(blob)["e2"] == RawTensor("I64", (3, 0), b"")
