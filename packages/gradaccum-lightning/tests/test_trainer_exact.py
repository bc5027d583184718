"""GradAccum under a real ``Trainer.fit`` on one process: exact against the float64
large-batch reference computed by hand, ``trainer.global_step`` equal to optimizer steps (an
AMP overflow included), LR schedulers, ``Trainer(gradient_clip_val=...)`` and validation
inside a window."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import trainer_workers as W
from lightning.pytorch.plugins.precision import MixedPrecision

from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import ListLoader

REL = 1e-12
UNEQUAL = [2, 5, 1, 3, 4, 2, 6, 1, 2, 3]  # 10 microbatches: windows 4, 4, 2


def _fit(
    module: W.Net,
    sizes: list[int],
    ga: GradAccum,
    epochs: int = 1,
    dtype: torch.dtype = torch.float64,
    **kwargs: Any,
) -> tuple[Any, W.Windows]:
    windows = W.Windows()
    tr = W.trainer([ga, windows], max_epochs=epochs, **kwargs)
    tr.fit(module, ListLoader(W.batches(sizes, dtype=dtype)))
    return tr, windows


def _check_exact(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for window, (g, w) in enumerate(zip(got, want, strict=True)):
        error = W.rel_error(g, w)
        assert error <= REL, f"window {window}: relative error {error:.2e}"


@pytest.mark.parametrize("device_items", [False, True], ids=["int_items", "int_and_device_items"])
def test_items_unequal_microbatches_equal_the_large_batch(device_items: bool) -> None:
    """ACC-N2, ACC-W3, ACC-N8: unequal microbatches (1..6 items) under ``items``, the counts
    returned as ints, or as ints and 0-d tensors on alternate batches: every window (the
    short last one included) equals one step on the large batch's item mean."""
    module = W.Net("items", device_items=device_items)
    tr, windows = _fit(module, UNEQUAL, GradAccum(4, normalization="items"))
    _check_exact(windows.params, W.reference([UNEQUAL], 4, "items"))
    assert tr.global_step == 3
    stats = GradAccum.of(tr).stats
    assert stats.items_total == sum(UNEQUAL)
    assert stats.micro_steps == 10


def test_short_last_window_under_mean_equals_the_large_batch() -> None:
    """ACC-W3, ACC-W4, ACC-N1: 10 microbatches in windows of 4 under ``mean``, two epochs:
    each epoch's last window (2 microbatches) is the mean of its 2 microbatch means, planned
    from ``trainer.num_training_batches``, not 1/4 of their sum."""
    module = W.Net("mean")
    tr, windows = _fit(module, UNEQUAL, GradAccum(4), epochs=2)
    _check_exact(windows.params, W.reference([UNEQUAL], 4, "mean", passes=2))
    assert tr.global_step == 6
    assert GradAccum.of(tr).stats.epoch == 2


def _fp16_plugin(scaler: torch.amp.GradScaler) -> list[Any]:
    return [MixedPrecision("16-mixed", "cpu", scaler=scaler)]


def _overflow_scaler() -> torch.amp.GradScaler:
    """Overflows the first window in fp16, then backs off to 2**10 where nothing overflows."""
    return torch.amp.GradScaler(
        "cpu", init_scale=2.0**40, backoff_factor=2.0**-30, growth_interval=1_000_000
    )


def _step_lr(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), "interval": "step"}


def test_global_step_counts_optimizer_steps_and_skips_the_scheduler_after_an_amp_overflow() -> None:
    """ACC-F4, ACC-S2, ACC-S3, ACC-C3: fp16 through Lightning's plugin with
    ``GradScaler("cpu", init_scale=2**40)``: window 0 overflows. The optimizer and the
    scheduler do not step, ``trainer.global_step`` does not count it, the scale backs off;
    the 2 windows after it step (``global_step`` 1, 2; lr 0.1, 0.05, 0.025)."""
    scaler = _overflow_scaler()
    module = W.Net("mean", momentum=0.0, scheduler=_step_lr, dtype=torch.float32)
    before = W.params(module)
    tr, windows = _fit(
        module,
        [4] * 12,
        GradAccum(4),
        dtype=torch.float32,
        precision=None,
        plugins=_fp16_plugin(scaler),
    )
    acc = GradAccum.of(tr)
    assert acc.stats.optimizer_steps == 2 and acc.stats.skipped_steps == 1
    assert tr.global_step == acc.effective_step == 2
    assert windows.global_steps == [0, 1, 2]
    # The skipped window changed nothing and did not move the learning rate.
    assert all(torch.equal(windows.params[0][n], before[n]) for n in before)
    assert windows.lrs == [0.1, 0.05, 0.025]
    assert tr.lr_scheduler_configs[0].scheduler.last_epoch == 2
    assert scaler.get_scale() == 2.0**10


def test_global_step_equals_optimizer_steps_and_max_steps_counts_them() -> None:
    """ACC-S2, ACC-C3: ``max_steps`` counts optimizer steps: ``max_steps=2`` with windows
    of 4 stops after 8 microbatches, not 2."""
    module = W.Net("mean")
    tr, windows = _fit(module, [3] * 12, GradAccum(4), max_steps=2)
    assert tr.global_step == 2
    assert GradAccum.of(tr).stats.micro_steps == 8
    _check_exact(windows.params, W.reference([[3] * 12], 4, "mean")[:2])


@pytest.mark.parametrize(
    ("interval", "frequency", "expected"),
    [
        # 2 epochs of 10 microbatches in windows of 4: 3 optimizer steps per epoch.
        ("epoch", 1, [0.1, 0.1, 0.1, 0.05, 0.05, 0.05]),
        ("epoch", 2, [0.1] * 6),
        ("step", 2, [0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]),
    ],
)
def test_scheduler_interval_and_frequency(
    interval: str, frequency: int, expected: list[float]
) -> None:
    """ACC-S3: ``interval="epoch"`` schedulers step at each epoch's end (every
    ``frequency`` epochs; Lightning itself steps none in manual optimization);
    ``interval="step"`` ones once per ``frequency`` optimizer steps."""

    def scheduler(opt: torch.optim.Optimizer) -> dict[str, Any]:
        return {
            "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
            "interval": interval,
            "frequency": frequency,
        }

    module = W.Net("mean", scheduler=scheduler)
    tr, windows = _fit(module, UNEQUAL, GradAccum(4), epochs=2)
    assert windows.lrs == expected
    steps = tr.lr_scheduler_configs[0].scheduler.last_epoch
    assert steps == {"epoch": 2 // frequency, "step": 6 // frequency}[interval]
    # A window steps with the rate before its scheduler step (an epoch scheduler steps after
    # the epoch's last window was recorded).
    used = expected if interval == "epoch" else [0.1, *expected[:-1]]
    _check_exact(windows.params, W.reference([UNEQUAL], 4, "mean", passes=2, lrs=used))


def _epoch_step_lr(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), "interval": "epoch"}


def test_epoch_scheduler_does_not_step_for_an_epoch_cut_short() -> None:
    """ACC-S3: ``max_steps=2`` ends the fit inside epoch 0 (after 8 of 10 microbatches):
    plain Lightning (automatic optimization, ``accumulate_grad_batches=4``) does not step
    its ``interval="epoch"`` scheduler for that epoch, and neither should GradAccum."""
    plain = W.trainer([], max_epochs=2, max_steps=2, accumulate_grad_batches=4)
    plain.fit(W.Net("mean", scheduler=_epoch_step_lr), ListLoader(W.batches(UNEQUAL)))
    assert plain.lr_scheduler_configs[0].scheduler.last_epoch == 0
    module = W.Net("mean", scheduler=_epoch_step_lr)
    tr, _ = _fit(module, UNEQUAL, GradAccum(4), epochs=2, max_steps=2)
    assert tr.global_step == 2
    assert tr.lr_scheduler_configs[0].scheduler.last_epoch == 0


@pytest.mark.parametrize(
    ("algorithm", "value"), [("norm", 0.05), ("value", 0.01)], ids=["norm", "value"]
)
def test_trainer_gradient_clip_val_clips_once_per_window(algorithm: str, value: float) -> None:
    """ACC-L1, ACC-B1: ``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)``
    becomes a ClipPolicy: the normalized window gradient is clipped once, at the boundary
    (clipping each microbatch would differ), exactly as the reference clips the large
    batch's gradient."""
    module = W.Net("items")
    tr, windows = _fit(
        module,
        UNEQUAL,
        GradAccum(4, normalization="items"),
        gradient_clip_val=value,
        gradient_clip_algorithm=algorithm,
    )
    acc = GradAccum.of(tr).accumulator
    assert acc.config.clip is not None
    assert (acc.config.clip.mode, acc.config.clip.max) == (algorithm, value)
    want = W.reference([UNEQUAL], 4, "items", clip=(algorithm, value))
    _check_exact(windows.params, want)
    # The clip is active: without it the trajectory is far away.
    assert W.rel_error(windows.params[-1], W.reference([UNEQUAL], 4, "items")[-1]) > 1e-3


def test_trainer_gradient_clip_val_clips_after_unscaling_under_fp16() -> None:
    """ACC-L1, ACC-P3: under the fp16 plugin (scale 2**10) the boundary clips the true
    (unscaled) window gradient: the trajectory follows the float64 reference with the same
    clip to fp16 accuracy; clipping the scaled gradient to 0.05 would leave the steps
    2**10 times too small."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1_000_000)
    module = W.Net("mean", dtype=torch.float32)
    tr, windows = _fit(
        module,
        UNEQUAL,
        GradAccum(4),
        dtype=torch.float32,
        precision=None,
        plugins=_fp16_plugin(scaler),
        gradient_clip_val=0.05,
    )
    want = W.reference([UNEQUAL], 4, "mean", clip=("norm", 0.05))
    assert tr.global_step == 3
    for got, ref in zip(windows.params, want, strict=True):
        assert W.rel_error(got, ref) < 1e-2
    unclipped = W.reference([UNEQUAL], 4, "mean")
    assert W.rel_error(unclipped[-1], want[-1]) > 5e-2  # the clip is active


@pytest.mark.parametrize("log_each_window", [True, False])
def test_validation_inside_a_window_keeps_the_in_flight_gradients(log_each_window: bool) -> None:
    """ACC-R1, ACC-W2: ``val_check_interval=3`` with windows of 4 runs validation after
    microbatches 2, 5, 8 — inside windows. Lightning's ``on_validation_model_zero_grad``
    must not wipe the window's gradients: the result is exact. With
    ``log_each_window=False`` Lightning calls the hook (it does not know a window is open)
    and GradAccum's guard keeps the gradients."""
    module = W.ValNet("items")
    ga = GradAccum(4, normalization="items", log_each_window=log_each_window)
    windows = W.Windows()
    tr = W.trainer([ga, windows], val_check_interval=3, limit_val_batches=1)
    val = ListLoader(W.batches([2], seed=9))
    tr.fit(module, ListLoader(W.batches(UNEQUAL)), val)
    assert module.validated == [2, 5, 8]  # batch_idx at each validation: mid-window
    _check_exact(windows.params, W.reference([UNEQUAL], 4, "items"))
