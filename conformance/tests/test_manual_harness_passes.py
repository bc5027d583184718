"""The suite, run directly against the hand-written reference loop — the
way gradaccum's own adapters use it (subclass + ``harness`` fixture)."""

from __future__ import annotations

import pytest
from manual_harness import ManualHarness

from gradaccum_conformance import ConformanceSuite, Harness


class TestManualHarness(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> Harness:
        return ManualHarness()
