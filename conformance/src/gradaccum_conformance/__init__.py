"""gradaccum-conformance: the shared suite every gradaccum adapter must pass.

An adapter provides a `Harness` that runs a `Scenario` through
its public API and returns a `Trajectory`; the suite compares it with
a float64 large-batch reference it computes itself. Two ways in::

    # 1. subclass the suite (how gradaccum's own adapters do it)
    class TestMyAdapter(ConformanceSuite):
        @pytest.fixture
        def harness(self) -> Harness:
            return MyHarness()

    # 2. point the installed plugin at a harness
    pytest --pyargs gradaccum_conformance --gradaccum-harness=mypkg.mod:MyHarness
"""

from __future__ import annotations

from gradaccum_conformance.compare import (
    LR_TOLERANCE,
    TOLERANCES,
    BrokenPromiseError,
    assert_trajectory,
    deviation,
)
from gradaccum_conformance.harness import (
    CHECKPOINT_IO,
    CheckpointPlan,
    Harness,
    MicrobatchRecord,
    Outcome,
    PlannedRun,
    Trajectory,
    TrajectoryRecorder,
    load_harness,
    snapshot_params,
)
from gradaccum_conformance.probes import (
    HeldMemory,
    HostReadCounter,
    HostReads,
    MemoryProbe,
    MicrobatchProbes,
)
from gradaccum_conformance.promises import CAPABILITIES, PROMISES
from gradaccum_conformance.reference import (
    ReferenceRun,
    plain_loop_trajectory,
    plan_windows,
    run_reference,
)
from gradaccum_conformance.scenario import (
    PRECISIONS,
    AmpMode,
    LossReduction,
    Microbatch,
    MicrobatchView,
    ModelSpec,
    OptimizerSpec,
    PassLength,
    Precision,
    Probe,
    ScalerSpec,
    Scenario,
    SchedulerSpec,
    Shard,
    make_passes,
)
from gradaccum_conformance.scenarios import SCENARIOS, build_scenario
from gradaccum_conformance.suite import Conformance, ConformanceSuite, promises, requires

__version__ = "0.1.0"

__all__ = [
    "CAPABILITIES",
    "CHECKPOINT_IO",
    "LR_TOLERANCE",
    "PRECISIONS",
    "PROMISES",
    "SCENARIOS",
    "TOLERANCES",
    "AmpMode",
    "BrokenPromiseError",
    "CheckpointPlan",
    "Conformance",
    "ConformanceSuite",
    "Harness",
    "HeldMemory",
    "HostReadCounter",
    "HostReads",
    "LossReduction",
    "MemoryProbe",
    "Microbatch",
    "MicrobatchProbes",
    "MicrobatchRecord",
    "MicrobatchView",
    "ModelSpec",
    "OptimizerSpec",
    "Outcome",
    "PassLength",
    "PlannedRun",
    "Precision",
    "Probe",
    "ReferenceRun",
    "ScalerSpec",
    "Scenario",
    "SchedulerSpec",
    "Shard",
    "Trajectory",
    "TrajectoryRecorder",
    "__version__",
    "assert_trajectory",
    "build_scenario",
    "deviation",
    "load_harness",
    "make_passes",
    "plain_loop_trajectory",
    "plan_windows",
    "promises",
    "requires",
    "run_reference",
    "snapshot_params",
]
