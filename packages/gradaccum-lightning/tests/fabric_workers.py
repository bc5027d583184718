"""Shared pieces of the Fabric tests: model, data, loss, the float64 large-batch reference,
the loops (the adapter's and Fabric's documented accumulation idiom), and the 2-rank
program.

The rank program is a module-level function ``f(rank, world_size, ...)`` run by
`gradaccum_lightning.fabric_harness.launch_fabric` (gloo ranks spawned by
`gradaccum_ddp.testing.launch`, a torchrun environment) that builds a real
``Fabric(accelerator="cpu", devices=2, strategy="ddp")``. It runs every case of the module
in one launch and writes one JSON file per case and rank (parameters as lists of Python
floats, which JSON round-trips exactly). Nothing travels by pickle.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradaccum_ddp.testing import ReductionCounter
from gradaccum_lightning import FabricAccumulator
from gradaccum_lightning.fabric_harness import make_fabric

IN, OUT = 4, 2
Batch = tuple[torch.Tensor, torch.Tensor, int]

# -- model, data, loss: identical in every process and in the reference ----------------------


def make_model(seed: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
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


def data(spec: Mapping[str, Any], rank: int) -> list[Batch]:
    return [(*microbatch(spec["seed"], rank, j, n), n) for j, n in enumerate(spec["sizes"][rank])]


def params_json(model: nn.Module) -> dict[str, list[float]]:
    """Parameters by the bare model's names (``model`` is the bare module)."""
    return {
        name: [float(v) for v in p.detach().reshape(-1).tolist()]
        for name, p in model.named_parameters()
    }


def windows_of(length: int, steps: int) -> list[list[int]]:
    """Microbatch indices of each window of one pass (policy ``step``: a short last one)."""
    return [list(range(s, min(s + steps, length))) for s in range(0, length, steps)]


def make_optimizer(model: nn.Module, spec: Mapping[str, Any]) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])


def reference(spec: Mapping[str, Any]) -> list[dict[str, list[float]]]:
    """Parameters after every window: one float64 step on the window's large batch (every
    rank's microbatches); ``items`` divides by the window's items over all ranks, ``mean``
    averages the microbatch means over ranks and the window's microbatches. Windows in
    ``spec["skip_windows"]`` take no step (an AMP overflow); the scheduler, if any, steps
    once per step taken."""
    sizes: list[list[int]] = spec["sizes"]
    model = make_model(spec["seed"])
    opt = make_optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _decay) if spec.get("scheduler") else None
    skip = set(spec.get("skip_windows", ()))
    out = []
    for _ in range(spec.get("passes", 1)):
        for window in windows_of(len(sizes[0]), spec["steps"]):
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64)
            for r in range(len(sizes)):
                for j in window:
                    x, y = microbatch(spec["seed"], r, j, sizes[r][j])
                    total = total + loss_fn(model(x), y, spec["normalization"])
            if spec["normalization"] == "items":
                total = total / sum(sizes[r][j] for r in range(len(sizes)) for j in window)
            else:
                total = total / (len(sizes) * len(window))
            total.backward()  # type: ignore[no-untyped-call]
            if len(out) not in skip:
                opt.step()
                if scheduler is not None:
                    scheduler.step()
            out.append(params_json(model))
    return out


def rel_error(
    got: Sequence[Mapping[str, list[float]]], want: Sequence[Mapping[str, list[float]]]
) -> float:
    """max |got - want| / max |want| over every tensor of every window."""
    assert len(got) == len(want), f"{len(got)} windows, expected {len(want)}"
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        for name, ref in w.items():
            scale = max(abs(v) for v in ref) or 1.0
            diff = max(abs(a - b) for a, b in zip(g[name], ref, strict=True))
            worst = max(worst, diff / scale)
    return worst


def _generator(items: Sequence[Any]) -> Iterator[Any]:
    yield from items


# -- the loops -----------------------------------------------------------------------------


class Setup:
    """A Fabric run's objects: ``fabric.setup(model, optimizer)`` and the accumulator."""

    def __init__(
        self,
        fabric: Fabric,
        spec: Mapping[str, Any],
        *,
        seed: int | None = None,
        accumulator: bool = True,
        compiled: bool = False,
    ) -> None:
        self.fabric = fabric
        self.module = make_model(spec["seed"] if seed is None else seed)
        self.optimizer = make_optimizer(self.module, spec)
        self.scheduler: Any = None
        if spec.get("scheduler"):
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _decay)
        wrapped: nn.Module = (
            torch.compile(self.module, backend="eager") if compiled else self.module
        )
        self.model, self.fabric_optimizer = fabric.setup(wrapped, self.optimizer)
        self.acc: FabricAccumulator | None = None
        if accumulator:
            self.acc = FabricAccumulator(
                fabric,
                self.model,
                self.fabric_optimizer,
                steps=spec["steps"],
                normalization=spec["normalization"],
                scheduler=self.scheduler,
            )


def _decay(step: int) -> float:
    return 0.9**step


def train(
    setup: Setup,
    spec: Mapping[str, Any],
    batches: Sequence[Batch],
    *,
    device_items: bool = False,
    stop_after: int | None = None,
    on_microbatch: Callable[[int, bool], None] | None = None,
) -> list[dict[str, list[float]]]:
    """The adapter's loop over ``spec["passes"]`` passes of ``batches`` (``acc.iterate``,
    ``acc.microbatch``, ``acc.backward``); returns the parameters after every window. With
    ``stop_after=i`` it leaves the loop after microbatch ``i`` of the first pass (for a
    checkpoint). ``on_microbatch(index, boundary)`` runs after each microbatch."""
    acc = setup.acc
    assert acc is not None
    windows: list[dict[str, list[float]]] = []
    for _ in range(spec.get("passes", 1)):
        source = batches if spec.get("known_length", True) else _generator(batches)
        closed = acc.machine.state.windows
        for index, (x, y, n) in enumerate(acc.iterate(source)):
            items: int | torch.Tensor = torch.tensor(n) if device_items else n
            with acc.microbatch(items):
                acc.backward(loss_fn(setup.model(x), y, spec["normalization"]))
            boundary = acc.machine.state.windows != closed
            closed = acc.machine.state.windows
            if boundary:
                windows.append(params_json(setup.module))
            if on_microbatch is not None:
                on_microbatch(index, boundary)
            if stop_after is not None and index == stop_after:
                return windows
        if acc.machine.state.windows != closed:  # the pass's end closed a window
            windows.append(params_json(setup.module))
    return windows


def fabric_idiom(
    setup: Setup, spec: Mapping[str, Any], batches: Sequence[Batch], *, step_at_pass_end: bool
) -> list[dict[str, list[float]]]:
    """Fabric's documented accumulation loop
    (https://lightning.ai/docs/fabric/stable/advanced/gradient_accumulation.html):
    ``fabric.no_backward_sync(model, enabled=is_accumulating)`` around forward and
    ``fabric.backward(loss / k)``, ``optimizer.step(); optimizer.zero_grad()`` every k
    microbatches. ``step_at_pass_end``: also step at the end of each pass (the short last
    window is stepped); otherwise its gradient stays in ``.grad`` and joins the next pass's
    first window. Returns the parameters after every step."""
    k = spec["steps"]
    fabric, model, optimizer = setup.fabric, setup.model, setup.fabric_optimizer
    windows: list[dict[str, list[float]]] = []
    for _ in range(spec.get("passes", 1)):
        for i, (x, y, _n) in enumerate(batches):
            is_accumulating = (i + 1) % k != 0 and not (step_at_pass_end and i + 1 == len(batches))
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = loss_fn(model(x), y, spec["normalization"])
                fabric.backward(loss / k)
            if not is_accumulating:
                optimizer.step()
                optimizer.zero_grad()
                windows.append(params_json(setup.module))
    return windows


# -- helpers for the rank program -----------------------------------------------------------


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def error_info(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}


class SyncSpy:
    """Records, per microbatch, the ``enabled`` of every ``fabric.no_backward_sync`` call and
    how many times DDP's ``no_sync()`` was entered (both wrapped on the instances)."""

    def __init__(self, fabric: Fabric, ddp: DistributedDataParallel) -> None:
        self.calls: list[bool] = []
        self.entered = 0
        fabric_no_backward_sync = fabric.no_backward_sync
        ddp_no_sync = ddp.no_sync

        def spy_fabric(module: Any, enabled: bool = True) -> AbstractContextManager[Any]:
            self.calls.append(enabled)
            return fabric_no_backward_sync(module, enabled)

        def spy_ddp() -> AbstractContextManager[Any]:
            self.entered += 1
            return ddp_no_sync()

        fabric.no_backward_sync = spy_fabric  # type: ignore[method-assign]
        ddp.no_sync = spy_ddp  # type: ignore[method-assign]

    def take(self) -> dict[str, Any]:
        taken = {"no_backward_sync": self.calls, "ddp_no_sync": self.entered}
        self.calls, self.entered = [], 0
        return taken


def _training_case(rank: int, world_size: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Train ``spec`` on this rank; record windows, reductions and sync contexts per
    microbatch, and what Fabric made of the environment."""
    fabric = make_fabric(world_size)
    setup = Setup(fabric, spec)
    acc = setup.acc
    assert acc is not None
    ddp = setup.model._forward_module
    assert isinstance(ddp, DistributedDataParallel)
    counter = ReductionCounter(ddp, acc.distributed)  # type: ignore[arg-type]
    spy = SyncSpy(fabric, ddp)
    microbatches: list[dict[str, Any]] = []

    def record(index: int, boundary: bool) -> None:
        microbatches.append({"boundary": boundary, "reductions": counter.take(), **spy.take()})

    windows = train(
        setup,
        spec,
        data(spec, rank),
        device_items=spec.get("device_items", False),
        on_microbatch=record,
    )
    return {
        "windows": windows,
        "microbatches": microbatches,
        "stats": acc.stats.as_dict(),
        "strategy": type(fabric.strategy).__name__,
        "environment": type(fabric.strategy.cluster_environment).__name__,
        "global_rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "default_group": ddp.process_group is dist.group.WORLD,
        "threads": torch.get_num_threads(),
        "distributed": type(acc.distributed).__name__,
    }


def _idiom_case(rank: int, world_size: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    setup = Setup(make_fabric(world_size), spec, accumulator=False)
    return {"windows": fabric_idiom(setup, spec, data(spec, rank), step_at_pass_end=True)}


def _compiled_case(rank: int, world_size: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    setup = Setup(make_fabric(world_size), spec, compiled=True)
    return {"windows": train(setup, spec, data(spec, rank))}


def checkpoint_runs(
    fabric: Callable[[], Fabric], spec: Mapping[str, Any], rank: int, out: Path
) -> dict[str, Any]:
    """The uninterrupted run (saving a boundary checkpoint from inside its loop), then a
    run saved mid-window (``acc.save`` after microbatch ``spec["mid"]``), thrown away and
    resumed on fresh objects (a fresh Fabric, a model of another seed) with ``acc.load``."""
    batches = data(spec, rank)
    mid, boundary = spec["mid"], spec["boundary"]
    first = Setup(fabric(), spec)
    acc = first.acc
    assert acc is not None
    saved: dict[str, Any] = {}

    def at_boundary(index: int, closed: bool) -> None:
        if index == boundary:
            assert closed, "spec['boundary'] must close a window"
            acc.save(out / "boundary")
            saved["params"] = params_json(first.module)
            saved["state"] = acc.machine.state_dict()

    windows = train(first, spec, batches, on_microbatch=at_boundary)

    second = Setup(fabric(), spec)
    assert second.acc is not None
    train(second, spec, batches, stop_after=mid)
    second.acc.save(out / "mid")
    mid_state = second.acc.machine.state_dict()
    del second
    resumed = Setup(fabric(), spec, seed=spec["seed"] + 77)
    assert resumed.acc is not None
    resumed.acc.load(out / "mid")
    resumed_windows = train(resumed, spec, batches[mid + 1 :])
    return {
        "straight": {
            "final": params_json(first.module),
            "stats": acc.stats.as_dict(),
            "windows": windows,
            "scheduler_steps": first.scheduler.last_epoch if first.scheduler else None,
        },
        "resumed": {
            "final": params_json(resumed.module),
            "stats": resumed.acc.stats.as_dict(),
            "windows": resumed_windows,
            "scheduler_steps": resumed.scheduler.last_epoch if resumed.scheduler else None,
        },
        "boundary_params": saved["params"],
        "boundary_state": saved["state"],
        "mid_state": mid_state,
    }


def rank_program(
    rank: int, world_size: int, out_dir: str, cases: Mapping[str, Mapping[str, Any]]
) -> None:
    """Every 2-rank case of the module, in order; one JSON per case and rank."""
    out = Path(out_dir)
    for name, spec in cases.items():
        kind = spec["kind"]
        try:
            if kind == "train" and spec.get("lightning_environment"):
                # torchrun's variables without TORCHELASTIC_RUN_ID: Fabric's
                # LightningEnvironment, which creates no process once LOCAL_RANK is set.
                run_id = os.environ.pop("TORCHELASTIC_RUN_ID")
                try:
                    result = _training_case(rank, world_size, spec)
                finally:
                    os.environ["TORCHELASTIC_RUN_ID"] = run_id
            elif kind == "train":
                result = _training_case(rank, world_size, spec)
            elif kind == "idiom":
                result = _idiom_case(rank, world_size, spec)
            elif kind == "compiled":
                result = _compiled_case(rank, world_size, spec)
            elif kind == "checkpoint":
                folder = out / name
                folder.mkdir(exist_ok=True)
                result = checkpoint_runs(lambda: make_fabric(world_size), spec, rank, folder)
            else:
                raise ValueError(f"unknown case kind {kind!r}")
        except Exception as exc:
            result = {"error": error_info(exc)}
        write_json(out / f"{name}.rank{rank}.json", result)
        dist.barrier()
