"""Policies: normalization, short last windows, non-finite gradients,
clipping and gradient weights.

Each policy is plain data, validated when it is built; nothing here touches a
tensor. Adapters read the decisions the state machine derives from them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast, get_args

from gradaccum.errors import ConfigError

__all__ = [
    "AccumulationDType",
    "ClipPolicy",
    "GradientWeights",
    "NonFinitePolicy",
    "Normalization",
    "PartialWindowPolicy",
    "check_choice",
]

Normalization: TypeAlias = Literal["mean", "items", "sum"]
"""How microbatch gradients combine into the window gradient (spec ACC-N*).

* ``mean`` — each microbatch loss is a mean; the window gradient is the mean
  of the gradients of the microbatches that actually ran and counted.
* ``items`` — each microbatch loss is a *sum* over items; the window gradient
  is that sum divided by the window's item count over all ranks.
* ``sum`` — the window gradient is the plain sum of microbatch gradients.
"""

PartialWindowPolicy: TypeAlias = Literal["step", "drop", "carry"]
"""What a pass that ends inside a window does with it (spec ACC-W*)."""

NonFinitePolicy: TypeAlias = Literal["skip", "raise", "drop_microbatch"]
"""What a non-finite gradient does (spec ACC-F*)."""

AccumulationDType: TypeAlias = Literal["param", "float32"]
"""The dtype gradients are accumulated in: the parameter's own, or float32."""

ClipMode: TypeAlias = Literal["norm", "value"]


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is in ``allowed``; else raise `ConfigError` naming it."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{name}={value!r} is not a known choice; use one of {choices}")
    return value


NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
PARTIAL_WINDOW_POLICIES: tuple[str, ...] = get_args(PartialWindowPolicy)
NON_FINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)
ACCUMULATION_DTYPES: tuple[str, ...] = get_args(AccumulationDType)


def _finite_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} must be a number; pass a positive float such as 1.0")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name}={value!r} must be finite and > 0; pass a positive float")
    return number


@dataclass(frozen=True, slots=True)
class ClipPolicy:
    """Gradient clipping, applied once to the window's final gradient.

    ``mode="norm"`` rescales the gradients so that their total ``norm_type``
    norm is at most ``max``; ``mode="value"`` clamps each element to
    ``[-max, max]``. With ``per_microbatch=True`` (opt-in; the
    ``clip_gradients_before_accumulation`` of other engines) each
    microbatch's own gradient contribution is clipped before it is added to
    the window, which costs one gradient-sized buffer during backward.
    """

    max: float
    mode: ClipMode = "norm"
    norm_type: float = 2.0
    per_microbatch: bool = False

    def __post_init__(self) -> None:
        _finite_positive("clip max", self.max)
        check_choice("clip mode", self.mode, ("norm", "value"))
        if self.mode == "norm":
            norm_type = self.norm_type
            if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
                raise ConfigError(f"clip norm_type={norm_type!r} must be a number such as 2.0")
            if not (norm_type == math.inf or (math.isfinite(norm_type) and norm_type > 0)):
                raise ConfigError(f"clip norm_type={norm_type!r} must be > 0 or math.inf")
        if not isinstance(self.per_microbatch, bool):
            raise ConfigError(f"clip per_microbatch={self.per_microbatch!r} must be True or False")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``inf`` norm type written as the string ``"inf"``)."""
        norm_type: float | str = "inf" if self.norm_type == math.inf else float(self.norm_type)
        return {
            "mode": self.mode,
            "max": float(self.max),
            "norm_type": norm_type,
            "per_microbatch": self.per_microbatch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClipPolicy:
        """Inverse of `to_dict`; raises `ConfigError` on unknown keys."""
        _known_keys("clip", data, ("mode", "max", "norm_type", "per_microbatch"))
        norm_type = data.get("norm_type", 2.0)
        if norm_type == "inf":
            norm_type = math.inf
        return cls(
            max=data["max"] if "max" in data else _missing("clip", "max"),
            mode=data.get("mode", "norm"),
            norm_type=norm_type,
            per_microbatch=data.get("per_microbatch", False),
        )


def _missing(where: str, key: str) -> Any:
    raise ConfigError(f"{where} needs the key {key!r}; add it")


def _known_keys(where: str, data: Mapping[str, Any], known: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; the known keys are {list(known)}")


@dataclass(frozen=True, slots=True)
class GradientWeights:
    """Per-parameter multipliers applied once to the window gradient at the
    boundary, after clipping (the layer-wise, selective and parameter-group
    strategies).

    ``by_name`` maps a canonical parameter name or an ``fnmatch`` pattern
    (``"encoder.*"``, ``"*.bias"``) to a weight; ``by_group`` maps an
    optimizer parameter-group index (``0``) or a group's ``"name"`` entry to
    a weight. A parameter's weight is the product of the last matching name
    pattern (in insertion order) and its group's weight; unmatched
    parameters keep weight 1. A weight of 0 freezes a parameter's update
    from gradients (weight decay still applies, as the optimizer defines).
    """

    by_name: tuple[tuple[str, float], ...] = ()
    by_group: tuple[tuple[int | str, float], ...] = ()

    @classmethod
    def of(
        cls,
        by_name: Mapping[str, float] | None = None,
        by_group: Mapping[int | str, float] | None = None,
    ) -> GradientWeights:
        """Build from mappings; validates every weight (finite, >= 0)."""
        return cls(
            by_name=tuple((by_name or {}).items()),
            by_group=tuple((by_group or {}).items()),
        )

    def __post_init__(self) -> None:
        for pattern, weight in self.by_name:
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"weight pattern {pattern!r} must be a non-empty string")
            _check_weight(f"weight for {pattern!r}", weight)
        for group, weight in self.by_group:
            if isinstance(group, bool) or not isinstance(group, (int, str)):
                raise ConfigError(
                    f"group key {group!r} must be a group index (int) or a group name (str)"
                )
            if isinstance(group, int) and group < 0:
                raise ConfigError(f"group index {group} must be >= 0")
            _check_weight(f"weight for group {group!r}", weight)

    @property
    def is_identity(self) -> bool:
        """True when no weight is configured, so nothing needs to be applied."""
        return not self.by_name and not self.by_group

    def resolve(
        self,
        names: Sequence[str],
        groups: Sequence[int],
        group_names: Sequence[str | None] = (),
    ) -> tuple[float, ...]:
        """Return one weight per parameter.

        ``names[i]`` is parameter i's canonical name, ``groups[i]`` the index
        of its optimizer group, ``group_names[g]`` group g's optional name.
        Raises `ConfigError` if a pattern matches no parameter or a
        group key names no group — a typo must not silently do nothing.
        """
        if len(names) != len(groups):
            raise ConfigError(f"{len(names)} names but {len(groups)} group indices")
        weights = [1.0] * len(names)
        for pattern, weight in self.by_name:
            hits = [
                i for i, n in enumerate(names) if n == pattern or fnmatch.fnmatchcase(n, pattern)
            ]
            if not hits:
                sample = ", ".join(list(names)[:5])
                raise ConfigError(
                    f"weight pattern {pattern!r} matches no parameter; "
                    f"parameter names look like: {sample}"
                )
            for i in hits:
                weights[i] = float(weight)
        n_groups = max(groups, default=-1) + 1
        for key, weight in self.by_group:
            if isinstance(key, int):
                index = key
                if index >= n_groups:
                    raise ConfigError(
                        f"weight for group {key} but the optimizer has {n_groups} groups"
                    )
            else:
                if key not in group_names:
                    raise ConfigError(
                        f"weight for group {key!r} but no optimizer group has that 'name'; "
                        f"group names: {list(group_names)}"
                    )
                index = list(group_names).index(key)
            for i, g in enumerate(groups):
                if g == index:
                    weights[i] *= float(weight)
        return tuple(weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; group indices become strings prefixed ``#``."""
        return {
            "by_name": {p: float(w) for p, w in self.by_name},
            "by_group": {
                (f"#{g}" if isinstance(g, int) else g): float(w) for g, w in self.by_group
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GradientWeights:
        """Inverse of `to_dict`."""
        _known_keys("weights", data, ("by_name", "by_group"))
        by_group: dict[int | str, float] = {}
        for key, weight in cast(Mapping[str, float], data.get("by_group", {})).items():
            if key.startswith("#") and key[1:].isdigit():
                by_group[int(key[1:])] = weight
            else:
                by_group[key] = weight
        return cls.of(by_name=data.get("by_name", {}), by_group=by_group)


def _check_weight(name: str, weight: object) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"{name} is {weight!r}; weights must be numbers >= 0")
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{name} is {weight!r}; weights must be finite and >= 0")
