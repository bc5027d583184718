"""Adaptive microbatching in a plain PyTorch loop: gradaccum picks the microbatch size.

    python examples/adaptive_train.py [--steps 20] [--batch 128] [--cap-mib N]

Each optimizer step takes one batch of ``--batch`` rows; ``acc.run`` splits it into
microbatches, starting with the whole batch. If a microbatch runs out of memory the
size halves and the step goes on; after ``grow_after`` clean steps it grows back.
The update is the large-batch update: the loss is a sum, normalised by the window's
row count (``normalization="items"``).

``--cap-mib N`` (Linux) caps this process's address space at its current size plus
N MiB, so that a too-large microbatch fails for real in the CPU allocator (try
``MALLOC_MMAP_THRESHOLD_=65536 python examples/adaptive_train.py --cap-mib 24``: the
fixed glibc threshold returns every freed tensor to the system at once).
A ``MemoryMonitor`` and a ``PerformanceTracker`` report memory and throughput.
"""

from __future__ import annotations

import argparse
import resource

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradaccum_torch import (
    Accumulator,
    AdaptiveMicrobatch,
    MemoryMonitor,
    PerformanceTracker,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--cap-mib", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    data = TensorDataset(
        torch.randn(args.steps * args.batch, 32), torch.randn(args.steps * args.batch, 1)
    )
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
    model = nn.Sequential(nn.Linear(32, args.width), nn.GELU(), nn.Linear(args.width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    monitor = MemoryMonitor(model)
    acc = Accumulator(
        model,
        optimizer,
        schedule=AdaptiveMicrobatch(target=args.batch, micro_batch=args.batch, grow_after=5),
        normalization="items",
        listeners=[monitor],
    )
    tracker = PerformanceTracker(acc)

    def summed_loss(part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = part
        return nn.functional.mse_loss(model(x), y, reduction="sum")

    if args.cap_mib is not None:
        with open("/proc/self/status") as status:
            size = next(
                int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:")
            )
        resource.setrlimit(
            resource.RLIMIT_AS, (size + args.cap_mib * 2**20, resource.RLIM_INFINITY)
        )

    for x, y in loader:
        size = acc.adaptive.micro_batch
        acc.run((x, y), summed_loss)
        now = acc.adaptive.micro_batch
        print(
            f"step {acc.effective_step:3d}: micro_batch {size:4d} -> {now:4d}  "
            f"({tracker.postfix()})"
        )

    for event in acc.adaptive.events:
        lost = event.seconds * 1e3
        print(
            f"recovered OOM in window {event.window}: "
            f"{event.old_size} -> {event.new_size} rows, {lost:.0f} ms lost"
        )
    for line in monitor.recommendations().advice:
        print("advice:", line)
    print({k: round(v, 3) for k, v in tracker.metrics().items()})


if __name__ == "__main__":
    main()
