"""Rank programs for the DDP tests, and the float64 large-batch reference.

Every rank program is a module-level function ``f(rank, world_size, ...)``
run by :func:`gradaccum_ddp.testing.launch` in a fresh process with a gloo
process group. Programs write their results as JSON files (parameters as
lists of Python floats, which JSON round-trips exactly); the parent compares
numbers. Nothing travels by pickle.
"""

from __future__ import annotations

import atexit
import json
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradaccum import ClipPolicy
from gradaccum_ddp import DDPAccumulator
from gradaccum_ddp.testing import ReductionCounter

IN, OUT = 4, 2


# -- model, data, loss: identical in every process and in the reference ----------------------


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, OUT)).double()


def microbatch(seed: int, rank: int, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100_003 + rank * 1_009 + index)
    x = torch.randn(size, IN, generator=gen, dtype=torch.float64)
    y = torch.randn(size, OUT, generator=gen, dtype=torch.float64)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor, normalization: str) -> torch.Tensor:
    per_item = 0.5 * ((out - y) ** 2).sum(dim=1)
    return per_item.sum() if normalization == "items" else per_item.mean()


def params_json(model: nn.Module) -> dict[str, list[float]]:
    prefix = "module."
    return {
        name.removeprefix(prefix): [float(v) for v in p.detach().reshape(-1).tolist()]
        for name, p in model.named_parameters()
    }


def windows_of(length: int, steps: int) -> list[list[int]]:
    """Microbatch indices of each window of one pass (policy ``step``)."""
    return [list(range(s, min(s + steps, length))) for s in range(0, length, steps)]


def reference(spec: Mapping[str, Any]) -> list[dict[str, list[float]]]:
    """Parameters after every window, computed on one large batch per window in float64."""
    sizes: list[list[int]] = spec["sizes"]
    model = make_model(spec["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    skip = set(spec.get("skip_windows", []))
    out = []
    window_index = 0
    for _ in range(spec.get("passes", 1)):
        for window in windows_of(len(sizes[0]), spec["steps"]):
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64)
            if spec["normalization"] == "items":
                count = sum(sizes[r][j] for r in range(len(sizes)) for j in window)
                for r in range(len(sizes)):
                    for j in window:
                        x, y = microbatch(spec["seed"], r, j, sizes[r][j])
                        total = total + loss_fn(model(x), y, "items")
                total = total / count
            else:
                for r in range(len(sizes)):
                    for j in window:
                        x, y = microbatch(spec["seed"], r, j, sizes[r][j])
                        total = total + loss_fn(model(x), y, "mean")
                total = total / (len(sizes) * len(window))
            total.backward()  # type: ignore[no-untyped-call]
            if window_index not in skip:
                opt.step()
            out.append(params_json(model))
            window_index += 1
    return out


# -- helpers for rank programs ---------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def error_info(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}


def _data(spec: Mapping[str, Any], rank: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    sizes = spec["sizes"][rank]
    data = []
    for j, n in enumerate(sizes):
        x, y = microbatch(spec["seed"], rank, j, n)
        if spec.get("nan") == [rank, j]:
            x = x.clone()
            x[0, 0] = float("nan")
        data.append((x, y, n))
    return data


def _generator(items: Sequence[Any]) -> Iterator[Any]:
    yield from items


def run_training(rank: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Train one scenario on this rank; return what happened."""
    model = make_model(spec["seed"])
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    options: dict[str, Any] = {"normalization": spec["normalization"]}
    if spec.get("offload"):
        options["offload"] = True
    if spec.get("clip_per_microbatch"):
        options["clip"] = ClipPolicy(1e6, per_microbatch=True)
    scaler = None
    if spec.get("amp"):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    acc = DDPAccumulator(
        ddp,
        opt,
        steps=spec["steps"],
        scaler=scaler,
        lockstep=spec.get("lockstep", "auto"),
        **options,
    )
    counter = ReductionCounter(ddp, acc)
    windows: list[dict[str, Any]] = []

    def record() -> None:
        windows.append(
            {
                "params": params_json(ddp),
                "reductions": counter.take(),
                "optimizer_steps": acc.stats.optimizer_steps,
                "scale": None if scaler is None else float(scaler.get_scale()),
                "lr": opt.param_groups[0]["lr"],
            }
        )

    data = _data(spec, rank)
    for _ in range(spec.get("passes", 1)):
        source: Any = _generator(data) if spec.get("unknown_length") else data
        if spec.get("manual_end_pass"):
            for x, y, n in source:
                before = acc.machine.state.windows
                items: Any = torch.tensor(n) if spec.get("device_items") else n
                with acc.microbatch(items, last=False):
                    acc.backward(loss_fn(ddp(x), y, spec["normalization"]))
                if acc.machine.state.windows != before:
                    record()
            before = acc.machine.state.windows
            acc.end_pass()
            if acc.machine.state.windows != before:
                record()
            continue
        for x, y, n in acc.iterate(source):
            before = acc.machine.state.windows
            items = torch.tensor(n) if spec.get("device_items") else n
            with acc.microbatch(items):
                acc.backward(loss_fn(ddp(x), y, spec["normalization"]))
            if acc.machine.state.windows != before:
                record()
    return {"windows": windows, "stats": acc.stats.as_dict(), "buckets": counter.buckets}


# -- rank programs ---------------------------------------------------------------------------


def train_program(rank: int, world_size: int, out_dir: str, specs: list[dict[str, Any]]) -> None:
    """Run every scenario in ``specs``; write ``<name>.rank<r>.json`` for each."""
    for spec in specs:
        try:
            result: dict[str, Any] = run_training(rank, spec)
        except Exception as exc:
            result = {"error": error_info(exc)}
        write_json(Path(out_dir) / f"{spec['name']}.rank{rank}.json", result)


def _try(fn: Any) -> dict[str, Any]:
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return {**error_info(exc), "seconds": time.monotonic() - start}
    return {"type": None, "seconds": time.monotonic() - start}


def errors_program(rank: int, world_size: int, out_dir: str) -> None:
    """Ranks that disagree: every case must raise DistributedError on every rank."""
    results: dict[str, Any] = {}
    model = make_model(0)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

    def uneven(lengths: Sequence[int], *, unknown: bool, steps: int, policy: str) -> None:
        acc = DDPAccumulator(ddp, opt, steps=steps, partial_window=policy)
        data = [microbatch(1, rank, j, 3) for j in range(lengths[rank])]
        source: Any = _generator(data) if unknown else data
        for x, y in acc.iterate(source):
            with acc.microbatch():
                acc.backward(loss_fn(ddp(x), y, "mean"))

    results["known_length"] = _try(lambda: uneven([5, 7], unknown=False, steps=4, policy="step"))
    results["unknown_length"] = _try(lambda: uneven([5, 9], unknown=True, steps=4, policy="step"))
    results["unknown_length_short"] = _try(
        lambda: uneven([4, 8], unknown=True, steps=4, policy="step")
    )
    results["unknown_length_drop"] = _try(
        lambda: uneven([5, 6], unknown=True, steps=4, policy="drop")
    )
    results["unknown_length_carry"] = _try(
        lambda: uneven([5, 6], unknown=True, steps=4, policy="carry")
    )
    # Equal lengths still work after those errors: the process group is intact.
    results["equal_after_errors"] = _try(
        lambda: uneven([6, 6], unknown=True, steps=4, policy="step")
    )
    results["config_mismatch"] = _try(lambda: DDPAccumulator(ddp, opt, steps=4 if rank == 0 else 2))
    results["drop_microbatch"] = _try(
        lambda: DDPAccumulator(ddp, opt, steps=4, non_finite="drop_microbatch")
    )
    results["accumulate"] = _try(
        lambda: DDPAccumulator(ddp, opt, steps=2).accumulate(
            ddp.module(torch.ones(1, IN, dtype=torch.float64)).sum()
        )
    )
    write_json(Path(out_dir) / f"errors.rank{rank}.json", results)


def failure_program(rank: int, world_size: int, out_dir: str, mode: str) -> None:
    """Rank 1 dies (``mode="die"``) or hangs (``"hang"``) mid-window; rank 0 must raise."""
    model = make_model(0)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    acc = DDPAccumulator(ddp, opt, steps=4)
    data = [microbatch(2, rank, j, 3) for j in range(8)]
    it = iter(acc.iterate(data))
    for _ in range(2):
        x, y = next(it)
        with acc.microbatch():
            acc.backward(loss_fn(ddp(x), y, "mean"))
    done = Path(out_dir) / "rank0.done"
    if rank == 1:
        if mode == "die":
            os._exit(3)
        deadline = time.monotonic() + 60  # "hang": stop answering until rank 0 is done
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    time.sleep(0.5)
    results: dict[str, Any] = {}
    path = Path(out_dir) / "ckpt"
    results["save"] = _try(lambda: acc.save(path))
    results["leftovers"] = sorted(os.listdir(out_dir))

    def go_on() -> None:
        for x, y in it:
            with acc.microbatch():
                acc.backward(loss_fn(ddp(x), y, "mean"))

    if mode == "die":
        results["train"] = _try(go_on)
    write_json(Path(out_dir) / f"failure.rank{rank}.json", results)
    done.touch()
    os._exit(0)  # the process group cannot be torn down cleanly without the peer


def checkpoint_program(
    rank: int, world_size: int, out_dir: str, spec: dict[str, Any], phase: str
) -> None:
    """For each normalization (``items``, then ``mean`` in ``<out_dir>/mean``):
    ``phase="run"``: train the whole pass, saving a mid-window checkpoint after
    microbatch ``spec['mid']`` and a boundary one after ``spec['boundary']``.
    ``phase="resume"``: fresh objects (another seed), load the mid-window
    checkpoint, train the rest of the pass."""
    for normalization in ("items", "mean"):
        out = Path(out_dir) if normalization == "items" else Path(out_dir) / "mean"
        out.mkdir(exist_ok=True)
        _checkpoint_run(rank, out, spec, phase, normalization)


def _checkpoint_run(
    rank: int, out: Path, spec: dict[str, Any], phase: str, normalization: str
) -> None:
    model = make_model(spec["seed"] if phase == "run" else spec["seed"] + 1)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    acc = DDPAccumulator(ddp, opt, steps=spec["steps"], normalization=normalization)
    data = _data(spec, rank)
    start = 0
    if phase == "resume":
        acc.load(out / "mid")
        start = spec["mid"] + 1
    result: dict[str, Any] = {"windows": []}
    for j, (x, y, n) in enumerate(acc.iterate(data[start:]), start=start):
        # host and device counts mixed under items; a device count elsewhere is refused
        items: Any = torch.tensor(n) if j % 2 and normalization == "items" else n
        before = acc.machine.state.windows
        with acc.microbatch(items):
            acc.backward(loss_fn(ddp(x), y, normalization))
        if acc.machine.state.windows != before:
            result["windows"].append(params_json(ddp))
        if phase == "run" and j == spec["mid"]:
            acc.save(out / "mid")
            result["mid_state"] = acc.machine.state_dict()
        if phase == "run" and j == spec["boundary"]:
            acc.save(out / "boundary")
            result["boundary_params"] = params_json(ddp)
            result["boundary_state"] = acc.machine.state_dict()
    result["final"] = params_json(ddp)
    result["stats"] = acc.stats.as_dict()
    write_json(out / f"{phase}.rank{rank}.json", result)


def world_one_program(rank: int, world_size: int, out_dir: str) -> None:
    """Nothing: used to check that launch() itself works."""
    assert dist.get_world_size() == world_size
    write_json(Path(out_dir) / f"hello.rank{rank}.json", {"rank": rank})


# -- the launcher's own contract -------------------------------------------------------------


def exit_program(rank: int, world_size: int, out_dir: str, outcomes: Sequence[str]) -> None:
    """Train a DDP model for one window (leaving torch's gloo threads alive past
    ``destroy_process_group``), write this rank's result file, then end as
    ``outcomes[rank]`` says: ``"return"``, ``"raise"`` (a ValueError),
    ``"exit4"`` (``SystemExit(4)``) or ``"exit-message"`` (``SystemExit("...")``). An
    ``atexit`` handler would leave ``atexit.rank<r>`` behind if the interpreter finalized."""
    marker = Path(out_dir) / f"atexit.rank{rank}"
    atexit.register(marker.write_text, "interpreter finalization ran")
    ddp = DistributedDataParallel(make_model(0))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    acc = DDPAccumulator(ddp, opt, steps=2)
    for j in range(2):
        x, y = microbatch(0, rank, j, 3)
        with acc.microbatch(3):
            acc.backward(loss_fn(ddp(x), y, "items"))
    write_json(
        Path(out_dir) / f"exit.rank{rank}.json",
        {"params": [p.detach().reshape(-1).tolist() for p in ddp.parameters()]},
    )
    outcome = outcomes[rank]
    if outcome == "raise":
        raise ValueError(f"rank {rank} raises on purpose")
    if outcome == "exit4":
        raise SystemExit(4)
    if outcome == "exit-message":
        raise SystemExit(f"rank {rank} exits with a message")
