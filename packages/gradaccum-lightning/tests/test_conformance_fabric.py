"""The conformance suite against `FabricAccumulator`: every scenario through a real
``lightning.Fabric``, ``fabric.setup`` and the adapter's public API (world size 1 in this
process on Fabric's single-device strategy, world size 2 on two spawned gloo ranks under
``strategy="ddp"`` with a torchrun environment); and a meta-test: the harness catches an
adapter whose distributed side never enters ``fabric.no_backward_sync``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from lightning.fabric import Fabric
from lightning.fabric.wrappers import _FabricModule

from gradaccum_conformance import BrokenPromiseError, Conformance, ConformanceSuite, Harness
from gradaccum_lightning import FabricAccumulator
from gradaccum_lightning.fabric_harness import FabricHarness


class TestFabricAdapter(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> Harness:
        return FabricHarness()


class SyncEveryMicrobatchHarness(FabricHarness):
    """Broken on purpose: the distributed side never enters ``fabric.no_backward_sync``,
    so DDP all-reduces every backward."""

    name = "gradaccum-lightning-fabric-sync-every-microbatch"

    def accumulator(
        self, fabric: Fabric, model: _FabricModule, optimizer: Any, **kwargs: Any
    ) -> FabricAccumulator:
        acc = FabricAccumulator(fabric, model, optimizer, **kwargs)
        acc.distributed.no_sync = lambda sync: contextlib.nullcontext()  # type: ignore[method-assign]
        return acc


def test_meta_syncing_every_microbatch_fails_the_suite(tmp_path: Path) -> None:
    """ACC-D1: the parameters stay exact (a sum of averages is an average of sums), so only
    the harness's reduction count (ReductionCounter on the DDP inside the _FabricModule)
    can catch an adapter that all-reduces every microbatch."""
    conformance = Conformance(SyncEveryMicrobatchHarness(), "float64", "cpu", tmp_path, ("ACC-D1",))
    with pytest.raises(BrokenPromiseError, match="reductions per window"):
        conformance.check("distributed_mean")
