"""The conformance suite against gradaccum-accelerate: every scenario through a real
``Accelerator(cpu=True)``, ``accelerator.prepare`` and the adapter's public API (world
size 1 in this process, world size 2 on two spawned processes in Accelerate's MULTI_CPU
environment over gloo); and meta-tests: the harness catches an adapter whose checkpoint
hooks are off (plain Accelerate's ``save_state``) and one that all-reduces every
microbatch."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from accelerate import Accelerator

from gradaccum_accelerate import Accumulator
from gradaccum_accelerate.harness import AccelerateHarness
from gradaccum_conformance import BrokenPromiseError, Conformance, ConformanceSuite, Harness


class TestAccelerateAdapter(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> Harness:
        return AccelerateHarness()


class NoCheckpointHooksHarness(AccelerateHarness):
    """``checkpoint_hooks=False``: ``save_state`` is plain Accelerate's, without gradients."""

    name = "gradaccum-accelerate-no-checkpoint-hooks"

    def accumulator(
        self, accelerator: Accelerator, model: Any, optimizer: Any, **kwargs: Any
    ) -> Accumulator:
        return Accumulator(accelerator, model, optimizer, checkpoint_hooks=False, **kwargs)


class SyncEveryMicrobatchHarness(AccelerateHarness):
    """Broken on purpose: the adapter's distributed side never enters
    ``accelerator.no_sync``, so DDP all-reduces every backward."""

    name = "gradaccum-accelerate-sync-every-microbatch"

    def accumulator(
        self, accelerator: Accelerator, model: Any, optimizer: Any, **kwargs: Any
    ) -> Accumulator:
        acc = Accumulator(accelerator, model, optimizer, **kwargs)
        acc.distributed.no_sync = lambda sync: contextlib.nullcontext()  # type: ignore[method-assign]
        return acc


def test_meta_save_state_without_the_hooks_fails_resume_mid_window(tmp_path: Path) -> None:
    """ACC-R2: the harness resumes through ``save_state``/``load_state``, so without the
    adapter's pre-hooks (the in-flight gradients and the window's position) it fails."""
    conformance = Conformance(NoCheckpointHooksHarness(), "float64", "cpu", tmp_path, ("ACC-R2",))
    with pytest.raises(BrokenPromiseError):
        conformance.check("checkpoint_mid_window")


def test_meta_syncing_every_microbatch_fails_the_suite(tmp_path: Path) -> None:
    """ACC-D1: the parameters are still exact (a sum of averages is an average of sums), so
    only the reduction count through Accelerate's DDP model catches it."""
    conformance = Conformance(SyncEveryMicrobatchHarness(), "float64", "cpu", tmp_path, ("ACC-D1",))
    with pytest.raises(BrokenPromiseError, match="reductions per window"):
        conformance.check("distributed_items")
