"""Model, data, the float64 large-batch reference, and the rank programs of the
gradaccum-accelerate tests.

Every rank program is a module-level function ``f(rank, world_size, ...)`` run by
:func:`gradaccum_accelerate.testing.launch_accelerate` in a fresh process of
Accelerate's MULTI_CPU environment (gloo). Programs write JSON (parameters as lists of
Python floats, which JSON round-trips exactly); the test modules assert the numbers.
Each program runs several cases, so a test module launches its processes once.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradaccum.errors import UsageError
from gradaccum_accelerate import Accumulator
from gradaccum_accelerate.testing import fresh_accelerator
from gradaccum_ddp.testing import ReductionCounter

IN, OUT = 4, 2
LR, MOMENTUM, GAMMA = 0.1, 0.9, 0.8


# -- model, data, loss: identical in every process and in the reference -----------------------


def make_model(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, OUT)).to(dtype)


def microbatch(
    seed: int, rank: int, index: int, size: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100_003 + rank * 1_009 + index)
    x = torch.randn(size, IN, generator=gen, dtype=torch.float64)
    y = torch.randn(size, OUT, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def loss_fn(out: torch.Tensor, y: torch.Tensor, normalization: str) -> torch.Tensor:
    per_item = 0.5 * ((out - y) ** 2).sum(dim=1)
    return per_item.sum() if normalization == "items" else per_item.mean()


def decay(step: int) -> float:
    return float(GAMMA**step)


def make_objects(
    seed: int, *, scheduler: bool = True, dtype: torch.dtype = torch.float64
) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = make_model(seed, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay) if scheduler else None
    return model, opt, sched


def params_json(model: nn.Module) -> dict[str, list[float]]:
    module = model.module if hasattr(model, "module") else model
    return {
        name: [float(v) for v in p.detach().reshape(-1).tolist()]
        for name, p in module.named_parameters()
    }


def windows_of(length: int, steps: int) -> list[list[int]]:
    """Microbatch indices of each window of one pass (partial policy ``step``)."""
    return [list(range(s, min(s + steps, length))) for s in range(0, length, steps)]


def reference(spec: Mapping[str, Any]) -> list[dict[str, list[float]]]:
    """Parameters after every window, each window computed as one large batch in float64
    over every rank's microbatches of the window: SGD with momentum, the LambdaLR stepped
    once per step when ``spec["scheduler"]``; windows in ``spec["skip_windows"]`` skipped."""
    sizes: list[list[int]] = spec["sizes"]
    model = make_model(spec["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay) if spec.get("scheduler") else None
    skip = set(spec.get("skip_windows", []))
    out = []
    index = 0
    for _ in range(spec.get("passes", 1)):
        for window in windows_of(len(sizes[0]), spec["steps"]):
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64)
            norm = spec["normalization"]
            for r in range(len(sizes)):
                for j in window:
                    x, y = microbatch(spec["seed"], r, j, sizes[r][j])
                    total = total + loss_fn(model(x), y, norm)
            if norm == "items":
                total = total / sum(sizes[r][j] for r in range(len(sizes)) for j in window)
            else:
                total = total / (len(sizes) * len(window))
            total.backward()  # type: ignore[no-untyped-call]
            if index not in skip:
                opt.step()
                if sched is not None:
                    sched.step()
            out.append(params_json(model))
            index += 1
    return out


def rel_error(got: Mapping[str, Sequence[float]], want: Mapping[str, Sequence[float]]) -> float:
    """max over tensors of max |got - want| / max |want|."""
    worst = 0.0
    for name, ref in want.items():
        scale = max(abs(v) for v in ref) or 1.0
        diff = max(abs(a - b) for a, b in zip(got[name], ref, strict=True))
        worst = max(worst, diff / scale)
    return worst


def worst_error(
    got: Sequence[Mapping[str, Sequence[float]]], want: Sequence[Mapping[str, Sequence[float]]]
) -> float:
    assert len(got) == len(want), f"{len(got)} windows, expected {len(want)}"
    return max(rel_error(g, w) for g, w in zip(got, want, strict=True))


def sized_loader(
    accelerator: Accelerator, seed: int, sizes: Sequence[int], rank: int = 0
) -> DataLoader[Any]:
    """``accelerator.prepare(DataLoader)`` whose batches are this rank's microbatches
    ``microbatch(seed, rank, j, sizes[j])`` (a batch sampler of unequal batches)."""
    xs, ys, batches, start = [], [], [], 0
    for j, n in enumerate(sizes):
        x, y = microbatch(seed, rank, j, n)
        xs.append(x)
        ys.append(y)
        batches.append(list(range(start, start + n)))
        start += n
    dataset = TensorDataset(torch.cat(xs), torch.cat(ys))
    loader: DataLoader[Any] = accelerator.prepare(DataLoader(dataset, batch_sampler=batches))
    return loader


# -- helpers for rank programs ---------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def error_info(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}


def _run_cases(
    rank: int, out_dir: str, specs: Sequence[Mapping[str, Any]], run: Callable[..., Any]
) -> None:
    for spec in specs:
        try:
            result: dict[str, Any] = run(rank, spec)
        except Exception as exc:
            result = {"error": error_info(exc)}
        write_json(Path(out_dir) / f"{spec['name']}.rank{rank}.json", result)


def train_adapter(rank: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    """One case through ``Accelerator(cpu=True)`` + ``prepare`` + the adapter: this
    process's microbatches ``microbatch(seed, rank, j, sizes[rank][j])``. Records after
    every window the parameters, the reductions, the steps and the scheduler, and on every
    microbatch ``accelerator.sync_gradients`` inside and right after the block."""
    amp = spec.get("amp")
    accelerator = fresh_accelerator(mixed_precision="fp16" if amp else "no")
    dtype = torch.float32 if amp else torch.float64
    model, opt, sched = make_objects(spec["seed"], dtype=dtype)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    scaler = None
    if amp:
        scaler = torch.amp.GradScaler(
            "cpu", init_scale=amp, backoff_factor=2.0**-30, growth_interval=1_000_000
        )
    acc = Accumulator(
        accelerator,
        model,
        opt,
        steps=spec["steps"],
        normalization=spec["normalization"],
        scheduler=sched,
        scaler=scaler,
    )
    counter = ReductionCounter(model, acc.distributed) if accelerator.num_processes > 1 else None
    raw_sched = sched.scheduler
    result: dict[str, Any] = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "windows": [],
        "sync": [],
    }

    def record() -> None:
        result["windows"].append(
            {
                "params": params_json(model),
                "reductions": None if counter is None else counter.take(),
                "optimizer_steps": acc.stats.optimizer_steps,
                "last_epoch": raw_sched.last_epoch,
                "lr": opt.param_groups[0]["lr"],
                "scale": None if scaler is None else float(scaler.get_scale()),
            }
        )

    sizes = spec["sizes"][rank]
    data = [(*microbatch(spec["seed"], rank, j, n, dtype), n) for j, n in enumerate(sizes)]
    for _ in range(spec.get("passes", 1)):
        for j, (x, y, n) in enumerate(acc.iterate(data)):
            device_count = spec.get("device_items") == "all" or (
                spec.get("device_items") == "odd" and j % 2
            )
            items: Any = torch.tensor(n) if device_count else n
            if spec["normalization"] != "items":
                items = None
            before = acc.machine.state.windows
            with acc.microbatch(items):
                inside = accelerator.sync_gradients
                with torch.autocast("cpu", dtype=torch.float16, enabled=bool(amp)):
                    loss = loss_fn(model(x), y, spec["normalization"])
                acc.backward(loss)
            result["sync"].append([inside, accelerator.sync_gradients])
            if acc.machine.state.windows != before:
                record()
    result["stats"] = acc.stats.as_dict()
    result["last_epoch"] = raw_sched.last_epoch
    if spec.get("stray"):
        result["stray"] = _stray_steps(acc, model, opt, sched, raw_sched)
    return result


def _stray_steps(acc: Accumulator, model: Any, opt: Any, sched: Any, raw: Any) -> dict[str, Any]:
    """Call ``step()`` on the prepared optimizer and scheduler: each must raise
    UsageError, and nothing may have stepped."""
    before = (params_json(model), raw.last_epoch, acc.stats.optimizer_steps)
    out: dict[str, Any] = {}
    for name, call in (("optimizer", opt.step), ("scheduler", sched.step)):
        try:
            call()
        except UsageError as exc:
            out[name] = str(exc)
        else:
            out[name] = None
    out["unchanged"] = (params_json(model), raw.last_epoch, acc.stats.optimizer_steps) == before
    return out


def train_plain(rank: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The same case through plain Accelerate: ``Accelerator(gradient_accumulation_steps=k)``,
    ``with accelerator.accumulate(model)``, ``accelerator.backward``, then
    ``optimizer.step(); scheduler.step(); optimizer.zero_grad()`` on every microbatch,
    as Accelerate's documentation writes the loop."""
    accelerator = fresh_accelerator(gradient_accumulation_steps=spec["steps"])
    model, opt, sched = make_objects(spec["seed"])
    model, opt, sched = accelerator.prepare(model, opt, sched)
    raw_sched = sched.scheduler
    windows: list[dict[str, Any]] = []
    sizes = spec["sizes"][rank]
    for j, n in enumerate(sizes):
        x, y = microbatch(spec["seed"], rank, j, n)
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y, spec["normalization"]))
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            windows.append(
                {
                    "params": params_json(model),
                    "last_epoch": raw_sched.last_epoch,
                    "lr": opt.param_groups[0]["lr"],
                }
            )
    return {"windows": windows, "last_epoch": raw_sched.last_epoch}


def train_program(rank: int, world_size: int, out_dir: str, specs: list[dict[str, Any]]) -> None:
    """Run every case in ``specs`` (``spec["plain"]``: plain Accelerate); write
    ``<name>.rank<r>.json`` for each."""
    _run_cases(
        rank,
        out_dir,
        specs,
        lambda r, spec: train_plain(r, spec) if spec.get("plain") else train_adapter(r, spec),
    )


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_adapter(rank: int, spec: Mapping[str, Any], out: Path, phase: str) -> dict[str, Any]:
    """``phase="run"``: the whole pass, with ``accelerator.save_state(out/"mid")`` after
    microbatch ``spec["mid"]`` and ``acc.save(out/"boundary")`` after ``spec["boundary"]``.
    ``phase="resume"``: fresh singletons and objects (another seed), ``load_state(out/"mid")``,
    then the microbatches after ``mid``. Item counts alternate host ints and device tensors.
    ``spec["format_version"]``, when present, is the adapter's ``checkpoint_format_version``."""
    accelerator = fresh_accelerator()
    seed = spec["seed"] if phase == "run" else spec["seed"] + 1
    model, opt, sched = accelerator.prepare(*make_objects(seed))
    extra = {}
    if "format_version" in spec:
        extra["checkpoint_format_version"] = spec["format_version"]
    acc = Accumulator(
        accelerator,
        model,
        opt,
        steps=spec["steps"],
        normalization="items",
        scheduler=sched,
        **extra,
    )
    start = 0
    if phase == "resume":
        accelerator.load_state(str(out / "mid"))
        start = spec["mid"] + 1
    sizes = spec["sizes"][rank]
    data = [(*microbatch(spec["seed"], rank, j, n), n) for j, n in enumerate(sizes)]
    result: dict[str, Any] = {"windows": []}
    for j, (x, y, n) in enumerate(acc.iterate(data[start:]), start=start):
        items: Any = torch.tensor(n) if j % 2 else n
        before = acc.machine.state.windows
        with acc.microbatch(items):
            acc.backward(loss_fn(model(x), y, "items"))
        if acc.machine.state.windows != before:
            result["windows"].append(params_json(model))
        if phase == "run" and j == spec["mid"]:
            accelerator.save_state(str(out / "mid"))
            result["mid_state"] = acc.machine.state_dict()
        if phase == "run" and j == spec["boundary"]:
            acc.save(out / "boundary")
            result["boundary_params"] = params_json(model)
            result["boundary_state"] = acc.machine.state_dict()
    result["final"] = params_json(model)
    result["stats"] = acc.stats.as_dict()
    result["last_epoch"] = sched.scheduler.last_epoch
    return result


def checkpoint_plain(rank: int, spec: Mapping[str, Any], out: Path, phase: str) -> dict[str, Any]:
    """The same with plain Accelerate (``accumulate``, mean loss): ``save_state`` after
    microbatch ``mid``; the resume loads it in fresh objects and continues."""
    accelerator = fresh_accelerator(gradient_accumulation_steps=spec["steps"])
    seed = spec["seed"] if phase == "run" else spec["seed"] + 1
    model, opt, sched = accelerator.prepare(*make_objects(seed))
    start = 0
    if phase == "resume":
        accelerator.load_state(str(out / "plain_mid"))
        start = spec["mid"] + 1
    sizes = spec["sizes"][rank]
    windows = []
    for j in range(start, len(sizes)):
        x, y = microbatch(spec["seed"], rank, j, sizes[j])
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y, "mean"))
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            windows.append(params_json(model))
        if phase == "run" and j == spec["mid"]:
            accelerator.save_state(str(out / "plain_mid"))
    return {"windows": windows, "final": params_json(model)}


def checkpoint_program(
    rank: int, world_size: int, out_dir: str, spec: dict[str, Any], phase: str
) -> None:
    """Both checkpoint cases of ``phase``; writes ``<phase>.rank<r>.json`` and
    ``plain_<phase>.rank<r>.json``."""
    out = Path(out_dir)
    for name, run in (("", checkpoint_adapter), ("plain_", checkpoint_plain)):
        try:
            result = run(rank, spec, out, phase)
        except Exception as exc:
            result = {"error": error_info(exc)}
        write_json(out / f"{name}{phase}.rank{rank}.json", result)
