"""Fuzz of `Accumulator.load` (issue 8 section 4; CKPT-17, ACC-E).

A seeded mutation loop over a real mid-window checkpoint (AdamW, StepLR, a
GradScaler, in-flight gradients, a device item count). Each example changes
the checkpoint one of three ways — a JSON value of the state, config or
metadata (re-sealed: checksums valid), a tensor file (renamed, reshaped,
retyped, dropped or added tensors or roles; re-sealed), or raw bytes on disk
(flipped, truncated, appended; the manifest's checksum sidecar recomputed
when there is one, so the reader's own checks are what refuse it; or a
file replaced by a FIFO, a directory, a link to /dev/zero or outside the
directory) — and loads it into live objects in another state.

Pass: every load returns or raises a `GradAccumError` (no other exception);
every refused load leaves model, optimizer, scheduler, scaler and accumulator
bitwise unchanged; every accepted load trains to its next boundary raising
nothing but a `GradAccumError`, with finite parameters after it (unless the
mutation asked for a finite hyper-parameter above 1e6, a legitimate but
divergent setting, counted apart).

``GRADACCUM_FUZZ_EXAMPLES`` sets the number of examples (default 200); the
non-default ``nox -s fuzz`` session runs 10,000.
"""

from __future__ import annotations

import copy
import faulthandler
import hashlib
import json
import math
import os
import random
import resource
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from ckpt_helpers import (
    assert_same,
    live_objects,
    mid_window_checkpoint,
    parts,
    snapshot,
    train,
)

from gradaccum.checkpoint import Producer, write_checkpoint
from gradaccum.errors import GradAccumError

EXAMPLES = int(os.environ.get("GRADACCUM_FUZZ_EXAMPLES", "200"))
SEED = 20261129

_HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    0.5,
    -0.0,
    1e300,
    -1e300,
    10**400,
    2**64,
    "0.01",
    "",
    [],
    {},
    [0.9],
    [0.9, 0.999, 0.5],
    {"float": "inf"},
    {"float": "nan"},
    {"float": "-inf"},
    {"state": {}},
]


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts/lists (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((*prefix, key))
            out.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append((*prefix, i))
            out.extend(_paths(item, (*prefix, i)))
    return out


def _huge(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) > 1e6 if isinstance(value, int) else math.isfinite(value) and abs(value) > 1e6


def _mutate_json(rng: random.Random, p: dict[str, Any]) -> tuple[str, bool]:
    part = rng.choice(["metadata", "metadata", "metadata", "state", "config"])
    tree = p[part]
    paths = _paths(tree)
    path = rng.choice(paths)
    *head, last = path
    parent = tree
    for key in head:
        parent = parent[key]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[last]
        return f"json:{part}:delete", False
    if op < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["step", "bogus", "state", "class", "__dict__"])] = rng.choice(_HOSTILE)
        return f"json:{part}:insert", False
    if op < 0.3:
        parent[last] = _nested(rng.choice([50, 600]))
        return f"json:{part}:nest", False
    old = parent[last]
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.4:
        new: Any = rng.choice([old * 10, -old, old + 1, old - 1, old * 0.5, 0])
    else:
        new = copy.deepcopy(rng.choice(_HOSTILE))
    parent[last] = new
    return f"json:{part}:replace", _huge(new)


def _load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    return dict(safetensors.torch.load(data))


def _mutate_tensors(rng: random.Random, p: dict[str, Any]) -> str:
    files: dict[str, bytes] = p["files"]
    op = rng.choice(
        [
            "rename",
            "reshape",
            "retype",
            "drop",
            "add",
            "drop_role",
            "copy_role",
            "gradient_nan",
            "items",
        ]
    )
    if op == "drop_role":
        del files[rng.choice(sorted(files))]
        return "tensors:drop_role"
    if op == "copy_role":
        src, dst = (
            rng.choice(sorted(files)),
            rng.choice(["model", "optimizer", "gradients", "items", "gradients.rank1", "extra"]),
        )
        files[dst] = files[src]
        return "tensors:copy_role"
    if op == "items":
        value = rng.choice([-1.0, 2.5, float("inf"), float("nan"), 1e300, 0.0])
        dtype = rng.choice([torch.float64, torch.float32, torch.int64])
        files["items"] = safetensors.torch.save({"items": torch.tensor(value).to(dtype)})
        return "tensors:items"
    role = rng.choice(sorted(files))
    tensors = _load_tensors(files[role])
    if not tensors:
        return "tensors:none"
    name = rng.choice(sorted(tensors))
    tensor = tensors[name]
    if op == "rename":
        tensors[rng.choice(["bogus", "0.weight", "state.0.weight.step", name + ".x"])] = (
            tensors.pop(name)
        )
    elif op == "reshape":
        flat = tensor.reshape(-1)
        tensors[name] = rng.choice(
            [flat.clone(), flat[:-1].clone() if flat.numel() else flat, tensor.reshape(1, -1)]
        ).contiguous()
    elif op == "retype":
        tensors[name] = tensor.to(
            rng.choice([torch.int64, torch.float16, torch.float64, torch.bool, torch.uint8])
        )
    elif op == "drop":
        del tensors[name]
    elif op == "add":
        tensors[rng.choice(["bogus", "state.2.bias.extra", "0.bias2"])] = torch.zeros(3)
    elif op == "gradient_nan" and role.startswith("gradients"):
        tensors[name] = torch.full_like(tensor, float("nan"))
    files[role] = safetensors.torch.save(tensors)
    return f"tensors:{op}"


def _write(p: dict[str, Any], target: Path) -> bool:
    """Write ``p`` re-sealed; False when the writer itself refuses it."""
    try:
        write_checkpoint(
            target,
            state=p["state"],
            config=p["config"],
            files=p["files"],
            producer=Producer("gradaccum-torch", "fuzz"),
            world_size=p["world_size"],
            metadata=p["metadata"],
        )
    except GradAccumError:
        return False
    return True


def _raw_manifest(base: Path, target: Path, p: dict[str, Any]) -> None:
    """Copy ``base`` and replace its manifest's state/config/metadata with
    ``p``'s, by hand (the writer refused them); the checksum sidecar, if any,
    is recomputed so the reader's own validation is what refuses it."""
    shutil.copytree(base, target)
    document = json.loads((target / "manifest.json").read_text())
    for key in ("state", "config", "metadata"):
        document[key] = p[key]
    try:
        raw = json.dumps(document, indent=1).encode()
    except (ValueError, RecursionError):
        raw = b'{"format": "gradaccum-checkpoint"' + b"[" * 5000
    (target / "manifest.json").write_bytes(raw)
    _reseal_sidecar(target)


def _reseal_sidecar(target: Path) -> None:
    sidecar = target / "manifest.sha256"
    if sidecar.exists():
        digest = hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest()
        sidecar.write_text(f"{digest}  manifest.json\n")


def _mutate_bytes(rng: random.Random, base: Path, target: Path) -> str:
    shutil.copytree(base, target)
    names = sorted(n for n in os.listdir(target) if n != "manifest.sha256")
    name = rng.choice(names)
    path = target / name
    data = bytearray(path.read_bytes())
    op = rng.choice(["flip", "flip", "truncate", "append", "zero_header"])
    if op == "flip" and data:
        for _ in range(rng.choice([1, 1, 4])):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del data[rng.randrange(len(data) + 1) :]
    elif op == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100])))
    else:
        data[:8] = bytes(8)
    path.write_bytes(bytes(data))
    if name == "manifest.json":
        _reseal_sidecar(target)
    return f"bytes:{op}:{'manifest' if name == 'manifest.json' else 'tensor'}"


def _mutate_fs(rng: random.Random, base: Path, target: Path) -> str:
    """File-system tricks: a file replaced by a FIFO, a directory, or a link to
    /dev/zero or to a copy outside the checkpoint."""
    shutil.copytree(base, target)
    name = rng.choice(sorted(os.listdir(target)))
    path = target / name
    outside = target.parent / f"outside-{target.name}"
    shutil.copyfile(path, outside)
    path.unlink()
    op = rng.choice(["fifo", "dir", "devzero", "outside"])
    if op == "fifo":
        os.mkfifo(path)
    elif op == "dir":
        path.mkdir()
    elif op == "devzero":
        path.symlink_to("/dev/zero")
    else:
        path.symlink_to(outside)
    return f"fs:{op}:{name}"


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_fuzz_accumulator_load(tmp_path: Path) -> None:
    """CKPT-17/CKPT-24/ACC-E under EXAMPLES seeded mutations of a real mid-window
    checkpoint: every load is accepted or refused with a GradAccumError, every
    refusal leaves everything bitwise unchanged, every accepted load reaches its
    next boundary with finite parameters (or a GradAccumError there)."""
    base = mid_window_checkpoint(tmp_path / "base", scaler=True)
    base_parts = parts(base)
    rng = random.Random(SEED)
    counts: Counter[str] = Counter()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for example in range(EXAMPLES):
        # No hang: an input that blocks ends the run with a traceback after 120 s instead
        # of hanging CI (one input takes tens of milliseconds).
        faulthandler.dump_traceback_later(120, exit=True)
        target = tmp_path / f"case{example % 2}"
        if target.exists():
            shutil.rmtree(target)
        p = copy.deepcopy(base_parts)
        huge = False
        draw = rng.random()
        if draw < 0.5:
            kind, huge = _mutate_json(rng, p)
            if not _write(p, target):
                _raw_manifest(base, target, p)
                kind += ":raw"
        elif draw < 0.8:
            kind = _mutate_tensors(rng, p)
            if not _write(p, target):
                counts["writer refused"] += 1
                continue
        elif draw < 0.97:
            kind = _mutate_bytes(rng, base, target)
        else:
            kind = _mutate_fs(rng, base, target)
        live = live_objects(scaler=True)
        before = snapshot(live)
        try:
            live[1].load(target)
        except GradAccumError:
            counts["refused"] += 1
            after = snapshot(live)
            try:
                assert_same(before, after)
            except AssertionError as exc:
                raise AssertionError(f"example {example} ({kind}) changed state: {exc}") from exc
            continue
        except Exception as exc:
            raise AssertionError(
                f"example {example} ({kind}): {type(exc).__name__}: {exc}"
            ) from exc
        counts["accepted"] += 1
        model, acc = live
        try:
            steps = acc.stats.optimizer_steps
            for _ in range(4):
                train(live, 1, seed=example)
                if acc.stats.optimizer_steps != steps:
                    break
        except GradAccumError:
            counts["accepted, refused at the boundary"] += 1
        except Exception as exc:
            raise AssertionError(
                f"example {example} ({kind}) was accepted, then training raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not _finite(model):
            assert huge, f"example {example} ({kind}) was accepted and diverged"
            counts["accepted, diverged by a huge hyper-parameter"] += 1
    faulthandler.cancel_dump_traceback_later()
    print(f"fuzz Accumulator.load: {EXAMPLES} examples, {dict(counts)}")
    assert counts["refused"] > counts["accepted"] > 0
    # No memory blow-up: the inputs raise this process's peak resident memory by less than
    # 512 MiB (a /dev/zero link read to its end, or a huge declared shape, would take GBs).
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 512 * 1024, f"peak resident memory grew by {grown} KiB over the inputs"
