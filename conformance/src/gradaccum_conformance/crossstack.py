"""The cross-stack checkpoint matrix: a run moves between every pair of stacks (ACC-R5).

For an ordered pair of harnesses (X, Y) that declare the ``checkpoint_io``
capability (`Harness.run_plan`), a scenario runs in X, which writes a
shared-format checkpoint (``spec/checkpoint-v1.md``) in the middle of a window
and another at a window boundary; Y resumes each in fresh objects, and the
whole trajectory — X's windows before the checkpoint, Y's after it — is
compared with X's uninterrupted run:

* same world size (and dtype): **bitwise** (a mid-window and a boundary
  checkpoint);
* another world size: a **boundary** checkpoint resumes and matches within the
  precision's bound (`CROSS_WORLD_BOUNDS`: the ranks split each microbatch, so the
  sums round differently); a **mid-window** checkpoint is refused with
  `gradaccum.errors.CheckpointMismatchError` naming both world sizes (in-flight
  gradients are per rank).

Model, optimizer (SGD with momentum over two parameter groups, AdamW), LR
scheduler, GradScaler (fp16, a scale that backed off after an overflow),
accumulation state and in-flight gradients all carry over: a stack that lost
any of them breaks the comparison.

The scenarios are defined on two ranks (`scenario_at_world` merges each
microbatch's shards for one rank) under ``items`` normalization, where one rank
holding both shards computes the same window gradient as two ranks holding one
each. Each source stack runs once (`PlannedRun` batches: one launch of its
ranks for all scenarios), each target stack once for every checkpoint aimed at
it, so the matrix costs two launches per multi-rank stack.

Third-party adapters join by implementing `Harness.run_plan`, declaring
``checkpoint_io`` and passing their harness as a `Stack` to `run_matrix`::

    results = run_matrix([Stack("torch", TorchHarness()), Stack("mine", MyHarness())], tmp)
    assert all(r.passed for r in results), describe_failures(results)

`write_report` writes the results as JSON; ``python -m
gradaccum_conformance.crossstack REPORT.json DOC.md`` puts the matrix table
(`matrix_markdown`) between the markers ``<!-- crossstack-matrix:begin -->`` and
``<!-- crossstack-matrix:end -->`` of ``DOC.md``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import torch

from gradaccum import AccumulationConfig
from gradaccum.checkpoint import read_checkpoint
from gradaccum.errors import CheckpointMismatchError, GradAccumError
from gradaccum_conformance.compare import (
    BrokenPromiseError,
    assert_trajectory,
    deviation,
)
from gradaccum_conformance.harness import (
    CHECKPOINT_IO,
    CheckpointPlan,
    Harness,
    PlannedRun,
    Trajectory,
)
from gradaccum_conformance.scenario import (
    Microbatch,
    ModelSpec,
    OptimizerSpec,
    Precision,
    ScalerSpec,
    Scenario,
    SchedulerSpec,
    Shard,
    make_passes,
)

__all__ = [
    "BEGIN_MARKER",
    "CROSS_WORLD_BOUNDS",
    "END_MARKER",
    "KINDS",
    "CheckpointKind",
    "CrossScenario",
    "Expectation",
    "PairResult",
    "Stack",
    "crossstack_scenarios",
    "describe_failures",
    "main",
    "matrix_markdown",
    "read_report",
    "run_matrix",
    "scenario_at_world",
    "update_document",
    "write_report",
]

CheckpointKind: TypeAlias = Literal["mid_window", "boundary"]
"""Where the source stack saved: inside a window (in-flight gradients) or at a
window boundary (none)."""

Expectation: TypeAlias = Literal["bitwise", "tolerance", "refused"]
"""What a pair must do with a checkpoint (see the module docstring)."""

KINDS: tuple[CheckpointKind, ...] = ("mid_window", "boundary")

BEGIN_MARKER = "<!-- crossstack-matrix:begin -->"
END_MARKER = "<!-- crossstack-matrix:end -->"


@dataclass(frozen=True)
class Stack:
    """One column (and row) of the matrix: a harness that declares
    ``checkpoint_io``, run at ``world_size`` ranks, shown as ``name``."""

    name: str
    harness: Harness
    world_size: int = 1

    def __post_init__(self) -> None:
        if CHECKPOINT_IO not in self.harness.capabilities:
            raise ValueError(
                f"stack {self.name!r}: harness {self.harness.name!r} does not declare "
                f"{CHECKPOINT_IO!r} (implement Harness.run_plan)"
            )


@dataclass(frozen=True)
class CrossScenario:
    """A scenario of the matrix and its two checkpoint points.

    Attributes:
        scenario: defined on two ranks (`scenario_at_world` gives it at any
            world size that divides its shards).
        mid_window: a global microbatch index after which a window is open.
        boundary: a global microbatch index that closes a window (inside a pass).
    """

    scenario: Scenario
    mid_window: int
    boundary: int

    @property
    def name(self) -> str:
        """The scenario's name."""
        return self.scenario.name

    def point(self, kind: CheckpointKind) -> int:
        """The checkpoint point of ``kind``."""
        return self.mid_window if kind == "mid_window" else self.boundary


@dataclass
class PairResult:
    """One resume of the matrix (or a source's own check, ``kind="save"``).

    Attributes:
        source / target: the stacks' names.
        scenario: the scenario's name.
        kind: the checkpoint's kind, or ``"save"`` (the source's run that saved
            equals its uninterrupted run, bitwise).
        expected: what the pair had to do.
        passed: it did.
        max_rel: the largest ``max|a-b|/max|b|`` of any parameter after any window
            against the uninterrupted run (``None`` for refusals).
        detail: why it failed, or the refusal's message.
        source_world / target_world: the stacks' world sizes.
        precision: the scenario's precision (its bound, `CROSS_WORLD_BOUNDS`).
    """

    source: str
    target: str
    scenario: str
    kind: str
    expected: Expectation
    passed: bool
    max_rel: float | None = None
    detail: str = ""
    source_world: int = 1
    target_world: int = 1
    precision: str = "float64"


CROSS_WORLD_BOUNDS: Mapping[Precision, float] = {
    "float64": 1e-12,
    "float32": 1e-5,
    "bf16": 1e-2,
    "fp16": 1e-2,
}
"""Bound on ``max|a - b| / max|b|`` per parameter tensor, after any window, for a
boundary checkpoint resumed at another world size against the uninterrupted run of
the same precision (the ranks split each microbatch, so the sums round differently).
Tighter than the suite's `TOLERANCES` for bf16, whose reference is another precision's
run; the matrix checks these, and its table prints them."""


# -- scenarios ---------------------------------------------------------------------------------

_SIZES: list[list[tuple[int, int]]] = [
    [(2, 3), (4, 1), (3, 3), (1, 5), (2, 2), (3, 1)],
    [(1, 2), (3, 3), (2, 4), (5, 1), (2, 2)],
]
"""Two passes (6 and 5 microbatches) on two ranks; windows of 4: [0-3], [4-5]
(short: the pass ends), [6-9], [10] (short)."""


def _two_rank(
    name: str,
    optimizer: OptimizerSpec,
    *,
    precision: Precision = "float64",
    scaler: ScalerSpec | None = None,
    overflow: tuple[int, ...] = (),
    seed: int = 31,
) -> Scenario:
    model = ModelSpec()
    return Scenario(
        name=name,
        config=AccumulationConfig(4, normalization="items"),
        passes=make_passes(_SIZES, model=model, seed=seed),
        model=model,
        optimizer=optimizer,
        scheduler=SchedulerSpec(gamma=0.8),
        loss_reduction="sum",
        precision=precision,
        world_size=2,
        scaler=scaler,
        amp_overflow_windows=overflow,
    )


def crossstack_scenarios(*, fp16: bool = True, bf16: bool = True) -> list[CrossScenario]:
    """The matrix's scenarios: SGD with momentum over two parameter groups, AdamW
    (both float64, an LR scheduler); with ``fp16``, fp16 autocast with a
    GradScaler whose first window overflows (the scale backs off from 2**40 to
    2**10 and must carry over: a resume that lost it overflows again); with
    ``bf16``, AdamW under bf16 autocast over float32 parameters (the in-flight
    gradients and the optimizer state are float32; each stack's own bf16 path
    must give the source's trajectory). Each saves after microbatch 7 (2 of a
    window of 4 done) and after microbatch 3 (a boundary)."""
    scenarios = [
        _two_rank(
            "sgd_momentum",
            OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=0.01, two_groups=True),
        ),
        _two_rank("adamw", OptimizerSpec("adamw", lr=0.02, weight_decay=0.1)),
    ]
    if fp16:
        scenarios.append(
            _two_rank(
                "fp16_scaler",
                OptimizerSpec("sgd", lr=0.05, momentum=0.9),
                precision="fp16",
                scaler=ScalerSpec(init_scale=2.0**40, backoff_factor=2.0**-30),
                overflow=(0,),
                seed=32,
            )
        )
    if bf16:
        scenarios.append(
            _two_rank(
                "bf16_adamw",
                OptimizerSpec("adamw", lr=0.02, weight_decay=0.1),
                precision="bf16",
                seed=33,
            )
        )
    return [CrossScenario(s, mid_window=7, boundary=3) for s in scenarios]


def scenario_at_world(scenario: Scenario, world_size: int) -> Scenario:
    """``scenario`` on ``world_size`` ranks: its own when equal; on one rank each
    microbatch's shards concatenated (rank order). Under ``items`` normalization
    the window gradient is the same sum over the same items either way (ACC-N2).

    Raises:
        ValueError: another world size than the scenario's or 1, or a normalization
            other than ``items``.
    """
    if world_size == scenario.world_size:
        return scenario
    if world_size != 1:
        raise ValueError(
            f"scenario {scenario.name!r} is defined on {scenario.world_size} ranks; it can be "
            f"run on those or on 1, not {world_size}"
        )
    if scenario.config.normalization != "items":
        raise ValueError(
            f"scenario {scenario.name!r}: merging ranks keeps the window gradient only under "
            f"normalization='items', not {scenario.config.normalization!r}"
        )
    passes = tuple(
        tuple(
            Microbatch(
                shards=(
                    Shard(
                        x=torch.cat([s.x for s in mb.shards]),
                        y=torch.cat([s.y for s in mb.shards]),
                    ),
                )
            )
            for mb in pass_
        )
        for pass_ in scenario.passes
    )
    return scenario.replace(passes=passes, world_size=1)


# -- the matrix --------------------------------------------------------------------------------


def _expectation(source: Stack, target: Stack, kind: CheckpointKind) -> Expectation:
    if source.world_size == target.world_size:
        return "bitwise"
    return "refused" if kind == "mid_window" else "tolerance"


def _max_rel(
    actual: Sequence[dict[str, torch.Tensor]], expected: Sequence[dict[str, torch.Tensor]]
) -> float:
    worst = 0.0
    for a, e in zip(actual, expected, strict=False):
        for name, value in e.items():
            if name in a:
                worst = max(worst, deviation(a[name], value)[1])
    return worst


def _composite(source: Trajectory, resumed: Trajectory, windows: int) -> Trajectory:
    """The source's first ``windows`` windows, then the resumed run's."""
    return Trajectory(
        initial_params=source.initial_params,
        params=source.params[:windows] + resumed.params,
        lrs=source.lrs[:windows] + resumed.lrs,
        outcomes=source.outcomes[:windows] + resumed.outcomes,
        micro_steps=resumed.micro_steps,
        optimizer_steps=resumed.optimizer_steps,
        skipped_steps=resumed.skipped_steps,
        stats=resumed.stats,
        scheduler_steps=resumed.scheduler_steps,
    )


def _without_reductions(trajectory: Trajectory) -> Trajectory:
    return Trajectory(
        initial_params=trajectory.initial_params,
        params=trajectory.params,
        lrs=trajectory.lrs,
        outcomes=trajectory.outcomes,
        micro_steps=trajectory.micro_steps,
        optimizer_steps=trajectory.optimizer_steps,
        skipped_steps=trajectory.skipped_steps,
        stats=trajectory.stats,
        scheduler_steps=trajectory.scheduler_steps,
    )


def _check_resume(
    result: Trajectory | GradAccumError,
    reference: Trajectory,
    *,
    source: Stack,
    target: Stack,
    scenario: Scenario,
    kind: CheckpointKind,
    windows: int,
) -> PairResult:
    expected = _expectation(source, target, kind)
    row = PairResult(
        source=source.name,
        target=target.name,
        scenario=scenario.name,
        kind=kind,
        expected=expected,
        passed=False,
        source_world=source.world_size,
        target_world=target.world_size,
        precision=scenario.precision,
    )
    if expected == "refused":
        if not isinstance(result, GradAccumError):
            row.detail = (
                f"a mid-window checkpoint of {source.world_size} rank(s) resumed on "
                f"{target.world_size}: it must be refused (ACC-R5)"
            )
            return row
        message = str(result)
        names_both = (
            f"{source.world_size} rank(s)" in message and f"not {target.world_size}" in message
        )
        row.passed = isinstance(result, CheckpointMismatchError) and names_both
        row.detail = f"{type(result).__name__}: {message}"
        if not row.passed:
            row.detail = (
                "refused, but not with a CheckpointMismatchError naming both world sizes ("
                f"'{source.world_size} rank(s)' and 'not {target.world_size}'): " + row.detail
            )
        return row
    if isinstance(result, GradAccumError):
        row.detail = f"refused: {type(result).__name__}: {result}"
        return row
    composite = _composite(reference, result, windows)
    tol = 0.0 if expected == "bitwise" else CROSS_WORLD_BOUNDS[scenario.precision]
    row.max_rel = _max_rel(composite.params, reference.params)
    try:
        assert_trajectory(
            composite,
            _without_reductions(reference),
            tol=tol,
            promises=("ACC-R2",) if kind == "mid_window" else ("ACC-R3",),
            harness=f"{source.name} -> {target.name}",
            scenario=scenario,
            against=f"the uninterrupted run in {source.name}",
            # At another world size the item counters are per rank.
            check_stats=source.world_size == target.world_size,
        )
    except BrokenPromiseError as exc:
        row.detail = str(exc)
        return row
    if source.world_size != target.world_size:
        for counter in ("micro_steps", "optimizer_steps", "skipped_steps"):
            if getattr(composite, counter) != getattr(reference, counter):
                row.detail = (
                    f"counter {counter} = {getattr(composite, counter)}, expected "
                    f"{getattr(reference, counter)} (ACC-C3)"
                )
                return row
    row.passed = True
    return row


def run_matrix(
    stacks: Sequence[Stack],
    workdir: Path,
    *,
    scenarios: Sequence[CrossScenario] | None = None,
    pairs: Callable[[Stack, Stack], bool] | None = None,
) -> list[PairResult]:
    """Run the matrix over every ordered pair of ``stacks`` (``pairs`` filters them;
    a stack resumes its own checkpoints too) and every scenario; see the module
    docstring for what each pair must do. Returns one `PairResult` per source
    check and per resume, passed or not (nothing is raised for a failed pair).

    Each source stack gets one `Harness.run_plans` call (per scenario: its
    uninterrupted run and a run that saves at both points), each target stack
    one for every checkpoint aimed at it.
    """
    chosen = list(crossstack_scenarios() if scenarios is None else scenarios)
    keep = pairs if pairs is not None else (lambda source, target: True)
    results: list[PairResult] = []
    references: dict[tuple[str, str], Trajectory] = {}
    saved: dict[tuple[str, str, str], tuple[Path, int]] = {}
    sources = [s for s in stacks if any(keep(s, t) for t in stacks)]
    for source in sources:
        runs: list[PlannedRun] = []
        for cross in chosen:
            scenario = scenario_at_world(cross.scenario, source.world_size)
            base = workdir / "source" / source.name / cross.name
            saves = tuple((cross.point(kind), base / f"checkpoint-{kind}") for kind in KINDS)
            runs.append(PlannedRun(scenario, base / "uninterrupted", CheckpointPlan()))
            runs.append(PlannedRun(scenario, base / "saving", CheckpointPlan(save=saves)))
        for run in runs:
            run.workdir.mkdir(parents=True, exist_ok=True)
        outcomes = source.harness.run_plans(runs)
        for k, cross in enumerate(chosen):
            plain, saving = outcomes[2 * k], outcomes[2 * k + 1]
            row = PairResult(
                source=source.name,
                target=source.name,
                scenario=cross.name,
                kind="save",
                expected="bitwise",
                passed=False,
                source_world=source.world_size,
                target_world=source.world_size,
                precision=cross.scenario.precision,
            )
            results.append(row)
            if isinstance(plain, GradAccumError) or isinstance(saving, GradAccumError):
                raised = plain if isinstance(plain, GradAccumError) else saving
                row.detail = f"the source run raised: {raised}"
                continue
            row.max_rel = _max_rel(saving.params, plain.params)
            try:
                assert_trajectory(
                    saving,
                    plain,
                    tol=0.0,
                    promises=("ACC-R1",),
                    harness=source.name,
                    scenario=runs[2 * k].scenario,
                    against="the same run without checkpoints (saving must not change it)",
                )
            except BrokenPromiseError as exc:
                row.detail = str(exc)
                continue
            row.passed = True
            references[(source.name, cross.name)] = plain
            for kind in KINDS:
                path = runs[2 * k + 1].plan.save_path(cross.point(kind))
                assert path is not None
                windows = int(read_checkpoint(path).state["windows"])
                saved[(source.name, cross.name, kind)] = (path, windows)
    for target in stacks:
        jobs: list[tuple[Stack, CrossScenario, CheckpointKind, int]] = []
        runs = []
        for source in sources:
            if not keep(source, target):
                continue
            for cross in chosen:
                for kind in KINDS:
                    found = saved.get((source.name, cross.name, kind))
                    if found is None:
                        continue
                    path, windows = found
                    scenario = scenario_at_world(cross.scenario, target.world_size)
                    plan = CheckpointPlan(resume_from=path, resume_after=cross.point(kind))
                    run_dir = workdir / "target" / target.name / source.name / cross.name / kind
                    run_dir.mkdir(parents=True, exist_ok=True)
                    runs.append(PlannedRun(scenario, run_dir, plan))
                    jobs.append((source, cross, kind, windows))
        outcomes = target.harness.run_plans(runs) if runs else []
        for (source, cross, kind, windows), outcome in zip(jobs, outcomes, strict=True):
            results.append(
                _check_resume(
                    outcome,
                    references[(source.name, cross.name)],
                    source=source,
                    target=target,
                    scenario=scenario_at_world(cross.scenario, source.world_size),
                    kind=kind,
                    windows=windows,
                )
            )
    return results


def describe_failures(results: Sequence[PairResult]) -> str:
    """Every failed result, one paragraph each (empty when all passed)."""
    return "\n\n".join(
        f"{r.source} -> {r.target} [{r.scenario}, {r.kind}, expected {r.expected}]:\n{r.detail}"
        for r in results
        if not r.passed
    )


# -- the report --------------------------------------------------------------------------------


def write_report(
    results: Sequence[PairResult], path: Path, *, seconds: float, stacks: Sequence[Stack]
) -> None:
    """Write the results as JSON to ``path`` (with the run's wall time and the
    stacks in order), atomically."""
    data = {
        "seconds": round(seconds, 1),
        "stacks": [
            {"name": s.name, "harness": s.harness.name, "world_size": s.world_size} for s in stacks
        ],
        "results": [asdict(r) for r in results],
        "written_unix": time.time(),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_report(path: Path) -> tuple[list[dict[str, object]], list[PairResult], float]:
    """``(stacks, results, seconds)`` of a report `write_report` wrote."""
    data = json.loads(path.read_text())
    return data["stacks"], [PairResult(**r) for r in data["results"]], float(data["seconds"])


def _cell(rows: list[PairResult]) -> str:
    if not rows:
        return "—"
    failed = [r for r in rows if not r.passed]
    if failed:
        return f"❌ {len(failed)} of {len(rows)} failed"
    kinds = {r.expected for r in rows}
    if kinds == {"bitwise"}:
        return "✅ bitwise"
    # The asserted bound, not the measured error: the measured one moves with the CPU, BLAS
    # and torch release, and the table must not (the JSON report keeps ``max_rel``).
    tolerances: dict[str, float] = {str(k): v for k, v in CROSS_WORLD_BOUNDS.items()}
    bounds = [
        f"{precision} ≤ {_decade(tolerances[precision])}"
        for precision in sorted({r.precision for r in rows if r.expected == "tolerance"})
    ]
    refused = " · mid-window refused" if "refused" in kinds else ""
    return "✅ boundary " + ", ".join(bounds) + refused


def _decade(value: float) -> str:
    """``value`` rounded up to a power of ten (``2.2e-4`` -> ``1e-3``; ``0`` -> ``0``)."""
    if value <= 0.0:
        return "0"
    return f"1e{math.ceil(math.log10(value))}"


def matrix_markdown(
    stacks: Sequence[dict[str, object]], results: Sequence[PairResult], seconds: float
) -> str:
    """The matrix as a Markdown table: a row per source stack, a column per target
    stack, each cell what every scenario's resume did; then the totals."""
    names = [str(s["name"]) for s in stacks]
    header = "| from \\ to | " + " | ".join(f"`{n}`" for n in names) + " |"
    lines = [header, "|" + " --- |" * (len(names) + 1)]
    for source in names:
        cells = [
            _cell([r for r in results if r.source == source and r.target == t and r.kind != "save"])
            for t in names
        ]
        lines.append(f"| `{source}` | " + " | ".join(cells) + " |")
    resumes = [r for r in results if r.kind != "save"]
    scenarios = sorted({r.scenario for r in results})
    passed = sum(r.passed for r in resumes)
    saves_ok = all(r.passed for r in results if r.kind == "save")
    lines.append("")
    lines.append(
        f"{passed} of {len(resumes)} resumes as specified over the scenarios "
        f"{', '.join(f'`{s}`' for s in scenarios)}; every source's saving run equals its "
        f"uninterrupted run bitwise: {'yes' if saves_ok else 'NO'}. Wall time of the whole "
        f"matrix: {seconds:.0f} s."
    )
    return "\n".join(lines)


def update_document(document: Path, table: str) -> bool:
    """Replace what lies between `BEGIN_MARKER` and `END_MARKER` in ``document``
    with ``table``; return whether the file changed.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    text = document.read_text()
    begin, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if begin < 0 or end < begin:
        raise ValueError(f"{document}: needs {BEGIN_MARKER} then {END_MARKER}")
    new = text[: begin + len(BEGIN_MARKER)] + "\n" + table + "\n" + text[end:]
    if new == text:
        return False
    document.write_text(new)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradaccum_conformance.crossstack REPORT.json DOC.md``: put the
    report's matrix table between the markers of ``DOC.md``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(
            "usage: python -m gradaccum_conformance.crossstack REPORT.json DOC.md", file=sys.stderr
        )
        return 2
    stacks, results, seconds = read_report(Path(args[0]))
    changed = update_document(Path(args[1]), matrix_markdown(stacks, results, seconds))
    print(f"{args[1]}: {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
