"""Adaptive microbatching on 2 real gloo ranks (spec ACC-K5, ACC-D).

Rank 0's microbatch runs out of memory (the allocator's error, injected: a CPU
run cannot make one rank alone fail for real at a chosen point; the real fault
is tested on one process in gradaccum-torch's test_adaptive.py). Both ranks
must cancel the same microbatch, keep the same size, and end on the
large-batch update over the global batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradaccum import AdaptiveMicrobatch
from gradaccum_ddp import DDPAccumulator
from gradaccum_ddp.testing import launch
from gradaccum_torch import AdaptiveOutOfMemoryError

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
ROWS = 8  # per rank and window


def model_() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()


def data(windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of 2 × ROWS rows (rank r takes rows r*ROWS:(r+1)*ROWS)."""
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(2 * ROWS, 4, generator=gen, dtype=torch.float64),
            torch.randn(2 * ROWS, 1, generator=gen, dtype=torch.float64),
        )
        for _ in range(windows)
    ]


def program(rank: int, world: int, out: str, fail_rank: int, fail_calls: list[int]) -> None:
    model = model_()
    ddp = DistributedDataParallel(model)
    acc = DDPAccumulator(
        ddp,
        torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=AdaptiveMicrobatch(target=ROWS, micro_batch=ROWS, grow_after=2),
        normalization="items",
    )
    calls = [0]

    def loss_fn(part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls[0] += 1
        if rank == fail_rank and calls[0] in fail_calls:
            raise RuntimeError(CPU_OOM)
        x, y = part
        return ((ddp(x) - y) ** 2).sum()

    record: dict[str, Any] = {"sizes": []}
    try:
        for x, y in data(3):
            mine = (x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS])
            acc.run(mine, loss_fn)
            record["sizes"].append(acc.adaptive.micro_batch)
        record["params_after_run"] = [p.detach().reshape(-1).tolist() for p in model.parameters()]
        record["reductions"] = acc.manual_reductions
        record["exchanges_after_run"] = acc.adaptive.flag_exchanges
        # Outside run(): plain microbatches sync in DDP's own backward (no manual
        # reduction) and exchange no status flag.
        x, y = data(1)[0]
        mine = (x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS])
        for half in (slice(0, ROWS // 2), slice(ROWS // 2, ROWS)):
            with acc.microbatch(ROWS // 2, last=half.start > 0):
                acc.backward(loss_fn((mine[0][half], mine[1][half])))
        record["plain_reductions"] = acc.manual_reductions - record["reductions"]
        record["plain_steps"] = acc.stats.optimizer_steps
    except AdaptiveOutOfMemoryError as exc:
        record["error"] = str(exc)
    record["params"] = [p.detach().reshape(-1).tolist() for p in model.parameters()]
    record["events"] = [(e.old_size, e.new_size, list(e.ranks)) for e in acc.adaptive.events]
    record["exchanges"] = acc.adaptive.flag_exchanges
    record["replayed"] = [e.replayed for e in acc.adaptive.events]
    record["run_active"] = acc.machine.defers_sync
    record["micro_steps"] = acc.stats.micro_steps
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()


def reference() -> list[list[float]]:
    model = model_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data(3):
        opt.zero_grad()
        (((model(x) - y) ** 2).sum() / len(x)).backward()
        opt.step()
    return [p.detach().reshape(-1).tolist() for p in model.parameters()]


def test_one_rank_oom_all_ranks_agree_and_stay_exact(tmp_path: Path) -> None:
    """ACC-K5, ACC-D1: rank 0's OOM in the 1st microbatch makes both ranks halve
    8 -> 4 (rank 1 cancels its successful microbatch); both grow back after 2
    clean windows; one status all-gather per microbatch attempt and one gradient
    reduction per window; the 3 run() windows' parameters are equal on the ranks
    and to the float64 large-batch reference within 1e-12; a plain window after
    them makes no exchange and no manual reduction."""
    run = launch(program, 2, str(tmp_path), 0, [1], timeout=120, pg_timeout=30)
    assert run.ok, run
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["events"] == r1["events"] == [[8, 4, [0]]]
    assert r0["params"] == r1["params"]
    assert r0["sizes"] == r1["sizes"] == [4, 4, 8]
    # attempts: window 0: 1 failed + 2 at 4 rows; windows 1, 2: 2 each (the window
    # that ran out of memory is not clean: the size doubles after window 2)
    assert r0["exchanges"] == r1["exchanges"] == 7
    assert r0["micro_steps"] == r1["micro_steps"] == 6 + 2
    # One gradient reduction per window under run(), made at the boundary.
    assert r0["reductions"] == r1["reductions"] == 3
    # Nothing extra when run() is not used: DDP syncs in its own backward.
    assert r0["plain_reductions"] == r1["plain_reductions"] == 0
    # The schedule's windows now hold ceil(8 / 8) = 1 microbatch: each plain one steps.
    assert r0["plain_steps"] == r1["plain_steps"] == 5
    assert not r0["run_active"] and not r1["run_active"]
    ref = reference()
    for got in (r0["params_after_run"], r1["params_after_run"]):
        dev = max(
            abs(a - b) for g, w in zip(got, ref, strict=True) for a, b in zip(g, w, strict=True)
        )
        assert dev <= 1e-12


def test_a_rank_that_cannot_fit_one_row_fails_everywhere(tmp_path: Path) -> None:
    """ACC-K5, ACC-E4: rank 1 fails at every size down to 1 row: every rank raises
    AdaptiveOutOfMemoryError naming rank 1, and nothing hangs."""
    run = launch(program, 2, str(tmp_path), 1, list(range(1, 100)), timeout=120, pg_timeout=30)
    assert run.ok, run
    for r in (0, 1):
        rec = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert "rank(s) [1] ran out of memory at micro_batch=1" in rec["error"]
        assert rec["sizes"] == []


def test_a_later_microbatch_failing_on_one_rank_replays_the_window_on_all(tmp_path: Path) -> None:
    """ACC-K5, ACC-D5: rank 0 fails in the forward of the 2nd microbatch of a window
    (it could keep its window) while rank 1's 2nd backward already joined param.grad
    (it cannot): both ranks drop and replay the window, stay in step and end on the
    float64 large-batch reference within 1e-12."""
    run = launch(program, 2, str(tmp_path), 0, [1, 3], timeout=120, pg_timeout=30)
    assert run.ok, run
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # call 1 fails at 8 rows -> 4; call 2 ok (4 rows), call 3 fails at position 1 -> 2
    assert r0["events"] == r1["events"] == [[8, 4, [0]], [4, 2, [0]]]
    assert r0["replayed"] == r1["replayed"] == [False, True]
    assert r0["sizes"] == r1["sizes"]
    ref = reference()
    for got in (r0["params_after_run"], r1["params_after_run"]):
        pairs = zip(got, ref, strict=True)
        dev = max(abs(a - b) for g, w in pairs for a, b in zip(g, w, strict=True))
        assert dev <= 1e-12
