"""The accumulation configuration: one immutable, validated, JSON-serialisable object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gradaccum.errors import ConfigError
from gradaccum.policies import (
    ACCUMULATION_DTYPES,
    NON_FINITE_POLICIES,
    NORMALIZATIONS,
    PARTIAL_WINDOW_POLICIES,
    AccumulationDType,
    ClipPolicy,
    GradientWeights,
    NonFinitePolicy,
    Normalization,
    PartialWindowPolicy,
    _known_keys,
    check_choice,
)
from gradaccum.schedules import Fixed, Schedule, schedule_from_dict

__all__ = ["AccumulationConfig"]

_KEYS = (
    "schedule",
    "normalization",
    "partial_window",
    "non_finite",
    "clip",
    "weights",
    "accumulation_dtype",
    "offload",
    "micro_batch_size",
)


@dataclass(frozen=True, slots=True)
class AccumulationConfig:
    """Everything that decides *what* accumulation computes.

    Build it with keywords (``AccumulationConfig(steps=4)`` is shorthand for
    ``schedule=Fixed(4)``) or from JSON with `from_dict`. Construction
    validates every field and raises `ConfigError`
    naming the bad value and the fix; a config that exists is valid.

    Attributes:
        schedule: microbatches per window (`gradaccum.schedules`).
        normalization: ``"mean"`` (default), ``"items"`` or ``"sum"``.
        partial_window: a pass that ends inside a window ``"step"``s it
            exactly (default), ``"drop"``s it, or ``"carry"``s it into the
            next pass.
        non_finite: a non-finite window gradient ``"skip"``s the step
            (default), ``"raise"``s, or — with ``"drop_microbatch"`` — each
            microbatch is checked and a non-finite one is left out.
        clip: clipping of the final gradient, or ``None``.
        weights: per-parameter / per-group gradient weights.
        accumulation_dtype: ``"param"`` (default) or ``"float32"`` (fp32
            accumulation buffers for low-precision parameters).
        offload: keep the accumulated gradient on the CPU between microbatches.
        micro_batch_size: items per microbatch per rank, if constant; used
            only to report the effective batch size.
    """

    schedule: Schedule = field(default_factory=lambda: Fixed(1))
    normalization: Normalization = "mean"
    partial_window: PartialWindowPolicy = "step"
    non_finite: NonFinitePolicy = "skip"
    clip: ClipPolicy | None = None
    weights: GradientWeights = field(default_factory=GradientWeights)
    accumulation_dtype: AccumulationDType = "param"
    offload: bool = False
    micro_batch_size: int | None = None
    microbatch_clip: ClipPolicy | None = field(init=False, repr=False, compare=False)
    """The clip applied to each microbatch's own gradient (``clip`` when it
    is ``per_microbatch``, else ``None``)."""
    isolates_microbatches: bool = field(init=False, repr=False, compare=False)
    """True when each microbatch's gradient must be computed on its own
    before it joins the window (per-microbatch clipping or the
    ``drop_microbatch`` policy)."""
    accumulates_outside_grad: bool = field(init=False, repr=False, compare=False)
    """True when the window's gradient is kept outside ``param.grad``
    (float32 buffers, CPU offload, or isolated microbatches), where a
    backward's own communication cannot reduce it."""

    def __init__(
        self,
        steps: int | None = None,
        *,
        schedule: Schedule | None = None,
        normalization: Normalization = "mean",
        partial_window: PartialWindowPolicy = "step",
        non_finite: NonFinitePolicy = "skip",
        clip: ClipPolicy | None = None,
        weights: GradientWeights | None = None,
        accumulation_dtype: AccumulationDType = "param",
        offload: bool = False,
        micro_batch_size: int | None = None,
    ) -> None:
        if steps is not None and schedule is not None:
            raise ConfigError(
                f"both steps={steps!r} and schedule={schedule!r} given; pass one of them"
            )
        if schedule is None:
            schedule = Fixed(1 if steps is None else steps)
        if not isinstance(schedule, Schedule):
            raise ConfigError(
                f"schedule={schedule!r} is not a gradaccum Schedule; use Fixed(k), "
                f"ByEpoch({{epoch: k}}), ByStep({{window: k}}), TargetBatch(...) "
                f"or AdaptiveMicrobatch(...)"
            )
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_choice("partial_window", partial_window, PARTIAL_WINDOW_POLICIES)
        check_choice("non_finite", non_finite, NON_FINITE_POLICIES)
        check_choice("accumulation_dtype", accumulation_dtype, ACCUMULATION_DTYPES)
        if clip is not None and not isinstance(clip, ClipPolicy):
            raise ConfigError(f"clip={clip!r} must be a ClipPolicy or None")
        weights = GradientWeights() if weights is None else weights
        if not isinstance(weights, GradientWeights):
            raise ConfigError(
                f"weights={weights!r} must be a GradientWeights; use GradientWeights.of(...)"
            )
        if not isinstance(offload, bool):
            raise ConfigError(f"offload={offload!r} must be True or False")
        if micro_batch_size is not None and (
            isinstance(micro_batch_size, bool)
            or not isinstance(micro_batch_size, int)
            or micro_batch_size < 1
        ):
            raise ConfigError(f"micro_batch_size={micro_batch_size!r} must be an int >= 1 or None")
        if schedule.requires_items and normalization != "items":
            raise ConfigError(
                f"the {schedule.kind!r} schedule makes microbatches of unequal size, which only "
                f"normalization='items' keeps exact; got normalization={normalization!r}"
            )
        for name, value in (
            ("schedule", schedule),
            ("normalization", normalization),
            ("partial_window", partial_window),
            ("non_finite", non_finite),
            ("clip", clip),
            ("weights", weights),
            ("accumulation_dtype", accumulation_dtype),
            ("offload", offload),
            ("micro_batch_size", micro_batch_size),
        ):
            object.__setattr__(self, name, value)
        # Derived once: the state machine reads these on every microbatch.
        per_microbatch = clip if clip is not None and clip.per_microbatch else None
        isolates = non_finite == "drop_microbatch" or per_microbatch is not None
        object.__setattr__(self, "microbatch_clip", per_microbatch)
        object.__setattr__(self, "isolates_microbatches", isolates)
        object.__setattr__(
            self,
            "accumulates_outside_grad",
            accumulation_dtype == "float32" or offload or isolates,
        )

    def replace(self, **changes: Any) -> AccumulationConfig:
        """A copy with ``changes`` applied and validated."""
        current = {name: getattr(self, name) for name in _KEYS}
        current.update(changes)
        return AccumulationConfig(**current)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; `from_dict` inverts it exactly."""
        return {
            "schedule": self.schedule.to_dict(),
            "normalization": self.normalization,
            "partial_window": self.partial_window,
            "non_finite": self.non_finite,
            "clip": None if self.clip is None else self.clip.to_dict(),
            "weights": self.weights.to_dict(),
            "accumulation_dtype": self.accumulation_dtype,
            "offload": self.offload,
            "micro_batch_size": self.micro_batch_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccumulationConfig:
        """Parse and validate the JSON form written by `to_dict`.

        Every malformed input raises `ConfigError` naming the entry and the
        value — never another exception: a value that is not a mapping, keys
        that are not strings, nesting deeper than 64 levels (or a cycle),
        integers outside ``[-2**63, 2**64 - 1]``, an entry of the wrong shape
        (``{"weights": {"by_group": 5}}``) or type."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"config must be a mapping such as AccumulationConfig(4).to_dict(), got "
                f"{type(data).__name__}"
            )
        _check_json_like(data, "config", 0)
        _known_keys("config", data, _KEYS)
        if "schedule" not in data:
            raise ConfigError(
                "config needs a 'schedule' entry such as {'kind': 'fixed', 'steps': 4}"
            )
        schedule = _part("schedule", data["schedule"], schedule_from_dict)
        clip = data.get("clip")
        weights = data.get("weights")
        if isinstance(clip, Mapping) and "norm_type" in clip:
            norm_type = clip["norm_type"]
            if norm_type != "inf" and (
                isinstance(norm_type, bool) or not isinstance(norm_type, (int, float))
            ):
                raise ConfigError(
                    f"clip norm_type={_show(norm_type)} must be a number such as 2.0 or the "
                    "string 'inf'"
                )
        config: AccumulationConfig = _part(
            "config",
            data,
            lambda _: cls(
                schedule=schedule,
                normalization=data.get("normalization", "mean"),
                partial_window=data.get("partial_window", "step"),
                non_finite=data.get("non_finite", "skip"),
                clip=None if clip is None else _part("clip", clip, ClipPolicy.from_dict),
                weights=(
                    None if weights is None else _part("weights", weights, _weights_from_dict)
                ),
                accumulation_dtype=data.get("accumulation_dtype", "param"),
                offload=data.get("offload", False),
                micro_batch_size=data.get("micro_batch_size"),
            ),
        )
        _part("config", data, lambda _: config.to_dict())  # what is accepted must serialise
        return config


_MAX_DEPTH = 64
_INT_BITS = 64
_EXAMPLES = {
    "schedule": "{'kind': 'fixed', 'steps': 4}",
    "clip": "{'mode': 'norm', 'max': 1.0, 'norm_type': 2.0, 'per_microbatch': False}",
    "weights": "{'by_name': {'*.bias': 0.0}, 'by_group': {'#0': 1.0}}",
    "config": "AccumulationConfig(4).to_dict()",
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_json_like(value: Any, where: str, depth: int) -> None:
    """Refuse what no parser below should see: non-string keys, nesting
    deeper than `_MAX_DEPTH` (cycles included), out-of-range integers."""
    if isinstance(value, (Mapping, list, tuple)):
        if depth >= _MAX_DEPTH:
            raise ConfigError(
                f"{where[:200]} nests more than {_MAX_DEPTH} levels deep (or contains itself); "
                "a config is a shallow JSON object — write it as to_dict() does"
            )
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ConfigError(
                        f"{where} has the key {_show(key)} of type {type(key).__name__}; config "
                        "keys are strings (as in to_dict() output)"
                    )
                _check_json_like(item, f"{where}[{key!r}]", depth + 1)
        else:
            for index, item in enumerate(value):
                _check_json_like(item, f"{where}[{index}]", depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise ConfigError(
            f"{where} is a {type(value).__name__} ({_show(value)}), which is not a JSON value; "
            "a config holds only null, booleans, numbers, strings, lists and objects"
        )
    elif isinstance(value, int) and value.bit_length() > _INT_BITS:
        raise ConfigError(
            f"{where} is an integer of about {int(value.bit_length() * 0.30103)} digits; "
            "config numbers must lie within [-2**63, 2**64 - 1]"
        )


def _weights_from_dict(data: Any) -> GradientWeights:
    if isinstance(data, Mapping):
        for key in ("by_name", "by_group"):
            if key in data and not isinstance(data[key], Mapping):
                raise ConfigError(
                    f"weights[{key!r}]={_show(data[key])} must be a mapping of names to "
                    f"weights, e.g. {_EXAMPLES['weights']}"
                )
    return GradientWeights.from_dict(data)


def _part(name: str, value: Any, parse: Any) -> Any:
    """``parse(value)``, with any error other than `ConfigError` (the
    parsers expect the JSON shape `to_dict` writes) turned into one naming
    the entry, the value and the expected form."""
    try:
        return parse(value)
    except ConfigError:
        raise
    except (
        TypeError,
        ValueError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
        RecursionError,
    ) as exc:
        shown = "config" if name == "config" else f"config[{name!r}]"
        raise ConfigError(
            f"{shown}={_show(value)} is malformed ({type(exc).__name__}: {str(exc)[:200]}); "
            f"write it as to_dict() does, e.g. {_EXAMPLES[name]}"
        ) from None
