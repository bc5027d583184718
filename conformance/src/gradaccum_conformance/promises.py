"""The promises the suite checks and the capabilities a harness may declare.

``PROMISES`` is the one table of spec IDs (``spec/accumulation.md``): every
test cites IDs from it, failure messages quote it, the JSON report lists it.
Renumbering the spec means editing this table and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["CAPABILITIES", "PROMISES", "describe"]

PROMISES: Mapping[str, str] = MappingProxyType(
    {
        # Windows (spec ACC-W)
        "ACC-W2": "a full window's update equals the update of one large batch of its microbatches",
        "ACC-W3": "partial_window='step': a pass ending inside a window steps it exactly, "
        "as the large batch of the microbatches it holds (never scaled by 1/k)",
        "ACC-W5": "partial_window='drop': a pass ending inside a window discards it; "
        "its gradient never reaches a later window",
        "ACC-W6": "partial_window='carry': a window open at the end of a pass continues "
        "into the next pass and is exact",
        # Normalization (ACC-N)
        "ACC-N1": "normalization='mean': the window gradient is the mean of the microbatch "
        "(mean-loss) gradients over the microbatches that contributed",
        "ACC-N2": "normalization='items': the window gradient is the sum of per-item loss "
        "gradients divided by the window's total item count (over all ranks)",
        "ACC-N4": "normalization='sum': the window gradient is the sum of microbatch gradients",
        "ACC-N7": "steps=1 is bitwise identical to a plain loop without accumulation",
        # The boundary (ACC-B)
        "ACC-B1": "at a boundary: normalize, unscale, check non-finite, clip, weight, step — "
        "in that order, once per window",
        "ACC-B3": "a microbatch that is not a boundary makes no host sync (no device-to-host read)",
        "ACC-B4": "a boundary makes at most one device-to-host read",
        # Optimizer and scheduler steps (ACC-S)
        "ACC-S1": "the optimizer steps exactly once per closed window that is not skipped",
        "ACC-S3": "the LR scheduler steps once per successful optimizer step: never per "
        "microbatch, never when the step is skipped",
        # Non-finite gradients (ACC-F)
        "ACC-F1": "non_finite='skip': a non-finite window gradient skips the step "
        "(no optimizer or scheduler step); the next window is unaffected",
        "ACC-F2": "non_finite='raise': a non-finite window gradient raises NonFiniteGradientError",
        "ACC-F3": "non_finite='drop_microbatch': a non-finite microbatch is left out and the "
        "window is normalized over the remaining microbatches",
        "ACC-F4": "fp16 with a GradScaler: an overflowing window is skipped (scheduler "
        "included) and the next window is normal",
        # Counters (ACC-C)
        "ACC-C2": "the stats snapshot (epoch, position, dropped counts, items) matches the run",
        "ACC-C3": "micro_steps, optimizer_steps and skipped_steps count what happened",
        # Schedules (ACC-K)
        "ACC-K2": "ByEpoch: a window opened in epoch e holds table[e] microbatches",
        "ACC-K3": "ByStep: the window size follows the number of closed windows, "
        "skipped windows included",
        # Gradient weights (ACC-G)
        "ACC-G1": "per-group weights multiply the final gradient of the group's parameters once",
        "ACC-G2": "per-parameter weights by name multiply the final gradient once, after clipping",
        # Clipping (ACC-L)
        "ACC-L1": "clipping (by norm or by value) applies once, to the final window gradient "
        "(not per microbatch)",
        "ACC-L2": "per_microbatch=True clips each microbatch's own gradient before it joins "
        "the window",
        # Precision and memory (ACC-P)
        "ACC-P1": "accumulation_dtype='float32' leaves the result exact",
        "ACC-P2": "offload=True leaves the result unchanged",
        "ACC-P3": "bf16 autocast follows the float32 trajectory within bf16 precision",
        "ACC-P4": "by default no parameter-sized buffer is held between microbatches "
        "(beyond the parameters, their .grad and the optimizer's state)",
        # Data parallelism (ACC-D)
        "ACC-D1": "gradients are communicated once per window, at its boundary",
        "ACC-D3": "across ranks, a window equals the large batch of every rank's microbatches",
        # Resume (ACC-R)
        "ACC-R2": "a checkpoint taken inside a window resumes to the uninterrupted trajectory "
        "(in-flight gradients and item counts included)",
        "ACC-R3": "a checkpoint taken at a window boundary resumes to the uninterrupted trajectory",
    }
)
"""Spec promise ID -> the promise, in one line."""

CAPABILITIES: Mapping[str, str] = MappingProxyType(
    {
        "amp_fp16": "fp16 autocast with a GradScaler",
        "amp_bf16": "bf16 autocast",
        "checkpoint": "save and resume at a window boundary",
        "checkpoint_mid_window": "save and resume inside a window (in-flight gradients)",
        "offload": "AccumulationConfig(offload=True)",
        "fp32_accumulation": "AccumulationConfig(accumulation_dtype='float32')",
        "per_microbatch_clip": "ClipPolicy(per_microbatch=True)",
        "drop_microbatch": "non_finite='drop_microbatch'",
        "weights": "GradientWeights by name and by group",
        "schedules": "ByEpoch and ByStep schedules",
        "partial_carry": "partial_window='carry'",
        "partial_drop": "partial_window='drop'",
        "distributed": "world_size > 1 (and Trajectory.reductions_per_window)",
        "cuda": "runs scenarios on a CUDA device",
        "device_items": "item counts given as 0-d device tensors (Scenario.items_on_device: "
        "pass view.count)",
        "probes": "measures each microbatch as Scenario.probes asks (host reads, held memory) "
        "and records it with TrajectoryRecorder.microbatch (gradaccum_conformance.probes)",
    }
)
"""Optional capability name -> what declaring it means. Everything else
(fixed windows, the three normalizations, the ``step`` partial policy,
``skip`` and ``raise``, clipping at the boundary, LR schedulers, float64 and
float32) is required of every harness."""


def describe(ids: tuple[str, ...] | list[str]) -> str:
    """``"ACC-W3 (a pass ending ...)"`` for each ID, joined by ``"; "``."""
    return "; ".join(f"{i} ({PROMISES.get(i, 'unknown promise')})" for i in ids)
