"""Weights & Biases logging at optimizer steps, on CPU, offline by default.

    python examples/wandb_train.py                 # offline run under ./wandb-example
    python examples/wandb_train.py --online        # a real W&B run (needs `wandb login`)
    torchrun --nproc-per-node=2 examples/wandb_train.py   # DDP: only rank 0 writes the run

A small regression model learns y = x·w + noise from microbatches of unequal size (3 to 9
rows), 4 microbatches per optimizer step, under ``normalization="items"``: the loss is summed
over rows and the window's gradient is divided by its row count. A warm-up-then-decay learning
rate, gradient clipping at norm 1 (so the pre-clip gradient norm is computed anyway and logging
it costs one host read per step), and a `gradaccum_wandb.WandbLogger` that writes one row per
optimizer step on the ``optimizer_step`` axis: the summed loss staged per microbatch becomes the
window's loss per row, plus the learning rate, items, counters and gradient norm.

Offline, the example reads the run back from its ``.wandb`` file when it is done
(`gradaccum_wandb.offline.read_history`) and prints one line per row.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import wandb
from torch import nn

from gradaccum import ClipPolicy
from gradaccum_torch import Accumulator
from gradaccum_wandb import WandbLogger
from gradaccum_wandb.offline import read_history

FEATURES = 8


def make_data(rank: int, microbatches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Microbatches of 3 to 9 rows of a fixed linear problem, different on every rank."""
    gen = torch.Generator().manual_seed(1000 + rank)
    w = torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1)
    out = []
    for _ in range(microbatches):
        n = int(torch.randint(3, 10, (), generator=gen))
        x = torch.randn(n, FEATURES, generator=gen)
        out.append((x, x @ w + 0.1 * torch.randn(n, 1, generator=gen)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--online", action="store_true", help="log to W&B (default: offline)")
    parser.add_argument("--dir", default="wandb-example", help="where the run's files go")
    parser.add_argument("--steps", type=int, default=4, help="microbatches per optimizer step")
    parser.add_argument("--microbatches", type=int, default=32, help="microbatches per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model: nn.Module = nn.Linear(FEATURES, 1)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    total_steps = args.epochs * -(-args.microbatches // args.steps)
    warmup = max(1, total_steps // 5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda e: min((e + 1) / warmup, max(0.0, (total_steps - e) / (total_steps - warmup))),
    )
    clip = ClipPolicy(1.0)
    acc: Accumulator
    if distributed:
        from gradaccum_ddp import DDPAccumulator

        assert isinstance(model, nn.parallel.DistributedDataParallel)
        acc = DDPAccumulator(
            model, optimizer, args.steps, normalization="items", clip=clip, scheduler=scheduler
        )
    else:
        acc = Accumulator(
            model, optimizer, args.steps, normalization="items", clip=clip, scheduler=scheduler
        )

    run = None
    out = Path(args.dir).resolve()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project="gradaccum-example",
            mode="online" if args.online else "offline",
            dir=str(out),
            config={"steps": args.steps, "normalization": "items", "epochs": args.epochs},
        )
    logger = WandbLogger(run, grad_norm=True).attach(acc)

    data = make_data(rank, args.microbatches)
    for _ in range(args.epochs):
        for x, y in acc.iterate(data):
            with acc.microbatch(items=x.shape[0]):
                loss = ((model(x) - y) ** 2).sum()
                logger.stage({"train/loss": loss})  # device tensor, reduced per window
                acc.backward(loss)

    if run is not None:
        run_dir = Path(run.dir).parent
        run.finish()
        wandb.teardown()  # flushes the .wandb file completely before we read it
        if not args.online:
            print(f"offline run: {run_dir}")
            for row in read_history(run_dir):
                print(
                    f"optimizer_step {row['optimizer_step']:3d}  "
                    f"loss/row {row['train/loss']:.6f}  "
                    f"items {row['accum/items_in_window']:3d}  "
                    f"lr {row['accum/lr']:.6f}  "
                    f"grad_norm {row['accum/grad_norm']:.4f}"
                )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
