"""Checkpoints on 2 real gloo ranks (issue 8): a load is all or nothing across
ranks — every rank checks, the ranks agree, only then does any rank apply
(ACC-E, CKPT-17) — and the per-rank (shared directory) and through-rank-0
ways of writing produce the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ckpt_shard_workers as W
import pytest

from gradaccum.checkpoint import read_checkpoint
from gradaccum_ddp.checkpoint import assign_replicated
from gradaccum_ddp.testing import launch


def _results(out: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", ["checksum", "apply"])
def test_one_rank_refusing_changes_no_rank(tmp_path: Path, case: str) -> None:
    """ACC-E, CKPT-24 on 2 ranks: only rank 1's file is bad ("checksum": a flipped byte in
    gradients.rank1) or only rank 1 fails while applying ("apply": its optimizer's
    load_state_dict post-hook raises once). Every rank raises a GradAccumError —
    rank 1 its own, rank 0 a DistributedError naming rank 1 — and on both ranks
    the model, optimizer, scheduler and accumulator (state, stats, in-flight
    gradients, item count) are bitwise unchanged; the good checkpoint then loads."""
    result = launch(W.refuse_program, 2, str(tmp_path), case, timeout=180)
    assert result.ok, f"the ranks failed: {result}"
    rank0, rank1 = _results(tmp_path, case)
    expected = "CheckpointChecksumError" if case == "checksum" else "CheckpointError"
    assert rank1["raised"]["type"] == expected, rank1["raised"]
    assert rank0["raised"]["type"] == "DistributedError", rank0["raised"]
    assert "rank(s) [1]" in rank0["raised"]["message"]
    for r in (rank0, rank1):
        assert r["gradaccum"] is True
        assert r["unchanged"] is True
        assert r["resumed_position"] == 1  # 7 microbatches, steps=3
        assert r["steps_after"] == 3


def test_per_rank_and_through_rank_zero_writes_agree(tmp_path: Path) -> None:
    """CKPT-12 at scale: shared=True (each rank writes its own gradients.rank<r>),
    auto-detection, and shared=False (rank 0 receives rank 1's files, one rank at
    a time) write the same tensor files, byte for byte, and resume to the same
    parameters."""
    result = launch(W.modes_program, 2, str(tmp_path), timeout=180)
    assert result.ok, f"the ranks failed: {result}"
    ckpts = {mode: read_checkpoint(tmp_path / mode) for mode in ("shared", "auto", "gather")}
    roles = ckpts["shared"].roles
    assert {"gradients.rank0", "gradients.rank1", "items.rank0", "items.rank1"} <= set(roles)
    for mode in ("auto", "gather"):
        assert ckpts[mode].roles == roles
        for role in roles:
            assert ckpts[mode].file_bytes(role) == ckpts["shared"].file_bytes(role), (mode, role)
        assert ckpts[mode].manifest.files == ckpts["shared"].manifest.files
    rank0, rank1 = _results(tmp_path, "modes")
    for rank_result in (rank0, rank1):
        assert rank_result["shared"]["position"] == 0  # 7 + 2 microbatches: a boundary
        assert rank_result["auto"] == rank_result["shared"]
        assert rank_result["gather"] == rank_result["shared"]
    # CKPT-22: where every rank sees the directory, the optimizer file goes to the rank with
    # the fewest bytes to write — rank 1, since rank 0 always writes the model; through
    # rank 0, rank 0 writes every file.
    for mode in ("shared", "auto"):
        assert rank0[f"{mode}_wrote"] == ["gradients.rank0", "items.rank0", "model"], mode
        assert rank1[f"{mode}_wrote"] == ["gradients.rank1", "items.rank1", "optimizer"], mode
    assert rank0["gather_wrote"] == sorted(roles)
    assert rank1["gather_wrote"] == []


@pytest.mark.parametrize(
    ("sizes", "rows", "expected"),
    [
        # equal own bytes: the larger file to rank 0 (tie), the other to rank 1
        ({"model": 10, "optimizer": 20}, [[0, 1, 5, 7], [0, 1, 5, 7]],
         {"optimizer": 0, "model": 1}),
        # rank 0 already writes more: both replicated files go elsewhere first
        ({"model": 10, "optimizer": 20}, [[0, 1, 50, 7], [0, 1, 5, 7], [0, 1, 5, 7]],
         {"optimizer": 1, "model": 2}),
        # a rank that does not see the directory (row[1] == 0) is never given one
        ({"model": 10, "optimizer": 20}, [[0, 1, 5, 7], [0, 0, 0, 7]],
         {"optimizer": 0, "model": 0}),
        # the ranks' replicated files differ (digests): rank 0 writes them all
        ({"model": 10, "optimizer": 20}, [[0, 1, 5, 7], [0, 1, 5, 8]],
         {"optimizer": 0, "model": 0}),
        # one rank: everything on rank 0; nothing replicated: nothing assigned
        ({"model": 10}, [[0, 1, 0, 7]], {"model": 0}),
        ({}, [[0, 1, 3, 7], [0, 1, 3, 7]], {}),
    ],
    ids=["tie", "rank0-loaded", "unseen-rank", "digests-differ", "one-rank", "none"],
)  # fmt: skip
def test_replicated_files_are_spread_by_size(
    sizes: dict[str, int], rows: list[list[int]], expected: dict[str, int]
) -> None:
    """CKPT-22: assign_replicated gives each replicated file, largest first, to
    the writing rank with the fewest bytes so far (ties: the lowest rank), and
    falls back to rank 0 when the ranks' files differ."""
    assert assign_replicated(sizes, rows) == expected


def test_ranks_reading_the_same_files_split_their_verification(tmp_path: Path) -> None:
    """CKPT-7, CKPT-24, CKPT-25, CKPT-26 on 2 ranks (format 3, the default): ranks that open
    the very same replicated files (one machine, same inodes) each hash a disjoint part of
    the model and optimizer files — together every tensor, each once — and their own
    gradient and item files whole; ranks reading different copies hash everything. A byte
    flipped in a tensor only rank 1 hashes is still refused on both ranks (rank 1 finds it,
    rank 0 hears it) with nothing changed on either."""
    result = launch(W.shared_verify_program, 2, str(tmp_path), timeout=240)
    assert result.ok, f"the ranks failed: {result}"
    rank0, rank1 = _results(tmp_path, "shared")
    tensors = rank0["tensors"]
    for r, res in enumerate((rank0, rank1)):
        same = res["same"]["verified"]
        for own in (f"gradients.rank{r}", f"items.rank{r}"):
            assert same[own] == tensors[own], own
        assert res["same"]["raised"] is None and res["same"]["position"] == 1
        copies = res["copies"]["verified"]
        assert set(copies) == {"model", "optimizer", f"gradients.rank{r}", f"items.rank{r}"}
        assert all(names == tensors[role] for role, names in copies.items())
        assert res["copies"]["raised"] is None
    for role in ("model", "optimizer"):
        part0 = rank0["same"]["verified"][role]
        part1 = rank1["same"]["verified"][role]
        assert part0 and part1, role
        assert not set(part0) & set(part1), role
        assert sorted(set(part0) | set(part1)) == tensors[role], role
    assert rank1["spoilt"]["raised"]["type"] == "CheckpointChecksumError"
    assert "model.safetensors" in rank1["spoilt"]["raised"]["message"]
    assert rank0["spoilt"]["raised"]["type"] == "DistributedError"
    assert "rank(s) [1]" in rank0["spoilt"]["raised"]["message"]
    assert rank0["spoilt"]["unchanged"] is True and rank1["spoilt"]["unchanged"] is True


def test_model_file_holds_rank_zeros_buffers(tmp_path: Path) -> None:
    """CKPT-22, ACC-R3: with BatchNorm under DDP the running statistics differ
    between the ranks at a save (each forward updates them from the rank's own
    batch); the checkpoint's model file holds rank 0's, as it always has,
    whichever rank writes the optimizer file."""
    result = launch(W.buffers_program, 2, str(tmp_path), timeout=180)
    assert result.ok, f"the ranks failed: {result}"
    rank0, rank1 = _results(tmp_path, "buffers")
    assert rank0["running_mean"] != rank1["running_mean"]
    assert rank0["saved_running_mean"] == rank0["running_mean"]


def test_ranks_that_opened_different_checkpoints_apply_nothing(tmp_path: Path) -> None:
    """CKPT-24, ACC-E: when the ranks agree on the manifest read by path but
    then open different checkpoints (the directory replaced in between; here
    rank 1's open is redirected), every rank raises DistributedError naming
    the cause and none changed anything."""
    result = launch(W.race_program, 2, str(tmp_path), timeout=180)
    assert result.ok, f"the ranks failed: {result}"
    for r in _results(tmp_path, "race"):
        assert r["raised"]["type"] == "DistributedError", r["raised"]
        assert "opened different checkpoints" in r["raised"]["message"]
        assert r["unchanged"] is True


def test_ranks_save_in_the_format_version_asked_and_agree_on_it(tmp_path: Path) -> None:
    """CKPT-25, CKPT-26: on 2 ranks ``save(format_version=2)`` writes format 2
    (each rank its own files, or every file through rank 0), ``format_version=1``
    format 1, and the default format 3; all four hold the same tensors and resume to the same
    parameters. Ranks passing different format versions, or one passing a
    version this release does not write, raise on every rank (a
    GradAccumError) and write nothing; the open window is untouched. A
    checkpoint without tensor files (at a boundary, without model and
    optimizer) is still written in the format version asked."""
    result = launch(W.formats_program, 2, str(tmp_path), timeout=240)
    assert result.ok, f"the ranks failed: {result}"
    names = ("v3", "v2", "v2-gather", "v1")
    ckpts = {name: read_checkpoint(tmp_path / name) for name in names}
    assert {n: c.manifest.format_version for n, c in ckpts.items()} == {
        "v3": 3,
        "v2": 2,
        "v2-gather": 2,
        "v1": 1,
    }
    for name, ckpt in ckpts.items():
        algorithm = "crc32" if name == "v3" else "sha256"
        assert {e.tensor_digest for e in ckpt.manifest.files.values()} == {algorithm}
        assert ckpt.roles == ckpts["v3"].roles
        for role in ckpt.roles:
            assert ckpt.tensors(role) == ckpts["v3"].tensors(role), (name, role)
    assert ckpts["v2"].manifest.files == ckpts["v2-gather"].manifest.files
    for version in (1, 2):  # no tensor file to tell the version: the manifest still does
        empty = read_checkpoint(tmp_path / f"empty-v{version}")
        assert empty.roles == ()
        assert empty.state["position"] == 0
        assert (empty.manifest.format_version, empty.manifest.spec_version) == (
            version,
            {1: "1.2.0", 2: "2.0.0"}[version],
        )
    assert not (tmp_path / "mixed").exists()
    assert not (tmp_path / "invalid").exists()
    rank0, rank1 = _results(tmp_path, "formats")
    for r in (rank0, rank1):
        assert r["mixed"] is not None and r["mixed_gradaccum"] is True
        assert r["invalid"] is not None and r["invalid_gradaccum"] is True
        assert r["mixed_position"] == r["invalid_position"] == 1
        assert r["v2"] == r["v3"] == r["v2-gather"] == r["v1"]
    assert rank0["v3"] == rank1["v3"]
    assert rank1["invalid"]["type"] == "UsageError"
    assert "format_version=7" in rank1["invalid"]["message"]
