"""The pytest plugin (entry point ``pytest11: gradaccum_conformance``).

Adds the options ``--gradaccum-harness``, ``--gradaccum-device``,
``--gradaccum-dtype`` and ``--gradaccum-report``; the fixtures
``gradaccum_device``, ``gradaccum_precision`` (parametrized by the dtypes)
and ``gradaccum_cli_harness``; a header naming the adapter, the spec
version, the device and the dtypes, then the torch release and, with
``--gradaccum-device=cuda``, the GPU or that there is none (printed after
collection, and only when conformance tests were collected, so other test
runs stay quiet); a terminal
summary of broken promises and skipped capabilities per harness; and the
JSON compliance report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import torch

import gradaccum
from gradaccum_conformance.compare import BrokenPromiseError
from gradaccum_conformance.harness import Harness, load_harness
from gradaccum_conformance.promises import PROMISES
from gradaccum_conformance.scenario import PRECISIONS, Precision
from gradaccum_conformance.suite import (
    HARNESS_PROPERTY,
    MISSING_CAPABILITY,
    PROMISE_MARK,
    REQUIRES_MARK,
)

SUITE_VERSION = "0.1.0"
PROMISES_PROPERTY = "gradaccum_promises"
BROKEN_PROPERTY = "gradaccum_broken_promises"
_RECORDER = pytest.StashKey["_ComplianceRecorder"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradaccum", "gradaccum conformance suite")
    group.addoption(
        "--gradaccum-harness",
        default=None,
        metavar="MODULE:CLASS",
        help="harness to test with `pytest --pyargs gradaccum_conformance`, "
        "e.g. mypkg.conformance:MyHarness",
    )
    group.addoption(
        "--gradaccum-device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device the harness runs scenarios on (default: cpu)",
    )
    group.addoption(
        "--gradaccum-dtype",
        default="float64",
        metavar="DTYPES",
        help="comma-separated precisions: float64, float32, bf16 (bf16 autocast), "
        "fp16 (fp16 autocast with GradScaler); default: float64",
    )
    group.addoption(
        "--gradaccum-report",
        default=None,
        metavar="PATH",
        help="write a JSON compliance report to PATH",
    )


def _precisions(config: pytest.Config) -> list[Precision]:
    raw = str(config.getoption("--gradaccum-dtype"))
    values = [v.strip() for v in raw.split(",") if v.strip()]
    bad = [v for v in values if v not in PRECISIONS]
    if bad or not values:
        raise pytest.UsageError(
            f"--gradaccum-dtype={raw!r}: use a comma-separated list of {', '.join(PRECISIONS)}"
        )
    return values  # type: ignore[return-value]


def _adapter_label(config: pytest.Config) -> str:
    spec = config.getoption("--gradaccum-harness")
    if not spec:
        return "the harness fixture of each ConformanceSuite subclass"
    try:
        return f"{load_harness(str(spec)).name} ({spec})"
    except Exception as exc:  # reported again, as an error, by the fixture
        return f"{spec} (cannot be loaded: {exc})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{PROMISE_MARK}(*ids): the gradaccum spec promises a test checks"
    )
    config.addinivalue_line(
        "markers", f"{REQUIRES_MARK}(*capabilities): harness capabilities a test needs"
    )
    _precisions(config)
    recorder = _ComplianceRecorder(config)
    config.stash[_RECORDER] = recorder
    config.pluginmanager.register(recorder, "gradaccum-conformance-recorder")


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    """The header of a conformance run (shown only when conformance tests were collected)."""
    if not any(item.get_closest_marker(PROMISE_MARK) for item in items):
        return []
    return [
        f"gradaccum conformance {SUITE_VERSION}: adapter {_adapter_label(config)}, "
        f"spec {gradaccum.SPEC_VERSION}, device {config.getoption('--gradaccum-device')}, "
        f"dtype {','.join(_precisions(config))}",
        f"gradaccum conformance runs on torch {torch.__version__}{_cuda_note(config)}",
    ]


def _cuda_note(config: pytest.Config) -> str:
    """Which GPU ``--gradaccum-device=cuda`` uses, or that there is none (every test skips)."""
    if config.getoption("--gradaccum-device") != "cuda":
        return ""
    if not torch.cuda.is_available():
        return ": CUDA is not available, so every conformance test skips"
    return f", CUDA device {torch.cuda.get_device_name()}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "gradaccum_precision" in metafunc.fixturenames:
        precisions = _precisions(metafunc.config)
        metafunc.parametrize("gradaccum_precision", precisions, ids=precisions, indirect=True)


@pytest.fixture
def gradaccum_precision(request: pytest.FixtureRequest) -> Precision:
    """The precision of this test run (one of ``--gradaccum-dtype``)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def gradaccum_device(pytestconfig: pytest.Config) -> str:
    """``--gradaccum-device``."""
    return str(pytestconfig.getoption("--gradaccum-device"))


@pytest.fixture(scope="session")
def gradaccum_cli_harness(pytestconfig: pytest.Config) -> Harness:
    """The harness named by ``--gradaccum-harness`` (skips when none is given)."""
    spec = pytestconfig.getoption("--gradaccum-harness")
    if not spec:
        pytest.skip("no --gradaccum-harness=package.module:HarnessClass given")
    return load_harness(str(spec))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        ids = [a for m in item.iter_markers(PROMISE_MARK) for a in m.args]
        if ids:
            item.user_properties.append((PROMISES_PROPERTY, tuple(ids)))


def pytest_unconfigure(config: pytest.Config) -> None:
    recorder = config.stash.get(_RECORDER, None)
    if recorder is not None:
        config.pluginmanager.unregister(recorder)


def _properties(report: pytest.TestReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in report.user_properties:
        if key == MISSING_CAPABILITY:
            out.setdefault(key, []).append(value)
        else:
            out[key] = value
    return out


def _first_lines(text: str, limit: int = 12) -> str:
    """The failure message without the traceback: from "promise broken" (or
    the first ``E`` line) to the first blank line."""
    for marker in ("promise broken", "E   "):
        at = text.find(marker)
        if at >= 0:
            text = text[at:]
            break
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.removeprefix("E").strip()
        if not line:
            break
        lines.append(line)
    return "\n".join(lines[:limit])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, BrokenPromiseError):
        report.user_properties.append((BROKEN_PROPERTY, call.excinfo.value.promises))
    return report


def _promise_summary(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A verdict per promise: ``broken`` if a failure blamed it, else ``kept``
    if a test citing it passed, else ``expected failure``, ``unverified`` (its
    test failed on another promise), ``skipped`` or ``not run``."""
    seen: dict[str, list[str]] = defaultdict(list)
    tests: dict[str, list[str]] = defaultdict(list)
    for entry in results.values():
        failed = entry["outcome"] in ("failed", "error", "xpassed-strict")
        blamed = entry["broken_promises"] if failed else []
        for pid in dict.fromkeys([*entry["promises"], *blamed]):
            tests[pid].append(entry["test"])
            if pid in blamed:
                seen[pid].append("broken")
            elif failed:
                seen[pid].append("unverified")
            else:
                seen[pid].append(entry["outcome"])
    summary: dict[str, dict[str, Any]] = {}
    for pid, statement in PROMISES.items():
        outcomes = seen.get(pid, [])
        verdict = next(
            (
                verdict
                for verdict, when in (
                    ("broken", "broken"),
                    ("kept", "passed"),
                    ("expected failure", "xfailed"),
                    ("unverified", "unverified"),
                    ("skipped", "skipped"),
                )
                if when in outcomes
            ),
            "not run",
        )
        summary[pid] = {"statement": statement, "verdict": verdict, "tests": tests.get(pid, [])}
    return summary


class _ComplianceRecorder:
    """Collects each conformance test's outcome for the summary and the JSON report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = _properties(report)
        if PROMISES_PROPERTY not in props:
            return
        entry = self.results.setdefault(
            report.nodeid,
            {
                "nodeid": report.nodeid,
                "test": report.nodeid.split("::")[-1],
                "promises": list(props[PROMISES_PROPERTY]),
                "outcome": "passed",
                "harness": None,
                "missing_capabilities": [],
                "broken_promises": [],
                "reason": "",
            },
        )
        if HARNESS_PROPERTY in props:
            entry["harness"] = props[HARNESS_PROPERTY]
        if report.failed:
            blamed = props.get(BROKEN_PROPERTY, props[PROMISES_PROPERTY])
            entry["broken_promises"] = list(blamed)
        if MISSING_CAPABILITY in props:
            entry["missing_capabilities"] = sorted(set(props[MISSING_CAPABILITY]))
        wasxfail = hasattr(report, "wasxfail")
        if report.skipped:
            if wasxfail:
                entry["outcome"] = "xfailed"
                entry["reason"] = str(report.wasxfail)
            else:
                entry["outcome"] = "skipped"
                longrepr = report.longrepr
                reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
                entry["reason"] = reason.removeprefix("Skipped: ")
        elif report.failed:
            if str(report.longrepr).startswith("[XPASS(strict)]"):
                entry["outcome"] = "xpassed-strict"
            else:
                entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["reason"] = _first_lines(report.longreprtext)
        elif report.when == "call" and wasxfail:
            entry["outcome"] = "xpassed"

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results:
            return
        tr = terminalreporter
        tr.section("gradaccum conformance")
        skipped: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for entry in self.results.values():
            for capability in entry["missing_capabilities"]:
                skipped[entry["harness"] or "?"][capability].add(entry["test"])
        summary = _promise_summary(self.results)
        broken = [pid for pid, s in summary.items() if s["verdict"] == "broken"]
        kept = [pid for pid, s in summary.items() if s["verdict"] == "kept"]
        tr.write_line(f"promises kept: {len(kept)}; broken: {', '.join(broken) or 'none'}")
        for entry in self.results.values():
            if entry["outcome"] in ("failed", "error", "xpassed-strict"):
                blamed = ", ".join(entry["broken_promises"])
                tr.write_line(f"  BROKEN {blamed}: {entry['test']} ({entry['outcome']})")
        for harness, capabilities in sorted(skipped.items()):
            tr.write_line(f"harness {harness}: skipped for undeclared capabilities:")
            for capability, tests in sorted(capabilities.items()):
                tr.write_line(f"  {capability}: {len(tests)} test(s): {', '.join(sorted(tests))}")

    def pytest_sessionfinish(self) -> None:
        config = self.config
        path = config.getoption("--gradaccum-report")
        if not path:
            return
        harnesses = sorted({e["harness"] for e in self.results.values() if e["harness"]})
        report: dict[str, Any] = {
            "suite": "gradaccum-conformance",
            "suite_version": SUITE_VERSION,
            "spec_version": gradaccum.SPEC_VERSION,
            "adapter": ", ".join(harnesses) or _adapter_label(config),
            "device": config.getoption("--gradaccum-device"),
            "dtype": _precisions(config),
            "torch": torch.__version__,
            "tests": list(self.results.values()),
            "promises": _promise_summary(self.results),
        }
        out = Path(str(path))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
