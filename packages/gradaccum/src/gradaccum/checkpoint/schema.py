"""A small JSON Schema (draft 2020-12) validator, and the manifest schema.

It implements exactly the keywords the checkpoint schema uses — ``type``,
``required``, ``properties``, ``additionalProperties``, ``patternProperties``,
``enum``, ``const``, ``pattern``, ``minimum``, ``maximum``, ``items``, ``minItems`` and
``$ref`` to ``#/...`` — with the draft's semantics (``1.0`` is an integer,
``true`` is not a number, ``pattern`` is a regular-expression *search*), and
refuses, when it is built, a schema that uses any other assertion keyword.
The test suite checks that it gives the same verdict as the reference
``jsonschema`` library on a corpus of valid and invalid manifests.

Each violation carries the JSON path of the failing value (``$.state.epoch``,
``$.files['gradients'].tensors['w'].shape[0]``) and what was expected.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradaccum.errors import UsageError

__all__ = [
    "SCHEMA_VERSIONS",
    "SchemaValidator",
    "SchemaViolation",
    "json_path",
    "manifest_schema",
    "manifest_validator",
]

_ASSERTIONS = frozenset(
    {
        "type",
        "required",
        "properties",
        "additionalProperties",
        "patternProperties",
        "enum",
        "const",
        "pattern",
        "minimum",
        "maximum",
        "items",
        "minItems",
        "$ref",
    }
)
# Keywords that carry no assertion: identifiers, annotations, definitions.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$defs", "$comment", "title", "description", "examples", "default"}
)
_TYPES = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SchemaViolation:
    """One failed assertion: ``location`` is the keys and indices from the
    root to the failing value, ``path`` the same as a JSON path (``$`` is the
    root, as ``jsonschema``'s ``ValidationError.json_path`` writes it), and
    ``message`` says what was expected and what was seen."""

    location: tuple[str | int, ...]
    message: str

    @property
    def path(self) -> str:
        """`location` as a JSON path such as ``$.files['gradients.rank1'].size``."""
        return json_path(self.location)

    def __str__(self) -> str:
        return f"at {self.path}: {self.message}"


def json_path(parts: tuple[str | int, ...]) -> str:
    """Render keys and indices as a JSON path, ``$.a['b.c'][0]`` (the notation
    of ``jsonschema``'s ``ValidationError.json_path``)."""
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENTIFIER.fullmatch(part):
            out.append(f".{part}")
        else:
            escaped = part.replace("\\", "\\\\").replace("'", "\\'")
            out.append(f"['{escaped}']")
    return "".join(out)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return _type_name(value) == name


def _json_equal(a: Any, b: Any) -> bool:
    """Equality in the JSON data model: ``1 == 1.0`` but ``true != 1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if _is_json(value) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class SchemaValidator:
    """Validates JSON values against ``schema`` (a draft 2020-12 schema using
    only the keywords this module implements). Building it raises
    `UsageError` if the schema uses another assertion
    keyword, an unknown type, a malformed regular expression or a ``$ref``
    that does not resolve inside the schema."""

    def __init__(self, schema: Mapping[str, Any] | bool) -> None:
        self._root = schema
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._check(schema, "#")

    def _check(self, schema: Any, where: str) -> None:
        if isinstance(schema, bool):
            return
        if not isinstance(schema, Mapping):
            raise UsageError(f"schema at {where} is {_show(schema)}, not an object or boolean")
        unknown = set(schema) - _ASSERTIONS - _ANNOTATIONS
        if unknown:
            raise UsageError(
                f"schema at {where} uses {sorted(unknown)}, which this validator does not "
                f"implement; use only {sorted(_ASSERTIONS)}"
            )
        types = schema.get("type", [])
        for t in [types] if isinstance(types, str) else types:
            if t not in _TYPES:
                raise UsageError(f"schema at {where} names unknown type {t!r}")
        for key in ("pattern",):
            if key in schema:
                self._compile(schema[key], where)
        for pattern, sub in schema.get("patternProperties", {}).items():
            self._compile(pattern, where)
            self._check(sub, f"{where}/patternProperties/{pattern}")
        for name, sub in schema.get("properties", {}).items():
            self._check(sub, f"{where}/properties/{name}")
        for key in ("additionalProperties", "items"):
            if key in schema:
                self._check(schema[key], f"{where}/{key}")
        for name, sub in schema.get("$defs", {}).items():
            self._check(sub, f"{where}/$defs/{name}")
        if "$ref" in schema:
            self._resolve(schema["$ref"])

    def _compile(self, pattern: str, where: str) -> re.Pattern[str]:
        compiled = self._patterns.get(pattern)
        if compiled is None:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"schema at {where} has a bad pattern {pattern!r}: {exc}") from exc
            self._patterns[pattern] = compiled
        return compiled

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise UsageError(f"$ref {ref!r} is not local; only '#/...' references are supported")
        node: Any = self._root
        for raw in ref[1:].split("/")[1:]:
            token = raw.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or token not in node:
                raise UsageError(f"$ref {ref!r} does not resolve inside the schema")
            node = node[token]
        return node

    def is_valid(self, instance: Any) -> bool:
        """True when ``instance`` satisfies the schema."""
        return next(self.iter_errors(instance), None) is None

    def iter_errors(self, instance: Any) -> Iterator[SchemaViolation]:
        """Every violation, depth first, in document order."""
        yield from self._validate(instance, self._root, ())

    def _validate(
        self, value: Any, schema: Any, path: tuple[str | int, ...]
    ) -> Iterator[SchemaViolation]:
        if schema is True:
            return
        if schema is False:
            yield SchemaViolation(path, f"no value is allowed here, got {_show(value)}")
            return
        if "$ref" in schema:
            yield from self._validate(value, self._resolve(schema["$ref"]), path)
        if "type" in schema:
            types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
            if not any(_is_type(value, t) for t in types):
                yield SchemaViolation(
                    path, f"expected {' or '.join(types)}, got {_type_name(value)} {_show(value)}"
                )
                return
        if "const" in schema and not _json_equal(value, schema["const"]):
            yield SchemaViolation(path, f"expected {_show(schema['const'])}, got {_show(value)}")
        if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
            choices = ", ".join(_show(e) for e in schema["enum"])
            yield SchemaViolation(path, f"expected one of {choices}; got {_show(value)}")
        if (
            isinstance(value, str)
            and "pattern" in schema
            and not self._patterns[schema["pattern"]].search(value)
        ):
            yield SchemaViolation(
                path, f"{_show(value)} does not match the pattern {schema['pattern']!r}"
            )
        if (
            "minimum" in schema
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value < schema["minimum"]
        ):
            yield SchemaViolation(path, f"expected a number >= {schema['minimum']}, got {value}")
        if (
            "maximum" in schema
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value > schema["maximum"]
        ):
            yield SchemaViolation(path, f"expected a number <= {schema['maximum']}, got {value}")
        if isinstance(value, list):
            if "minItems" in schema and len(value) < schema["minItems"]:
                yield SchemaViolation(
                    path, f"expected at least {schema['minItems']} items, got {len(value)}"
                )
            if "items" in schema:
                for index, item in enumerate(value):
                    yield from self._validate(item, schema["items"], (*path, index))
        if isinstance(value, dict):
            yield from self._validate_object(value, schema, path)

    def _validate_object(
        self, value: dict[str, Any], schema: Mapping[str, Any], path: tuple[str | int, ...]
    ) -> Iterator[SchemaViolation]:
        for key in schema.get("required", ()):
            if key not in value:
                yield SchemaViolation(path, f"missing required key {key!r}")
        properties: Mapping[str, Any] = schema.get("properties", {})
        patterns: Mapping[str, Any] = schema.get("patternProperties", {})
        for key, item in value.items():
            matched = False
            if key in properties:
                matched = True
                yield from self._validate(item, properties[key], (*path, key))
            for pattern, sub in patterns.items():
                if self._patterns[pattern].search(key):
                    matched = True
                    yield from self._validate(item, sub, (*path, key))
            if not matched and "additionalProperties" in schema:
                extra = schema["additionalProperties"]
                if extra is False:
                    allowed = ", ".join(repr(k) for k in properties) or (
                        "keys matching " + ", ".join(repr(p) for p in patterns)
                    )
                    yield SchemaViolation(path, f"unexpected key {key!r}; allowed: {allowed}")
                else:
                    yield from self._validate(item, extra, (*path, key))


_SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
#: The format versions whose manifest schema ships with this release.
SCHEMA_VERSIONS = (1, 2, 3)


def _schema_path(format_version: int) -> Path:
    if format_version not in SCHEMA_VERSIONS:
        raise UsageError(
            f"format_version {format_version!r} has no manifest schema; use one of "
            f"{', '.join(str(v) for v in SCHEMA_VERSIONS)}"
        )
    return _SCHEMA_DIR / f"checkpoint-v{format_version}.schema.json"


@functools.lru_cache(maxsize=4)
def _load_manifest_schema(format_version: int) -> tuple[dict[str, Any], SchemaValidator]:
    schema = json.loads(_schema_path(format_version).read_text(encoding="utf-8"))
    return schema, SchemaValidator(schema)


def manifest_schema(format_version: int = 3) -> dict[str, Any]:
    """The JSON Schema of a manifest of ``format_version`` (1, 2 or 3; a fresh
    copy of the file ``gradaccum/schemas/checkpoint-v<N>.schema.json``
    shipped in the wheel, byte-identical to ``spec/checkpoint-v<N>.schema.json``).
    Another version raises `UsageError`."""
    schema, _ = _load_manifest_schema(_checked(format_version))
    result: dict[str, Any] = json.loads(json.dumps(schema))
    return result


def manifest_validator(format_version: int = 3) -> SchemaValidator:
    """A (cached) validator for the manifest schema of ``format_version`` (1, 2 or 3)."""
    return _load_manifest_schema(_checked(format_version))[1]


def _checked(format_version: Any) -> int:
    if type(format_version) is not int:
        raise UsageError(
            f"format_version {format_version!r} is not an integer; use one of "
            f"{', '.join(str(v) for v in SCHEMA_VERSIONS)}"
        )
    _schema_path(format_version)
    return format_version
