"""Meta-tests: the suite accepts a correct loop and rejects each known bug.

Each run executes the whole suite in-process with ``pytester`` against a
harness from ``manual_harness`` and reads the JSON compliance report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import PLUGIN_ARGS

import gradaccum
from gradaccum_conformance import PROMISES

HERE = Path(__file__).parent


@pytest.fixture(scope="module", autouse=True)
def _import_lazy_torch_modules() -> None:
    # In-process pytester runs drop the modules first imported during a run;
    # torch imports some lazily (torch._dynamo, from the optimizers) and cannot
    # import them twice. Import them here, outside any run.
    import torch._dynamo  # noqa: F401


def _subclass_module(harness_class: str, extra: str = "") -> str:
    return f"""
import pytest
from gradaccum_conformance import ConformanceSuite
import manual_harness

{extra}

class TestUnderTest(ConformanceSuite):
    @pytest.fixture
    def harness(self):
        return {harness_class}()
"""


def _run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    pytester.syspathinsert(HERE)
    report = pytester.path / "report.json"
    result = pytester.runpytest_inprocess(
        *PLUGIN_ARGS,
        "-p",
        "no:cacheprovider",
        f"--gradaccum-report={report}",
        *args,
    )
    return result, json.loads(report.read_text(encoding="utf-8"))


def _failed(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        t["test"]: t
        for t in report["tests"]
        if t["outcome"] in ("failed", "error", "xpassed-strict")
    }


def test_manual_harness_passes_whole_suite_via_pyargs(pytester: pytest.Pytester) -> None:
    """The second way in: ``--pyargs gradaccum_conformance --gradaccum-harness``;
    float64 and float32; header and JSON report name adapter, spec, device, dtype."""
    result, report = _run(
        pytester,
        "--pyargs",
        "gradaccum_conformance",
        "--gradaccum-harness=manual_harness:ManualHarness",
        "--gradaccum-dtype=float64,float32",
    )
    result.assert_outcomes(passed=len(report["tests"]))
    assert len(report["tests"]) >= 50
    result.stdout.fnmatch_lines(
        [
            f"gradaccum conformance *: adapter manual-reference (manual_harness:ManualHarness), "
            f"spec {gradaccum.SPEC_VERSION}, device cpu, dtype float64,float32",
            "*promises kept: *; broken: none",
        ]
    )
    assert report["adapter"] == "manual-reference"
    assert report["spec_version"] == gradaccum.SPEC_VERSION
    assert report["device"] == "cpu"
    assert report["dtype"] == ["float64", "float32"]
    assert all(t["promises"] and t["outcome"] == "passed" for t in report["tests"])
    assert {pid for pid, s in report["promises"].items() if s["verdict"] == "kept"} == set(PROMISES)


def test_every_promise_is_checked_by_a_test() -> None:
    from gradaccum_conformance.suite import suite_tests

    cited = {pid for ids in suite_tests().values() for pid in ids}
    assert cited == set(PROMISES)


def test_undeclared_capabilities_skip_with_reason(pytester: pytest.Pytester) -> None:
    extra = """
class Minimal(manual_harness.ManualHarness):
    name = "minimal"
    capabilities = frozenset({"weights"})
"""
    pytester.makepyfile(test_minimal=_subclass_module("Minimal", extra))
    result, report = _run(pytester)
    skipped = [t for t in report["tests"] if t["outcome"] == "skipped"]
    assert skipped and not _failed(report)
    reasons = {t["reason"] for t in skipped}
    assert "harness minimal does not declare capability partial_carry" in reasons
    assert "harness minimal does not declare capability checkpoint_mid_window" in reasons
    result.stdout.fnmatch_lines(
        [
            "harness minimal: skipped for undeclared capabilities:",
            "  partial_carry: 1 test(s): test_partial_window_carry*",
        ]
    )


def test_expected_failures_are_strict_xfails(pytester: pytest.Pytester) -> None:
    extra = """
class Listed(manual_harness.ShortWindowFullK):
    expected_failures = {
        "test_short_last_window_last_only": "divides a short window by k",
        "test_short_last_window_known_length": "divides a short window by k",
        "test_sum_normalization": "listed although it passes",
    }
"""
    pytester.makepyfile(test_listed=_subclass_module("Listed", extra))
    _, report = _run(pytester)
    outcomes = {t["test"].split("[")[0]: t["outcome"] for t in report["tests"]}
    assert outcomes["test_short_last_window_last_only"] == "xfailed"
    assert outcomes["test_short_last_window_known_length"] == "xfailed"
    # A listed test that passes fails the run: the list cannot go stale.
    assert outcomes["test_sum_normalization"] == "xpassed-strict"


BROKEN = [
    # (harness, test that must fail, promise it must blame)
    ("ShortWindowFullK", "test_short_last_window_last_only", "ACC-W3"),
    ("ItemsMeanOfMeans", "test_items_normalization_unequal_microbatches", "ACC-N2"),
    ("SchedulerPerMicrobatch", "test_scheduler_steps_once_per_window", "ACC-S3"),
    ("ClipPerMicrobatch", "test_clip_norm_once_at_boundary", "ACC-L1"),
    ("SchedulerOnSkip", "test_fp16_overflow_skips_window", "ACC-S3"),
    ("LoseInflightOnResume", "test_resume_mid_window", "ACC-R2"),
    ("ReduceEveryMicrobatch", "test_distributed_items", "ACC-D1"),
]


@pytest.mark.parametrize(("harness", "test", "promise"), BROKEN, ids=[b[0] for b in BROKEN])
def test_suite_rejects_planted_bug(
    pytester: pytest.Pytester, harness: str, test: str, promise: str
) -> None:
    pytester.makepyfile(test_broken=_subclass_module(f"manual_harness.{harness}"))
    result, report = _run(pytester)
    failed = _failed(report)
    names = {name.split("[")[0] for name in failed}
    assert test in names, f"{harness}: {test} did not fail; failures: {sorted(names)}"
    assert promise in failed[next(n for n in failed if n.startswith(test))]["reason"]
    assert report["promises"][promise]["verdict"] == "broken"
    result.stdout.fnmatch_lines([f"*promise broken (*{promise}*"])
