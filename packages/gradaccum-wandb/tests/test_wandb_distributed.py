"""Two real gloo ranks: only rank 0 writes a W&B run, under DDP (`gradaccum_ddp`) and under
Accelerate (`gradaccum_accelerate`, ``Accelerator(log_with="wandb")`` beside
``accelerator.log``). The runs are read back from their ``.wandb`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import wandb_workers as W

from gradaccum_accelerate.testing import launch_accelerate
from gradaccum_ddp.testing import launch
from gradaccum_lightning.testing import launch_lightning
from gradaccum_wandb.offline import read_run


def run_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("run-*.wandb") if "latest-run" not in p.parts)


def results(root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads((root / f"{name}.rank{r}.json").read_text()) for r in range(2)]


def test_ddp_only_rank_zero_logs(tmp_path: Path) -> None:
    """Under DDP (2 gloo ranks, unequal item counts) exactly one run exists, rank 0's; it has
    one row per optimizer step at x = 1, 2 with the window's items over both ranks, and the
    staged loss is rank 0's own item-weighted window mean Σ S_j / Σ n_j (1e-12 relative)."""
    outcome = launch(W.ddp_program, 2, str(tmp_path), timeout=120)
    assert outcome.ok, outcome
    ranks = results(tmp_path, "ddp")
    assert [r["logger_rank"] for r in ranks] == [0, 1]
    (file,) = run_files(tmp_path)
    assert file.is_relative_to(tmp_path / "rank0")
    run = read_run(file)
    assert run.has_exit
    assert [row["optimizer_step"] for row in run.history] == [1, 2]
    sizes = W.SIZES
    windows = [slice(0, 3), slice(3, 6)]
    losses = ranks[0]["losses"]
    for row, window in zip(run.history, windows, strict=True):
        assert row["accum/items_in_window"] == sum(sizes[0][window]) + sum(sizes[1][window])
        want = sum(losses[window]) / sum(sizes[0][window])
        assert row["loss"] == pytest.approx(want, rel=1e-12)
    assert run.history[-1]["accum/items_total"] == sum(sizes[0]) + sum(sizes[1])


def test_accelerate_only_main_process_logs_beside_accelerator_log(tmp_path: Path) -> None:
    """Under Accelerate (2 ranks, ``log_with="wandb"``) only the main process has a run; the
    logger's rows (x = 1, 2 on ``optimizer_step``) and every row the loop logged with
    ``accelerator.log`` are in it: nothing dropped, the logger never passed ``step=``."""
    outcome = launch_accelerate(W.accelerate_program, 2, str(tmp_path), timeout=120)
    assert outcome.ok, outcome
    ranks = results(tmp_path, "accelerate")
    assert [(r["logger_rank"], r["main"]) for r in ranks] == [(0, True), (1, False)]
    (file,) = run_files(tmp_path)
    assert file.is_relative_to(tmp_path / "rank0")
    run = read_run(file)
    assert run.has_exit
    ours = [row for row in run.history if "accum/skipped" in row]
    theirs = [row for row in run.history if "user/effective_step" in row]
    assert [row["optimizer_step"] for row in ours] == [1, 2]
    assert [row["user/effective_step"] for row in theirs] == [1, 2]
    assert ranks[0]["user_rows"] == 2
    assert len(run.history) == 4
    assert run.metrics["accum/*"] == "optimizer_step"


def test_lightning_ddp_only_rank_zero_logs(tmp_path: Path) -> None:
    """Under ``Trainer(strategy="ddp", devices=2)`` with ``GradAccum`` and Lightning's
    ``WandbLogger``, the logger on both ranks, only rank 0 writes: one run, our rows at
    ``trainer/global_step`` 0 and 1, each window's items counted over both ranks."""
    outcome = launch_lightning(W.lightning_program, 2, str(tmp_path), timeout=180)
    assert outcome.ok, outcome
    ranks = results(tmp_path, "lightning")
    assert [(r["logger_rank"], r["global_step"]) for r in ranks] == [(0, 2), (1, 2)]
    (file,) = run_files(tmp_path)
    run = read_run(file)
    assert run.has_exit
    ours = [row for row in run.history if "accum/skipped" in row]
    assert [row["trainer/global_step"] for row in ours] == [0, 1]
    sizes = W.SIZES
    assert [row["accum/items_in_window"] for row in ours] == [
        sum(sizes[0][w]) + sum(sizes[1][w]) for w in (slice(0, 3), slice(3, 6))
    ]
