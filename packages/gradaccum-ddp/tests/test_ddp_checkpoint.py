"""Checkpoints on 2 ranks: written once by rank 0, mid-window with every rank's in-flight
gradients; a resume on 2 fresh processes equals the uninterrupted run; a boundary
checkpoint loads into single-process gradaccum-torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ddp_workers as W
import pytest
import torch

from gradaccum.checkpoint import read_checkpoint
from gradaccum.errors import CheckpointMismatchError
from gradaccum_ddp.testing import launch
from gradaccum_torch import Accumulator
from gradaccum_torch.tensor_io import tensors_from_bytes

SPEC: dict[str, Any] = {
    "sizes": [[2, 5, 1, 3, 4, 2, 6, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5]],
    "steps": 3,
    "lr": 0.1,
    "momentum": 0.9,
    "seed": 0,
    "mid": 4,  # after microbatch 4: position 2 of the second window
    "boundary": 5,  # after microbatch 5: the second window has just stepped
}


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-ckpt")
    first = launch(W.checkpoint_program, 2, str(out), SPEC, "run", timeout=120)
    assert first.ok, f"the uninterrupted run failed: {first}"
    second = launch(W.checkpoint_program, 2, str(out), SPEC, "resume", timeout=120)
    assert second.ok, f"the resumed run failed: {second}"
    return out


def _load(out: Path) -> tuple[Path, dict[str, list[Any]]]:
    results = {
        phase: [json.loads((out / f"{phase}.rank{r}.json").read_text()) for r in range(2)]
        for phase in ("run", "resume")
    }
    return out, results


@pytest.fixture(scope="module")
def runs(all_runs: Path) -> tuple[Path, dict[str, list[Any]]]:
    """normalization="items", host and device item counts mixed."""
    return _load(all_runs)


@pytest.fixture(scope="module")
def mean_runs(all_runs: Path) -> tuple[Path, dict[str, list[Any]]]:
    """normalization="mean"."""
    return _load(all_runs / "mean")


def test_resume_mid_window_on_fresh_processes_equals_uninterrupted_run(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    _, results = runs
    for rank in range(2):
        assert results["resume"][rank]["final"] == results["run"][rank]["final"]
        # The window that was open at the checkpoint and the one after it.
        assert results["resume"][rank]["windows"] == results["run"][rank]["windows"][1:]
        assert results["resume"][rank]["stats"] == results["run"][rank]["stats"]


def test_resume_mid_window_under_mean_normalization(
    mean_runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    out, results = mean_runs
    ckpt = read_checkpoint(out / "mid")
    assert {"gradients.rank0", "gradients.rank1"} <= set(ckpt.roles)
    assert not any(role.startswith("items") for role in ckpt.roles)
    for rank in range(2):
        assert results["resume"][rank]["final"] == results["run"][rank]["final"]
        assert results["resume"][rank]["windows"] == results["run"][rank]["windows"][1:]


@pytest.mark.parametrize("normalization", ["items", "mean"])
def test_uninterrupted_run_is_exact(all_runs: Path, normalization: str) -> None:
    _, results = _load(all_runs if normalization == "items" else all_runs / "mean")
    reference = W.reference({**SPEC, "normalization": normalization})
    assert results["run"][0]["windows"] == results["run"][1]["windows"]
    for got, want in zip(results["run"][0]["windows"], reference, strict=True):
        for name, values in want.items():
            scale = max(abs(v) for v in values)
            assert max(abs(a - b) for a, b in zip(got[name], values, strict=True)) <= 1e-12 * scale


def test_mid_window_checkpoint_holds_every_ranks_gradients_and_items(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """CKPT-18, ACC-R2: a mid-window checkpoint of 2 ranks, written by gradaccum-ddp, records
    world_size 2 and holds each rank's own in-flight gradients and device item count under
    gradients.rank<r> and items.rank<r>; its one state says items_in_window 0, device_items."""
    out, results = runs
    ckpt = read_checkpoint(out / "mid")
    assert ckpt.world_size == 2
    assert ckpt.producer.name == "gradaccum-ddp"
    assert {"gradients.rank0", "gradients.rank1", "items.rank0", "items.rank1"} <= set(ckpt.roles)
    assert {"model", "optimizer"} <= set(ckpt.roles)
    assert not any(role.startswith("gradients") and "rank" not in role for role in ckpt.roles)
    g0 = tensors_from_bytes(ckpt.file_bytes("gradients.rank0"))
    g1 = tensors_from_bytes(ckpt.file_bytes("gradients.rank1"))
    assert set(g0) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not torch.equal(g0["0.weight"], g1["0.weight"]), "in-flight gradients differ by rank"
    # Window 2 holds microbatches 3 and 4 at the checkpoint: each rank's own item count.
    sizes = SPEC["sizes"]
    for rank in range(2):
        items = tensors_from_bytes(ckpt.file_bytes(f"items.rank{rank}"))["items"]
        assert items.dtype == torch.float64
        assert float(items) == sizes[rank][3] + sizes[rank][4]
    state = dict(ckpt.state)
    assert state["position"] == 2 and state["items_in_window"] == 0 and state["device_items"]
    assert results["run"][0]["mid_state"]["position"] == 2


def _single_process(path: Path, steps: int = SPEC["steps"]) -> Accumulator:
    model = W.make_model(123)
    opt = torch.optim.SGD(model.parameters(), lr=SPEC["lr"], momentum=SPEC["momentum"])
    acc = Accumulator(model, opt, steps=steps, normalization="items")
    acc.load(path)
    return acc


def test_boundary_checkpoint_loads_into_single_process_gradaccum_torch(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R5, CKPT-18: a boundary checkpoint of 2 DDP ranks (no gradient in flight) loads into
    a single-process gradaccum-torch Accumulator, which continues as one large batch."""
    out, results = runs
    # steps=6: one single-process window takes both ranks' 3 microbatches (the global batch).
    acc = _single_process(out / "boundary", steps=6)
    assert W.params_json(acc.model) == results["run"][0]["boundary_params"]
    assert acc.machine.state_dict() == results["run"][0]["boundary_state"]
    assert acc.stats.items_total == sum(SPEC["sizes"][r][j] for r in range(2) for j in range(6))
    # The single process continues exactly like one large batch: window 3 on both ranks' data.
    window = [6, 7, 8]
    reference = W.reference({**SPEC, "normalization": "items"})[-1]
    for rank in range(2):
        for j in window:
            x, y = W.microbatch(SPEC["seed"], rank, j, SPEC["sizes"][rank][j])
            with acc.microbatch(SPEC["sizes"][rank][j]):
                acc.backward(W.loss_fn(acc.model(x), y, "items"))
    got = W.params_json(acc.model)
    for name, values in reference.items():
        scale = max(abs(v) for v in values)
        assert max(abs(a - b) for a, b in zip(got[name], values, strict=True)) <= 1e-12 * scale


def test_mid_window_checkpoint_refuses_another_world_size(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R5, CKPT-18: a mid-window checkpoint of 2 ranks is refused by a single process."""
    out, _ = runs
    with pytest.raises(CheckpointMismatchError, match="2 rank"):
        _single_process(out / "mid")
