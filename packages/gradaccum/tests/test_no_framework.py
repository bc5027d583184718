"""The core imports no framework (DESIGN: the core is pure and framework-agnostic)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gradaccum

SOURCE = Path(gradaccum.__file__).resolve().parent
FORBIDDEN = ("torch", "numpy", "lightning", "pytorch_lightning", "accelerate")
IMPORT = re.compile(
    r"^\s*(?:import|from)\s+(" + "|".join(re.escape(name) for name in FORBIDDEN) + r")\b",
    re.MULTILINE,
)


def test_import_loads_no_framework() -> None:
    """ACC-D2 (decisions in a pure core): importing gradaccum loads neither torch nor numpy."""
    code = (
        "import sys, gradaccum\n"
        "bad = [m for m in ('torch', 'numpy', 'lightning', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SOURCE.parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr


def test_source_has_no_framework_imports() -> None:
    """ACC-D2 (decisions in a pure core): no module of the core imports a framework."""
    files = sorted(SOURCE.rglob("*.py"))
    assert files
    offenders = [
        f"{path.relative_to(SOURCE)}: {match.group(0).strip()}"
        for path in files
        for match in IMPORT.finditer(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders
