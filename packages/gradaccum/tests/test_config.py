"""The configuration: validation of every field and its JSON form."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gradaccum import (
    AccumulationConfig,
    AdaptiveMicrobatch,
    ByEpoch,
    ByStep,
    ClipPolicy,
    ConfigError,
    Fixed,
    GradientWeights,
    TargetBatch,
)


@pytest.mark.parametrize(
    ("steps", "shown"), [(0, "0"), (-1, "-1"), (1.5, "1.5"), (True, "True"), ("4", "'4'")]
)
def test_bad_steps(steps: Any, shown: str) -> None:
    """ACC-E4, ACC-K1: accumulation steps must be an int >= 1; the message names the value."""
    with pytest.raises(ConfigError) as info:
        AccumulationConfig(steps)
    assert shown in str(info.value)


def test_steps_shorthand() -> None:
    """ACC-K1: AccumulationConfig(4) is Fixed(4); the default is Fixed(1)."""
    assert AccumulationConfig(4).schedule == Fixed(4)
    assert AccumulationConfig().schedule == Fixed(1)


def test_steps_and_schedule_conflict() -> None:
    """ACC-E4: steps and schedule together are refused."""
    with pytest.raises(ConfigError, match="Fixed"):
        AccumulationConfig(2, schedule=Fixed(3))


def test_schedule_must_be_a_schedule() -> None:
    """ACC-E4: a schedule that is not a Schedule object is refused, naming it."""
    with pytest.raises(ConfigError, match="'fixed'"):
        AccumulationConfig(schedule="fixed")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalization", "avg"),
        ("normalization", None),
        ("partial_window", "keep"),
        ("non_finite", "ignore"),
        ("accumulation_dtype", "bfloat16"),
    ],
)
def test_unknown_policy_names(field: str, value: Any) -> None:
    """ACC-E4: an unknown policy name is a ConfigError naming the value and the choices."""
    with pytest.raises(ConfigError) as info:
        AccumulationConfig(2, **{field: value})
    message = str(info.value)
    assert repr(value) in message
    assert field in message
    assert "use one of" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("offload", 1),
        ("micro_batch_size", 0),
        ("micro_batch_size", 2.0),
        ("micro_batch_size", True),
        ("clip", 1.0),
        ("weights", {"a": 1.0}),
    ],
)
def test_bad_fields(field: str, value: Any) -> None:
    """ACC-E4: bad offload, micro_batch_size, clip and weights are refused, naming the value."""
    with pytest.raises(ConfigError) as info:
        AccumulationConfig(2, **{field: value})
    assert repr(value) in str(info.value)


def test_adaptive_requires_items() -> None:
    """ACC-K5: AdaptiveMicrobatch needs items normalization."""
    schedule = AdaptiveMicrobatch(target=8, micro_batch=4)
    with pytest.raises(ConfigError, match="'mean'"):
        AccumulationConfig(schedule=schedule)
    assert AccumulationConfig(schedule=schedule, normalization="items").schedule is schedule


def test_config_is_immutable_and_replace_validates() -> None:
    """ACC-E2: a config never changes; replace() validates the copy."""
    config = AccumulationConfig(2)
    with pytest.raises(AttributeError):
        config.normalization = "sum"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="'nope'"):
        config.replace(normalization="nope")
    assert config.normalization == "mean"
    assert config.replace(normalization="sum").normalization == "sum"


def test_isolates_microbatches() -> None:
    """ACC-F3, ACC-L2, ACC-P4: only drop_microbatch and per-microbatch clipping isolate."""
    assert not AccumulationConfig(2).isolates_microbatches
    assert not AccumulationConfig(2, clip=ClipPolicy(1.0)).isolates_microbatches
    assert AccumulationConfig(2, clip=ClipPolicy(1.0, per_microbatch=True)).isolates_microbatches
    assert AccumulationConfig(2, non_finite="drop_microbatch").isolates_microbatches


FULL = AccumulationConfig(
    schedule=ByStep({0: 2, 2: 4, 10: 8}),
    normalization="items",
    partial_window="carry",
    non_finite="drop_microbatch",
    clip=ClipPolicy(0.5, mode="norm", norm_type=math.inf, per_microbatch=True),
    weights=GradientWeights.of(by_name={"enc.*": 0.5}, by_group={0: 2.0, "head": 0.1}),
    accumulation_dtype="float32",
    offload=True,
    micro_batch_size=8,
)


@pytest.mark.parametrize(
    "config",
    [
        AccumulationConfig(),
        AccumulationConfig(3, clip=ClipPolicy(1.0, mode="value")),
        AccumulationConfig(schedule=ByEpoch({0: 1, 4: 2})),
        AccumulationConfig(schedule=TargetBatch(64, 8, 2)),
        AccumulationConfig(schedule=AdaptiveMicrobatch(16, 8, 2, 8, 3), normalization="items"),
        FULL,
    ],
)
def test_round_trip(config: AccumulationConfig) -> None:
    """ACC-K6, ACC-R4: to_dict -> JSON (strict, no NaN/inf) -> from_dict is exact."""
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert AccumulationConfig.from_dict(json.loads(text)) == config


def test_from_dict_defaults() -> None:
    """ACC-K6: from_dict fills omitted fields with the defaults."""
    config = AccumulationConfig.from_dict({"schedule": {"kind": "fixed", "steps": 4}})
    assert config == AccumulationConfig(4)


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ({"schedule": {"kind": "fixed", "steps": 4}, "normalisation": "mean"}, "normalisation"),
        ({"normalization": "mean"}, "schedule"),
        ({"schedule": {"kind": "fixed", "steps": 4}, "clip": {"max": 1.0, "typ": 2}}, "typ"),
        ({"schedule": {"kind": "fixed", "steps": 4}, "clip": {"mode": "norm"}}, "max"),
        ({"schedule": {"kind": "fixed", "steps": 4}, "weights": {"by_layer": {}}}, "by_layer"),
        ({"schedule": {"kind": "fixed", "steps": 4}, "normalization": "avg"}, "'avg'"),
        ({"schedule": {"kind": "ramp", "steps": 4}}, "'ramp'"),
        ({"schedule": {"steps": 4}}, "kind"),
        ("fixed", "str"),
    ],
)
def test_from_dict_rejects(data: Any, shown: str) -> None:
    """ACC-E4: config dicts with unknown keys, missing entries or bad values are refused."""
    with pytest.raises(ConfigError) as info:
        AccumulationConfig.from_dict(data)
    assert shown in str(info.value)
