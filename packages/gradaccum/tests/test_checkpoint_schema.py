"""The manifest schema and the small validator, cross-checked against ``jsonschema``
(spec promise CKPT-2)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradaccum.checkpoint import SchemaValidator, manifest_schema
from gradaccum.errors import UsageError

jsonschema = pytest.importorskip("jsonschema")

TESTS = Path(__file__).parent
REPO = TESTS.parents[2]
PACKAGE_SCHEMA = TESTS.parent / "src" / "gradaccum" / "schemas" / "checkpoint-v1.schema.json"
SPEC_SCHEMA = REPO / "spec" / "checkpoint-v1.schema.json"
FIXTURE_MANIFEST = TESTS / "fixtures" / "checkpoint-v1-minimal" / "manifest.json"

SCHEMA = manifest_schema(1)
OURS = SchemaValidator(SCHEMA)
THEIRS = jsonschema.Draft202012Validator(SCHEMA)
SCHEMA_V2 = manifest_schema(2)
OURS_V2 = SchemaValidator(SCHEMA_V2)
THEIRS_V2 = jsonschema.Draft202012Validator(SCHEMA_V2)
SCHEMA_V3 = manifest_schema(3)


def _base() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(FIXTURE_MANIFEST.read_text(encoding="utf-8"))
    return manifest


def _paths(errors: Any) -> set[str]:
    return {e.path for e in errors}


def _theirs_paths(instance: Any) -> set[str]:
    return {e.json_path for e in THEIRS.iter_errors(instance)}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_schema_in_package_and_spec_are_byte_identical(version: int) -> None:
    """CKPT-2: the schema of each format version shipped in the wheel is the one in spec/."""
    name = f"checkpoint-v{version}.schema.json"
    assert (PACKAGE_SCHEMA.parent / name).read_bytes() == (SPEC_SCHEMA.parent / name).read_bytes()
    assert manifest_schema(version) == json.loads((SPEC_SCHEMA.parent / name).read_text())


@pytest.mark.parametrize("schema", [SCHEMA, SCHEMA_V2, SCHEMA_V3], ids=["v1", "v2", "v3"])
def test_schema_is_a_valid_draft_2020_12_schema(schema: dict[str, Any]) -> None:
    """CKPT-2: each schema itself is valid JSON Schema 2020-12."""
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_v2_schema_differs_from_v1_only_where_ckpt_25_says() -> None:
    """CKPT-25: the format-2 schema is the format-1 schema with
    ``format_version`` 2 and each file's ``sha256`` replaced by
    ``header_sha256`` (tensor entries unchanged); nothing else differs."""
    v1, v2 = manifest_schema(1), manifest_schema(2)
    assert v2["properties"]["format_version"] == {"const": 2}
    assert v1["properties"]["format_version"] == {"const": 1}
    f1, f2 = v1["$defs"]["file"], v2["$defs"]["file"]
    assert f1["required"] == ["path", "size", "sha256", "tensors"]
    assert f2["required"] == ["path", "size", "header_sha256", "tensors"]
    assert f2["properties"]["header_sha256"] == f1["properties"]["sha256"]
    assert {k: v for k, v in f2["properties"].items() if k != "header_sha256"} == {
        k: v for k, v in f1["properties"].items() if k != "sha256"
    }
    for schema in (v1, v2):
        for key in ("$id", "title", "description"):
            del schema[key]
        del schema["properties"]["format_version"]
        del schema["$defs"]["file"]
    assert v1 == v2


def test_v3_schema_differs_from_v2_only_where_ckpt_26_says() -> None:
    """CKPT-26: the format-3 schema is the format-2 schema with
    ``format_version`` 3 and each tensor's ``sha256`` (64 hex digits)
    replaced by ``crc32`` (8 lowercase hex digits); nothing else differs."""
    v2, v3 = manifest_schema(2), manifest_schema(3)
    assert v3["properties"]["format_version"] == {"const": 3}
    assert v3["$defs"]["crc32"] == {"type": "string", "pattern": "^[0-9a-f]{8}$"}
    t2, t3 = v2["$defs"]["tensor"], v3["$defs"]["tensor"]
    assert t2["required"] == ["dtype", "shape", "sha256"]
    assert t3["required"] == ["dtype", "shape", "crc32"]
    assert t3["properties"]["crc32"] == {"$ref": "#/$defs/crc32"}
    assert {k: v for k, v in t3["properties"].items() if k != "crc32"} == {
        k: v for k, v in t2["properties"].items() if k != "sha256"
    }
    for schema in (v2, v3):
        for key in ("$id", "title", "description"):
            del schema[key]
        del schema["properties"]["format_version"]
        del schema["$defs"]["tensor"]
    del v3["$defs"]["crc32"]
    assert v2 == v3


@pytest.mark.parametrize("bad", [0, 4, "2", True, None])
def test_manifest_schema_refuses_unknown_versions(bad: Any) -> None:
    with pytest.raises(UsageError, match="format_version"):
        manifest_schema(bad)


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return apply


def _delete(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return apply


_G = ("files", "gradients")
_T = (*_G, "tensors", "fc.weight")

# (mutation, the JSON path jsonschema reports); None as path means "still valid".
CORPUS: list[tuple[str, Callable[[dict[str, Any]], None], str | None]] = [
    ("unchanged", lambda d: None, None),
    ("no files", _set(("files",), {}), None),
    ("no metadata", _set(("metadata",), {}), None),
    ("no device_items", _delete(("state", "device_items")), None),
    ("int created_unix", _set(("created_unix",), 5), None),
    ("integral float counter", _set(("state", "epoch"), 2.0), None),
    ("huge counter", _set(("state", "micro_steps"), 2**70), None),
    (
        "unicode tensor name",
        _set((*_G, "tensors", "ü.weight"), {"dtype": "F16", "shape": [], "sha256": "0" * 64}),
        None,
    ),
    (
        "rank role",
        _set(
            ("files", "gradients.rank1"),
            {"path": "gradients.rank1.safetensors", "size": 8, "sha256": "a" * 64, "tensors": {}},
        ),
        None,
    ),
    ("metadata any json", _set(("metadata", "scaler"), [1, None, "x", {"a": []}]), None),
    ("config extra key", _set(("config", "anything"), {"x": 1}), None),
    ("missing format", _delete(("format",)), "$"),
    ("wrong format", _set(("format",), "other"), "$.format"),
    ("format_version 2", _set(("format_version",), 2), "$.format_version"),
    ("format_version string", _set(("format_version",), "1"), "$.format_version"),
    ("format_version true", _set(("format_version",), True), "$.format_version"),
    ("missing spec_version", _delete(("spec_version",)), "$"),
    ("bad spec_version", _set(("spec_version",), "1.0"), "$.spec_version"),
    ("unknown top key", _set(("extra",), 1), "$"),
    ("producer extra", _set(("producer", "extra"), "x"), "$.producer"),
    ("producer blank name", _set(("producer", "name"), "  "), "$.producer.name"),
    ("producer version int", _set(("producer", "version"), 1), "$.producer.version"),
    ("created negative", _set(("created_unix",), -1.0), "$.created_unix"),
    ("created string", _set(("created_unix",), "now"), "$.created_unix"),
    ("world_size 0", _set(("world_size",), 0), "$.world_size"),
    ("world_size float", _set(("world_size",), 1.5), "$.world_size"),
    ("world_size bool", _set(("world_size",), True), "$.world_size"),
    ("state not object", _set(("state",), []), "$.state"),
    ("state missing key", _delete(("state", "windows")), "$.state"),
    ("state unknown key", _set(("state", "phase"), "idle"), "$.state"),
    ("state version 2", _set(("state", "version"), 2), "$.state.version"),
    ("negative counter", _set(("state", "micro_steps"), -1), "$.state.micro_steps"),
    ("string counter", _set(("state", "epoch"), "0"), "$.state.epoch"),
    ("null counter", _set(("state", "position"), None), "$.state.position"),
    ("bool counter", _set(("state", "windows"), False), "$.state.windows"),
    ("synced not bool", _set(("state", "synced_in_window"), 0), "$.state.synced_in_window"),
    ("device_items not bool", _set(("state", "device_items"), "no"), "$.state.device_items"),
    ("schedule_state list", _set(("state", "schedule_state"), []), "$.state.schedule_state"),
    ("config not object", _set(("config",), "mean"), "$.config"),
    ("config missing schedule", _delete(("config", "schedule")), "$.config"),
    ("files not object", _set(("files",), []), "$.files"),
    ("bad role", _set(("files", "Gradients"), {}), "$.files"),
    ("bad role dash", _set(("files", "grad-ients"), {}), "$.files"),
    ("file missing sha", _delete((*_G, "sha256")), "$.files.gradients"),
    ("file extra key", _set((*_G, "mtime"), 0), "$.files.gradients"),
    ("file path pattern", _set((*_G, "path"), "../x.safetensors"), "$.files.gradients.path"),
    ("file size tiny", _set((*_G, "size"), 7), "$.files.gradients.size"),
    ("file sha upper", _set((*_G, "sha256"), "A" * 64), "$.files.gradients.sha256"),
    ("file sha short", _set((*_G, "sha256"), "a" * 63), "$.files.gradients.sha256"),
    ("tensors not object", _set((*_G, "tensors"), []), "$.files.gradients.tensors"),
    ("tensor empty name", _set((*_G, "tensors", ""), {}), "$.files.gradients.tensors"),
    (
        "tensor bad dtype",
        _set((*_T, "dtype"), "float32"),
        "$.files.gradients.tensors['fc.weight'].dtype",
    ),
    (
        "tensor negative dim",
        _set((*_T, "shape"), [2, -3]),
        "$.files.gradients.tensors['fc.weight'].shape[1]",
    ),
    (
        "tensor shape string",
        _set((*_T, "shape"), "2x3"),
        "$.files.gradients.tensors['fc.weight'].shape",
    ),
    (
        "tensor float dim",
        _set((*_T, "shape"), [2.5]),
        "$.files.gradients.tensors['fc.weight'].shape[0]",
    ),
    ("tensor extra key", _set((*_T, "offsets"), [0, 1]), "$.files.gradients.tensors['fc.weight']"),
    ("tensor missing shape", _delete((*_T, "shape")), "$.files.gradients.tensors['fc.weight']"),
    ("metadata bad role", _set(("metadata", "Opt"), {}), "$.metadata"),
    ("metadata not object", _set(("metadata",), None), "$.metadata"),
    ("manifest not object", lambda d: d.clear(), "$"),
]


@pytest.mark.parametrize(
    ("mutate", "path"), [(m, p) for _, m, p in CORPUS], ids=[name for name, _, _ in CORPUS]
)
def test_same_verdict_as_jsonschema(
    mutate: Callable[[dict[str, Any]], None], path: str | None
) -> None:
    """CKPT-2: our validator and ``jsonschema`` agree on every manifest of the
    corpus — verdict and the JSON paths of the failures."""
    doc = _base()
    mutate(doc)
    ours = list(OURS.iter_errors(doc))
    assert OURS.is_valid(doc) == THEIRS.is_valid(doc) == (path is None)
    assert _paths(ours) == _theirs_paths(doc)
    if path is not None:
        assert path in _paths(ours)
        assert all(str(e).startswith(f"at {e.path}: ") for e in ours)


def _base_v2() -> dict[str, Any]:
    doc = _base()
    doc["format_version"] = 2
    doc["spec_version"] = "2.0.0"
    for entry in doc["files"].values():
        entry["header_sha256"] = entry.pop("sha256")
    return doc


CORPUS_V2: list[tuple[str, Callable[[dict[str, Any]], None], str | None]] = [
    ("unchanged", lambda d: None, None),
    ("no files", _set(("files",), {}), None),
    ("format_version 1", _set(("format_version",), 1), "$.format_version"),
    ("whole-file sha256 added", _set((*_G, "sha256"), "a" * 64), "$.files.gradients"),
    ("header digest missing", _delete((*_G, "header_sha256")), "$.files.gradients"),
    (
        "header digest upper",
        _set((*_G, "header_sha256"), "A" * 64),
        "$.files.gradients.header_sha256",
    ),
    ("tensor digest missing", _delete((*_T, "sha256")), "$.files.gradients.tensors['fc.weight']"),
    (
        "v1 file entry",
        _set(
            ("files", "gradients.rank1"),
            {"path": "gradients.rank1.safetensors", "size": 8, "sha256": "a" * 64, "tensors": {}},
        ),
        "$.files['gradients.rank1']",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "path"), [(m, p) for _, m, p in CORPUS_V2], ids=[name for name, _, _ in CORPUS_V2]
)
def test_v2_same_verdict_as_jsonschema(
    mutate: Callable[[dict[str, Any]], None], path: str | None
) -> None:
    """CKPT-2, CKPT-25: on format-2 manifests too, our validator and
    ``jsonschema`` agree — verdict and the JSON paths of the failures."""
    doc = _base_v2()
    mutate(doc)
    _assert_same_verdict(OURS_V2, THEIRS_V2, doc, path)


def _assert_same_verdict(
    ours: SchemaValidator, theirs: Any, doc: dict[str, Any], path: str | None
) -> None:
    """Both validators accept ``doc`` (``path`` None) or both refuse it at the same
    JSON paths, ``path`` among them."""
    errors = list(ours.iter_errors(doc))
    assert ours.is_valid(doc) == theirs.is_valid(doc) == (path is None)
    assert _paths(errors) == {e.json_path for e in theirs.iter_errors(doc)}
    if path is not None:
        assert path in _paths(errors)


OURS_V3 = SchemaValidator(SCHEMA_V3)
THEIRS_V3 = jsonschema.Draft202012Validator(SCHEMA_V3)


def _base_v3() -> dict[str, Any]:
    doc = _base_v2()
    doc["format_version"] = 3
    doc["spec_version"] = "3.0.0"
    for entry in doc["files"].values():
        for tensor in entry["tensors"].values():
            tensor["crc32"] = tensor.pop("sha256")[:8]
    return doc


_TE = "$.files.gradients.tensors['fc.weight']"
_TC = _TE + ".crc32"

CORPUS_V3: list[tuple[str, Callable[[dict[str, Any]], None], str | None]] = [
    ("unchanged", lambda d: None, None),
    ("no files", _set(("files",), {}), None),
    ("format_version 2", _set(("format_version",), 2), "$.format_version"),
    ("tensor crc32 missing", _delete((*_T, "crc32")), "$.files.gradients.tensors['fc.weight']"),
    ("tensor crc32 upper", _set((*_T, "crc32"), "ABCDEF01"), _TC),
    ("tensor crc32 short", _set((*_T, "crc32"), "abcdef0"), _TC),
    ("tensor crc32 long", _set((*_T, "crc32"), "a" * 64), _TC),
    ("tensor crc32 number", _set((*_T, "crc32"), 12345678), _TC),
    ("tensor sha256 added", _set((*_T, "sha256"), "a" * 64), _TE),
    ("header digest missing", _delete((*_G, "header_sha256")), "$.files.gradients"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "path"), [(m, p) for _, m, p in CORPUS_V3], ids=[name for name, _, _ in CORPUS_V3]
)
def test_v3_same_verdict_as_jsonschema(
    mutate: Callable[[dict[str, Any]], None], path: str | None
) -> None:
    """CKPT-2, CKPT-26: on format-3 manifests too, our validator and
    ``jsonschema`` agree — verdict and the JSON paths of the failures."""
    doc = _base_v3()
    mutate(doc)
    _assert_same_verdict(OURS_V3, THEIRS_V3, doc, path)


def test_messages_name_expected_and_seen() -> None:
    doc = _base()
    doc["state"]["micro_steps"] = -1
    doc["state"]["epoch"] = "zero"
    doc["extra"] = True
    messages = {str(e) for e in OURS.iter_errors(doc)}
    assert "at $.state.micro_steps: expected a number >= 0, got -1" in messages
    assert 'at $.state.epoch: expected integer, got string "zero"' in messages
    assert any(m.startswith("at $: unexpected key 'extra'; allowed: 'format'") for m in messages)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 2**65)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["F32", "0" * 64, "gradients", "x.safetensors"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _locations(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _locations(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            out += _locations(value, (*prefix, index))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_mutations_get_the_same_verdict(data: st.DataObject) -> None:
    """CKPT-2: random edits anywhere in a valid manifest (replace a value,
    delete a key, add a key) get the same verdict and failure paths from
    both validators."""
    doc: Any = _base()
    for _ in range(data.draw(st.integers(1, 3))):
        location = data.draw(st.sampled_from(_locations(doc)))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        parent: Any = doc
        for key in location[:-1]:
            parent = parent[key]
        if not location:
            if action == "replace":
                doc = data.draw(_json)
            continue
        target = location[-1]
        if action == "replace":
            parent[target] = data.draw(_json)
        elif action == "delete":
            del parent[target]
        else:
            node = parent[target]
            if isinstance(node, dict):
                node[data.draw(st.text(max_size=8))] = data.draw(_json)
            elif isinstance(node, list):
                node.append(data.draw(_json))
    snapshot = copy.deepcopy(doc)
    assert OURS.is_valid(doc) == THEIRS.is_valid(doc)
    assert _paths(OURS.iter_errors(doc)) == _theirs_paths(doc)
    assert doc == snapshot  # validation does not mutate


# --------------------------------------------------------------------- generic validator


@pytest.mark.parametrize(
    ("schema", "instance"),
    [
        ({"type": "integer"}, 1.0),
        ({"type": "integer"}, True),
        ({"type": "number"}, False),
        ({"type": ["string", "null"]}, None),
        ({"const": 1}, 1.0),
        ({"const": 1}, True),
        ({"const": False}, 0),
        ({"enum": [[1, 2], {"a": 1}]}, [1.0, 2]),
        ({"enum": [[1, 2], {"a": 1}]}, [True, 2]),
        ({"minimum": 0}, True),
        ({"minimum": 0}, -0.5),
        ({"minimum": 0}, "x"),
        ({"pattern": "^a"}, "ba"),
        ({"pattern": "b"}, "abc"),
        ({"pattern": "^a$"}, "a\n"),
        ({"minItems": 2, "items": {"type": "string"}}, ["a"]),
        ({"minItems": 2, "items": {"type": "string"}}, ["a", 1]),
        ({"$defs": {"a~b/c": {"type": "string"}}, "$ref": "#/$defs/a~0b~1c"}, 3),
        ({"properties": {"a": False}}, {"a": 1}),
        ({"properties": {"a": False}}, {"b": 1}),
        (
            {"patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False},
            {"x1": 1, "xy": "s"},
        ),
        ({"additionalProperties": {"type": "integer"}}, {"a": 1, "b": "2"}),
        (True, {"anything": []}),
        (False, None),
    ],
)
def test_keyword_semantics_match_jsonschema(schema: Any, instance: Any) -> None:
    """Each implemented keyword has draft 2020-12 semantics (``1.0`` is an
    integer, ``true`` is not a number, equality is JSON equality)."""
    ours = SchemaValidator(schema)
    theirs = jsonschema.Draft202012Validator(schema)
    assert ours.is_valid(instance) == theirs.is_valid(instance)
    if schema == {"properties": {"a": False}}:
        # jsonschema reports a `false` subschema's failure at the parent ("$");
        # we report it at the failing value ("$.a"). The manifest schema has none.
        assert _paths(ours.iter_errors(instance)) <= {"$.a"}
        return
    assert _paths(ours.iter_errors(instance)) == {e.json_path for e in theirs.iter_errors(instance)}


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ({"maxItems": 2}, r"uses \['maxItems'\], which this validator does not implement"),
        ({"properties": {"a": {"oneOf": []}}}, r"schema at #/properties/a uses \['oneOf'\]"),
        ({"type": "float"}, r"unknown type 'float'"),
        ({"pattern": "("}, r"bad pattern '\('"),
        ({"$ref": "#/$defs/missing"}, r"does not resolve"),
        ({"$ref": "other.json"}, r"is not local"),
        ({"items": 3}, r"not an object or boolean"),
    ],
)
def test_refuses_schemas_it_cannot_honour(schema: Any, match: str) -> None:
    """A schema using a keyword the validator does not implement is refused
    when the validator is built, never silently ignored."""
    with pytest.raises(UsageError, match=match):
        SchemaValidator(schema)
