"""examples/accelerate_train.py on one process and, under torchrun with ACCELERATE_USE_CPU=1,
on two: the number of optimizer steps and the learning rate of each (one scheduler step per
update), the tokens of every window over all processes, the parameters against a large-batch
run computed by the example itself, equal parameters on both processes, and a mid-window
``save_state`` that resumes bit for bit."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "accelerate_train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEP = re.compile(r"^epoch (\d+) step +(\d+) loss +(\S+) +tokens (\d+) lr (\S+)$", re.MULTILINE)
HASHES = re.compile(r"^parameters sha256, process by process: ([0-9a-f ]+)$", re.MULTILINE)
DIFF = re.compile(r"^largest difference from one large batch per window: (\S+)$", re.MULTILINE)
EPOCHS = 2


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("accelerate_train", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(processes: int, checkpoint_at: int, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if processes == 1:
        env.pop("ACCELERATE_USE_CPU", None)
        command = [sys.executable, str(EXAMPLE)]
    else:
        # Without ACCELERATE_USE_CPU, torchrun on a CPU-only machine starts independent
        # single-process runs.
        env["ACCELERATE_USE_CPU"] = "1"
        command = [*TORCHRUN, f"--nproc-per-node={processes}", "--max-restarts=0", str(EXAMPLE)]
    done = subprocess.run(
        [*command, "--check", "--checkpoint-at", str(checkpoint_at), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("processes", [1, 2])
def test_the_example_is_exact_and_resumes_bitwise(processes: int, tmp_path: Path) -> None:
    example = _example()
    batches = -(-232 // 4)  # the example's defaults: 232 sequences, microbatches of 4
    per_process = batches // processes
    windows = -(-per_process // 8)
    short = per_process % 8
    assert short, "the defaults give every pass a short last window"
    total_steps = EPOCHS * windows
    # save_state 3 microbatches into the second epoch's first window: the resumed run must
    # restore the open window and the epoch, and skip to the same place in the same order.
    checkpoint_at = per_process + 3

    out = _run(processes, checkpoint_at, "--output-dir", str(tmp_path))
    steps = STEP.findall(out)
    assert [int(s[1]) for s in steps] == list(range(1, total_steps + 1)), out
    assert f"done: {total_steps} optimizer steps" in out
    # The scheduler stepped once per optimizer step, on every number of processes (Accelerate's
    # prepared scheduler would step once per process).
    factor = example.warmup_then_linear(total_steps)
    lrs = [float(s[4]) for s in steps]
    assert lrs == pytest.approx([3e-2 * factor(i) for i in range(total_steps)], abs=1e-6)
    # Every window's tokens are counted over all processes: each epoch sees every token once.
    tokens = sum(len(s) - 1 for s in example.make_dataset(232))
    per_epoch = [sum(int(s[3]) for s in steps if int(s[0]) == e) for e in range(EPOCHS)]
    assert per_epoch == [tokens] * EPOCHS
    # The short last window is stepped as what it is, not as a full one.
    assert int(steps[windows - 1][3]) < min(int(s[3]) for s in steps[: windows - 1])
    # The update is the large batch's (float64: rounding is ~1e-13).
    (diff,) = DIFF.findall(out)
    assert float(diff) < 1e-10, out
    # Every process holds the same parameters.
    (hashes,) = HASHES.findall(out)
    assert len(hashes.split()) == processes
    assert len(set(hashes.split())) == 1, hashes

    checkpoint = tmp_path / f"microbatch-{checkpoint_at}"
    assert f"saved {checkpoint} (microbatch 3 of a window)" in out
    assert (checkpoint / "gradaccum" / "manifest.json").is_file()
    resumed = _run(
        processes,
        checkpoint_at,
        "--output-dir",
        str(tmp_path / "unused"),
        "--resume",
        str(checkpoint),
    )
    assert f"resumed from {checkpoint}: epoch 1, microbatch 3" in resumed
    again = STEP.findall(resumed)
    # The window open at the checkpoint closes first, then the run goes on as before.
    first = windows + 1
    assert [int(s[1]) for s in again] == list(range(first, total_steps + 1))
    assert again[0][2] == "n/a"
    assert again[0][3:] == steps[first - 1][3:]  # its tokens and learning rate
    assert again[1:] == steps[first:]
    assert HASHES.findall(resumed) == [hashes], "the resumed run ends bit for bit where it did"
