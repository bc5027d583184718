"""The demo (`python -m gradaccum_torch.demo`, `nox -s demo`), run short."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradaccum.checkpoint import validate_checkpoint
from gradaccum_torch.demo import load_corpus, main, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_corpus_ships_with_the_package() -> None:
    text = load_corpus()
    assert len(text) > 2000
    assert "Shall I compare thee to a summer's day?" in text


def test_items_matches_the_large_batch_and_mean_of_means_does_not(tmp_path: Path) -> None:
    result = run_demo(tmp_path, steps=4, progress=False, plot=False)

    assert result.deviations["a"] == 0.0
    assert result.deviations["b"] <= 1e-10
    assert result.deviations["c"] >= 1e-4  # really different, not rounding
    assert abs(result.runs["b"].final_loss - result.runs["a"].final_loss) <= 1e-10
    assert len(result.runs["b"].losses) == 4
    # the mid-window checkpoint resumes into a fresh model exactly
    assert result.resume_deviation <= 1e-12

    manifest = validate_checkpoint(result.checkpoint)
    assert manifest.state["position"] > 0  # taken mid-window
    assert manifest.state["optimizer_steps"] == 3
    assert manifest.config["normalization"] == "items"
    assert "gradients" in manifest.files  # the in-flight gradient is in it


def test_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run_demo(tmp_path, steps=2, progress=False)
    assert result.plot == tmp_path / "loss.png"
    assert result.plot.read_bytes().startswith(PNG_MAGIC)


def test_main_prints_the_table_and_inspects_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["--out", str(tmp_path), "--steps", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| (b) gradaccum, items |" in out
    assert "exact" in out
    assert f"checkpoint       {tmp_path / 'checkpoint'}" in out
    assert "microbatch 2 of 4 in the open window" in out
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_main_fails_when_the_deviation_exceeds_the_tolerance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["--out", str(tmp_path), "--steps", "1", "--no-progress", "--tolerance", "-1"]) == 1
    assert "NOT EXACT" in capsys.readouterr().out
