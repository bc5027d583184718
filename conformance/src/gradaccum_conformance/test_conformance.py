"""Entry for ``pytest --pyargs gradaccum_conformance --gradaccum-harness=pkg.mod:Cls``.

Without ``--gradaccum-harness`` every test here is skipped with that reason.
"""

from __future__ import annotations

import pytest

from gradaccum_conformance.harness import Harness
from gradaccum_conformance.suite import ConformanceSuite


class TestConformance(ConformanceSuite):
    """The suite against the harness named on the command line."""

    @pytest.fixture
    def harness(self, gradaccum_cli_harness: Harness) -> Harness:
        return gradaccum_cli_harness
