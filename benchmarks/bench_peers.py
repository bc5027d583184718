"""gradaccum-torch, Lightning Fabric, Accelerate and the Lightning Trainer against one
hand-written accumulation loop, paired in one process on one machine.

``python benchmarks/bench_peers.py [--quick] [--out PATH]`` times, at 1 and 8 accumulation
steps, the same training pass written with each tool as its documentation says:

- ``hand``: ``(loss / k).backward()``, ``opt.step()`` and ``opt.zero_grad(set_to_none=True)``
  every k microbatches (and after the last). The baseline.
- ``control``: a second, identical copy of the hand loop. Its difference from ``hand`` is
  pure noise and should come out near 0 (ratio near 1): read every other figure against it.
- ``gradaccum``: ``gradaccum_torch.Accumulator(model, opt, steps=k)``,
  ``for b in acc.iterate(batches): with acc.microbatch(): acc.backward(loss)`` (the loop of
  ``bench_torch.py``).
- ``fabric``: ``lightning.Fabric(accelerator="cpu", devices=1)``, ``fabric.setup(model, opt)``,
  forward and ``fabric.backward(loss / k)`` under
  ``fabric.no_backward_sync(model, enabled=is_accumulating)``, step and zero_grad every k.
- ``accelerate``: ``Accelerator(gradient_accumulation_steps=k, cpu=True)``,
  ``prepare(model, opt)``, and per microbatch ``with accelerator.accumulate(model):`` forward,
  ``accelerator.backward(loss)``, ``opt.step()``, ``opt.zero_grad()`` (the prepared optimizer
  skips both until the window ends; ``backward`` divides the loss by k). ``accumulate`` learns
  where the data ends from ``accelerator.gradient_state``: a prepared DataLoader registers itself
  there. So that Accelerate is timed on the same plain list of batches as every other loop, the
  batches go through a minimal iterable built on Accelerate's own ``DataLoaderStateMixin`` (the
  class its DataLoader wrappers use for this): it registers with the gradient state and sets
  ``end_of_dataloader`` before the last batch, exactly as a prepared DataLoader does, and does
  nothing else. The tiny-model benchmark also times ``accelerate_dataloader``, the documented
  idiom literally: the batches through ``accelerator.prepare(DataLoader(batches,
  batch_size=None))``. Its figure includes the cost of iterating a DataLoader (which the hand
  loop does not pay) and is reported as such.
- ``trainer``: ``lightning.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=k,
  max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
  enable_model_summary=False).fit(module, batches)``, the LightningModule's ``training_step``
  returning the loss; the batches are handed over as one plain iterable (``Batches``: a list
  Lightning would take as a collection of dataloaders), no DataLoader, as to every other loop,
  and ``configure_optimizers`` returns the same optimizer every fit, so its state carries on
  from pass to pass as the other loops' does. A Trainer runs one epoch per ``fit``, so every
  timed call gets a fresh Trainer, built before the repetition's timings start: its construction
  is never timed; its ``fit`` is, whole. A fit has a fixed cost (setting up, connecting hooks,
  tearing down) that a hand loop does not have and that a real run pays once, not per
  microbatch; charging it to the few microbatches of one timed pass would overstate the
  Trainer's per-microbatch cost. So each repetition also times ``trainer_short``, an identical
  fit over only the first 8 microbatches (one window at k=8), and the Trainer's figures are
  *marginal*: ``(t_fit(N) - t_fit(8)) / (N - 8)`` per microbatch, against ``t_hand(N) / N``. The
  fixed cost, ``t_fit(8) - 8 * marginal``, is reported on its own, and so is the plain whole-fit
  figure (``t_fit(N)`` against ``t_hand(N)``, setup included), so that nothing is hidden.

Two measurements, each at k=1 and k=8 (N always a multiple of 8, so no window is partial):

1. *Added time per microbatch* on the tiny model of ``bench_torch.py`` (``Linear(16, 16)``,
   SGD, batches of 4), where the work is next to nothing and each tool's own overhead shows:
   the median over repetitions of ``(t_tool - t_hand) / N`` in microseconds, with its
   interquartile range (IQR), wall and CPU time.
2. *Wall-time ratio* tool / hand on the small transformer of ``bench_torch.py``
   (``SmallTransformer``, AdamW, batches of 8 x 64 x 128): the median of the per-repetition
   ratios, with its IQR and a bootstrap 95% interval of the median; and the median CPU-time
   ratio.

Method (as ``bench_torch.py``, whose ``paired``, ``summary``, ``Times``, loops and models this
script imports): one torch thread; every loop trains its own deep copy of one model, with its
own optimizer, on the same list of batches; warm-up passes first (the first pass also checks
that each tool trained its copy exactly like the hand loop did: the largest parameter difference
is recorded, and the table flags any above 1e-5, as the timings then compare different work);
then
each repetition times every loop once, back to back (``paired``, one repetition at a time), in an
order that changes from repetition to repetition. ``paired`` cycles through all permutations,
which with 7-8 loops would leave the same loop first in every repetition of a run, so the order
here comes from a Williams design instead: over each block of repetitions, every loop runs in
every position equally often, and after every other loop equally often. Before each repetition
(untimed) the Trainers for it are built and ``gc.collect()`` runs, so that garbage one tool leaves
is not collected on another's clock.

Reading the figures: the control's spread is the noise floor (on a busy machine the transformer
ratios move by a few percent between repetitions, more than any tool adds to a 15-20 ms
microbatch: compare with the tiny model's added microseconds). Accelerate 1.15's
``AcceleratedOptimizer.step`` calls ``is_lomo_available()`` twice per call, an
``importlib.util.find_spec`` search through ``sys.path`` each time, and its idiom calls ``step``
on every microbatch: that is most of what Accelerate adds on the tiny model, and it grows with
the length of ``sys.path`` and the speed of the file system. It is the documented idiom's real
cost, so it is kept.

Writes ``benchmarks/results/peers.json`` (or ``--out``) with the environment (versions of torch,
lightning, accelerate, gradaccum, Python, the CPU) and prints Markdown tables. Needs
``lightning`` and ``accelerate``: ``nox -s bench`` installs them; without them this script
exits with status 2 (it cannot measure).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_torch import RESULTS, SmallTransformer, Times, acc_loop, hand_loop, paired, summary
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Loop = Callable[[], None]
OptFactory = Callable[[Any], torch.optim.Optimizer]

SHORT = 8  # microbatches in the Trainer's short fit, which measures its fixed cost per fit
LABELS = {
    "hand": "hand-written loop (baseline)",
    "control": "hand-written loop, second copy (control)",
    "gradaccum": "gradaccum-torch `Accumulator`",
    "fabric": "Lightning Fabric",
    "accelerate": "Accelerate",
    "accelerate_dataloader": "Accelerate, through a prepared DataLoader",
    "trainer": "Lightning Trainer (marginal, fixed cost per fit excluded)",
    "trainer_whole": "Lightning Trainer (whole fit, fixed cost included)",
}
DISTRIBUTIONS = ("torch", "lightning", "accelerate", "gradaccum", "gradaccum-torch")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def _nothing() -> None:
    pass


@dataclass
class Runner:
    """A loop to time, and work to do, untimed, before each timed call."""

    run: Loop
    prepare: Loop = field(default=_nothing)


# -- the loops under test (hand_loop and acc_loop come from bench_torch) --------------------


def fabric_loop(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], k: int, loss_fn: LossFn
) -> Loop:
    """Lightning Fabric's gradient-accumulation idiom, on one CPU device."""
    import lightning  # type: ignore[import-not-found,unused-ignore]

    fabric = lightning.Fabric(accelerator="cpu", devices=1)
    fmodel, fopt = fabric.setup(model, opt)

    def run() -> None:
        for i, (x, y) in enumerate(batches, start=1):
            is_accumulating = i % k != 0 and i != len(batches)
            with fabric.no_backward_sync(fmodel, enabled=is_accumulating):
                loss = loss_fn(fmodel(x), y)
                fabric.backward(loss / k)
            if not is_accumulating:
                fopt.step()
                fopt.zero_grad(set_to_none=True)

    return run


def accelerator(k: int) -> Any:
    """A fresh ``Accelerator`` accumulating over ``k`` microbatches, on the CPU. Accelerate
    keeps its state in process-wide singletons, which are reset first."""
    from accelerate import Accelerator  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from accelerate.state import AcceleratorState, GradientState  # type: ignore[import-untyped,import-not-found,unused-ignore]

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(gradient_accumulation_steps=k, cpu=True)


def marked_end(batches: list[Batch]) -> Iterable[Batch]:
    """``batches``, with Accelerate's gradient state told where they end, as a prepared
    DataLoader tells it (``DataLoaderStateMixin.begin``, ``end_of_dataloader`` set before the
    last batch is yielded, ``end``), and nothing else: no DataLoader, no device transfer."""
    from accelerate.data_loader import DataLoaderStateMixin  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from accelerate.state import GradientState  # type: ignore[import-untyped,import-not-found,unused-ignore]

    class Feed(DataLoaderStateMixin):  # type: ignore[misc]
        def __init__(self) -> None:
            self.gradient_state = GradientState()

        def __iter__(self) -> Iterator[Batch]:
            self.begin()
            try:
                last = len(batches) - 1
                for i, batch in enumerate(batches):
                    if i == last:
                        self.end_of_dataloader = True
                    yield batch
            finally:
                self.end()

    feed: Iterable[Batch] = Feed()  # a new pass at every ``for``, like a DataLoader
    return feed


def accelerate_loop(
    acc: Any,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[Batch],
    loss_fn: LossFn,
    *,
    dataloader: bool = False,
) -> Loop:
    """Accelerate's gradient-accumulation idiom: every microbatch under ``accumulate``, step
    and zero_grad every time (the prepared optimizer skips them mid-window)."""
    pmodel, popt = acc.prepare(model, opt)
    if dataloader:
        from torch.utils.data import DataLoader

        feed: Any = acc.prepare(DataLoader(batches, batch_size=None))  # type: ignore[arg-type]
    else:
        feed = marked_end(batches)

    def run() -> None:
        for x, y in feed:
            with acc.accumulate(pmodel):
                loss = loss_fn(pmodel(x), y)
                acc.backward(loss)
                popt.step()
                popt.zero_grad()

    return run


class Batches:
    """A list of batches that Lightning takes as one iterable (a plain list it would take as a
    collection of dataloaders)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_module(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn) -> Any:
    """``net`` as a LightningModule whose ``training_step`` returns the loss and whose
    ``configure_optimizers`` returns ``opt`` (the same optimizer, its state kept, every fit)."""
    import lightning  # type: ignore[import-not-found,unused-ignore]

    class Module(lightning.LightningModule):  # type: ignore[misc,unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return loss_fn(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return opt

    return Module()


def trainer_loop(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], k: int, loss_fn: LossFn
) -> Runner:
    """One ``Trainer.fit`` over ``batches`` per call; the Trainer is built untimed before."""
    import lightning  # type: ignore[import-not-found,unused-ignore]

    module = lightning_module(model, opt, loss_fn)
    data = Batches(batches)
    ready: list[Any] = []

    def prepare() -> None:
        ready[:] = [
            lightning.Trainer(
                accelerator="cpu",
                devices=1,
                accumulate_grad_batches=k,
                max_epochs=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
        ]

    def run() -> None:
        ready.pop().fit(module, train_dataloaders=data)

    return Runner(run, prepare)


def runners(
    make: Callable[[], nn.Module],
    opt_factory: OptFactory,
    batches: list[Batch],
    k: int,
    *,
    dataloader: bool,
) -> tuple[dict[str, Runner], dict[str, nn.Module]]:
    """Every loop, each on its own deep copy of one model with its own optimizer."""
    base = make()
    models: dict[str, nn.Module] = {"hand": base}

    def pair(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = models.setdefault(name, copy.deepcopy(base))
        return model, opt_factory(model.parameters())

    acc = accelerator(k)
    loops = {
        "hand": Runner(hand_loop(*pair("hand"), batches, k, _mse)),
        "control": Runner(hand_loop(*pair("control"), batches, k, _mse)),
        "gradaccum": Runner(acc_loop(*pair("gradaccum"), batches, k, _mse)),
        "fabric": Runner(fabric_loop(*pair("fabric"), batches, k, _mse)),
        "accelerate": Runner(accelerate_loop(acc, *pair("accelerate"), batches, _mse)),
    }
    if dataloader:
        loops["accelerate_dataloader"] = Runner(
            accelerate_loop(acc, *pair("accelerate_dataloader"), batches, _mse, dataloader=True)
        )
    loops["trainer"] = trainer_loop(*pair("trainer"), batches, k, _mse)
    loops["trainer_short"] = trainer_loop(*pair("trainer_short"), batches[:SHORT], k, _mse)
    return loops, models


# -- timing ---------------------------------------------------------------------------------


def williams(n: int) -> list[list[int]]:
    """Orders of ``n`` items (a Williams design): across the rows, every item takes every
    position equally often and follows every other item equally often."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(i + shift) % n for i in first] for shift in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def agreement(models: dict[str, nn.Module]) -> dict[str, float]:
    """Largest absolute difference between each model's parameters and the hand loop's."""
    reference = list(models["hand"].parameters())
    out: dict[str, float] = {}
    for name, model in models.items():
        if name in ("hand", "trainer_short"):
            continue
        diffs = [
            (p - q).abs().max().item() for p, q in zip(model.parameters(), reference, strict=True)
        ]
        out[name] = max(diffs)
    return out


def measure(
    loops: dict[str, Runner], models: dict[str, nn.Module], reps: int, warmup: int
) -> tuple[Times, dict[str, float]]:
    """Warm up (the first pass, from identical models, is checked for agreement), then time
    every loop ``reps`` times, one repetition at a time, in Williams-design orders."""
    names = list(loops)
    for loop in loops.values():
        loop.prepare()
        loop.run()
    agree = agreement(models)
    for _ in range(warmup - 1):
        for loop in loops.values():
            loop.prepare()
            loop.run()
    orders = williams(len(names))
    times = Times(names)
    for rep in range(reps):
        for loop in loops.values():
            loop.prepare()
        gc.collect()
        order = [names[i] for i in orders[rep % len(orders)]]
        one = paired({name: loops[name].run for name in order}, reps=1, warmup=0)
        for name in names:
            times.wall[name] += one.wall[name]
            times.cpu[name] += one.cpu[name]
    return times, agree


def per_microbatch(times: Times, n: int, clock: str = "wall") -> dict[str, list[float]]:
    """Nanoseconds per microbatch, repetition by repetition, for each loop; for the Trainer
    both the marginal figure (``trainer``) and the whole-fit one (``trainer_whole``)."""
    t = times.wall if clock == "wall" else times.cpu
    out = {name: [v / n for v in t[name]] for name in t if name != "trainer_short"}
    out["trainer"] = [
        (whole - short) / (n - SHORT)
        for whole, short in zip(t["trainer"], t["trainer_short"], strict=True)
    ]
    out["trainer_whole"] = [v / n for v in t["trainer"]]
    return out


def fixed_cost_ms(times: Times, n: int) -> dict[str, Any]:
    """The Trainer's fixed cost per fit, ``t_fit(SHORT) - SHORT * marginal``, in ms."""
    marginal = per_microbatch(times, n)["trainer"]
    fixed = [
        (s - SHORT * m) / 1e6 for s, m in zip(times.wall["trainer_short"], marginal, strict=True)
    ]
    return summary(fixed)


def _tools(per: dict[str, list[float]]) -> list[str]:
    return [name for name in LABELS if name in per and name != "hand"]


def bench_tiny(reps: int, microbatches: int, warmup: int) -> dict[str, Any]:
    """Added µs per microbatch over the hand loop, tiny model, at 1 and 8 steps."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 16), torch.randn(4, 16)) for _ in range(microbatches)]
    out: dict[str, Any] = {}
    for k in (1, 8):
        loops, models = runners(
            lambda: nn.Linear(16, 16),
            lambda p: torch.optim.SGD(p, lr=1e-3),
            batches,
            k,
            dataloader=True,
        )
        times, agree = measure(loops, models, reps, warmup)
        wall, cpu = per_microbatch(times, microbatches), per_microbatch(times, microbatches, "cpu")
        hand, hand_cpu = wall["hand"], cpu["hand"]
        out[f"k{k}"] = {
            "steps": k,
            "reps": reps,
            "microbatches_per_rep": microbatches,
            "hand_us_per_microbatch": statistics.median(hand) / 1e3,
            "tools": {
                name: {
                    "us_per_microbatch": statistics.median(wall[name]) / 1e3,
                    "added_us_per_microbatch": summary(
                        [(t - h) / 1e3 for t, h in zip(wall[name], hand, strict=True)]
                    ),
                    "added_cpu_us_per_microbatch": summary(
                        [(t - h) / 1e3 for t, h in zip(cpu[name], hand_cpu, strict=True)]
                    ),
                    "max_abs_param_diff_after_one_pass": agree.get(name.removesuffix("_whole")),
                }
                for name in _tools(wall)
            },
            "trainer_fixed_ms_per_fit": fixed_cost_ms(times, microbatches),
            "trainer_short_fit_microbatches": SHORT,
        }
    return out


def bench_transformer(reps: int, microbatches: int, warmup: int) -> dict[str, Any]:
    """Wall-time ratio tool / hand loop on the small transformer, at 1 and 8 steps."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 64, 128), torch.randn(8, 64, 128)) for _ in range(microbatches)]
    out: dict[str, Any] = {}
    for k in (1, 8):
        loops, models = runners(
            SmallTransformer, lambda p: torch.optim.AdamW(p, lr=1e-4), batches, k, dataloader=False
        )
        times, agree = measure(loops, models, reps, warmup)
        wall, cpu = per_microbatch(times, microbatches), per_microbatch(times, microbatches, "cpu")
        hand, hand_cpu = wall["hand"], cpu["hand"]
        out[f"k{k}"] = {
            "steps": k,
            "reps": reps,
            "microbatches_per_rep": microbatches,
            "parameters": sum(p.numel() for p in models["hand"].parameters()),
            "hand_ms_per_microbatch": statistics.median(hand) / 1e6,
            "tools": {
                name: {
                    "ms_per_microbatch": statistics.median(wall[name]) / 1e6,
                    "ratio": summary([t / h for t, h in zip(wall[name], hand, strict=True)]),
                    "cpu_ratio": summary([t / h for t, h in zip(cpu[name], hand_cpu, strict=True)]),
                    "max_abs_param_diff_after_one_pass": agree.get(name.removesuffix("_whole")),
                }
                for name in _tools(wall)
            },
            "trainer_fixed_ms_per_fit": fixed_cost_ms(times, microbatches),
            "trainer_short_fit_microbatches": SHORT,
        }
    return out


# -- report ---------------------------------------------------------------------------------


def _spread(s: dict[str, Any], fmt: str) -> str:
    lo, hi = s["iqr"]
    return f"{s['median']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _interval(pair: Sequence[float]) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _fixed(part: dict[str, Any]) -> str:
    s = part["trainer_fixed_ms_per_fit"]
    resolved = not s["iqr"][0] <= 0 <= s["iqr"][1]
    return f"k={part['steps']} {_spread(s, '.2f')}" + ("" if resolved else " (IQR spans 0)")


def table(results: dict[str, Any]) -> str:
    """The Markdown summary."""
    env, tiny, tf = results["environment"], results["tiny"], results["transformer"]
    versions = ", ".join(f"{name} {env['versions'][name]}" for name in DISTRIBUTIONS)
    t1, t8 = tiny["k1"], tiny["k8"]
    lines = [
        f"`{results['command']}`: {versions}; Python {env['python']}; {env['cpu']}, "
        f"{env['cores']} cores; 1 torch thread",
        "",
        f"Tiny model (Linear 16→16, SGD), {t1['microbatches_per_rep']} microbatches per pass, "
        f"{t1['reps']} paired repetitions: µs per microbatch, and µs added per microbatch over "
        "the hand loop (median [IQR] of the paired differences; wall time, then CPU time).",
        "",
        "| loop | k=1: µs | k=1: added, wall | k=1: added, CPU "
        "| k=8: µs | k=8: added, wall | k=8: added, CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {LABELS['hand']} | {t1['hand_us_per_microbatch']:.1f} | | "
        f"| {t8['hand_us_per_microbatch']:.1f} | | |",
    ]
    for name in t1["tools"]:
        cells = []
        for part in (t1, t8):
            r = part["tools"][name]
            cells += [
                f"{r['us_per_microbatch']:.1f}",
                _spread(r["added_us_per_microbatch"], "+.1f"),
                _spread(r["added_cpu_us_per_microbatch"], "+.1f"),
            ]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    r1, r8 = tf["k1"], tf["k8"]
    lines += [
        "",
        f"Small transformer ({r1['parameters']:,} parameters, AdamW), "
        f"{r1['microbatches_per_rep']} microbatches per pass, {r1['reps']} paired repetitions: "
        "wall-time ratio tool / hand loop (median of the per-repetition ratios, its IQR, a "
        "bootstrap 95% interval of the median), and the median CPU-time ratio (blind to time "
        "lost to other processes).",
        "",
        "| loop | k=1: ratio | k=1: IQR | k=1: 95% CI | k=1: CPU "
        "| k=8: ratio | k=8: IQR | k=8: 95% CI | k=8: CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {LABELS['hand']} | {r1['hand_ms_per_microbatch']:.2f} ms per microbatch | | | "
        f"| {r8['hand_ms_per_microbatch']:.2f} ms per microbatch | | | |",
    ]
    for name in r1["tools"]:
        cells = []
        for part in (r1, r8):
            s, c = part["tools"][name]["ratio"], part["tools"][name]["cpu_ratio"]
            cells += [
                f"{s['median']:.3f}",
                _interval(s["iqr"]),
                _interval(s["ci95"]),
                f"{c['median']:.3f}",
            ]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Lightning Trainer, fixed cost per fit (a fit over {SHORT} microbatches less {SHORT} "
        "times the marginal cost per microbatch), ms, median [IQR]: tiny model "
        + ", ".join(_fixed(p) for p in (t1, t8))
        + "; small transformer "
        + ", ".join(_fixed(p) for p in (r1, r8))
        + ". Where the IQR spans 0 the fixed cost is below the noise of the difference of two "
        "fits, and the Trainer's marginal and whole-fit figures cannot be told apart.",
    ]
    disagree = [
        f"{label} k={part['steps']} {name} ({r['max_abs_param_diff_after_one_pass']:.2e})"
        for label, bench in (("tiny", tiny), ("transformer", tf))
        for part in bench.values()
        for name, r in part["tools"].items()
        if r["max_abs_param_diff_after_one_pass"] is not None
        and r["max_abs_param_diff_after_one_pass"] > results["agreement_tolerance"]
    ]
    largest = max(
        r["max_abs_param_diff_after_one_pass"] or 0.0
        for bench in (tiny, tf)
        for part in bench.values()
        for r in part["tools"].values()
    )
    if disagree:
        verdict = (
            "**DISAGREE**: " + "; ".join(disagree) + " (those timings compare different work)."
        )
    elif largest == 0:
        verdict = "every tool's are bit-identical to the hand loop's."
    else:
        verdict = f"all agree (largest |difference| {largest:.1e})."
    lines += ["", "Parameters after the first pass from identical models: " + verdict]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cores": _cores(),
        "torch_threads": torch.get_num_threads(),
    }


def _quiet() -> None:
    """Silence the tools' start-up chatter: Lightning's INFO lines ("GPU available: ...") and
    the warnings it gives about this setup on purpose (few batches, no workers, no logger)."""
    # lightning sets its loggers' levels when imported: import it before resetting them
    import lightning  # type: ignore[import-not-found,unused-ignore]
    from lightning.fabric.utilities.warnings import PossibleUserWarning  # type: ignore[import-not-found,unused-ignore]

    del lightning
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)

    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    # torch 2.13 deprecates a pytree idiom that lightning 2.6 still uses, once per fit
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args(argv)
    missing = [name for name in ("lightning", "accelerate") if not _importable(name)]
    if missing:
        print(
            f"bench_peers: cannot measure without {' and '.join(missing)}: "
            'pip install "lightning==2.6.6" "accelerate==1.15.0" (nox -s bench does)',
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(1)
    _quiet()
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/bench_peers.py" + (" --quick" if args.quick else ""),
        "environment": environment(),
        "agreement_tolerance": 1e-5,
    }
    print("tiny model ...", file=sys.stderr, flush=True)
    # full runs: whole Williams blocks (8 loops on the tiny model, 7 on the transformer)
    if args.quick:
        results["tiny"] = bench_tiny(reps=6, microbatches=80, warmup=2)
    else:
        results["tiny"] = bench_tiny(reps=40, microbatches=400, warmup=3)
    print("small transformer ...", file=sys.stderr, flush=True)
    if args.quick:
        results["transformer"] = bench_transformer(reps=3, microbatches=16, warmup=1)
    else:
        results["transformer"] = bench_transformer(reps=14, microbatches=16, warmup=2)
    results["torch_threads_at_end"] = torch.get_num_threads()
    results["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if results["torch_threads_at_end"] != 1:
        print(f"\nwarning: a tool changed torch's thread count to {torch.get_num_threads()}")
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
