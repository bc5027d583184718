"""Rank programs for the 2-rank tests (run by ``gradaccum_ddp.testing.launch`` and
``gradaccum_accelerate.testing.launch_accelerate``): each writes what it saw to a JSON file;
only rank 0 may create a W&B run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# Per rank: unequal item counts; 6 microbatches, windows of 3 -> 2 optimizer steps.
SIZES = [[2, 5, 1, 3, 4, 2], [3, 1, 4, 1, 5, 6]]
STEPS = 3


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [
        (
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
            torch.randn(n, 1, generator=gen, dtype=torch.float64),
        )
        for n in SIZES[rank]
    ]


def _finish(run: Any) -> None:
    import wandb

    if run is not None:
        run.finish()
    wandb.teardown()


def ddp_program(rank: int, world_size: int, out: str) -> None:
    """DDPAccumulator under ``items`` with the logger on every rank; rank 0 owns the run."""
    import wandb
    from torch.nn.parallel import DistributedDataParallel

    from gradaccum_ddp import DDPAccumulator
    from gradaccum_wandb import WandbLogger

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 1).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = DDPAccumulator(model, opt, steps=STEPS, normalization="items")
    run = None
    if rank == 0:
        run = wandb.init(mode="offline", dir=os.path.join(out, "rank0"), project="gradaccum-ddp")
    logger = WandbLogger(run).attach(acc)
    losses = []
    for x, y in acc.iterate(batches(rank)):
        with acc.microbatch(items=x.shape[0]):
            loss = ((model(x) - y) ** 2).sum()
            logger.stage({"loss": loss})
            losses.append(float(loss.detach()))
            acc.backward(loss)
    if rank == 0:
        _finish(run)
    result = {
        "rank": rank,
        "logger_rank": logger.rank,
        "losses": losses,
        "pending": len(logger._sums),
    }
    Path(out, f"ddp.rank{rank}.json").write_text(json.dumps(result))


def accelerate_program(rank: int, world_size: int, out: str) -> None:
    """gradaccum-accelerate with ``Accelerator(log_with="wandb")``: the logger writes to the
    tracker's run while the loop also calls ``accelerator.log`` (no ``step=``) after each step."""
    from accelerate import Accelerator

    from gradaccum_accelerate import Accumulator
    from gradaccum_wandb import WandbLogger

    accelerator = Accelerator(cpu=True, log_with="wandb")
    accelerator.init_trackers(
        "gradaccum-accelerate",
        init_kwargs={"wandb": {"mode": "offline", "dir": os.path.join(out, f"rank{rank}")}},
    )
    torch.manual_seed(0)
    raw = torch.nn.Linear(3, 1).double()
    model, opt = accelerator.prepare(raw, torch.optim.SGD(raw.parameters(), lr=0.1))
    acc = Accumulator(accelerator, model, opt, steps=STEPS, normalization="items")
    logger = WandbLogger(lambda: accelerator.get_tracker("wandb", unwrap=True)).attach(acc)
    user_rows = 0
    for x, y in acc.iterate(batches(rank)):
        with acc.microbatch(items=x.shape[0]):
            loss = ((model(x) - y) ** 2).sum()
            logger.stage({"loss": loss})
            stepped = acc.backward(loss)
        if stepped:
            accelerator.log({"user/effective_step": acc.effective_step})
            user_rows += 1
    accelerator.end_training()
    import wandb

    wandb.teardown()
    result = {
        "rank": rank,
        "logger_rank": logger.rank,
        "main": accelerator.is_main_process,
        "user_rows": user_rows,
    }
    Path(out, f"accelerate.rank{rank}.json").write_text(json.dumps(result))


def lightning_program(rank: int, world_size: int, out: str) -> None:
    """``Trainer(strategy="ddp", devices=2)`` with gradaccum-lightning's ``GradAccum``,
    Lightning's ``WandbLogger`` (offline; it creates its run on rank 0 only) and ours on its
    axis; every rank stages its loss."""
    import lightning.pytorch as pl
    import wandb
    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    from gradaccum_lightning import GradAccum
    from gradaccum_lightning.testing import ListLoader, quiet_lightning, quiet_trainer_kwargs
    from gradaccum_wandb import WandbLogger

    class Net(pl.LightningModule):
        def __init__(self, logger: WandbLogger) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = torch.nn.Linear(3, 1).double()
            self.wb = logger

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
            x, y = batch
            loss = ((self.model(x) - y) ** 2).sum()
            self.wb.stage({"loss": loss})
            return {"loss": loss, "items": x.shape[0]}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pl_logger = LightningWandbLogger(project="gradaccum-lightning", save_dir=out, offline=True)
    ours = WandbLogger(
        lambda: pl_logger.experiment, step_metric="trainer/global_step", first_step=0
    )
    ga = GradAccum(STEPS, normalization="items")
    ours.attach(ga)
    with quiet_lightning():
        trainer = pl.Trainer(
            callbacks=[ga],
            **quiet_trainer_kwargs(
                logger=pl_logger,
                strategy="ddp",
                devices=2,
                use_distributed_sampler=False,
                precision="64-true",
                max_epochs=1,
            ),
        )
        trainer.fit(Net(ours), ListLoader(batches(rank)))
    if rank == 0:
        wandb.finish()
        wandb.teardown()
    result = {"rank": rank, "logger_rank": ours.rank, "global_step": trainer.global_step}
    Path(out, f"lightning.rank{rank}.json").write_text(json.dumps(result))
