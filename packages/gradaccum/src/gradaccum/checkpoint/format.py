"""The manifest of a checkpoint: constants, typed records and their validation.

`Manifest.from_json_dict` is the single gate every manifest passes
through, on read and (before anything is written) on write: the format
version (CKPT-3), the JSON Schema (CKPT-2) and the rules the schema cannot
express (integers written as integers, CKPT-2; file paths, CKPT-4; the
accumulation state and config, CKPT-9 and CKPT-10).

The state and config rules are not restated here: `check_state_and_config`
runs the core's own parsers — `AccumulationState.from_state_dict`,
`AccumulationConfig.from_dict` and the schedule's ``check_state``, the
checks `AccumulationMachine.load_state_dict` makes — so a checkpoint that
validates is one every adapter can load, and the invariants live in one place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gradaccum.checkpoint._json import MAX_JSON_DEPTH, loads_strict
from gradaccum.checkpoint.schema import (
    SchemaValidator,
    json_path,
    manifest_schema,
    manifest_validator,
)
from gradaccum.config import AccumulationConfig
from gradaccum.errors import (
    CheckpointChecksumError,
    CheckpointCorruptError,
    CheckpointVersionError,
    ConfigError,
    UsageError,
)
from gradaccum.state import STATE_INT_FIELDS, AccumulationState

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MANIFEST_SHA256_NAME",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "OPTIONAL_STATE_KEYS",
    "PROTECTED_SINCE",
    "ROLE_PATTERN",
    "SPEC_VERSION",
    "SPEC_VERSIONS",
    "STATE_KEYS",
    "SUPPORTED_FORMAT_VERSIONS",
    "TENSOR_DIGESTS",
    "FileEntry",
    "Manifest",
    "Producer",
    "TensorEntry",
    "check_manifest_sidecar",
    "check_state_and_config",
    "decode_file_entries",
    "encode_file_entries",
    "is_role",
    "manifest_sidecar",
    "parse_manifest_bytes",
    "to_json_value",
    "validate_manifest_dict",
]

#: The format version this release writes by default (``spec/checkpoint-v3.md``).
FORMAT_VERSION = 3
#: The spec version written into a manifest of each format version this release
#: writes (``spec/checkpoint-v1.md``, ``spec/checkpoint-v2.md``, ``spec/checkpoint-v3.md``).
SPEC_VERSIONS: Mapping[int, str] = MappingProxyType({1: "1.2.0", 2: "2.0.0", 3: "3.0.0"})
#: The spec version of the default format version's manifests.
SPEC_VERSION = SPEC_VERSIONS[FORMAT_VERSION]
#: Every format version this release reads (and can write).
SUPPORTED_FORMAT_VERSIONS: frozenset[int] = frozenset({1, 2, 3})
#: The algorithm of the tensors' digests in each format version (CKPT-7, CKPT-26).
TENSOR_DIGESTS: Mapping[int, str] = MappingProxyType({1: "sha256", 2: "sha256", 3: "crc32"})
#: The value of the manifest's ``"format"`` key.
FORMAT_NAME = "gradaccum-checkpoint"
#: The manifest's file name inside a checkpoint directory.
MANIFEST_NAME = "manifest.json"
#: The manifest's checksum file (CKPT-21), in ``sha256sum`` format.
MANIFEST_SHA256_NAME = "manifest.sha256"
#: The first spec version whose checkpoints must have a ``manifest.sha256`` (CKPT-21).
PROTECTED_SINCE = (1, 2, 0)
#: The largest ``manifest.json`` a reader accepts, in bytes (CKPT-20).
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
#: Roles name the tensor files: ``gradients``, ``gradients.rank1``, ``optimizer``, ...
ROLE_PATTERN = r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*"
#: The keys of the accumulation state, in the order they are written.
STATE_KEYS = ("version", *STATE_INT_FIELDS, "synced_in_window", "schedule_state")
#: Keys of the accumulation state that may be absent (then they mean ``false``).
OPTIONAL_STATE_KEYS = ("device_items",)

_ROLE = re.compile(ROLE_PATTERN)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CRC32 = re.compile(r"[0-9a-f]{8}")
_SEMVER = re.compile(r"[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}")
_SIDECAR = re.compile(rb"([0-9a-f]{64})  manifest\.json\n")
_FIX = (
    "the manifest is corrupt or was edited by hand — restore it from a copy "
    "or take a new checkpoint"
)


def is_role(name: object) -> bool:
    """True when ``name`` is a valid role (``^[a-z][a-z0-9_]*(\\.[a-z0-9_]+)*$``)."""
    return isinstance(name, str) and _ROLE.fullmatch(name) is not None


@dataclass(frozen=True)
class Producer:
    """The software that wrote a checkpoint, e.g. ``Producer("gradaccum-torch", "0.1.0")``."""

    name: str
    version: str


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file's index: safetensors ``dtype``, ``shape`` and the
    lowercase hex ``digest`` of its data bytes, with the algorithm its file
    entry's ``tensor_digest`` names: SHA-256 (64 hex digits; format versions 1
    and 2, CKPT-7) or CRC-32 (8 hex digits; format version 3, CKPT-26)."""

    dtype: str
    shape: tuple[int, ...]
    digest: str


@dataclass(frozen=True)
class FileEntry:
    """One tensor file: ``path`` (``<role>.safetensors``), ``size`` in bytes,
    its digests and its tensors by canonical name.

    A format-version-1 entry has ``sha256``, the SHA-256 of all the file's
    bytes (CKPT-7); a format-version-2 or -3 entry has ``header_sha256``
    instead, the SHA-256 of the file's first ``8 + N`` bytes (its length
    prefix and header), so that the header digest and the tensors' digests
    cover every byte exactly once (CKPT-25). Exactly one of the two is set.
    ``tensor_digest`` names the tensors' digest algorithm: ``"sha256"``
    (format versions 1 and 2) or ``"crc32"`` (format version 3, CKPT-26,
    which needs ``header_sha256``). Anything else raises `UsageError`."""

    path: str
    size: int
    sha256: str | None
    tensors: Mapping[str, TensorEntry]
    header_sha256: str | None = field(default=None, kw_only=True)
    tensor_digest: str = field(default="sha256", kw_only=True)

    def __post_init__(self) -> None:
        if (self.sha256 is None) == (self.header_sha256 is None):
            raise UsageError(
                f"file entry {self.path!r:.80}: set exactly one of sha256 (format version 1) "
                "and header_sha256 (format versions 2 and 3)"
            )
        if (
            not isinstance(self.tensor_digest, str)
            or self.tensor_digest not in ("sha256", "crc32")
            or (self.tensor_digest == "crc32" and self.header_sha256 is None)
        ):
            raise UsageError(
                f"file entry {self.path!r:.80}: tensor_digest={self.tensor_digest!r:.40} must be "
                "'sha256' (format versions 1 and 2) or 'crc32' (format version 3, with "
                "header_sha256)"
            )

    @property
    def format_version(self) -> int:
        """1 for an entry with a whole-file ``sha256``; with ``header_sha256``,
        2 (SHA-256 tensor digests) or 3 (CRC-32 tensor digests)."""
        if self.header_sha256 is None:
            return 1
        return 3 if self.tensor_digest == "crc32" else 2

    def to_json_dict(self) -> dict[str, Any]:
        """The entry as the manifest's ``files[role]`` JSON object."""
        out: dict[str, Any] = {"path": self.path, "size": self.size}
        if self.header_sha256 is None:
            out["sha256"] = self.sha256
        else:
            out["header_sha256"] = self.header_sha256
        out["tensors"] = {
            name: {"dtype": t.dtype, "shape": list(t.shape), self.tensor_digest: t.digest}
            for name, t in self.tensors.items()
        }
        return out


@dataclass(frozen=True)
class Manifest:
    """A validated ``manifest.json``.

    ``state``, ``config`` and ``metadata`` are read-only views of plain JSON
    values (do not mutate nested lists or objects). Build one from parsed JSON
    with `from_json_dict`, which validates everything; `to_json_dict`
    inverts it exactly.
    """

    format_version: int
    spec_version: str
    producer: Producer
    created_unix: float
    world_size: int
    state: Mapping[str, Any]
    config: Mapping[str, Any]
    files: Mapping[str, FileEntry]
    metadata: Mapping[str, Any]

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles of the tensor files, sorted."""
        return tuple(sorted(self.files))

    def to_json_dict(self) -> dict[str, Any]:
        """The manifest as a fresh JSON-serialisable ``dict`` (keys in spec order)."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "spec_version": self.spec_version,
            "producer": {"name": self.producer.name, "version": self.producer.version},
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "state": _copy(self.state),
            "config": _copy(self.config),
            "files": {role: entry.to_json_dict() for role, entry in self.files.items()},
            "metadata": _copy(self.metadata),
        }

    def to_json_bytes(self) -> bytes:
        """The exact bytes a writer puts in ``manifest.json`` (UTF-8, indented, final newline)."""
        text = json.dumps(self.to_json_dict(), indent=2, ensure_ascii=False, allow_nan=False)
        return (text + "\n").encode("utf-8")

    @classmethod
    def from_json_dict(cls, data: Any) -> Manifest:
        """Validate parsed manifest JSON and build a `Manifest`.

        Raises `CheckpointVersionError` for a format
        version this release cannot read, and
        `CheckpointCorruptError` for anything else
        (not an object, wrong ``format``, a schema violation — with the JSON
        path of the value — a state or config that
        `AccumulationState.from_state_dict`,
        `AccumulationConfig.from_dict` or the schedule's ``check_state``
        refuses, a file path that is not ``<role>.safetensors``).
        """
        return validate_manifest_dict(data, "manifest")


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _freeze(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(_copy(value))


def to_json_value(value: Any, where: str, _depth: int = 0) -> Any:
    """A deep copy of ``value`` as plain JSON (tuples become lists).

    Raises `UsageError` naming the location for a
    key that is not a string, a float that is not finite, an integer outside
    ``[-2**63, 2**64 - 1]``, nesting deeper than `MAX_JSON_DEPTH` levels
    (a cycle included), or a value of a type JSON cannot hold: those would not
    survive a round trip unchanged or would be refused by readers (CKPT-20).
    """
    if isinstance(value, (Mapping, list, tuple)) and _depth >= MAX_JSON_DEPTH:
        raise UsageError(
            f"{where[:200]} nests more than {MAX_JSON_DEPTH} levels deep (or contains itself); "
            "checkpoint JSON is limited to that depth — store a flatter structure"
        )
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value <= 2**64 - 1:
            raise UsageError(
                f"{where} is an integer of {len(str(abs(int(value))))} digits, outside "
                "[-2**63, 2**64 - 1], which readers refuse; store it as a string"
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UsageError(
                f"{where} is {value}, which JSON cannot hold; store a finite number or a string"
            )
        return float(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UsageError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; JSON object keys "
                    f"must be strings — convert it (e.g. str({key!r})) before saving"
                )
            out[key] = to_json_value(item, f"{where}[{key!r}]", _depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_value(item, f"{where}[{i}]", _depth + 1) for i, item in enumerate(value)]
    raise UsageError(
        f"{where} is a {type(value).__name__} ({value!r:.80}), which JSON cannot hold; "
        "store None, bool, int, float, str, list, tuple or a str-keyed mapping of these"
    )


def parse_manifest_bytes(raw: bytes, where: str) -> Manifest:
    """Decode ``manifest.json`` bytes (strict JSON within the limits of
    CKPT-20: UTF-8, no duplicate keys, no ``NaN``, nesting at most
    `MAX_JSON_DEPTH`, integers within int64/uint64, finite numbers) and
    validate them with `Manifest.from_json_dict`. ``where`` prefixes error
    messages."""
    try:
        data = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"{where}: {MANIFEST_NAME} is not valid JSON ({exc}); {_FIX}"
        ) from exc
    return validate_manifest_dict(data, where)


def manifest_sidecar(raw: bytes) -> bytes:
    """The bytes of ``manifest.sha256`` for the manifest bytes ``raw``:
    ``<sha256 hex>  manifest.json`` and a newline (``sha256sum`` format)."""
    return f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST_NAME}\n".encode("ascii")


def check_manifest_sidecar(raw: bytes, sidecar: bytes, where: str) -> None:
    """Raise `CheckpointChecksumError` unless ``sidecar`` is exactly
    `manifest_sidecar` of ``raw`` (CKPT-21): a malformed sidecar, or one
    whose digest is not the manifest's."""
    match = _SIDECAR.fullmatch(sidecar)
    if match is None:
        raise CheckpointCorruptError(
            f"{where}: {MANIFEST_SHA256_NAME} is {sidecar[:100]!r}, not "
            f"'<64 lowercase hex digits>  {MANIFEST_NAME}\\n'; {_FIX}"
        )
    recorded = match.group(1).decode("ascii")
    actual = hashlib.sha256(raw).hexdigest()
    if recorded != actual:
        raise CheckpointChecksumError(
            f"{where}: {MANIFEST_NAME} has SHA-256 {actual[:16]}… but {MANIFEST_SHA256_NAME} "
            f"records {recorded[:16]}…; the manifest was modified or is corrupt — restore it "
            "from a copy or take a new checkpoint"
        )


def requires_sidecar(spec_version: str) -> bool:
    """True when a manifest of ``spec_version`` must have ``manifest.sha256`` (CKPT-21)."""
    major, minor, patch = (int(p) for p in spec_version.split("."))
    return (major, minor, patch) >= PROTECTED_SINCE


def _require_int(value: Any, path: tuple[str | int, ...], where: str, fix: str) -> int:
    if type(value) is not int:
        raise CheckpointCorruptError(
            f"{where}: {json_path(path)} is {value!r}; it must be written as an integer "
            f"(no fraction or exponent); {fix}"
        )
    return value


def _check_version(data: dict[str, Any], where: str, fix: str) -> None:
    if data.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(
            f"{where}: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}; "
            "this is not a gradaccum checkpoint manifest"
        )
    if "format_version" not in data:
        raise CheckpointCorruptError(f"{where}: the manifest has no 'format_version'; {fix}")
    version = data["format_version"]
    if type(version) is not int:
        raise CheckpointCorruptError(
            f"{where}: 'format_version' is {version!r} ({type(version).__name__}), expected an "
            f"integer such as {FORMAT_VERSION}; {fix}"
        )
    if version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_FORMAT_VERSIONS))
        upgrade = (
            "upgrade gradaccum to a release that reads it"
            if version > max(SUPPORTED_FORMAT_VERSIONS)
            else "upgrade gradaccum, or convert the checkpoint with the release that wrote it"
        )
        raise CheckpointVersionError(
            f"{where}: checkpoint format version {version} is not supported; this release "
            f"reads format version(s) {supported}; {upgrade}"
        )


def validate_manifest_dict(data: Any, where: str, fix: str = _FIX) -> Manifest:
    """`Manifest.from_json_dict` with ``where`` prefixing each error
    message and ``fix`` ending it."""
    if not isinstance(data, dict):
        raise CheckpointCorruptError(
            f"{where}: the manifest is a JSON {type(data).__name__}, not an object; {fix}"
        )
    _check_version(data, where, fix)
    version = data["format_version"]
    violations = list(manifest_validator(version).iter_errors(data))
    if violations:
        shown = "; ".join(str(v) for v in violations[:5])
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        raise CheckpointCorruptError(
            f"{where}: the manifest fails the checkpoint-v{version} schema: {shown}{more}; {fix}"
        )

    spec_version = data["spec_version"]
    if not _SEMVER.fullmatch(spec_version):
        raise CheckpointCorruptError(
            f"{where}: spec_version {spec_version!r} is not MAJOR.MINOR.PATCH; {fix}"
        )
    world_size = _require_int(data["world_size"], ("world_size",), where, fix)
    state = data["state"]
    check_state_and_config(state, data["config"], where, fix)

    files = {
        role: _file_entry(role, data["files"][role], version, where, fix)
        for role in sorted(data["files"])
    }
    for role in data["metadata"]:
        if not is_role(role):
            raise CheckpointCorruptError(
                f"{where}: metadata role {role!r} does not match {ROLE_PATTERN}; {fix}"
            )

    return Manifest(
        format_version=data["format_version"],
        spec_version=spec_version,
        producer=Producer(data["producer"]["name"], data["producer"]["version"]),
        created_unix=float(data["created_unix"]),
        world_size=world_size,
        state=_freeze(
            {key: state[key] for key in (*STATE_KEYS, *OPTIONAL_STATE_KEYS) if key in state}
        ),
        config=_freeze(data["config"]),
        files=MappingProxyType(files),
        metadata=_freeze(data["metadata"]),
    )


def _file_entry(role: str, entry: dict[str, Any], version: int, where: str, fix: str) -> FileEntry:
    """A schema-valid ``files[role]`` object of format ``version`` as a
    `FileEntry` (CKPT-2, CKPT-4)."""
    if not is_role(role):
        raise CheckpointCorruptError(f"{where}: role {role!r} does not match {ROLE_PATTERN}; {fix}")
    if entry["path"] != f"{role}.safetensors":
        raise CheckpointCorruptError(
            f"{where}: files[{role!r}].path is {entry['path']!r}, expected "
            f"{role + '.safetensors'!r}; {fix}"
        )
    size = _require_int(entry["size"], ("files", role, "size"), where, fix)
    tensors: dict[str, TensorEntry] = {}
    for name in sorted(entry["tensors"]):
        t = entry["tensors"][name]
        shape = tuple(
            _require_int(d, ("files", role, "tensors", name, "shape", i), where, fix)
            for i, d in enumerate(t["shape"])
        )
        key = TENSOR_DIGESTS[version]
        digest = _check_digest(t[key], ("files", role, "tensors", name, key), where, fix)
        tensors[name] = TensorEntry(t["dtype"], shape, digest)
    if version >= 2:  # format versions 2 and 3 (CKPT-25)
        header = _check_digest(entry["header_sha256"], ("files", role, "header_sha256"), where, fix)
        return FileEntry(
            entry["path"],
            size,
            None,
            MappingProxyType(tensors),
            header_sha256=header,
            tensor_digest=TENSOR_DIGESTS[version],
        )
    sha = _check_digest(entry["sha256"], ("files", role, "sha256"), where, fix)
    return FileEntry(entry["path"], size, sha, MappingProxyType(tensors))


@functools.lru_cache(maxsize=4)
def _files_validator(format_version: int) -> SchemaValidator:
    schema = manifest_schema(format_version)
    return SchemaValidator({"$defs": schema["$defs"], **schema["properties"]["files"]})


def encode_file_entries(entries: Mapping[str, FileEntry]) -> bytes:
    """``{role: FileEntry}`` as compact UTF-8 JSON — ``{"format_version": N,
    "files": <the manifest's files object>}`` — to send between ranks without
    pickle; `decode_file_entries` inverts it. Raises `UsageError` for a role
    or entry of the wrong type, or entries of different format versions."""
    if not isinstance(entries, Mapping):
        raise UsageError(
            f"file entries {entries!r:.100} must be a mapping of roles to FileEntry; pass what "
            "write_shard returned"
        )
    out: dict[str, Any] = {}
    versions: set[int] = set()
    for role, entry in entries.items():
        if not is_role(role) or not isinstance(entry, FileEntry):
            raise UsageError(
                f"file entry {role!r}: {entry!r:.100} must be a FileEntry under a valid role "
                f"({ROLE_PATTERN}); pass what write_shard returned"
            )
        out[role] = entry.to_json_dict()
        versions.add(entry.format_version)
    if len(versions) > 1:
        raise UsageError(
            f"file entries of format versions {sorted(versions)} cannot travel together; "
            "write every shard of a checkpoint with the same format_version"
        )
    version = versions.pop() if versions else FORMAT_VERSION
    doc = {"format_version": version, "files": out}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_file_entries(raw: bytes | bytearray | memoryview) -> dict[str, FileEntry]:
    """Parse `encode_file_entries` output strictly (CKPT-20) and validate its
    ``files`` against the schema of its format version; raise
    `CheckpointCorruptError` for anything else (`UsageError` for something
    that is not bytes)."""
    where = "file entries"
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise UsageError(
            f"{where}: got a {type(raw).__name__}, expected the bytes encode_file_entries returned"
        )
    try:
        data = loads_strict(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorruptError(f"{where}: not valid JSON ({exc}); {_FIX}") from exc
    if (
        not isinstance(data, dict)
        or set(data) != {"format_version", "files"}
        or type(data["format_version"]) is not int
        or data["format_version"] not in SUPPORTED_FORMAT_VERSIONS
    ):
        raise CheckpointCorruptError(
            f"{where}: expected an object with exactly 'format_version' (one of "
            f"{sorted(SUPPORTED_FORMAT_VERSIONS)}) and 'files'; {_FIX}"
        )
    version, files = data["format_version"], data["files"]
    violations = list(_files_validator(version).iter_errors(files))
    if violations:
        shown = "; ".join(str(v) for v in violations[:5])
        raise CheckpointCorruptError(f"{where}: invalid: {shown}; {_FIX}")
    return {role: _file_entry(role, files[role], version, where, _FIX) for role in sorted(files)}


def check_state_and_config(
    state: Any, config: Any, where: str, fix: str = _FIX
) -> tuple[AccumulationState, AccumulationConfig]:
    """Parse a manifest's ``state`` and ``config`` exactly as a resuming
    adapter does and return them; raise
    `CheckpointCorruptError` when an adapter would
    refuse them (CKPT-9, CKPT-10).

    The checks are the core's, not copies of them:
    `AccumulationState.from_state_dict` (keys, types, counters >= 0 and
    the invariants between them), `AccumulationConfig.from_dict`, and
    ``config.schedule.check_state(state.schedule_state)``, as
    `AccumulationMachine.load_state_dict` runs it. The core's message is
    kept verbatim; the `ConfigError` is chained.
    """
    try:
        parsed = AccumulationState.from_state_dict(state)
    except ConfigError as exc:
        raise CheckpointCorruptError(f"{where}: $.state is invalid: {exc}; {fix}") from exc
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        raise CheckpointCorruptError(
            f"{where}: $.state is invalid: it is malformed ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    try:
        parsed_config = AccumulationConfig.from_dict(config)
    except ConfigError as exc:
        raise CheckpointCorruptError(f"{where}: $.config is invalid: {exc}; {fix}") from exc
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        # The config parser expects JSON shaped like to_dict() output; a
        # malformed manifest must still be refused, never crash the reader.
        raise CheckpointCorruptError(
            f"{where}: $.config is invalid: it is malformed ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    try:
        parsed_config.schedule.check_state(parsed.schedule_state)
    except (ConfigError, TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        raise CheckpointCorruptError(
            f"{where}: $.state.schedule_state is invalid for the config's "
            f"{parsed_config.schedule.kind!r} schedule: {exc}; {fix}"
        ) from exc
    return parsed, parsed_config


def _check_digest(value: str, path: tuple[str | int, ...], where: str, fix: str) -> str:
    crc = path[-1] == "crc32"
    if not (_CRC32 if crc else _SHA256).fullmatch(value):
        raise CheckpointCorruptError(
            f"{where}: {json_path(path)} is {value!r}, not {8 if crc else 64} lowercase hex "
            f"digits; {fix}"
        )
    return value
