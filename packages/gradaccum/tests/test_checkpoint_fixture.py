"""The frozen format-version-1 checkpoint stays readable (spec promise CKPT-16)."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest

from gradaccum.checkpoint import RawTensor, read_checkpoint, validate_checkpoint
from gradaccum.errors import CheckpointChecksumError

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-v1-minimal"

# The SHA-256 of each frozen file: a change here means the fixture was edited.
FROZEN = {
    "manifest.json": "7fea2c30ff69ef13f6acd6a29a51ca25132e37f6f48e871768f5c744c950a055",
    "gradients.safetensors": "e44a079f26871e988a8fc2ef5131757dcb29c7c2686e890db0ce3a706ddea92a",
    "optimizer.safetensors": "36745bf68d779f213cace445248778d349f543c9eb47fa072a295831340f27f8",
}


def f32(shape: tuple[int, ...], *values: float) -> RawTensor:
    return RawTensor("F32", shape, struct.pack(f"<{len(values)}f", *values))


def test_fixture_is_untouched() -> None:
    """CKPT-16: the fixture is frozen: its files are exactly those written once."""
    assert {p.name for p in FIXTURE.iterdir()} == set(FROZEN)
    for name, digest in FROZEN.items():
        assert hashlib.sha256((FIXTURE / name).read_bytes()).hexdigest() == digest, name


def test_v1_fixture_reads_with_exact_values() -> None:
    """CKPT-16: the format-version-1 fixture reads, validates and yields
    exactly the values it was written with."""
    ck = read_checkpoint(FIXTURE)
    m = ck.manifest
    assert validate_checkpoint(FIXTURE) == m
    assert (m.format_version, m.spec_version) == (1, "1.0.0")
    assert (ck.producer.name, ck.producer.version) == ("gradaccum-torch", "0.1.0")
    assert m.created_unix == 1795390677.9731083
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
    assert m.files["gradients"].sha256 == FROZEN["gradients.safetensors"]


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


def test_a_corrupted_copy_of_the_fixture_is_refused(tmp_path: Path) -> None:
    """CKPT-7: the same bytes with one bit flipped are refused."""
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    blob = bytearray((copy / "optimizer.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (copy / "optimizer.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointChecksumError, match=r"'optimizer\.safetensors' has SHA-256"):
        read_checkpoint(copy)
