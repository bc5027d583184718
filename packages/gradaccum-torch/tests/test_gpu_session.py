"""The `gpu` nox session exists, is not part of the default run, and what it runs collects on a
machine without CUDA, where every CUDA test skips with the reason.

The noxfile is read with `ast` (nox need not be installed where these tests run); the pytest
command is the session's own: ``GPU_PYTEST_ARGS`` from noxfile.py, on this package's tests.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
NOXFILE = ROOT / "noxfile.py"
TESTS = Path(__file__).resolve().parent


def _noxfile() -> ast.Module:
    return ast.parse(NOXFILE.read_text(encoding="utf-8"))


def _gpu_pytest_args() -> list[str]:
    for node in _noxfile().body:
        targets: list[ast.expr]
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "GPU_PYTEST_ARGS" for t in targets):
            args = ast.literal_eval(value)
            assert isinstance(args, list)
            return [str(a) for a in args]
    raise AssertionError("noxfile.py defines no GPU_PYTEST_ARGS")


def test_gpu_session_is_declared_and_not_default() -> None:
    """The device axis of the conformance promise: noxfile.py has a `gpu` session, outside
    the default run (`default=False`), whose pytest arguments put the conformance suite on
    CUDA at float32, bf16 and fp16 (ACC-P3, ACC-B3)."""
    sessions = {
        node.name: node
        for node in _noxfile().body
        if isinstance(node, ast.FunctionDef)
        and any("session" in ast.unparse(d) for d in node.decorator_list)
    }
    assert "gpu" in sessions, sorted(sessions)
    decorators = [ast.unparse(d) for d in sessions["gpu"].decorator_list]
    assert any("default=False" in d for d in decorators), decorators
    args = _gpu_pytest_args()
    assert "--gradaccum-device=cuda" in args
    dtypes = next(a.split("=", 1)[1] for a in args if a.startswith("--gradaccum-dtype="))
    assert set(dtypes.split(",")) == {"float32", "bf16", "fp16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: `nox -s gpu` runs these")
def test_gpu_tests_collect_and_skip_with_the_reason_on_cpu(tmp_path: Path) -> None:
    """On a machine without CUDA, the gpu session's pytest command on this package's
    conformance and CUDA tests exits 0, its header says CUDA is not available, and every
    test is collected and skipped, saying that CUDA is not available (or, first, that the
    harness lacks a capability): the suite at 3 precisions, and the 4 tests of test_cuda.py
    (ACC-B3)."""
    junit = tmp_path / "junit.xml"
    files = [str(TESTS / "test_conformance.py"), str(TESTS / "test_cuda.py")]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *files,
            *_gpu_pytest_args(),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # the conformance header says why, once, before the skips
    assert (
        f"gradaccum conformance runs on torch {torch.__version__}: CUDA is not available, "
        "so every conformance test skips" in run.stdout
    ), run.stdout[:2000]
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    cuda_cases = [c for c in cases if c.get("classname", "").endswith("test_cuda")]
    suite_cases = [c for c in cases if "TestTorchConformance" in c.get("classname", "")]
    assert len(cuda_cases) == 4
    # the suite's tests were collected at each of the 3 precisions
    precisions = {
        m.group(1) for c in suite_cases if (m := re.search(r"\[(\w+)", c.get("name", "")))
    }
    assert precisions == {"float32", "bf16", "fp16"}, precisions
    reasons = {}
    for case in cases:
        skipped = case.find("skipped")
        assert skipped is not None, f"{case.get('name')} ran on a machine without CUDA"
        reasons[case.get("name")] = skipped.get("message", "")
    # a test for a capability the harness lacks (distributed) skips for that first
    lacking = {n for n, r in reasons.items() if "does not declare capability" in r}
    assert all("CUDA is not available" in r for n, r in reasons.items() if n not in lacking), {
        n: r for n, r in reasons.items() if "CUDA is not available" not in r
    }
    assert len(reasons) - len(lacking) >= 4 + 3 * 20
