"""Comparing a harness's trajectory with the expected one.

Every failure names the promise that broke, the parameter, the window
(optimizer step attempt), and the deviation: the largest absolute difference
and that difference relative to the largest expected magnitude of the tensor,
``max|a - b| / max|b|``, which is what the tolerance bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradaccum_conformance.harness import Trajectory
from gradaccum_conformance.promises import PROMISES
from gradaccum_conformance.scenario import Precision, Scenario

__all__ = [
    "LR_TOLERANCE",
    "TOLERANCES",
    "BrokenPromiseError",
    "assert_trajectory",
    "deviation",
]

TOLERANCES: Mapping[Precision, float] = {
    "float64": 1e-12,
    "float32": 1e-5,
    # bf16 is compared with the same harness's float32 run, not with float64.
    "bf16": 5e-2,
    # fp16 autocast with a GradScaler, compared with the float64 reference.
    "fp16": 1e-2,
}
"""Bound on ``max|a - b| / max|b|`` per parameter tensor, by precision."""

LR_TOLERANCE = 1e-12
"""Learning rates are host floats: relative tolerance whatever the precision."""


class BrokenPromiseError(AssertionError):
    """A promise of the spec is broken; the message says which and by how much."""

    def __init__(self, promises: Sequence[str], message: str) -> None:
        self.promises = tuple(promises)
        head = "\n".join(f"  {p}: {PROMISES.get(p, 'unknown promise')}" for p in self.promises)
        super().__init__(f"promise broken ({', '.join(self.promises)}):\n{head}\n{message}")


def deviation(actual: Tensor, expected: Tensor) -> tuple[float, float]:
    """``(max |a - b|, max |a - b| / max |b|)``; a non-finite difference is ``inf``."""
    a = actual.to(torch.float64)
    b = expected.to(torch.float64)
    diff = (a - b).abs()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, math.inf))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(b.abs().nan_to_num(0.0).max()) if b.numel() else 0.0
    if max_abs == 0.0:
        return 0.0, 0.0
    return max_abs, max_abs / max(scale, 1e-300)


@dataclass(frozen=True)
class _Context:
    harness: str
    scenario: Scenario
    against: str

    def where(self) -> str:
        return (
            f"  harness {self.harness!r}; {self.scenario.describe()}\n"
            f"  compared with {self.against}"
        )


def _close(a: float, b: float, rtol: float) -> bool:
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def assert_trajectory(
    actual: Trajectory,
    expected: Trajectory,
    *,
    tol: float,
    promises: Sequence[str],
    harness: str,
    scenario: Scenario,
    against: str = "the float64 large-batch reference",
    check_stats: bool = True,
) -> None:
    """Raise `BrokenPromiseError` at the first difference that matters.

    Checked in this order, each blamed on its promise: window outcomes
    (the test's promises and ACC-S1), learning rates and scheduler steps
    (ACC-S3, ACC-S3), parameters after every window (the test's promises;
    ``tol`` bounds ``max|a-b|/max|b|``, ``tol=0`` demands bitwise equality),
    counters (ACC-C3), stats (ACC-C2) and reductions (ACC-D1).
    """
    ctx = _Context(harness, scenario, against)
    own = tuple(promises)
    if not isinstance(actual, Trajectory):
        raise TypeError(
            f"harness {harness!r} returned {type(actual).__name__}, not a "
            f"gradaccum_conformance.Trajectory"
        )
    if set(actual.initial_params) != set(expected.initial_params):
        raise BrokenPromiseError(
            own,
            f"{ctx.where()}\n  the harness reported parameters {sorted(actual.initial_params)}; "
            f"the scenario's model has {sorted(expected.initial_params)} "
            f"(strip framework prefixes: snapshot_params(model, prefix=...))",
        )
    for name, value in expected.initial_params.items():
        if deviation(actual.initial_params[name], value)[1] > max(tol, 1e-7):
            raise BrokenPromiseError(
                own,
                f"{ctx.where()}\n  parameter {name!r} before the first step differs: the harness "
                f"did not start from scenario.make_model()",
            )

    if actual.outcomes != expected.outcomes:
        raise BrokenPromiseError(
            (*own, "ACC-S1"),
            f"{ctx.where()}\n  window outcomes differ ({len(actual.outcomes)} closed windows, "
            f"expected {len(expected.outcomes)}):\n    harness:  {actual.outcomes}\n"
            f"    expected: {expected.outcomes}",
        )
    if expected.scheduler_steps is not None and actual.scheduler_steps != expected.scheduler_steps:
        raise BrokenPromiseError(
            ("ACC-S3",),
            f"{ctx.where()}\n  the LR scheduler stepped {actual.scheduler_steps} times; "
            f"expected {expected.scheduler_steps} (once per optimizer step, outcomes "
            f"{expected.outcomes})",
        )
    if len(actual.lrs) != len(expected.lrs) or len(actual.params) != len(expected.params):
        raise TypeError(
            f"harness {harness!r}: a Trajectory needs one entry of params and lrs per outcome; "
            f"got {len(actual.params)} params, {len(actual.lrs)} lrs, {len(actual.outcomes)} "
            f"outcomes (use TrajectoryRecorder.window)"
        )
    for w, (lr_a, lr_e) in enumerate(zip(actual.lrs, expected.lrs, strict=True)):
        if len(lr_a) != len(lr_e) or not all(
            _close(a, e, LR_TOLERANCE) for a, e in zip(lr_a, lr_e, strict=True)
        ):
            raise BrokenPromiseError(
                ("ACC-S3",),
                f"{ctx.where()}\n  learning rate after window {w} ({expected.outcomes[w]}) is "
                f"{list(lr_a)}, expected {list(lr_e)}: the scheduler stepped at the wrong time",
            )
    for w, (p_a, p_e) in enumerate(zip(actual.params, expected.params, strict=True)):
        bad: list[str] = []
        for name, value in p_e.items():
            if name not in p_a:
                bad.append(f"    {name!r}: missing from the harness's snapshot")
                continue
            max_abs, rel = deviation(p_a[name], value)
            broken = max_abs != 0.0 if tol == 0.0 else not rel <= tol
            if broken:
                bad.append(
                    f"    {name!r}: max abs deviation {max_abs:.3e}, "
                    f"max|a-b|/max|b| {rel:.3e} > tolerance {tol:.1e}"
                )
        if bad:
            later = sum(
                1
                for a, e in zip(actual.params[w + 1 :], expected.params[w + 1 :], strict=True)
                if any(
                    (deviation(a[n], e[n])[0] != 0.0)
                    if tol == 0.0
                    else not deviation(a[n], e[n])[1] <= tol
                    for n in e
                    if n in a
                )
            )
            raise BrokenPromiseError(
                own,
                f"{ctx.where()}\n  parameters after window {w} (optimizer step attempt {w}, "
                f"{expected.outcomes[w]}) deviate:\n" + "\n".join(bad) + f"\n  ({later} later "
                f"windows also deviate)",
            )
    if not check_stats:
        return
    for counter in ("micro_steps", "optimizer_steps", "skipped_steps"):
        got, want = getattr(actual, counter), getattr(expected, counter)
        if got != want:
            raise BrokenPromiseError(
                ("ACC-C3",),
                f"{ctx.where()}\n  counter {counter} = {got}, expected {want}",
            )
    _check_stats(actual.stats, expected.stats, ctx)
    if expected.reductions_per_window is not None and (
        actual.reductions_per_window != expected.reductions_per_window
    ):
        raise BrokenPromiseError(
            ("ACC-D1",),
            f"{ctx.where()}\n  gradient reductions per window {actual.reductions_per_window}, "
            f"expected {expected.reductions_per_window} (one, at the boundary)",
        )


STATS_KEYS = (
    "micro_steps",
    "optimizer_steps",
    "skipped_steps",
    "dropped_microbatches",
    "dropped_windows",
    "epoch",
    "position",
    "is_accumulating",
    "items_total",
)
"""The stats the suite checks (when the expected trajectory has them)."""


def _check_stats(actual: Mapping[str, Any], expected: Mapping[str, Any], ctx: _Context) -> None:
    problems: list[str] = []
    for key in STATS_KEYS:
        if key not in expected:
            continue
        want = expected[key]
        if key not in actual:
            problems.append(f"    {key}: missing (expected {want!r})")
        elif actual[key] != want:
            problems.append(f"    {key} = {actual[key]!r}, expected {want!r}")
    if "effective_step" in actual and actual["effective_step"] != expected.get("optimizer_steps"):
        problems.append(
            f"    effective_step = {actual['effective_step']!r}, expected the optimizer steps "
            f"{expected.get('optimizer_steps')!r}"
        )
    if problems:
        raise BrokenPromiseError(
            ("ACC-C2",),
            f"{ctx.where()}\n  final stats differ:\n" + "\n".join(problems),
        )
