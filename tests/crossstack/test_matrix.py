"""The cross-stack checkpoint matrix (ACC-R5): a run moves between every pair of stacks.

Needs every adapter installed (gradaccum-torch, -ddp, -lightning, -accelerate) and
gradaccum-conformance. The whole matrix runs once per session (module fixture);
with ``GRADACCUM_MATRIX_REPORT=path`` set it writes its JSON report there, from
which ``python -m gradaccum_conformance.crossstack path docs/checkpoints.md``
regenerates the table in the docs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from gradaccum.errors import CheckpointMismatchError, GradAccumError
from gradaccum_accelerate.harness import AccelerateHarness
from gradaccum_conformance import CheckpointPlan, Scenario, Trajectory
from gradaccum_conformance.crossstack import (
    BEGIN_MARKER,
    CROSS_WORLD_BOUNDS,
    END_MARKER,
    PairResult,
    Stack,
    crossstack_scenarios,
    describe_failures,
    main,
    matrix_markdown,
    run_matrix,
    scenario_at_world,
    write_report,
)
from gradaccum_ddp.harness import DDPHarness
from gradaccum_lightning.fabric_harness import FabricHarness
from gradaccum_lightning.harness import LightningHarness
from gradaccum_torch import Accumulator
from gradaccum_torch.testing import TorchHarness

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "checkpoints.md"

STACKS = [
    Stack("torch", TorchHarness()),
    Stack("ddp-2", DDPHarness(), 2),
    Stack("lightning-1", LightningHarness()),
    Stack("lightning-2", LightningHarness(), 2),
    Stack("fabric-1", FabricHarness()),
    Stack("fabric-2", FabricHarness(), 2),
    Stack("accelerate-1", AccelerateHarness()),
    Stack("accelerate-2", AccelerateHarness(), 2),
]
NAMES = [s.name for s in STACKS]
SCENARIOS = ("sgd_momentum", "adamw", "fp16_scaler", "bf16_adamw")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> list[PairResult]:
    start = time.monotonic()
    results = run_matrix(STACKS, tmp_path_factory.mktemp("matrix"))
    seconds = time.monotonic() - start
    report = os.environ.get("GRADACCUM_MATRIX_REPORT")
    if report:
        write_report(results, Path(report), seconds=seconds, stacks=STACKS)
    return results


def _rows(results: list[PairResult], source: str, target: str) -> list[PairResult]:
    return [r for r in results if r.source == source and r.target == target and r.kind != "save"]


def test_every_source_saves_without_changing_its_run(matrix: list[PairResult]) -> None:
    """Each stack's run that writes two shared-format checkpoints (mid-window and at a
    boundary) equals its run without them bitwise, in every scenario (ACC-R1)."""
    saves = [r for r in matrix if r.kind == "save"]
    assert sorted((r.source, r.scenario) for r in saves) == sorted(
        (n, s) for n in NAMES for s in SCENARIOS
    )
    assert all(r.passed and r.max_rel == 0.0 for r in saves), describe_failures(saves)


@pytest.mark.parametrize("target", NAMES)
@pytest.mark.parametrize("source", NAMES)
def test_pair(matrix: list[PairResult], source: str, target: str) -> None:
    """A checkpoint written by ``source`` resumes in ``target`` (ACC-R5, ACC-R3): at the
    same world size a mid-window and a boundary checkpoint give the uninterrupted
    run bitwise (max|a-b|/max|b| = 0 after every window, same outcomes, learning
    rates, counters and stats) for SGD with momentum, AdamW, fp16 with a GradScaler and
    AdamW under bf16 autocast; at another world size the boundary checkpoint matches
    within `CROSS_WORLD_BOUNDS` (1e-12 in float64, 1e-2 in fp16 and bf16) and the
    mid-window one is refused with a CheckpointMismatchError naming both world sizes."""
    rows = _rows(matrix, source, target)
    assert sorted((r.scenario, r.kind) for r in rows) == sorted(
        (s, k) for s in SCENARIOS for k in ("mid_window", "boundary")
    )
    assert all(r.passed for r in rows), describe_failures(rows)
    same_world = rows[0].source_world == rows[0].target_world
    for r in rows:
        if same_world:
            assert r.expected == "bitwise"
            assert r.max_rel == 0.0
        elif r.kind == "mid_window":
            assert r.expected == "refused"
            assert "CheckpointMismatchError" in r.detail
        else:
            assert r.expected == "tolerance"
            assert r.max_rel is not None
            assert r.max_rel <= CROSS_WORLD_BOUNDS[r.precision], r  # type: ignore[index]
            assert r.max_rel <= (1e-12 if r.precision == "float64" else 1e-2), r


def test_world_size_changes_only_at_a_boundary(matrix: list[PairResult]) -> None:
    """ACC-R5 both ways: a boundary checkpoint from 1 rank resumes on 2 and one from
    2 ranks resumes on 1, within 1e-12 of the uninterrupted run in float64 (the
    ranks' partial sums round differently, so not bitwise); a mid-window one is
    refused before anything is loaded, naming the world sizes."""
    for source, target, saved_on, resumed_on in (
        ("torch", "ddp-2", 1, 2),
        ("ddp-2", "torch", 2, 1),
        ("lightning-1", "accelerate-2", 1, 2),
        ("fabric-2", "lightning-1", 2, 1),
    ):
        rows = {(r.scenario, r.kind): r for r in _rows(matrix, source, target)}
        boundary = rows[("adamw", "boundary")]
        assert boundary.passed, boundary.detail
        assert boundary.max_rel is not None
        assert 0.0 <= boundary.max_rel <= 1e-12
        mid = rows[("adamw", "mid_window")]
        assert mid.passed, mid.detail
        assert f"mid-window on {saved_on} rank(s)" in mid.detail
        assert f"not {resumed_on}" in mid.detail


class _DropsScaler(TorchHarness):
    """gradaccum-torch, but a resume forgets the GradScaler's state."""

    name = "drops-scaler"

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        if plan.resume_from is None:
            return super().run_plan(scenario, workdir, plan)
        original = TorchHarness._build

        def build(s: Scenario):  # type: ignore[no-untyped-def]
            model, optimizer, acc = original(s)
            load = acc.load

            def forgetful(path: object) -> None:
                state = None if acc.scaler is None else acc.scaler.state_dict()
                load(path)  # type: ignore[arg-type]
                if state is not None:
                    acc.scaler.load_state_dict(state)  # type: ignore[union-attr]

            acc.load = forgetful  # type: ignore[method-assign]
            return model, optimizer, acc

        self._build = staticmethod(build)  # type: ignore[method-assign]
        return super().run_plan(scenario, workdir, plan)


class _DropsGradients(TorchHarness):
    """gradaccum-torch, but a resume zeroes the in-flight gradients it loaded."""

    name = "drops-gradients"

    def run_plan(self, scenario: Scenario, workdir: Path, plan: CheckpointPlan) -> Trajectory:
        if plan.resume_from is None:
            return super().run_plan(scenario, workdir, plan)
        original = TorchHarness._build

        def build(s: Scenario):  # type: ignore[no-untyped-def]
            model, optimizer, acc = original(s)
            load = acc.load

            def forgetful(path: object) -> None:
                load(path)  # type: ignore[arg-type]
                for param in model.parameters():
                    if param.grad is not None:
                        param.grad.zero_()
                for buffer in acc.gradients.export().values():
                    buffer.zero_()

            acc.load = forgetful  # type: ignore[method-assign]
            return model, optimizer, acc

        self._build = staticmethod(build)  # type: ignore[method-assign]
        return super().run_plan(scenario, workdir, plan)


@pytest.mark.parametrize(
    ("broken", "scenario", "kind"),
    [
        (_DropsScaler(), "fp16_scaler", "mid_window"),
        (_DropsScaler(), "fp16_scaler", "boundary"),
        (_DropsGradients(), "sgd_momentum", "mid_window"),
        (_DropsGradients(), "adamw", "mid_window"),
        (_DropsGradients(), "bf16_adamw", "mid_window"),
    ],
    ids=["scaler-mid", "scaler-boundary", "gradients-sgd", "gradients-adamw", "gradients-bf16"],
)
def test_the_matrix_catches_a_stack_that_loses_state(
    tmp_path: Path, broken: TorchHarness, scenario: str, kind: str
) -> None:
    """A target that forgets the GradScaler's backed-off scale (it overflows again: a
    skipped window the uninterrupted run stepped) or the in-flight gradients of a
    mid-window checkpoint fails its pair: the matrix can fail (ACC-R2, ACC-R5)."""
    chosen = [c for c in crossstack_scenarios() if c.name == scenario]
    results = run_matrix(
        [Stack("torch", TorchHarness()), Stack("broken", broken)],
        tmp_path,
        scenarios=chosen,
        pairs=lambda s, t: s.name == "torch" and t.name == "broken",
    )
    row = next(r for r in results if r.target == "broken" and r.kind == kind)
    assert not row.passed
    assert "ACC-R" in row.detail or "ACC-S1" in row.detail
    healthy = next(r for r in results if r.kind == "save")
    assert healthy.passed


def test_scenarios_merge_ranks_only_under_items(tmp_path: Path) -> None:
    """One rank holding both shards of each microbatch sees the same items (ACC-N2);
    other world sizes and other normalizations are refused by name."""
    cross = crossstack_scenarios(fp16=False)[0]
    one = scenario_at_world(cross.scenario, 1)
    assert one.world_size == 1
    assert [mb.items for p in one.passes for mb in p] == [
        mb.items for p in cross.scenario.passes for mb in p
    ]
    with pytest.raises(ValueError, match="not 3"):
        scenario_at_world(cross.scenario, 3)
    mean = cross.scenario.replace(
        config=cross.scenario.config.replace(normalization="mean"), loss_reduction="mean"
    )
    with pytest.raises(ValueError, match="'mean'"):
        scenario_at_world(mean, 1)


def test_a_refused_resume_raises_from_the_target_harness(tmp_path: Path) -> None:
    """``run_plan`` lets the adapter's refusal through: a mid-window checkpoint of 2
    ranks loaded by gradaccum-torch raises CheckpointMismatchError naming both world
    sizes, and changes nothing: the model, the optimizer and the accumulation state
    are as built (ACC-R5, ACC-E2)."""
    cross = crossstack_scenarios(fp16=False)[1]
    ddp = DDPHarness()
    path = tmp_path / "ckpt"
    ddp.run_plan(cross.scenario, tmp_path / "src", CheckpointPlan(save=((7, path),)))
    one = scenario_at_world(cross.scenario, 1)
    with pytest.raises(CheckpointMismatchError, match=r"mid-window on 2 rank\(s\).*not 1"):
        TorchHarness().run_plan(
            one, tmp_path / "dst", CheckpointPlan(resume_from=path, resume_after=7)
        )
    assert issubclass(CheckpointMismatchError, GradAccumError)
    model = one.make_model()
    optimizer = one.make_optimizer(model)
    acc = Accumulator(model, optimizer, config=one.config, scheduler=one.make_scheduler(optimizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = acc.machine.state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"on 2 rank\(s\).*not 1"):
        acc.load(path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {}
    assert acc.machine.state_dict() == state
    assert all(p.grad is None for p in model.parameters())


def test_report_regenerates_the_docs_table(matrix: list[PairResult], tmp_path: Path) -> None:
    """The JSON report puts the table between the markers of a page (and nothing
    else changes), and the table in docs/checkpoints.md is this run's: same rows."""
    report = tmp_path / "report.json"
    write_report(matrix, report, seconds=12.0, stacks=STACKS)
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n{BEGIN_MARKER}\nold\n{END_MARKER}\nafter\n")
    assert main([str(report), str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{END_MARKER}\nafter\n")
    assert "old" not in text
    stacks = [{"name": s.name} for s in STACKS]
    table = matrix_markdown(stacks, matrix, 12.0)
    assert table in text
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(STACKS)
    assert all("❌" not in line for line in rows)
    documented = DOC.read_text()
    begin = documented.index(BEGIN_MARKER)
    end = documented.index(END_MARKER)
    doc_rows = [line for line in documented[begin:end].splitlines() if line.startswith("|")]
    assert doc_rows == rows, (
        "docs/checkpoints.md's matrix is stale: run the tests with "
        "GRADACCUM_MATRIX_REPORT=report.json, then python -m gradaccum_conformance.crossstack "
        "report.json docs/checkpoints.md"
    )
