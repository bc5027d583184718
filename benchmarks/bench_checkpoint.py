"""Checkpoint save and load of a >= 1 GB model, mid-window, against torch.save/torch.load
and torch.distributed.checkpoint (dcp), on one process and on 2 gloo ranks.

``python benchmarks/bench_checkpoint.py [--quick] [--repeats N] [--worlds 1,2] [--dir DIR]
[--out FILE] [--drop-caches]``

The live training state is an MLP of 16 float32 ``Linear(4096, 4096)`` layers
(268.5 million parameters, 1.07 GB), SGD with momentum (1.07 GB of momentum
buffers) and a window in flight (1.07 GB of gradients): `Accumulator` with
``steps=2`` after 3 microbatches (one optimizer step taken, one microbatch
accumulated). ``--quick``: 4 layers of 512 (1.05 million parameters, 4.2 MB),
one repeat.

The same tensors — model, optimizer state, in-flight gradients — are saved and
loaded three ways:

* ``gradaccum``: ``acc.save(path)`` / ``acc.load(path)`` (every byte checked:
  headers by SHA-256, tensor data by CRC-32, on 2 ranks the shared files split
  between the ranks; all or nothing);
* ``torch``: ``torch.save({"model", "optimizer", "grads"})`` + ``os.fsync`` /
  ``torch.load(weights_only=True)`` + ``load_state_dict`` and ``p.grad = ...``
  (on 2 ranks rank 0 writes model and optimizer, every rank its own gradients);
* ``dcp``: ``torch.distributed.checkpoint.save`` / ``load`` of the same state
  dict. dcp loads in place, so a resume with it first allocates the optimizer
  state and the gradients: a dcp load's ``seconds`` time ``dcp.load`` alone,
  into targets allocated just before, and its ``resume_seconds`` the
  allocation too (``targets_seconds``) — what ``seconds`` timed before these
  fields existed. gradaccum's load allocates what it installs inside its own
  time (it replaces the optimizer state and gradients, keeping the old ones
  until everything is installed, all or nothing), so it is compared with both.

Three operations: ``save``; ``load``, a resume in a fresh process (no
optimizer state or gradients yet); ``rollback``, a load into a process that
trained to mid-window itself (another seed), whose optimizer state and
gradients exist — dcp loads into them, gradaccum reads into them in place.

Each operation runs in a fresh process (2 fresh processes for 2
ranks) that first builds the live state (for a load: fresh objects, another
seed), then resets its peak resident set (``/proc/self/clear_refs``) and
times the operation alone (before the repetitions on each world size, one
untimed ``torch`` save and load warm up what a first operation pays for).
Reported per operation: wall seconds (2 ranks: rank 0, between barriers)
and the peak resident memory above the live training state — for a save,
peak minus the resident set before it; for a
load, peak minus the resident set after it (when the loaded state is live);
on 2 ranks the larger rank's. Each repetition runs the methods in a rotating
order; ratios (gradaccum / other) are paired within a repetition and given as
median [min, max]. The checkpoint directory defaults to /dev/shm (tmpfs: the
figures measure the software, not the disk; pass ``--dir`` for a disk).
``--drop-caches`` drops the kernel's clean page cache before each operation
(``/proc/sys/vm/drop_caches`` must be writable, e.g. as root; recorded as
``drop_caches`` in the results). On the 2-core VM the figures were taken on,
memory state moves the figures: with about 5 GB of other files in /dev/shm
every method ran slower (a 2-rank ``torch.save`` 6.7 s instead of 1.6 s), so
compare ratios, not seconds, across runs. After a drop each 4 KiB page of a
mapped tmpfs file is faulted in on its own (0.5 s per GiB against 0.14 s for
``pread``, measured); gradaccum's load maps only the model's file (to copy it
in through ``load_state_dict``) and reads the rest with ``pread``, so a drop
costs it about 0.3 s here. The default leaves the cache alone.
Writes ``benchmarks/results/checkpoint.json`` (or ``--out``) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("gradaccum", "torch", "dcp")
# "rollback": a load into a live, trained process, whose optimizer state and gradients exist
OPS = ("save", "load", "rollback")


# --------------------------------------------------------------------------- memory


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------- live state


def _model(layers: int, width: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width, device="meta") for _ in range(layers)])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / width**0.5, generator=gen)
    return model


def _live(spec: dict[str, Any], seed: int, ddp: bool, train: bool) -> tuple[Any, Any, Any]:
    """(model or DDP, accumulator, module): trained to mid-window when ``train``."""
    from gradaccum_torch import Accumulator

    module = _model(spec["layers"], spec["width"], seed)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        from gradaccum_ddp import DDPAccumulator

        model: Any = DistributedDataParallel(module)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        acc: Any = DDPAccumulator(model, opt, steps=2)
    else:
        model = module
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        acc = Accumulator(model, opt, steps=2)
    if train:
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(3):
            x = torch.randn(4, spec["width"], generator=gen)
            with acc.microbatch():
                acc.backward(model(x).square().mean())
        assert acc.stats.position == 1
        assert acc.stats.optimizer_steps == 1
    return model, acc, module


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _torch_save(acc: Any, module: nn.Module, path: Path, rank: int, world: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    files = []
    if rank == 0:
        state = {"model": module.state_dict(), "optimizer": acc.optimizer.state_dict()}
        torch.save(state, path / "state.pt")
        files.append(path / "state.pt")
    torch.save(_grads(module), path / f"grads.rank{rank}.pt")
    files.append(path / f"grads.rank{rank}.pt")
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _torch_load(acc: Any, module: nn.Module, path: Path, rank: int, world: int) -> None:
    state_file = path / "state.pt"
    state = torch.load(state_file, weights_only=True)
    module.load_state_dict(state["model"])
    acc.optimizer.load_state_dict(state["optimizer"])
    del state
    grads = torch.load(path / f"grads.rank{rank}.pt", weights_only=True)
    for name, p in module.named_parameters():
        p.grad = grads[name]
    del grads


def _dcp_state(acc: Any, module: nn.Module, rank: int) -> dict[str, Any]:
    return {
        "model": module.state_dict(),
        "optimizer": acc.optimizer.state_dict(),
        f"grads_rank{rank}": _grads(module),
    }


def _dcp_save(acc: Any, module: nn.Module, path: Path, rank: int, world: int) -> None:
    from torch.distributed.checkpoint.state_dict_saver import save

    save(_dcp_state(acc, module, rank), checkpoint_id=str(path))


def _dcp_targets(acc: Any) -> None:
    """dcp loads in place: allocate what it loads into — the optimizer state (one
    zero-gradient step at lr 0 would change the momentum; allocate the buffers directly)
    and the gradients — as a resume with dcp must first."""
    opt = acc.optimizer
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
            p.grad = torch.zeros_like(p)


def _dcp_load(acc: Any, module: nn.Module, path: Path, rank: int, world: int) -> None:
    from torch.distributed.checkpoint.state_dict_loader import load

    state = _dcp_state(acc, module, rank)
    load(state, checkpoint_id=str(path))
    module.load_state_dict(state["model"])
    acc.optimizer.load_state_dict(state["optimizer"])
    del state


def _run_op(
    spec: dict[str, Any], method: str, op: str, path: Path, rank: int, world: int
) -> dict[str, Any]:
    ddp = world > 1
    _, acc, module = _live(spec, seed=0 if op == "save" else 7, ddp=ddp, train=op != "load")
    if ddp:
        dist.barrier()
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    targets = 0.0
    if method == "dcp" and op == "load":
        _dcp_targets(acc)
        targets = time.perf_counter() - start
    if method == "gradaccum":
        if op == "save":
            acc.save(path)
        else:
            acc.load(path)
        # (a rollback's targets exist: dcp loads into them, gradaccum may too)
    elif method == "torch":
        (_torch_save if op == "save" else _torch_load)(acc, module, path, rank, world)
    else:
        (_dcp_save if op == "save" else _dcp_load)(acc, module, path, rank, world)
    if ddp:
        dist.barrier()
    seconds = time.perf_counter() - start
    gc.collect()
    peak, after = _status("VmHWM"), _status("VmRSS")
    base = before if op == "save" else after
    if op != "save":  # the loaded state is live: in-flight gradients on every parameter
        assert all(p.grad is not None for p in module.parameters())
    # "seconds" of a dcp load leave out allocating its targets ("targets_seconds");
    # "resume_seconds" count them too, as "seconds" did before these fields existed.
    return {"seconds": seconds - targets, "resume_seconds": seconds,
            "targets_seconds": targets, "extra_bytes": max(0, peak - base),
            "rss_before": before, "rss_after": after, "peak": peak}  # fmt: skip


# --------------------------------------------------------------------------- children


def _rank_main(rank: int, world: int, spec: dict[str, Any], method: str, op: str,
               path: str, out: str) -> None:  # fmt: skip
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    result = _run_op(spec, method, op, Path(path), rank, world)
    Path(out, f"result.rank{rank}.json").write_text(json.dumps(result))


def _child(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if args.world == 1:
        torch.set_num_threads(1)
        result = _run_op(spec, args.method, args.op, Path(args.path), 0, 1)
        Path(args.result, "result.rank0.json").write_text(json.dumps(result))
        return
    from gradaccum_ddp.testing import launch

    outcome = launch(
        _rank_main, args.world, spec, args.method, args.op, args.path, args.result,
        timeout=1800, pg_timeout=1800,
    )  # fmt: skip
    if not outcome.ok:
        raise SystemExit(f"ranks failed: {outcome}")


_DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def _can_drop_caches() -> bool:
    return os.access(_DROP_CACHES, os.W_OK)


def _drop_caches() -> None:
    """Write back dirty pages and drop the clean page cache (see the module docstring)."""
    os.sync()
    _DROP_CACHES.write_text("3\n")


def _measure(
    spec: dict[str, Any], method: str, op: str, path: Path, world: int, drop: bool = False
) -> dict[str, Any]:
    if drop:
        _drop_caches()
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-result-") as res:
        cmd = [sys.executable, __file__, "--child", "--method", method, "--op", op,
               "--world", str(world), "--path", str(path), "--result", res,
               "--spec", json.dumps(spec)]  # fmt: skip
        subprocess.run(cmd, check=True)
        rows = [json.loads(Path(res, f"result.rank{r}.json").read_text()) for r in range(world)]
    return {
        "seconds": rows[0]["seconds"],
        "resume_seconds": rows[0]["resume_seconds"],
        "extra_bytes": max(r["extra_bytes"] for r in rows),
        "ranks": rows,
    }


def _bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ratio_summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4.2 MB model, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default /dev/shm)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the page cache before each operation (needs root)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("method", "op", "world", "path", "result", "spec"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.world = int(args.world)
        _child(args)
        return
    spec = {"layers": 4, "width": 512} if args.quick else {"layers": 16, "width": 4096}
    repeats = 1 if args.quick else args.repeats
    worlds = [int(w) for w in args.worlds.split(",")]
    params = spec["layers"] * (spec["width"] ** 2 + spec["width"])
    root_dir = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    drop = args.drop_caches
    if drop and not _can_drop_caches():
        parser.error(f"--drop-caches needs write access to {_DROP_CACHES}")
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=root_dir) as tmp:
        for world in worlds:
            per: dict[str, dict[str, list[dict[str, Any]]]] = {
                m: {op: [] for op in OPS} for m in METHODS
            }
            sizes: dict[str, int] = {}
            # one untimed save and load first: the run's first operation on this many ranks
            # paid for what later ones find warm (measured: 1.5-1.9 s instead of 1.1-1.2 s)
            warm = Path(tmp) / f"warm-up-w{world}"
            for op in ("save", "load"):
                _measure(spec, "torch", op, warm, world, drop)
            shutil.rmtree(warm, ignore_errors=True)
            for r in range(repeats):
                order = METHODS[r % 3 :] + METHODS[: r % 3]
                for method in order:
                    path = Path(tmp) / f"{method}-w{world}"
                    for op in OPS:
                        m = _measure(spec, method, op, path, world, drop)
                        per[method][op].append(m)
                        print(f"world {world} repeat {r} {method:9s} {op}: {m['seconds']:7.2f} s, "
                              f"+{m['extra_bytes'] / 2**30:6.2f} GiB", flush=True)  # fmt: skip
                        if op == "save":
                            sizes[method] = _bytes_on_disk(path)
                    shutil.rmtree(path, ignore_errors=True)
            summary: dict[str, Any] = {"bytes_on_disk": sizes}
            for op in OPS:
                for method in METHODS:
                    runs_m = per[method][op]
                    summary[f"{method}.{op}"] = {
                        "seconds_median": statistics.median(x["seconds"] for x in runs_m),
                        "extra_gib_max": max(x["extra_bytes"] for x in runs_m) / 2**30,
                        "runs": runs_m,
                    }
                for other in ("torch", "dcp"):
                    time_ratios = [
                        a["seconds"] / b["seconds"]
                        for a, b in zip(per["gradaccum"][op], per[other][op], strict=True)
                    ]
                    summary[f"time_ratio.{op}.gradaccum/{other}"] = _ratio_summary(time_ratios)
            # a dcp resume: allocating dcp's targets, then dcp.load
            summary["dcp.resume"] = {
                "seconds_median": statistics.median(
                    x["resume_seconds"] for x in per["dcp"]["load"]
                ),
            }
            summary["time_ratio.load.gradaccum/dcp-resume"] = _ratio_summary(
                [
                    a["seconds"] / b["resume_seconds"]
                    for a, b in zip(per["gradaccum"]["load"], per["dcp"]["load"], strict=True)
                ]
            )
            runs[f"world{world}"] = summary
    report = {
        "benchmark": "checkpoint",
        "spec": spec,
        "parameters": params,
        "parameter_bytes": params * 4,
        "repeats": repeats,
        "dir": root_dir or tempfile.gettempdir(),
        "drop_caches": drop,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": runs,
    }
    out = Path(args.out) if args.out else RESULTS / "checkpoint.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    gib = params * 4 / 2**30
    print(f"\n{params / 1e6:.1f} M parameters ({gib:.2f} GiB float32), SGD momentum, "
          f"mid-window; {repeats} repeat(s); checkpoints in {report['dir']}; "
          f"page cache dropped before each operation: {drop}\n")  # fmt: skip
    print("| ranks | operation | gradaccum s | torch s | dcp s | gradaccum/torch | "
          "gradaccum/dcp | extra GiB gradaccum | torch | dcp |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for world in worlds:
        s = runs[f"world{world}"]
        for op in OPS:
            ratios = []
            for other in ("torch", "dcp"):
                q = s[f"time_ratio.{op}.gradaccum/{other}"]
                ratios.append(f"{q['median']:.2f} [{q['min']:.2f}, {q['max']:.2f}]")
            print(
                f"| {world} | {op} | {s[f'gradaccum.{op}']['seconds_median']:.2f} | "
                f"{s[f'torch.{op}']['seconds_median']:.2f} | {s[f'dcp.{op}']['seconds_median']:.2f}"
                f" | {ratios[0]} | {ratios[1]} | {s[f'gradaccum.{op}']['extra_gib_max']:.2f} | "
                f"{s[f'torch.{op}']['extra_gib_max']:.2f} | {s[f'dcp.{op}']['extra_gib_max']:.2f} |"
            )
    print("\nA resume with dcp also allocates what dcp loads into (optimizer state, gradients):")
    for world in worlds:
        s = runs[f"world{world}"]
        q = s["time_ratio.load.gradaccum/dcp-resume"]
        print(
            f"{world} rank(s): dcp resume {s['dcp.resume']['seconds_median']:.2f} s, "
            f"gradaccum/dcp resume {q['median']:.2f} [{q['min']:.2f}, {q['max']:.2f}]"
        )


if __name__ == "__main__":
    main()
