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


READS = "test_host_reads_only_at_the_boundary"
BUFFERS = "test_no_buffer_held_between_microbatches"
PROBE_BUGS = {
    # test class: (harness, the probe test it fails in every case, promise, shown in the message)
    "TestLogLoss": ("LogLossEveryMicrobatch", READS, "ACC-B3", "Tensor.item at manual_harness.py"),
    "TestReadPerParameter": ("ReadPerParameterAtBoundary", READS, "ACC-B4", "4 reads"),
    "TestKeepGradientCopy": ("KeepGradientCopy", BUFFERS, "ACC-P4", "float32[8, 12] cpu, 384 B"),
}


def test_probe_tests_reject_planted_bugs_and_unwired_harnesses(pytester: pytest.Pytester) -> None:
    """The probes have teeth. One session (float32) runs the two probe tests against:
    a loop that logs ``loss.item()`` every microbatch (host-read test fails, ACC-B3,
    naming the read), one that checks each parameter for inf/nan with its own read at
    the boundary (fails, ACC-B4: 4 reads), one that keeps a copy of the gradient
    after every microbatch (buffer test fails, ACC-P4, naming the copied tensors) —
    each in every scenario (mean, items with device counts, clipping by norm, two
    ranks) while the other probe test passes; a harness without the
    'probes' capability (skipped, with the reason); and one that declares it but
    records nothing (fails, saying so). The correct loop passes both tests in the
    whole-suite runs above."""
    classes = "\n".join(
        f"""
class {cls}(ConformanceSuite):
    @pytest.fixture
    def harness(self):
        return manual_harness.{harness}()
"""
        for cls, (harness, _, _, _) in PROBE_BUGS.items()
    )
    extra = f"""
import gradaccum_conformance


class NoProbes(manual_harness.ManualHarness):
    name = "no-probes"
    capabilities = frozenset(gradaccum_conformance.CAPABILITIES) - {{"probes"}}


class ForgetsToRecord(manual_harness.ManualHarness):
    name = "forgets-to-record"

    def run(self, scenario, workdir):
        return super().run(scenario.replace(probes=()), workdir)


class TestForgets(ConformanceSuite):
    @pytest.fixture
    def harness(self):
        return ForgetsToRecord()

{classes}
"""
    pytester.makepyfile(test_probe_bugs=_subclass_module("NoProbes", extra))
    _, report = _run(pytester, "-k", f"{READS} or {BUFFERS}", "--gradaccum-dtype=float32")
    by_class: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for t in report["tests"]:
        cls = t["nodeid"].split("::")[1]
        by_class.setdefault(cls, {}).setdefault(t["test"].split("[")[0], []).append(t)

    for cls, (harness, test, promise, shown) in PROBE_BUGS.items():
        tests = by_class[cls]
        cases = {READS: 4, BUFFERS: 4}[test]
        outcomes = [t["outcome"] for t in tests[test]]
        assert outcomes == ["failed"] * cases, f"{harness}: {test} outcomes {outcomes}"
        for t in tests[test]:
            assert t["broken_promises"] == [promise], (harness, t["broken_promises"])
            assert f"promise broken ({promise})" in t["reason"], t["reason"]
            assert shown in t["reason"], t["reason"]
        (other,) = {READS, BUFFERS} - {test}
        assert {t["outcome"] for t in tests[other]} == {"passed"}, f"{harness}: {other}"
    for promise in ("ACC-B3", "ACC-B4", "ACC-P4"):
        assert report["promises"][promise]["verdict"] == "broken"

    skipped = [t for tests in by_class["TestUnderTest"].values() for t in tests]
    assert {t["outcome"] for t in skipped} == {"skipped"}
    assert {t["reason"] for t in skipped} == {
        "harness no-probes does not declare capability probes"
    }
    forgets = [t for tests in by_class["TestForgets"].values() for t in tests]
    assert forgets and {t["outcome"] for t in forgets} == {"failed"}
    assert all("declares capability 'probes'" in t["reason"] for t in forgets)
    assert all("recorded 0 microbatch(es)" in t["reason"] for t in forgets)
