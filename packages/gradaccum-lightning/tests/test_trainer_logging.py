"""What ``self.log(..., on_step=True)`` in ``training_step`` lands on, under GradAccum: which
``log_metrics(metrics, step)`` calls a logger receives, at which step."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
import trainer_workers as W
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.plugins.precision import MixedPrecision

from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import ListLoader

SIZES = [3] * 10  # windows of 4: 4, 4, 2


class Recorder(Logger):
    """A logger that keeps every ``log_metrics(metrics, step)`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kw: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def train_losses(self) -> list[tuple[int | None, float]]:
        return [(step, m["train_loss"]) for step, m in self.calls if "train_loss" in m]


def _fit(ga: GradAccum, epochs: int = 1, **kwargs: Any) -> tuple[Any, Recorder, W.Windows, W.Net]:
    logger, windows = Recorder(), W.Windows()
    tr = W.trainer([ga, windows], logger=logger, log_every_n_steps=1, max_epochs=epochs, **kwargs)
    module = W.Net("mean", log_loss=True)
    tr.fit(module, ListLoader(W.batches(SIZES)))
    return tr, logger, windows, module


def test_step_metrics_are_logged_once_per_optimizer_step_at_its_step() -> None:
    """ACC-S2, ACC-C3: 2 epochs of 10 microbatches in windows of 4 — 6 optimizer steps: the
    logger receives the on_step metric 6 times, at steps 0..5 (one per optimizer step,
    numbered from 0 as Lightning numbers its logging steps), each holding the loss of the
    window's last microbatch; ``trainer.global_step`` is 6."""
    tr, logger, windows, module = _fit(GradAccum(4), epochs=2)
    assert tr.global_step == 6
    losses = logger.train_losses()
    assert [step for step, _ in losses] == [0, 1, 2, 3, 4, 5]
    assert [value for _, value in losses] == [module.losses[i] for i in (3, 7, 9, 13, 17, 19)]
    assert windows.global_steps == [1, 2, 3, 4, 5, 6]


def test_without_log_each_window_lightning_logs_every_microbatch() -> None:
    """``log_each_window=False`` leaves Lightning's manual-optimization logging alone: one
    call per microbatch, at steps 0..9."""
    tr, logger, _, module = _fit(GradAccum(4, log_each_window=False))
    assert tr.global_step == 3
    assert logger.train_losses() == list(enumerate(module.losses))


def test_logging_step_after_an_amp_skipped_window() -> None:
    """ACC-F4, ACC-S2: under fp16 with an overflowing first window (skipped), the logger gets
    one call per *optimizer step*: the skipped window logs nothing and advances no logger
    step, so the two successful steps log at steps 0 and 1, as two steps would without the
    skip."""
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**40, backoff_factor=2.0**-30, growth_interval=1_000_000
    )
    logger, windows = Recorder(), W.Windows()
    tr = W.trainer(
        [GradAccum(4), windows],
        logger=logger,
        log_every_n_steps=1,
        precision=None,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    module = W.Net("mean", log_loss=True, dtype=torch.float32)
    tr.fit(module, ListLoader(W.batches([4] * 12, dtype=torch.float32)))
    assert tr.global_step == 2
    assert windows.global_steps == [0, 1, 2]
    assert [step for step, _ in logger.train_losses()] == [0, 1]
