"""Side by side: plain Lightning (``Trainer(accumulate_grad_batches=k)``, automatic
optimization) and GradAccum on the same data, against the float64 large-batch reference.
The figures (run with ``-s`` to see them) are the comparison table of ``docs/lightning.md``:

(a) a short last window: Lightning divides every loss by k, so a window of 2 gets half its
    gradient (Lightning #19987);
(b) an AMP-skipped step: Lightning's scheduler steps anyway and ``global_step`` counts the
    skip (Lightning #5558);
(c) a mid-window ``trainer.save_checkpoint``: Lightning saves no gradients, so the resumed
    window steps on its last microbatches only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import trainer_workers as W
from lightning.pytorch.plugins.precision import MixedPrecision

from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import ListLoader


def _plain(
    module: W.Net, sizes: list[int], k: int, *, epochs: int = 1, **kwargs: Any
) -> pl.Trainer:
    dtype = kwargs.pop("_dtype", torch.float64)
    callbacks = kwargs.pop("callbacks", [])
    tr = W.trainer(callbacks, accumulate_grad_batches=k, max_epochs=epochs, **kwargs)
    tr.fit(module, ListLoader(W.batches(sizes, dtype=dtype)))
    return tr


def _adapter(
    module: W.Net, sizes: list[int], k: int, *, epochs: int = 1, **kwargs: Any
) -> pl.Trainer:
    dtype = kwargs.pop("_dtype", torch.float64)
    tr = W.trainer([GradAccum(k), *kwargs.pop("callbacks", [])], max_epochs=epochs, **kwargs)
    tr.fit(module, ListLoader(W.batches(sizes, dtype=dtype)))
    return tr


def test_a_short_last_window() -> None:
    """ACC-W3: 10 microbatches in windows of 4, two epochs (each ends with a window of 2),
    ``mean``: plain Lightning's final parameters deviate from the reference; GradAccum's do
    not."""
    sizes = [3] * 10
    want = W.reference([sizes], 4, "mean", passes=2)[-1]
    plain, adapter = W.Net(), W.Net()
    plain_tr = _plain(plain, sizes, 4, epochs=2)
    adapter_tr = _adapter(adapter, sizes, 4, epochs=2)
    plain_error = W.rel_error(W.params(plain), want)
    adapter_error = W.rel_error(W.params(adapter), want)
    print(
        f"\n(a) short last window (2 of 4), 2 epochs: relative deviation from the float64 "
        f"large batch: plain Lightning {plain_error:.3e}, GradAccum {adapter_error:.3e}"
    )
    assert plain_tr.global_step == adapter_tr.global_step == 6
    assert plain_error > 1e-3
    assert adapter_error < 1e-12


def _scheduler(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), "interval": "step"}


def _fp16() -> list[Any]:
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**40, backoff_factor=2.0**-30, growth_interval=1_000_000
    )
    return [MixedPrecision("16-mixed", "cpu", scaler=scaler)]


def test_b_scheduler_after_an_amp_skipped_step() -> None:
    """ACC-F4, ACC-S3, ACC-S2: fp16 (Lightning's plugin, ``GradScaler("cpu",
    init_scale=2**40)``), 12 microbatches in windows of 4, StepLR(gamma=0.5) per step; the
    first window overflows. Plain Lightning skips the optimizer step but steps the scheduler
    and counts the step: lr 0.0125 and global_step 3 at the end. GradAccum: lr 0.025 and
    global_step 2 (two successful steps), and its parameters follow the reference that
    skips window 0 (fp16 accuracy)."""
    sizes = [4] * 12
    kwargs: dict[str, Any] = {"precision": None, "_dtype": torch.float32}
    plain = W.Net(momentum=0.0, scheduler=_scheduler, dtype=torch.float32)
    adapter = W.Net(momentum=0.0, scheduler=_scheduler, dtype=torch.float32)
    # torch notices: Lightning stepped the scheduler while the optimizer had not stepped.
    with pytest.warns(UserWarning, match=r"`lr_scheduler.step\(\)` before `optimizer.step\(\)`"):
        plain_tr = _plain(plain, sizes, 4, plugins=_fp16(), **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter_tr = _adapter(adapter, sizes, 4, plugins=_fp16(), **kwargs)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    plain_lr = plain_tr.optimizers[0].param_groups[0]["lr"]
    adapter_lr = adapter_tr.optimizers[0].param_groups[0]["lr"]
    want = W.reference([sizes], 4, "mean", momentum=0.0, skip=[0], lrs=[0.1, 0.1, 0.05])[-1]
    plain_error = W.rel_error(W.params(plain), want)
    adapter_error = W.rel_error(W.params(adapter), want)
    plain_sched = plain_tr.lr_scheduler_configs[0].scheduler.last_epoch
    adapter_sched = adapter_tr.lr_scheduler_configs[0].scheduler.last_epoch
    print(
        f"\n(b) AMP-skipped first window (fp16, 3 windows): plain Lightning global_step "
        f"{plain_tr.global_step}, scheduler steps {plain_sched}, final lr {plain_lr}, "
        f"deviation {plain_error:.3e}; GradAccum global_step {adapter_tr.global_step}, "
        f"scheduler steps {adapter_sched}, final lr {adapter_lr}, deviation {adapter_error:.3e}"
    )
    assert (plain_tr.global_step, plain_sched, plain_lr) == (3, 3, 0.0125)
    assert (adapter_tr.global_step, adapter_sched, adapter_lr) == (2, 2, 0.025)
    assert plain_error > 5e-2
    assert adapter_error < 1e-2


def test_c_mid_window_save_checkpoint(tmp_path: Path) -> None:
    """ACC-R2: 12 microbatches in windows of 4, ``mean``; ``trainer.save_checkpoint`` after
    microbatch 5 (window 1 holds microbatches 4 and 5), ``should_stop``, and a fresh
    Trainer resumes with ``fit(ckpt_path=...)`` (the stateful loader feeds microbatch 6
    next). Plain Lightning's checkpoint has no gradients: its resumed run deviates from its
    own uninterrupted one; GradAccum's equals its uninterrupted run bitwise."""
    sizes = [3] * 12
    figures = {}
    for name, run in (("plain Lightning", _plain), ("GradAccum", _adapter)):
        straight = W.Net()
        run(straight, sizes, 4)
        path = tmp_path / f"{name}.ckpt"
        stop = W.StopAfter(5, lambda t, p=path: t.save_checkpoint(p))
        run(W.Net(), sizes, 4, callbacks=[stop])
        assert stop.seen[-1] == (0, 5)
        resumed = W.Net(seed=7)
        extra = {"accumulate_grad_batches": 4} if run is _plain else {}
        tr = W.trainer([] if run is _plain else [GradAccum(4)], **extra)
        tr.fit(resumed, ListLoader(W.batches(sizes)), ckpt_path=str(path))
        assert tr.global_step == 3
        reference_error = W.rel_error(W.params(straight), W.reference([sizes], 4, "mean")[-1])
        assert reference_error < 1e-12  # both uninterrupted runs are exact here
        figures[name] = W.rel_error(W.params(resumed), W.params(straight))
    print(
        f"\n(c) mid-window save_checkpoint + fit(ckpt_path): relative deviation of the resumed "
        f"run from the uninterrupted one: plain Lightning {figures['plain Lightning']:.3e}, "
        f"GradAccum {figures['GradAccum']:.3e}"
    )
    assert figures["plain Lightning"] > 1e-3
    assert figures["GradAccum"] == 0.0
