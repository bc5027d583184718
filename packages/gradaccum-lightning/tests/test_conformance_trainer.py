"""The conformance suite against gradaccum-lightning's Trainer callback: every scenario through
a real ``Trainer.fit`` with ``GradAccum`` (world size 1 in this process, world size 2 on two
spawned processes with ``strategy="ddp"`` over gloo); and a meta-test: a callback whose state
is missing from Lightning's checkpoints fails the mid-window resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gradaccum.stats import AccumulationCallback
from gradaccum_conformance import (
    BrokenPromiseError,
    Conformance,
    ConformanceSuite,
    Harness,
    Scenario,
)
from gradaccum_lightning import GradAccum
from gradaccum_lightning.harness import LightningHarness


class TestLightningTrainer(ConformanceSuite):
    @pytest.fixture
    def harness(self) -> Harness:
        return LightningHarness()


class _NoCheckpointState(GradAccum):
    """Broken on purpose: Lightning checkpoints carry no GradAccum state (no in-flight
    gradients, no window position), as if the callback had no ``state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        return {}


class NoCheckpointStateHarness(LightningHarness):
    name = "gradaccum-lightning-no-checkpoint-state"

    def callback(self, scenario: Scenario, listener: AccumulationCallback) -> GradAccum:
        return _NoCheckpointState(config=scenario.config, model_attr="model", listeners=[listener])


def test_meta_a_checkpoint_without_the_window_fails_resume_mid_window(tmp_path: Path) -> None:
    """ACC-R2: the harness resumes through ``trainer.save_checkpoint`` and
    ``fit(ckpt_path=...)``, so a callback whose state is not in the checkpoint fails."""
    conformance = Conformance(NoCheckpointStateHarness(), "float64", "cpu", tmp_path, ("ACC-R2",))
    with pytest.raises(BrokenPromiseError):
        conformance.check("checkpoint_mid_window")
