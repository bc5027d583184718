"""A checkpoint is valid only when its state and config are ones an adapter
can load: the reader, the validator, the writer and ``gradaccum validate``
run the core's own checks (``AccumulationState.from_state_dict``,
``AccumulationConfig.from_dict``, ``Schedule.check_state``) and give their
reason verbatim (spec promises CKPT-9, CKPT-10, CKPT-14; ACC-R4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gradaccum.checkpoint import (
    Producer,
    RawTensor,
    encode_safetensors,
    read_checkpoint,
    validate_checkpoint,
    write_checkpoint,
)
from gradaccum.checkpoint.format import manifest_sidecar
from gradaccum.cli import main
from gradaccum.config import AccumulationConfig
from gradaccum.errors import CheckpointCorruptError, ConfigError, UsageError
from gradaccum.machine import AccumulationMachine
from gradaccum.state import AccumulationState

PRODUCER = Producer("gradaccum-test", "1.0.0")
FIXED: dict[str, Any] = {
    "schedule": {"kind": "fixed", "steps": 4},
    "normalization": "mean",
    "partial_window": "step",
    "non_finite": "skip",
}
ADAPTIVE: dict[str, Any] = {
    "schedule": {"kind": "adaptive", "target": 8, "micro_batch": 4, "min_micro_batch": 2},
    "normalization": "items",
    "partial_window": "step",
    "non_finite": "skip",
}
ADAPTIVE_STATE = {"micro_batch": 4, "clean_windows": 1, "ooms": 0}


def reseal(ckpt: Path) -> None:
    """Rewrite ``manifest.sha256`` for the edited manifest (CKPT-21), so that
    the checks behind the manifest checksum are reached."""
    raw = (ckpt / "manifest.json").read_bytes()
    (ckpt / "manifest.sha256").write_bytes(manifest_sidecar(raw))


def good_state(**changes: Any) -> dict[str, Any]:
    """A possible mid-window state: microbatch 2 of 4 after two stepped windows."""
    state: dict[str, Any] = {
        "version": 1,
        "epoch": 0,
        "position": 2,
        "window_size": 4,
        "contributing": 2,
        "items_in_window": 0,
        "items_total": 0,
        "micro_steps": 10,
        "optimizer_steps": 2,
        "skipped_steps": 0,
        "windows": 2,
        "dropped_microbatches": 0,
        "dropped_windows": 0,
        "synced_in_window": False,
        "device_items": False,
        "schedule_state": {},
    }
    state.update(changes)
    return state


# (id, config, state, the field the reason names)
IMPOSSIBLE: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    (
        "position-equals-window-size",
        FIXED,
        good_state(position=3, window_size=3, contributing=3),
        "position=3",
    ),
    (
        "position-without-window",
        FIXED,
        good_state(position=2, window_size=0, contributing=1),
        "position=2",
    ),
    (
        "contributing-exceeds-position",
        FIXED,
        good_state(position=1, contributing=2),
        "contributing=2",
    ),
    ("steps-do-not-add-up", FIXED, good_state(skipped_steps=1), "skipped_steps=1"),
    ("synced-between-microbatches", FIXED, good_state(synced_in_window=True), "synced_in_window"),
    (
        "adaptive-micro-batch-out-of-range",
        ADAPTIVE,
        good_state(schedule_state={**ADAPTIVE_STATE, "micro_batch": 16}),
        "micro_batch=16",
    ),
    (
        "adaptive-state-missing-key",
        ADAPTIVE,
        good_state(schedule_state={"micro_batch": 4}),
        "adaptive schedule state",
    ),
    (
        "stateless-schedule-with-state",
        FIXED,
        good_state(schedule_state={"k": 4}),
        "'fixed' schedule keeps no state",
    ),
]
IDS = [case[0] for case in IMPOSSIBLE]


def core_reason(config: dict[str, Any], state: dict[str, Any]) -> str:
    """The reason the core gives when an adapter's ``load`` meets ``state``:
    the ConfigError of ``AccumulationMachine.load_state_dict``."""
    machine = AccumulationMachine(AccumulationConfig.from_dict(config))
    with pytest.raises(ConfigError) as info:
        machine.load_state_dict(state)
    return str(info.value)


def files() -> dict[str, bytes]:
    return {"gradients": encode_safetensors({"w": RawTensor("U8", (3,), b"abc")})}


def impossible_checkpoint(path: Path, config: dict[str, Any], state: dict[str, Any]) -> None:
    """Write a valid checkpoint, then put ``state`` into its manifest. The
    manifest is covered by no checksum (the sizes and SHA-256s it records
    are those of the tensor files, which stay untouched), so only the state
    check can refuse the result."""
    valid = good_state(schedule_state=ADAPTIVE_STATE if config is ADAPTIVE else {})
    write_checkpoint(path, state=valid, config=config, files=files(), producer=PRODUCER)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    doc["state"] = state
    manifest.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    reseal(path)


@pytest.mark.parametrize(("name", "config", "state", "field"), IMPOSSIBLE, ids=IDS)
def test_reader_and_validator_refuse_what_load_refuses(
    tmp_path: Path, name: str, config: dict[str, Any], state: dict[str, Any], field: str
) -> None:
    """CKPT-9, ACC-R4: a state the core refuses is refused by read_checkpoint
    and validate_checkpoint with the core's reason, verbatim, and the
    ConfigError chained."""
    reason = core_reason(config, state)
    assert field in reason
    path = tmp_path / "ckpt"
    impossible_checkpoint(path, config, state)
    for reader in (read_checkpoint, validate_checkpoint):
        with pytest.raises(CheckpointCorruptError) as info:
            reader(path)
        message = str(info.value)
        assert message.startswith(f"checkpoint at '{path}': $.state")
        assert reason in message
        assert isinstance(info.value.__cause__, ConfigError)
        assert str(info.value.__cause__) == reason


@pytest.mark.parametrize(("name", "config", "state", "field"), IMPOSSIBLE, ids=IDS)
def test_cli_validate_refuses_what_load_refuses(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    config: dict[str, Any],
    state: dict[str, Any],
    field: str,
) -> None:
    """CKPT-9: ``gradaccum validate`` exits 1 and says invalid, naming the
    field and giving the core's reason, without a traceback; ``inspect``
    refuses it too."""
    path = tmp_path / "ckpt"
    impossible_checkpoint(path, config, state)
    assert main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"invalid: checkpoint at '{path}': $.state")
    assert core_reason(config, state) in captured.err
    assert field in captured.err
    assert "Traceback" not in captured.err
    assert main(["inspect", str(path)]) == 1
    assert core_reason(config, state) in capsys.readouterr().err


@pytest.mark.parametrize(("name", "config", "state", "field"), IMPOSSIBLE, ids=IDS)
def test_writer_refuses_what_load_refuses(
    tmp_path: Path, name: str, config: dict[str, Any], state: dict[str, Any], field: str
) -> None:
    """CKPT-14: the writer refuses the same states, with the same reason,
    before anything is created."""
    with pytest.raises(UsageError) as info:
        write_checkpoint(
            tmp_path / "ckpt", state=state, config=config, files=files(), producer=PRODUCER
        )
    assert core_reason(config, state) in str(info.value)
    assert "nothing was written" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("config", "state"),
    [
        (FIXED, good_state()),
        (FIXED, good_state(position=0, window_size=0, contributing=0)),
        # A window opened by a microbatch that was then cancelled.
        (FIXED, good_state(position=0, window_size=4, contributing=0)),
        (FIXED, good_state(skipped_steps=1, windows=3, dropped_microbatches=1, contributing=1)),
        (ADAPTIVE, good_state(schedule_state=ADAPTIVE_STATE, device_items=True)),
    ],
    ids=["mid-window", "boundary", "opened-window", "skips-and-drops", "adaptive"],
)
def test_possible_states_round_trip(
    tmp_path: Path, config: dict[str, Any], state: dict[str, Any]
) -> None:
    """CKPT-9: every state the core accepts is written, read, validated and
    loaded back unchanged."""
    path = tmp_path / "ckpt"
    write_checkpoint(path, state=state, config=config, files=files(), producer=PRODUCER)
    ck = read_checkpoint(path)
    assert dict(ck.state) == state
    assert validate_checkpoint(path) == ck.manifest
    machine = AccumulationMachine(AccumulationConfig.from_dict(ck.config))
    machine.load_state_dict(ck.state)
    assert machine.state_dict() == state
    assert machine.state == AccumulationState.from_state_dict(state)


def test_states_the_machine_saves_are_valid(tmp_path: Path) -> None:
    """CKPT-9: a state saved by the machine at every idle point of a run
    (mid-window, boundaries, a partial window closed at the end of a pass)
    is a valid checkpoint."""
    config = AccumulationConfig.from_dict(FIXED)
    machine = AccumulationMachine(config)
    path = tmp_path / "ckpt"
    for i in range(7):
        machine.begin()
        if machine.end() is not None:
            machine.commit()
        write_checkpoint(
            path, state=machine.state_dict(), config=config.to_dict(), files={}, producer=PRODUCER
        )
        assert dict(read_checkpoint(path).state) == machine.state_dict(), i
    if machine.end_pass().action == "close":
        machine.commit()
    write_checkpoint(
        path, state=machine.state_dict(), config=config.to_dict(), files={}, producer=PRODUCER
    )
    assert read_checkpoint(path).state["epoch"] == 1


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({**FIXED, "normalization": "median"}, "normalization='median' is not a known choice"),
        ({**FIXED, "surprise": 1}, "surprise"),
        ({**FIXED, "schedule": {"kind": "fixed", "steps": 0}}, "accumulation steps=0"),
        ({**FIXED, "schedule": {"kind": []}}, "$.config is invalid"),
    ],
    ids=["unknown-normalization", "unknown-key", "zero-steps", "malformed-kind"],
)
def test_config_an_adapter_cannot_parse_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, Any], reason: str
) -> None:
    """CKPT-10: the config is parsed by ``AccumulationConfig.from_dict`` on
    read (and write): one it refuses makes the checkpoint invalid."""
    path = tmp_path / "ckpt"
    write_checkpoint(path, state=good_state(), config=FIXED, files=files(), producer=PRODUCER)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    doc["config"] = config
    manifest.write_text(json.dumps(doc), encoding="utf-8")
    reseal(path)
    with pytest.raises(CheckpointCorruptError, match=r"\$\.config is invalid") as info:
        read_checkpoint(path)
    assert reason in str(info.value)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("invalid: ")
    assert reason in err
    with pytest.raises(UsageError, match=r"\$\.config is invalid"):
        write_checkpoint(tmp_path / "new", state=good_state(), config=config, files={},
                         producer=PRODUCER)  # fmt: skip
