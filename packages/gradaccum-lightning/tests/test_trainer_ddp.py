"""GradAccum under ``Trainer(strategy="ddp", devices=2)`` on two spawned gloo CPU ranks
(torchrun's environment: Lightning launches nothing and keeps the process group): exact
against the float64 large-batch reference over both ranks' items, one gradient reduction
per window, and a mid-window ``trainer.save_checkpoint`` that resumes bitwise on two fresh
ranks with every rank's in-flight gradients. One launch runs every case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_workers as W
from torch.utils.data import DataLoader

from gradaccum import CheckpointMismatchError
from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import launch_lightning

# Unequal item counts across ranks and microbatches: 9 microbatches, windows of 3.
SIZES = [[2, 5, 1, 3, 4, 2, 6, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
RESUME: dict[str, Any] = {
    "name": "resume",
    "kind": "resume",
    "normalization": "items",
    "device_items": True,
    "sizes": SIZES,
    "steps": 3,
    "seed": 0,
    "mid": 4,
}
SPECS: list[dict[str, Any]] = [
    {
        "name": "items",
        "kind": "train",
        "normalization": "items",
        "device_items": True,
        "sizes": SIZES,
        "steps": 3,
        "seed": 0,
    },
    {
        # 7 microbatches per pass: windows 3, 3, 1 (short), two passes.
        "name": "mean_short",
        "kind": "train",
        "normalization": "mean",
        "sizes": [s[:7] for s in SIZES],
        "steps": 3,
        "seed": 0,
        "passes": 2,
    },
    # The "items" run, checkpointed after microbatch 4 (2 microbatches into window 1).
    RESUME,
    # The same, saved with GradAccum.save, then resume= with a plain train loader on rank 0
    # and a stateful one on rank 1.
    {**RESUME, "name": "resume_dir_refused", "kind": "resume_dir_refused"},
]
REL = 1e-12


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Any]]]:
    out = tmp_path_factory.mktemp("lightning-ddp")
    run = launch_lightning(W.ddp_program, 2, str(out), SPECS, timeout=240)
    assert run.ok, f"rank processes failed: {run}"
    loaded: dict[str, list[Any]] = {}
    for spec in SPECS:
        ranks = [json.loads((out / f"{spec['name']}.rank{r}.json").read_text()) for r in range(2)]
        for rank, result in enumerate(ranks):
            assert "error" not in result, f"rank {rank}: {result.get('error', {}).get('trace')}"
        loaded[spec["name"]] = ranks
    return out, loaded


def _tensors(data: dict[str, list[float]], like: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {n: torch.tensor(v, dtype=torch.float64).reshape(like[n].shape) for n, v in data.items()}


@pytest.mark.parametrize("name", ["items", "mean_short"])
def test_two_ranks_equal_the_large_batch_with_one_reduction_per_window(
    results: tuple[Path, dict[str, list[Any]]], name: str
) -> None:
    """ACC-D1, ACC-D3, ACC-N1, ACC-N2, ACC-W3: every window equals one float64 step on
    both ranks' microbatches of the window (``items``: over both ranks' items, with int and
    0-d tensor counts; ``mean``: two passes whose short last window is exact), both ranks
    hold the same parameters, DDP reduces gradients once per window (the boundary's
    backward), and ``trainer.global_step`` counts optimizer steps."""
    _, loaded = results
    spec = next(s for s in SPECS if s["name"] == name)
    rank0, rank1 = loaded[name]
    assert rank0["windows"] == rank1["windows"]
    want = W.reference(
        spec["sizes"], spec["steps"], spec["normalization"], passes=spec.get("passes", 1)
    )
    assert len(rank0["windows"]) == len(want)
    for window, (got, ref) in enumerate(zip(rank0["windows"], want, strict=True)):
        error = W.rel_error(_tensors(got, ref), ref)
        assert error <= REL, f"window {window}: {error:.2e}"
    for rank in (rank0, rank1):
        assert rank["reductions"] == [1] * len(want)
        assert rank["global_steps"] == list(range(1, len(want) + 1))
        assert rank["global_step"] == len(want)
    if name == "items":
        assert rank0["stats"]["items_total"] == sum(map(sum, SIZES))


def test_mid_window_checkpoint_resumes_bitwise_on_two_ranks(
    results: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R2, ACC-R3, ACC-R5: ``trainer.save_checkpoint`` on both ranks after microbatch 4
    (window 1 holds microbatches 3 and 4 of each rank) writes one file whose GradAccum state
    holds each rank's own in-flight gradients and item count; two fresh ranks (another
    initialisation) resumed with ``fit(ckpt_path=...)`` end bitwise where the
    uninterrupted run ends, window by window, with one reduction per window."""
    out, loaded = results
    straight = loaded["items"]
    for rank, result in enumerate(loaded["resume"]):
        assert result["first"]["seen"][-1] == [0, 4]
        assert result["first"]["global_step"] == 1
        assert result["windows"] == straight[rank]["windows"][1:]
        assert result["final"] == straight[rank]["windows"][-1]
        assert result["global_step"] == 3
        assert result["reductions"] == [1, 1]
        assert result["stats"]["items_total"] == straight[rank]["stats"]["items_total"]
    state = torch.load(out / "resume.ckpt", weights_only=False)["callbacks"]["GradAccum"]
    assert state["world_size"] == 2
    assert state["accumulation"]["position"] == 2
    grads = state["gradients"]
    assert set(grads) == {0, 1}
    assert not torch.equal(grads[0]["model.0.weight"], grads[1]["model.0.weight"])
    for rank in range(2):
        assert float(state["items"][rank]) == SIZES[rank][3] + SIZES[rank][4]


def test_a_resume_one_rank_refuses_is_refused_on_every_rank_before_loading(
    results: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R2, ACC-E, ACC-D: ``GradAccum(resume=dir)`` of a mid-window checkpoint where
    only rank 0's train loader is plain (rank 1's is stateful, which alone would be
    accepted): the ranks decide together, so both raise ConfigError — rank 0 naming
    ``resume=`` and the way out, rank 1 naming rank 0 — instead of rank 1 entering the
    load's collectives alone; neither rank's module was touched, and neither rank's
    accumulator holds the checkpoint's open window."""
    _, loaded = results
    rank0, rank1 = loaded["resume_dir_refused"]
    assert rank0["raised"]["type"] == rank1["raised"]["type"] == "ConfigError", (rank0, rank1)
    assert "GradAccum(resume=" in rank0["raised"]["message"]
    assert "allow_replay=True" in rank0["raised"]["message"]
    assert "nothing was loaded" in rank0["raised"]["message"]
    assert "rank(s) [0] refused to resume" in rank1["raised"]["message"]
    assert "nothing was loaded" in rank1["raised"]["message"]
    assert rank0["unchanged"] and rank1["unchanged"]
    assert rank0["position"] == rank1["position"] == 0


def test_a_two_rank_mid_window_checkpoint_on_one_process_names_the_world_size_first(
    results: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R5, CKPT-18: the 2-rank mid-window checkpoint of the case above, resumed with
    ``GradAccum(resume=dir)`` on one process with a plain train loader, is refused for its
    world size (CheckpointMismatchError naming both), not sent to ``allow_replay=True``,
    which could not help; the module keeps its parameters."""
    out, _ = results
    module = W.Net("items", seed=5, device_items=True)
    before = W.params(module)
    ga = GradAccum(steps=3, normalization="items", resume=out / "resume_dir_refused-shared")
    plain = DataLoader(W.batches(SIZES[0]), batch_size=None)  # type: ignore[arg-type]
    with pytest.raises(CheckpointMismatchError, match=r"mid-window on 2 rank\(s\).*not 1"):
        W.trainer([ga]).fit(module, plain)
    after = W.params(module)
    assert all(torch.equal(before[n], after[n]) for n in before)
