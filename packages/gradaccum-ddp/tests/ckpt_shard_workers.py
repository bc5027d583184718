"""Rank programs for test_checkpoint_shards.py (run by gradaccum_ddp.testing.launch).

Each program writes ``<out>/<name>.rank<r>.json``; tensors never cross a pickle."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ddp_workers import error_info, loss_fn, make_model, microbatch, write_json
from torch.nn.parallel import DistributedDataParallel

from gradaccum_ddp import DDPAccumulator
from gradaccum_ddp.checkpoint import save_distributed

STEPS = 3


def _build(seed: int) -> tuple[DistributedDataParallel, DDPAccumulator]:
    ddp = DistributedDataParallel(make_model(seed))
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    acc = DDPAccumulator(ddp, opt, steps=STEPS, scheduler=sched, normalization="items")
    return ddp, acc


def _train(ddp: DistributedDataParallel, acc: DDPAccumulator, n: int, seed: int) -> None:
    rank = dist.get_rank()
    for j in range(n):
        size = 2 + (j + rank) % 3
        x, y = microbatch(seed, rank, j, size)
        items: Any = torch.tensor(size) if j % 2 else size
        with acc.microbatch(items):
            acc.backward(loss_fn(ddp(x), y, "items"))


def _snapshot(ddp: DistributedDataParallel, acc: DDPAccumulator) -> dict[str, Any]:
    items = acc.inflight_items()
    return {
        "model": {k: v.detach().clone() for k, v in ddp.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in ddp.parameters()],
        "optimizer": copy.deepcopy(acc.optimizer.state_dict()),
        "groups": [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for g in acc.optimizer.param_groups
        ],
        "scheduler": copy.deepcopy(acc.scheduler.state_dict()) if acc.scheduler else None,
        "machine": acc.machine.state_dict(),
        "stats": acc.stats.as_dict(),
        "exported": {k: v.detach().clone() for k, v in acc.gradients.export().items()},
        "items": None if items is None else items.detach().clone(),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and bool(a == b)


def _save_mid_window(out: Path, rank: int, world_size: int) -> None:
    """Every rank saves a mid-window checkpoint (7 microbatches: 2 steps,
    position 1) to ``out/mid``; rank 0 copies it to ``copy<r>`` for every rank."""
    ddp, acc = _build(0)
    _train(ddp, acc, 7, seed=1)
    acc.save(out / "mid")
    if rank == 0:
        for r in range(world_size):
            shutil.copytree(out / "mid", out / f"copy{r}")


def refuse_program(rank: int, world_size: int, out_dir: str, case: str) -> None:
    """Save a mid-window checkpoint (7 microbatches: 2 steps, position 1), copy it
    to ``copy<r>`` for every rank, spoil rank 1's copy (``case``), then load
    ``copy<r>`` on every rank into objects in another state: record what each
    rank raised and whether everything stayed bitwise the same."""
    out = Path(out_dir)
    _save_mid_window(out, rank, world_size)
    if rank == 0 and case == "checksum":
        spoilt = out / "copy1" / "gradients.rank1.safetensors"
        data = bytearray(spoilt.read_bytes())
        data[-3] ^= 0x10
        spoilt.write_bytes(bytes(data))
    dist.barrier()
    ddp2, acc2 = _build(5)
    _train(ddp2, acc2, 4, seed=9)
    if case == "apply" and rank == 1:
        acc2.optimizer.register_load_state_dict_post_hook(_fail_once())
    before = _snapshot(ddp2, acc2)
    result: dict[str, Any] = {"raised": None}
    try:
        acc2.load(out / f"copy{rank}")
    except Exception as exc:
        result["raised"] = error_info(exc)
        result["gradaccum"] = type(exc).__module__.startswith("gradaccum")
    result["unchanged"] = _same(before, _snapshot(ddp2, acc2))
    # the same objects then load the good checkpoint and resume on both ranks
    acc2.load(out / "mid")
    result["resumed_position"] = acc2.stats.position
    _train(ddp2, acc2, 2, seed=3)
    result["steps_after"] = acc2.stats.optimizer_steps
    write_json(out / f"{case}.rank{rank}.json", result)


def _fail_once() -> Any:
    calls: list[int] = []

    def hook(optimizer: torch.optim.Optimizer) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("optimizer hook failed on purpose")

    return hook


def modes_program(rank: int, world_size: int, out_dir: str) -> None:
    """Save the same mid-window state three ways — each rank writing its own
    file (shared=True), auto-detected (None), and every file through rank 0
    one rank at a time (False) — then load each into fresh objects and
    record the resumed parameters after one more window."""
    import gradaccum_ddp.checkpoint as ckpt_module

    out = Path(out_dir)
    result: dict[str, Any] = {}
    real_write_shard = ckpt_module.write_shard
    written: list[str] = []

    def recording_write_shard(*args: Any, **kwargs: Any) -> Any:
        """The real write_shard, recording which roles this rank wrote."""
        entries = real_write_shard(*args, **kwargs)
        written.extend(entries)
        return entries

    ckpt_module.write_shard = recording_write_shard  # type: ignore[assignment]
    for mode, shared in (("shared", True), ("auto", None), ("gather", False)):
        ddp, acc = _build(0)
        _train(ddp, acc, 7, seed=1)
        written.clear()
        save_distributed(acc, out / mode, shared=shared)
        result[f"{mode}_wrote"] = sorted(written)
        ddp2, acc2 = _build(4)
        acc2.load(out / mode)
        _train(ddp2, acc2, 2, seed=3)
        result[mode] = {
            "position": acc2.stats.position,
            "params": [p.detach().reshape(-1).tolist() for p in ddp2.parameters()],
        }
    write_json(out / f"modes.rank{rank}.json", result)


def shared_verify_program(rank: int, world_size: int, out_dir: str) -> None:
    """Record which tensors each rank hashes when loading (CKPT-25 on several
    ranks): ``same`` — both ranks load one directory (same inodes on one
    machine); ``copies`` — each rank its own copy; ``spoilt`` — one directory
    whose model file has a byte flipped inside a tensor only rank 1 hashes.
    Record the tensors whose digests each rank checks (``verify_file`` and
    ``read_into``, the real ones, spied on), what each load
    raised, and whether the live objects stayed bitwise the same."""
    from gradaccum.checkpoint import Checkpoint, read_checkpoint
    from gradaccum_torch.checkpoint import verification_share

    out = Path(out_dir)
    _save_mid_window(out, rank, world_size)
    if rank == 0:
        shutil.copytree(out / "mid", out / "spoilt")
        with read_checkpoint(out / "spoilt") as ck:
            victim = sorted(verification_share(ck, "model", (1, world_size)))[0]
            header = ck.header("model")
        info = header.tensors[victim]
        spoilt = out / "spoilt" / "model.safetensors"
        data = bytearray(spoilt.read_bytes())
        data[header.data_start + info.begin] ^= 0x10
        spoilt.write_bytes(bytes(data))
    dist.barrier()

    real_verify_file = Checkpoint.verify_file
    real_read_into = Checkpoint.read_into
    seen: dict[str, set[str]] = {}

    def recording_verify_file(self: Checkpoint, role: str, **kwargs: Any) -> Any:
        """The real verify_file, recording the tensors it was asked to hash."""
        only = kwargs.get("only")
        names = self.manifest.files[role].tensors if only is None else only
        seen.setdefault(role, set()).update(names)
        return real_verify_file(self, role, **kwargs)

    def recording_read_into(self: Checkpoint, role: str, name: str, out: Any, **kwargs: Any) -> Any:
        """The real read_into, recording the tensors it was asked to hash."""
        if kwargs.get("verify", True):
            seen.setdefault(role, set()).add(name)
        return real_read_into(self, role, name, out, **kwargs)

    Checkpoint.verify_file = recording_verify_file  # type: ignore[method-assign]
    Checkpoint.read_into = recording_read_into  # type: ignore[method-assign]
    result: dict[str, Any] = {}
    for case, where in (("same", "mid"), ("copies", f"copy{rank}"), ("spoilt", "spoilt")):
        ddp2, acc2 = _build(5)
        _train(ddp2, acc2, 4, seed=9)
        before = _snapshot(ddp2, acc2)
        seen.clear()
        raised = None
        try:
            acc2.load(out / where)
        except Exception as exc:
            raised = error_info(exc)
        result[case] = {
            "verified": {role: sorted(names) for role, names in seen.items()},
            "raised": raised,
            "unchanged": _same(before, _snapshot(ddp2, acc2)),
            "position": acc2.stats.position,
        }
    Checkpoint.verify_file = real_verify_file  # type: ignore[method-assign]
    Checkpoint.read_into = real_read_into  # type: ignore[method-assign]
    with read_checkpoint(out / "mid") as ck:
        result["tensors"] = {role: sorted(ck.manifest.files[role].tensors) for role in ck.roles}
    write_json(out / f"shared.rank{rank}.json", result)


def buffers_program(rank: int, world_size: int, out_dir: str) -> None:
    """A model with BatchNorm under DDP: each forward updates the running
    statistics from the rank's own batch (``broadcast_buffers`` re-syncs them
    only at the next forward), so at a save they differ between ranks. Record
    each rank's running mean and the checkpoint's."""
    from gradaccum.checkpoint import read_checkpoint
    from gradaccum_torch.tensor_io import tensor_views

    out = Path(out_dir)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).double()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.01)
    acc = DDPAccumulator(ddp, opt, steps=2)
    for j in range(3):
        gen = torch.Generator().manual_seed(1000 * rank + j)
        x = torch.randn(5, 4, generator=gen, dtype=torch.float64) * (1 + rank)
        with acc.microbatch():
            acc.backward(ddp(x).square().mean())
    acc.save(out / "bn")
    result: dict[str, Any] = {"running_mean": model[1].running_mean.tolist()}
    if rank == 0:
        with read_checkpoint(out / "bn") as ck, ck.open_file("model") as tf:
            result["saved_running_mean"] = tensor_views(tf)["1.running_mean"].tolist()
    dist.barrier()
    write_json(out / f"buffers.rank{rank}.json", result)


def race_program(rank: int, world_size: int, out_dir: str) -> None:
    """Both ranks load ``mid``, but rank 1's open is redirected to ``other``
    (standing in for a directory replaced between the ranks' manifest check
    and their opening it, a race this test cannot time): record what each
    rank raised and whether its objects stayed bitwise the same."""
    import gradaccum_ddp.checkpoint as ckpt_module

    out = Path(out_dir)
    _save_mid_window(out, rank, world_size)
    ddp, acc = _build(1)
    _train(ddp, acc, 5, seed=4)
    acc.save(out / "other")
    ddp2, acc2 = _build(5)
    _train(ddp2, acc2, 4, seed=9)
    before = _snapshot(ddp2, acc2)
    if rank == 1:
        real_open = ckpt_module.open_for_load
        ckpt_module.open_for_load = lambda path: real_open(out / "other")  # type: ignore[assignment]
    result: dict[str, Any] = {"raised": None}
    try:
        acc2.load(out / "mid")
    except Exception as exc:
        result["raised"] = error_info(exc)
    result["unchanged"] = _same(before, _snapshot(ddp2, acc2))
    write_json(out / f"race.rank{rank}.json", result)


def formats_program(rank: int, world_size: int, out_dir: str) -> None:
    """Save one mid-window state in format 3 (the default), in format 2 (each
    rank writing its own files) and in format 2 through rank 0; then try
    saves on which the ranks disagree on the format version, or one rank
    passes one this release does not write; load each written checkpoint
    into fresh objects and record the parameters after one more window."""
    from gradaccum.errors import GradAccumError

    out = Path(out_dir)
    result: dict[str, Any] = {}
    ddp, acc = _build(0)
    _train(ddp, acc, 7, seed=1)
    acc.save(out / "v3")
    acc.save(out / "v2", format_version=2)
    save_distributed(acc, out / "v2-gather", shared=False, format_version=2)
    acc.save(out / "v1", format_version=1)
    for name, versions in (("mixed", (3, 2)), ("invalid", (3, 7))):
        try:
            acc.save(out / name, format_version=versions[rank])
            result[name] = None
        except Exception as exc:
            result[name] = error_info(exc)
            result[f"{name}_gradaccum"] = isinstance(exc, GradAccumError)
        result[f"{name}_position"] = acc.stats.position
    # at a boundary, without model and optimizer: a checkpoint without tensor files
    _train(ddp, acc, 2, seed=5)
    for version in (1, 2):
        acc.save(
            out / f"empty-v{version}",
            model=False,
            optimizer=False,
            scheduler=False,
            format_version=version,
        )
    for name in ("v3", "v2", "v2-gather", "v1"):
        ddp2, acc2 = _build(4)
        acc2.load(out / name)
        _train(ddp2, acc2, 2, seed=3)
        result[name] = [p.detach().reshape(-1).tolist() for p in ddp2.parameters()]
    write_json(out / f"formats.rank{rank}.json", result)
