"""Two processes in Accelerate's MULTI_CPU environment (``ACCELERATE_USE_CPU=1`` and the
torchrun variables, gloo): real ``Accelerator(cpu=True)``, ``prepare`` (a DDP model) and
the adapter, against the float64 large-batch reference over both processes' data; one
gradient reduction per window; ``sync_gradients`` on the boundary only; the scheduler once
per successful step, next to plain Accelerate's ``num_processes`` steps per update.

The processes are launched once for the module; each case writes JSON per rank."""

from __future__ import annotations

import json
from typing import Any

import accelerate_workers as W
import pytest

from gradaccum_accelerate.testing import launch_accelerate

# Unequal item counts across processes and microbatches: 8 microbatches, windows 3, 3, 2.
SIZES = [[2, 5, 1, 3, 4, 2, 6, 1], [3, 1, 4, 1, 5, 9, 2, 6]]
# 9 microbatches: three full windows (plain Accelerate without a prepared dataloader never
# steps a short last window).
SIZES9 = [[2, 5, 1, 3, 4, 2, 6, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
BASE: dict[str, Any] = {
    "normalization": "items",
    "steps": 3,
    "sizes": SIZES,
    "seed": 0,
    "scheduler": True,
}
SPECS: dict[str, dict[str, Any]] = {
    "items": {"stray": True},
    "items_device": {"device_items": "all"},
    "items_mixed": {"device_items": "odd", "passes": 2},
    "mean_short": {"normalization": "mean", "passes": 2},
    # GradScaler(init_scale=2**40) overflows the fp16 backward of window 0; the steep
    # backoff brings the scale to 2**10 so that the later windows step.
    "amp_skip": {"normalization": "mean", "amp": 2.0**40},
    "adapter_schedule": {"normalization": "mean", "sizes": SIZES9},
    "plain_schedule": {"normalization": "mean", "sizes": SIZES9, "plain": True},
}
ADAPTER_EXACT = ["items", "items_device", "items_mixed", "mean_short", "adapter_schedule"]
REL = 1e-12


def spec(name: str) -> dict[str, Any]:
    return {**BASE, "name": name, **SPECS[name]}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("accelerate-train")
    run = launch_accelerate(W.train_program, 2, str(out), [spec(n) for n in SPECS], timeout=180)
    assert run.ok, f"rank processes failed: {run}"
    loaded: dict[str, list[dict[str, Any]]] = {}
    for name in SPECS:
        loaded[name] = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    return loaded


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result.get("error", {}).get("trace")
    return result


def boundaries(length: int, steps: int) -> list[bool]:
    return [j % steps == steps - 1 or j == length - 1 for j in range(length)]


def test_accelerate_runs_two_processes_on_gloo(results: dict[str, list[dict[str, Any]]]) -> None:
    for rank in range(2):
        result = ok(results["items"][rank])
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["num_processes"] == 2


@pytest.mark.parametrize("name", ADAPTER_EXACT)
def test_exact_against_large_batch_over_both_processes(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """ACC-W2, ACC-W3, ACC-N1, ACC-N2, ACC-D3: after every window, on both processes, the
    parameters equal one float64 large-batch step over both processes' microbatches of the
    window (items: divided by the item count over both processes, host, device or mixed
    counts; mean: the mean over processes and microbatches), short last windows included,
    within 1e-12 relative."""
    reference = W.reference(spec(name))
    for rank in range(2):
        got = [w["params"] for w in ok(results[name][rank])["windows"]]
        error = W.worst_error(got, reference)
        assert error <= REL, f"{name} rank {rank}: relative error {error:.3g}"


@pytest.mark.parametrize("name", [*ADAPTER_EXACT, "amp_skip"])
def test_one_reduction_per_window(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    """ACC-D1: exactly one gradient reduction per window (DDP's bucket all-reduce of the
    boundary backward, counted by gradaccum_ddp.testing.ReductionCounter): Accelerate's
    ``no_sync`` holds on every other microbatch."""
    for rank in range(2):
        counts = [w["reductions"] for w in ok(results[name][rank])["windows"]]
        assert counts == [1] * len(counts), f"{name} rank {rank}: reductions per window {counts}"


@pytest.mark.parametrize("name", [*ADAPTER_EXACT, "amp_skip"])
def test_processes_agree_bitwise(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    """ACC-D2, ACC-D4: both processes hold the same parameters, learning rates and loss
    scales after every window, bitwise."""
    assert ok(results[name][0])["windows"] == ok(results[name][1])["windows"]


@pytest.mark.parametrize("name", ADAPTER_EXACT)
def test_sync_gradients_is_true_exactly_on_the_boundary(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """ACC-D1: ``accelerator.sync_gradients`` read inside each ``with acc.microbatch()`` block
    and right after it is True exactly on the microbatch that closes its window."""
    s = spec(name)
    length = len(s["sizes"][0])
    expected = boundaries(length, s["steps"]) * s.get("passes", 1)
    for rank in range(2):
        sync = ok(results[name][rank])["sync"]
        assert [inside for inside, _ in sync] == expected
        assert [after for _, after in sync] == expected


def test_items_total_counts_both_processes(results: dict[str, list[dict[str, Any]]]) -> None:
    """ACC-C4, ACC-D3: under items, items_total is the item count over both processes."""
    for name in ("items", "items_device"):
        for rank in range(2):
            assert ok(results[name][rank])["stats"]["items_total"] == sum(map(sum, SIZES))


@pytest.mark.parametrize("name", ADAPTER_EXACT)
def test_scheduler_steps_once_per_optimizer_step(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """ACC-S3: on 2 processes the prepared scheduler's LambdaLR has stepped exactly as many
    times as the optimizer after every window (Accelerate's wrapper would step it twice)."""
    for rank in range(2):
        result = ok(results[name][rank])
        for window in result["windows"]:
            assert window["last_epoch"] == window["optimizer_steps"]
            assert window["lr"] == W.LR * W.GAMMA ** window["optimizer_steps"]
        assert result["last_epoch"] == result["stats"]["optimizer_steps"] == len(result["windows"])


def test_amp_overflow_skips_optimizer_and_scheduler_on_both(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """ACC-F4, ACC-S3, ACC-D4: fp16 on the CPU (GradScaler('cpu', init_scale=2**40) and
    autocast): window 0 overflows and is skipped on both processes, with no scheduler step;
    the scale backs off to 2**10 and windows 1 and 2 step, the scheduler once each."""
    initial = W.params_json(W.make_model(0, W.torch.float32))
    for rank in range(2):
        result = ok(results["amp_skip"][rank])
        windows = result["windows"]
        assert [w["optimizer_steps"] for w in windows] == [0, 1, 2]
        assert [w["last_epoch"] for w in windows] == [0, 1, 2]
        assert [w["scale"] for w in windows] == [2.0**10] * 3
        assert windows[0]["params"] == initial, "the overflowed window changed the parameters"
        assert windows[1]["params"] != initial
        stats = result["stats"]
        assert (stats["optimizer_steps"], stats["skipped_steps"]) == (2, 1)
        assert result["last_epoch"] == 2


def test_stray_steps_raise_and_do_not_step(results: dict[str, list[dict[str, Any]]]) -> None:
    """ACC-S1, ACC-S3, ACC-E3: on 2 processes ``optimizer.step()`` and ``scheduler.step()`` on
    the prepared objects raise UsageError naming the call to remove; nothing stepped."""
    for rank in range(2):
        stray = ok(results["items"][rank])["stray"]
        assert stray["optimizer"] is not None and "optimizer.step()" in stray["optimizer"]
        assert stray["scheduler"] is not None and "scheduler.step()" in stray["scheduler"]
        assert "remove the call" in stray["optimizer"] and "remove the call" in stray["scheduler"]
        assert stray["unchanged"]


def test_side_by_side_plain_accelerate_steps_the_scheduler_per_process(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """Side by side, ACC-S3: the same 3 updates on 2 processes. Plain Accelerate's prepared
    scheduler steps ``num_processes`` times per update (last_epoch 6, the LR decays twice
    as fast, and the parameters leave the large-batch reference); the adapter's steps once
    (last_epoch 3, exact)."""
    updates = 3
    plain = [ok(results["plain_schedule"][r]) for r in range(2)]
    adapter = [ok(results["adapter_schedule"][r]) for r in range(2)]
    reference = W.reference(spec("adapter_schedule"))
    for rank in range(2):
        assert len(plain[rank]["windows"]) == len(adapter[rank]["windows"]) == updates
        assert plain[rank]["last_epoch"] == 2 * updates
        assert [w["last_epoch"] for w in plain[rank]["windows"]] == [2, 4, 6]
        assert adapter[rank]["last_epoch"] == updates
        assert [w["last_epoch"] for w in adapter[rank]["windows"]] == [1, 2, 3]
    plain_error = W.worst_error([w["params"] for w in plain[0]["windows"]], reference)
    adapter_error = W.worst_error([w["params"] for w in adapter[0]["windows"]], reference)
    lr_plain = plain[0]["windows"][-1]["lr"]
    lr_adapter = adapter[0]["windows"][-1]["lr"]
    print(
        f"\nscheduler on 2 processes, {updates} updates: plain Accelerate last_epoch "
        f"{plain[0]['last_epoch']}, lr {lr_plain:.6g}, params rel. error {plain_error:.3g}; "
        f"adapter last_epoch {adapter[0]['last_epoch']}, lr {lr_adapter:.6g}, "
        f"rel. error {adapter_error:.3g}"
    )
    assert lr_plain == pytest.approx(W.LR * W.GAMMA**6, rel=1e-12)
    assert lr_adapter == pytest.approx(W.LR * W.GAMMA**3, rel=1e-12)
    assert plain_error > 1e-3
    assert adapter_error <= REL
