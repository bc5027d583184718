"""Exact gradient accumulation with Hugging Face Accelerate, on CPU.

    python examples/accelerate_train.py                                          # one process
    ACCELERATE_USE_CPU=1 torchrun --nproc-per-node=2 examples/accelerate_train.py  # two

A small recurrent language model learns synthetic variable-length sequences with AdamW, a
warm-up-then-linear-decay learning rate, gradient clipping at norm 1, and 8 microbatches of 4
sequences per process per optimizer step. The loss is summed over tokens and the accumulator
divides the window's gradient by the window's token count over all processes (``items``
normalization with device token counts: nothing is read back to the host before the window's
boundary), so every update is the token mean of one large batch, short last window included.

The main process prints one line per optimizer step: the window's mean loss per token over all
processes, its token count, and the learning rate the step used. Mid-window (after microbatch
``--checkpoint-at``) it calls ``accelerator.save_state``. At the end it prints the SHA-256 of
every process's parameters, gathered to the main process: they must all be equal. Then:

* ``--resume DIR`` restores a ``save_state`` directory, skips the microbatches of the
  interrupted pass that were already run, and finishes the run: the final parameters are the
  uninterrupted run's, bit for bit (the same SHA-256).
* ``--check`` trains in float64 and also trains a copy of the model by hand, one large batch
  per window (the window's microbatches concatenated, the token-mean loss, gradients summed
  over the processes, clipped, one AdamW step), and prints the largest parameter difference
  from the accumulated run.

``ACCELERATE_USE_CPU=1`` matters: without it ``torchrun`` on a machine without GPUs starts two
independent single-process runs (and ``accelerate launch --cpu --num_processes 2`` starts one).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader

from gradaccum import ClipPolicy
from gradaccum_accelerate import Accumulator

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


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="microbatches per optimizer step")
    parser.add_argument("--batch", type=int, default=4, help="sequences per microbatch")
    parser.add_argument("--samples", type=int, default=232, help="sequences in the data set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-at", type=int, default=11, help="save_state after microbatch")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-out/accelerate_train"))
    parser.add_argument("--resume", type=Path, help="a save_state directory to resume from")
    parser.add_argument("--check", action="store_true", help="compare with a large-batch run")
    args = parser.parse_args()

    if args.check:  # float64, so that float32 rounding (which AdamW amplifies) hides nothing
        torch.set_default_dtype(torch.float64)
    # use_seedable_sampler: the shuffled order of every epoch depends only on the seed and the
    # epoch (set with loader.set_epoch), so a resumed run sees the order the interrupted run saw.
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    torch.manual_seed(0)  # the same initial model on every process
    model = TinyLM()
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    loader = DataLoader(
        make_dataset(args.samples), batch_size=args.batch, shuffle=True, collate_fn=collate
    )
    per_process = math.ceil(len(loader) / accelerator.num_processes)
    total_steps = args.epochs * math.ceil(per_process / args.steps)
    optimizer, scheduler = make_optimizer(model, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    # After prepare, and instead of accelerator.accumulate(): gradient_accumulation_steps stays 1.
    acc = Accumulator(
        accelerator,
        model,
        optimizer,
        steps=args.steps,
        scheduler=scheduler,
        normalization="items",
        clip=ClipPolicy(1.0),
    )

    start_epoch, consumed = 0, 0
    if args.resume is not None:
        accelerator.load_state(args.resume)  # model, optimizer, scheduler, and the open window
        start_epoch = acc.stats.epoch
        consumed = acc.stats.micro_steps - start_epoch * len(loader)
        accelerator.print(f"resumed from {args.resume}: epoch {start_epoch}, microbatch {consumed}")

    accelerator.print(
        f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}), "
        f"{len(loader)} microbatches of {args.batch} per process per epoch, "
        f"{args.steps} per optimizer step"
    )
    windows: list[list[Batch]] = []  # what this process trained on, window by window (--check)
    window: list[Batch] = []
    window_loss = torch.zeros((), device=accelerator.device)
    resumed_window = acc.is_accumulating  # its first microbatches' losses were not seen here
    lr = optimizer.param_groups[0]["lr"]
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)
        data = loader
        if epoch == start_epoch and consumed:  # the rest of the interrupted pass
            data = accelerator.skip_first_batches(loader, consumed)
        for batch in acc.iterate(data):  # len(data) plans the short last window exactly
            if not acc.is_accumulating:  # a new window: the learning rate its step will use
                lr = optimizer.param_groups[0]["lr"]
            with acc.microbatch(items=(batch["labels"] != -100).sum()):  # stays on the device
                loss = loss_sum(model, batch)
                result = acc.backward(loss)  # steps, clips and zeroes at the window's boundary
            window_loss += loss.detach()
            window.append(batch)
            if result.boundary:
                total_loss = accelerator.reduce(window_loss, "sum")  # logging only
                tokens = result.window_items  # over all processes, a device tensor
                mean = "  n/a " if resumed_window else f"{float(total_loss) / float(tokens):.4f}"
                accelerator.print(
                    f"epoch {epoch} step {acc.stats.optimizer_steps:3d} "
                    f"loss {mean} tokens {int(tokens)} lr {lr:.6f}"
                )
                windows.append(window)
                window, resumed_window = [], False
                window_loss = torch.zeros((), device=accelerator.device)
            if acc.stats.micro_steps == args.checkpoint_at and args.resume is None:
                path = args.output_dir / f"microbatch-{args.checkpoint_at}"
                accelerator.save_state(path)  # mid-window: in-flight gradients included
                accelerator.print(f"saved {path} (microbatch {acc.stats.position} of a window)")

    accelerator.print(f"done: {acc.stats.optimizer_steps} optimizer steps")
    trained = accelerator.unwrap_model(model)
    hashes = gather_object([sha256(trained)])  # one per process: they must all be equal
    accelerator.print(f"parameters sha256, process by process: {' '.join(hashes)}")
    if args.check and args.resume is None:
        reference = large_batch_reference(initial, windows, total_steps, accelerator.device)
        diff = max(
            (p - q).abs().max().item()
            for p, q in zip(trained.parameters(), reference.parameters(), strict=True)
        )
        accelerator.print(f"largest difference from one large batch per window: {diff:.2e}")

    # Free the prepared (DDP) model before the process group: destroying the group under a
    # live DDP model occasionally aborts the process at exit with gloo.
    del acc, model, trained, optimizer, scheduler
    gc.collect()
    accelerator.end_training()


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
    initial: dict[str, torch.Tensor],
    windows: list[list[Batch]],
    total_steps: int,
    device: torch.device,
) -> nn.Module:
    """Plain PyTorch, no accumulation: each window's microbatches as one batch, the token-mean
    loss over every process (gradients and token counts summed across processes by hand)."""
    model = TinyLM()
    model.load_state_dict(initial)
    model.to(device)
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
