"""The frozen checkpoints of format versions 1, 2 and 3 stay readable (spec promises
CKPT-16, CKPT-25, CKPT-26)."""

from __future__ import annotations

import binascii
import hashlib
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from gradaccum.checkpoint import RawTensor, read_checkpoint, validate_checkpoint
from gradaccum.errors import CheckpointChecksumError

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-v1-minimal"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "checkpoint-v2-minimal"
FIXTURE_V3 = Path(__file__).parent / "fixtures" / "checkpoint-v3-minimal"

# The SHA-256 of each frozen file: a change here means the fixture was edited.
FROZEN = {
    "manifest.json": "7fea2c30ff69ef13f6acd6a29a51ca25132e37f6f48e871768f5c744c950a055",
    "gradients.safetensors": "e44a079f26871e988a8fc2ef5131757dcb29c7c2686e890db0ce3a706ddea92a",
    "optimizer.safetensors": "36745bf68d779f213cace445248778d349f543c9eb47fa072a295831340f27f8",
}


# The same for the format-version-2 fixture (its tensor files are the v1 fixture's bytes).
FROZEN_V2 = {
    "manifest.json": "7059522d5545c4fa2049731b87f7ba4ed397bdbaa3240eac98b2e5c2bc884ca0",
    "manifest.sha256": "cb6c645fcec401b20acc0a016f928028b54a7903359516a1ddc4f989cf14ca4a",
    "gradients.safetensors": FROZEN["gradients.safetensors"],
    "optimizer.safetensors": FROZEN["optimizer.safetensors"],
}


# The same for the format-version-3 fixture (its tensor files are the v1 fixture's bytes).
FROZEN_V3 = {
    "manifest.json": "0827bb8243e34390b43e6c29363733351f1f4eee043eb456e7f72626f1baff9d",
    "manifest.sha256": "e7f2f5ed4fc35c241861bbb025d302239573a5da42b0dc2bb726616c468c2e4e",
    "gradients.safetensors": FROZEN["gradients.safetensors"],
    "optimizer.safetensors": FROZEN["optimizer.safetensors"],
}


def f32(shape: tuple[int, ...], *values: float) -> RawTensor:
    return RawTensor("F32", shape, struct.pack(f"<{len(values)}f", *values))


@pytest.mark.parametrize(
    ("fixture", "frozen"), [(FIXTURE, FROZEN), (FIXTURE_V2, FROZEN_V2), (FIXTURE_V3, FROZEN_V3)]
)
def test_fixture_is_untouched(fixture: Path, frozen: dict[str, str]) -> None:
    """CKPT-16: each fixture is frozen: its files are exactly those written once."""
    assert {p.name for p in fixture.iterdir()} == set(frozen)
    for name, digest in frozen.items():
        assert hashlib.sha256((fixture / name).read_bytes()).hexdigest() == digest, name


def test_v1_fixture_reads_with_exact_values() -> None:
    """CKPT-16: the format-version-1 fixture reads, validates and yields
    exactly the values it was written with."""
    ck = read_checkpoint(FIXTURE)
    m = ck.manifest
    assert validate_checkpoint(FIXTURE) == m
    assert (m.format_version, m.spec_version) == (1, "1.0.0")
    assert (ck.producer.name, ck.producer.version) == ("gradaccum-torch", "0.1.0")
    assert m.created_unix == 1795390677.9731083
    assert not ck.manifest_protected
    assert_fixture_values(ck)
    assert m.files["gradients"].sha256 == FROZEN["gradients.safetensors"]


def test_v2_fixture_reads_with_exact_values() -> None:
    """CKPT-16, CKPT-25: the format-version-2 fixture reads, validates and
    yields exactly the values it was written with — the v1 fixture's — and
    records each file's header digest instead of its whole-file digest."""
    ck = read_checkpoint(FIXTURE_V2)
    m = ck.manifest
    assert validate_checkpoint(FIXTURE_V2) == m
    assert (m.format_version, m.spec_version) == (2, "2.0.0")
    assert (ck.producer.name, ck.producer.version) == ("gradaccum", "0.1.0")
    assert m.created_unix == 1795994366.5574777
    assert ck.manifest_protected
    assert_fixture_values(ck)
    assert {role: e.header_sha256 for role, e in m.files.items()} == {
        "gradients": "94d8a0b94d95b590feabeedbe3b228ab9a091be5af2350f699702380ef58663e",
        "optimizer": "5ebc94df29a736534789c2a4a3a9316c3a51308e71ad4d7d744abf22e737a1a0",
    }
    assert all(e.sha256 is None for e in m.files.values())
    v1 = read_checkpoint(FIXTURE).manifest
    for role, entry in m.files.items():
        assert entry.tensors == v1.files[role].tensors


def test_v3_fixture_reads_with_exact_values() -> None:
    """CKPT-16, CKPT-26: the format-version-3 fixture reads, validates and
    yields exactly the values it was written with — the v1 fixture's —,
    records the same header SHA-256 as format 2 and, for each tensor, the
    CRC-32 of its data bytes (8 hex digits, equal to binascii's)."""
    ck = read_checkpoint(FIXTURE_V3)
    m = ck.manifest
    assert validate_checkpoint(FIXTURE_V3) == m
    assert (m.format_version, m.spec_version) == (3, "3.0.0")
    assert (ck.producer.name, ck.producer.version) == ("gradaccum", "0.1.0")
    assert m.created_unix == 1796002544.3346503
    assert ck.manifest_protected
    assert_fixture_values(ck)
    v2 = read_checkpoint(FIXTURE_V2).manifest
    assert {r: e.header_sha256 for r, e in m.files.items()} == {
        r: e.header_sha256 for r, e in v2.files.items()
    }
    assert {r: e.tensor_digest for r, e in m.files.items()} == {
        "gradients": "crc32",
        "optimizer": "crc32",
    }
    digests = {(r, n): t.digest for r, e in m.files.items() for n, t in e.tensors.items()}
    assert digests == {
        ("gradients", "fc.bias"): "ca647683",
        ("gradients", "fc.weight"): "87487c0d",
        ("optimizer", "state.fc.weight.exp_avg"): "a2b15a27",
        ("optimizer", "state.fc.weight.step"): "2707d814",
    }
    for (role, name), digest in digests.items():
        assert f"{binascii.crc32(ck.tensors(role)[name].data):08x}" == digest


def assert_fixture_values(ck: Any) -> None:
    """The values all three fixtures were written with."""
    m = ck.manifest
    assert ck.world_size == 1
    assert dict(ck.state) == {
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
        "device_items": False,
    }
    assert dict(ck.config) == {
        "schedule": {"kind": "fixed", "steps": 4},
        "normalization": "mean",
        "partial_window": "step",
        "non_finite": "skip",
        "clip": None,
        "weights": {"by_name": {}, "by_group": {}},
        "accumulation_dtype": "param",
        "offload": False,
        "micro_batch_size": 32,
    }
    assert dict(ck.metadata) == {
        "optimizer": {
            "param_groups": [
                {"lr": 0.001, "betas": [0.9, 0.999], "params": ["fc.weight", "fc.bias"]}
            ]
        },
        "scheduler": {"last_epoch": 2},
    }
    assert ck.roles == ("gradients", "optimizer")
    assert ck.tensors("gradients") == {
        "fc.bias": f32((3,), 0.25, -0.25, 0.0),
        "fc.weight": f32((2, 3), 0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
    }
    assert ck.tensors("optimizer") == {
        "state.fc.weight.exp_avg": f32((2, 3), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
        "state.fc.weight.step": RawTensor("I64", (), struct.pack("<q", 2)),
    }
    assert {role: e.size for role, e in m.files.items()} == {"gradients": 172, "optimizer": 232}


def test_v1_fixture_resumes_in_the_core() -> None:
    """CKPT-16: the fixture's state and config still parse in the core, so a
    run can resume from it."""
    config_mod = pytest.importorskip("gradaccum.config")
    state_mod = pytest.importorskip("gradaccum.state")
    ck = read_checkpoint(FIXTURE)
    config = config_mod.AccumulationConfig.from_dict(ck.config)
    assert config.to_dict() == dict(ck.config)
    state = state_mod.AccumulationState.from_state_dict(ck.state)
    assert (state.position, state.window_size, state.micro_steps) == (3, 4, 11)


@pytest.mark.parametrize(
    ("fixture", "match"),
    [
        (FIXTURE, r"file 'optimizer\.safetensors' has SHA-256"),
        (FIXTURE_V2, r"tensor 'state\.fc\.weight\.exp_avg' in 'optimizer\.safetensors' has SHA"),
        (FIXTURE_V3, r"tensor 'state\.fc\.weight\.exp_avg' in 'optimizer\.safetensors' has CRC"),
    ],
)
def test_a_corrupted_copy_of_the_fixture_is_refused(
    tmp_path: Path, fixture: Path, match: str
) -> None:
    """CKPT-7, CKPT-25, CKPT-26: the same bytes with one bit flipped are
    refused (format 1 by the whole-file digest, formats 2 and 3 by the digest
    of the tensor holding the byte)."""
    copy = tmp_path / "copy"
    shutil.copytree(fixture, copy)
    blob = bytearray((copy / "optimizer.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (copy / "optimizer.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointChecksumError, match=match):
        read_checkpoint(copy)
