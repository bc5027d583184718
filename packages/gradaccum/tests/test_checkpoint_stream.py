"""Streaming and sharded checkpoints: writing tensor by tensor, each rank its
own files, and reading one file at a time (spec CKPT-7, CKPT-12, CKPT-14,
CKPT-22, CKPT-23)."""

from __future__ import annotations

import hashlib
import os
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest

from gradaccum.checkpoint import (
    FileEntry,
    Producer,
    RawTensor,
    TensorSource,
    abort_checkpoint,
    commit_checkpoint,
    decode_file_entries,
    encode_file_entries,
    encode_safetensors,
    open_checkpoint,
    read_checkpoint,
    read_safetensors_header,
    stage_checkpoint,
    validate_checkpoint,
    write_checkpoint,
    write_shard,
)
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    UsageError,
)

PRODUCER = Producer("gradaccum-test", "9.9.9")
CONFIG: dict[str, Any] = {
    "schedule": {"kind": "fixed", "steps": 4},
    "normalization": "mean",
    "partial_window": "step",
    "non_finite": "skip",
}
STATE: dict[str, Any] = {
    "version": 1,
    "epoch": 0,
    "position": 2,
    "window_size": 4,
    "contributing": 2,
    "items_in_window": 0,
    "items_total": 64,
    "micro_steps": 10,
    "optimizer_steps": 2,
    "skipped_steps": 0,
    "windows": 2,
    "dropped_microbatches": 0,
    "dropped_windows": 0,
    "synced_in_window": False,
    "schedule_state": {},
}
TOKEN = "0123456789abcdef"


def f32(n: int, start: float) -> bytes:
    return struct.pack(f"<{n}f", *(start + i for i in range(n)))


def raw_tensors(scale: float = 1.0) -> dict[str, RawTensor]:
    return {
        "fc.weight": RawTensor("F32", (2, 3), f32(6, 0.5 * scale)),
        "fc.bias": RawTensor("F32", (3,), f32(3, -1.0 * scale)),
        "step": RawTensor("I64", (), struct.pack("<q", 7)),
        "mask": RawTensor("BOOL", (4,), b"\x01\x00\x01\x01"),
    }


def sources(tensors: dict[str, RawTensor], calls: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, TensorSource] = {}
    for name, t in tensors.items():
        if calls is None:
            out[name] = TensorSource(t.dtype, t.shape, memoryview(t.data))
        else:

            def produce(name: str = name, data: bytes = t.data) -> bytes:
                calls.append(name)
                return data

            out[name] = TensorSource(t.dtype, t.shape, produce)
    return out


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


# --------------------------------------------------------------------------- streamed writes


def test_streamed_file_is_byte_identical_to_encoded(tmp_path: Path) -> None:
    """CKPT-7, CKPT-22, CKPT-26: a file written from TensorSources equals
    encode_safetensors of the same tensors byte for byte; every recorded
    digest equals hashlib's (the header's SHA-256) or zlib's (each tensor's
    CRC-32, format 3); each callable is called exactly once."""
    calls: list[str] = []
    manifest = write_checkpoint(
        tmp_path / "s",
        state=STATE,
        config=CONFIG,
        files={"gradients": sources(raw_tensors(), calls), "model": sources(raw_tensors(2.0))},
        producer=PRODUCER,
    )
    assert sorted(calls) == sorted(raw_tensors())
    expected = encode_safetensors(raw_tensors())
    blob = (tmp_path / "s" / "gradients.safetensors").read_bytes()
    assert blob == expected
    entry = manifest.files["gradients"]
    header_end = 8 + int.from_bytes(blob[:8], "little")
    assert (entry.size, entry.sha256, entry.header_sha256) == (
        len(blob),
        None,
        hashlib.sha256(blob[:header_end]).hexdigest(),
    )
    ck = read_checkpoint(tmp_path / "s")
    assert ck.manifest == manifest
    assert ck.tensors("gradients") == raw_tensors()
    assert ck.tensors("model") == raw_tensors(2.0)
    for name, t in raw_tensors().items():
        assert ck.manifest.files["gradients"].tensors[name].digest == (f"{zlib.crc32(t.data):08x}")
    # the same checkpoint written from bytes has the same file entries
    write_checkpoint(
        tmp_path / "b",
        state=STATE,
        config=CONFIG,
        files={"gradients": expected, "model": encode_safetensors(raw_tensors(2.0))},
        producer=PRODUCER,
    )
    assert read_checkpoint(tmp_path / "b").manifest.files == manifest.files


def test_streamed_wrong_length_leaves_nothing(tmp_path: Path) -> None:
    """CKPT-14, CKPT-22: a source whose data is not prod(shape)*itemsize bytes
    raises UsageError naming the tensor; the previous checkpoint is unchanged
    and no temporary remains."""
    path = tmp_path / "ckpt"
    write_checkpoint(path, state=STATE, config=CONFIG, files={}, producer=PRODUCER)
    before = tree(tmp_path)
    bad = sources(raw_tensors())
    bad["fc.bias"] = TensorSource("F32", (3,), b"\x00" * 11)
    with pytest.raises(UsageError, match=r"tensor 'fc.bias'.*needs 12 bytes of data, got 11"):
        write_checkpoint(path, state=STATE, config=CONFIG, files={"g": bad}, producer=PRODUCER)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("version", [3, 2, 1])
def test_large_streamed_file_hashes_on_helper_threads(tmp_path: Path, version: int) -> None:
    """CKPT-7, CKPT-22, CKPT-25, CKPT-26: a file large enough to be hashed on
    helper threads while it is written (24 MiB of 40 tensors, each produced
    by a callable called once, in order) records exactly hashlib's and zlib's
    digests — format 3 the header's SHA-256 and each tensor's CRC-32, format
    2 the header's and each tensor's SHA-256, format 1 also the whole
    file's —, reads back, and equals the file written from its bytes."""
    rng = __import__("random").Random(25)
    tensors = {
        f"t{i:02d}": RawTensor("U8", (n,), rng.randbytes(n))
        for i, n in enumerate(rng.choice([1, 4096, 600_000, 1_200_000]) for _ in range(40))
    }
    assert sum(len(t.data) for t in tensors.values()) > 16 * 1024 * 1024
    calls: list[str] = []
    manifest = write_checkpoint(
        tmp_path / "s",
        state=STATE,
        config=CONFIG,
        files={"model": sources(tensors, calls)},
        producer=PRODUCER,
        format_version=version,
    )
    blob = (tmp_path / "s" / "model.safetensors").read_bytes()
    assert blob == encode_safetensors(tensors)
    header_end = 8 + int.from_bytes(blob[:8], "little")
    order = sorted(tensors, key=lambda n: (-1, n))  # one dtype: by name
    assert calls == order
    entry = manifest.files["model"]
    if version == 1:
        assert entry.sha256 == hashlib.sha256(blob).hexdigest()
        assert entry.header_sha256 is None
    else:
        assert entry.sha256 is None
        assert entry.header_sha256 == hashlib.sha256(blob[:header_end]).hexdigest()
    for name, t in tensors.items():
        expected = (
            f"{zlib.crc32(t.data):08x}" if version == 3 else hashlib.sha256(t.data).hexdigest()
        )
        assert entry.tensors[name].digest == expected
    assert read_checkpoint(tmp_path / "s").tensors("model") == tensors
    # the streaming check (8 MiB chunks: tensors span chunk boundaries) agrees
    assert validate_checkpoint(tmp_path / "s") == manifest
    damaged = bytearray(blob)
    damaged[header_end + len(damaged[header_end:]) // 2] ^= 0x04
    (tmp_path / "s" / "model.safetensors").write_bytes(damaged)
    for check in (read_checkpoint, validate_checkpoint):
        where = "file 'model" if version == 1 else r"tensor 't\d\d' in 'model"
        with pytest.raises(CheckpointChecksumError, match=where):
            check(tmp_path / "s")
    (tmp_path / "s" / "model.safetensors").write_bytes(blob)
    from_bytes = write_checkpoint(
        tmp_path / "b",
        state=STATE,
        config=CONFIG,
        files={"model": blob},
        producer=PRODUCER,
        format_version=version,
    )
    assert from_bytes.files == manifest.files


@pytest.mark.parametrize("version", [2, 1])
def test_source_failing_while_hashed_ahead_leaves_nothing(tmp_path: Path, version: int) -> None:
    """CKPT-12, CKPT-22: when a callable source fails after earlier tensors
    were handed to the hashing threads, its error reaches the caller, the
    threads are joined (nothing hangs) and the previous checkpoint is unchanged."""
    path = tmp_path / "ckpt"
    write_checkpoint(path, state=STATE, config=CONFIG, files={}, producer=PRODUCER)
    before = tree(tmp_path)
    files: dict[str, Any] = {
        f"t{i}": TensorSource("U8", (4 * 1024 * 1024,), bytes(4 * 1024 * 1024)) for i in range(6)
    }

    def broken() -> bytes:
        raise OSError(28, "No space left on device")

    files["t3"] = TensorSource("U8", (4 * 1024 * 1024,), broken)
    with pytest.raises(CheckpointError, match="No space left on device"):
        write_checkpoint(
            path,
            state=STATE,
            config=CONFIG,
            files={"model": files},
            producer=PRODUCER,
            format_version=version,
        )
    assert tree(tmp_path) == before


def test_tensor_source_checks() -> None:
    """CKPT-14: bad dtypes and shapes are refused when a source is built;
    a non-contiguous buffer when it is written."""
    with pytest.raises(UsageError, match="not a safetensors dtype"):
        TensorSource("F31", (1,), b"\x00" * 4)
    with pytest.raises(UsageError, match="not a safetensors dtype"):
        TensorSource(["F32"], (1,), b"")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="must be a tuple of integers >= 0"):
        TensorSource("F32", (-1,), b"")
    with pytest.raises(UsageError, match="must be a tuple of integers >= 0"):
        TensorSource("F32", 5, b"")  # type: ignore[arg-type]
    assert TensorSource("F64", (2, 3), b"").nbytes == 48


def test_streamed_non_contiguous_buffer(tmp_path: Path) -> None:
    strided = memoryview(bytes(range(16)))[::2]
    with pytest.raises(UsageError, match="not a C-contiguous buffer"):
        write_checkpoint(
            tmp_path / "c",
            state=STATE,
            config=CONFIG,
            files={"g": {"x": TensorSource("U8", (8,), strided)}},
            producer=PRODUCER,
        )
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- one file at a time


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    write_checkpoint(
        path,
        state=STATE,
        config=CONFIG,
        files={
            "gradients": encode_safetensors(raw_tensors()),
            "model": encode_safetensors(raw_tensors(3.0)),
        },
        producer=PRODUCER,
    )
    return path


def test_open_checkpoint_reads_what_read_checkpoint_reads(ckpt: Path) -> None:
    """CKPT-7, CKPT-23: open_checkpoint verifies the same checkpoint and
    yields the same bytes, through read_file and through a read-only mapping;
    close releases every descriptor."""
    eager = read_checkpoint(ckpt)
    fds_before = len(os.listdir("/proc/self/fd"))
    with open_checkpoint(ckpt) as ck:
        assert ck.manifest == eager.manifest
        assert ck.manifest_protected
        assert len(os.listdir("/proc/self/fd")) == fds_before + 2
        for role in ck.roles:
            assert ck.read_file(role) == eager.file_bytes(role)
            assert ck.header(role) == eager.header(role)
            with ck.open_file(role) as tf:
                assert bytes(tf.buffer) == eager.file_bytes(role)
                assert tf.buffer.readonly
                for name, tensor in eager.tensors(role).items():
                    assert bytes(tf.tensor_view(name)) == tensor.data
                with pytest.raises(CheckpointMismatchError, match="has no tensor 'nope'"):
                    tf.tensor_view("nope")
        with pytest.raises(CheckpointMismatchError, match="has no 'optimizer' file"):
            ck.read_file("optimizer")
    assert ck.closed
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with pytest.raises(UsageError, match="is closed"):
        ck.read_file("gradients")
    assert validate_checkpoint(ckpt) == eager.manifest


def test_open_checkpoint_keeps_verified_files_across_replacement(ckpt: Path) -> None:
    """CKPT-12, CKPT-23: an opened checkpoint keeps reading the files it
    verified when a writer replaces the directory meanwhile."""
    with open_checkpoint(ckpt) as ck:
        old = ck.read_file("gradients")
        write_checkpoint(
            ckpt,
            state=STATE,
            config=CONFIG,
            files={"gradients": encode_safetensors(raw_tensors(5.0))},
            producer=PRODUCER,
        )
        assert ck.read_file("gradients") == old == encode_safetensors(raw_tensors())
    assert read_checkpoint(ckpt).tensors("gradients") == raw_tensors(5.0)


def test_unverified_open_checks_each_file_when_read(ckpt: Path) -> None:
    """CKPT-7, CKPT-23: with verify=False a corrupt data byte is found when
    the file is read or mapped, as a CheckpointChecksumError; with verify=True
    at open."""
    f = ckpt / "model.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-3] ^= 0x10
    f.write_bytes(blob)
    with open_checkpoint(ckpt, verify=False) as ck:
        assert ck.read_file("gradients")
        with pytest.raises(CheckpointChecksumError, match=r"'model\.safetensors' has CRC-32"):
            ck.read_file("model")
        with pytest.raises(CheckpointChecksumError, match=r"'model\.safetensors' has CRC-32"):
            ck.open_file("model")
    with pytest.raises(CheckpointChecksumError, match=r"'model\.safetensors' has CRC-32"):
        open_checkpoint(ckpt)


def test_open_file_can_verify_a_subset_of_a_format_2_file(ckpt: Path, tmp_path: Path) -> None:
    """CKPT-7, CKPT-25: open_file(only=...) of a format-2 file hashes the
    header and just the named tensors (a flipped byte elsewhere goes unseen
    by that call, and is found by a call naming its tensor); a format-1 file
    is always verified whole; unknown names are a UsageError."""
    with read_checkpoint(ckpt) as good:
        write_checkpoint(
            tmp_path / "v1",
            state=STATE,
            config=CONFIG,
            files={role: good.read_file(role) for role in good.roles},
            producer=PRODUCER,
            format_version=1,
        )
    header = read_safetensors_header((ckpt / "model.safetensors").read_bytes())
    last = max(header.tensors, key=lambda n: header.tensors[n].end)
    others = sorted(set(header.tensors) - {last})
    for path in (ckpt, tmp_path / "v1"):
        f = path / "model.safetensors"
        blob = bytearray(f.read_bytes())
        blob[-3] ^= 0x10  # inside the last tensor
        f.write_bytes(blob)
    with open_checkpoint(ckpt, verify=False) as ck:
        with ck.open_file("model", only=others) as tf:
            assert set(tf.header.tensors) == set(header.tensors)
        with pytest.raises(CheckpointChecksumError, match=f"tensor '{last}'"):
            ck.open_file("model", only=[last])
        with pytest.raises(UsageError, match=r"are not tensors of 'model\.safetensors'"):
            ck.open_file("model", only=["nope"])
        with pytest.raises(UsageError, match="pass a collection of its tensor names"):
            ck.open_file("model", only="fc.weight")
        st = os.stat(ckpt / "model.safetensors")
        assert ck.file_identity("model") == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with open_checkpoint(tmp_path / "v1", verify=False) as ck1:
        assert ck1.manifest.format_version == 1
        with pytest.raises(CheckpointChecksumError, match=r"file 'model\.safetensors' has SHA"):
            ck1.open_file("model", only=others)
    with pytest.raises(CheckpointChecksumError):
        read_checkpoint(ckpt)


def test_verification_memory_is_bounded(tmp_path: Path) -> None:
    """CKPT-23: verifying a 48 MiB file through open_checkpoint allocates at
    most one 8 MiB chunk (measured: tracemalloc peak under 10 MiB), where
    read_checkpoint holds the whole file."""
    n = 12 * 1024 * 1024
    big = RawTensor("F32", (n,), b"\x01" * (4 * n))
    write_checkpoint(
        tmp_path / "big",
        state=STATE,
        config=CONFIG,
        files={"model": {"w": TensorSource("F32", (n,), memoryview(big.data))}},
        producer=PRODUCER,
    )
    del big
    tracemalloc.start()
    try:
        with open_checkpoint(tmp_path / "big") as ck:
            with ck.open_file("model") as tf:
                assert tf.tensor_view("w")[:4] == b"\x01" * 4
            _, peak = tracemalloc.get_traced_memory()
        assert peak < 10 * 1024 * 1024, peak
        tracemalloc.reset_peak()
        read_checkpoint(tmp_path / "big")
        _, eager_peak = tracemalloc.get_traced_memory()
        assert eager_peak >= 48 * 1024 * 1024
    finally:
        tracemalloc.stop()


def test_open_checkpoint_verify_flag() -> None:
    with pytest.raises(UsageError, match="must be True or False"):
        open_checkpoint("x", verify="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sharded writes


def shard_files(rank: int) -> dict[str, Any]:
    return {f"gradients.rank{rank}": sources(raw_tensors(1.0 + rank))}


@pytest.mark.parametrize("version", [2, 1])
def test_sharded_write_round_trip(tmp_path: Path, version: int) -> None:
    """CKPT-12, CKPT-22, CKPT-25: rank 0 stages, each rank writes its own file
    into the shared staging directory, rank 0 commits the entries it gathered
    (sent as JSON): the result reads back exactly, byte-identical to the
    single-writer checkpoint of the same files, in either format version."""
    path = tmp_path / "ckpt"
    state = dict(STATE)
    stage_checkpoint(path, token=TOKEN, state=state, config=CONFIG, producer=PRODUCER, world_size=2)
    assert (tmp_path / f".ckpt.tmp-{TOKEN}").is_dir()
    gathered: dict[str, Any] = {}
    for rank in (1, 0):  # any order
        entries = write_shard(path, token=TOKEN, files=shard_files(rank), format_version=version)
        gathered.update(decode_file_entries(encode_file_entries(entries)))
    gathered.update(
        write_shard(
            path,
            token=TOKEN,
            files={"model": encode_safetensors(raw_tensors(9.0))},
            format_version=version,
        )
    )
    manifest = commit_checkpoint(
        path,
        token=TOKEN,
        state=state,
        config=CONFIG,
        producer=PRODUCER,
        world_size=2,
        entries=gathered,
        verify=True,
    )
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    ck = read_checkpoint(path)
    assert ck.manifest == manifest
    assert ck.manifest.format_version == version
    assert ck.roles == ("gradients.rank0", "gradients.rank1", "model")
    for rank in (0, 1):
        assert ck.tensors(f"gradients.rank{rank}") == raw_tensors(1.0 + rank)
    single = write_checkpoint(
        tmp_path / "single",
        state=state,
        config=CONFIG,
        files={
            "gradients.rank0": encode_safetensors(raw_tensors(1.0)),
            "gradients.rank1": encode_safetensors(raw_tensors(2.0)),
            "model": encode_safetensors(raw_tensors(9.0)),
        },
        producer=PRODUCER,
        world_size=2,
        format_version=version,
    )
    assert single.files == manifest.files


def test_sharded_failures_leave_previous(tmp_path: Path) -> None:
    """CKPT-14, CKPT-22: a missing shard, a shard whose entry does not match
    the file, a role written twice, or a shard without a staging directory
    are refused; the previous checkpoint stays byte-identical and the
    staging directory is removed."""
    path = tmp_path / "ckpt"
    write_checkpoint(path, state=STATE, config=CONFIG, files={}, producer=PRODUCER)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist; rank 0 must call stage_checkpoint"):
        write_shard(path, token=TOKEN, files=shard_files(0))
    kwargs: dict[str, Any] = {
        "token": TOKEN, "state": STATE, "config": CONFIG, "producer": PRODUCER, "world_size": 2
    }  # fmt: skip

    stage_checkpoint(path, **kwargs)
    e0 = write_shard(path, token=TOKEN, files=shard_files(0))
    with pytest.raises(UsageError, match="already written by another rank"):
        write_shard(path, token=TOKEN, files=shard_files(0))
    write_shard(path, token=TOKEN, files=shard_files(1))
    with pytest.raises(CheckpointError, match=r"holds \['gradients.rank1.safetensors'\]"):
        commit_checkpoint(path, entries=e0, **kwargs)
    assert tree(tmp_path) == before

    stage_checkpoint(path, **kwargs)
    e0 = write_shard(path, token=TOKEN, files=shard_files(0))
    e1 = write_shard(path, token=TOKEN, files=shard_files(1))
    e1["gradients.rank1"] = e0["gradients.rank0"].__class__(
        "gradients.rank1.safetensors", e1["gradients.rank1"].size, None,
        e1["gradients.rank1"].tensors, header_sha256="ab" * 32, tensor_digest="crc32",
    )  # fmt: skip
    with pytest.raises(
        CheckpointChecksumError, match=r"header of file 'gradients\.rank1\.safetensors' has SHA"
    ):
        commit_checkpoint(path, entries={**e0, **e1}, verify=True, **kwargs)
    assert tree(tmp_path) == before

    # shards of different format versions cannot make one checkpoint
    stage_checkpoint(path, **kwargs)
    e0 = write_shard(path, token=TOKEN, files=shard_files(0))
    e1 = write_shard(path, token=TOKEN, files=shard_files(1), format_version=1)
    assert (e0["gradients.rank0"].format_version, e1["gradients.rank1"].format_version) == (3, 1)
    with pytest.raises(UsageError, match="write every shard with the same format_version"):
        commit_checkpoint(path, entries={**e0, **e1}, **kwargs)
    assert tree(tmp_path) == before

    stage_checkpoint(path, **kwargs)
    write_shard(path, token=TOKEN, files=shard_files(0))
    abort_checkpoint(path, token=TOKEN)
    abort_checkpoint(path, token=TOKEN)  # idempotent
    assert tree(tmp_path) == before


def test_sharded_input_validation(tmp_path: Path) -> None:
    """CKPT-14: bad tokens, states, entries and roles are refused before
    anything is created."""
    path = tmp_path / "ckpt"
    good: dict[str, Any] = {"state": STATE, "config": CONFIG, "producer": PRODUCER}
    with pytest.raises(UsageError, match="token 'XYZ' must be 8 to 64 lowercase hex digits"):
        stage_checkpoint(path, token="XYZ", **good)
    with pytest.raises(UsageError, match=r"\$\.state is invalid"):
        stage_checkpoint(path, token=TOKEN, **{**good, "state": {**STATE, "position": 9}})
    assert not any(tmp_path.iterdir())
    stage_checkpoint(path, token=TOKEN, **good)
    with pytest.raises(UsageError, match="role 'Bad' does not match"):
        write_shard(path, token=TOKEN, files={"Bad": encode_safetensors(raw_tensors())})
    with pytest.raises(UsageError, match="must map roles to the FileEntry objects"):
        commit_checkpoint(path, token=TOKEN, entries={"g": "x"}, **good)  # type: ignore[dict-item]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b"{",
        b'{"format_version": 1, "files": '
        b'{"g": {"path": "g.safetensors", "size": 8, "sha256": "x", "tensors": {}}}}',
        b'{"format_version": 1, "files": {"g": {"path": "h.safetensors", "size": 8, "sha256": "'
        + b"a" * 64
        + b'", "tensors": {}}}}',
        # a format-2 entry sent as format 3: its tensor has no crc32
        b'{"format_version": 3, "files": {"g": {"path": "g.safetensors", "size": 8, '
        b'"header_sha256": "' + b"a" * 64 + b'", "tensors": {"t": {"dtype": "U8", "shape": [0], '
        b'"sha256": "' + b"a" * 64 + b'"}}}}}',
        b'{"format_version": 4, "files": {}}',
        b'{"format_version": 3, "files": {}, "extra": 1}',
        b'{"g": {"path": "g.safetensors", "size": 8, "sha256": "'
        + b"a" * 64
        + b'", "tensors": {}}}',
        b"[" * 1000,
        b"\xff",
    ],
)
def test_decode_file_entries_refuses_garbage(raw: bytes) -> None:
    """CKPT-20: entries received from another rank are parsed strictly."""
    with pytest.raises(CheckpointCorruptError):
        decode_file_entries(raw)


@pytest.mark.parametrize("version", [3, 2, 1])
def test_file_entries_travel_with_their_format_version(tmp_path: Path, version: int) -> None:
    """CKPT-25, CKPT-26: entries sent between ranks come back equal, with
    their format version, even a file without tensors (whose entry alone
    cannot tell format 2 from format 3); entries of mixed format versions
    are refused before anything is sent."""
    path = tmp_path / "ckpt"
    stage_checkpoint(path, token=TOKEN, state=STATE, config=CONFIG, producer=PRODUCER)
    entries = write_shard(
        path,
        token=TOKEN,
        files={"gradients": encode_safetensors(raw_tensors()), "empty": encode_safetensors({})},
        format_version=version,
    )
    assert entries["empty"].tensors == {}
    back = decode_file_entries(encode_file_entries(entries))
    assert back == entries
    assert {e.format_version for e in back.values()} == {version}
    other = write_shard(
        path,
        token=TOKEN,
        files={"gradients.rank1": encode_safetensors(raw_tensors())},
        format_version=1 if version != 1 else 3,
    )
    with pytest.raises(UsageError, match="cannot travel together"):
        encode_file_entries({**entries, **other})


def test_file_entry_and_transport_refuse_bad_values_with_usage_errors() -> None:
    """CKPT-26: a FileEntry with a tensor digest other than 'sha256' or 'crc32',
    or 'crc32' without a header digest (format 3 has one), is a UsageError; so
    are encode_file_entries and decode_file_entries given what is neither
    entries nor bytes — never another exception type."""
    good = FileEntry("g.safetensors", 8, None, {}, header_sha256="a" * 64, tensor_digest="crc32")
    assert good.format_version == 3
    for bad in ("md5", "CRC32", 32, None, b"crc32", ["crc32"]):
        with pytest.raises(UsageError, match="tensor_digest="):
            FileEntry("g.safetensors", 8, None, {}, header_sha256="a" * 64, tensor_digest=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="tensor_digest='crc32'"):
        FileEntry("g.safetensors", 8, "a" * 64, {}, tensor_digest="crc32")
    for raw in ("{}", None, -1, 10**12, 3.5):
        with pytest.raises(UsageError, match="expected the bytes encode_file_entries returned"):
            decode_file_entries(raw)  # type: ignore[arg-type]
    for entries in (None, [("g", good)], "g"):
        with pytest.raises(UsageError, match="must be a mapping of roles to FileEntry"):
            encode_file_entries(entries)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [3, 2, 1])
def test_commit_writes_the_format_version_asked_even_without_files(
    tmp_path: Path, version: int
) -> None:
    """CKPT-25, CKPT-26: commit_checkpoint(format_version=N) writes a format-N
    manifest (its spec version) even when no rank wrote a tensor file, and
    refuses entries of another format version with UsageError, the previous
    checkpoint untouched."""
    path = tmp_path / "ckpt"
    kwargs: dict[str, Any] = {
        "token": TOKEN, "state": STATE, "config": CONFIG, "producer": PRODUCER, "world_size": 2
    }  # fmt: skip
    stage_checkpoint(path, **kwargs)
    m = commit_checkpoint(path, entries={}, format_version=version, **kwargs)
    assert (m.format_version, m.spec_version) == (
        version,
        f"{version}.{2 if version == 1 else 0}.0",
    )
    assert read_checkpoint(path).manifest == m
    before = tree(tmp_path)
    other = 1 if version != 1 else 3
    stage_checkpoint(path, **kwargs)
    entries = write_shard(path, token=TOKEN, files=shard_files(0), format_version=other)
    with pytest.raises(UsageError, match="write every shard with the same format_version"):
        commit_checkpoint(path, entries=entries, format_version=version, **kwargs)
    assert tree(tmp_path) == before
    stage_checkpoint(path, **kwargs)
    with pytest.raises(UsageError, match="format_version=9 is not one this release writes"):
        commit_checkpoint(path, entries={}, format_version=9, **kwargs)
    assert tree(tmp_path) == before
