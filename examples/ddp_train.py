"""Exact gradient accumulation under DistributedDataParallel, on CPU.

    torchrun --nproc-per-node=2 examples/ddp_train.py

Two processes (gloo) train a small regression model on a synthetic data set,
8 microbatches per rank per optimizer step. Rank 0 prints, for every window,
its own mean loss, the window's item count over all ranks (the divisor of the
gradient, from one all-reduce at the boundary), and the number of gradient
reductions the window made: 1, however many microbatches it has.

On several machines, run on each (node rank 0 on the first, 1 on the second)::

    torchrun --nnodes=2 --nproc-per-node=1 --node-rank=<0|1> \\
        --rdzv-backend=c10d --rdzv-endpoint=<host of node 0>:29400 examples/ddp_train.py
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradaccum_ddp import DDPAccumulator
from gradaccum_ddp.testing import ReductionCounter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="microbatches per window")
    parser.add_argument("--batch", type=int, default=4, help="microbatch size per rank")
    parser.add_argument("--samples", type=int, default=600, help="samples in the data set")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun provides the rest
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same data set and initial model on every rank
    x = torch.randn(args.samples, 16)
    y = x @ torch.randn(16, 1) + 0.1 * torch.randn(args.samples, 1)
    dataset = TensorDataset(x, y)
    # drop_last=True: every rank sees the same number of microbatches (checked each pass).
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        dataset, drop_last=True, seed=0
    )
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler)

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    acc = DDPAccumulator(ddp, optimizer, steps=args.steps, normalization="items")
    counter = ReductionCounter(ddp, acc)  # counts gradient all-reduces, for the printout

    if rank == 0:
        print(f"{world} ranks, {args.steps} microbatches of {args.batch} per rank per step")
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        window_loss, window_items, items_before = torch.zeros(()), 0, acc.stats.items_total
        for xb, yb in acc.iterate(loader):
            xb, yb = xb.to(device), yb.to(device)
            with acc.microbatch(items=len(yb)):  # forward and backward inside
                loss = ((ddp(xb) - yb) ** 2).sum()  # a sum over items: normalization="items"
                window_loss, window_items = (
                    window_loss + loss.detach().cpu(),
                    window_items + len(yb),
                )
                stepped = acc.backward(loss)
            if not acc.is_accumulating:  # the window closed
                stats = acc.stats
                if rank == 0:
                    print(
                        f"epoch {epoch} step {stats.optimizer_steps:3d} "
                        f"{'stepped' if stepped else 'skipped'} "
                        f"loss {window_loss.item() / window_items:.4f} (rank 0) "
                        f"items {stats.items_total - items_before} (all ranks) "
                        f"reductions {counter.take()}",
                        flush=True,
                    )
                window_loss, window_items, items_before = torch.zeros(()), 0, stats.items_total
    if rank == 0:
        print(f"done: {acc.stats.optimizer_steps} steps, {acc.stats.items_total} items")
    # Free DDP before its process group: destroying the group under a live DDP model
    # occasionally aborts the process at exit ("terminate called without an active exception").
    del acc, counter, ddp, optimizer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
