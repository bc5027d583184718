"""Clipping and gradient-weight policies (ACC-L, ACC-G)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gradaccum import ClipPolicy, ConfigError, GradientWeights

NAMES = ["enc.0.weight", "enc.0.bias", "dec.weight", "dec.bias", "head.weight"]
GROUPS = [0, 0, 1, 1, 2]
GROUP_NAMES: list[str | None] = ["backbone", None, "head"]


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"max": 0}, "0"),
        ({"max": -1.0}, "-1.0"),
        ({"max": math.nan}, "nan"),
        ({"max": math.inf}, "inf"),
        ({"max": "1"}, "'1'"),
        ({"max": True}, "True"),
        ({"max": 1.0, "mode": "l2"}, "'l2'"),
        ({"max": 1.0, "norm_type": 0}, "0"),
        ({"max": 1.0, "norm_type": -2.0}, "-2.0"),
        ({"max": 1.0, "norm_type": "2"}, "'2'"),
        ({"max": 1.0, "per_microbatch": 1}, "1"),
    ],
)
def test_bad_clip(kwargs: dict[str, Any], shown: str) -> None:
    """ACC-L4, ACC-E4: clip max must be finite > 0; norm_type > 0 or inf; mode norm/value."""
    with pytest.raises(ConfigError) as info:
        ClipPolicy(**kwargs)
    assert shown in str(info.value)


def test_clip_round_trip_with_inf_norm() -> None:
    """ACC-L1, ACC-K6: an infinity norm is written as the string "inf" and read back."""
    clip = ClipPolicy(2.0, norm_type=math.inf)
    data = clip.to_dict()
    assert data["norm_type"] == "inf"
    assert ClipPolicy.from_dict(data) == clip
    assert ClipPolicy(1.0, mode="value").mode == "value"


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf, -math.inf, "1", None, True])
def test_bad_weights(weight: Any) -> None:
    """ACC-G4, ACC-E4: weights are finite numbers >= 0, by name and by group."""
    with pytest.raises(ConfigError) as info:
        GradientWeights.of(by_name={"enc.*": weight})
    assert repr(weight) in str(info.value)
    with pytest.raises(ConfigError) as info:
        GradientWeights.of(by_group={0: weight})
    assert repr(weight) in str(info.value)


@pytest.mark.parametrize(("key", "shown"), [(-1, "-1"), (1.5, "1.5"), (True, "True")])
def test_bad_group_keys(key: Any, shown: str) -> None:
    """ACC-G1, ACC-E4: a group key is an index >= 0 or a name."""
    with pytest.raises(ConfigError) as info:
        GradientWeights.of(by_group={key: 1.0})
    assert shown in str(info.value)


def test_empty_pattern() -> None:
    """ACC-E4: an empty name pattern is refused."""
    with pytest.raises(ConfigError, match="''"):
        GradientWeights.of(by_name={"": 1.0})


def test_resolve_by_name_and_group() -> None:
    """ACC-G1: exact names and fnmatch patterns; the last matching pattern wins; times the
    group weight; unmatched parameters keep 1."""
    weights = GradientWeights.of(
        by_name={"enc.*": 0.5, "*.bias": 0.25, "dec.weight": 3.0},
        by_group={1: 2.0, "head": 0.0},
    )
    assert weights.resolve(NAMES, GROUPS, GROUP_NAMES) == (0.5, 0.25, 6.0, 0.5, 0.0)
    assert GradientWeights().resolve(NAMES, GROUPS) == (1.0,) * 5
    assert GradientWeights().is_identity
    assert not weights.is_identity


@pytest.mark.parametrize(
    ("weights", "shown"),
    [
        (GradientWeights.of(by_name={"encoder.*": 0.5}), "'encoder.*'"),
        (GradientWeights.of(by_name={"head.bias": 0.5}), "'head.bias'"),
        (GradientWeights.of(by_group={3: 0.5}), "3"),
        (GradientWeights.of(by_group={"tail": 0.5}), "'tail'"),
    ],
)
def test_pattern_matching_nothing_is_an_error(weights: GradientWeights, shown: str) -> None:
    """ACC-G3: a pattern or group that matches nothing is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        weights.resolve(NAMES, GROUPS, GROUP_NAMES)
    assert shown in str(info.value)


def test_resolve_length_mismatch() -> None:
    """ACC-E4: one group index per parameter name."""
    with pytest.raises(ConfigError, match="5 names"):
        GradientWeights().resolve(NAMES, [0])


def test_weights_round_trip() -> None:
    """ACC-K6: weights round-trip; group indices are written "#<index>"."""
    weights = GradientWeights.of(by_name={"*.bias": 0.5}, by_group={0: 2.0, "head": 0.1})
    data = weights.to_dict()
    assert data["by_group"] == {"#0": 2.0, "head": 0.1}
    assert GradientWeights.from_dict(data) == weights
    with pytest.raises(ConfigError, match="by_layer"):
        GradientWeights.from_dict({"by_layer": {}})
