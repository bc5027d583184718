"""Every check of the gradaccum monorepo. `nox` runs the default set; `nox -l` lists them all.

Torch rule: the everyday sessions (typecheck, tests, conformance, docs, bench, demo) install one
torch, the CPython 3.11 CPU wheel `torch==2.13.0`, first and pinned for the rest of the session.
The version cells (`oldest`, `cell`, `matrix`) install other releases too: each cell is one
package's tests against one pinned torch / Lightning / Accelerate, in its own uv venv that is
removed when the cell ends (any torch other than the local 2.13.0 CPU wheel is a CUDA build of
several GB). The declared lower bounds in the packages' pyproject.toml files are the `oldest`
cells, which the default run includes; `nox -s matrix` runs every cell and writes the table in
docs/compatibility.md; `nox -s gpu` runs the suites with `--gradaccum-device=cuda` where CUDA is.

Interpreters: nox looks for `python3.10` ... `python3.13` on PATH. Where pyenv is installed, the
noxfile puts the bin folder of every pyenv CPython 3.10-3.13 on PATH first, so a plain `nox`
finds them all; a version you do not have is skipped, and listed again at the end of the run.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = False  # a Python you do not have is skipped, not failed
nox.options.sessions = [
    "lint",
    "typecheck",
    "core",
    "tests",
    "oldest",
    "conformance",
    "crossstack",
    "docs",
]

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
CORE_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def _pyenv_onto_path() -> list[str]:
    """Put the bin folder of each pyenv CPython 3.10-3.13 on PATH (first), so that nox finds
    `python3.12` without a `pyenv shell` (pyenv's shim for a version that is not selected
    exits with an error, and nox then skips the session); returns the versions still missing."""
    pyenv = shutil.which("pyenv")
    root = ""
    if pyenv:
        try:
            root = subprocess.run(
                [pyenv, "root"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            root = ""
    shims = Path(root, "shims") if root else None

    def usable(version: str) -> bool:
        found = shutil.which(f"python{version}")
        return found is not None and (shims is None or Path(found).parent != shims)

    missing = [v for v in CORE_PYTHONS if not usable(v)]
    found: list[str] = []
    for version in list(missing) if root else []:
        # the newest patch release of this minor version that pyenv holds
        candidates = sorted(
            Path(root, "versions").glob(f"{version}.*/bin/python{version}"),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)],
        )
        if candidates:
            found.append(str(candidates[-1].parent))
            missing.remove(version)
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])
    return missing


MISSING_PYTHONS = _pyenv_onto_path()


def _report_missing_pythons() -> None:
    # nox skips a session whose Python is absent with one line in the middle of the log;
    # say it again where the reader looks, at the end.
    selected = [a for a in sys.argv[1:] if not a.startswith("-")]
    if MISSING_PYTHONS and (not selected or any("core" in a for a in selected)):
        print(
            f"nox: no interpreter for Python {', '.join(MISSING_PYTHONS)} on PATH (nor in "
            f"pyenv): the core sessions for them were SKIPPED, not run. Install them (for "
            f"example `pyenv install {MISSING_PYTHONS[0]}`) to test the core there.",
            file=sys.stderr,
        )


atexit.register(_report_missing_pythons)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _discover() -> dict[str, str]:
    """Distribution name -> folder (relative to the root) for each package with a pyproject.toml."""
    pyprojects = sorted(ROOT.glob("packages/*/pyproject.toml")) + sorted(
        ROOT.glob("conformance/pyproject.toml")
    )
    local = {}
    for pyproject in pyprojects:
        name = nox.project.load_toml(pyproject)["project"]["name"]
        local[_normalize(name)] = pyproject.parent.relative_to(ROOT).as_posix()
    return local


LOCAL = _discover()
ADAPTERS = [
    name
    for name, folder in LOCAL.items()
    if folder.startswith("packages/gradaccum-") and (ROOT / folder / "tests").is_dir()
]


def _local_requires(name: str, *, test: bool) -> list[str]:
    """The local distributions that `name` depends on (and, with test=True, its [test] extra)."""
    project = nox.project.load_toml(ROOT / LOCAL[name] / "pyproject.toml")["project"]
    requirements = list(project.get("dependencies", []))
    if test:
        requirements += project.get("optional-dependencies", {}).get("test", [])
    names = [re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r) for r in requirements]
    return [_normalize(m.group(1)) for m in names if m and _normalize(m.group(1)) in LOCAL]


def _install_local(session: nox.Session, *targets: str) -> None:
    """pip install -e each target with its [test] extra, plus every local package it needs.

    Local dependencies must come from this checkout: left to pip, `gradaccum-torch` would be
    looked up on PyPI. They are listed before their dependents, which pip's resolver needs to
    see a local `gradaccum-torch==0.1.0` before `gradaccum-ddp` asks for it.
    """
    ordered = _local_order(list(targets))
    args = []
    for name in ordered:
        args += ["-e", f"{LOCAL[name]}[test]" if name in targets else LOCAL[name]]
    session.install(*args)


def _install_torch(session: nox.Session, *pins: str) -> None:
    """Install the CPU torch wheel first and pin it (and ``pins``) for every later install in
    this session."""
    if session.python != "3.11":
        session.error(f"{TORCH} exists only for CPython 3.11; this session runs {session.python}")
    constraints = Path(session.create_tmp()) / "torch-constraint.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in (TORCH, *pins)))
    session.env["PIP_CONSTRAINT"] = str(constraints)
    session.install(TORCH)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting, configured in the root pyproject.toml."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    _check_workflow_cells(session)


def _check_workflow_cells(session: nox.Session) -> None:
    """.github/workflows/compat.yml lists exactly the cells of the version matrix, in order."""
    workflow = ROOT / ".github/workflows/compat.yml"
    if not workflow.is_file():
        return
    listed = re.findall(r"^\s+- (gradaccum[\w.-]*@[\w.+-]+)\s*$", workflow.read_text(), re.M)
    if listed != list(CELLS):
        session.error(
            f"{workflow.relative_to(ROOT)} lists the cells {listed}, noxfile.py defines "
            f"{list(CELLS)}: make the workflow's matrix match"
        )
    session.log(f"{workflow.relative_to(ROOT)}: the {len(listed)} cells of the matrix")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over every package's src, the core's tests, benchmarks and this file."""
    _install_torch(session)
    _install_local(session, *LOCAL)
    session.install("mypy>=1.10", "nox")
    session.run("mypy", "--strict", *[f"{folder}/src" for folder in LOCAL.values()])
    # Separate runs: several folders hold top-level modules with the same names (tests, conftest).
    if (ROOT / "packages/gradaccum/tests").is_dir():
        session.run("mypy", "--strict", "packages/gradaccum/tests")
    if list(ROOT.glob("benchmarks/**/*.py")):
        session.run("mypy", "--strict", "benchmarks")
    session.run("mypy", "--strict", "noxfile.py")


NO_TORCH = (
    "import importlib.util, sys; "
    "sys.exit('torch is importable: the core must be tested without it' "
    "if importlib.util.find_spec('torch') else 0)"
)


@nox.session(python=CORE_PYTHONS)
def core(session: nox.Session) -> None:
    """The core on every supported Python, in an environment without torch."""
    session.install("-e", "packages/gradaccum[test]")
    session.run("python", "-c", NO_TORCH)
    session.run("python", "-c", "import gradaccum")
    session.run("pytest", "packages/gradaccum/tests", *session.posargs)


@nox.session(python="3.11")
@nox.parametrize("package", ADAPTERS, ids=ADAPTERS)
def tests(session: nox.Session, package: str) -> None:
    """One adapter package's own tests, with torch, the core and the conformance plugin."""
    _install_torch(session)
    _install_local(session, package, *[n for n in ("gradaccum-conformance",) if n in LOCAL])
    session.run("pytest", f"{LOCAL[package]}/tests", *session.posargs)


# -- version cells ---------------------------------------------------------------------------
TORCH_MIN = "2.3.1"  # every torch-based pyproject.toml declares torch>=2.3
TORCH_NEWEST = "2.15.0"  # the newest torch release on the package index, checked 2026-11-29
TORCH_VERSIONS = [TORCH_MIN, "2.13.0", TORCH_NEWEST]
TORCH_SUITES = {  # package -> (local packages to install with their [test] extra, tests folder)
    "gradaccum-torch": (["gradaccum-torch", "gradaccum-conformance"], "packages/gradaccum-torch"),
    "gradaccum-ddp": (["gradaccum-ddp", "gradaccum-conformance"], "packages/gradaccum-ddp"),
    "gradaccum-conformance": (["gradaccum-conformance", "gradaccum-torch"], "conformance"),
}
FRAMEWORKS = {  # adapter -> [pins of the declared minimum, pins of the newest release]
    # Lightning before 2.5 feeds one microbatch twice when a fit resumes from a checkpoint taken
    # mid-epoch (2.2.0 and 2.4.0 measured: a mid-window resume is then not exact). Old Lightning
    # imports pkg_resources, which torch 2.13's setuptools>=77 no longer ships from 81 on.
    "gradaccum-lightning": [["lightning==2.5.0", "setuptools<81"], ["lightning==2.6.6"]],
    "gradaccum-accelerate": [["accelerate==1.0.0"], ["accelerate==1.15.0"]],
    "gradaccum-wandb": [["wandb==0.30.0"], ["wandb==0.31.0"]],
}


@dataclass(frozen=True)
class Cell:
    """One package's tests against pinned releases, in a fresh Python 3.11 uv venv."""

    package: str
    torch: str
    pins: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        framework = [p.replace("==", "-") for p in self.pins if "==" in p]
        return self.package + "@" + "+".join([f"torch-{self.torch}", *framework])

    @property
    def targets(self) -> list[str]:
        if self.package in TORCH_SUITES:
            return TORCH_SUITES[self.package][0]
        return [self.package, "gradaccum-conformance"]

    @property
    def tests(self) -> str:
        folder = (
            TORCH_SUITES[self.package][1] if self.package in TORCH_SUITES else LOCAL[self.package]
        )
        return f"{folder}/tests"


def _cells() -> list[Cell]:
    cells = [Cell(package, torch) for torch in TORCH_VERSIONS for package in TORCH_SUITES]
    for package, releases in FRAMEWORKS.items():
        if package in LOCAL:
            cells += [Cell(package, "2.13.0", tuple(pins)) for pins in releases]
            # the oldest framework release on the oldest torch too: both floors at once
            cells.append(Cell(package, TORCH_MIN, tuple(releases[0])))
    return [c for c in cells if all(t in LOCAL for t in c.targets)]


CELLS = {cell.id: cell for cell in _cells()}
OLDEST = {
    cell.package: cell
    for cell in CELLS.values()
    if cell.package in ("gradaccum-torch", *FRAMEWORKS)
    and (cell.torch == TORCH_MIN if cell.package == "gradaccum-torch" else cell.torch == "2.13.0")
    and (cell.package not in FRAMEWORKS or list(cell.pins) == FRAMEWORKS[cell.package][0])
}
"""The default run's cells: gradaccum-torch on the oldest torch it declares, and each
framework adapter on the oldest Lightning / Accelerate it declares."""

CHECK_VERSION = """
import importlib.metadata, sys
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    found = importlib.metadata.version(name)
    print(f"{name} {found}")
    if found.split("+")[0] != wanted:
        sys.exit(f"{name} {found} installed, {wanted} wanted: the resolver moved a pin")
"""


def _uv(session: nox.Session) -> str:
    """The uv executable: on PATH, in nox's own environment, or installed with pip into
    .nox/_uv (a machine with only Python and pip needs nothing else)."""
    found = shutil.which("uv")
    if found:
        return found
    tool = ROOT / ".nox" / "_uv"
    uv = tool / ("Scripts/uv.exe" if os.name == "nt" else "bin/uv")
    if not uv.exists():
        session.run(sys.executable, "-m", "venv", str(tool), external=True)
        python = tool / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        session.run(str(python), "-m", "pip", "install", "-q", "uv", external=True)
    return str(uv)


def _pip_find_links() -> str:
    """pip's configured find-links (where a machine keeps local wheels, such as the torch
    2.13.0 CPU wheel), for uv, which does not read pip's configuration."""
    if os.environ.get("PIP_FIND_LINKS"):
        return os.environ["PIP_FIND_LINKS"]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    found = re.search(r"^[\w:.-]*find-links='([^']*)'", out, re.M)
    return found.group(1) if found else ""


def _python311() -> str:
    """A CPython 3.11 for the cells (the torch 2.13.0 CPU wheel exists only for 3.11)."""
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    return "3.11"  # let uv find (or report that it cannot find) one


@dataclass
class CellResult:
    cell: str
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    venv_mb: int = 0
    torch: str = ""
    note: str = ""
    ok: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _du_mb(path: Path) -> int:
    total = 0
    seen: set[int] = set()
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total // 2**20


def _junit_counts(path: Path) -> tuple[int, int, int, int]:
    """(passed, failed, errors, skipped) from pytest's junit xml."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failures = errors = skipped = 0
    for suite in suites:
        tests += int(suite.get("tests", 0))
        failures += int(suite.get("failures", 0))
        errors += int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return tests - failures - errors - skipped, failures, errors, skipped


def _run_cell(session: nox.Session, cell: Cell, *pytest_args: str) -> CellResult:
    """Create the cell's venv, install its pins and packages, run its tests, remove the venv.

    The CUDA torch wheels are large: uv's cache makes a second install take seconds, and the
    venv (hard links into that cache) is deleted when the cell ends, pass or fail.
    """
    result = CellResult(cell.id)
    uv = _uv(session)
    work = ROOT / ".nox" / "cells" / cell.id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    venv = work / "venv"
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    torch_pin = f"torch=={cell.torch}"
    constraints = work / "constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in (torch_pin, *cell.pins)))
    env = {
        "UV_CONSTRAINT": str(constraints),  # replaces any global pip cap on torch
        "UV_FIND_LINKS": _pip_find_links(),
        "VIRTUAL_ENV": str(venv),
    }
    ordered = _local_order(cell.targets)
    local_args: list[str] = []
    for name in ordered:
        local_args += ["-e", f"{LOCAL[name]}[test]" if name in cell.targets else LOCAL[name]]
    junit = work / "junit.xml"
    start = time.monotonic()
    try:
        session.run(uv, "venv", "-q", "--python", _python311(), str(venv), external=True)
        session.run(
            uv, "pip", "install", "--python", python, torch_pin, *cell.pins, *local_args,
            external=True, env=env,
        )  # fmt: skip
        pins = [torch_pin, *[p for p in cell.pins if "==" in p]]
        session.run(python, "-c", CHECK_VERSION, *pins, external=True)
        result.torch = subprocess.run(
            [python, "-c", "import torch; print(torch.__version__)"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        result.venv_mb = _du_mb(venv)
        try:
            session.run(
                python, "-m", "pytest", cell.tests, "-p", "no:cacheprovider", "-q",
                f"--junitxml={junit}", *pytest_args, external=True, env=_activated(venv),
            )  # fmt: skip
        finally:
            if junit.is_file():
                result.passed, result.failed, result.errors, result.skipped = _junit_counts(junit)
        result.ok = True
    except nox.command.CommandFailed as exc:
        result.note = "tests failed" if junit.is_file() else f"set-up failed: {exc.reason}"
    finally:
        result.seconds = time.monotonic() - start
        shutil.rmtree(work, ignore_errors=True)
    return result


def _activated(venv: Path) -> dict[str, str]:
    """The environment of an activated ``venv``: its scripts (torchrun, accelerate) first."""
    scripts = venv / ("Scripts" if os.name == "nt" else "bin")
    return {"VIRTUAL_ENV": str(venv), "PATH": os.pathsep.join([str(scripts), os.environ["PATH"]])}


def _local_order(targets: list[str]) -> list[str]:
    """``targets`` and every local package they need, dependencies first."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for dep in _local_requires(name, test=name in targets):
            visit(dep)
        ordered.append(name)

    for target in targets:
        visit(target)
    return ordered


def _cell_session(session: nox.Session, cell: Cell) -> None:
    result = _run_cell(session, cell, *session.posargs)
    session.log(
        f"{cell.id}: torch {result.torch}, {result.passed} passed, {result.failed} failed, "
        f"{result.errors} errors, {result.skipped} skipped in {result.seconds:.0f} s "
        f"(venv {result.venv_mb} MB, removed)"
    )
    if not result.ok:
        session.error(f"{cell.id}: {result.note}")


@nox.session(python=False)
@nox.parametrize("package", list(OLDEST), ids=list(OLDEST))
def oldest(session: nox.Session, package: str) -> None:
    """A package's tests against the oldest torch / Lightning / Accelerate / wandb it declares.

    gradaccum-torch on the oldest torch; the Lightning and Accelerate adapters on the oldest
    framework release (with torch 2.13.0)."""
    _cell_session(session, OLDEST[package])


@nox.session(python=False, default=False)
@nox.parametrize("cell", list(CELLS), ids=list(CELLS))
def cell(session: nox.Session, cell: str) -> None:
    """One cell of the version matrix (`nox -l` lists them; `nox -s matrix` runs them all)."""
    _cell_session(session, CELLS[cell])


@nox.session(python="3.11")
def conformance(session: nox.Session) -> None:
    """The conformance suite's own tests (meta-tests against planted bugs included)."""
    if "gradaccum-conformance" not in LOCAL or not (ROOT / "conformance/tests").is_dir():
        session.skip("conformance/ has no pyproject.toml or no tests/ yet: nothing to run")
    _install_torch(session)
    harnesses = [n for n in ("gradaccum-torch",) if n in LOCAL]
    _install_local(session, "gradaccum-conformance", *harnesses)
    session.run("pytest", "conformance/tests", *session.posargs)


STACKS = (
    "gradaccum-torch",
    "gradaccum-ddp",
    "gradaccum-lightning",
    "gradaccum-accelerate",
)
"""The adapters whose harnesses the cross-stack checkpoint matrix pairs."""


@nox.session(python="3.11")
def crossstack(session: nox.Session) -> None:
    """The cross-stack checkpoint matrix (ACC-R5): a checkpoint saved mid-window (and at a
    boundary) in each of torch, DDP, Lightning Trainer, Fabric and Accelerate, on 1 and 2 gloo
    ranks, resumes in every other; tests/crossstack."""
    _install_torch(session)
    _install_local(session, "gradaccum-conformance", *[n for n in STACKS if n in LOCAL])
    session.run("pytest", "tests/crossstack", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """mkdocs build --strict: any warning (a broken link, a missing spec snippet) is an error."""
    session.install(
        "mkdocs-material>=9.5,<10", "pymdown-extensions>=10", "mkdocstrings[python]>=0.25"
    )
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # a vendor notice, not a build warning
    session.run("mkdocs", "build", "--strict", *session.posargs)
    session.run("python", "-c", RAW_ROLES, "site")


RAW_ROLES = """
import re, sys, pathlib
roles = re.compile(r':(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj|const):`')
bad = [(str(p), m.group(0)) for p in pathlib.Path(sys.argv[1]).rglob('*.html')
       for m in roles.finditer(p.read_text(encoding='utf-8'))]
for path, role in bad[:20]:
    print(f'{path}: raw Sphinx role {role}... in the rendered site: write `Name` instead')
sys.exit(1 if bad else 0)
"""


@nox.session(python="3.11", default=False)
def demo(session: nox.Session) -> None:
    """Run the gradaccum-torch demo: a short training run, exact against one large batch."""
    package = ROOT / "packages/gradaccum-torch/src/gradaccum_torch"
    if "gradaccum-torch" not in LOCAL or not (
        (package / "demo.py").is_file() or (package / "demo/__main__.py").is_file()
    ):
        session.skip("gradaccum_torch.demo does not exist yet")
    _install_torch(session)
    _install_local(session, "gradaccum-torch")
    # its [demo] extra (matplotlib, tqdm), as declared in the package's pyproject.toml
    project = nox.project.load_toml(ROOT / LOCAL["gradaccum-torch"] / "pyproject.toml")
    session.install(*project["project"]["optional-dependencies"]["demo"])
    session.run("python", "-m", "gradaccum_torch.demo", *session.posargs)


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """Paired benchmarks against hand-written loops; prints a table."""
    if not (ROOT / "benchmarks/run.py").is_file():
        session.skip("benchmarks/run.py does not exist yet")
    _install_torch(session)
    # Plain editable installs of every local package: the benchmarks need no [test] extra
    # (and pip 23 cannot resolve an editable *with* extras listed after a local package
    # that depends on it: gradaccum-ddp[test] before gradaccum-torch[test] fails).
    packages = [name for name in LOCAL if name != "gradaccum-conformance"]
    session.install(*[arg for name in packages for arg in ("-e", LOCAL[name])])
    # The tools bench_peers.py times against gradaccum-torch, pinned (their figures move with
    # their versions); torch named again so that pip keeps the pinned wheel, never replaces it.
    session.install(TORCH, "lightning==2.6.6", "accelerate==1.15.0")
    session.run("python", "benchmarks/run.py", *session.posargs)


# -- the whole matrix --------------------------------------------------------------------------
MATRIX_RESULTS = Path(
    os.environ.get("GRADACCUM_MATRIX_RESULTS") or ROOT / ".nox" / "matrix-results.json"
)
COMPAT_DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- matrix:begin (written by `nox -s matrix`) -->", "<!-- matrix:end -->"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _machine() -> str:
    cores = os.cpu_count() or 0
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kb = re.search(r"MemTotal:\s+(\d+)", meminfo.read_text())
        memory = f", {int(kb.group(1)) / 2**20:.0f} GiB memory" if kb else ""
    return (
        f"{platform.system()} {platform.machine()}, {cores} cores{memory}, "
        f"CPython {platform.python_version()} running nox, no GPU used (CPU tests)"
    )


def _framework(cell: Cell) -> str:
    return ", ".join(p.replace("==", " ") for p in cell.pins if "==" in p) or "-"


def _table(results: dict[str, dict[str, object]]) -> list[str]:
    lines = [
        "| package | torch | framework | result | passed | failed | errors | skipped | time "
        "| venv |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for cell_id, cell in CELLS.items():
        r = results.get(cell_id)
        if r is None:
            lines.append(f"| {cell.package} | {cell.torch} | {_framework(cell)} | not run |||||||")
            continue
        verdict = "pass" if r["ok"] else f"**FAIL** ({r['note']})"
        lines.append(
            f"| {cell.package} | {r['torch'] or cell.torch} | {_framework(cell)} | {verdict} "
            f"| {r['passed']} | {r['failed']} | {r['errors']} | {r['skipped']} "
            f"| {float(str(r['seconds'])) / 60:.1f} min | {r['venv_mb']} MB |"
        )
    return lines


def _write_compat(results: dict[str, dict[str, object]], meta: dict[str, str]) -> None:
    block = "\n".join(
        [
            BEGIN,
            "",
            f"Run of {meta['date']} at commit `{meta['commit']}` on {meta['machine']}. "
            f"{meta['summary']}",
            "",
            *_table(results),
            "",
            END,
        ]
    )
    text = COMPAT_DOC.read_text(encoding="utf-8") if COMPAT_DOC.is_file() else "# Compatibility\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    COMPAT_DOC.write_text(text, encoding="utf-8")


@nox.session(python=False, default=False)
def matrix(session: nox.Session) -> None:
    """Every version cell; prints the table and writes it into docs/compatibility.md.

    The cells run one after another, each venv removed when its cell ends. `nox -s matrix --
    ID...` reruns only the named cells and keeps the other rows of the last run
    (.nox/matrix-results.json, or $GRADACCUM_MATRIX_RESULTS); `nox -s matrix -- --table`
    only rewrites the table from those results."""
    table_only = "--table" in session.posargs
    ids = [a for a in session.posargs if a != "--table"]
    unknown = [a for a in ids if a not in CELLS]
    if unknown:
        session.error(f"unknown cells {unknown}; `nox -l` lists the cell(...) ids")
    chosen = [] if table_only else ids or list(CELLS)
    saved: dict[str, dict[str, object]] = {}
    if (ids or table_only) and MATRIX_RESULTS.is_file():
        saved = json.loads(MATRIX_RESULTS.read_text())
    start = time.monotonic()
    for cell_id in chosen:
        session.log(f"matrix: cell {cell_id}")
        result = _run_cell(session, CELLS[cell_id])
        saved[cell_id] = {k: v for k, v in vars(result).items() if k != "extra"}
        MATRIX_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        MATRIX_RESULTS.write_text(json.dumps(saved, indent=2))
    wall = (time.monotonic() - start) / 60
    cache = subprocess.run(
        [_uv(session), "cache", "dir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    cache_mb = _du_mb(Path(cache)) if cache and Path(cache).is_dir() else 0
    rows = {k: v for k, v in saved.items() if k in CELLS}
    largest = max((int(str(r["venv_mb"])) for r in rows.values()), default=0)
    cell_minutes = sum(float(str(r["seconds"])) for r in rows.values()) / 60
    failed = [c for c in rows if not rows[c]["ok"]]
    summary = (
        f"{len(rows)} cells, {cell_minutes:.0f} min of cell time (installs and tests"
        + (f"; this run took {wall:.0f} min" if chosen and not ids else "")
        + f"). Each cell's venv is removed when the cell ends (the largest held "
        f"{largest / 1024:.1f} GB, mostly hard links into uv's cache); uv's download cache "
        f"held {cache_mb / 1024:.1f} GB after the run."
    )
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD")
        + (
            " + uncommitted changes"
            if _git("status", "--porcelain", "--untracked-files=no")
            else ""
        ),
        "machine": _machine(),
        "summary": summary,
    }
    lines = _table(rows)
    print("\n".join(lines))
    print(summary)
    _write_compat(rows, meta)
    session.log(f"wrote {COMPAT_DOC.relative_to(ROOT)}")
    if failed:
        session.error(f"cells failed: {', '.join(failed)}")


# -- the device axis -----------------------------------------------------------------------------
GPU_PYTEST_ARGS = ["--gradaccum-device=cuda", "--gradaccum-dtype=float32,bf16,fp16"]
"""What the gpu session adds to each adapter's tests: the conformance suite on CUDA at float32,
bf16 autocast and fp16 autocast with a real GradScaler (the CPU tests of the package run too)."""
GPU_SUITES = [
    name for name in ("gradaccum-torch", "gradaccum-ddp", "gradaccum-lightning",
                      "gradaccum-accelerate") if name in LOCAL
]  # fmt: skip


@nox.session(python=False, default=False)
def gpu(session: nox.Session) -> None:
    """The adapters' tests with the conformance suite on CUDA; skips, saying why, without one.

    torch 2.13.0's CUDA build from the package index, `GPU_PYTEST_ARGS` added to each adapter's
    tests (float32, bf16, fp16 with a GradScaler; test_cuda.py checks no sync off the boundary
    with torch.cuda.set_sync_debug_mode("error"))."""
    if shutil.which("nvidia-smi") is None:
        session.skip("no NVIDIA GPU here (nvidia-smi not found): the gpu session needs CUDA")
    uv = _uv(session)
    work = ROOT / ".nox" / "cells" / "gpu"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    venv = work / "venv"
    python = str(venv / "bin" / "python")
    constraints = work / "constraints.txt"
    constraints.write_text(f"{TORCH}\nlightning==2.6.6\naccelerate==1.15.0\n")
    # No find-links: a local CPU wheel of the same version would win over the CUDA build.
    env = {"UV_CONSTRAINT": str(constraints), "UV_FIND_LINKS": "", "VIRTUAL_ENV": str(venv)}
    targets = [*GPU_SUITES, "gradaccum-conformance"]
    local_args: list[str] = []
    for name in _local_order(targets):
        local_args += ["-e", f"{LOCAL[name]}[test]"]
    try:
        session.run(uv, "venv", "-q", "--python", _python311(), str(venv), external=True)
        session.run(uv, "pip", "install", "--python", python, TORCH, *local_args,
                    external=True, env=env)  # fmt: skip
        probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
        if subprocess.run([python, "-c", probe], check=False).returncode == 3:
            session.skip(
                "torch.cuda.is_available() is False with torch's CUDA build: no usable GPU"
            )
        where = "import torch; print(torch.__version__, torch.cuda.get_device_name())"
        session.run(python, "-c", where, external=True)
        for name in GPU_SUITES:
            tests = f"{LOCAL[name]}/tests"
            args = [tests, "-p", "no:cacheprovider", *GPU_PYTEST_ARGS, *session.posargs]
            session.run(python, "-m", "pytest", *args, external=True, env=_activated(venv))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@nox.session(python="3.11", default=False)
def fuzz(session: nox.Session) -> None:
    """The property-based fuzz tests (`-k fuzz`) with 10,000 examples each.

    The core's, then gradaccum-torch's; the default runs use the tests' own small number."""
    _install_torch(session)
    # the conformance plugin too: gradaccum-torch's tests import it at collection
    _install_local(session, "gradaccum", "gradaccum-torch", "gradaccum-conformance")
    session.env["GRADACCUM_FUZZ_EXAMPLES"] = "10000"
    # No test matching -k fuzz is a failure (pytest's exit code 5), not a pass.
    session.run("pytest", "packages/gradaccum/tests", "-k", "fuzz", *session.posargs)
    session.run("pytest", "packages/gradaccum-torch/tests", "-k", "fuzz", *session.posargs)
