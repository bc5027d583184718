"""The boundary: what happens to a window's gradient when it closes.

`close_window` reads in the order of spec ACC-B1 — sync, normalize,
unscale, check, clip, weights, commit, step, zero — and makes at most one
device-to-host read (ACC-B3 is the other side: nothing of this runs on other
microbatches). That one read carries everything the host must know: the
non-finite flag (the scaler's found-inf under AMP, the clip norm when
clipping by norm, else one fused check), and when the boundary exchanged
anything with the other ranks, the world item count, the bad-count flag and
every rank's position (one collective for all three, ACC-D3, ACC-D5).

A failure before the commit (a bad device item count, ranks out of step, an
exception from a collective) discards the window — gradients zeroed, the
core's `abandon` — so the accumulator is
never left stuck at a boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradaccum.errors import DistributedError, NonFiniteGradientError, UsageError
from gradaccum.lockstep import ROW, describe, window_row
from gradaccum.machine import AccumulationMachine
from gradaccum.state import Outcome, WindowDecision
from gradaccum_torch import grads as G
from gradaccum_torch.contract import Distributed, Framework
from gradaccum_torch.gradients import GradientStore
from gradaccum_torch.items import ItemCounter, bad_count_error

if TYPE_CHECKING:
    from gradaccum_torch.accumulator import Accumulator

__all__ = ["NOT_A_BOUNDARY", "BackwardResult", "close_window", "exchange_row", "positions"]

EXCHANGE_WIDTH = 2 + ROW
"""Every row ranks exchange has this many float64 entries: the item count,
the bad-count flag, then a `gradaccum.lockstep` row padded with zeros. One
width for every exchange, so that ranks out of step still pair their
collectives and can say where each one was."""


def exchange_row(
    row: Sequence[int],
    device: torch.device,
    local: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float64 row this rank sends (see `EXCHANGE_WIDTH`); ``local`` and
    ``bad`` are 0-d float64 device tensors (zeros when not given)."""
    padded = torch.tensor(
        [0.0, 0.0, *row, *([0] * (ROW - len(row)))], dtype=torch.float64, device=device
    )
    if local is None or bad is None:
        return padded
    return torch.cat([torch.stack([local, bad]), padded[2:]])


def positions(rows: Sequence[Sequence[float]]) -> list[list[int]]:
    """The `gradaccum.lockstep` part of exchanged rows, as ints."""
    return [[int(v) for v in row[2:]] for row in rows]


@dataclass(frozen=True, slots=True)
class BackwardResult:
    """What one `backward` call did.

    Attributes:
        boundary: the microbatch closed its window.
        stepped: the optimizer (and scheduler) stepped.
        outcome: at a boundary, the core's verdict: ``"stepped"``,
            ``"amp_overflow"``, ``"non_finite"`` or ``"empty"``; ``None``
            on other microbatches.
        window_items: at a boundary, the window's item count: over all
            ranks as a 0-d float64 device tensor when the boundary exchanged
            counts (``items`` with device counts or several ranks; read it
            only when you need it: reading is a host sync), else this rank's
            host count as an ``int`` (0 when no counts were given). ``None``
            on other microbatches.
        grad_norm: the pre-clip total gradient norm as a 0-d device tensor,
            when the boundary computed one (clipping by norm, or
            ``track_grad_norm=True``), else ``None``.

    Truthy exactly when the optimizer stepped, so ``if acc.backward(loss):``
    reads as "if a step was taken".
    """

    boundary: bool
    stepped: bool
    outcome: Outcome | None = None
    window_items: int | torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return self.stepped


NOT_A_BOUNDARY = BackwardResult(boundary=False, stepped=False)
"""The result of every microbatch that does not close its window."""


def close_window(
    acc: Accumulator,
    window: WindowDecision,
    *,
    machine: AccumulationMachine,
    store: GradientStore,
    items: ItemCounter,
    framework: Framework,
    distributed: Distributed,
    weighted: Sequence[tuple[float, Sequence[torch.nn.Parameter]]],
    before_step: Sequence[Callable[[Accumulator], None]],
    track_grad_norm: bool = False,
) -> BackwardResult:
    """Close ``window`` (ACC-B1) and return what happened. See the module docstring."""
    scaler = framework.scaler
    unscaled = False
    try:
        grads = store.window_gradients()
        device = grads[0].device if grads else torch.device("cpu")

        # (1) sync: one reduction when no backward of the window communicated.
        if window.needs_manual_sync:
            distributed.reduce_gradients(grads)

        # (2) normalize; the window's one exchange with the other ranks, if any.
        world_total: torch.Tensor | None = None
        gathered: torch.Tensor | None = None
        if window.check_ranks or window.divide_by_world_items:
            local, bad = items.local(device, window.items)
            state_row = window_row(machine.state, window) if window.check_ranks else []
            row = exchange_row(state_row, device, local, bad)
            gathered = (
                distributed.all_gather(row) if distributed.world_size > 1 else row.unsqueeze(0)
            )
            world_total = gathered[:, 0].sum()
        if window.divide_by_world_items and world_total is not None:
            # The count is a device scalar: the division happens on the device, unread.
            G.scale_(grads, window.grad_multiplier / world_total.clamp(min=1.0))
        else:
            G.scale_(grads, window.grad_multiplier)
        final = store.finish()

        # (3) unscale, unless the framework's step does it (then work in the scaled domain).
        scale: torch.Tensor | None = None
        found: torch.Tensor | None = None
        if scaler is not None:
            if framework.scaled_boundary:
                scale = scaler._scale
            else:
                try:
                    scaler.unscale_(framework.optimizer)
                except RuntimeError as exc:
                    if "already been called" not in str(exc):
                        raise
                    unscaled = True  # someone did: the failure path lets the scaler update
                    raise UsageError(
                        "the GradScaler was unscaled since its last update by someone else "
                        "(scaler.unscale_, or a framework's clip_grad_norm_ such as "
                        "accelerator.clip_grad_norm_ after the boundary): remove that call and "
                        "clip with clip=ClipPolicy(...), which gradaccum applies once per window "
                        "after its own unscale"
                    ) from exc
                unscaled = True
                per_device = list(scaler._found_inf_per_device(framework.optimizer).values())
                if per_device:
                    found = torch.stack([f.to(device).reshape(()) for f in per_device]).sum()

        # (4) check: the host learns everything in one read.
        clip = window.clip
        norm: torch.Tensor | None = None
        flag: torch.Tensor | None = None
        if not window.empty and final:
            by_norm = clip is not None and clip.mode == "norm"
            if by_norm or track_grad_norm:
                norm = G.total_norm(final, clip.norm_type if clip is not None and by_norm else 2.0)
                flag = ~torch.isfinite(norm)
            elif found is not None:
                flag = found
            else:
                flag = G.nonfinite_flag(final)
        values: list[float] = []
        if gathered is None:
            if flag is not None:
                values = [float(flag.item())]  # the default path: one scalar
        else:
            pieces = [gathered.reshape(-1)]
            if flag is not None:
                pieces.insert(0, flag.to(torch.float64).reshape(1))
            values = torch.cat(pieces).tolist()
        nonfinite = flag is not None and values[0] > 0
        world_items: int | None = None
        if gathered is not None:
            ranks, width = gathered.shape
            start = 0 if flag is None else 1
            rows = [values[start + r * width : start + (r + 1) * width] for r in range(ranks)]
            where = positions(rows)
            if any(p != where[0] for p in where):
                raise DistributedError(describe(where))
            bad_flags = [row[1] for row in rows]
            total = math.fsum(row[0] for row in rows)
            if any(b > 0 for b in bad_flags) or not math.isfinite(total):
                raise bad_count_error(bad_flags)
            if window.divide_by_world_items:
                world_items = round(total)

        # (5) clip and (6) weights: the final gradient, unless it is not finite.
        true_norm: torch.Tensor | None = None
        if norm is not None:
            true_norm = norm if scale is None else norm / scale.to(norm.device).reshape(())
        if clip is not None and not nonfinite and not window.empty:
            G.clip_(final, clip, norm=norm if clip.mode == "norm" else None, scale=scale)
        if window.apply_weights and not nonfinite:
            for weight, params in weighted:
                G.scale_([p.grad for p in params if p.grad is not None], weight)
    except BaseException:
        # Nothing was committed: drop the window, keep the accumulator usable.
        store.zero()
        items.clear()
        if unscaled:
            framework.skip_step()  # the scaler recorded an unscale: let it update
        machine.abandon()
        raise

    # (7) commit.
    verdict = machine.commit(
        found_inf=nonfinite and scaler is None,
        amp_overflow=nonfinite and scaler is not None,
        world_items=world_items,
        grad_norm=true_norm,
        notify=False,
    )
    # (8) step, then (9) zero, whatever happens in between.
    try:
        if verdict.step_optimizer:
            for hook in before_step:
                hook(acc)
            framework.step_optimizer()
        elif unscaled or (scaler is not None and framework.scaled_boundary):
            framework.skip_step()
        if verdict.step_scheduler:
            framework.step_scheduler()
    finally:
        store.zero()
        items.clear()
        # Listeners hear of the window once its step (or skip) is done (ACC-S3 order).
        machine.notify_commit()
    if verdict.raise_error:
        raise NonFiniteGradientError(
            f"the gradient of window {machine.state.windows} holds inf or nan; the step was "
            f"skipped and the gradients zeroed. Use non_finite='skip' to continue silently "
            f"or 'drop_microbatch' to leave out only the bad microbatch"
        )
    window_items: int | torch.Tensor = window.items
    if world_total is not None and window.divide_by_world_items:
        window_items = world_total
    return BackwardResult(
        boundary=True,
        stepped=verdict.step_optimizer,
        outcome=verdict.outcome,
        window_items=window_items,
        grad_norm=true_norm,
    )
