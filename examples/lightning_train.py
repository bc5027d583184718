"""Exact gradient accumulation with the Lightning Trainer, on CPU.

    python examples/lightning_train.py                # one process
    python examples/lightning_train.py --devices 2    # two: Trainer(strategy="ddp"), gloo

A LightningModule (``self.model``: a small recurrent language model) learns synthetic
variable-length sequences with AdamW, a warm-up-then-linear-decay learning rate stepped per
optimizer step, gradient clipping at norm 1 (``Trainer(gradient_clip_val=1.0)``) and 4
microbatches of 4 sequences per process per optimizer step. Its ``training_step`` returns
``{"loss": summed_loss, "items": tokens}``, the token count a device tensor, and the callback
``GradAccum(steps=4, normalization="items", model_attr="model")`` divides each window's gradient
by the window's token count over all processes: every update is the token mean of one large
batch, the short last window of each epoch included. The module itself knows nothing of
accumulation.

Process 0 prints one line per optimizer step (from a small Callback): the window's mean loss per
token over all processes, its token count, and the learning rate the step used, numbered by
``trainer.global_step``, which counts optimizer steps. After microbatch ``--checkpoint-at`` it
calls ``trainer.save_checkpoint`` (mid-window: every process's in-flight gradients go into the
file). At the end it prints the SHA-256 of every process's parameters: they must all be equal.
Then:

* ``--resume CKPT`` continues from a checkpoint with ``trainer.fit(..., ckpt_path=CKPT)``: the
  train loader here is stateful (``state_dict``/``load_state_dict``, as torchdata's
  ``StatefulDataLoader``), so the resumed run gets the batches after the checkpoint and ends with
  the uninterrupted run's parameters, bit for bit (the same SHA-256).
* ``--check`` trains in float64 and also trains a copy of the model by hand, one large batch per
  window (the window's microbatches concatenated, the token-mean loss, gradients summed over the
  processes, clipped, one AdamW step), and prints the largest parameter difference from the
  accumulated run.

With ``--devices 2`` Lightning starts the second process itself (it runs this script again with
the launch variables set); no launcher is needed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from gradaccum_lightning import GradAccum

VOCAB = 48
SEED = 0
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


# -- the data: a stateful, sharded, epoch-seeded train loader --------------------------------


class EpochSampler:
    """Holds the epoch: Lightning calls ``loader.sampler.set_epoch(epoch)`` every epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ShardedBatches:
    """This process's microbatches of each epoch, resumable in the middle of one.

    Every epoch the sequences are shuffled by a generator seeded with the epoch, and process
    ``rank`` takes sequences ``rank, rank + world, ...`` (as ``DistributedSampler`` does: the
    Fabric example's processes get the same batches) in batches of ``batch``.
    ``state_dict``/``load_state_dict`` make it a stateful loader to Lightning (what torchdata's
    ``StatefulDataLoader`` provides for a real data set): a checkpoint records how many batches
    of the epoch were taken, and a resumed run continues after them, while ``len()`` stays the
    epoch's length, so that Lightning and GradAccum plan the epoch's short last window exactly
    as in the uninterrupted run.
    """

    def __init__(self, dataset: list[torch.Tensor], batch: int, rank: int, world: int) -> None:
        self.dataset, self.batch, self.rank, self.world = dataset, batch, rank, world
        self.sampler = EpochSampler()
        self.taken = 0  # batches of the current epoch handed out
        self._skip = 0  # batches to skip at the next iteration (after load_state_dict)

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.dataset) / self.world) / self.batch)

    def __iter__(self) -> Iterator[Batch]:  # a generator: the order is fixed at the first next()
        gen = torch.Generator().manual_seed(SEED + self.sampler.epoch)
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        per_process = math.ceil(len(order) / self.world)
        order += order[: per_process * self.world - len(order)]  # equal shares, as padded
        mine = order[self.rank :: self.world]
        self.taken, self._skip = self._skip, 0
        for start in range(self.taken * self.batch, len(mine), self.batch):
            self.taken += 1
            yield collate([self.dataset[i] for i in mine[start : start + self.batch]])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["taken"]


# -- the LightningModule: no accumulation in it -----------------------------------------------


class LitLM(L.LightningModule):
    def __init__(self, samples: int, batch: int, total_steps: int) -> None:
        super().__init__()
        self.model = TinyLM()
        self.samples, self.batch, self.total_steps = samples, batch, total_steps

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        tokens = (batch["labels"] != -100).sum()  # a device tensor: no host read
        loss = loss_sum(self.model, batch)
        # Step-level values reach the logger once per optimizer step (GradAccum's default).
        self.log("train/loss_per_token", loss.detach() / tokens, on_step=True, on_epoch=False)
        return {"loss": loss, "items": tokens}

    def train_dataloader(self) -> ShardedBatches:
        trainer = self.trainer
        dataset = make_dataset(self.samples)
        return ShardedBatches(dataset, self.batch, trainer.global_rank, trainer.world_size)

    def configure_optimizers(self) -> Any:
        optimizer, scheduler = make_optimizer(self.model, self.total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# -- printing, the mid-window checkpoint, and what --check needs ------------------------------


class StepPrinter(L.Callback):
    """One line per optimizer step on process 0; ``trainer.save_checkpoint`` after microbatch
    ``checkpoint_at`` (on every process, as Lightning requires); records each window's batches
    for ``--check``."""

    def __init__(self, checkpoint_at: int | None, output_dir: Path) -> None:
        self.checkpoint_at, self.output_dir = checkpoint_at, output_dir
        self.windows: list[list[Batch]] = []  # what this process trained on, window by window
        self.window: list[Batch] = []
        self.window_loss: torch.Tensor | None = None
        self.window_tokens: torch.Tensor | None = None
        self.resumed_window = False  # its first microbatches' losses were not seen here
        self.lr = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        acc = GradAccum.of(trainer).accumulator  # GradAccum has restored a checkpoint by now
        self.resumed_window = acc.is_accumulating
        if trainer.ckpt_path is not None:
            trainer.print(
                f"resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch}, "
                f"{trainer.global_step} optimizer steps, {acc.stats.position} microbatches into "
                f"a window"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # what this window's step uses

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        ga = GradAccum.of(trainer)
        loss, tokens = outputs["loss"].detach(), outputs["items"]
        self.window_loss = loss if self.window_loss is None else self.window_loss + loss
        self.window_tokens = tokens if self.window_tokens is None else self.window_tokens + tokens
        self.window.append(batch)
        if not ga.accumulator.is_accumulating:  # this microbatch closed its window
            total = trainer.strategy.reduce(self.window_loss, reduce_op="sum")  # logging only
            count = trainer.strategy.reduce(self.window_tokens, reduce_op="sum")
            loss_text, tokens_text = f"{float(total) / float(count):.4f}", f"{int(count)}"
            if self.resumed_window:  # only its last microbatches ran in this process
                loss_text, tokens_text = "  n/a ", "n/a"
            trainer.print(
                f"epoch {trainer.current_epoch} step {trainer.global_step:3d} loss {loss_text} "
                f"tokens {tokens_text} lr {self.lr:.6f}"
            )
            self.windows.append(self.window)
            self.window, self.resumed_window = [], False
            self.window_loss = self.window_tokens = None
        if ga.stats.micro_steps == self.checkpoint_at:
            path = self.output_dir / f"microbatch-{self.checkpoint_at}.ckpt"
            trainer.save_checkpoint(path)  # mid-window: every process's in-flight gradients
            trainer.print(f"saved {path} (microbatch {ga.stats.position} of a window)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=1, help="processes (2: strategy='ddp')")
    parser.add_argument("--steps", type=int, default=4, help="microbatches per optimizer step")
    parser.add_argument("--batch", type=int, default=4, help="sequences per microbatch")
    parser.add_argument("--samples", type=int, default=232, help="sequences in the data set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-at", type=int, default=6, help="save after microbatch")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-out/lightning_train"))
    parser.add_argument("--resume", type=Path, help="a checkpoint to resume from")
    parser.add_argument("--check", action="store_true", help="compare with a large-batch run")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):  # start-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    # torch 2.13 deprecates a pytree idiom that lightning 2.6 still uses
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

    if args.check:  # float64, so that float32 rounding (which AdamW amplifies) hides nothing
        torch.set_default_dtype(torch.float64)
    # The schedule's length in optimizer steps: per epoch, windows of `steps` microbatches, the
    # last one shorter. (Not trainer.estimated_stepping_batches in configure_optimizers: under
    # GradAccum it counts microbatches, and reading it there loads the train loader before
    # Lightning restores a checkpoint, so a stateful loader misses its saved position on a
    # resume: Lightning #20550. GradAccum.estimated_optimizer_steps gives this figure once the
    # loader is loaded; the script prints both at the end.)
    per_process = math.ceil(math.ceil(args.samples / args.devices) / args.batch)
    total_steps = args.epochs * math.ceil(per_process / args.steps)
    torch.manual_seed(0)  # the same initial model on every process
    module = LitLM(args.samples, args.batch, total_steps)
    initial = {name: t.clone() for name, t in module.model.state_dict().items()}
    accumulate = GradAccum(steps=args.steps, normalization="items", model_attr="model")
    printer = StepPrinter(None if args.resume else args.checkpoint_at, args.output_dir)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        gradient_clip_val=1.0,  # GradAccum clips once per window, on the window's gradient
        callbacks=[accumulate, printer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.output_dir,
    )
    if args.resume is None:
        trainer.print(
            f"{trainer.world_size} process(es) ({type(trainer.strategy).__name__}), "
            f"{args.steps} microbatches per optimizer step"
        )
    trainer.fit(module, ckpt_path=args.resume)  # Lightning starts the other processes here

    trainer.print(
        f"{per_process} microbatches of {args.batch} per process per epoch, {total_steps} "
        f"optimizer steps planned: GradAccum.estimated_optimizer_steps "
        f"{accumulate.estimated_optimizer_steps(trainer)}, Trainer.estimated_stepping_batches "
        f"{trainer.estimated_stepping_batches} (microbatches)"
    )
    trainer.print(
        f"done: {accumulate.stats.optimizer_steps} optimizer steps, "
        f"trainer.global_step {trainer.global_step}"
    )
    hashes = [sha256(module.model)]
    if dist.is_available() and dist.is_initialized():  # one per process: all must be equal
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, hashes[0])
        hashes = gathered
    trainer.print(f"parameters sha256, process by process: {' '.join(hashes)}")
    if args.check and args.resume is None:
        reference = large_batch_reference(initial, printer.windows, total_steps)
        diff = max(
            (p - q).abs().max().item()
            for p, q in zip(module.model.parameters(), reference.parameters(), strict=True)
        )
        trainer.print(f"largest difference from one large batch per window: {diff:.2e}")

    # Free the DDP model before the process group goes: destroying the group under a live DDP
    # model (Lightning does at exit) occasionally aborts the process with gloo.
    del trainer, module, accumulate, printer
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
