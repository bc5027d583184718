"""The ``gradaccum`` command line: inspect and validate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradaccum.checkpoint import (
    Producer,
    RawTensor,
    encode_safetensors,
    read_checkpoint,
    write_checkpoint,
)
from gradaccum.checkpoint.format import manifest_sidecar
from gradaccum.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-v1-minimal"
SRC = Path(__file__).resolve().parents[1] / "src"


def reseal(ckpt: Path) -> None:
    """Rewrite ``manifest.sha256`` for the edited manifest (CKPT-21), so that
    the checks behind the manifest checksum are reached."""
    raw = (ckpt / "manifest.json").read_bytes()
    (ckpt / "manifest.sha256").write_bytes(manifest_sidecar(raw))


@pytest.fixture
def corrupted(tmp_path: Path) -> Path:
    copy = tmp_path / "corrupted"
    shutil.copytree(FIXTURE, copy)
    blob = bytearray((copy / "gradients.safetensors").read_bytes())
    blob[-2] ^= 0xFF
    (copy / "gradients.safetensors").write_bytes(blob)
    return copy


@pytest.mark.parametrize(
    ("fixture", "line"),
    [
        ("checkpoint-v1-minimal", "1 (spec 1.0.0)\ndata checked by  SHA-256 of each file and"),
        ("checkpoint-v2-minimal", "2 (spec 2.0.0)\ndata checked by  SHA-256 of each header and"),
        ("checkpoint-v3-minimal", "3 (spec 3.0.0)\ndata checked by  SHA-256 of each header, CRC"),
    ],
)  # fmt: skip
def test_inspect_names_the_digests_of_each_format(
    capsys: pytest.CaptureFixture[str], fixture: str, line: str
) -> None:
    """CKPT-25, CKPT-26: ``inspect`` says which digests check a checkpoint's data."""
    assert main(["inspect", str(FIXTURE.parent / fixture)]) == 0
    assert f"format version   {line}" in capsys.readouterr().out


def test_inspect_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "format version   1 (spec 1.0.0)" in out
    assert "producer         gradaccum-torch 0.1.0" in out
    assert "world size       1" in out
    assert "microbatch 3 of 4 in the open window (3 contributing, 96 items" in out
    assert "1795390677.9731083" in out
    for line in [
        "micro_steps           11",
        "optimizer_steps       2",
        "items_total           256",
    ]:
        assert line in out
    assert 'schedule            {"kind": "fixed", "steps": 4}' in out
    assert "normalization       mean" in out
    assert "gradients  gradients.safetensors  172    2" in out
    assert "gradients  fc.weight                F32    [2, 3]" in out
    assert "optimizer  state.fc.weight.step     I64    []" in out
    assert 'scheduler  {"last_epoch": 2}' in out


def test_inspect_at_window_boundary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = dict(read_checkpoint(FIXTURE).state)
    state.update(position=0, window_size=0, contributing=0, items_in_window=0)
    blob = encode_safetensors({"w": RawTensor("BF16", (0,), b"")})
    write_checkpoint(
        tmp_path / "c", state=state, config=dict(read_checkpoint(FIXTURE).config),
        files={"model": blob}, producer=Producer("other-stack", "2.0"), world_size=4,
    )  # fmt: skip
    assert main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "position         at a window boundary\n" in out
    assert "other-stack 2.0" in out
    assert "world size       4" in out
    assert "model  w     BF16   [0]" in out


def test_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(FIXTURE)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((FIXTURE / "manifest.json").read_text())


def test_validate_good(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(FIXTURE)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"valid: {FIXTURE}\n"
    assert captured.err == ""


def test_validate_corrupted(corrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(corrupted)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"invalid: checkpoint at '{corrupted}': file ")
    assert "'gradients.safetensors' has SHA-256" in captured.err
    assert "restore it from a copy" in captured.err


def test_inspect_corrupted(corrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(corrupted)]) == 1
    assert "has SHA-256" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_missing_path(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"no checkpoint at '{tmp_path / 'nope'}': the path does not exist" in err


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["validate"], ["inspect"], ["validate", "a", "b"], ["--bogus"]]
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: gradaccum" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert "(checkpoint format 3, spec 3.0.0)" in capsys.readouterr().out


def test_python_dash_m(corrupted: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    good = subprocess.run(
        [sys.executable, "-m", "gradaccum", "validate", str(FIXTURE)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert (good.returncode, good.stdout, good.stderr) == (0, f"valid: {FIXTURE}\n", "")
    bad = subprocess.run(
        [sys.executable, "-m", "gradaccum", "validate", str(corrupted)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.startswith("invalid: ")


def test_python_dash_m_refuses_a_state_load_refuses(tmp_path: Path) -> None:
    """CKPT-9: a checkpoint whose state no adapter can load (a window whose
    last microbatch ran but that never closed) is invalid for the command
    too: exit 1, the core's reason naming the field, no traceback."""
    copy = tmp_path / "full-window"
    shutil.copytree(FIXTURE, copy)
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    manifest["state"].update(position=4, contributing=4, micro_steps=12)
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    reseal(copy)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    bad = subprocess.run(
        [sys.executable, "-m", "gradaccum", "validate", str(copy)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr.startswith(f"invalid: checkpoint at '{copy}': $.state is invalid: ")
    assert (
        "accumulation state position=4 with window_size=4 is impossible between microbatches"
        in bad.stderr
    )
    assert "Traceback" not in bad.stderr
