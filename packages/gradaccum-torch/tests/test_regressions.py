"""Regression tests for the promises of spec 1.1.0 (ACC-L2, ACC-P1, ACC-E5,
ACC-N8, ACC-B5, ACC-N9, ACC-E4, CKPT-19 and the loop-facing API of section 2).

Each test names the promise it proves and asserts it with numbers against a
reference built in the test itself (a float64 large-batch step computed by
hand, or the same run without the failed or discarded data). Every test here
failed on the code before the fix (commit a1ffce4) unless its docstring says
the old code already kept that part of the promise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Batch, make_batches, make_model, max_rel_dev, mean_loss, params_of, sum_loss

from gradaccum import AccumulationConfig, ClipPolicy, ConfigError, GradientWeights, ItemCountError
from gradaccum.checkpoint import read_checkpoint
from gradaccum_torch import Accumulator

# -- shared helpers ---------------------------------------------------------------


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of every ``.grad`` (zeros where none)."""
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
    ]


def _global_norm(grads: list[torch.Tensor]) -> float:
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def _sgd_step(model: torch.nn.Module, grads: list[torch.Tensor], lrs: list[float]) -> None:
    """``p -= lr * g``: what ``torch.optim.SGD`` without momentum does."""
    with torch.no_grad():
        for p, g, lr in zip(model.parameters(), grads, lrs, strict=True):
            p.add_(g, alpha=-lr)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _phase(acc: Accumulator) -> Any:
    """The machine's phase (it also sees an open microbatch); the code before spec 1.1
    kept it only in the state, so that an old-code run fails on the promise, not on this."""
    return getattr(acc.machine, "phase", acc.machine.state.phase)


def _idle(acc: Accumulator) -> bool:
    return str(acc.machine.state.phase.value) == str(_phase(acc).value) == "idle"


# -- 1. ACC-L2: per-microbatch clipping in float64 --------------------------------

CLIP_MAX = 1.5  # the microbatch gradient norms of these batches range 0.5 .. 5.9


def _clipped(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float]:
    """``torch.nn.utils.clip_grad_norm_`` semantics: coef = min(1, max / (norm + 1e-6))."""
    coef = min(1.0, max_norm / (_global_norm(grads) + 1e-6))
    return [g * coef for g in grads], coef


def _per_microbatch_reference(
    batches: list[Batch], k: int, normalization: str, lr: float
) -> tuple[list[torch.Tensor], list[float]]:
    """Parameters after SGD steps on windows of ``k`` microbatches, each
    microbatch's own mean-loss gradient clipped and combined as ACC-L2 says
    (mean: (1/c) Σ clip(ḡ_j); items: Σ n_j clip(ḡ_j) / N; sum: Σ clip(ḡ_j)),
    in float64; and every clip coefficient used."""
    model = make_model()
    coefs: list[float] = []
    for start in range(0, len(batches), k):
        window = batches[start : start + k]
        total = [torch.zeros_like(p) for p in model.parameters()]
        items = 0
        for batch in window:
            n = len(batch[0])
            model.zero_grad(set_to_none=True)
            (sum_loss(model, batch) / n).backward()  # ḡ_j, the mean-loss gradient
            clipped, coef = _clipped(_grads(model), CLIP_MAX)
            coefs.append(coef)
            weight = float(n) if normalization == "items" else 1.0
            total = [t + weight * c for t, c in zip(total, clipped, strict=True)]
            items += n
        divisor = {"mean": float(len(window)), "items": float(items), "sum": 1.0}[normalization]
        _sgd_step(model, [t / divisor for t in total], [lr] * 4)
    return params_of(model), coefs


@pytest.mark.parametrize("normalization", ["mean", "items", "items-device", "sum"])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_per_microbatch_clipping_is_exact_in_float64(k: int, normalization: str) -> None:
    """ACC-L2: per-microbatch clipping (max 1.5) of a float64 model over two windows of k
    microbatches gives the parameters of the float64 hand-built reference (each microbatch's
    mean-loss gradient clipped with coef = min(1, max/(norm+1e-6)), combined as the
    normalization says, SGD lr 0.1) within 1e-12 relative; under items with host and with
    device counts. The old code formed the microbatch scale 1/k in float32: 4.3e-9 off at
    k=3 and 1.7e-8 at k=5 under mean (k=2, 4, 8 and items/sum were exact)."""
    sizes = [3, 1, 4, 2, 5, 2, 3, 1, 4, 2, 5, 3, 2, 4, 1, 3]
    batches = make_batches(sizes[: 2 * k], seed=10 + k)
    device_counts = normalization == "items-device"
    normalization = "items" if device_counts else normalization
    expected, coefs = _per_microbatch_reference(batches, k, normalization, lr=0.1)
    assert any(c < 1.0 for c in coefs) and any(c == 1.0 for c in coefs)  # clipping engaged

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(
        model,
        opt,
        steps=k,
        normalization=normalization,  # type: ignore[arg-type]
        clip=ClipPolicy(CLIP_MAX, per_microbatch=True),
    )
    for batch in batches:
        n = len(batch[0])
        with acc.microbatch(items=torch.tensor(n) if device_counts else n):
            acc.backward(
                sum_loss(model, batch) if normalization == "items" else mean_loss(model, batch)
            )
    assert acc.stats.optimizer_steps == 2
    assert max_rel_dev(params_of(model), expected) <= 1e-12


# -- 2. ACC-P1: float32 accumulation only ever widens -----------------------------


def _fp32_run(dtype: torch.dtype, **options: Any) -> tuple[list[torch.Tensor], list[torch.dtype]]:
    """Parameters after 3 windows (steps=3 over 8 microbatches of a generator, so the
    short last window takes the k/c correction) and the in-flight gradient dtypes."""
    model = make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = Accumulator(model, opt, steps=3, **options)
    batches = make_batches([3, 2, 4, 1, 3, 2, 5, 2], dtype=dtype, seed=3)
    inflight: list[torch.dtype] = []
    for i, batch in enumerate(acc.iterate(b for b in batches)):
        with acc.microbatch():
            acc.backward(mean_loss(model, batch))
        if i == 0:
            inflight = [g.dtype for g in acc.state_dict()["gradients"].values()]
    assert acc.stats.optimizer_steps == 3
    return params_of(model), inflight


def test_float32_accumulation_keeps_float64_gradients_bitwise() -> None:
    """ACC-P1: accumulation_dtype='float32' on a float64 model keeps the gradients in float64:
    the in-flight gradient is float64 and the parameters after 3 SGD-momentum windows equal
    the default mode's bitwise (the old code narrowed them to float32: 1.4e-8 off)."""
    default, default_inflight = _fp32_run(torch.float64)
    fp32, fp32_inflight = _fp32_run(torch.float64, accumulation_dtype="float32")
    assert _equal(default, fp32), f"max relative deviation {max_rel_dev(fp32, default):.3g}"
    assert default_inflight == fp32_inflight == [torch.float64] * 4


def test_float32_accumulation_widens_bf16_gradients() -> None:
    """ACC-P1: on a bf16 model the window's buffers are float32 (4 of 4 gradients); the
    parameters stay bf16. (The old code did this too: kept to pin the widening.)"""
    params, inflight = _fp32_run(torch.bfloat16, accumulation_dtype="float32")
    assert inflight == [torch.float32] * 4
    assert all(p.dtype == torch.bfloat16 for p in params)


# -- 3. ACC-E5: an exception inside a microbatch ----------------------------------

E5_MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "float32": {"accumulation_dtype": "float32"},
    "offload": {"offload": True},
    "drop_microbatch": {"non_finite": "drop_microbatch"},
    "clip-per-microbatch": {"clip": ClipPolicy(1.5, per_microbatch=True)},
    "float32-device-counts": {"accumulation_dtype": "float32", "normalization": "items"},
}
E5_FAILURES = ["forward-error", "hook-error", "forward-interrupt", "hook-interrupt"]
E5_BATCHES = make_batches([3, 2, 4, 1, 3, 2, 5, 2, 3], seed=21)
E5_EXTRA = make_batches([4], seed=22)[0]


class InjectedError(RuntimeError):
    """The failure a test injects."""


def _failure(kind: str) -> BaseException:
    return (
        KeyboardInterrupt("injected") if kind.endswith("interrupt") else InjectedError("injected")
    )


def _e5_items(acc: Accumulator, batch: Batch) -> torch.Tensor | None:
    """Under items: the count as a device tensor (it must not join the window if the
    microbatch fails)."""
    return torch.tensor(len(batch[0])) if acc.config.normalization == "items" else None


def _e5_loss(
    acc: Accumulator,
    model: torch.nn.Module,
    batch: Batch,
    raise_in_forward: BaseException | None = None,
    hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The forward; ``raise_in_forward`` is raised half-way (a partial graph exists),
    ``hook`` is registered on the first layer's output (it runs in backward after the
    last layer's gradients have been accumulated)."""
    x, y = batch
    hidden = model[0](x)  # type: ignore[index]
    if raise_in_forward is not None:
        raise raise_in_forward
    if hook is not None:
        hidden.register_hook(hook)
    errors = (model[2](model[1](hidden)) - y) ** 2  # type: ignore[index]
    return errors.sum() if acc.config.normalization == "items" else errors.mean()


def _e5_build(options: dict[str, Any]) -> tuple[torch.nn.Module, Accumulator]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, Accumulator(model, opt, steps=3, **options)


def _e5_train(options: dict[str, Any], batches: list[Batch]) -> tuple[list[torch.Tensor], int]:
    model, acc = _e5_build(options)
    for batch in batches:
        with acc.microbatch(items=_e5_items(acc, batch)):
            acc.backward(_e5_loss(acc, model, batch))
    return params_of(model), acc.stats.optimizer_steps


def _snapshot(model: torch.nn.Module, acc: Accumulator) -> tuple[Any, ...]:
    state = acc.state_dict()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    inflight = {n: t.clone() for n, t in state["gradients"].items()}
    items = state.get("items")
    if items is not None:
        inflight["<items>"] = items.clone()
    return state["accumulation"], inflight, grads


def _same_snapshot(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Same state, in-flight gradients and device item count, and every .grad, bitwise."""
    (sa, ia, ga), (sb, ib, gb) = a, b
    same_grads = all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(ga, gb, strict=True)
    )
    return (
        sa == sb
        and sorted(ia) == sorted(ib)
        and all(torch.equal(ia[n], ib[n]) for n in ia)
        and same_grads
    )


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("failure", E5_FAILURES)
@pytest.mark.parametrize("mode", list(E5_MODES))
def test_exception_inside_a_microbatch(mode: str, failure: str, position: int) -> None:
    """ACC-E5, ACC-C2, ACC-B5: a microbatch of the second window (steps=3, position 0, 1 or 2)
    fails — a Python error or a KeyboardInterrupt raised in the forward, or in a backward
    hook on the first layer's output, after autograd already accumulated the last layer's
    .grad. The exception propagates unchanged (the same object) and training goes on.

    Exact rollback (every buffered or isolating mode, float32 accumulation with device item
    counts under items included, where the failed microbatch's count must not join; the
    default mode for a failure in the forward or in the backward of the window's first
    microbatch): the state, in-flight gradients, device item count and every .grad are
    bitwise what they were before the microbatch, micro_steps does not count it (9), and
    the parameters after 3 SGD-momentum steps equal the run without the failed microbatch
    bitwise.

    Default mode, failure inside the backward after the window's first microbatch: the
    window is discarded (dropped_windows 1, every .grad None, phase idle, no step), the
    exception carries a note naming accumulation_dtype='float32', and the parameters after
    the next windows equal a run that skips that window's data bitwise (2 steps).

    The old code already kept the promise for failures in the forward; it failed every
    backward-hook case (partial gradients leaked into the window)."""
    options = E5_MODES[mode]
    in_backward = failure.startswith("hook")
    discards = mode == "default" and in_backward and position > 0
    fail_at = 3 + position  # index in E5_BATCHES before which the failing microbatch runs
    exc = _failure(failure)

    model, acc = _e5_build(options)
    for batch in E5_BATCHES[:fail_at]:
        with acc.microbatch(items=_e5_items(acc, batch)):
            acc.backward(_e5_loss(acc, model, batch))
    before = _snapshot(model, acc)
    seen_in_hook: list[torch.Tensor | None] = []
    pre_backward: list[torch.Tensor | None] = []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        last = model[2].weight.grad  # type: ignore[index]
        seen_in_hook.append(None if last is None else last.clone())
        raise exc

    failing = acc.microbatch(items=_e5_items(acc, E5_EXTRA))
    with pytest.raises(type(exc)) as caught, failing:
        if in_backward:
            loss = _e5_loss(acc, model, E5_EXTRA, hook=hook)
            last = model[2].weight.grad  # type: ignore[index]
            pre_backward.append(None if last is None else last.clone())
            acc.backward(loss)
        else:
            acc.backward(_e5_loss(acc, model, E5_EXTRA, raise_in_forward=exc))
    assert caught.value is exc
    if in_backward:  # the hook ran after the last layer's gradient had landed in .grad
        (seen,), (pre,) = seen_in_hook, pre_backward
        assert seen is not None and (pre is None or not torch.equal(seen, pre))
    assert _idle(acc)

    if discards:
        assert acc.stats.dropped_windows == 1
        assert acc.stats.position == 0 and acc.stats.optimizer_steps == 1
        assert all(p.grad is None for p in model.parameters())
        if sys.version_info >= (3, 11):
            notes = "\n".join(getattr(exc, "__notes__", []))
            assert "accumulation_dtype='float32'" in notes
        reference = E5_BATCHES[:3] + E5_BATCHES[fail_at:]
    else:
        assert _same_snapshot(before, _snapshot(model, acc))
        assert acc.stats.dropped_windows == 0
        reference = E5_BATCHES
    assert acc.stats.micro_steps == fail_at

    for batch in E5_BATCHES[fail_at:]:
        with acc.microbatch(items=_e5_items(acc, batch)):
            acc.backward(_e5_loss(acc, model, batch))
    expected, expected_steps = _e5_train(options, reference)
    assert acc.stats.micro_steps == len(E5_BATCHES)
    assert acc.stats.optimizer_steps == expected_steps == (2 if discards else 3)
    assert _equal(params_of(model), expected), (
        f"max relative deviation {max_rel_dev(params_of(model), expected):.3g}"
    )


# -- 4. ACC-N8, ACC-B5: item counts given as tensors ------------------------------

N8_SIZES = [3, 2, 4, 1, 3, 2, 2, 5]
BAD_COUNTS: dict[str, list[torch.Tensor]] = {
    "nan": [torch.tensor(float("nan"), dtype=torch.float64)],
    "inf": [torch.tensor(float("inf"))],
    "negative": [torch.tensor(-5)],
    "negative-hidden-by-a-positive": [torch.tensor(-5), torch.tensor(10)],
    "fraction": [torch.tensor(2.5)],
}


def _items_build(**options: Any) -> tuple[torch.nn.Module, Accumulator]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, Accumulator(model, opt, steps=2, normalization="items", **options)


def _items_train(batches: list[Batch]) -> list[torch.Tensor]:
    model, acc = _items_build()
    for batch in batches:
        with acc.microbatch(items=torch.tensor(len(batch[0]))):
            acc.backward(sum_loss(model, batch))
    return params_of(model)


@pytest.mark.parametrize("bad", list(BAD_COUNTS))
def test_bad_device_item_count_discards_the_window(bad: str) -> None:
    """ACC-N8, ACC-B5, ACC-B2: a device count that is NaN, inf, -5 (alone, or with +10 in the same
    window so the total 5 looks valid) or 2.5 raises ItemCountError at the window's
    boundary; the accumulator stays usable: phase idle, every .grad None,
    dropped_windows 1, no step for that window (1 step before, 0 during), and the two
    windows after it equal, bitwise, a run that skipped the bad window's data (3 steps).
    The old code stepped (-5 with +10, 2.5), raised ValueError/OverflowError from round()
    (NaN, inf) or the core's error with another message (-5)."""
    batches = make_batches(N8_SIZES, seed=5)
    counts = [torch.tensor(len(b[0])) for b in batches]
    for i, count in enumerate(BAD_COUNTS[bad]):
        counts[2 + i] = count  # the second window (microbatches 2 and 3)
    model, acc = _items_build()
    for batch, count in zip(batches[:3], counts[:3], strict=True):
        with acc.microbatch(items=count):
            acc.backward(sum_loss(model, batch))
    stepped_once = params_of(model)
    bad_count = pytest.raises(ItemCountError, match="negative, non-integral, inf or nan")
    with bad_count, acc.microbatch(items=counts[3]):
        acc.backward(sum_loss(model, batches[3]))
    assert _idle(acc) and acc.stats.position == 0
    assert all(p.grad is None for p in model.parameters())
    assert acc.stats.dropped_windows == 1 and acc.stats.optimizer_steps == 1
    assert _equal(params_of(model), stepped_once)
    for batch, count in zip(batches[4:], counts[4:], strict=True):
        with acc.microbatch(items=count):
            acc.backward(sum_loss(model, batch))
    assert acc.stats.optimizer_steps == 3 and acc.stats.dropped_windows == 1
    assert _equal(params_of(model), _items_train(batches[:2] + batches[4:]))


@pytest.mark.parametrize(
    ("count", "pattern"),
    [
        (torch.tensor([3]), r"shape \(1,\) must be 0-d"),
        (torch.tensor([2, 1]), r"shape \(2,\) must be 0-d"),
        (torch.tensor(True), "dtype torch.bool is not a count"),
    ],
)
def test_malformed_device_item_count_is_refused_at_the_microbatch(
    count: torch.Tensor, pattern: str
) -> None:
    """ACC-N8, ACC-E2: a device count of shape (1,) or (2,), or of dtype bool, raises
    ItemCountError when the microbatch begins (mid-window, before the forward): the state
    and phase are unchanged, and the finished run equals, bitwise, the run without that
    attempt (4 steps). The old code accepted all three."""
    batches = make_batches(N8_SIZES, seed=6)
    model, acc = _items_build()
    with acc.microbatch(items=torch.tensor(len(batches[0][0]))):
        acc.backward(sum_loss(model, batches[0]))
    state, phase = acc.machine.state, _phase(acc)
    with pytest.raises(ItemCountError, match=pattern), acc.microbatch(items=count):
        raise AssertionError("the microbatch must not begin")  # pragma: no cover
    assert acc.machine.state == state and _phase(acc) is phase
    for batch in batches[1:]:
        with acc.microbatch(items=torch.tensor(len(batch[0]))):
            acc.backward(sum_loss(model, batch))
    assert acc.stats.optimizer_steps == 4 and acc.stats.micro_steps == 8
    assert _equal(params_of(model), _items_train(batches))


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_device_item_count_outside_items_is_refused(normalization: str) -> None:
    """ACC-N8: a tensor count under normalization='mean' or 'sum' raises ItemCountError when
    the microbatch begins (state unchanged, micro_steps 0); the old code silently ignored
    it."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, steps=2, normalization=normalization)  # type: ignore[arg-type]
    state = acc.machine.state
    with pytest.raises(ItemCountError), acc.microbatch(items=torch.tensor(3)):
        raise AssertionError("the microbatch must not begin")  # pragma: no cover
    assert acc.machine.state == state and acc.stats.micro_steps == 0


def test_bad_device_item_count_survives_a_checkpoint(tmp_path: Path) -> None:
    """ACC-N8, ACC-R2, CKPT-18: a mid-window save after a device count of -5 stores the
    window's count as NaN; loaded into a fresh accumulator, the window's boundary raises
    ItemCountError, discards it (dropped_windows 1, every .grad None, 0 steps, parameters
    as loaded). The old code stored -5 and stepped."""
    from safetensors.torch import load as load_tensors

    batches = make_batches([3, 2, 4], seed=7)
    model = make_model()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, normalization="items"
    )
    for batch, count in zip(batches[:2], [torch.tensor(3), torch.tensor(-5)], strict=True):
        with acc.microbatch(items=count):
            acc.backward(sum_loss(model, batch))
    acc.save(tmp_path / "ckpt")
    stored = load_tensors(read_checkpoint(tmp_path / "ckpt").file_bytes("items"))["items"]
    assert stored.dim() == 0 and math.isnan(float(stored))

    model2 = make_model(seed=4)
    acc2 = Accumulator(
        model2, torch.optim.SGD(model2.parameters(), lr=0.1), steps=3, normalization="items"
    )
    acc2.load(tmp_path / "ckpt")
    loaded = params_of(model2)
    with pytest.raises(ItemCountError), acc2.microbatch(items=torch.tensor(4)):
        acc2.backward(sum_loss(model2, batches[2]))
    assert acc2.stats.dropped_windows == 1 and acc2.stats.optimizer_steps == 0
    assert all(p.grad is None for p in model2.parameters()) and _idle(acc2)
    assert _equal(params_of(model2), loaded)


def test_bad_device_item_count_in_a_window_closed_by_end_pass() -> None:
    """ACC-B5, ACC-W7, ACC-B2: a short window (2 of 4) closed by end_pass with a device count of -1
    raises ItemCountError from end_pass, and the pass still ends: epoch 1, dropped_windows 1,
    no step, every .grad None, phase idle; the next pass steps (1 step, epoch 2)."""
    batches = make_batches([3, 2, 3, 2, 1, 1], seed=8)
    model = make_model()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=4, normalization="items"
    )
    for batch, count in zip(batches[:2], [torch.tensor(3), torch.tensor(-1)], strict=True):
        with acc.microbatch(items=count):
            acc.backward(sum_loss(model, batch))
    with pytest.raises(ItemCountError):
        acc.end_pass()
    assert (acc.stats.epoch, acc.stats.dropped_windows, acc.stats.optimizer_steps) == (1, 1, 0)
    assert all(p.grad is None for p in model.parameters()) and _idle(acc)
    for batch in acc.iterate(batches[2:]):
        with acc.microbatch(items=torch.tensor(len(batch[0]))):
            acc.backward(sum_loss(model, batch))
    assert (acc.stats.epoch, acc.stats.optimizer_steps) == (2, 1)


# -- 5. ACC-N9: a param group added after the accumulator was built -----------------

N9_CASES: dict[str, dict[str, Any]] = {
    "items-weights": {"normalization": "items", "weights": GradientWeights.of({"*.weight": 0.5})},
    "mean-short-last-window": {"normalization": "mean"},
    "mean-short-last-window-clip": {"normalization": "mean", "clip": ClipPolicy(0.05)},
}


def _n9_reference(
    batches: list[Batch], windows: list[list[int]], case: str, frozen_windows: int
) -> list[torch.Tensor]:
    """Float64 large-batch SGD steps: the last layer is frozen for the first
    ``frozen_windows`` windows, then trained at lr 0.05 (layer 0 at lr 0.1)."""
    options = N9_CASES[case]
    model = make_model()
    for w, window in enumerate(windows):
        model.zero_grad(set_to_none=True)
        if options["normalization"] == "items":
            n = sum(len(batches[j][0]) for j in window)
            loss = sum(sum_loss(model, batches[j]) for j in window) / n
        else:
            loss = sum(mean_loss(model, batches[j]) for j in window) / len(window)
        loss.backward()  # type: ignore[union-attr]
        grads = _grads(model)
        trained = [True, True, w >= frozen_windows, w >= frozen_windows]
        grads = [g if t else torch.zeros_like(g) for g, t in zip(grads, trained, strict=True)]
        clip = options.get("clip")
        if clip is not None:
            grads, _ = _clipped(grads, clip.max)
        if "weights" in options:
            grads = [g * (0.5 if i % 2 == 0 else 1.0) for i, g in enumerate(grads)]  # *.weight
        _sgd_step(model, grads, [0.1, 0.1, 0.05, 0.05])
    return params_of(model)


@pytest.mark.parametrize("case", list(N9_CASES))
def test_param_group_added_later_is_normalized(case: str) -> None:
    """ACC-N9: the last layer is frozen while one window trains layer 0, then unfrozen and
    added with optimizer.add_param_group (lr 0.05). The next windows normalize, clip and
    weight it as if it had been there from the start: the parameters after 3 windows (the
    last one short, closed through the k/c correction of a pass of unknown length) equal
    the float64 large-batch reference within 1e-12. Items with weights {'*.weight': 0.5}
    (the pattern matches the new 2.weight too), mean, mean with clipping by norm (0.05).
    Weights by group index for the new group cannot be given: the group does not exist when
    the weights are resolved (ACC-G3, ConfigError). The old code left the new group
    unnormalized (off by the 1/N or k/c factor)."""
    options = N9_CASES[case]
    sizes = [3, 2, 4, 1, 3, 2, 5, 2]
    batches = make_batches(sizes, seed=9)
    model = make_model()
    last = model[2]  # type: ignore[index]
    last.requires_grad_(False)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # type: ignore[index]
    acc = Accumulator(model, opt, steps=3, **options)

    def run(part: list[Batch]) -> None:
        for batch in acc.iterate(b for b in part):  # no len(): the k/c correction path
            with acc.microbatch(items=len(batch[0])):
                total = sum_loss(model, batch)
                acc.backward(
                    total if options["normalization"] == "items" else total / len(batch[0])
                )

    run(batches[:3])
    last.requires_grad_(True)
    opt.add_param_group({"params": list(last.parameters()), "lr": 0.05})
    run(batches[3:])
    assert acc.stats.optimizer_steps == 3
    expected = _n9_reference(batches, [[0, 1, 2], [3, 4, 5], [6, 7]], case, frozen_windows=1)
    assert max_rel_dev(params_of(model), expected) <= 1e-12


def test_weights_by_index_of_a_group_added_later_are_refused() -> None:
    """ACC-G3, ACC-N9: weights for group index 1 given before the group exists are a
    ConfigError at construction, not silently nothing (the old code did the same)."""
    model = make_model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # type: ignore[index]
    with pytest.raises(ConfigError, match="weight for group 1 but the optimizer has 1 groups"):
        Accumulator(model, opt, steps=2, weights=GradientWeights.of(by_group={1: 0.5}))


def test_param_group_added_later_starts_from_a_clean_gradient() -> None:
    """ACC-N9: the last layer is trainable but outside the optimizer while one window trains
    layer 0; added with add_param_group at the window boundary, it is adopted 'as if it had
    been there from the start': the gradient the step of the next window applies to it is
    that window's own float64 large-batch gradient, within 1e-12 (before the fix it also held
    the first window's gradient: 1.4 off, relative)."""
    import copy

    batches = make_batches([3, 2, 4, 1], seed=12)
    model = make_model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # type: ignore[index]
    seen: list[list[torch.Tensor]] = []
    acc = Accumulator(model, opt, steps=2, before_step=lambda a: seen.append(_grads(model)))
    for batch in batches[:2]:
        with acc.microbatch():
            acc.backward(mean_loss(model, batch))
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    ((mean_loss(reference, batches[2]) + mean_loss(reference, batches[3])) / 2).backward()
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.1})  # type: ignore[index]
    for batch in batches[2:]:
        with acc.microbatch():
            acc.backward(mean_loss(model, batch))
    assert len(seen) == 2
    assert max_rel_dev(seen[1], _grads(reference)) <= 1e-12


# -- 6. ACC-E4: schedulers that cannot be stepped per optimizer step --------------


def test_reduce_lr_on_plateau_is_refused() -> None:
    """ACC-E4: ReduceLROnPlateau as scheduler= is a ConfigError at construction naming it
    (the scheduler's lr and counters untouched); the old code accepted it and stepped it
    without a metric."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    before = sched.state_dict()
    with pytest.raises(ConfigError, match="ReduceLROnPlateau"):
        Accumulator(model, opt, steps=2, scheduler=sched)
    assert sched.state_dict() == before and opt.param_groups[0]["lr"] == 0.1


def test_scheduler_of_another_optimizer_is_refused() -> None:
    """ACC-E4: a scheduler built for another optimizer is a ConfigError at construction
    (the old code accepted it: the LR never changed)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(make_model(seed=1).parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    with pytest.raises(ConfigError, match="another optimizer"):
        Accumulator(model, opt, steps=2, scheduler=sched)


# -- 7. CKPT-19: tied weights ----------------------------------------------------


class TiedLM(torch.nn.Module):
    """An embedding shared with the output head, as in language models."""

    def __init__(self, seed: int, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.double()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _token_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(13)
    return [
        (torch.randint(0, 11, (n, 5), generator=gen), torch.randint(0, 11, (n, 5), generator=gen))
        for n in [2, 3, 1, 4, 2, 3, 2, 1][:count]
    ]


def _tied_build(seed: int) -> tuple[TiedLM, Accumulator]:
    model = TiedLM(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    return model, Accumulator(model, opt, steps=3, scheduler=sched, normalization="items")


def _tied_run(
    model: TiedLM, acc: Accumulator, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    for tokens, targets in batches:
        with acc.microbatch(items=targets.numel()):
            logits = model(tokens)
            acc.backward(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, 11), targets.reshape(-1), reduction="sum"
                )
            )


def test_tied_weights_are_stored_once_and_resume_bitwise(tmp_path: Path) -> None:
    """CKPT-19, ACC-R3: a model whose head shares the embedding's weight saves mid-window
    (position 1 of 3); the model file holds 3 tensors (embed.weight once, no head.weight),
    metadata.model.aliases == {'head.weight': 'embed.weight'}; loading into a fresh model
    (another seed) keeps the tie (head.weight is embed.weight) and the resumed trajectory
    equals the uninterrupted one bitwise (8 microbatches, 3 steps). The old code could not
    save such a model (safetensors refuses shared tensors)."""
    from safetensors import safe_open

    batches = _token_batches(8)
    model, acc = _tied_build(seed=0)
    _tied_run(model, acc, batches)
    acc.end_pass()
    expected = params_of(model)
    assert acc.stats.optimizer_steps == 3

    model, acc = _tied_build(seed=0)
    _tied_run(model, acc, batches[:4])
    acc.save(tmp_path / "ckpt")
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert sorted(ckpt.manifest.files["model"].tensors) == [
        "embed.weight",
        "mix.bias",
        "mix.weight",
    ]
    assert dict(ckpt.metadata["model"]["aliases"]) == {"head.weight": "embed.weight"}
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "mix.bias", "mix.weight"]

    model2, acc2 = _tied_build(seed=5)
    acc2.load(tmp_path / "ckpt")
    assert model2.head.weight is model2.embed.weight
    assert torch.equal(model2.embed.weight, model.embed.weight)
    _tied_run(model2, acc2, batches[4:])
    acc2.end_pass()
    assert model2.head.weight is model2.embed.weight
    assert acc2.stats.optimizer_steps == 3
    assert _equal(params_of(model2), expected)


# -- 8. Section 2: the loop-facing API ------------------------------------------


def test_unknown_keyword_names_the_closest_option() -> None:
    """ACC-E4: normalisation='items' (a typo) is a ConfigError naming 'normalization'
    (the old code raised a TypeError from the config)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"'normalisation' \(did you mean 'normalization'\?\)"):
        Accumulator(model, opt, steps=2, normalisation="items")  # type: ignore[call-arg]


def test_config_together_with_an_option_is_refused() -> None:
    """ACC-E4: config= with an option keyword (or steps) is a ConfigError naming the option
    (the old code already refused it; kept as a regression test)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = AccumulationConfig(2)
    with pytest.raises(ConfigError, match=r"config=.*\['normalization'\]"):
        Accumulator(model, opt, config=config, normalization="items")
    with pytest.raises(ConfigError, match=r"config=.*steps"):
        Accumulator(model, opt, 2, config=config)


def _nan_batch(batch: Batch) -> Batch:
    return batch[0] * float("nan"), batch[1]


@pytest.mark.parametrize("device_counts", [False, True])
def test_backward_result_reports_each_window(device_counts: bool) -> None:
    """Section 2 (BackwardResult), ACC-F1, ACC-N6: steps=2 under items; backward returns a
    BackwardResult. Off the boundary: boundary False, stepped False, outcome None, no items,
    no norm. Boundaries: 'stepped' (window_items 5), 'non_finite' (NaN input), 'empty'
    (counts 0), 'stepped' again (window_items 4); bool(result) == result.stepped every time;
    window_items is an int for host counts and a 0-d float64 device tensor equal to the
    window's total for device counts; grad_norm None without clipping or tracking."""
    from gradaccum_torch import BackwardResult

    model = make_model()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, normalization="items"
    )
    b = make_batches([3, 2, 1, 1, 2, 2, 1, 3], seed=30)
    plan: list[tuple[Batch, int]] = [
        (b[0], 3), (b[1], 2),  # stepped, 5 items
        (_nan_batch(b[2]), 1), (b[3], 1),  # non_finite
        (b[4], 0), (b[5], 0),  # empty
        (b[6], 1), (b[7], 3),  # stepped, 4 items
    ]  # fmt: skip
    results: list[Any] = []
    for batch, n in plan:
        with acc.microbatch(items=torch.tensor(n) if device_counts else n):
            loss = sum_loss(model, batch)
            results.append(acc.backward(loss if n else loss * 0))
    assert all(isinstance(r, BackwardResult) for r in results)
    assert all(bool(r) == r.stepped for r in results)
    off = results[0::2]
    assert all(
        (r.boundary, r.stepped, r.outcome, r.window_items, r.grad_norm)
        == (False, False, None, None, None)
        for r in off
    )
    on = results[1::2]
    assert [r.boundary for r in on] == [True] * 4
    assert [r.outcome for r in on] == ["stepped", "non_finite", "empty", "stepped"]
    assert [r.stepped for r in on] == [True, False, False, True]
    assert all(r.grad_norm is None for r in on)
    if device_counts:
        assert all(isinstance(r.window_items, torch.Tensor) for r in on)
        assert all(r.window_items.dim() == 0 for r in on)
        assert all(r.window_items.dtype == torch.float64 for r in on)
        assert [float(r.window_items) for r in on] == [5.0, 2.0, 0.0, 4.0]
    else:
        assert all(type(r.window_items) is int for r in on)
        assert [r.window_items for r in on] == [5, 2, 0, 4]
    assert (acc.stats.optimizer_steps, acc.stats.skipped_steps) == (2, 2)


def test_backward_result_window_items_under_mean_with_host_counts() -> None:
    """Section 2 (BackwardResult): under mean with host counts 3 and 2 the boundary's
    window_items is the int 5 (stats.items_total is 5; it used to be None)."""
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    results = []
    for batch in make_batches([3, 2], seed=34):
        with acc.microbatch(items=len(batch[0])):
            results.append(acc.backward(mean_loss(model, batch)))
    assert acc.stats.items_total == 5
    assert results[-1].window_items == 5


def test_backward_result_reports_an_amp_overflow() -> None:
    """Section 2, ACC-F4: an fp16 GradScaler on the CPU with init_scale 2**40 overflows
    under fp16 autocast: outcome 'amp_overflow', stepped False, bool False, the parameters
    unchanged bitwise, the scale backed off once (2**39) and before_step never called."""
    model = make_model(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    calls: list[int] = []
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=2,
        scaler=scaler,
        before_step=lambda acc: calls.append(acc.stats.micro_steps),
    )
    before = params_of(model)
    results = []
    for x, y in make_batches([3, 2], dtype=torch.float32, seed=31):
        with acc.microbatch():
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
            results.append(acc.backward(((out.float() - y) ** 2).mean()))
    result = results[-1]
    assert (result.boundary, result.stepped, result.outcome) == (True, False, "amp_overflow")
    assert not result
    assert _equal(params_of(model), before)
    assert scaler.get_scale() == 2.0**39
    assert calls == []  # before_step runs only before a step


def _norm_run(**options: Any) -> tuple[list[Any], list[float], list[list[torch.Tensor]]]:
    """Two windows of steps=2 (lr 0): the results, and the gradient norm and gradients
    before_step saw."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    norms: list[float] = []
    grads: list[list[torch.Tensor]] = []

    def before_step(acc: Accumulator) -> None:
        grads.append(_grads(model))
        norms.append(_global_norm(grads[-1]))

    acc = Accumulator(model, opt, steps=2, before_step=before_step, **options)
    results = []
    for batch in make_batches([3, 2, 4, 1], seed=32):
        with acc.microbatch():
            results.append(acc.backward(mean_loss(model, batch)))
    return [r for r in results if r.boundary], norms, grads


def test_backward_result_grad_norm() -> None:
    """Section 2, ACC-L3: grad_norm is a 0-d device tensor when clipping by norm (the
    pre-clip norm, above the max 0.1, while before_step sees <= 0.1 + 1e-6) and with
    track_grad_norm=True (equal to the norm before_step sees, within 1e-12); None with
    clipping by value and by default."""
    clipped, seen, _ = _norm_run(clip=ClipPolicy(0.1))
    assert all(isinstance(r.grad_norm, torch.Tensor) and r.grad_norm.dim() == 0 for r in clipped)
    assert all(float(r.grad_norm) > 0.1 for r in clipped)
    assert len(seen) == 2 and all(n <= 0.1 + 1e-6 for n in seen)
    tracked, seen, _ = _norm_run(track_grad_norm=True)
    assert [float(r.grad_norm) for r in tracked] == pytest.approx(seen, rel=1e-12)
    by_value, _, _ = _norm_run(clip=ClipPolicy(0.01, mode="value"))
    plain, _, _ = _norm_run()
    assert all(r.grad_norm is None for r in by_value + plain)


def test_before_step_sees_the_clipped_weighted_gradient() -> None:
    """Section 2, ACC-B1, ACC-G2: before_step runs after clipping (norm <= 0.1 + 1e-6) and
    after the weights: with {'0.*': 0.5} the gradients it sees for layer 0 are exactly half
    those of the unweighted run and layer 2's are equal, bitwise (clipping saw the
    unweighted gradient)."""
    _, seen, plain = _norm_run(clip=ClipPolicy(0.1))
    _, _, weighted = _norm_run(clip=ClipPolicy(0.1), weights=GradientWeights.of({"0.*": 0.5}))
    assert all(n <= 0.1 + 1e-6 for n in seen)
    for p_window, w_window in zip(plain, weighted, strict=True):
        assert _equal(w_window[:2], [g * 0.5 for g in p_window[:2]])
        assert _equal(w_window[2:], p_window[2:])


def test_before_step_runs_once_per_step_and_its_changes_are_applied() -> None:
    """Section 2, ACC-S1: before_step is called once per successful step (2 of 4 windows:
    a non-finite and an empty window are skipped without calling it); zeroing 2.weight's
    .grad in it leaves 2.weight bitwise unchanged by SGD (lr 0.1), while every other
    parameter moved."""
    model = make_model()
    calls: list[int] = []

    def before_step(acc: Accumulator) -> None:
        calls.append(acc.stats.micro_steps)
        model[2].weight.grad.zero_()  # type: ignore[index, union-attr]

    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=2,
        normalization="items",
        before_step=before_step,
    )
    start = params_of(model)
    b = make_batches([3, 2, 1, 1, 2, 2, 1, 3], seed=33)
    plan = [(b[0], 3), (b[1], 2), (_nan_batch(b[2]), 1), (b[3], 1)]
    plan += [(b[4], 0), (b[5], 0), (b[6], 1), (b[7], 3)]
    for batch, n in plan:
        with acc.microbatch(items=n):
            loss = sum_loss(model, batch)
            acc.backward(loss if n else loss * 0)
    assert calls == [2, 8]
    assert acc.stats.optimizer_steps == 2 and acc.stats.skipped_steps == 2
    after = params_of(model)
    assert torch.equal(after[2], start[2])
    assert all(
        not torch.equal(a, s) for i, (a, s) in enumerate(zip(after, start, strict=True)) if i != 2
    )


# -- ACC-B2: gradients set to None after every closed window ------------------------------


def _all_none(model: torch.nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("how", ["stepped", "non_finite", "empty", "amp_overflow"])
def test_gradients_are_none_after_every_closed_window(how: str) -> None:
    """ACC-B2: after a closed window — stepped, skipped for a non-finite gradient, empty
    (zero items), or skipped for an AMP overflow — every ``.grad`` is None (set_to_none),
    and mid-window it is not: the window's two microbatches' gradients are in ``.grad``."""
    torch.manual_seed(0)
    dtype = torch.float32 if how == "amp_overflow" else torch.float64
    model = make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40) if how == "amp_overflow" else None
    acc = Accumulator(model, opt, steps=2, normalization="items", scaler=scaler)
    batches = make_batches([3, 2], dtype=dtype)
    if how == "non_finite":
        batches[1] = (batches[1][0] * float("nan"), batches[1][1])
    counts = [0, 0] if how == "empty" else [3, 2]
    results = []
    for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
        with acc.microbatch(n, last=i == 1):
            with torch.autocast("cpu", dtype=torch.float16, enabled=how == "amp_overflow"):
                loss = sum_loss(model, batch)
            results.append(acc.backward(loss))
        if i == 0:
            assert not _all_none(model), "inside the window the gradient lives in .grad"
    assert results[-1].boundary and results[-1].outcome == how
    assert _all_none(model)


def test_gradients_are_none_before_non_finite_gradient_error() -> None:
    """ACC-B2, ACC-F2: under non_finite='raise' the gradients are already None when
    NonFiniteGradientError reaches the caller, and the window counts as skipped."""
    from gradaccum import NonFiniteGradientError

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, steps=1, non_finite="raise")
    x, y = make_batches([2])[0]
    with pytest.raises(NonFiniteGradientError), acc.microbatch():
        acc.backward(mean_loss(model, (x * float("inf"), y)))
    assert _all_none(model)
    assert acc.stats.skipped_steps == 1


def test_gradients_are_none_after_a_drop_policy_discard() -> None:
    """ACC-B2, ACC-W5: a partial window discarded by partial_window='drop' at the end of a
    pass leaves every .grad None; dropped_windows is 1 and nothing stepped."""
    model = make_model()
    before = params_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, steps=4, partial_window="drop")
    for batch in acc.iterate(make_batches([2, 3])):
        with acc.microbatch():
            acc.backward(mean_loss(model, batch))
        assert not _all_none(model)
    assert _all_none(model)
    assert acc.stats.dropped_windows == 1 and acc.stats.optimizer_steps == 0
    assert _equal(params_of(model), before)


def test_a_scaler_unscaled_by_someone_else_is_a_usage_error() -> None:
    """ACC-B5, ACC-E3: a GradScaler that someone unscaled since its last update (a stray
    ``scaler.unscale_``, or a framework's ``clip_grad_norm_`` after the boundary) makes the next
    boundary raise UsageError naming the fix (clip=ClipPolicy), not torch's RuntimeError; the
    window is discarded and the accumulator goes on."""
    from gradaccum import UsageError

    torch.manual_seed(0)
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    acc = Accumulator(model, opt, steps=1, scaler=scaler)
    batch = make_batches([2], dtype=torch.float32)[0]
    with acc.microbatch():
        acc.backward(mean_loss(model, batch))
    scaler.unscale_(opt)  # the stray call, after the boundary
    with pytest.raises(UsageError, match=r"clip=ClipPolicy"), acc.microbatch():
        acc.backward(mean_loss(model, batch))
    assert acc.stats.dropped_windows == 1 and acc.stats.optimizer_steps == 1
    assert _all_none(model)
    with acc.microbatch():  # the scaler was updated on the way out: the next window steps
        assert acc.backward(mean_loss(model, batch)).stepped
    assert acc.stats.optimizer_steps == 2


def test_listeners_hear_of_a_step_after_it_was_taken() -> None:
    """ACC-S3 (event order): ``on_step`` is called after the optimizer and the scheduler
    stepped: the parameters and the learning rate a listener reads there are the updated ones
    (the same as right after ``backward`` returns)."""
    from gradaccum import AccumulationCallback, AccumulationStats

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    seen: list[tuple[list[torch.Tensor], float]] = []

    class Listener(AccumulationCallback):
        def on_step(self, stats: AccumulationStats) -> None:
            seen.append((params_of(model), opt.param_groups[0]["lr"]))

    acc = Accumulator(model, opt, steps=2, scheduler=sched, listeners=[Listener()])
    after: list[tuple[list[torch.Tensor], float]] = []
    for batch in make_batches([2, 3, 1, 4]):
        with acc.microbatch():
            stepped = acc.backward(mean_loss(model, batch)).stepped
        if stepped:
            after.append((params_of(model), opt.param_groups[0]["lr"]))
    assert [lr for _, lr in seen] == [lr for _, lr in after] == [0.05, 0.025]
    assert all(_equal(a, b) for (a, _), (b, _) in zip(seen, after, strict=True))
