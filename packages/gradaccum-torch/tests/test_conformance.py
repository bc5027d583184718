"""gradaccum-torch passes the shared conformance suite, through the same
public harness path a third-party adapter uses (float64, float32, bf16 and
fp16 on the CPU; CUDA when ``--gradaccum-device=cuda``)."""

from __future__ import annotations

import pytest

from gradaccum_conformance import ConformanceSuite, Harness
from gradaccum_torch.testing import TorchHarness


class TestTorchConformance(ConformanceSuite):
    """Every promise of spec/accumulation.md the suite checks."""

    @pytest.fixture
    def harness(self) -> Harness:
        return TorchHarness()
