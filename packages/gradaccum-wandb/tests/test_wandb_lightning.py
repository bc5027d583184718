"""`WandbLogger` under gradaccum-lightning beside Lightning's own ``WandbLogger`` (offline):
both write to one run on one axis, ``trainer/global_step``. Read back from the ``.wandb`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import ListLoader, quiet_lightning, quiet_trainer_kwargs
from gradaccum_wandb import WandbLogger
from gradaccum_wandb.offline import read_run

SIZES = [2, 5, 1, 3, 4, 2, 6, 1]  # windows of 3: 3, 3, 2 (the short last window steps)
STEPS = 3


class Net(pl.LightningModule):
    """A float64 linear model; ``training_step`` returns the summed loss and its item count
    (``normalization="items"``), stages the loss and logs it with ``self.log``."""

    def __init__(self, logger: WandbLogger) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1).double()
        self.wb = logger
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        loss = ((self.model(x) - y) ** 2).sum()
        self.wb.stage({"loss": loss})
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=False)
        return {"loss": loss, "items": x.shape[0]}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (1 + e))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_lightning_shares_the_trainer_global_step_axis(tmp_path: Path) -> None:
    """Lightning's ``WandbLogger`` and ours write one run: our rows sit at
    ``trainer/global_step`` 0, 1, 2 (``first_step=0``), the same values at which Lightning logs
    ``self.log`` of the window's last microbatch (ACC-S2), so both describe the same window
    at the same x; the staged loss is the window's Σ S_j / Σ n_j (short last window included,
    1e-12 relative), the lr is the one each step used; every logger metric is declared
    against ``trainer/global_step``."""
    gen = torch.Generator().manual_seed(5)
    data = [
        (
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
            torch.randn(n, 1, generator=gen, dtype=torch.float64),
        )
        for n in SIZES
    ]
    pl_logger = LightningWandbLogger(
        project="gradaccum-lightning", save_dir=str(tmp_path), offline=True
    )
    ours = WandbLogger(
        lambda: pl_logger.experiment, step_metric="trainer/global_step", first_step=0
    )
    ga = GradAccum(STEPS, normalization="items")
    ours.attach(ga)
    module = Net(ours)
    with quiet_lightning():
        trainer = pl.Trainer(
            callbacks=[ga],
            **quiet_trainer_kwargs(
                logger=pl_logger, log_every_n_steps=1, max_epochs=1, precision="64-true"
            ),
        )
        trainer.fit(module, ListLoader(data))
    assert trainer.global_step == 3
    wandb.finish()
    wandb.teardown()
    (file,) = [p for p in tmp_path.rglob("run-*.wandb") if "latest-run" not in p.parts]
    run = read_run(file)
    assert run.has_exit
    rows = [r for r in run.history if "accum/skipped" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 1, 2]
    lightning_rows = [r for r in run.history if "train_loss" in r]
    last_of_window = [2, 5, 7]
    assert [(r["trainer/global_step"], r["train_loss"]) for r in lightning_rows] == [
        (g, pytest.approx(module.losses[i], rel=1e-12)) for g, i in enumerate(last_of_window)
    ]
    for row, window in zip(rows, [slice(0, 3), slice(3, 6), slice(6, 8)], strict=True):
        want = sum(module.losses[window]) / sum(SIZES[window])
        assert row["loss"] == pytest.approx(want, rel=1e-12)
        assert row["accum/items_in_window"] == sum(SIZES[window])
    # the lr each optimizer step used: 0.1 / (1 + e), one scheduler step per optimizer step
    assert [r["accum/lr"] for r in rows] == [
        pytest.approx(0.1 / (1 + e), rel=1e-15) for e in range(3)
    ]
    assert run.metrics["accum/*"] == "trainer/global_step"
    assert run.metrics["loss"] == "trainer/global_step"
