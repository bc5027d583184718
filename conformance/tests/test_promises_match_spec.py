"""Every promise the suite cites is a numbered promise of spec/accumulation.md."""

from __future__ import annotations

import re
from pathlib import Path

from gradaccum_conformance import PROMISES

SPEC = Path(__file__).resolve().parents[2] / "spec" / "accumulation.md"


def test_every_cited_promise_is_in_the_spec() -> None:
    numbered = set(re.findall(r"\*\*(ACC-[A-Z][0-9]+)\*\*", SPEC.read_text(encoding="utf-8")))
    assert len(numbered) > 40
    assert set(PROMISES) <= numbered, sorted(set(PROMISES) - numbered)
