"""examples/wandb_train.py, offline, in one process: it prints one line per optimizer step read
back from its own ``.wandb`` file, x = 1..N, and the run on disk holds exactly those rows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradaccum_wandb.offline import read_run

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "wandb_train.py"
ROW = re.compile(
    r"^optimizer_step +(\d+)  loss/row (\S+)  items +(\d+)  lr (\S+)  grad_norm (\S+)$", re.M
)


def test_example_logs_one_row_per_optimizer_step(tmp_path: Path) -> None:
    """10 microbatches per epoch in windows of 4 (4, 4, 2) over 2 epochs: 6 optimizer steps,
    x = 1..6, each window's item count as the example's data has it, and an exit record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--dir", str(tmp_path), "--microbatches", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = ROW.findall(done.stdout)
    assert [int(step) for step, *_ in printed] == [1, 2, 3, 4, 5, 6]
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import wandb_train
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    sizes = [x.shape[0] for x, _ in wandb_train.make_data(0, 10)]
    windows = [sum(sizes[0:4]), sum(sizes[4:8]), sum(sizes[8:10])] * 2
    assert [int(items) for _, _, items, _, _ in printed] == windows
    (file,) = [p for p in tmp_path.rglob("run-*.wandb") if "latest-run" not in p.parts]
    run = read_run(file)
    assert run.has_exit and run.exit_code == 0
    assert [row["optimizer_step"] for row in run.history] == [1, 2, 3, 4, 5, 6]
    for row, (_, loss, _, lr, norm) in zip(run.history, printed, strict=True):
        assert float(loss) == pytest.approx(row["train/loss"], rel=1e-6)
        assert float(lr) == pytest.approx(row["accum/lr"], rel=1e-6)
        assert float(norm) == pytest.approx(row["accum/grad_norm"], rel=1e-4)
