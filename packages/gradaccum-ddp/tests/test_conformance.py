"""The conformance suite against gradaccum-ddp: every scenario through DDPAccumulator on
real gloo process groups (world size 1 in this process, world size 2 on two spawned
processes), and a meta-test: a DDP loop that all-reduces every microbatch must fail."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch.nn.parallel import DistributedDataParallel

from gradaccum_conformance import BrokenPromiseError, Conformance, ConformanceSuite, Harness
from gradaccum_conformance.promises import PROMISES
from gradaccum_ddp.distributed import DDPDistributed
from gradaccum_ddp.harness import DDPHarness
from gradaccum_torch import Accumulator


class TestDDPAdapter(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> Harness:
        return DDPHarness()


class _SyncEveryMicrobatch(DDPDistributed):
    """Broken on purpose: never enters no_sync, so DDP all-reduces every backward."""

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


class _SyncEveryMicrobatchAccumulator(Accumulator):
    """An adapter built on the public contract with the broken distributed side."""

    def __init__(self, ddp: DistributedDataParallel, optimizer: Any, **kwargs: Any) -> None:
        self.broken = _SyncEveryMicrobatch(ddp)
        super().__init__(ddp, optimizer, distributed=self.broken, **kwargs)

    def add_reduction_observer(self, observer: Callable[[str], None]) -> None:
        self.broken.add_reduction_observer(observer)

    def save(self, path: Any, **kwargs: Any) -> None:
        raise AssertionError("the distributed scenarios take no checkpoint")


class SyncEveryMicrobatchHarness(DDPHarness):
    name = "gradaccum-ddp-sync-every-microbatch"

    def accumulator(self, ddp: DistributedDataParallel, optimizer: Any, **kwargs: Any) -> Any:
        return _SyncEveryMicrobatchAccumulator(ddp, optimizer, **kwargs)


@pytest.mark.parametrize("scenario", ["distributed_items", "distributed_mean"])
def test_meta_syncing_every_microbatch_fails_the_suite(tmp_path: Path, scenario: str) -> None:
    """The same check as the suite's test_distributed_*: the parameters are still exact
    (a sum of averages is an average of sums), so only the reduction count catches it."""
    conformance = Conformance(SyncEveryMicrobatchHarness(), "float64", "cpu", tmp_path, ("ACC-D1",))
    with pytest.raises(BrokenPromiseError, match="reductions per window"):
        conformance.check(scenario)
    assert "ACC-D1" in PROMISES
