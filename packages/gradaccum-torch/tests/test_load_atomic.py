"""`Accumulator.load` is all or nothing (issue 8 section 2; CKPT-17, ACC-E).

Every case writes a real mid-window checkpoint with `Accumulator.save`,
changes one thing in it — re-sealed, so every checksum is valid and only the
loader's own checks stand between the bad value and the live objects — and
loads it into live objects in another state: the load raises a
`GradAccumError` and the model, optimizer, scheduler, scaler and accumulator
(state, stats, in-flight gradients, item count) are bitwise unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from ckpt_helpers import (
    assert_same,
    build,
    live_objects,
    mid_window_checkpoint,
    parts,
    reseal,
    snapshot,
    train,
)

from gradaccum.checkpoint import (
    MANIFEST_SHA256_NAME,
    Producer,
    read_checkpoint,
    read_safetensors_header,
    write_checkpoint,
)
from gradaccum.errors import CheckpointChecksumError, CheckpointError, GradAccumError, UsageError
from gradaccum_torch import Accumulator
from gradaccum_torch.checkpoint import collect

Mutation = Callable[[dict[str, Any]], None]


def _tensors(p: dict[str, Any], role: str) -> dict[str, torch.Tensor]:
    return dict(safetensors.torch.load(p["files"][role]))


def _put(p: dict[str, Any], role: str, tensors: dict[str, torch.Tensor]) -> None:
    p["files"][role] = safetensors.torch.save(tensors)


def _group(p: dict[str, Any]) -> dict[str, Any]:
    group: dict[str, Any] = p["metadata"]["optimizer"]["param_groups"][0]
    return group


def _set_group(key: str, value: Any) -> Mutation:
    return lambda p: _group(p).__setitem__(key, value)


def _sched(p: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = p["metadata"]["scheduler"]["state"]
    return state


def _set_sched(key: str, value: Any) -> Mutation:
    return lambda p: _sched(p).__setitem__(key, value)


def _drop_meta(role: str, key: str) -> Mutation:
    return lambda p: p["metadata"][role].pop(key)


def _scaler(key: str, value: Any) -> Mutation:
    return lambda p: p["metadata"]["scaler"]["state"].__setitem__(key, value)


def _reshape(role: str, pick: Callable[[str], bool]) -> Mutation:
    def mutate(p: dict[str, Any]) -> None:
        tensors = _tensors(p, role)
        name = next(n for n in sorted(tensors) if pick(n))
        tensors[name] = tensors[name].reshape(-1)[:-1].clone()
        _put(p, role, tensors)

    return mutate


def _retype(role: str, dtype: torch.dtype) -> Mutation:
    def mutate(p: dict[str, Any]) -> None:
        tensors = _tensors(p, role)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].to(dtype)
        _put(p, role, tensors)

    return mutate


def _rename(role: str) -> Mutation:
    def mutate(p: dict[str, Any]) -> None:
        tensors = _tensors(p, role)
        name = sorted(tensors)[-1]
        tensors["bogus.weight"] = tensors.pop(name)
        _put(p, role, tensors)

    return mutate


def _drop_tensor(role: str, pick: Callable[[str], bool]) -> Mutation:
    def mutate(p: dict[str, Any]) -> None:
        tensors = _tensors(p, role)
        del tensors[next(n for n in sorted(tensors) if pick(n))]
        _put(p, role, tensors)

    return mutate


def _items(value: float) -> Mutation:
    return lambda p: _put(p, "items", {"items": torch.tensor(value, dtype=torch.float64)})


def _set_step(value: float) -> Mutation:
    def mutate(p: dict[str, Any]) -> None:
        tensors = _tensors(p, "optimizer")
        name = next(n for n in sorted(tensors) if n.endswith(".step"))
        tensors[name] = torch.tensor(value, dtype=tensors[name].dtype)
        _put(p, "optimizer", tensors)

    return mutate


MUTATIONS: dict[str, Mutation] = {
    # the findings
    "scheduler metadata without state": _drop_meta("scheduler", "state"),
    "scaler metadata without state": _drop_meta("scaler", "state"),
    "lr is a string": _set_group("lr", "0.01"),
    "lr is infinite": _set_group("lr", {"float": "inf"}),
    "lr is negative": _set_group("lr", -0.5),
    "betas has one item": _set_group("betas", [0.9]),
    "beta is 1.5": _set_group("betas", [1.5, 0.999]),
    "betas is a string": _set_group("betas", "0.9,0.999"),
    "StepLR step_size 0": _set_sched("step_size", 0),
    "StepLR step_size 2.5": _set_sched("step_size", 2.5),
    # more of the same kind
    "weight_decay is null": _set_group("weight_decay", None),
    # found by the 10,000-example fuzz run: finite as JSON, inf as float32, the step crashed
    "weight_decay 1e300 on float32 parameters": _set_group("weight_decay", 1e300),
    "amsgrad is a number": _set_group("amsgrad", 1),
    "unknown optimizer option holds an object": _set_group("bogus", {"a": 1}),
    "optimizer class": lambda p: p["metadata"]["optimizer"].__setitem__("class", "SGD"),
    "optimizer groups missing": _drop_meta("optimizer", "param_groups"),
    "optimizer metadata missing": lambda p: p["metadata"].pop("optimizer"),
    "group params renamed": lambda p: _group(p).__setitem__(
        "params", ["x", *_group(p)["params"][1:]]
    ),
    "scheduler class": lambda p: p["metadata"]["scheduler"].__setitem__("class", "LambdaLR"),
    "scheduler overrides a method": _set_sched("step", 5),
    "scheduler last_epoch is a string": _set_sched("last_epoch", "3"),
    "scheduler base_lrs too long": _set_sched("base_lrs", [0.01, 0.01]),
    "scheduler gamma infinite": _set_sched("gamma", {"float": "inf"}),
    "scheduler metadata is a list": lambda p: p["metadata"].__setitem__("scheduler", [1]),
    "scaler scale 0": _scaler("scale", 0.0),
    "scaler growth_interval 0": _scaler("growth_interval", 0),
    "scaler state empty": lambda p: p["metadata"]["scaler"].__setitem__("state", {}),
    "model aliases not an object": lambda p: p["metadata"].__setitem__(
        "model", {"aliases": [1, 2]}
    ),
    "model tensor reshaped": _reshape("model", lambda n: n.endswith("weight")),
    "model tensor int64": _retype("model", torch.int64),
    "model tensor renamed": _rename("model"),
    "model tensor missing": _drop_tensor("model", lambda n: True),
    "optimizer state reshaped": _reshape("optimizer", lambda n: n.endswith("exp_avg")),
    "optimizer state field missing": _drop_tensor("optimizer", lambda n: n.endswith("sq")),
    "optimizer step negative": _set_step(-1.0),
    "optimizer step NaN": _set_step(float("nan")),
    "optimizer state renamed": _rename("optimizer"),
    "gradient reshaped": _reshape("gradients", lambda n: True),
    "gradient int64": _retype("gradients", torch.int64),
    "gradient of an unknown parameter": _rename("gradients"),
    "item count negative": _items(-3.0),
    "item count infinite": _items(float("inf")),
    "item count two tensors": lambda p: _put(
        p, "items", {"items": torch.tensor(1.0, dtype=torch.float64), "x": torch.zeros(())}
    ),
    "item count a vector": lambda p: _put(p, "items", {"items": torch.ones(2)}),
    "mid-window under another world size": lambda p: p.__setitem__("world_size", 2),
    "mid-window under another normalization": lambda p: p["config"].__setitem__(
        "normalization", "mean"
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mid_window_checkpoint(tmp_path_factory.mktemp("atomic") / "mid", scaler=True)


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_refused_load_changes_nothing(base: Path, tmp_path: Path, case: str) -> None:
    """ACC-E/CKPT-17/CKPT-24: a checkpoint with one bad value (checksums valid) raises a
    GradAccumError and model, optimizer, scheduler, scaler and accumulator stay
    bitwise what they were."""
    p = parts(base)
    MUTATIONS[case](p)
    bad = reseal(
        base,
        tmp_path / "bad",
        state=p["state"],
        config=p["config"],
        metadata=p["metadata"],
        files=p["files"],
        world_size=p["world_size"],
    )
    live = live_objects(scaler=True)
    before = snapshot(live)
    with pytest.raises(GradAccumError):
        live[1].load(bad)
    assert_same(before, snapshot(live))


def test_unmutated_reseal_loads(base: Path, tmp_path: Path) -> None:
    """Control for the cases above: the re-sealed, unchanged checkpoint loads and
    resumes exactly where it was saved (position 2, 2 steps, StepLR epoch 2)."""
    good = reseal(base, tmp_path / "good")
    model, acc = live_objects(scaler=True)
    acc.load(good)
    assert acc.stats.position == 2 and acc.stats.optimizer_steps == 2
    assert acc.scheduler is not None and acc.scheduler.last_epoch == 2
    reference = build(0, scaler=True)
    train(reference, 8)
    assert_same(snapshot(reference), snapshot((model, acc)))


def test_failure_while_applying_puts_everything_back(base: Path) -> None:
    """ACC-E, CKPT-24: when applying fails after the optimizer was replaced (a real
    load_state_dict post-hook of the optimizer raises once), the error is a
    CheckpointError and the optimizer, scheduler, scaler, model and accumulator
    are bitwise as before."""
    live = live_objects(scaler=True)
    before = snapshot(live)
    calls = []

    def fail_once(optimizer: torch.optim.Optimizer) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")

    live[1].optimizer.register_load_state_dict_post_hook(fail_once)
    with pytest.raises(CheckpointError, match="applying it failed"):
        live[1].load(base)
    assert len(calls) == 2  # applied, then put back
    assert_same(before, snapshot(live))


def test_scheduler_probe_refuses_a_state_that_breaks_the_next_step(tmp_path: Path) -> None:
    """ACC-E, CKPT-24: a ConstantLR state whose next step divides by zero (factor 0 with
    total_iters reached next: no range check knows ConstantLR's fields) is
    refused by the trial step, which is undone: lr and everything else
    bitwise unchanged."""

    def constant(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=10)

    saved = build(0, scheduler=constant)
    train(saved, 4)
    saved[1].save(tmp_path / "ckpt")
    p = parts(tmp_path / "ckpt")
    state = p["metadata"]["scheduler"]["state"]
    assert state["last_epoch"] == 1
    state.update(factor=0.0, total_iters=2)
    bad = reseal(tmp_path / "ckpt", tmp_path / "bad", metadata=p["metadata"])
    live = build(3, scheduler=constant)
    train(live, 2)
    before = snapshot(live)
    with pytest.raises(CheckpointError, match=r"ZeroDivisionError|learning rate"):
        live[1].load(bad)
    assert_same(before, snapshot(live))


def test_checkpoint_of_an_older_writer_still_loads(base: Path, tmp_path: Path) -> None:
    """CKPT-16: a checkpoint as gradaccum-torch wrote it before manifest checksums
    (spec 1.1.0, no manifest.sha256, files built in memory by safetensors) loads
    and resumes bitwise where it was saved."""
    live = build(0, scaler=True)
    train(live, 8)
    files, metadata = collect(
        live[1], model=True, optimizer=True, scheduler=True, scaler=True, stream=False
    )
    assert all(isinstance(data, bytes) for data in files.values())
    write_checkpoint(
        tmp_path / "old",
        state=live[1].machine.state_dict(),
        config=live[1].config.to_dict(),
        files=files,
        producer=Producer("gradaccum-torch", "0.1.0"),
        metadata=metadata,
        format_version=1,  # what writers before format 2 wrote
    )
    (tmp_path / "old" / MANIFEST_SHA256_NAME).unlink()
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest["spec_version"] = "1.1.0"
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    model, acc = live_objects(scaler=True)
    acc.load(tmp_path / "old")
    assert_same(snapshot(live), snapshot((model, acc)))


def test_frozen_v1_fixture_is_refused_cleanly_by_a_model_it_does_not_fit() -> None:
    """CKPT-16/CKPT-17: the frozen v1 fixture (a gradients file for fc.weight [2, 3]
    and fc.bias [3]) still reads, and loading it into a torch model it does not
    fit raises a GradAccumError with everything unchanged."""
    fixture = (
        Path(__file__).parents[2] / "gradaccum" / "tests" / "fixtures" / "checkpoint-v1-minimal"
    )
    assert read_checkpoint(fixture).state["position"] == 3
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(2, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    acc = Accumulator(model, opt, steps=4)
    before = snapshot((model, acc))
    with pytest.raises(GradAccumError):
        acc.load(fixture)
    assert_same(before, snapshot((model, acc)))


@pytest.mark.parametrize("role", ["optimizer", "gradients", "items", "model"])
def test_a_flipped_data_byte_in_any_file_changes_nothing(
    base: Path, tmp_path: Path, role: str
) -> None:
    """CKPT-7, CKPT-26, ACC-E: a byte flipped in the last tensor of the
    optimizer, gradient, item-count or model file (not re-sealed: the CRC-32
    no longer matches) raises CheckpointChecksumError naming the file, though
    the optimizer state and gradients are read straight into new tensors
    (the earlier tensors of the file already read); everything stays bitwise
    what it was."""
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    f = bad / f"{role}.safetensors"
    header = read_safetensors_header(f.read_bytes())
    last = max(header.tensors.values(), key=lambda info: info.end)
    blob = bytearray(f.read_bytes())
    blob[header.data_start + last.end - 1] ^= 0x01
    f.write_bytes(bytes(blob))
    live = live_objects(scaler=True)
    before = snapshot(live)
    with pytest.raises(CheckpointChecksumError, match=rf"'{role}\.safetensors' has CRC-32"):
        live[1].load(bad)
    assert_same(before, snapshot(live))


def test_loaded_state_owns_its_memory(base: Path, tmp_path: Path) -> None:
    """CKPT-23: what a load installs is its own memory, not a view of the
    checkpoint's files — overwriting every file in place after the load
    changes no parameter, optimizer state or gradient (a shared mapping
    would show the new bytes) — and training resumes exactly on the
    uninterrupted run's trajectory."""
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(base, copy_dir)
    model, acc = live_objects(scaler=True)
    acc.load(copy_dir)
    loaded = snapshot((model, acc))
    for f in copy_dir.glob("*.safetensors"):
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.write(b"\xff" * size)
    assert_same(loaded, snapshot((model, acc)))
    reference = build(0, scaler=True)
    train(reference, 8)
    train(reference, 5, seed=3)
    train((model, acc), 5, seed=3)
    assert_same(snapshot(reference), snapshot((model, acc)))


def _state_tensors(acc: Accumulator) -> dict[str, torch.Tensor]:
    out = {f"grad.{n}": g for n, g in acc.gradients.export().items()}
    for param, per in acc.optimizer.state.items():
        for field, value in per.items():
            if isinstance(value, torch.Tensor):
                out[f"{id(param)}.{field}"] = value
    return out


def test_a_running_accumulator_is_loaded_in_place(base: Path) -> None:
    """CKPT-23, issue 8 section 3: loading into a running accumulator, whose
    optimizer state and in-flight gradients exist with the checkpoint's
    shapes and dtypes, reads into those very tensors (same objects, same
    memory: no second copy of the state at any time), and the run resumes
    exactly on the uninterrupted trajectory; a fresh accumulator (nothing to
    load into) gets new tensors and resumes the same."""
    model, acc = live_objects(scaler=True)
    before = _state_tensors(acc)
    pointers = {k: v.data_ptr() for k, v in before.items()}
    acc.load(base)
    after = _state_tensors(acc)
    assert set(after) == set(before)
    assert all(after[k] is before[k] and after[k].data_ptr() == pointers[k] for k in before)
    fresh = build(5, scaler=True)
    assert not fresh[1].optimizer.state
    fresh[1].load(base)
    assert_same(snapshot(fresh), snapshot((model, acc)))
    reference = build(0, scaler=True)
    train(reference, 8)
    for live in (reference, (model, acc), fresh):
        train(live, 5, seed=3)
    assert_same(snapshot(reference), snapshot((model, acc)))
    assert_same(snapshot(reference), snapshot(fresh))


def test_an_io_fault_while_copying_in_place_says_what_may_be_partly_loaded(
    base: Path, tmp_path: Path
) -> None:
    """ACC-E, CKPT-24: everything is verified before anything changes; if the
    optimizer file is cut short after that (here: truncated between
    prepare_load and apply), the in-place copy fails with a CheckpointError
    that says the model, optimizer state and gradients may be partly
    loaded, and the accumulation state and scheduler are put back."""
    from gradaccum_torch.checkpoint import prepare_load

    copy_dir = tmp_path / "ckpt"
    shutil.copytree(base, copy_dir)
    model, acc = live_objects(scaler=True)
    before = snapshot((model, acc))
    plan = prepare_load(acc, copy_dir)
    assert [role for role, _ in plan.in_place] == ["gradients", "optimizer"]
    assert_same(before, snapshot((model, acc)))  # prepared: nothing changed yet
    os.truncate(copy_dir / "optimizer.safetensors", 100)
    with pytest.raises(CheckpointError, match="optimizer state and in-flight gradients"):
        plan.apply()
    after = snapshot((model, acc))
    for part in ("machine", "stats", "scheduler", "scaler", "groups"):
        assert_same(before[part], after[part], part)


def test_a_failing_model_hook_leaves_a_running_accumulator_as_it_was(base: Path) -> None:
    """ACC-E, CKPT-24: the model is copied before the optimizer state and
    gradients are read in place, so a model load_state_dict hook that raises
    gives a CheckpointError naming the model alone, and the optimizer,
    gradients, scheduler, scaler and accumulator are bitwise as before."""
    model, acc = live_objects(scaler=True)
    before = snapshot((model, acc))

    def refuse(module: torch.nn.Module, keys: Any) -> None:
        raise RuntimeError("hook says no")

    model.register_load_state_dict_post_hook(refuse)
    with pytest.raises(CheckpointError, match="but the model may be partly loaded"):
        acc.load(base)
    after = snapshot((model, acc))
    for part in before:
        if part != "model":
            assert_same(before[part], after[part], part)


def test_apply_in_place_needs_apply_reversible_first(base: Path) -> None:
    """ACC-E: LoadPlan.apply_in_place without a successful apply_reversible is
    a UsageError and writes nothing into the live tensors."""
    from gradaccum_torch.checkpoint import prepare_load

    model, acc = live_objects(scaler=True)
    before = snapshot((model, acc))
    plan = prepare_load(acc, base)
    try:
        with pytest.raises(UsageError, match="needs a successful apply_reversible"):
            plan.apply_in_place()
    finally:
        plan.close()
    assert_same(before, snapshot((model, acc)))


def test_overlapping_live_state_is_not_loaded_in_place(base: Path) -> None:
    """CKPT-23: when two live optimizer state tensors share memory (here
    exp_avg and exp_avg_sq of one parameter made the same tensor), the load
    does not read into them in place: it installs new tensors and resumes
    exactly on the uninterrupted trajectory."""
    model, acc = live_objects(scaler=True)
    first = next(iter(acc.optimizer.state.values()))
    first["exp_avg_sq"] = first["exp_avg"]
    shared = first["exp_avg"]
    acc.load(base)
    state = next(iter(acc.optimizer.state.values()))
    assert state["exp_avg"] is not shared and state["exp_avg_sq"] is not shared
    assert state["exp_avg"].data_ptr() != state["exp_avg_sq"].data_ptr()
    reference = build(0, scaler=True)
    train(reference, 8)
    train(reference, 5, seed=3)
    train((model, acc), 5, seed=3)
    assert_same(snapshot(reference), snapshot((model, acc)))
