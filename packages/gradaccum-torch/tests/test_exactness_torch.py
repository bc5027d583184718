"""Adapter-level exactness beyond the conformance suite: the idioms (tensor
item counts, unknown pass length, offload, fp32 accumulation) compute the
same window gradient (spec ACC-N3, ACC-W4, ACC-P1, ACC-P2)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import Batch, make_batches, make_model, mean_loss, params_of, sum_loss

from gradaccum import AccumulationCallback, AccumulationStats
from gradaccum_torch import Accumulator

SIZES = [3, 2, 4, 1, 3, 2, 5, 2, 3, 1, 2]


def _train(
    batches: list[Batch], *, iterable: Any = None, tensor_items: bool = False, **options: Any
) -> torch.nn.Module:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = Accumulator(model, opt, **options)
    source = batches if iterable is None else iterable
    for batch in acc.iterate(source):
        n = len(batch[0])
        with acc.microbatch(items=torch.tensor(n) if tensor_items else n):
            loss = (
                sum_loss(model, batch)
                if acc.config.normalization == "items"
                else mean_loss(model, batch)
            )
            acc.backward(loss)
    return model


def test_steps_one_is_bitwise_a_plain_loop() -> None:
    """ACC-K1: steps=1 gives exactly the plain loop's parameters (no extra arithmetic)."""
    batches = make_batches(SIZES)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        mean_loss(model, batch).backward()
        opt.step()
    plain = params_of(model)
    ours = params_of(_train(batches, steps=1))
    assert all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True))


def test_tensor_and_int_item_counts_agree() -> None:
    """ACC-N3: a device tensor count gives the int count's result to 1e-15."""
    batches = make_batches(SIZES)
    a = params_of(_train(batches, steps=4, normalization="items"))
    b = params_of(_train(batches, steps=4, normalization="items", tensor_items=True))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-15, atol=1e-16)


def test_unknown_pass_length_matches_known_length() -> None:
    """ACC-W4: a generator (no len) gets the short last window right via the boundary correction."""
    batches = make_batches(SIZES)
    for normalization in ("mean", "items"):
        known = params_of(_train(batches, steps=4, normalization=normalization))
        unknown = params_of(
            _train(batches, iterable=(b for b in batches), steps=4, normalization=normalization)
        )
        for x, y in zip(known, unknown, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


def test_offload_gives_the_same_parameters() -> None:
    """ACC-P2: CPU offload changes where the sum lives, not its value."""
    batches = make_batches(SIZES)
    a = params_of(_train(batches, steps=4, normalization="items"))
    b = params_of(_train(batches, steps=4, normalization="items", offload=True))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-15, atol=1e-16)


def _window_grad(dtype: torch.dtype, **options: Any) -> list[torch.Tensor]:
    """The gradient the optimizer sees after one 16-microbatch window."""
    model = make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[torch.Tensor] = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.extend(
            p.grad.double().clone() for p in model.parameters() if p.grad is not None
        )
    )
    acc = Accumulator(model, opt, steps=16, normalization="sum", **options)
    for batch in make_batches([8] * 16, dtype=dtype, seed=4):
        with acc.microbatch():
            acc.backward(mean_loss(model, batch) * 1000)
    return seen


def _exact_sum_of_bf16_grads() -> list[torch.Tensor]:
    """The float64 sum of the bf16 model's own per-microbatch gradients."""
    model = make_model(torch.bfloat16)
    total: list[torch.Tensor] = []
    for batch in make_batches([8] * 16, dtype=torch.bfloat16, seed=4):
        model.zero_grad(set_to_none=True)
        (mean_loss(model, batch) * 1000).backward()
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        total = grads if not total else [t + g for t, g in zip(total, grads, strict=True)]
    return total


def test_fp32_accumulation_is_more_accurate_for_bf16_parameters() -> None:
    """ACC-P1: accumulating bf16 gradients in fp32 lands closer to their exact sum;
    what remains is one bf16 rounding of the final gradient."""
    exact = _exact_sum_of_bf16_grads()
    plain = _window_grad(torch.bfloat16)
    fp32 = _window_grad(torch.bfloat16, accumulation_dtype="float32")

    def err(got: list[torch.Tensor]) -> float:
        return max(
            ((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, exact, strict=True)
        )

    assert err(fp32) <= 2**-8  # half a bf16 ulp, relative to the largest entry
    assert err(plain) > 2 * err(fp32)


class Recorder(AccumulationCallback):
    """Records every event with the counters it saw."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def on_microbatch(self, stats: AccumulationStats) -> None:
        self.events.append(("microbatch", stats.micro_steps, stats.optimizer_steps))

    def on_step(self, stats: AccumulationStats) -> None:
        self.events.append(("step", stats.micro_steps, stats.effective_step))

    def on_skip(self, stats: AccumulationStats, reason: str) -> None:
        self.events.append((f"skip:{reason}", stats.micro_steps, stats.optimizer_steps))

    def on_epoch_end(self, stats: AccumulationStats) -> None:
        self.events.append(("epoch_end", stats.micro_steps, stats.optimizer_steps))


def test_events_arrive_in_order_with_counters() -> None:
    """ACC-C2, ACC-C3, ACC-S2: one on_microbatch per microbatch, one on_step per step
    (effective_step counts them), one on_skip per skipped window, one on_epoch_end per pass."""
    recorder = Recorder()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, steps=2, listeners=[recorder])
    batches = make_batches([2, 2, 2, 2, 2])
    poisoned = (batches[2][0] * float("nan"), batches[2][1])
    for batch in acc.iterate([batches[0], batches[1], poisoned, batches[3], batches[4]]):
        with acc.microbatch():
            acc.backward(mean_loss(model, batch))
    assert recorder.events == [
        ("microbatch", 1, 0),
        ("microbatch", 2, 0),
        ("step", 2, 1),
        ("microbatch", 3, 1),
        ("microbatch", 4, 1),
        ("skip:non_finite", 4, 1),
        ("microbatch", 5, 1),
        ("step", 5, 2),
        ("epoch_end", 5, 2),
    ]
    assert acc.stats.skipped_steps == 1 and acc.effective_step == 2
    # The default check is a fused kernel, not a norm: no norm is recorded (ACC-L3).
    assert acc.stats.last_grad_norm is None


def test_track_grad_norm_records_the_pre_clip_norm_lazily() -> None:
    """ACC-L3: with track_grad_norm the boundary keeps the pre-clip total norm as a device
    scalar; it equals torch's own norm of the window gradient before the step."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the window gradient stays in view
    seen: list[float] = []

    def before_step(acc: Accumulator) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    acc = Accumulator(model, opt, steps=2, track_grad_norm=True, before_step=before_step)
    results = []
    for batch in acc.iterate(make_batches([2, 3, 4, 1])):
        with acc.microbatch():
            results.append(acc.backward(mean_loss(model, batch)))
    norms = [r.grad_norm for r in results if r.boundary]
    assert all(isinstance(n, torch.Tensor) and n.dim() == 0 for n in norms)
    assert [float(n) for n in norms] == pytest.approx(seen, rel=1e-12)
    assert acc.stats.last_grad_norm == pytest.approx(seen[-1], rel=1e-12)


def test_device_item_counts_reach_the_counters_and_empty_windows_skip() -> None:
    """ACC-C4, ACC-N6: items counted on the device are in items_total after the step,
    and a window whose device counts are all zero is empty: skipped, parameters untouched."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    acc = Accumulator(model, opt, steps=2, normalization="items")
    batches = make_batches([3, 2, 4, 1])
    for batch in batches[:2]:
        with acc.microbatch(items=torch.tensor(len(batch[0]))):
            acc.backward(sum_loss(model, batch))
    assert acc.stats.optimizer_steps == 1
    assert acc.stats.items_total == 5
    before = params_of(model)
    for batch in batches[2:]:
        with acc.microbatch(items=torch.tensor(0)):
            acc.backward(sum_loss(model, batch) * 0)
    assert (acc.stats.optimizer_steps, acc.stats.skipped_steps) == (1, 1)
    assert acc.stats.items_total == 5
    # AdamW's weight decay would have moved the parameters had the empty window stepped.
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True))
