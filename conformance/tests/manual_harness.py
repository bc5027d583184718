"""A hand-written accumulation loop implementing the spec with plain torch,
and broken variants of it with the bugs the anchors ship.

It deliberately does not use gradaccum-torch (nor the core's state machine):
it is a second, independent implementation of the spec, proving that the
suite accepts a correct loop, and — through the planted bugs — that it
rejects each known wrong one. Ranks are simulated in one process: one model
replica per rank, gradients averaged across replicas at the boundary as
DistributedDataParallel's all-reduce does, and those averages counted.

It keeps the promises the probes check: no host read off the boundary
(ACC-B3), one read at a boundary — the non-finite flag, with the window's
item count when counts are device tensors (ACC-B4) — and no buffer beside
``param.grad`` in the default configuration (ACC-P4).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradaccum import AccumulationStats, ClipPolicy, NonFiniteGradientError
from gradaccum_conformance import (
    CAPABILITIES,
    Harness,
    MicrobatchProbes,
    MicrobatchView,
    Scenario,
    Trajectory,
    TrajectoryRecorder,
)


class _Replica:
    """One rank's objects, fresh from the scenario's factories."""

    def __init__(self, scenario: Scenario) -> None:
        self.model = scenario.make_model().to(scenario.device)
        self.optimizer = scenario.make_optimizer(self.model)
        self.scheduler = scenario.make_scheduler(self.optimizer)
        self.scaler = scenario.make_scaler()
        self.named = list(self.model.named_parameters())
        self.params = [p for _, p in self.named]
        self.offloaded: list[Tensor | None] | None = None
        self.grad_copy: list[Tensor] = []  # only the KeepGradientCopy bug fills it

    def grads(self) -> list[Tensor | None]:
        if self.offloaded is not None:
            return list(self.offloaded)
        return [None if p.grad is None else p.grad.detach() for p in self.params]

    def set_grads(self, grads: list[Tensor | None]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()

    def nonfinite_flag(self) -> Tensor:
        """A 0-d float64 device tensor, 1 when some gradient holds inf or nan: no read."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return (~finite).to(torch.float64)

    def all_finite(self) -> bool:
        """One host read (the isolated microbatch of drop_microbatch reads it)."""
        return not bool(self.nonfinite_flag())

    def all_finite_per_parameter(self) -> bool:
        """The ReadPerParameterAtBoundary bug: one host read per parameter."""
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)

    def clip(self, clip: ClipPolicy, *, scaled: bool, factor: float = 1.0) -> None:
        # Gradients not yet unscaled by a GradScaler: scale the threshold instead.
        # ``factor`` maps a microbatch's mean-loss gradient to what backward produced.
        scale = float(self.scaler.get_scale()) if scaled and self.scaler is not None else 1.0
        scale *= factor
        if clip.mode == "norm":
            # torch's coefficient max / (norm + 1e-6), on the norm the threshold refers to.
            grads = [p.grad for p in self.params if p.grad is not None]
            # torch.nn.utils.get_total_norm spelled out: that function needs torch 2.6
            norms = torch.stack([torch.linalg.vector_norm(g, clip.norm_type) for g in grads])
            true_norm = torch.linalg.vector_norm(norms, clip.norm_type) / scale
            coef = torch.clamp(clip.max / (true_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        else:
            nn.utils.clip_grad_value_(self.params, clip.max * scale)


@dataclasses.dataclass
class _Counters:
    epoch: int = 0
    position: int = 0
    window_size: int = 0
    contributing: int = 0
    items_in_window: int = 0
    micro_steps: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    windows: int = 0
    dropped_microbatches: int = 0
    dropped_windows: int = 0
    items_total: int = 0
    reductions_in_window: int = 0


class ManualHarness(Harness):
    """The spec, by hand. Every capability is declared."""

    name = "manual-reference"
    capabilities = frozenset(CAPABILITIES)

    bug_short_window_full_k: ClassVar[bool] = False
    bug_items_mean_of_means: ClassVar[bool] = False
    bug_scheduler_per_microbatch: ClassVar[bool] = False
    bug_clip_per_microbatch: ClassVar[bool] = False
    bug_scheduler_on_skip: ClassVar[bool] = False
    bug_lose_inflight_on_resume: ClassVar[bool] = False
    bug_reduce_every_microbatch: ClassVar[bool] = False
    bug_log_loss_every_microbatch: ClassVar[bool] = False
    bug_read_per_parameter_at_boundary: ClassVar[bool] = False
    bug_keep_gradient_copy: ClassVar[bool] = False

    def run(self, scenario: Scenario, workdir: Path) -> Trajectory:
        return _ManualLoop(self, scenario, workdir).run()


class _ManualLoop:
    def __init__(self, harness: ManualHarness, scenario: Scenario, workdir: Path) -> None:
        self.h = harness
        self.s = scenario
        self.cfg = scenario.config
        self.workdir = workdir
        self.world = scenario.world_size
        isolate = self.cfg.isolates_microbatches
        if isolate and self.world > 1:
            raise NotImplementedError("the manual loop isolates microbatches on one rank only")
        self.ranks = [_Replica(scenario) for _ in range(self.world)]
        self.c = _Counters()
        first = self.ranks[0]
        group_of = {
            id(p): g
            for g, group in enumerate(first.optimizer.param_groups)
            for p in group["params"]
        }
        self.weights = self.cfg.weights.resolve(
            [n for n, _ in first.named],
            [group_of[id(p)] for p in first.params],
            [group.get("name") for group in first.optimizer.param_groups],
        )
        self.recorder = TrajectoryRecorder(first.model)
        self.device_items: Tensor | None = None  # the open window's device item count
        self.losses: list[float] = []  # only the LogLossEveryMicrobatch bug fills it

    def owners(self) -> list[object]:
        """What the memory probe ignores: every replica's model, optimizer and scaler."""
        out: list[object] = [self.recorder]
        for rank in self.ranks:
            out += [rank.model, rank.optimizer, rank.scaler]
        return out

    # -- the loop ----------------------------------------------------------------
    def run(self) -> Trajectory:
        views = [list(self.s.iter_microbatches(rank)) for rank in range(self.world)]
        with MicrobatchProbes(self.s, *self.owners()) as self.probes:
            for g in range(self.s.total_microbatches):
                step = [per_rank[g] for per_rank in views]
                windows = self.c.windows
                with self.probes.counting():
                    self.microbatch(step)
                    if step[0].is_last_in_pass:
                        self.end_pass()
                self.probes.record(self.recorder, boundary=self.c.windows > windows)
                if g == self.s.checkpoint_after:
                    self.checkpoint_and_resume()
                    self.probes.track(*self.owners())
        c = self.c
        stats = AccumulationStats(
            micro_steps=c.micro_steps,
            optimizer_steps=c.optimizer_steps,
            skipped_steps=c.skipped_steps,
            dropped_microbatches=c.dropped_microbatches,
            dropped_windows=c.dropped_windows,
            position=c.position,
            window_size=c.window_size,
            items_in_window=c.items_in_window,
            items_total=c.items_total,
            epoch=c.epoch,
            is_accumulating=c.position > 0,
            effective_batch_size=None,
            world_size=self.world,
        )
        return self.recorder.finish(stats, self.ranks[0].scheduler)

    def microbatch(self, step: list[MicrobatchView]) -> None:
        cfg, c, h = self.cfg, self.c, self.h
        first = step[0]
        if c.position == 0:
            c.window_size = cfg.schedule.steps(c.epoch, c.windows, {})
            if self.s.pass_length == "known" and cfg.partial_window == "step":
                c.window_size = min(c.window_size, first.remaining_in_pass)
        is_boundary = c.position + 1 >= c.window_size or (
            first.is_last_in_pass and cfg.partial_window == "step"
        )
        multiplier = 1.0 / c.window_size if cfg.normalization == "mean" else 1.0
        if h.bug_short_window_full_k and cfg.normalization == "mean":
            multiplier = 1.0 / cfg.schedule.steps(c.epoch, c.windows, {})
        isolate = cfg.isolates_microbatches
        kept = True
        for rank, view in zip(self.ranks, step, strict=True):
            if rank.offloaded is not None:
                rank.set_grads(rank.offloaded)
                rank.offloaded = None
            saved = rank.grads() if isolate else []
            if isolate:
                rank.set_grads([None] * len(rank.params))
            with self.s.autocast():
                loss = self.s.loss(rank.model(view.x), view.y)
            if h.bug_items_mean_of_means and cfg.normalization == "items":
                loss = loss / view.items
            loss = loss * multiplier
            if h.bug_log_loss_every_microbatch:
                self.losses.append(loss.item())  # "just logging": a host sync per microbatch
            scaled = loss if rank.scaler is None else rank.scaler.scale(loss)
            scaled.backward()  # type: ignore[no-untyped-call]
            if h.bug_scheduler_per_microbatch and rank.scheduler is not None:
                rank.scheduler.step()
            if h.bug_clip_per_microbatch and cfg.clip is not None:
                rank.clip(cfg.clip, scaled=True)
            if isolate:
                if cfg.non_finite == "drop_microbatch" and not rank.all_finite():
                    kept = False
                    rank.set_grads(saved)
                else:
                    if cfg.clip is not None and cfg.clip.per_microbatch:
                        # ACC-L2: clip the microbatch's mean-loss gradient to max.
                        per_item = view.items if cfg.normalization == "items" else 1
                        rank.clip(cfg.clip, scaled=True, factor=multiplier * per_item)
                    for p, old in zip(rank.params, saved, strict=True):
                        if old is not None and p.grad is not None:
                            p.grad.add_(old.to(p.grad.device))
            if cfg.offload and not is_boundary:
                rank.offloaded = [
                    None if g is None else g.to("cpu", copy=True) for g in rank.grads()
                ]
                rank.set_grads([None] * len(rank.params))
            if h.bug_keep_gradient_copy:
                # "for gradient-noise statistics": a parameter-sized copy, every microbatch
                rank.grad_copy = [g.detach().clone() for g in rank.grads() if g is not None]
        if h.bug_reduce_every_microbatch and self.world > 1:
            self._all_reduce()
        c.position += 1
        c.micro_steps += 1
        if kept:
            c.contributing += 1
            if self.s.items_on_device:
                # Every rank's device count, summed on the device (the simulated
                # all-reduce); read once, at the boundary.
                counts = [view.count for view in step]
                total = torch.stack([n.to(torch.float64) for n in counts if isinstance(n, Tensor)])
                total = total.sum()
                self.device_items = (
                    total if self.device_items is None else self.device_items + total
                )
            else:
                c.items_in_window += first.world_items
        else:
            c.dropped_microbatches += 1
        if is_boundary:
            self.close_window()

    def _all_reduce(self) -> None:
        """Average the gradients over the replicas (DDP's all-reduce), counted."""
        self.c.reductions_in_window += 1
        for i in range(len(self.ranks[0].params)):
            grads = [r.params[i].grad for r in self.ranks]
            if any(g is None for g in grads):
                continue
            mean = torch.stack([g for g in grads if g is not None]).mean(dim=0)
            for r in self.ranks:
                r.params[i].grad = mean.clone()

    def close_window(self) -> None:
        cfg, c, h = self.cfg, self.c, self.h
        reductions: int | None = None
        if self.world > 1:
            if not h.bug_reduce_every_microbatch:
                self._all_reduce()
            reductions = c.reductions_in_window
        device_items, self.device_items = self.device_items, None
        empty = c.contributing == 0 or (
            cfg.normalization == "items" and device_items is None and c.items_in_window == 0
        )
        multiplier: float | Tensor = 1.0
        if not empty and cfg.normalization == "mean":
            multiplier = c.window_size / c.contributing
            if h.bug_short_window_full_k:
                multiplier = 1.0
        elif not empty and cfg.normalization == "items":
            # The all-reduce averaged over ranks; undo it and divide by the world's items
            # (a device count divides on the device, unread).
            if device_items is not None:
                multiplier = self.world / (device_items + c.items_in_window).clamp(min=1.0)
            else:
                multiplier = self.world / c.items_in_window
            if h.bug_items_mean_of_means:
                multiplier = 1.0 / c.contributing
        for rank in self.ranks:
            if isinstance(multiplier, Tensor) or multiplier != 1.0:
                for p in rank.params:
                    if p.grad is not None:
                        p.grad.mul_(multiplier)
            if rank.scaler is not None:
                rank.scaler.unscale_(rank.optimizer)
        # The boundary's one host read: the non-finite flag, and the device item count.
        if h.bug_read_per_parameter_at_boundary:
            found_inf = not self.ranks[0].all_finite_per_parameter()
        else:
            pieces = [self.ranks[0].nonfinite_flag()]
            if device_items is not None:
                pieces.append(device_items.to(pieces[0].device))
            values = torch.stack(pieces).tolist()
            found_inf = values[0] > 0
            if device_items is not None:
                c.items_in_window += round(values[1])
                empty = empty or (cfg.normalization == "items" and c.items_in_window == 0)
        found_inf = found_inf and not empty
        amp_overflow = found_inf and self.ranks[0].scaler is not None
        stepped = False
        if empty or found_inf:
            if found_inf and not amp_overflow and cfg.non_finite == "raise":
                for rank in self.ranks:
                    rank.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteGradientError(f"window {c.windows} has a non-finite gradient")
            for rank in self.ranks:
                if rank.scaler is not None:
                    rank.scaler.update()
                if h.bug_scheduler_on_skip and rank.scheduler is not None:
                    rank.scheduler.step()
        else:
            for rank in self.ranks:
                boundary_clip = cfg.clip is not None and not cfg.clip.per_microbatch
                if cfg.clip is not None and boundary_clip and not h.bug_clip_per_microbatch:
                    rank.clip(cfg.clip, scaled=False)
                for p, weight in zip(rank.params, self.weights, strict=True):
                    if p.grad is not None and weight != 1.0:
                        p.grad.mul_(weight)
                # Under AMP the flag was read already: scaler.step would read it again.
                rank.optimizer.step()
                if rank.scaler is not None:
                    rank.scaler.update()
                if rank.scheduler is not None and not h.bug_scheduler_per_microbatch:
                    rank.scheduler.step()
            stepped = True
            c.items_total += c.items_in_window
        for rank in self.ranks:
            rank.optimizer.zero_grad(set_to_none=True)
        c.optimizer_steps += stepped
        c.skipped_steps += not stepped
        c.windows += 1
        first = self.ranks[0]
        with self.probes.paused():
            self.recorder.window(
                first.model, first.optimizer, stepped=stepped, reductions=reductions
            )
        c.position = c.window_size = c.contributing = c.items_in_window = 0
        c.reductions_in_window = 0

    def end_pass(self) -> None:
        c = self.c
        if c.position > 0 and self.cfg.partial_window == "drop":
            self.device_items = None
            for rank in self.ranks:
                rank.offloaded = None
                rank.optimizer.zero_grad(set_to_none=True)
            c.position = c.window_size = c.contributing = c.items_in_window = 0
            c.reductions_in_window = 0
            c.dropped_windows += 1
        # "carry" keeps the open window; under "step" the last microbatch closed it.
        c.epoch += 1

    # -- checkpoint --------------------------------------------------------------
    def checkpoint_and_resume(self) -> None:
        path = self.workdir / "manual-checkpoint.pt"
        state: dict[str, Any] = {
            "counters": dataclasses.asdict(self.c),
            "device_items": None if self.device_items is None else self.device_items.cpu(),
            "ranks": [],
        }
        for rank in self.ranks:
            grads = (
                {}
                if self.h.bug_lose_inflight_on_resume
                else {str(i): g.detach().cpu() for i, g in enumerate(rank.grads()) if g is not None}
            )
            state["ranks"].append(
                {
                    "model": rank.model.state_dict(),
                    "optimizer": rank.optimizer.state_dict(),
                    "scheduler": None if rank.scheduler is None else rank.scheduler.state_dict(),
                    "scaler": None if rank.scaler is None else rank.scaler.state_dict(),
                    "grads": grads,
                    "offloaded": rank.offloaded is not None,
                }
            )
        torch.save(state, path)
        # A fresh process state: every object rebuilt from the factories.
        del self.ranks
        self.ranks = [_Replica(self.s) for _ in range(self.world)]
        loaded = torch.load(path, weights_only=True)
        self.c = _Counters(**loaded["counters"])
        device_items = loaded["device_items"]
        self.device_items = None if device_items is None else device_items.to(self.s.device)
        for rank, saved in zip(self.ranks, loaded["ranks"], strict=True):
            rank.model.load_state_dict(saved["model"])
            rank.optimizer.load_state_dict(saved["optimizer"])
            if rank.scheduler is not None:
                rank.scheduler.load_state_dict(saved["scheduler"])
            if rank.scaler is not None:
                rank.scaler.load_state_dict(saved["scaler"])
            inflight: list[Tensor | None] = [
                saved["grads"].get(str(i)) for i in range(len(rank.params))
            ]
            rank.set_grads(inflight)
            if saved["offloaded"]:
                rank.offloaded = [None if g is None else g.cpu() for g in inflight]
                rank.set_grads([None] * len(rank.params))


# -- the broken variants: each plants one bug the anchors ship --------------------------
class ShortWindowFullK(ManualHarness):
    """(1) A short last window is divided by the full window size
    (Accelerate; Lightning issue 19987)."""

    name = "broken-short-window-full-k"
    bug_short_window_full_k = True


class ItemsMeanOfMeans(ManualHarness):
    """(2) In items mode, each microbatch is averaged over its own items and the
    window averages microbatch means."""

    name = "broken-items-mean-of-means"
    bug_items_mean_of_means = True


class SchedulerPerMicrobatch(ManualHarness):
    """(3) The LR scheduler is stepped after every microbatch."""

    name = "broken-scheduler-per-microbatch"
    bug_scheduler_per_microbatch = True


class ClipPerMicrobatch(ManualHarness):
    """(4) clip_grad_norm_ after every backward instead of once at the boundary."""

    name = "broken-clip-per-microbatch"
    bug_clip_per_microbatch = True


class SchedulerOnSkip(ManualHarness):
    """(5) The scheduler steps even when the optimizer step was skipped
    (Lightning issue 5558)."""

    name = "broken-scheduler-on-skip"
    bug_scheduler_on_skip = True


class LoseInflightOnResume(ManualHarness):
    """(6) The gradients accumulated before a mid-window checkpoint are lost
    (Accelerate, DeepSpeed)."""

    name = "broken-lose-inflight-on-resume"
    bug_lose_inflight_on_resume = True


class ReduceEveryMicrobatch(ManualHarness):
    """(7) Gradients are all-reduced after every microbatch, not only at the
    boundary (exact, but pays a communication per microbatch)."""

    name = "broken-reduce-every-microbatch"
    bug_reduce_every_microbatch = True


class LogLossEveryMicrobatch(ManualHarness):
    """(8) The loss is logged with ``loss.item()`` after every microbatch: a host
    sync on every microbatch (Composer syncs the host every batch)."""

    name = "broken-log-loss-every-microbatch"
    bug_log_loss_every_microbatch = True


class ReadPerParameterAtBoundary(ManualHarness):
    """(9) The boundary checks each parameter's gradient for inf/nan with its own
    ``bool(...)``: one host read per parameter instead of one fused read."""

    name = "broken-read-per-parameter-at-boundary"
    bug_read_per_parameter_at_boundary = True


class KeepGradientCopy(ManualHarness):
    """(10) A copy of the accumulated gradient is kept after every microbatch
    (for gradient statistics): a parameter-sized buffer beside ``param.grad``."""

    name = "broken-keep-gradient-copy"
    bug_keep_gradient_copy = True
