"""Two gloo ranks on loopback (torch.multiprocessing): exactness against the float64
large-batch reference over the global batch, one reduction per window, ranks that agree."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ddp_workers as W
import pytest

from gradaccum_ddp.testing import launch

# Unequal item counts across ranks and across microbatches; 9 microbatches, 3 windows of 3.
SIZES = [[2, 5, 1, 3, 4, 2, 6, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
BASE: dict[str, Any] = {
    "normalization": "items",
    "steps": 3,
    "sizes": SIZES,
    "lr": 0.1,
    "momentum": 0.9,
    "seed": 0,
}
SPECS: dict[str, dict[str, Any]] = {
    "items": {},
    "items_device": {"device_items": True},
    "mean": {"normalization": "mean"},
    "short_last": {"sizes": [s[:7] for s in SIZES], "passes": 2},  # windows 3, 3, 1 per pass
    "unknown_length": {"unknown_length": True, "sizes": [s[:8] for s in SIZES]},
    "lockstep_window": {"lockstep": "window"},
    "manual_end_pass": {"manual_end_pass": True, "sizes": [s[:5] for s in SIZES]},
    "offload": {"offload": True},
    "clip_per_microbatch": {"clip_per_microbatch": True},
    "nan_one_rank": {"nan": [1, 4], "skip_windows": [1]},
    "amp_inf_one_rank": {"nan": [1, 7], "skip_windows": [2], "amp": True},
}
REL = 1e-12


def spec(name: str) -> dict[str, Any]:
    return {**BASE, "name": name, **SPECS[name]}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp-train")
    run = launch(W.train_program, 2, str(out), [spec(n) for n in SPECS], timeout=180)
    assert run.ok, f"rank processes failed: {run}"
    loaded: dict[str, list[dict[str, Any]]] = {}
    for name in SPECS:
        loaded[name] = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    return loaded


def rel_error(got: dict[str, list[float]], want: dict[str, list[float]]) -> float:
    """max |got - want| / max |want| over every tensor."""
    worst = 0.0
    for name, ref in want.items():
        scale = max(abs(v) for v in ref) or 1.0
        diff = max(abs(a - b) for a, b in zip(got[name], ref, strict=True))
        worst = max(worst, diff / scale)
    return worst


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result.get("error", {}).get("trace")
    return result


@pytest.mark.parametrize("name", list(SPECS))
def test_trajectory_equals_large_batch_reference(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Parameters after every window on 2 ranks equal one float64 large-batch step over the
    global batch (both ranks' microbatches), within 1e-12 relative."""
    reference = W.reference(spec(name))
    for rank in range(2):
        windows = ok(results[name][rank])["windows"]
        assert len(windows) == len(reference), f"rank {rank}: {len(windows)} windows"
        for index, (window, want) in enumerate(zip(windows, reference, strict=True)):
            error = rel_error(window["params"], want)
            assert error <= REL, f"{name} rank {rank} window {index}: relative error {error:.3g}"


@pytest.mark.parametrize("name", list(SPECS))
def test_exactly_one_reduction_per_window(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    for rank in range(2):
        counts = [w["reductions"] for w in ok(results[name][rank])["windows"]]
        assert counts == [1] * len(counts), f"{name} rank {rank}: reductions per window {counts}"


@pytest.mark.parametrize("name", list(SPECS))
def test_ranks_agree_bitwise_and_on_counters(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """ACC-D2, ACC-D4: in every run (a NaN or an AMP overflow on one rank included) both ranks
    hold the same parameters, loss scales and learning rates after every window, bitwise, and
    end with the same counters (the per-rank item counts aside)."""
    zero, one = ok(results[name][0]), ok(results[name][1])
    assert zero["windows"] == one["windows"], "parameters, scales or lrs differ between ranks"
    per_rank = {"items_total", "items_in_window"} if SPECS[name].get("normalization") else set()
    stats0 = {k: v for k, v in zero["stats"].items() if k not in per_rank}
    stats1 = {k: v for k, v in one["stats"].items() if k not in per_rank}
    assert stats0 == stats1


def test_items_total_is_the_global_count(results: dict[str, list[dict[str, Any]]]) -> None:
    """ACC-C4: under items on 2 ranks, items_total is the item count over both ranks, on each."""
    for rank in range(2):
        assert ok(results["items"][rank])["stats"]["items_total"] == sum(map(sum, SIZES))


def test_one_rank_nan_skips_the_step_on_both_ranks(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """ACC-D4, ACC-F1: a NaN in one microbatch of rank 1 skips window 1 on both ranks."""
    for rank in range(2):
        result = ok(results["nan_one_rank"][rank])
        assert result["stats"]["skipped_steps"] == 1
        assert result["stats"]["optimizer_steps"] == 2
        steps = [w["optimizer_steps"] for w in result["windows"]]
        assert steps == [1, 1, 2]


def test_amp_overflow_on_one_rank_skips_on_both_with_equal_scales(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """ACC-D4, ACC-F4: an AMP overflow on rank 1 skips the window on both ranks, whose loss
    scales stay equal."""
    scales = [[w["scale"] for w in ok(results["amp_inf_one_rank"][r])["windows"]] for r in (0, 1)]
    assert scales[0] == scales[1]
    # growth_interval=1: the scale doubles after each step and halves after the overflow.
    assert scales[0] == [2.0**11, 2.0**12, 2.0**11]
    for rank in range(2):
        assert ok(results["amp_inf_one_rank"][rank])["stats"]["skipped_steps"] == 1


def test_short_last_window_is_exact_and_identical(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    zero, one = ok(results["short_last"][0]), ok(results["short_last"][1])
    assert zero["stats"]["epoch"] == one["stats"]["epoch"] == 2
    assert zero["stats"]["optimizer_steps"] == 6  # 3 + 3 + 1 microbatches, twice
    assert zero["windows"][-1] == one["windows"][-1]
    assert not math.isnan(zero["windows"][-1]["params"]["0.weight"][0])


def test_buckets_were_counted(results: dict[str, list[dict[str, Any]]]) -> None:
    assert ok(results["items"][0])["buckets"] >= 3


def test_results_are_files_not_pickles(tmp_path: Path) -> None:
    """launch() itself: exit codes, results through files."""
    run = launch(W.world_one_program, 1, str(tmp_path), timeout=60)
    assert run.ok and run.exitcodes == [0]
    assert json.loads((tmp_path / "hello.rank0.json").read_text()) == {"rank": 0}
