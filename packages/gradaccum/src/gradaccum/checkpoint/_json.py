"""Strict, bounded JSON parsing for everything a checkpoint reader parses.

`loads_strict` is `json.loads` with the limits spec promise CKPT-20 states:
no duplicate object keys, no ``NaN``/``Infinity``, nesting at most
`MAX_JSON_DEPTH` levels (checked on the text *before* parsing, so a hostile
file cannot exhaust the interpreter's recursion limit), integer literals within
``[-2**63, 2**64 - 1]`` (so no number is too large to convert or print), number
literals that are finite as floats (``1e400`` is refused, not read as
infinity), and no lone surrogate escapes (``"\\ud800"``, which cannot be
encoded as UTF-8). Every refusal is a `ValueError` whose message says which
limit was hit; callers wrap it in their own `CheckpointCorruptError`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

__all__ = ["INT_MAX", "INT_MIN", "MAX_JSON_DEPTH", "check_depth", "loads_strict"]

#: The deepest nesting of arrays and objects a reader accepts (CKPT-20).
MAX_JSON_DEPTH = 64
#: The range of integer literals a reader accepts (CKPT-20): int64 to uint64.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}
_MAX_INT_DIGITS = len(str(INT_MAX))


def check_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise `ValueError` when the arrays and objects of the JSON ``text`` nest
    deeper than ``limit`` (balanced or not). Linear in ``len(text)`` and
    iterative: it never recurses, whatever the input."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return
    depth = max(itertools.accumulate(map(_DELTA.__getitem__, brackets)))
    if depth > limit:
        raise ValueError(
            f"arrays and objects nest {depth} levels deep, more than the {limit} levels "
            "this format allows"
        )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(literal: str) -> int:
    if len(literal.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(
            f"the integer {literal[:24]}… ({len(literal)} digits) is outside [{INT_MIN}, {INT_MAX}]"
        )
    value = int(literal)
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"the integer {literal} is outside [{INT_MIN}, {INT_MAX}]")
    return value


def _parse_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        shown = literal if len(literal) <= 40 else literal[:37] + "..."
        raise ValueError(f"the number {shown} is too large to be a finite float")
    return value


def loads_strict(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``text`` as strict JSON within the limits of CKPT-20; raise
    `ValueError` (with the reason) for anything else."""
    check_depth(text, max_depth)
    value = json.loads(
        text,
        object_pairs_hook=_no_duplicates,
        parse_constant=_reject_constant,
        parse_int=_parse_int,
        parse_float=_parse_float,
    )
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"a string holds a lone surrogate escape ({exc.object[exc.start : exc.end]!r}), "
            "which is not a Unicode character"
        ) from None
    return value
