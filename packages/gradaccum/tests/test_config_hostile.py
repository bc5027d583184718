"""Malformed configurations: `AccumulationConfig.from_dict` raises
`ConfigError` for every one, never another exception (issue 8; spec
ACC-E, CKPT-10). The seeded fuzz test runs ``GRADACCUM_FUZZ_EXAMPLES``
mutated configs (300 by default; the ``fuzz`` nox session runs 10,000)."""

from __future__ import annotations

import copy
import os
import random
from typing import Any

import pytest

from gradaccum import AccumulationConfig, ConfigError

VALID: list[dict[str, Any]] = [
    AccumulationConfig(4).to_dict(),
    {
        "schedule": {"kind": "by_epoch", "steps": {"0": 2, "3": 8}},
        "normalization": "mean",
        "partial_window": "drop",
        "non_finite": "raise",
        "clip": {"mode": "norm", "max": 1.0, "norm_type": 2.0, "per_microbatch": False},
        "weights": {"by_name": {"*.bias": 0.0}, "by_group": {"#0": 1.0, "head": 0.5}},
        "accumulation_dtype": "float32",
        "offload": True,
        "micro_batch_size": 32,
    },
    {
        "schedule": {"kind": "by_step", "steps": {"0": 1, "10": 4}},
        "normalization": "sum",
        "partial_window": "carry",
        "non_finite": "drop_microbatch",
        "clip": {"mode": "value", "max": 0.5, "norm_type": "inf", "per_microbatch": True},
    },
    {
        "schedule": {"kind": "target_batch", "target": 256, "micro_batch": 16, "world_size": 2},
        "normalization": "mean",
        "partial_window": "step",
        "non_finite": "skip",
    },
]


def _adaptive() -> dict[str, Any]:
    from gradaccum import AdaptiveMicrobatch

    schedule = AdaptiveMicrobatch(target=64, micro_batch=8, min_micro_batch=2, max_micro_batch=32)
    return AccumulationConfig(schedule=schedule, normalization="items").to_dict()


VALID.append(_adaptive())


@pytest.mark.parametrize("config", VALID, ids=lambda c: c["schedule"]["kind"])
def test_valid_configs_round_trip(config: dict[str, Any]) -> None:
    """ACC-K1: the seeds of the fuzz test are valid and round-trip exactly."""
    parsed = AccumulationConfig.from_dict(config)
    assert AccumulationConfig.from_dict(parsed.to_dict()) == parsed


def cyclic() -> dict[str, Any]:
    loop: dict[str, Any] = {"kind": "fixed"}
    loop["steps"] = loop
    return loop


def deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = {"a": value}
    return value


BAD: list[tuple[Any, str]] = [
    (5, "config must be a mapping"),
    (None, "config must be a mapping"),
    ([("schedule", {})], "config must be a mapping"),
    ({**VALID[0], "weights": {"by_group": 5}}, r"weights\['by_group'\]=5 must be a mapping"),
    ({**VALID[0], "weights": {"by_name": [1]}}, r"weights\['by_name'\]=\[1\] must be a mapping"),
    ({**VALID[0], "weights": {"by_group": {"#0": "x"}}}, "weights must be numbers"),
    ({**VALID[0], "weights": 3}, "weights must be a mapping"),
    ({**VALID[0], "clip": {"max": 10**400}}, r"clip'\]\['max'\] is an integer of about 400"),
    ({**VALID[0], "clip": {"max": -(10**30)}}, "is an integer of about 30 digits"),
    ({**VALID[0], "clip": {"max": 1.0, "norm_type": [2]}}, "norm_type"),
    ({**VALID[0], "clip": "norm"}, "clip"),
    ({**VALID[0], "clip": {"max": 1.0, "mode": {}}}, "mode"),
    ({**VALID[0], "schedule": {"kind": ["fixed"]}}, r"config\['schedule'\]=.* is malformed"),
    ({**VALID[0], "schedule": {"kind": "fixed", "steps": "4"}}, "steps"),
    ({**VALID[0], "schedule": {"kind": "by_epoch", "steps": {"x": 1}}}, "not an integer"),
    ({**VALID[0], "schedule": {"kind": "by_epoch", "steps": [1, 2]}}, "must be a mapping"),
    ({**VALID[0], "schedule": {"kind": "target_batch", "target": []}}, "target"),
    ({**VALID[0], "schedule": cyclic()}, "nests more than 64 levels deep"),
    ({**VALID[0], "schedule": deep(100)}, "nests more than 64 levels deep"),
    ({**VALID[0], 1: 2}, "has the key 1 of type int"),
    ({**VALID[0], "normalization": ["mean"]}, "normalization"),
    ({**VALID[0], "offload": "yes"}, "offload"),
    ({**VALID[0], "offload": object()}, "which is not a JSON value"),
    ({**VALID[0], "clip": {"max": 1.0, "mode": "value", "norm_type": object()}}, "JSON value"),
    ({**VALID[0], "clip": {"max": 1.0, "mode": "value", "norm_type": "x"}}, "norm_type='x'"),
    ({**VALID[0], "micro_batch_size": 2**70}, "is an integer of about 21 digits"),
    ({**VALID[0], "micro_batch_size": 0}, "micro_batch_size"),
    ({k: v for k, v in VALID[0].items() if k != "schedule"}, "needs a 'schedule' entry"),
]


@pytest.mark.parametrize(("config", "match"), BAD)
def test_malformed_config_is_a_config_error(config: Any, match: str) -> None:
    """CKPT-20, ACC-E: each malformed config found by the issue-8 fuzzing (a
    ``by_group`` that is a number, a 400-digit clip ``max``, unhashable
    kinds, cycles, deep nesting, non-string keys) raises ConfigError naming
    the entry — not AttributeError, TypeError, OverflowError or
    RecursionError."""
    with pytest.raises(ConfigError, match=match):
        AccumulationConfig.from_dict(config)


# --------------------------------------------------------------------------- fuzz


def _examples() -> int:
    return int(os.environ.get("GRADACCUM_FUZZ_EXAMPLES", "300"))


_ATOMS: list[Any] = [
    None, True, False, 0, 1, -1, 3, 2**63, 2**64, -(2**63) - 1, 10**400, 0.0, -0.0, 1e-300,
    1e300, float("inf"), float("-inf"), float("nan"), "", "x", "#0", "#-1", "inf", "fixed",
    "mean", "items", "by_epoch", "adaptive", "\ud800", [], [1], {}, {"a": 1}, (1, 2),
    {"kind": "fixed"}, {1: 2}, {None: 1}, b"bytes", object(),
]  # fmt: skip


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every value, at most 12 levels down (so cycles end)."""
    out = [prefix]
    if len(prefix) >= 12:
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.extend(_paths(item, (*prefix, index)))
    return out


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        root = root[part]
    return root


def mutate(rng: random.Random, config: dict[str, Any]) -> Any:
    """One to three random edits: replace a value by an atom, a deep or
    cyclic structure or a value of another key; delete or add a key; wrap a
    value in a list; change a key's type."""
    doc: Any = copy.deepcopy(config)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        path = rng.choice(paths)
        op = rng.randrange(7)
        if not path:
            if op == 0:
                doc = rng.choice(_ATOMS)
            continue
        parent = _get(doc, path[:-1])
        key = path[-1]
        if not isinstance(parent, (dict, list)):
            continue
        if op in (0, 1):
            parent[key] = rng.choice(_ATOMS)
        elif op == 2:
            parent[key] = deep(rng.choice([10, 65, 200]))
        elif op == 3 and isinstance(parent, dict):
            del parent[key]
        elif op == 4 and isinstance(parent, dict):
            parent[rng.choice(["extra", 7, "kind", "max", "#1", "steps"])] = rng.choice(_ATOMS)
        elif op == 5:
            parent[key] = [parent[key]]
        else:
            other = _get(doc, rng.choice(paths))
            parent[key] = other if other is not doc else cyclic()
    return doc


def test_fuzz_config_from_dict() -> None:
    """CKPT-20, ACC-E: GRADACCUM_FUZZ_EXAMPLES seeded mutations of valid configs are
    each either accepted — and then round-trip exactly through to_dict — or
    refused with ConfigError; no other exception escapes (issue 8 found 460
    of 10,000 that did)."""
    rng = random.Random(20261129)
    counts = {"accepted": 0, "refused": 0}
    for _ in range(_examples()):
        candidate = mutate(rng, rng.choice(VALID))
        try:
            parsed = AccumulationConfig.from_dict(candidate)
        except ConfigError:
            counts["refused"] += 1
            continue
        except Exception as exc:
            pytest.fail(f"{type(exc).__name__}: {exc} for {candidate!r:.300}")
        counts["accepted"] += 1
        assert AccumulationConfig.from_dict(parsed.to_dict()) == parsed
    print(f"config fuzz: {counts}")
    assert counts["refused"] > 0
