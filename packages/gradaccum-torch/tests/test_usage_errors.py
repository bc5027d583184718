"""Bad input gets a clear GradAccumError naming the value and the fix, raised
before any state changes (spec ACC-E1..ACC-E4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_batches, make_model, mean_loss, params_of, sum_loss

from gradaccum import (
    CheckpointChecksumError,
    CheckpointMismatchError,
    ConfigError,
    ItemCountError,
    UsageError,
)
from gradaccum_torch import Accumulator


def _acc(**options: object) -> tuple[torch.nn.Module, Accumulator]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, Accumulator(model, opt, **options)  # type: ignore[arg-type]


def _snapshot(model: torch.nn.Module, acc: Accumulator) -> tuple[dict[str, object], list[object]]:
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return acc.machine.state_dict(), grads


def _same(
    before: tuple[dict[str, object], list[object]], model: torch.nn.Module, acc: Accumulator
) -> None:
    state, grads = before
    assert acc.machine.state_dict() == state
    for old, param in zip(grads, model.parameters(), strict=True):
        if old is None:
            assert param.grad is None
        else:
            assert isinstance(old, torch.Tensor)
            assert torch.equal(old, param.grad)


def test_non_scalar_loss_is_refused_and_nothing_changes() -> None:
    """ACC-E2, ACC-E3: a loss that is not a scalar names its shape; the window is untouched."""
    model, acc = _acc(steps=2)
    (batch,) = make_batches([3])
    with acc.microbatch():
        acc.backward(mean_loss(model, batch))
    before = _snapshot(model, acc)
    x, y = batch
    with pytest.raises(UsageError, match=r"scalar tensor, got \(3, 1\)"), acc.microbatch():
        acc.backward((model(x) - y) ** 2)
    _same(before, model, acc)


def test_loss_without_grad_is_refused() -> None:
    """ACC-E2, ACC-E3: a detached loss is refused before backward."""
    model, acc = _acc(steps=2)
    (batch,) = make_batches([3])
    before = _snapshot(model, acc)
    with pytest.raises(UsageError, match="does not require grad"), acc.microbatch():
        with torch.no_grad():
            loss = mean_loss(model, batch)
        acc.backward(loss)
    _same(before, model, acc)


def test_backward_twice_in_one_microbatch() -> None:
    """ACC-E2, ACC-E3: the second backward is refused; the first one's gradient stays."""
    model, acc = _acc(steps=2)
    (batch,) = make_batches([3])
    with pytest.raises(UsageError, match="twice"), acc.microbatch():
        acc.backward(mean_loss(model, batch))
        after_first = _snapshot(model, acc)
        acc.backward(mean_loss(model, batch))
    _same(after_first, model, acc)
    assert acc.stats.micro_steps == 1


def test_backward_outside_the_context() -> None:
    """ACC-E2, ACC-E3: backward needs an open microbatch."""
    model, acc = _acc(steps=2)
    (batch,) = make_batches([3])
    before = _snapshot(model, acc)
    with pytest.raises(UsageError, match="outside"):
        acc.backward(mean_loss(model, batch))
    _same(before, model, acc)


def test_microbatch_without_backward() -> None:
    """ACC-E2, ACC-E3: a microbatch that never calls backward is an error and is not counted."""
    model, acc = _acc(steps=2)
    before = _snapshot(model, acc)
    with pytest.raises(UsageError, match=r"without acc\.backward"), acc.microbatch():
        pass
    _same(before, model, acc)


def test_exception_in_forward_cancels_the_microbatch() -> None:
    """ACC-E2, ACC-E3: an exception inside the context leaves the counters as they were."""
    model, acc = _acc(steps=2)
    before = _snapshot(model, acc)
    with pytest.raises(RuntimeError, match="boom"), acc.microbatch():
        raise RuntimeError("boom")
    _same(before, model, acc)
    (batch,) = make_batches([3])
    with acc.microbatch():
        acc.backward(mean_loss(model, batch))
    assert acc.stats.micro_steps == 1


def test_optimizer_with_foreign_parameters() -> None:
    """ACC-E4: every optimizer parameter must belong to the model."""
    model = make_model()
    other = torch.nn.Linear(3, 5)
    opt = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    with pytest.raises(ConfigError, match=r"shape \(5, 3\).*not a parameter of the model"):
        Accumulator(model, opt, steps=2)


@pytest.mark.parametrize(
    ("items", "pattern"),
    [(None, "needs the microbatch's item count"), (-3, "negative"), (2.5, "2.5")],
)
def test_bad_item_counts(items: object, pattern: str) -> None:
    """ACC-E4: items mode needs a non-negative integer count per microbatch."""
    model, acc = _acc(steps=2, normalization="items")
    before = _snapshot(model, acc)
    with pytest.raises(ItemCountError, match=pattern), acc.microbatch(items=items):  # type: ignore[arg-type]
        pass
    _same(before, model, acc)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"steps": 0}, "accumulation steps=0"),
        ({"steps": 2, "normalization": "avg"}, "normalization='avg'"),
        ({"steps": 2, "non_finite": "ignore"}, "non_finite='ignore'"),
        ({"steps": 2, "partial_window": "pad"}, "partial_window='pad'"),
    ],
)
def test_bad_config(options: dict[str, object], pattern: str) -> None:
    """ACC-E4: configuration errors name the value."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=pattern):
        Accumulator(model, opt, **options)  # type: ignore[arg-type]


def test_weight_pattern_that_matches_nothing() -> None:
    """ACC-G3: a weight pattern that matches no parameter is a typo, not a no-op."""
    from gradaccum import GradientWeights

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"'encoder\.\*' matches no parameter"):
        Accumulator(model, opt, steps=2, weights=GradientWeights.of({"encoder.*": 0.5}))


def test_drop_microbatch_with_a_grad_scaler_is_refused() -> None:
    """ACC-F4: loss-scale overflow must skip the window, so drop_microbatch + AMP is refused."""
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ConfigError, match="drop_microbatch"):
        Accumulator(model, opt, steps=2, scaler=scaler, non_finite="drop_microbatch")


def _mid_window(tmp_path: Path) -> Path:
    model, acc = _acc(steps=4, normalization="items")
    for batch in make_batches([2, 3]):
        with acc.microbatch(items=len(batch[0])):
            acc.backward(sum_loss(model, batch))
    path = tmp_path / "ckpt"
    acc.save(path)
    return path


def test_checkpoint_from_a_different_model(tmp_path: Path) -> None:
    """ACC-E2, ACC-R5: other names or shapes are refused; model, optimizer, grads unchanged."""
    path = _mid_window(tmp_path)
    torch.manual_seed(5)
    other = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    ).double()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    acc = Accumulator(other, opt, steps=4, normalization="items")
    before_params = params_of(other)
    before = _snapshot(other, acc)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"'0\.weight' has shape \(8, 4\) in the checkpoint "
        r"but the parameter has shape \(6, 4\)",
    ):
        acc.load(path)
    _same(before, other, acc)
    assert all(torch.equal(a, b) for a, b in zip(before_params, params_of(other), strict=True))


def test_checkpoint_with_a_corrupt_file_changes_nothing(tmp_path: Path) -> None:
    """CKPT-7, CKPT-26: a flipped byte is refused — its tensor's CRC-32 (format 3)
    differs — before anything is loaded."""
    path = _mid_window(tmp_path)
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    model, acc = _acc(steps=4, normalization="items")
    before_params = params_of(model)
    before = _snapshot(model, acc)
    with pytest.raises(
        CheckpointChecksumError, match=r"tensor '\S+' in 'model.safetensors' has CRC-32"
    ):
        acc.load(path)
    _same(before, model, acc)
    assert all(torch.equal(a, b) for a, b in zip(before_params, params_of(model), strict=True))


def test_mid_window_checkpoint_refuses_a_different_normalization(tmp_path: Path) -> None:
    """ACC-R5: in-flight gradients carry their normalization; resuming under another is refused."""
    path = _mid_window(tmp_path)
    _, acc = _acc(steps=4, normalization="mean")
    with pytest.raises(CheckpointMismatchError, match="normalization='items'"):
        acc.load(path)
    assert acc.stats.micro_steps == 0


def test_save_inside_a_microbatch_is_refused(tmp_path: Path) -> None:
    """ACC-R1: checkpoints are taken between microbatches only."""
    _, acc = _acc(steps=2)
    with pytest.raises(UsageError, match="inside a microbatch"), acc.microbatch():
        acc.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()
