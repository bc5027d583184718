"""The gradaccum checkpoint format (normative text: ``spec/checkpoint-v1.md``, with
``spec/checkpoint-v2.md`` and ``spec/checkpoint-v3.md``, the default, amending it).

A checkpoint is a directory: ``manifest.json`` (format version, spec version,
producer, accumulation state, config, a tensor index with checksums — each
header's SHA-256 and each tensor's CRC-32 in format 3 —,
per-role metadata), its checksum ``manifest.sha256`` and one safetensors file
per role. It is written atomically (from bytes, or streamed tensor by tensor;
by one process, or by every rank into a shared directory), read without
pickle, and verified in full before anything is returned — all at once
(`read_checkpoint`) or one file at a time (`open_checkpoint`).

>>> from gradaccum.checkpoint import Producer, RawTensor, encode_safetensors
>>> blob = encode_safetensors({"w": RawTensor("F32", (1,), b"\\x00\\x00\\x80?")})
>>> # write_checkpoint("ckpt", state=..., config=..., files={"gradients": blob},
>>> #                  producer=Producer("my-adapter", "1.0"))
"""

from __future__ import annotations

from gradaccum.checkpoint.convert import convert_checkpoint
from gradaccum.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MANIFEST_SHA256_NAME,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    OPTIONAL_STATE_KEYS,
    ROLE_PATTERN,
    SPEC_VERSION,
    STATE_KEYS,
    SUPPORTED_FORMAT_VERSIONS,
    TENSOR_DIGESTS,
    FileEntry,
    Manifest,
    Producer,
    TensorEntry,
    decode_file_entries,
    encode_file_entries,
)
from gradaccum.checkpoint.safetensors_io import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    RawTensor,
    SafetensorsHeader,
    TensorInfo,
    decode_safetensors,
    encode_safetensors,
    read_safetensors_header,
)
from gradaccum.checkpoint.schema import SchemaValidator, SchemaViolation, manifest_schema
from gradaccum.checkpoint.store import (
    Checkpoint,
    TensorFile,
    TensorSource,
    abort_checkpoint,
    check_format_version,
    commit_checkpoint,
    open_checkpoint,
    read_checkpoint,
    stage_checkpoint,
    validate_checkpoint,
    write_checkpoint,
    write_shard,
)

__all__ = [
    "DTYPE_SIZES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MANIFEST_SHA256_NAME",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "OPTIONAL_STATE_KEYS",
    "ROLE_PATTERN",
    "SPEC_VERSION",
    "STATE_KEYS",
    "SUPPORTED_FORMAT_VERSIONS",
    "TENSOR_DIGESTS",
    "Checkpoint",
    "FileEntry",
    "Manifest",
    "Producer",
    "RawTensor",
    "SafetensorsHeader",
    "SchemaValidator",
    "SchemaViolation",
    "TensorEntry",
    "TensorFile",
    "TensorInfo",
    "TensorSource",
    "abort_checkpoint",
    "check_format_version",
    "commit_checkpoint",
    "convert_checkpoint",
    "decode_file_entries",
    "decode_safetensors",
    "encode_file_entries",
    "encode_safetensors",
    "manifest_schema",
    "open_checkpoint",
    "read_checkpoint",
    "read_safetensors_header",
    "stage_checkpoint",
    "validate_checkpoint",
    "write_checkpoint",
    "write_shard",
]
