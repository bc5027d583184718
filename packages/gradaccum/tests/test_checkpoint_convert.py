"""`gradaccum.checkpoint.convert_checkpoint` and ``gradaccum convert``: a checkpoint
written again in another format version carries every tensor, the state, config,
metadata, producer and world size unchanged; a bad source leaves the target as it
was (CKPT-7, CKPT-12, CKPT-23, CKPT-26)."""

from __future__ import annotations

import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from test_checkpoint_read_into import data_offset, flip
from test_checkpoint_stream import CONFIG, PRODUCER, STATE

from gradaccum.checkpoint import (
    RawTensor,
    TensorSource,
    convert_checkpoint,
    decode_safetensors,
    encode_safetensors,
    read_checkpoint,
    validate_checkpoint,
    write_checkpoint,
)
from gradaccum.cli import main
from gradaccum.errors import CheckpointChecksumError, CheckpointError, UsageError

FIXTURES = Path(__file__).parent / "fixtures"
METADATA = {"scheduler": {"class": "StepLR", "state": {"last_epoch": 3}}, "note": ["a", 1]}


def tensors() -> dict[str, RawTensor]:
    return {
        "fc.weight": RawTensor("F32", (2, 3), struct.pack("<6f", 1, -2, 3.5, 0, 1e-30, -7)),
        "fc.bias": RawTensor("BF16", (2,), b"\x80\x3f\x00\xc0"),
        "step": RawTensor("I64", (), struct.pack("<q", 7)),
        "mask": RawTensor("BOOL", (4,), b"\x01\x00\x01\x01"),
        "empty": RawTensor("F16", (0, 3), b""),
    }


def write(path: Path, version: int, *, header_metadata: dict[str, str] | None = None) -> None:
    raw = tensors()
    write_checkpoint(
        path,
        state=STATE,
        config=CONFIG,
        files={
            "model": encode_safetensors(raw, metadata=header_metadata),
            "gradients.rank0": encode_safetensors(raw),
            "gradients.rank1": encode_safetensors({"fc.bias": raw["fc.bias"]}),
        },
        producer=PRODUCER,
        world_size=2,
        metadata=METADATA,
        format_version=version,
    )


def contents(path: Path) -> dict[str, object]:
    """What a resume reads: everything but the format version and the creation time."""
    ckpt = read_checkpoint(path)
    m = ckpt.manifest
    return {
        "producer": m.producer,
        "world_size": m.world_size,
        "state": dict(m.state),
        "config": dict(m.config),
        "metadata": dict(m.metadata),
        "files": {
            role: {
                n: (t.dtype, t.shape, bytes(t.data))
                for n, t in decode_safetensors(ckpt.file_bytes(role)).items()
            }
            for role in m.roles
        },
    }


@pytest.mark.parametrize("source_version", [1, 2, 3])
@pytest.mark.parametrize("target_version", [1, 2, 3])
def test_conversion_carries_everything_between_every_pair_of_formats(
    tmp_path: Path, source_version: int, target_version: int
) -> None:
    """CKPT-26: every tensor of every role (bf16, a 0-d int64, bool, an empty one),
    the state, config, metadata, producer and world size survive a conversion
    from each format to each, and the target is a valid checkpoint of the asked
    format."""
    write(tmp_path / "src", source_version)
    manifest = convert_checkpoint(tmp_path / "src", tmp_path / "dst", format_version=target_version)
    assert manifest.format_version == target_version
    assert read_checkpoint(tmp_path / "dst").manifest.format_version == target_version
    assert contents(tmp_path / "dst") == contents(tmp_path / "src")
    digests = {
        e.tensors["fc.weight"].digest for e in manifest.files.values() if e.tensors.get("fc.weight")
    }
    assert all(len(d) == (8 if target_version == 3 else 64) for d in digests)


@pytest.mark.parametrize("name", ["checkpoint-v1-minimal", "checkpoint-v2-minimal"])
def test_the_frozen_fixtures_convert_to_the_current_format(tmp_path: Path, name: str) -> None:
    """The frozen older fixtures convert to format 3 and read back the same."""
    dst = tmp_path / "dst"
    assert convert_checkpoint(FIXTURES / name, dst).format_version == 3
    assert contents(dst) == contents(FIXTURES / name)


def test_header_metadata_is_kept(tmp_path: Path) -> None:
    """A file whose safetensors header carries ``__metadata__`` keeps it."""
    write(tmp_path / "src", 2, header_metadata={"format": "pt", "origin": "test"})
    convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    ckpt = read_checkpoint(tmp_path / "dst")
    assert dict(ckpt.header("model").metadata) == {"format": "pt", "origin": "test"}
    assert contents(tmp_path / "dst") == contents(tmp_path / "src")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_flipped_byte_in_the_source_leaves_the_target_unchanged(
    tmp_path: Path, version: int
) -> None:
    """CKPT-7, CKPT-12: a tensor byte flipped in the source raises
    CheckpointChecksumError naming the tensor; an existing target keeps its
    checkpoint byte for byte, a missing one is not created, no temporary remains."""
    write(tmp_path / "src", version)
    flip(
        tmp_path / "src" / "gradients.rank0.safetensors",
        data_offset(tmp_path / "src" / "gradients.rank0.safetensors", "fc.weight") + 2,
    )
    with pytest.raises(CheckpointChecksumError, match=r"fc\.weight|gradients\.rank0"):
        convert_checkpoint(tmp_path / "src", tmp_path / "new")
    assert not (tmp_path / "new").exists()

    write(tmp_path / "old", 3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(CheckpointChecksumError):
        convert_checkpoint(tmp_path / "src", tmp_path / "old", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "src"]


def test_in_place_conversion_and_overwrite(tmp_path: Path) -> None:
    """CKPT-12: converting a checkpoint onto itself needs ``overwrite=True`` (else
    CheckpointError, nothing changed) and then replaces it atomically with the
    same contents in the new format."""
    write(tmp_path / "c", 1)
    want = contents(tmp_path / "c")
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    with pytest.raises(CheckpointError, match="overwrite"):
        convert_checkpoint(tmp_path / "c", tmp_path / "c")
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before
    convert_checkpoint(tmp_path / "c", tmp_path / "c", overwrite=True)
    assert read_checkpoint(tmp_path / "c").manifest.format_version == 3
    assert contents(tmp_path / "c") == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("bad", [0, 4, "3", True, None])
def test_bad_arguments_are_refused_before_anything_is_read(tmp_path: Path, bad: object) -> None:
    """ACC-E: a format version this release does not write, or a non-bool
    ``overwrite``, raises UsageError naming it before the source is looked at (the
    source here does not even exist); nothing is written."""
    missing, dst = tmp_path / "missing", tmp_path / "dst"
    with pytest.raises(UsageError, match="format_version"):
        convert_checkpoint(missing, dst, format_version=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="overwrite"):
        convert_checkpoint(missing, dst, overwrite=1)  # type: ignore[arg-type]
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [None, 123, b"src", ""])
def test_a_source_or_target_that_is_not_a_path_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: object
) -> None:
    """ACC-E: a source or target that is not a non-empty str or os.PathLike raises
    UsageError (never TypeError, and ``""`` is not the current directory)."""
    write(tmp_path / "src", 3)
    monkeypatch.chdir(tmp_path / "src")  # "" must not convert the current directory
    with pytest.raises(UsageError, match="checkpoint path"):
        convert_checkpoint(bad, tmp_path / "dst")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="checkpoint path"):
        convert_checkpoint(tmp_path / "src", bad)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_the_target_is_checked_before_the_source_is_read(tmp_path: Path) -> None:
    """An existing checkpoint as target without ``overwrite`` is refused with
    CheckpointError before the source is read: a source with a corrupt tensor gets the
    target's error, not a checksum error, and the target keeps its bytes."""
    write(tmp_path / "src", 1)
    flip(
        tmp_path / "src" / "model.safetensors",
        data_offset(tmp_path / "src" / "model.safetensors", "fc.weight"),
    )
    write(tmp_path / "old", 3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(CheckpointError, match="overwrite") as caught:
        convert_checkpoint(tmp_path / "src", tmp_path / "old")
    assert not isinstance(caught.value, CheckpointChecksumError)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


@pytest.mark.parametrize("inside", ["x.safetensors", "sub/dst"])
def test_a_target_inside_the_source_is_refused(tmp_path: Path, inside: str) -> None:
    """A target inside the source directory would leave files its manifest does not
    list (its reader refuses those): UsageError, and the source stays valid and as it
    was."""
    write(tmp_path / "src", 3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    with pytest.raises(UsageError, match="inside the source checkpoint"):
        convert_checkpoint(tmp_path / "src", tmp_path / "src" / inside)
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before
    validate_checkpoint(tmp_path / "src")


def test_memory_is_bounded_by_tensors_not_files(tmp_path: Path) -> None:
    """CKPT-23: converting a checkpoint of one 48 MiB file of six 8 MiB tensors
    allocates at most about three tensors' worth (the writer's look-ahead), not
    the file (tracemalloc peak under 32 MiB)."""
    size = 8 * 1024 * 1024
    block = bytes(range(256)) * (size // 256)
    sources = {f"t{i}": TensorSource("U8", (size,), block) for i in range(6)}
    write_checkpoint(
        tmp_path / "src", state=STATE, config=CONFIG, files={"model": sources}, producer=PRODUCER
    )
    tracemalloc.start()
    try:
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", format_version=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, peak
    with read_checkpoint(tmp_path / "dst") as ckpt:
        assert all(
            bytes(t.data) == block for t in decode_safetensors(ckpt.file_bytes("model")).values()
        )


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gradaccum convert SRC DST --format-version N``: exit 0 and ``converted:``;
    an existing target without ``--overwrite`` exits 1 with ``cannot convert:``;
    a corrupt source exits 1 with ``invalid:``; a format it does not write exits 2.
    Never a traceback (CKPT-26, CKPT-20)."""
    write(tmp_path / "src", 3)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert main(["convert", src, dst, "--format-version", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == f"converted: {src} -> {dst} (format 1)\n" and err == ""
    assert read_checkpoint(dst).manifest.format_version == 1
    assert contents(tmp_path / "dst") == contents(tmp_path / "src")

    assert main(["convert", src, dst]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("cannot convert: ") and "pass it" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert main(["convert", src, dst, "--overwrite"]) == 0
    assert read_checkpoint(dst).manifest.format_version == 3
    capsys.readouterr()

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    flip(broken / "model.safetensors", data_offset(broken / "model.safetensors", "fc.weight"))
    assert main(["convert", str(broken), str(tmp_path / "x")]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("invalid: ") and "fc.weight" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y")]) == 1
    assert capsys.readouterr().err.startswith("invalid: ")

    (tmp_path / "file").write_text("not a checkpoint")
    assert main(["convert", src, str(tmp_path / "file"), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cannot convert: ") and "is a file" in err
    assert (tmp_path / "file").read_text() == "not a checkpoint"

    with pytest.raises(SystemExit) as caught:
        raise SystemExit(main(["convert", src, str(tmp_path / "z"), "--format-version", "4"]))
    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_a_target_under_a_symbolic_link_loop_is_a_checkpoint_error(tmp_path: Path) -> None:
    """ACC-E, CKPT-20: a target whose parent is a symbolic-link loop raises
    CheckpointError (not OSError) from the writer and from the converter, and nothing
    is written."""
    write(tmp_path / "src", 3)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(CheckpointError, match="symbolic links"):
        convert_checkpoint(tmp_path / "src", tmp_path / "a" / "dst")
    with pytest.raises(CheckpointError, match=r"Errno"):
        write_checkpoint(
            tmp_path / "a" / "dst",
            state=STATE,
            config=CONFIG,
            files={},
            producer=PRODUCER,
            overwrite=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "src"]
