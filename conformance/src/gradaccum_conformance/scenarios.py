"""The scenario catalogue: one small, deterministic run per promise.

Each builder takes the precision and the device and returns a
`Scenario`. Models have 123
parameters and runs a few windows, so the whole suite stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradaccum import (
    AccumulationConfig,
    ByEpoch,
    ByStep,
    ClipPolicy,
    GradientWeights,
)
from gradaccum_conformance.scenario import (
    ModelSpec,
    OptimizerSpec,
    Precision,
    ScalerSpec,
    Scenario,
    SchedulerSpec,
    make_passes,
)

__all__ = ["SCENARIOS", "build_scenario"]

Builder = Callable[[Precision, str], Scenario]

SGD = OptimizerSpec("sgd", lr=0.1)
MOMENTUM = OptimizerSpec("sgd", lr=0.1, momentum=0.9)
ADAMW = OptimizerSpec("adamw", lr=0.02, weight_decay=0.1)
DECAY = SchedulerSpec(gamma=0.8)

UNEQUAL = [[1, 5, 2, 7, 3, 4, 6]]
"""Unequal microbatches; with 3 per window the last window is short."""


def _make(
    name: str,
    config: AccumulationConfig,
    sizes: Sequence[Sequence[int | Sequence[int]]],
    precision: Precision,
    device: str,
    *,
    seed: int = 1,
    nan_at: int | None = None,
    **fields: Any,
) -> Scenario:
    model = fields.pop("model", ModelSpec())
    loss_reduction = "sum" if config.normalization == "items" else "mean"
    return Scenario(
        name=name,
        config=config,
        passes=make_passes(sizes, model=model, seed=seed, nan_at=nan_at),
        model=model,
        loss_reduction=fields.pop("loss_reduction", loss_reduction),
        precision=precision,
        device=device,
        **fields,
    )


def _equal(p: Precision, d: str) -> Scenario:
    return _make("equal_sgd", AccumulationConfig(4), [[3] * 12], p, d, optimizer=SGD)


def _adamw(p: Precision, d: str) -> Scenario:
    return _make(
        "adamw_lambda",
        AccumulationConfig(3),
        [[4] * 9],
        p,
        d,
        seed=2,
        optimizer=ADAMW,
        scheduler=DECAY,
    )


def _short(name: str, pass_length: str) -> Builder:
    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(4),
            [[3] * 6, [3] * 6],
            p,
            d,
            seed=3,
            optimizer=MOMENTUM,
            scheduler=DECAY,
            pass_length=pass_length,
        )

    return build


def _items_unequal(p: Precision, d: str) -> Scenario:
    return _make(
        "items_unequal",
        AccumulationConfig(3, normalization="items"),
        UNEQUAL,
        p,
        d,
        seed=4,
        optimizer=MOMENTUM,
    )


def _mean_unequal(p: Precision, d: str) -> Scenario:
    return _make("mean_unequal", AccumulationConfig(3), UNEQUAL, p, d, seed=5, optimizer=MOMENTUM)


def _sum(p: Precision, d: str) -> Scenario:
    return _make(
        "sum",
        AccumulationConfig(3, normalization="sum"),
        [[3, 2, 4] * 3],
        p,
        d,
        seed=6,
        optimizer=OptimizerSpec("sgd", lr=0.03),
    )


def _clip(name: str, clip: ClipPolicy, normalization: str = "mean") -> Builder:
    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(4, clip=clip, normalization=normalization),  # type: ignore[arg-type]
            [[3] * 12],
            p,
            d,
            seed=7,
            optimizer=SGD if normalization != "sum" else OptimizerSpec("sgd", lr=0.03),
        )

    return build


def _clip_per_microbatch(normalization: str) -> Builder:
    """Unequal microbatches, so that mean, items and sum weight them differently."""
    name = f"clip_per_microbatch_{normalization}"

    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(
                4,
                clip=ClipPolicy(max=0.5, per_microbatch=True),
                normalization=normalization,  # type: ignore[arg-type]
            ),
            [[3, 1, 5, 2, 4, 2, 6, 1, 3, 3]],
            p,
            d,
            seed=7,
            optimizer=SGD if normalization != "sum" else OptimizerSpec("sgd", lr=0.03),
        )

    return build


def _weights_by_name(p: Precision, d: str) -> Scenario:
    weights = GradientWeights.of(by_name={"2.*": 0.5, "0.bias": 0.0})
    config = AccumulationConfig(4, weights=weights, clip=ClipPolicy(max=0.5))
    return _make("weights_by_name", config, [[3] * 12], p, d, seed=8, optimizer=MOMENTUM)


def _weights_by_group(p: Precision, d: str) -> Scenario:
    weights = GradientWeights.of(by_group={"head": 2.0, 0: 0.5})
    return _make(
        "weights_by_group",
        AccumulationConfig(3, weights=weights),
        [[3] * 9],
        p,
        d,
        seed=9,
        optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.5, two_groups=True),
    )


def _non_finite(name: str, policy: str) -> Builder:
    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(4, non_finite=policy),  # type: ignore[arg-type]
            [[3] * 12],
            p,
            d,
            seed=10,
            nan_at=5,
            optimizer=MOMENTUM,
            scheduler=DECAY,
        )

    return build


def _partial(name: str, policy: str) -> Builder:
    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(4, partial_window=policy),  # type: ignore[arg-type]
            [[3] * 6, [3] * 6],
            p,
            d,
            seed=11,
            optimizer=MOMENTUM,
            scheduler=DECAY,
        )

    return build


def _by_epoch(p: Precision, d: str) -> Scenario:
    return _make(
        "by_epoch",
        AccumulationConfig(schedule=ByEpoch({0: 2, 1: 3})),
        [[3] * 6, [3] * 6],
        p,
        d,
        seed=12,
        optimizer=MOMENTUM,
        scheduler=DECAY,
    )


def _by_step(p: Precision, d: str) -> Scenario:
    # Window sizes 1, 1, 2, 2, 3, 3; window 1 is skipped (NaN) and still
    # counts as a closed window for the ramp.
    return _make(
        "by_step",
        AccumulationConfig(schedule=ByStep({0: 1, 2: 2, 4: 3})),
        [[3] * 12],
        p,
        d,
        seed=13,
        nan_at=1,
        optimizer=MOMENTUM,
        scheduler=DECAY,
    )


def _steps1(p: Precision, d: str) -> Scenario:
    return _make(
        "steps1",
        AccumulationConfig(1),
        [[3] * 6],
        p,
        d,
        seed=14,
        optimizer=MOMENTUM,
        scheduler=DECAY,
    )


def _counters(p: Precision, d: str) -> Scenario:
    return _make(
        "counters",
        AccumulationConfig(3, normalization="items"),
        [[3, 1, 2, 4, 2, 3, 1], [2, 2, 3, 1, 4, 2, 3]],
        p,
        d,
        seed=15,
        nan_at=4,
        optimizer=SGD,
        scheduler=DECAY,
    )


def _checkpoint(name: str, after: int) -> Builder:
    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(4, normalization="items"),
            [[2, 5, 3, 4, 1, 6, 2, 3], [4, 2, 5, 3]],
            p,
            d,
            seed=16,
            optimizer=ADAMW,
            scheduler=DECAY,
            checkpoint_after=after,
        )

    return build


def _fp16_overflow(p: Precision, d: str) -> Scenario:
    # The first window's scaled gradients overflow fp16; the backoff then
    # lands the scale at 2**10, where nothing overflows again.
    return _make(
        "fp16_overflow",
        AccumulationConfig(2),
        [[4] * 8],
        "fp16",
        d,
        seed=17,
        optimizer=MOMENTUM,
        scheduler=DECAY,
        scaler=ScalerSpec(init_scale=2.0**40, backoff_factor=2.0**-30),
        amp_overflow_windows=(0,),
    )


def _option(name: str, **config: Any) -> Builder:
    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(4, **config),
            [[3] * 6, [3] * 6],
            p,
            d,
            seed=18,
            optimizer=MOMENTUM,
            scheduler=DECAY,
        )

    return build


def _distributed(name: str, normalization: str) -> Builder:
    sizes: list[list[int | Sequence[int]]] = [[(2, 3), (4, 1), (3, 3), (1, 5), (2, 2)]]

    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            AccumulationConfig(2, normalization=normalization),  # type: ignore[arg-type]
            sizes,
            p,
            d,
            seed=19,
            optimizer=MOMENTUM,
            scheduler=DECAY,
            world_size=2,
        )

    return build


PROBE_MODEL = ModelSpec(out_features=8)
"""The probe scenarios' model: its smallest parameter (``2.bias``, 8 values)
is larger than a few 0-d scalars, so "less than the smallest parameter"
tells a parameter-sized buffer from bookkeeping scalars."""


def _probe(
    name: str,
    config: AccumulationConfig,
    sizes: Sequence[Sequence[int | Sequence[int]]],
    **fields: Any,
) -> Builder:
    """Two windows of 3 (two non-boundary microbatches in each): what a
    harness measures is set by the test (``scenario.replace(probes=...)``)."""

    def build(p: Precision, d: str) -> Scenario:
        return _make(
            name,
            config,
            sizes,
            p,
            d,
            seed=20,
            model=PROBE_MODEL,
            optimizer=MOMENTUM,
            scheduler=DECAY,
            **fields,
        )

    return build


SCENARIOS: dict[str, Builder] = {
    "equal_sgd": _equal,
    "adamw_lambda": _adamw,
    "short_last_known": _short("short_last_known", "known"),
    "short_last_last_only": _short("short_last_last_only", "last_only"),
    "items_unequal": _items_unequal,
    "mean_unequal": _mean_unequal,
    "sum": _sum,
    "clip_norm": _clip("clip_norm", ClipPolicy(max=0.5)),
    "clip_value": _clip("clip_value", ClipPolicy(max=0.05, mode="value")),
    "clip_per_microbatch_sum": _clip_per_microbatch("sum"),
    "clip_per_microbatch_mean": _clip_per_microbatch("mean"),
    "clip_per_microbatch_items": _clip_per_microbatch("items"),
    "weights_by_name": _weights_by_name,
    "weights_by_group": _weights_by_group,
    "non_finite_skip": _non_finite("non_finite_skip", "skip"),
    "non_finite_raise": _non_finite("non_finite_raise", "raise"),
    "non_finite_drop": _non_finite("non_finite_drop", "drop_microbatch"),
    "partial_drop": _partial("partial_drop", "drop"),
    "partial_carry": _partial("partial_carry", "carry"),
    "by_epoch": _by_epoch,
    "by_step": _by_step,
    "steps1": _steps1,
    "counters": _counters,
    "checkpoint_mid_window": _checkpoint("checkpoint_mid_window", 5),
    "checkpoint_boundary": _checkpoint("checkpoint_boundary", 7),
    "fp16_overflow": _fp16_overflow,
    "offload": _option("offload", offload=True),
    "fp32_accumulation": _option("fp32_accumulation", accumulation_dtype="float32"),
    "distributed_items": _distributed("distributed_items", "items"),
    "distributed_mean": _distributed("distributed_mean", "mean"),
    "probe_mean": _probe("probe_mean", AccumulationConfig(3), [[3] * 6]),
    "probe_items_device": _probe(
        "probe_items_device",
        AccumulationConfig(3, normalization="items"),
        [[2, 5, 3, 4, 1, 6]],
        items_on_device=True,
    ),
    "probe_clip_norm": _probe(
        "probe_clip_norm", AccumulationConfig(3, clip=ClipPolicy(max=0.5)), [[3] * 6]
    ),
    "probe_distributed": _probe(
        "probe_distributed",
        AccumulationConfig(2, normalization="items"),
        [[(2, 3), (4, 1), (3, 3), (1, 5)]],
        world_size=2,
        pass_length="last_only",
    ),
}
"""Scenario name -> builder ``(precision, device) -> Scenario``."""


def build_scenario(name: str, precision: Precision = "float64", device: str = "cpu") -> Scenario:
    """Build the catalogue scenario ``name``."""
    try:
        builder = SCENARIOS[name]
    except KeyError:
        raise KeyError(f"no scenario {name!r}; known: {sorted(SCENARIOS)}") from None
    return builder(precision, device)
