"""Models, data, the float64 large-batch reference and rank programs for the Trainer tests.

Everything here is deterministic (seeded generators, no timing). Rank programs are
module-level functions ``f(rank, world_size, ...)`` run by
`gradaccum_lightning.testing.launch_lightning` in fresh processes with a gloo process group
and torchrun's environment; they write JSON (parameters as lists of Python floats, which
JSON round-trips exactly) and the parent compares numbers. Nothing travels by pickle.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from gradaccum_ddp.testing import ReductionCounter
from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import ListLoader, quiet_trainer_kwargs

IN, OUT = 4, 2


# -- model, data, loss: identical in every process and in the reference ----------------------


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return model.to(dtype)


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


def batches(
    sizes: Sequence[int], seed: int = 0, rank: int = 0, dtype: torch.dtype = torch.float64
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """One pass: ``(x, y, items)`` per microbatch."""
    return [(*microbatch(seed, rank, j, n, dtype), n) for j, n in enumerate(sizes)]


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The user's model's parameters (``model.`` stripped), cloned."""
    out = {}
    for name, p in module.named_parameters():
        out[name.removeprefix("module.").removeprefix("model.")] = p.detach().clone()
    return out


def params_json(module: nn.Module) -> dict[str, list[float]]:
    return {n: [float(v) for v in t.reshape(-1).tolist()] for n, t in params(module).items()}


def windows_of(length: int, steps: int) -> list[list[int]]:
    """Microbatch indices of each window of one pass (policy ``step``)."""
    return [list(range(s, min(s + steps, length))) for s in range(0, length, steps)]


def reference(
    sizes: Sequence[Sequence[int]],
    steps: int,
    normalization: str,
    *,
    seed: int = 0,
    lr: float = 0.1,
    momentum: float = 0.9,
    passes: int = 1,
    clip: tuple[str, float] | None = None,
    skip: Sequence[int] = (),
    lrs: Sequence[float] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The parameters after every window, each window one large-batch step in float64
    over every rank's microbatches of the window (``sizes[rank][j]`` items). ``mean``:
    the mean of the microbatch means (ACC-N1); ``items``: the mean over items (ACC-N2).
    ``clip``: ``("norm", max)`` or ``("value", max)`` on the window's gradient;
    ``skip``: windows not stepped; ``lrs``: the learning rate of each window."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    out = []
    index = 0
    for _ in range(passes):
        for window in windows_of(len(sizes[0]), steps):
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64)
            for r in range(len(sizes)):
                for j in window:
                    x, y = microbatch(seed, r, j, sizes[r][j])
                    total = total + loss_fn(model(x), y, normalization)
            if normalization == "items":
                total = total / sum(sizes[r][j] for r in range(len(sizes)) for j in window)
            else:
                total = total / (len(sizes) * len(window))
            total.backward()  # type: ignore[no-untyped-call]
            if clip is not None and clip[0] == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip[1])
            elif clip is not None:
                torch.nn.utils.clip_grad_value_(model.parameters(), clip[1])
            if lrs is not None:
                for group in opt.param_groups:
                    group["lr"] = lrs[index]
            if index not in skip:
                opt.step()
            out.append(params(model))
            index += 1
    return out


def rel_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> float:
    """max |got - want| / max |want| over every tensor."""
    worst = 0.0
    for name, ref in want.items():
        scale = float(ref.abs().max())
        worst = max(worst, float((got[name].to(ref) - ref).abs().max()) / scale)
    return worst


# -- the LightningModule ---------------------------------------------------------------------


class Net(pl.LightningModule):
    """``self.model`` trained on ``(x, y, items)`` batches; ``training_step`` returns the
    mean loss, or ``{"loss": summed, "items": n}`` under ``items`` (``n`` an int, or a
    0-d tensor on odd batches when ``device_items``). ``scheduler``: a factory
    ``optimizer -> lr_scheduler config dict`` (or ``None``)."""

    def __init__(
        self,
        normalization: str = "mean",
        *,
        seed: int = 0,
        lr: float = 0.1,
        momentum: float = 0.9,
        device_items: bool = False,
        scheduler: Callable[[torch.optim.Optimizer], dict[str, Any]] | None = None,
        log_loss: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.model = make_model(seed, dtype)
        self.normalization = normalization
        self.lr = lr
        self.momentum = momentum
        self.device_items = device_items
        self.scheduler = scheduler
        self.log_loss = log_loss
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, n = batch
        loss = loss_fn(self.model(x), y, self.normalization)
        if self.log_loss:
            self.losses.append(float(loss.detach()))
            self.log("train_loss", loss.detach(), on_step=True, on_epoch=False)
        if self.normalization != "items":
            return loss
        items = torch.tensor(n) if self.device_items and batch_idx % 2 else int(n)
        return {"loss": loss, "items": items}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}


class ValNet(Net):
    """`Net` with a ``validation_step`` that records the training ``batch_idx`` at which
    each validation ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validated: list[int] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _, _ = batch
        self.validated.append(int(self.trainer.fit_loop.epoch_loop.batch_idx))
        with torch.no_grad():
            self.model(x).sum()


class Windows(pl.Callback):
    """The parameters, learning rate and ``global_step`` after every closed window,
    recorded in ``on_train_batch_end`` (after the step), and the reductions per window
    (``count_reductions``: a ReductionCounter on the DDP model from ``on_fit_start``).
    Place it after GradAccum in the callbacks."""

    def __init__(self, count_reductions: bool = False) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.global_steps: list[int] = []
        self.reductions: list[int] = []
        self.count_reductions = count_reductions
        self.counter: ReductionCounter | None = None
        self._windows = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.count_reductions:
            acc = GradAccum.of(trainer).accumulator
            self.counter = ReductionCounter(trainer.strategy.model, acc.distributed)  # type: ignore[arg-type]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After GradAccum's on_train_start, which restores a checkpoint's state.
        self._windows = GradAccum.of(trainer).accumulator.machine.state.windows

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        windows = GradAccum.of(trainer).accumulator.machine.state.windows
        if windows != self._windows:
            self._windows = windows
            self.params.append(params(pl_module))
            self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
            self.global_steps.append(trainer.global_step)
            if self.counter is not None:
                self.reductions.append(self.counter.take())


class StopAfter(pl.Callback):
    """After microbatch ``index`` of epoch ``epoch``: ``action(trainer)`` (a checkpoint),
    then ``trainer.should_stop``. Records every microbatch seen."""

    def __init__(self, index: int, action: Callable[[pl.Trainer], None], epoch: int = 0) -> None:
        self.index = index
        self.epoch = epoch
        self.action = action
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        batch_idx = args[-1]
        self.seen.append((trainer.current_epoch, batch_idx))
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.index):
            self.action(trainer)
            trainer.should_stop = True


def trainer(callbacks: Sequence[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU ``Trainer`` (float64: ``precision="64-true"``)."""
    kwargs.setdefault("precision", "64-true")
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(callbacks=list(callbacks), **quiet_trainer_kwargs(**kwargs))


# -- rank programs ---------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _as_json(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    return {n: [float(v) for v in t.reshape(-1).tolist()] for n, t in tensors.items()}


def _ddp_fit(
    rank: int,
    spec: Mapping[str, Any],
    *,
    callbacks: Sequence[pl.Callback] = (),
    ckpt_path: str | None = None,
    seed: int | None = None,
) -> tuple[pl.Trainer, Net, Windows, GradAccum]:
    module = Net(
        spec["normalization"],
        seed=spec["seed"] if seed is None else seed,
        device_items=spec.get("device_items", False),
    )
    windows = Windows(count_reductions=True)
    ga = GradAccum(steps=spec["steps"], normalization=spec["normalization"])
    tr = trainer(
        [ga, windows, *callbacks],
        strategy="ddp",
        devices=2,
        use_distributed_sampler=False,
        max_epochs=spec.get("passes", 1),
    )
    data = batches(spec["sizes"][rank], spec["seed"], rank)
    tr.fit(module, ListLoader(data), ckpt_path=ckpt_path)
    return tr, module, windows, ga


def _resume_dir_refused(rank: int, spec: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """``GradAccum.save(dir)`` after microbatch ``spec["mid"]`` (mid-window), then a fresh
    module fitted with ``GradAccum(resume=dir)`` whose train loader is plain (not stateful)
    on rank 0 only and stateful on rank 1: rank 0 alone would refuse the resume. Records
    what each rank raised and whether its parameters stayed the module's own."""
    shared = out / f"{spec['name']}-shared"
    stop = StopAfter(spec["mid"], lambda t: GradAccum.of(t).save(shared))
    _ddp_fit(rank, spec, callbacks=[stop])
    module = Net(spec["normalization"], seed=123, device_items=spec.get("device_items", False))
    before = params(module)
    ga = GradAccum(steps=spec["steps"], normalization=spec["normalization"], resume=shared)
    tr = trainer([ga], strategy="ddp", devices=2, use_distributed_sampler=False)
    rest = batches(spec["sizes"][rank], spec["seed"], rank)[spec["mid"] + 1 :]
    loader: Any = (
        torch.utils.data.DataLoader(rest, batch_size=None) if rank == 0 else ListLoader(rest)  # type: ignore[arg-type]
    )
    raised: dict[str, Any] = {"type": None, "message": ""}
    try:
        tr.fit(module, loader)
    except Exception as exc:
        raised = {"type": type(exc).__name__, "message": str(exc)}
    after = params(module)
    return {
        "raised": raised,
        "unchanged": all(torch.equal(before[n], after[n]) for n in before),
        "position": GradAccum.of(tr).accumulator.machine.state.position,
    }


def ddp_program(rank: int, world_size: int, out_dir: str, specs: list[dict[str, Any]]) -> None:
    """Every case of ``specs`` on this rank, one after the other (one launch for all):
    ``"train"`` fits straight through; ``"resume"`` saves a Lightning checkpoint after
    microbatch ``spec["mid"]`` (every rank calls ``save_checkpoint``), stops, and fits a
    fresh module (another seed) and Trainer from it. Writes ``<name>.rank<r>.json``."""
    for spec in specs:
        try:
            if spec["kind"] == "train":
                tr, module, windows, ga = _ddp_fit(rank, spec)
                result: dict[str, Any] = {
                    "windows": [_as_json(p) for p in windows.params],
                    "reductions": windows.reductions,
                    "buckets": None if windows.counter is None else windows.counter.buckets,
                    "global_step": tr.global_step,
                    "global_steps": windows.global_steps,
                    "stats": ga.stats.as_dict(),
                }
            elif spec["kind"] == "resume_dir_refused":
                result = _resume_dir_refused(rank, spec, Path(out_dir))
            else:
                path = str(Path(out_dir) / f"{spec['name']}.ckpt")
                stop = StopAfter(spec["mid"], lambda t, p=path: t.save_checkpoint(p))
                tr, module, windows, ga = _ddp_fit(rank, spec, callbacks=[stop])
                first = {
                    "windows": [_as_json(p) for p in windows.params],
                    "seen": stop.seen,
                    "global_step": tr.global_step,
                }
                tr, module, windows, ga = _ddp_fit(rank, spec, ckpt_path=path, seed=123)
                result = {
                    "first": first,
                    "windows": [_as_json(p) for p in windows.params],
                    "final": params_json(module),
                    "global_step": tr.global_step,
                    "reductions": windows.reductions,
                    "stats": ga.stats.as_dict(),
                }
        except Exception as exc:
            result = {"error": {"type": type(exc).__name__, "trace": traceback.format_exc()}}
        write_json(Path(out_dir) / f"{spec['name']}.rank{rank}.json", result)
