"""Exact gradient accumulation with Lightning Fabric, on CPU.

    python examples/fabric_train.py                # one process
    python examples/fabric_train.py --devices 2    # two: Fabric(strategy="ddp"), gloo

The loop of ``examples/lightning_train.py`` without the Trainer: ``fabric.setup`` prepares a
small recurrent language model and AdamW, and ``FabricAccumulator`` drives the window: the
backward is ``fabric.backward`` (Fabric's precision plugin scales the loss), every microbatch but
the window's last runs under ``fabric.no_backward_sync`` on two processes (one gradient
all-reduce per window), and the window's gradient is divided by its token count over all
processes (``items`` normalization, device token counts), clipped at norm 1, stepped, and the
warm-up-then-linear-decay schedule stepped once.

Process 0 prints one line per optimizer step: the window's mean loss per token over all
processes, its token count, and the learning rate the step used. After microbatch
``--checkpoint-at`` every process calls ``acc.save(dir)`` (the shared gradaccum format: model,
optimizer, scheduler and every process's in-flight gradients). At the end it prints the SHA-256
of every process's parameters: they must all be equal. Then:

* ``--resume DIR`` restores such a directory with ``acc.load``, skips the microbatches of the
  interrupted epoch that were already run, and finishes the run: the final parameters are the
  uninterrupted run's, bit for bit.
* ``--check`` trains in float64 and also trains a copy of the model by hand, one large batch per
  window, and prints the largest parameter difference from the accumulated run.

With ``--devices 2``, ``fabric.launch()`` starts the second process (it runs this script again
with the launch variables set); no launcher is needed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gradaccum import ClipPolicy
from gradaccum_lightning import FabricAccumulator

VOCAB = 48
Batch = dict[str, torch.Tensor]


class TinyLM(nn.Module):
    """Embedding, a one-layer GRU and a linear head: next-token logits."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(input_ids))
        logits: torch.Tensor = self.head(hidden)
        return logits


def make_dataset(samples: int) -> list[torch.Tensor]:
    """Sequences of 6 to 40 tokens that count up by a per-sequence stride, modulo VOCAB."""
    gen = torch.Generator().manual_seed(1234)
    sequences = []
    for _ in range(samples):
        length = int(torch.randint(6, 41, (), generator=gen))
        start, stride = torch.randint(0, VOCAB, (2,), generator=gen).tolist()
        sequences.append((start + stride * torch.arange(length)) % VOCAB)
    return sequences


def collate(sequences: list[torch.Tensor]) -> Batch:
    """Right-pad to the longest sequence; labels are the next tokens, -100 on padding."""
    width = max(len(s) for s in sequences) - 1
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s) - 1] = s[:-1]
        labels[row, : len(s) - 1] = s[1:]
    return {"input_ids": input_ids, "labels": labels}


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The cross-entropy summed over the batch's tokens (padding ignored)."""
    logits = model(batch["input_ids"])
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
    )


def warmup_then_linear(total_steps: int, warmup: int = 3) -> Any:
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def make_optimizer(model: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps))
    return optimizer, scheduler


def sha256(model: nn.Module) -> str:
    """The parameters' bytes, hashed: equal hashes are bitwise-equal parameters."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Remaining:
    """The batches of ``loader`` after the first ``skip``, with ``len()`` counting them, so that
    ``acc.iterate`` plans the resumed epoch's short last window exactly. (It still loads the
    skipped batches; a sampler that starts at the position would not.)"""

    def __init__(self, loader: Any, skip: int) -> None:
        self.loader, self.skip = loader, skip

    def __len__(self) -> int:
        return len(self.loader) - self.skip

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(iter(self.loader), self.skip, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=1, help="processes (2: strategy='ddp')")
    parser.add_argument("--steps", type=int, default=4, help="microbatches per optimizer step")
    parser.add_argument("--batch", type=int, default=4, help="sequences per microbatch")
    parser.add_argument("--samples", type=int, default=232, help="sequences in the data set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-at", type=int, default=6, help="save after microbatch")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-out/fabric_train"))
    parser.add_argument("--resume", type=Path, help="an acc.save directory to resume from")
    parser.add_argument("--check", action="store_true", help="compare with a large-batch run")
    args = parser.parse_args()

    if args.check:  # float64, so that float32 rounding (which AdamW amplifies) hides nothing
        torch.set_default_dtype(torch.float64)
    fabric = L.Fabric(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto"
    )
    fabric.launch()  # with devices=2, starts the other process here
    torch.manual_seed(0)  # the same initial model on every process
    model = TinyLM()
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    dataset = make_dataset(args.samples)
    # Every process its own shard; the shuffled order depends only on the seed and the epoch
    # (set_epoch), so a resumed run sees the order the interrupted one saw.
    data_set = cast("Dataset[torch.Tensor]", dataset)  # a list of sequences
    sampler: DistributedSampler[torch.Tensor] = DistributedSampler(
        data_set, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=True, seed=0
    )
    # Not fabric.setup_dataloaders: its loader calls set_epoch itself with the number of times
    # it was iterated in this process, which restarts at 0 in a resumed process.
    loader = DataLoader(data_set, batch_size=args.batch, sampler=sampler, collate_fn=collate)
    total_steps = args.epochs * math.ceil(len(loader) / args.steps)
    optimizer, scheduler = make_optimizer(model, total_steps)
    model, optimizer = fabric.setup(model, optimizer)

    # Instead of no_backward_sync + fabric.backward(loss / k) + step/zero_grad every k batches.
    acc = FabricAccumulator(
        fabric,
        model,
        optimizer,
        steps=args.steps,
        scheduler=scheduler,
        normalization="items",
        clip=ClipPolicy(1.0),
    )

    start_epoch, consumed = 0, 0
    if args.resume is not None:
        acc.load(args.resume)  # model, optimizer, scheduler, and the open window
        start_epoch = acc.stats.epoch
        consumed = acc.stats.micro_steps - start_epoch * len(loader)
        fabric.print(f"resumed from {args.resume}: epoch {start_epoch}, microbatch {consumed}")
    fabric.print(
        f"{fabric.world_size} process(es) ({type(fabric.strategy).__name__}), "
        f"{len(loader)} microbatches of {args.batch} per process per epoch, "
        f"{args.steps} per optimizer step"
    )
    windows: list[list[Batch]] = []  # what this process trained on, window by window (--check)
    window: list[Batch] = []
    window_loss = torch.zeros(())
    resumed_window = acc.is_accumulating  # its first microbatches' losses were not seen here
    lr = optimizer.param_groups[0]["lr"]
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        data: Any = loader
        if epoch == start_epoch and consumed:  # the rest of the interrupted epoch
            data = Remaining(loader, consumed)
        for cpu_batch in acc.iterate(data):  # len(data) plans the short last window exactly
            batch = fabric.to_device(cpu_batch)
            if not acc.is_accumulating:  # a new window: the learning rate its step will use
                lr = optimizer.param_groups[0]["lr"]
            with acc.microbatch(items=(batch["labels"] != -100).sum()):  # stays on the device
                loss = loss_sum(model, batch)
                result = acc.backward(loss)  # steps, clips and zeroes at the window's boundary
            window_loss += loss.detach()
            window.append(batch)
            if result.boundary:
                total = fabric.all_reduce(window_loss, reduce_op="sum")  # logging only
                tokens = result.window_items  # over all processes, a device tensor
                assert isinstance(total, torch.Tensor)
                assert tokens is not None
                mean = "  n/a " if resumed_window else f"{float(total) / float(tokens):.4f}"
                fabric.print(
                    f"epoch {epoch} step {acc.stats.optimizer_steps:3d} "
                    f"loss {mean} tokens {int(tokens)} lr {lr:.6f}"
                )
                windows.append(window)
                window, resumed_window = [], False
                window_loss = torch.zeros(())
            if acc.stats.micro_steps == args.checkpoint_at and args.resume is None:
                path = args.output_dir / f"microbatch-{args.checkpoint_at}"
                acc.save(path)  # every process, mid-window: in-flight gradients included
                fabric.print(f"saved {path} (microbatch {acc.stats.position} of a window)")

    fabric.print(f"done: {acc.stats.optimizer_steps} optimizer steps")
    trained = model.module  # the user's module behind Fabric's wrapper
    hashes = [sha256(trained)]
    if fabric.world_size > 1:  # one per process: they must all be equal
        gathered: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(gathered, hashes[0])
        hashes = gathered
    fabric.print(f"parameters sha256, process by process: {' '.join(hashes)}")
    if args.check and args.resume is None:
        reference = large_batch_reference(initial, windows, total_steps)
        diff = max(
            (p - q).abs().max().item()
            for p, q in zip(trained.parameters(), reference.parameters(), strict=True)
        )
        fabric.print(f"largest difference from one large batch per window: {diff:.2e}")
    # Free the DDP model before the process group goes (at exit): destroying the group under a
    # live DDP model occasionally aborts the process at exit with gloo.
    del acc, model, trained, optimizer, scheduler
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def concatenate(window: list[Batch]) -> Batch:
    """The window's microbatches as one batch, right-padded to the longest sequence."""
    width = max(b["input_ids"].shape[1] for b in window)

    def cat(key: str, value: int) -> torch.Tensor:
        padded = [
            nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in window
        ]
        return torch.cat(padded)

    return {"input_ids": cat("input_ids", 0), "labels": cat("labels", -100)}


def large_batch_reference(
    initial: dict[str, torch.Tensor], windows: list[list[Batch]], total_steps: int
) -> nn.Module:
    """Plain PyTorch, no accumulation, no Lightning: each window's microbatches as one batch,
    the token-mean loss over every process (gradients and token counts summed across processes
    by hand), clipped at norm 1."""
    model = TinyLM()
    model.load_state_dict(initial)
    optimizer, scheduler = make_optimizer(model, total_steps)
    distributed = dist.is_available() and dist.is_initialized()
    for window in windows:
        large = concatenate(window)
        optimizer.zero_grad(set_to_none=True)
        loss_sum(model, large).backward()  # type: ignore[no-untyped-call]
        tokens = (large["labels"] != -100).sum().double()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if distributed:
            for g in grads:
                dist.all_reduce(g)
            dist.all_reduce(tokens)
        for g in grads:
            g.div_(tokens)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return model


if __name__ == "__main__":
    main()
