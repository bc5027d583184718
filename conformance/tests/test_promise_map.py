"""spec/promises.md maps every spec promise to the tests that prove it; this file holds it to that.

The map is one Markdown table row per promise ID of ``spec/accumulation.md``,
``spec/checkpoint-v1.md``, ``spec/checkpoint-v2.md`` and ``spec/checkpoint-v3.md``, in spec
order:
``| ID | Promise | Scope | Proved by |``. The last cell names tests as backticked
``path::test_name`` (``path::Class::method`` for a method; ``suite.py::test_name`` for a
test of ``ConformanceSuite`` in ``conformance/src/gradaccum_conformance/suite.py``) and, for a
promise the conformance suite does not check, a note ``Not checked by the suite: <reason>``.

`check_map` reads the test files with `ast` (nothing is imported) and reports, naming the ID and
the fix: a spec ID without a row, a row whose ID the spec does not have, a duplicate or
misplaced row, a test file or test function that does not exist, a test that does not cite the
ID (in its docstring, its ``@promises(...)`` mark or its parametrize ids; a suite test in its
``@promises`` mark), a row with neither a test nor a reason, a row without a suite test and
without the note, or with both. `check_suite_marks` checks the map against the suite's own table
(``PROMISES``, the ``@promises`` marks); `check_counts` checks the counts the READMEs quote.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAP = "spec/promises.md"
SPECS = (
    "spec/accumulation.md",
    "spec/checkpoint-v1.md",
    "spec/checkpoint-v2.md",
    "spec/checkpoint-v3.md",
)
SUITE_FILE = "conformance/src/gradaccum_conformance/suite.py"
SUITE_CLASS = "ConformanceSuite"
SUITE_ALIAS = "suite.py"
SCOPES = ("adapter", "core")
COUNTED_IN = ("spec/promises.md", "README.md", "conformance/README.md")

ID_RE = re.compile(r"^(?:ACC-[A-Z][0-9]+|CKPT-[0-9]+)$")
REF_RE = re.compile(r"`([^`\s]+\.py::[^`\s]+)`")
NOTE_RE = re.compile(r"not checked by the suite:(.*)", re.IGNORECASE | re.DOTALL)
SEPARATOR_RE = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")


def spec_ids(root: Path = ROOT) -> list[str]:
    """Every promise ID of the spec files, in spec order (format 1's CKPT IDs, then format 2's
    and format 3's)."""
    accumulation = (root / SPECS[0]).read_text(encoding="utf-8")
    checkpoint = "\n".join((root / spec).read_text(encoding="utf-8") for spec in SPECS[1:])
    return re.findall(r"^- \*\*(ACC-[A-Z][0-9]+)\*\*", accumulation, re.MULTILINE) + re.findall(
        r"^### (CKPT-[0-9]+)\b", checkpoint, re.MULTILINE
    )


def mentions(text: str, pid: str) -> bool:
    """``text`` names ``pid`` itself (``ACC-N1`` is not in ``ACC-N10`` or ``XACC-N1``)."""
    return re.search(rf"(?<![\w-]){re.escape(pid)}(?![0-9])", text) is not None


@dataclass(frozen=True)
class Row:
    """One row of the map."""

    line: int
    pid: str
    promise: str
    scope: str
    refs: tuple[str, ...]
    note: str | None  # the reason after "Not checked by the suite:", or None


def parse_map(text: str) -> tuple[list[Row], list[str]]:
    """The rows of every table in ``text``, and the problems with its shape."""
    rows: list[Row] = []
    problems: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.startswith("|") or SEPARATOR_RE.match(line):
            continue
        if number < len(lines) and SEPARATOR_RE.match(lines[number]):
            continue  # a header
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        pid = cells[0].strip("*` ")
        if len(cells) != 4:
            problems.append(
                f"{MAP} line {number} ({pid}): a row has 4 cells (ID | Promise | Scope | "
                f"Proved by), this one has {len(cells)}; a '|' inside a cell breaks the row"
            )
            continue
        note = NOTE_RE.search(cells[3])
        rows.append(
            Row(
                line=number,
                pid=pid,
                promise=cells[1],
                scope=cells[2].strip("`* "),
                refs=tuple(REF_RE.findall(cells[3])),
                note=None if note is None else note.group(1).strip(),
            )
        )
    return rows, problems


@dataclass(frozen=True)
class FoundTest:
    """A test function found in a file: where, and the text that may cite IDs."""

    path: str  # relative to the root
    qualname: str  # "test_x" or "Class::test_x"
    citing_text: str  # the docstring, the @promises IDs, the parametrize ids
    promise_marks: tuple[str, ...]  # the @promises(...) IDs alone


def _call_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute):
        return target.attr
    return target.id if isinstance(target, ast.Name) else ""


def _strings(node: ast.AST | None) -> list[str]:
    """The string constants in ``node`` (a list or tuple of ids, the arguments of a mark)."""
    if node is None:
        return []
    return [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def _parametrize_ids(call: ast.Call) -> list[str]:
    ids: list[str] = []
    for keyword in call.keywords:
        if keyword.arg == "ids":
            ids += _strings(keyword.value)
    for arg in call.args[1:]:  # pytest.param(..., id="...") in the values
        for node in ast.walk(arg):
            if isinstance(node, ast.Call) and _call_name(node) == "param":
                ids += [s for k in node.keywords if k.arg == "id" for s in _strings(k.value)]
    return ids


def _describe(path: str, qualname: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> FoundTest:
    marks: list[str] = []
    ids: list[str] = []
    for decorator in fn.decorator_list:
        if not isinstance(decorator, ast.Call):
            continue
        name = _call_name(decorator)
        if name == "promises" or name == "gradaccum_promise":
            marks += [s for arg in decorator.args for s in _strings(arg)]
        elif name == "parametrize":
            ids += _parametrize_ids(decorator)
    text = "\n".join([ast.get_docstring(fn) or "", *marks, *ids])
    return FoundTest(path, qualname, text, tuple(marks))


@cache
def functions_in(root: Path, path: str) -> Mapping[str, FoundTest] | None:
    """``{qualname: FoundTest}`` for the test functions of a file; None if it does not exist."""
    file = root / path
    if not file.is_file():
        return None
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    found: dict[str, FoundTest] = {}
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions):
            found[node.name] = _describe(path, node.name, node)
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, functions):
                    name = f"{node.name}::{member.name}"
                    found[name] = _describe(path, name, member)
    return found


def resolve(ref: str) -> tuple[str, str]:
    """``"suite.py::test_x[p]"`` -> ``(SUITE_FILE, "ConformanceSuite::test_x")``."""
    path, _, qualname = ref.partition("::")
    qualname = re.sub(r"\[.*\]$", "", qualname)
    if path == SUITE_ALIAS:
        return SUITE_FILE, qualname if "::" in qualname else f"{SUITE_CLASS}::{qualname}"
    return path, qualname


def is_suite(ref: str) -> bool:
    return resolve(ref)[0] == SUITE_FILE


def check_map(text: str, root: Path = ROOT) -> list[str]:
    """Every problem with the map ``text``, each naming the ID and the fix."""
    rows, problems = parse_map(text)
    ids = spec_ids(root)
    known = set(ids)
    seen: dict[str, Row] = {}
    for row in rows:
        if not ID_RE.match(row.pid):
            problems.append(
                f"{MAP} line {row.line}: the first cell {row.pid!r} is not a promise ID "
                f"(ACC-<topic><n> or CKPT-<n>)"
            )
            continue
        if row.pid not in known:
            problems.append(
                f"{row.pid} ({MAP} line {row.line}) is not in the spec ({', '.join(SPECS)}): "
                f"fix the ID or remove the row"
            )
            continue
        if row.pid in seen:
            problems.append(
                f"{row.pid}: two rows (lines {seen[row.pid].line} and {row.line}); keep one"
            )
            continue
        seen[row.pid] = row
        problems += _check_row(row, root)
    for pid in ids:
        if pid not in seen:
            problems.append(
                f"{pid}: no row in {MAP}; add '| {pid} | <the promise in one line> | "
                f"adapter or core | <`path::test` citing {pid}, or 'Not checked by the suite: "
                f"<reason>' and the tests that prove it> |' in spec order"
            )
    order = [pid for pid in ids if pid in seen]
    listed = [row.pid for row in sorted(seen.values(), key=lambda r: r.line)]
    for want, got in zip(order, listed, strict=True):
        if want != got:
            problems.append(
                f"{got} ({MAP} line {seen[got].line}) is out of spec order: {want} comes "
                f"first; order the rows as the spec lists the promises"
            )
            break
    return problems


def _check_row(row: Row, root: Path) -> list[str]:
    problems: list[str] = []
    where = f"{row.pid} ({MAP} line {row.line})"
    if row.scope not in SCOPES:
        problems.append(f"{where}: scope {row.scope!r} is not one of {', '.join(SCOPES)}")
    for ref in row.refs:
        path, qualname = resolve(ref)
        tests = functions_in(root, path)
        if tests is None:
            problems.append(
                f"{where}: test file {path} (from `{ref}`) does not exist; fix the path"
            )
            continue
        test = tests.get(qualname)
        if test is None or not qualname.split("::")[-1].startswith("test"):
            problems.append(
                f"{where}: {path} has no test {qualname} (from `{ref}`); fix the name "
                f"(Class::method for a method)"
            )
            continue
        if is_suite(ref):
            if row.pid not in test.promise_marks:
                problems.append(
                    f"{where}: the suite's {qualname.split('::')[-1]} does not carry {row.pid} "
                    f"in its @promises(...) mark, so the suite does not check it there; name "
                    f"a suite test that does, or move the promise to the core's or the "
                    f"adapters' tests with a 'Not checked by the suite' reason"
                )
        elif not mentions(test.citing_text, row.pid):
            problems.append(
                f"{where}: {path}::{qualname} does not cite {row.pid} in its docstring, "
                f"@promises mark or parametrize ids; add the ID to its docstring if it proves "
                f"the promise, or name a test that does"
            )
    suite = any(is_suite(ref) for ref in row.refs)
    note = row.note is not None and len(row.note.strip(" .*_")) >= 10
    if not row.refs and not note:
        problems.append(
            f"{where}: names neither a test nor a reason; name the test(s) that prove it "
            f"(`path::test_name`), or write 'Not checked by the suite: <reason>'"
        )
    elif not suite and not note:
        problems.append(
            f"{where}: names no conformance-suite test and gives no reason; add 'Not checked "
            f"by the suite: <why the suite cannot or need not check it>'"
        )
    elif suite and row.note is not None:
        problems.append(
            f"{where}: names a suite test and also says 'Not checked by the suite'; keep one"
        )
    if suite and row.scope != "adapter":
        problems.append(
            f"{where}: the suite checks adapters, so a promise it checks has scope 'adapter', "
            f"not {row.scope!r}"
        )
    return problems


def check_suite_marks(
    rows: Iterable[Row], promises: Iterable[str], marks: Mapping[str, Sequence[str]]
) -> list[str]:
    """The map lists, for each ID, every suite test whose @promises mark names it.

    ``promises`` is the suite's ``PROMISES`` table; ``marks`` is ``{test name: IDs}``
    (``suite_tests()``).
    """
    by_id = {row.pid: row for row in rows}
    problems: list[str] = []
    for pid in promises:
        row = by_id.get(pid)
        if row is None:
            problems.append(f"{pid} is in the suite's PROMISES but has no row in {MAP}; add one")
        elif not any(is_suite(ref) for ref in row.refs):
            problems.append(
                f"{pid} is in the suite's PROMISES but its row in {MAP} names no suite test; "
                f"name the suite tests marked @promises({pid!r})"
            )
    for test, ids in sorted(marks.items()):
        for pid in ids:
            row = by_id.get(pid)
            listed = row is not None and (SUITE_FILE, f"{SUITE_CLASS}::{test}") in {
                resolve(ref) for ref in row.refs
            }
            if row is not None and not listed:
                problems.append(
                    f"{pid}: the suite's {test} checks it (@promises) but its row in {MAP} "
                    f"does not list `{SUITE_ALIAS}::{test}`; add it"
                )
    return problems


@dataclass(frozen=True)
class Counts:
    total: int
    suite: int  # rows with a suite test
    adapter: int  # rows an adapter can break (scope adapter)

    @property
    def phrase(self) -> str:
        return f"{self.suite} of the {self.adapter} promises an adapter can break"


def counts(rows: Sequence[Row]) -> Counts:
    return Counts(
        total=len(rows),
        suite=sum(1 for row in rows if any(is_suite(ref) for ref in row.refs)),
        adapter=sum(1 for row in rows if row.scope == "adapter"),
    )


def check_counts(texts: Mapping[str, str], found: Counts) -> list[str]:
    """Each text quotes the map's counts: "<suite> of the <adapter> promises an adapter can
    break" (and the map, "<total> promises")."""
    problems: list[str] = []
    for name, text in texts.items():
        flat = " ".join(text.replace("*", "").split())
        wanted = [found.phrase] + ([f"{found.total} promises"] if name == MAP else [])
        for phrase in wanted:
            if phrase not in flat:
                problems.append(
                    f"{name} does not say '{phrase}', the counts of {MAP}; update its numbers"
                )
    return problems


def _map_text() -> str:
    return (ROOT / MAP).read_text(encoding="utf-8")


def _fail(problems: list[str]) -> None:
    if problems:
        pytest.fail(
            f"{len(problems)} problem(s) with the promise map:\n" + "\n".join(problems),
            pytrace=False,
        )


def test_every_promise_is_mapped_to_tests_that_cite_it() -> None:
    """Every spec ID has a row; every row names existing tests that cite it, or a reason."""
    _fail(check_map(_map_text()))


def test_the_suites_promises_appear_with_their_tests() -> None:
    """Every ID of the suite's PROMISES table, with every suite test marked with it."""
    from gradaccum_conformance import PROMISES
    from gradaccum_conformance.suite import suite_tests

    rows, _ = parse_map(_map_text())
    _fail(check_suite_marks(rows, PROMISES, suite_tests()))


def test_the_readmes_quote_the_maps_counts() -> None:
    rows, _ = parse_map(_map_text())
    texts = {name: (ROOT / name).read_text(encoding="utf-8") for name in COUNTED_IN}
    _fail(check_counts(texts, counts(rows)))


# -- the checks have teeth: broken copies of the map are reported -----------------------------


def _row_of(text: str, pid: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"| {pid} |")]
    return line


def _drop_row(pid: str) -> str:
    text = _map_text()
    return text.replace(_row_of(text, pid) + "\n", "")


def _edit_row(pid: str, old: str, new: str) -> str:
    text = _map_text()
    row = _row_of(text, pid)
    assert old in row, f"the meta-test expects {old!r} in the row of {pid}"
    return text.replace(row, row.replace(old, new))


def _last_cell(pid: str, cell: str) -> str:
    text = _map_text()
    row = _row_of(text, pid)
    return text.replace(row, row[: row.rindex("|", 0, len(row) - 1)] + f"| {cell} |")


BROKEN: dict[str, tuple[Callable[[], str], list[str]]] = {
    "a spec ID without a row": (lambda: _drop_row("ACC-W4"), ["ACC-W4: no row"]),
    "a checkpoint ID without a row": (lambda: _drop_row("CKPT-19"), ["CKPT-19: no row"]),
    "an ID the spec does not have": (
        lambda: _edit_row("ACC-W6", "| ACC-W6 |", "| ACC-W99 |"),
        ["ACC-W99", "is not in the spec", "ACC-W6: no row"],
    ),
    "a duplicate row": (
        lambda: _map_text().replace(
            _row_of(_map_text(), "ACC-K1"),
            _row_of(_map_text(), "ACC-K1") + "\n" + _row_of(_map_text(), "ACC-K1"),
        ),
        ["ACC-K1: two rows"],
    ),
    "rows out of spec order": (
        lambda: _drop_row("ACC-S4").replace(
            _row_of(_map_text(), "ACC-S1"),
            _row_of(_map_text(), "ACC-S4") + "\n" + _row_of(_map_text(), "ACC-S1"),
        ),
        ["out of spec order"],
    ),
    "a test file that does not exist": (
        lambda: _edit_row("ACC-S4", "tests/test_lr.py::test_linear_rule", "tests/test_lrr.py::t"),
        ["ACC-S4", "test_lrr.py", "does not exist"],
    ),
    "a test function that does not exist": (
        lambda: _edit_row("ACC-S4", "test_lr.py::test_sqrt_rule", "test_lr.py::test_sqrt_rul"),
        ["ACC-S4", "has no test test_sqrt_rul"],
    ),
    "a suite test that does not exist": (
        lambda: _edit_row("ACC-N4", "suite.py::test_sum_normalization", "suite.py::test_sum"),
        ["ACC-N4", "has no test ConformanceSuite::test_sum"],
    ),
    "a test that does not cite the ID": (
        lambda: _edit_row(
            "ACC-S4", "test_lr.py::test_linear_rule", "test_lr.py::test_mark_last_one"
        ),
        ["ACC-S4", "test_lr.py::test_mark_last_one does not cite ACC-S4"],
    ),
    "a suite test not marked with the ID": (
        lambda: _edit_row(
            "ACC-N4", "suite.py::test_sum_normalization", "suite.py::test_clip_per_microbatch[sum]"
        ),
        ["ACC-N4", "does not carry ACC-N4 in its @promises"],
    ),
    "neither a test nor a reason": (lambda: _last_cell("ACC-G4", ""), ["ACC-G4", "neither"]),
    "a test but no suite test and no reason": (
        lambda: _last_cell(
            "ACC-G4", "`packages/gradaccum/tests/test_policies.py::test_bad_weights`"
        ),
        ["ACC-G4", "no conformance-suite test and gives no reason"],
    ),
    "a suite test and a reason": (
        lambda: _last_cell(
            "ACC-N4", "`suite.py::test_sum_normalization`<br>Not checked by the suite: it is."
        ),
        ["ACC-N4", "keep one"],
    ),
    "a reason too short to be one": (
        lambda: _last_cell("ACC-G4", "Not checked by the suite: ."),
        ["ACC-G4", "neither"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_map_is_reported(case: str) -> None:
    """The checker names the ID and the problem in a deliberately broken copy of the map."""
    broken, expected = BROKEN[case]
    problems = check_map(broken())
    assert problems, f"{case}: the checker found nothing"
    report = "\n".join(problems)
    for needle in expected:
        assert needle in report, f"{case}: {needle!r} not in\n{report}"


def test_class_methods_and_parametrize_ids_are_resolved(tmp_path: Path) -> None:
    """``path::Class::method`` resolves to the method, ``name[param]`` to the function, and an
    ID in a parametrize id counts as a citation."""
    for spec in SPECS:
        (tmp_path / spec).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / spec).write_text((ROOT / spec).read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "t").mkdir()
    (tmp_path / "t/test_x.py").write_text(
        "import pytest\n"
        "class TestA:\n"
        "    def test_m(self):\n"
        '        """ACC-W1: a method."""\n'
        '@pytest.mark.parametrize("x", [1, 2], ids=["ACC-W4", "other"])\n'
        "def test_p(x):\n"
        "    pass\n"
        "def test_n():\n"
        '    """ACC-W10 is not ACC-W1."""\n',
        encoding="utf-8",
    )
    rows = {
        "ACC-W1": "`t/test_x.py::TestA::test_m`",
        "ACC-W4": "`t/test_x.py::test_p[ACC-W4]`",
        "ACC-W7": "`t/test_x.py::test_n`",
        "ACC-N1": "`t/test_x.py::test_m`",
    }
    table = "| ID | Promise | Scope | Proved by |\n| --- | --- | --- | --- |\n" + "".join(
        f"| {pid} | p | core | {cell}<br>Not checked by the suite: a reason given here. |\n"
        for pid, cell in rows.items()
    )
    report = "\n".join(check_map(table, tmp_path))
    assert "ACC-W1 (" not in report and "ACC-W4 (" not in report, report
    assert "t/test_x.py::test_n does not cite ACC-W7" in report
    assert "has no test test_m" in report  # a method needs its class


def test_the_suite_marks_and_counts_are_checked() -> None:
    rows, _ = parse_map(_map_text())
    marks = {"test_full_windows_equal_large_batch": ("ACC-W2", "ACC-W1")}
    problems = check_suite_marks(rows, ["ACC-W2", "ACC-S4"], marks)
    assert any("ACC-S4 is in the suite's PROMISES" in p for p in problems), problems
    assert any("ACC-W1: the suite's test_full_windows_equal_large_batch" in p for p in problems)
    assert not any(p.startswith("ACC-W2") for p in problems), problems
    found = counts(rows)
    wrong = {"README.md": f"the suite checks {found.suite - 1} of the {found.adapter} promises"}
    (problem,) = check_counts(wrong, found)
    assert "README.md" in problem and found.phrase in problem
