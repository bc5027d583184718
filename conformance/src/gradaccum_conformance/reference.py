"""The float64 large-batch reference: what the spec says a run must do.

Written as straight-line code to be checked by eye. For each window it builds
one large batch from the window's microbatches (all ranks), weights every
item so that one backward gives exactly the window gradient the spec
defines, then applies the non-finite policy, clipping, gradient weights, the
optimizer and the scheduler — once. Nothing here accumulates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradaccum import AdaptiveMicrobatch, NonFiniteGradientError
from gradaccum_conformance.harness import Trajectory, TrajectoryRecorder
from gradaccum_conformance.scenario import Microbatch, Scenario

__all__ = ["ReferenceRun", "WindowPlan", "plain_loop_trajectory", "plan_windows", "run_reference"]


@dataclass
class WindowPlan:
    """Which microbatches (global indices) form each closed window."""

    windows: list[list[int]] = field(default_factory=list)
    dropped_windows: int = 0
    left_open: list[int] = field(default_factory=list)


@dataclass
class ReferenceRun:
    """The reference trajectory and facts a test can use to check that its
    scenario has teeth (clipping really clipped, a microbatch really dropped)."""

    trajectory: Trajectory
    plan: WindowPlan
    clipped: list[bool]
    dropped_microbatches: list[int]


def plan_windows(scenario: Scenario) -> WindowPlan:
    """Cut the passes into windows as the schedule and the partial-window
    policy say. A window's size is fixed when it opens, from the epoch it
    opens in and the number of windows closed before it."""
    config = scenario.config
    if isinstance(config.schedule, AdaptiveMicrobatch):
        raise NotImplementedError("the reference does not model AdaptiveMicrobatch")
    plan = WindowPlan()
    open_window: list[int] = []
    size = 0
    global_index = 0
    for epoch, pass_ in enumerate(scenario.passes):
        for _ in pass_:
            if not open_window:
                size = config.schedule.steps(epoch, len(plan.windows), {})
            open_window.append(global_index)
            global_index += 1
            if len(open_window) == size:
                plan.windows.append(open_window)
                open_window = []
        if open_window and config.partial_window == "step":
            plan.windows.append(open_window)
            open_window = []
        elif open_window and config.partial_window == "drop":
            plan.dropped_windows += 1
            open_window = []
        # "carry": the open window continues into the next pass.
    plan.left_open = open_window
    return plan


def _window_loss(scenario: Scenario, model: nn.Module, microbatches: list[Microbatch]) -> Tensor:
    """The loss whose gradient is the window gradient of the spec.

    One forward over the concatenated large batch; item ``j`` of a shard
    with ``n`` items gets the weight below (``C`` contributing microbatches,
    ``W`` ranks, ``N`` items in the window over all ranks):

    * ``items``: ``1 / N`` — the item mean of the large batch;
    * ``mean``:  ``1 / (C · W · n)`` — the mean of microbatch means
      (ranks averaged as data parallelism does);
    * ``sum``:   ``1 / (W · n)`` for mean losses, ``1 / W`` for summed ones.
    """
    normalization = scenario.config.normalization
    world = scenario.world_size
    contributing = len(microbatches)
    total_items = sum(mb.items for mb in microbatches)
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    weights: list[Tensor] = []
    for mb in microbatches:
        for shard in mb.shards:
            n = shard.items
            if normalization == "items":
                w = 1.0 / total_items
            elif normalization == "mean":
                w = 1.0 / (contributing * world * n)
            elif scenario.loss_reduction == "mean":
                w = 1.0 / (world * n)
            else:
                w = 1.0 / world
            xs.append(shard.x)
            ys.append(shard.y)
            weights.append(torch.full((n,), w, dtype=torch.float64))
    x, y, item_weight = torch.cat(xs), torch.cat(ys), torch.cat(weights)
    per_item_loss = ((model(x) - y) ** 2).sum(dim=-1)
    loss: Tensor = (item_weight * per_item_loss).sum()
    return loss


def _all_finite(params: list[nn.Parameter]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def run_reference(scenario: Scenario) -> ReferenceRun:
    """Run ``scenario`` as the spec defines it, in float64 on the CPU."""
    config = scenario.config
    clip = config.clip
    if clip is not None and clip.per_microbatch and scenario.world_size != 1:
        raise NotImplementedError("the reference pins per-microbatch clipping on one rank")
    model = scenario.make_model().to(torch.float64)
    names = [name for name, _ in model.named_parameters()]
    params = [param for _, param in model.named_parameters()]
    optimizer = scenario.make_optimizer(model)
    scheduler = scenario.make_scheduler(optimizer)
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    weights = config.weights.resolve(
        names,
        [group_of[id(p)] for p in params],
        [group.get("name") for group in optimizer.param_groups],
    )
    microbatches = [mb for pass_ in scenario.passes for mb in pass_]
    plan = plan_windows(scenario)

    # drop_microbatch: a microbatch whose own gradient is non-finite is left out.
    finite_alone = [True] * len(microbatches)
    if config.non_finite == "drop_microbatch":
        for i, mb in enumerate(microbatches):
            model.zero_grad(set_to_none=True)
            _window_loss(scenario, model, [mb]).backward()  # type: ignore[no-untyped-call]
            finite_alone[i] = _all_finite(params)
        model.zero_grad(set_to_none=True)

    recorder = TrajectoryRecorder(model)
    clipped: list[bool] = []
    items_total = 0
    for w, window in enumerate(plan.windows):
        kept = [microbatches[i] for i in window if finite_alone[i]]
        optimizer.zero_grad(set_to_none=True)
        was_clipped = False
        if kept and clip is not None and clip.per_microbatch:
            # ACC-L2: each microbatch's own mean-loss gradient is clipped to
            # max, then the clipped gradients combine as the normalization
            # says: mean 1/c each, items n_j/N each, sum 1 each.
            total = [torch.zeros_like(p) for p in params]
            kept_items = sum(mb.items for mb in kept)
            for mb in kept:
                model.zero_grad(set_to_none=True)
                _window_loss(scenario, model, [mb]).backward()  # type: ignore[no-untyped-call]
                if clip.mode == "norm":
                    norm = nn.utils.clip_grad_norm_(params, clip.max, norm_type=clip.norm_type)
                    was_clipped = was_clipped or float(norm) > clip.max
                else:
                    was_clipped = was_clipped or any(
                        bool((p.grad.abs() > clip.max).any()) for p in params if p.grad is not None
                    )
                    nn.utils.clip_grad_value_(params, clip.max)
                if config.normalization == "mean":
                    share = 1.0 / len(kept)
                elif config.normalization == "items":
                    share = mb.items / kept_items
                else:
                    share = 1.0
                for acc, p in zip(total, params, strict=True):
                    assert p.grad is not None
                    acc.add_(p.grad, alpha=share)
            for acc, p in zip(total, params, strict=True):
                p.grad = acc
        elif kept:
            _window_loss(scenario, model, kept).backward()  # type: ignore[no-untyped-call]

        stepped = False
        if not kept or w in scenario.amp_overflow_windows:
            pass  # empty window, or the GradScaler overflows here: skip
        elif not _all_finite(params):
            if config.non_finite == "raise":
                raise NonFiniteGradientError(f"window {w} has a non-finite gradient")
            # "skip": no optimizer step, no scheduler step
        else:
            if clip is not None and not clip.per_microbatch:
                if clip.mode == "norm":
                    norm = nn.utils.clip_grad_norm_(params, clip.max, norm_type=clip.norm_type)
                    was_clipped = float(norm) > clip.max
                else:
                    was_clipped = any(
                        bool((p.grad.abs() > clip.max).any()) for p in params if p.grad is not None
                    )
                    nn.utils.clip_grad_value_(params, clip.max)
            for p, weight in zip(params, weights, strict=True):
                if p.grad is not None and weight != 1.0:
                    p.grad.mul_(weight)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            stepped = True
            items_total += sum(mb.items for mb in kept)
        clipped.append(was_clipped)
        recorder.window(
            model, optimizer, stepped=stepped, reductions=1 if scenario.world_size > 1 else None
        )
    optimizer.zero_grad(set_to_none=True)

    outcomes = recorder.trajectory.outcomes
    stats: dict[str, Any] = {
        "micro_steps": len(microbatches),
        "optimizer_steps": outcomes.count("stepped"),
        "skipped_steps": outcomes.count("skipped"),
        "dropped_microbatches": finite_alone.count(False),
        "dropped_windows": plan.dropped_windows,
        "epoch": len(scenario.passes),
        "position": len(plan.left_open),
        "is_accumulating": bool(plan.left_open),
    }
    if config.normalization == "items" and scenario.world_size == 1:
        stats["items_total"] = items_total
    trajectory = recorder.finish(stats, scheduler)
    return ReferenceRun(
        trajectory=trajectory,
        plan=plan,
        clipped=clipped,
        dropped_microbatches=[i for i, ok in enumerate(finite_alone) if not ok],
    )


def plain_loop_trajectory(scenario: Scenario, expected_stats: dict[str, Any]) -> Trajectory:
    """A plain loop without accumulation (one optimizer step per microbatch)
    in the scenario's own precision and device: the ``steps=1`` baseline."""
    model = scenario.make_model().to(scenario.device)
    optimizer = scenario.make_optimizer(model)
    scheduler = scenario.make_scheduler(optimizer)
    scaler = scenario.make_scaler()
    recorder = TrajectoryRecorder(model)
    for view in scenario.iter_microbatches():
        optimizer.zero_grad(set_to_none=True)
        with scenario.autocast():
            loss = scenario.loss(model(view.x), view.y)
        stepped = True
        if scaler is None:
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale
        if stepped and scheduler is not None:
            scheduler.step()
        recorder.window(model, optimizer, stepped=stepped)
    return recorder.finish(expected_stats, scheduler)
