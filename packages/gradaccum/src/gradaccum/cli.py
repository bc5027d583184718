"""The ``gradaccum`` command: inspect and validate checkpoints.

``gradaccum inspect PATH [--json]`` verifies a checkpoint and prints a
summary (or its manifest as JSON); ``gradaccum validate PATH`` verifies it
and prints ``valid: PATH`` (exit 0) or ``invalid: <reason>`` on stderr
(exit 1). Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from gradaccum.checkpoint import (
    FORMAT_VERSION,
    SPEC_VERSION,
    Checkpoint,
    read_checkpoint,
)
from gradaccum.errors import GradAccumError

__all__ = ["main"]

_COUNTERS = (
    "epoch",
    "micro_steps",
    "optimizer_steps",
    "skipped_steps",
    "windows",
    "items_in_window",
    "items_total",
    "dropped_microbatches",
    "dropped_windows",
)


def _version() -> str:
    try:
        return importlib.metadata.version("gradaccum")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        import gradaccum

        return str(getattr(gradaccum, "__version__", "0+unknown"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradaccum",
        description="Exact gradient accumulation: inspect and validate checkpoints.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=(
            f"gradaccum {_version()} (checkpoint format {FORMAT_VERSION}, spec {SPEC_VERSION})"
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    inspect = commands.add_parser("inspect", help="verify a checkpoint and print a summary of it")
    inspect.add_argument("path", metavar="PATH", help="a checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    validate = commands.add_parser(
        "validate", help="verify a checkpoint; exit 0 when valid, 1 when not"
    )
    validate.add_argument("path", metavar="PATH", help="a checkpoint directory")
    return parser


def position_text(state: Any) -> str:
    """``"microbatch 3 of 4 in the open window"`` or ``"at a window boundary"``."""
    if state["position"] == 0:
        return "at a window boundary"
    return f"microbatch {state['position']} of {state['window_size']} in the open window"


def _compact(value: Any, limit: int = 72) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _table(rows: Sequence[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _summary(ckpt: Checkpoint, out: TextIO) -> None:
    m = ckpt.manifest
    state = m.state
    created = datetime.datetime.fromtimestamp(m.created_unix, tz=datetime.timezone.utc)
    out.write(f"checkpoint       {ckpt.path}\n")
    if ckpt.source != ckpt.path:
        out.write(f"recovered from   {ckpt.source} (a writer was interrupted)\n")
    out.write(f"format version   {m.format_version} (spec {m.spec_version})\n")
    out.write(f"producer         {m.producer.name} {m.producer.version}\n")
    out.write(f"created          {created:%Y-%m-%d %H:%M:%S} UTC ({m.created_unix})\n")
    out.write(f"world size       {m.world_size}\n")
    position = position_text(state)
    if state["position"]:
        position += (
            f" ({state['contributing']} contributing, {state['items_in_window']} items, "
            f"gradients {'synced' if state['synced_in_window'] else 'not synced'})"
        )
    out.write(f"position         {position}\n")
    out.write("counters\n")
    _table([(key, str(state[key])) for key in _COUNTERS], out)
    if state["schedule_state"]:
        out.write(f"  schedule_state  {_compact(state['schedule_state'])}\n")
    out.write("config\n")
    _table([(key, _compact(value)) for key, value in m.config.items()], out)
    out.write("files\n")
    if not m.files:
        out.write("  (none)\n")
    else:
        _table(
            [("role", "file", "bytes", "tensors", "sha256")]
            + [
                (role, e.path, str(e.size), str(len(e.tensors)), e.sha256[:16] + "…")
                for role, e in m.files.items()
            ],
            out,
        )
        out.write("tensors\n")
        _table(
            [("role", "name", "dtype", "shape")]
            + [
                (role, name, t.dtype, "[" + ", ".join(str(d) for d in t.shape) + "]")
                for role, e in m.files.items()
                for name, t in e.tensors.items()
            ],
            out,
        )
    if m.metadata:
        out.write("metadata\n")
        _table([(role, _compact(value)) for role, value in m.metadata.items()], out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradaccum`` command line; returns the exit status
    (0 success, 1 invalid or missing checkpoint, 2 bad usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "validate":
        try:
            read_checkpoint(args.path)
        except GradAccumError as exc:
            print(f"invalid: {exc}", file=sys.stderr)
            return 1
        print(f"valid: {args.path}")
        return 0
    try:
        ckpt = read_checkpoint(args.path)
    except GradAccumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(ckpt.manifest.to_json_dict(), indent=2, ensure_ascii=False))
    else:
        _summary(ckpt, sys.stdout)
    return 0
