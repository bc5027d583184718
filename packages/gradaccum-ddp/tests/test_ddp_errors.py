"""Ranks that disagree raise DistributedError on every rank instead of hanging; a rank
that dies or hangs mid-window makes the others raise within a bounded time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ddp_workers as W
import pytest

from gradaccum_ddp.testing import launch


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp-errors")
    run = launch(W.errors_program, 2, str(out), timeout=120, pg_timeout=20)
    assert run.ok, f"rank processes failed or hung: {run}"
    return [json.loads((out / f"errors.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    "case",
    [
        "known_length",
        "unknown_length",
        "unknown_length_short",
        "unknown_length_drop",
        "unknown_length_carry",
        "config_mismatch",
    ],
)
def test_disagreement_raises_distributed_error_on_every_rank(
    errors: list[dict[str, Any]], case: str
) -> None:
    """ACC-D5: ranks out of step (passes of different lengths, known or not, under every
    partial-window policy; different configs) raise DistributedError on every rank, from the
    comparison, not from a timeout."""
    for rank in range(2):
        outcome = errors[rank][case]
        assert outcome["type"] == "DistributedError", f"rank {rank}: {outcome}"
        assert outcome["seconds"] < 15, "the error must come from the check, not a timeout"


def test_uneven_known_lengths_name_both_counts_and_the_fix(errors: list[dict[str, Any]]) -> None:
    """ACC-D5, ACC-E3: the error names each rank's pass length and the fix."""
    message = errors[0]["known_length"]["message"]
    assert "rank 0: 5" in message and "rank 1: 7" in message
    assert "DistributedSampler" in message and "drop_last=True" in message
    assert "nothing ran" in message


def test_unknown_lengths_say_where_each_rank_is(errors: list[dict[str, Any]]) -> None:
    """ACC-D5: without known pass lengths, the error says where each rank was."""
    message = errors[1]["unknown_length"]["message"]
    assert "rank 0 is" in message and "rank 1 is" in message
    assert "DistributedSampler" in message


def test_process_group_survives_a_detected_disagreement(errors: list[dict[str, Any]]) -> None:
    for rank in range(2):
        assert errors[rank]["equal_after_errors"]["type"] is None


@pytest.mark.parametrize(
    ("case", "needle"), [("drop_microbatch", "drop_microbatch"), ("accumulate", "no_sync")]
)
def test_unsupported_under_ddp(errors: list[dict[str, Any]], case: str, needle: str) -> None:
    for rank in range(2):
        outcome = errors[rank][case]
        assert outcome["type"] in ("ConfigError", "UsageError"), outcome
        assert needle in outcome["message"] or "microbatch()" in outcome["message"]


def _checkpoint_left_behind(listing: list[str]) -> list[str]:
    return [name for name in listing if "ckpt" in name]


def test_dead_rank_makes_the_other_raise_quickly_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    run = launch(W.failure_program, 2, str(tmp_path), "die", timeout=90, pg_timeout=30)
    assert not run.timed_out, "rank 0 hung after its peer died"
    assert run.exitcodes == [0, 3]
    result = json.loads((tmp_path / "failure.rank0.json").read_text())
    assert result["save"]["type"] == "DistributedError", result["save"]
    assert result["save"]["seconds"] < 60
    assert "rank 0" in result["save"]["message"] and "restart" in result["save"]["message"]
    assert _checkpoint_left_behind(result["leftovers"]) == []
    assert _checkpoint_left_behind(sorted(p.name for p in tmp_path.iterdir())) == []
    assert result["train"]["type"] == "DistributedError", result["train"]


def test_hung_rank_makes_the_other_raise_at_the_process_group_timeout(tmp_path: Path) -> None:
    run = launch(W.failure_program, 2, str(tmp_path), "hang", timeout=90, pg_timeout=5)
    assert run.exitcodes[0] == 0, run
    result = json.loads((tmp_path / "failure.rank0.json").read_text())
    assert result["save"]["type"] == "DistributedError", result["save"]
    assert 4 < result["save"]["seconds"] < 30
    assert _checkpoint_left_behind(result["leftovers"]) == []
