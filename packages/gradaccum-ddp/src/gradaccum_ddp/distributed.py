"""`DDPDistributed`: the adapter contract's distributed side for a
``DistributedDataParallel`` model (`gradaccum_torch.contract.Distributed`).

* `no_sync` is DDP's own ``model.no_sync()`` around forward and backward of
  every microbatch that does not close its window;
* `reduce_gradients` averages a window's gradient in one all-reduce per
  (device, dtype) group, for windows that accumulated outside ``param.grad``;
* `all_gather` carries the boundary's one small row per rank (item counts,
  the bad-count flag, the rank-agreement row).

Every failed collective becomes a `gradaccum.DistributedError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradaccum.checkpoint import FORMAT_VERSION
from gradaccum_ddp.collectives import average_, comm_device, communication_errors

__all__ = ["DDPDistributed"]


class DDPDistributed:
    """The ranks of a DDP model's process group.

    Args:
        model: the ``DistributedDataParallel`` model.
        check_windows: compare the ranks' positions at boundaries whose pass
            length the ranks did not agree on beforehand (see
            `gradaccum_ddp.Lockstep`); ``False`` only trusts the pass checks.
    """

    averages = True

    def __init__(self, model: DistributedDataParallel, *, check_windows: bool = True) -> None:
        self.model = model
        self.group: dist.ProcessGroup = model.process_group
        self._world_size = dist.get_world_size(self.group)
        self._rank = dist.get_rank(self.group)
        self.device = comm_device(self.group)
        """Where the backend's collectives run: CUDA for NCCL, CPU otherwise."""
        self.check_windows = check_windows
        self.manual_reductions = 0
        """Gradient reductions made through `reduce_gradients` (not by DDP's backward)."""
        self._observers: list[Callable[[str], None]] = []

    @property
    def world_size(self) -> int:
        """The process group's size."""
        return self._world_size

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._rank

    def add_reduction_observer(self, observer: Callable[[str], None]) -> None:
        """Call ``observer("manual")`` after every `reduce_gradients`."""
        self._observers.append(observer)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's ``no_sync()`` unless ``sync``; when syncing, a failure of DDP's own
        gradient all-reduce inside the backward (a dead or stuck peer) becomes a
        `gradaccum.DistributedError` (other errors pass through unchanged)."""
        if not sync:
            return self.model.no_sync()
        return communication_errors(
            "the boundary backward (DDP's gradient all-reduce)", self._rank, always=False
        )

    def reduce_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        """Average ``grads`` over the ranks, in place."""
        with communication_errors("the gradient all-reduce at the window's boundary", self._rank):
            average_(grads, self.group, self.device, self._world_size)
        self.manual_reductions += 1
        for observer in self._observers:
            observer("manual")

    def save_checkpoint(
        self,
        acc: Any,
        path: str | os.PathLike[str],
        *,
        model: bool,
        optimizer: bool,
        scheduler: bool,
        scaler: bool,
        format_version: int = FORMAT_VERSION,
    ) -> None:
        """`gradaccum_torch.DistributedCheckpoints`: see `gradaccum_ddp.checkpoint`."""
        from gradaccum_ddp.checkpoint import save_distributed

        save_distributed(
            acc,
            path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            format_version=format_version,
        )

    def load_checkpoint(self, acc: Any, path: str | os.PathLike[str]) -> None:
        """`gradaccum_torch.DistributedCheckpoints`: see `gradaccum_ddp.checkpoint`."""
        from gradaccum_ddp.checkpoint import load_distributed

        load_distributed(acc, path)

    def all_gather(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's ``row`` stacked in rank order, on ``row``'s device."""
        with communication_errors(
            "the boundary's exchange of item counts and positions", self._rank
        ):
            work = (row.to(self.device) if row.device != self.device else row).contiguous()
            parts = [torch.empty_like(work) for _ in range(self._world_size)]
            dist.all_gather(parts, work, group=self.group)
            out = torch.stack(parts)
        return out if out.device == row.device else out.to(row.device)
