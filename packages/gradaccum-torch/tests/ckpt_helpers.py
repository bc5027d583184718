"""Builders shared by the atomic-load and fuzz tests: a real mid-window
checkpoint of an accumulator with AdamW, StepLR and (optionally) a GradScaler,
live objects in another state to load it into, a bitwise snapshot of
everything a load could change, and a re-sealer that writes a mutated
checkpoint whose checksums are valid again (so only the loader's own checks
can refuse it)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from conftest import make_batches, make_model, sum_loss

from gradaccum.checkpoint import Producer, read_checkpoint, write_checkpoint
from gradaccum_torch import Accumulator

Live = tuple[torch.nn.Module, Accumulator]


def build(
    seed: int = 0,
    *,
    scaler: bool = False,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Live:
    """A float32 MLP under AdamW + StepLR(step_size=2) (or ``scheduler(opt)``)
    (+ a CPU GradScaler), ``steps=3``, ``normalization="items"``."""
    model = make_model(torch.float32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    if scheduler is None:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    else:
        sched = scheduler(opt)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
    acc = Accumulator(
        model, opt, steps=3, scheduler=sched, scaler=grad_scaler, normalization="items"
    )
    return model, acc


def train(live: Live, microbatches: int, seed: int = 1) -> None:
    """``microbatches`` microbatches of sizes 2, 3, 4, 2, 3, 4, ...; odd ones
    count their items in a tensor (a device count in the checkpoint)."""
    model, acc = live
    sizes = [2 + i % 3 for i in range(microbatches)]
    for i, batch in enumerate(make_batches(sizes, torch.float32, seed=seed)):
        items: Any = torch.tensor(len(batch[0])) if i % 2 else len(batch[0])
        with acc.microbatch(items=items):
            acc.backward(sum_loss(model, batch))


def mid_window_checkpoint(path: Path, *, scaler: bool = False) -> Path:
    """Save after 8 microbatches: 2 optimizer steps taken, 2 microbatches of
    the third window in flight (position 2), a device item count pending."""
    live = build(0, scaler=scaler)
    train(live, 8)
    assert live[1].stats.position == 2 and live[1].stats.optimizer_steps == 2
    live[1].save(path)
    return path


def live_objects(*, scaler: bool = False) -> Live:
    """Other weights (seed 5) after 4 microbatches: one step taken, one
    microbatch in flight — every part differs from the checkpoint's."""
    live = build(5, scaler=scaler)
    train(live, 4, seed=7)
    return live


def snapshot(live: Live) -> dict[str, Any]:
    """Deep copies of everything `Accumulator.load` may change."""
    model, acc = live
    items = acc.inflight_items()
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(acc.optimizer.state_dict()),
        "groups": [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for g in acc.optimizer.param_groups
        ],
        "scheduler": copy.deepcopy(acc.scheduler.state_dict()) if acc.scheduler else None,
        "scaler": copy.deepcopy(acc.scaler.state_dict()) if acc.scaler else None,
        "machine": acc.machine.state_dict(),
        "stats": acc.stats.as_dict(),
        "exported": {k: v.detach().clone() for k, v in acc.gradients.export().items()},
        "items": None if items is None else items.detach().clone(),
    }


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bitwise equality of nested dicts/lists/tensors/scalars (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (
            a.is_floating_point()
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), f"{where} changed"
        return
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
        return
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return
    assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def reseal(
    source: Path,
    target: Path,
    *,
    state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes] | None = None,
    world_size: int | None = None,
    format_version: int = 2,
) -> Path:
    """Write ``source``'s checkpoint to ``target`` with the given parts
    replaced, through `write_checkpoint` (in ``format_version``): every
    checksum is valid, so only the loader's own checks can refuse what was
    changed."""
    ckpt = read_checkpoint(source)
    write_checkpoint(
        target,
        state=copy.deepcopy(dict(ckpt.state)) if state is None else state,
        config=copy.deepcopy(dict(ckpt.config)) if config is None else config,
        files={r: ckpt.file_bytes(r) for r in ckpt.roles} if files is None else files,
        producer=Producer("gradaccum-torch", "test"),
        world_size=ckpt.world_size if world_size is None else world_size,
        metadata=_thaw(ckpt.metadata) if metadata is None else metadata,
        format_version=format_version,
    )
    return target


def _thaw(value: Any) -> Any:
    """A mutable deep copy of read-only JSON views."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def parts(path: Path) -> dict[str, Any]:
    """Mutable copies of a checkpoint's state, config, metadata and files."""
    ckpt = read_checkpoint(path)
    return {
        "state": _thaw(ckpt.state),
        "config": _thaw(ckpt.config),
        "metadata": _thaw(ckpt.metadata),
        "files": {r: ckpt.file_bytes(r) for r in ckpt.roles},
        "world_size": ckpt.world_size,
    }


def file_names(path: Path) -> list[str]:
    return sorted(os.listdir(path))
