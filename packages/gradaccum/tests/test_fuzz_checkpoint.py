"""Fuzzing the checkpoint reader, ``gradaccum validate`` and ``gradaccum
inspect`` (issue 8, section 4; spec CKPT-17, CKPT-20, CKPT-21).

A seeded mutation loop over a real mid-window checkpoint (two ranks'
gradients and item counts, model, optimizer, scheduler and scaler metadata):
byte flips and truncations of every file, with and without the manifest's
checksum and the file digests recomputed (so that the checks behind them are
reached), JSON field mutations (type swaps, deletions, unknown keys, depth
bombs, huge and non-finite number literals, lone surrogates), safetensors
header mutations, and file-system tricks (links, FIFOs, directories, stray
and missing files). ``GRADACCUM_FUZZ_EXAMPLES`` inputs (300 by default; the
``fuzz`` nox session runs 10,000).

Pass: every input is accepted or refused with a `CheckpointError`; the
readers (`read_checkpoint`, `open_checkpoint` with every file read and
mapped, `validate_checkpoint`) and both commands agree on the verdict; the
commands print ``invalid: ...`` and nothing that admits a bug. Reads are
bounded by construction (regular files only, never beyond the declared
size), so an input that hangs or exhausts memory fails the run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import io
import json
import os
import random
import resource
import shutil
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gradaccum.checkpoint import (
    Producer,
    RawTensor,
    encode_safetensors,
    open_checkpoint,
    read_checkpoint,
    validate_checkpoint,
    write_checkpoint,
)
from gradaccum.checkpoint.format import manifest_sidecar
from gradaccum.cli import main
from gradaccum.config import AccumulationConfig
from gradaccum.errors import CheckpointError
from gradaccum.state import AccumulationState

STATE: dict[str, Any] = {
    "version": 1,
    "epoch": 1,
    "position": 2,
    "window_size": 4,
    "contributing": 2,
    "items_in_window": 0,
    "items_total": 512,
    "micro_steps": 18,
    "optimizer_steps": 4,
    "skipped_steps": 0,
    "windows": 4,
    "dropped_microbatches": 0,
    "dropped_windows": 0,
    "synced_in_window": False,
    "device_items": True,
    "schedule_state": {},
}
CONFIG = AccumulationConfig(4, normalization="items").to_dict()


def f32(shape: tuple[int, ...], start: float) -> RawTensor:
    n = 1
    for d in shape:
        n *= d
    return RawTensor("F32", shape, struct.pack(f"<{n}f", *(start + 0.5 * i for i in range(n))))


def build(path: Path, version: int = 2) -> None:
    """A real mid-window checkpoint of a 2-rank run, written by the core in
    format ``version``."""
    params = {"enc.weight": f32((4, 3), 0.0), "enc.bias": f32((4,), 1.0), "head": f32((2, 4), 2.0)}
    items = {"items": RawTensor("F64", (), struct.pack("<d", 48.0))}
    write_checkpoint(
        path,
        state=STATE,
        config=CONFIG,
        files={
            "gradients.rank0": encode_safetensors(params),
            "gradients.rank1": encode_safetensors(
                {k: f32(v.shape, 9.0) for k, v in params.items()}
            ),
            "items.rank0": encode_safetensors(items),
            "items.rank1": encode_safetensors(items),
            "model": encode_safetensors(params, {"format": "pt"}),
            "optimizer": encode_safetensors(
                {
                    "state.enc.weight.exp_avg": f32((4, 3), 0.1),
                    "state.enc.weight.step": RawTensor("I64", (), struct.pack("<q", 4)),
                }
            ),
        },
        producer=Producer("gradaccum-ddp", "0.1.0"),
        world_size=2,
        format_version=version,
        metadata={
            "model": {"aliases": {}},
            "optimizer": {
                "param_groups": [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0, 1, 2]}]
            },
            "scheduler": {"class": "StepLR", "state": {"step_size": 3, "last_epoch": 4}},
            "scaler": {"state": {"scale": 65536.0, "growth_tracker": 2}},
        },
    )


# --------------------------------------------------------------------------- mutations

RAW_LITERALS = [
    "1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 30, "NaN", "Infinity", "-Infinity",
    "1e300", "-0.0", "18446744073709551616", '"\\ud800"', '"\\udfff x"', "[" * 1000 + "]" * 1000,
    '{"a":' * 600 + "1" + "}" * 600, "true", "null", '""', "[]", "{}", "0", "-1", "3.5",
    '"1.0.0"', '"9.9.9"', '"' + "x" * 10000 + '"', "1.0", "4294967296", "2",
]  # fmt: skip
SENTINEL = "\u0000__fuzz__\u0000"


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.extend(_paths(item, (*prefix, index)))
    return out


def _mutate_json(rng: random.Random, doc: Any) -> str:
    """Serialise ``doc`` after one to three field mutations; raw literals
    JSON cannot produce from Python values are spliced into the text."""
    raw: list[str] = []
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        op = rng.randrange(6)
        if op <= 1:
            raw.append(rng.choice(RAW_LITERALS))
            parent[key] = SENTINEL + str(len(raw) - 1)
        elif op == 2 and isinstance(parent, dict):
            del parent[key]
        elif op == 3 and isinstance(parent, dict):
            parent[rng.choice(["extra", "sha256", "path", "kind", "x.y", "", "__metadata__"])] = 1
        elif op == 4:
            value = parent[key]
            parent[key] = [value] if not isinstance(value, list) else {"0": value[:1]}  # type swap
        else:
            other = rng.choice(paths)
            source: Any = doc
            for part in other:
                source = source[part]
            parent[key] = json.loads(json.dumps(source))
    text = json.dumps(doc, indent=rng.choice([None, 2]))
    for index, literal in enumerate(raw):
        text = text.replace(json.dumps(SENTINEL + str(index)), literal)
    return text


def _flip(rng: random.Random, blob: bytes, count: int) -> bytes:
    data = bytearray(blob)
    if not data:
        return b"\x00"
    for _ in range(count):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _reseal(path: Path) -> None:
    manifest = path / "manifest.json"
    if manifest.is_file() and not manifest.is_symlink():
        (path / "manifest.sha256").write_bytes(manifest_sidecar(manifest.read_bytes()))


def _rehash(path: Path, role: str) -> None:
    """Record ``role``'s edited file in the manifest (size, digests) and reseal."""
    blob = (path / f"{role}.safetensors").read_bytes()
    doc = json.loads((path / "manifest.json").read_text())
    entry = doc["files"][role]
    entry["size"] = len(blob)
    if "header_sha256" in entry:  # format 2: the length prefix and header (CKPT-25)
        n = int.from_bytes(blob[:8], "little")
        entry["header_sha256"] = hashlib.sha256(blob[: 8 + min(n, len(blob))]).hexdigest()
    else:
        entry["sha256"] = hashlib.sha256(blob).hexdigest()
    (path / "manifest.json").write_text(json.dumps(doc))
    _reseal(path)


def _tensor_roles(path: Path) -> list[str]:
    return sorted(p.name[: -len(".safetensors")] for p in path.glob("*.safetensors"))


def mutate(rng: random.Random, path: Path) -> str:
    """Apply one random mutation to the checkpoint at ``path``; return its kind."""
    manifest = path / "manifest.json"
    kind = rng.choice(
        [
            "manifest-flip", "manifest-flip-resealed", "manifest-truncate",
            "manifest-json", "manifest-json", "manifest-json", "manifest-json-unsealed",
            "tensor-flip", "tensor-flip-rehashed", "tensor-truncate-rehashed",
            "header-json-rehashed", "header-json-rehashed", "sidecar", "filesystem",
        ]
    )  # fmt: skip
    if kind.startswith("manifest-flip"):
        manifest.write_bytes(_flip(rng, manifest.read_bytes(), rng.randint(1, 4)))
        if kind.endswith("resealed"):
            _reseal(path)
    elif kind == "manifest-truncate":
        raw = manifest.read_bytes()
        manifest.write_bytes(raw[: rng.randrange(len(raw))])
        if rng.random() < 0.5:
            _reseal(path)
    elif kind.startswith("manifest-json"):
        manifest.write_text(_mutate_json(rng, json.loads(manifest.read_text())))
        if not kind.endswith("unsealed"):
            _reseal(path)
    elif kind.startswith("tensor"):
        role = rng.choice(_tensor_roles(path))
        f = path / f"{role}.safetensors"
        blob = f.read_bytes()
        if kind == "tensor-truncate-rehashed":
            f.write_bytes(blob[: rng.randrange(len(blob))])
        else:
            # flip bytes in the header half of the time, in the data otherwise
            limit = min(len(blob), 8 + struct.unpack("<Q", blob[:8])[0])
            span = limit if rng.random() < 0.5 else len(blob)
            data = bytearray(blob)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(span)] ^= 1 << rng.randrange(8)
            f.write_bytes(bytes(data))
        if kind.endswith("rehashed"):
            _rehash(path, role)
    elif kind == "header-json-rehashed":
        role = rng.choice(_tensor_roles(path))
        f = path / f"{role}.safetensors"
        blob = f.read_bytes()
        size = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8 : 8 + size])
        text = _mutate_json(rng, header).encode("utf-8", "surrogatepass")
        f.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + size :])
        _rehash(path, role)
    elif kind == "sidecar":
        sidecar = path / "manifest.sha256"
        choice = rng.randrange(3)
        if choice == 0:
            sidecar.unlink()
        elif choice == 1:
            sidecar.write_bytes(_flip(rng, sidecar.read_bytes(), 1))
        else:
            sidecar.write_bytes(sidecar.read_bytes() * 2)
    else:
        names = [*(f"{r}.safetensors" for r in _tensor_roles(path)), "manifest.json"]
        name = rng.choice(names)
        target = path / name
        trick = rng.randrange(6)
        target.unlink()
        if trick == 0:
            os.mkfifo(target)
        elif trick == 1:
            target.symlink_to("/dev/zero")
        elif trick == 2:
            target.mkdir()
        elif trick == 3:
            (path / "stray.safetensors").write_bytes(b"\x00" * 16)
            target.write_bytes(b"")
        elif trick == 4:
            pass  # missing
        else:
            outside = path.parent / f"outside-{name}"
            outside.write_bytes(b"{}")
            target.symlink_to(outside)
    return kind


# --------------------------------------------------------------------------- checks


def _command(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def judge(path: Path) -> str:
    """Run every reader and both commands on ``path``; return ``accepted`` or
    the refusing error's class name. Fails on any other outcome."""
    verdicts: list[str] = []
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        verdicts.append(type(exc).__name__)
    else:
        verdicts.append("accepted")
        AccumulationState.from_state_dict(ckpt.state)
        AccumulationConfig.from_dict(ckpt.config)
    try:
        with open_checkpoint(path) as opened:
            for role in opened.roles:
                assert opened.read_file(role) == ckpt.file_bytes(role)
                with opened.open_file(role, verify=False) as tf:
                    for name in tf.header.tensors:
                        tf.tensor_view(name).tobytes()
    except CheckpointError as exc:
        verdicts.append(type(exc).__name__)
    else:
        verdicts.append("accepted")
    try:
        validate_checkpoint(path)
    except CheckpointError as exc:
        verdicts.append(type(exc).__name__)
    else:
        verdicts.append("accepted")
    assert len(set(verdicts)) == 1, verdicts
    for argv in (["validate", str(path)], ["inspect", str(path)], ["inspect", "--json", str(path)]):
        code, out, err = _command(argv)
        assert "bug in gradaccum" not in err, err
        if verdicts[0] == "accepted":
            assert (code, err) == (0, ""), (argv, err)
            if "--json" in argv:
                assert "Infinity" not in out and "NaN" not in out
                json.loads(out)
        else:
            assert (code, out) == (1, ""), (argv, out)
            assert err.startswith("invalid: "), err
            assert "Traceback" not in err
    return verdicts[0]


def _examples() -> int:
    return int(os.environ.get("GRADACCUM_FUZZ_EXAMPLES", "300"))


@pytest.mark.parametrize("version", [3, 2, 1], ids=["v3", "v2", "v1"])
def test_fuzz_checkpoint_reader_and_commands(tmp_path: Path, version: int) -> None:
    """CKPT-17, CKPT-20, CKPT-21, CKPT-25, CKPT-26: GRADACCUM_FUZZ_EXAMPLES seeded
    mutations of a real mid-window checkpoint of each format version are each
    accepted or refused with a CheckpointError, the same way by every reader
    and both commands; at least one in ten is refused by the manifest checksum
    and the accepted share stays small (a mutation is almost always a defect)."""
    base = tmp_path / "base"
    build(base, version)
    assert judge(base) == "accepted"
    rng = random.Random(8_2026_11_29)
    outcomes: Counter[str] = Counter()
    kinds: Counter[tuple[str, str]] = Counter()
    start = time.perf_counter()
    n = _examples()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for i in range(n):
        # No hang: an input that blocks (a FIFO read, an endless file) ends the run with a
        # traceback after 60 s instead of hanging CI (one input takes milliseconds).
        faulthandler.dump_traceback_later(60, exit=True)
        case = tmp_path / f"case{i % 2}"
        shutil.rmtree(case, ignore_errors=True)
        for stale in tmp_path.glob("outside-*"):
            stale.unlink()
        shutil.copytree(base, case)
        kind = mutate(rng, case)
        try:
            verdict = judge(case)
        except AssertionError:
            raise
        except Exception as exc:  # the failure this test exists to catch
            pytest.fail(f"input {i} ({kind}): {type(exc).__name__}: {exc}")
        outcomes[verdict] += 1
        kinds[(kind, "accepted" if verdict == "accepted" else "refused")] += 1
    faulthandler.cancel_dump_traceback_later()
    elapsed = time.perf_counter() - start
    # No memory blow-up: the inputs raise this process's peak resident memory by less than
    # 256 MiB (reading a /dev/zero link to its end would take gigabytes).
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 256 * 1024, f"peak resident memory grew by {grown} KiB over the inputs"
    print(f"\ncheckpoint fuzz: {n} inputs in {elapsed:.1f} s: {dict(sorted(outcomes.items()))}")
    for (kind, verdict), count in sorted(kinds.items()):
        print(f"  {kind:28s} {verdict:9s} {count}")
    assert sum(outcomes.values()) == n
    assert outcomes["CheckpointChecksumError"] >= n // 10
    assert outcomes["accepted"] <= n // 4
