"""Every check of the gradaccum monorepo. `nox` runs the default set; `nox -l` lists them all.

Torch rule: the only torch we ever install is the CPython 3.11 CPU wheel `torch==2.13.0`, so every
session that needs torch runs on 3.11 and installs torch first, pinned for the rest of the session
(any other torch would pull gigabytes of CUDA packages). Packages that depend on torch declare
`torch>=2.3`, which the pin satisfies.
"""

from __future__ import annotations

import re
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = False  # a Python you do not have is skipped, not failed
nox.options.sessions = ["lint", "typecheck", "core", "tests", "oldest", "conformance", "docs"]

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
CORE_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


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
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for dep in _local_requires(name, test=name in targets):
            visit(dep)
        ordered.append(name)

    for target in targets:
        visit(target)
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


OLDEST: dict[str, list[str]] = {
    "gradaccum-accelerate": ["accelerate==1.0.0"],
    # Lightning before 2.5 feeds one microbatch twice when a fit resumes from a checkpoint taken
    # mid-epoch (2.2.0 and 2.4.0 measured: a mid-window resume is then not exact).
    "gradaccum-lightning": ["lightning==2.5.0", "setuptools<81"],
}
"""The oldest framework release each adapter declares (its pyproject's lower bound), pinned."""

CHECK_VERSION = """
import importlib.metadata, sys
name, wanted = sys.argv[1:3]
found = importlib.metadata.version(name)
print(f"{name} {found}")
sys.exit(0 if found == wanted else f"{name} {found} installed, {wanted} wanted")
"""


@nox.session(python="3.11")
@nox.parametrize("package", list(OLDEST), ids=list(OLDEST))
def oldest(session: nox.Session, package: str) -> None:
    """An adapter's tests against the oldest framework release it declares."""
    _install_torch(session, *OLDEST[package])
    session.install(*OLDEST[package])
    _install_local(session, package, "gradaccum-conformance")
    for pin in OLDEST[package]:  # the resolver must not have moved the pin
        if "==" in pin:
            name, version = pin.split("==")
            session.run("python", "-c", CHECK_VERSION, name, version)
    session.run("pytest", f"{LOCAL[package]}/tests", *session.posargs)


@nox.session(python="3.11")
def conformance(session: nox.Session) -> None:
    """The conformance suite's own tests (meta-tests against planted bugs included)."""
    if "gradaccum-conformance" not in LOCAL or not (ROOT / "conformance/tests").is_dir():
        session.skip("conformance/ has no pyproject.toml or no tests/ yet: nothing to run")
    _install_torch(session)
    harnesses = [n for n in ("gradaccum-torch",) if n in LOCAL]
    _install_local(session, "gradaccum-conformance", *harnesses)
    session.run("pytest", "conformance/tests", *session.posargs)


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
