"""The conformance tests, as a base class adapters subclass.

::

    from gradaccum_conformance import ConformanceSuite

    class TestMyAdapter(ConformanceSuite):
        @pytest.fixture
        def harness(self) -> Harness:
            return MyHarness()

Every test cites the promises it checks (``@promises(...)``) and the optional
capabilities it needs (``@requires(...)``). A missing capability skips the
test with the reason ``harness X does not declare capability Y``; a test
named in ``harness.expected_failures`` is marked ``xfail(strict=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gradaccum import NonFiniteGradientError
from gradaccum_conformance.compare import TOLERANCES, BrokenPromiseError, assert_trajectory
from gradaccum_conformance.harness import Harness, MicrobatchRecord, Trajectory, check_harness
from gradaccum_conformance.promises import CAPABILITIES, PROMISES
from gradaccum_conformance.reference import ReferenceRun, plain_loop_trajectory, run_reference
from gradaccum_conformance.scenario import Precision, Probe, Scenario
from gradaccum_conformance.scenarios import build_scenario

__all__ = ["Conformance", "ConformanceSuite", "promises", "requires"]

PROMISE_MARK = "gradaccum_promise"
REQUIRES_MARK = "gradaccum_requires"
MISSING_CAPABILITY = "gradaccum_missing_capability"
HARNESS_PROPERTY = "gradaccum_harness"


def promises(*ids: str) -> pytest.MarkDecorator:
    """Mark a test with the spec promises it checks (IDs from ``PROMISES``)."""
    unknown = [i for i in ids if i not in PROMISES]
    if unknown:
        raise ValueError(f"unknown promise IDs {unknown}; add them to PROMISES")
    return pytest.mark.gradaccum_promise(*ids)


def requires(*capabilities: str) -> pytest.MarkDecorator:
    """Mark a test with the optional capabilities it needs."""
    unknown = [c for c in capabilities if c not in CAPABILITIES]
    if unknown:
        raise ValueError(f"unknown capabilities {unknown}; add them to CAPABILITIES")
    return pytest.mark.gradaccum_requires(*capabilities)


def _marked(node: pytest.Item, mark: str) -> tuple[str, ...]:
    return tuple(arg for m in node.iter_markers(mark) for arg in m.args)


class Conformance:
    """What a test needs: the harness, the precision and device, a fresh
    directory per run, and the checks. Obtained from the ``conformance``
    fixture (precision from ``--gradaccum-dtype``) or ``conformance_amp``
    (the test picks the precision)."""

    def __init__(
        self,
        harness: Harness,
        precision: Precision,
        device: str,
        workdir: Path,
        promise_ids: tuple[str, ...],
    ) -> None:
        self.harness = harness
        self.precision = precision
        self.device = device
        self.workdir = workdir
        self.promises = promise_ids
        self._runs = 0

    def scenario(self, name: str, precision: Precision | None = None) -> Scenario:
        """The catalogue scenario ``name`` at this test's precision and device."""
        return build_scenario(name, precision or self.precision, self.device)

    def run(self, scenario: Scenario) -> Trajectory:
        """Run the harness on ``scenario`` in a fresh directory."""
        self._runs += 1
        workdir = self.workdir / f"run{self._runs}-{scenario.name}-{scenario.precision}"
        workdir.mkdir(parents=True)
        trajectory = self.harness.run(scenario, workdir)
        if not isinstance(trajectory, Trajectory):
            raise TypeError(
                f"harness {self.harness.name!r}.run returned {type(trajectory).__name__}; "
                f"it must return a gradaccum_conformance.Trajectory"
            )
        return trajectory

    def compare(
        self,
        actual: Trajectory,
        expected: Trajectory,
        scenario: Scenario,
        *,
        tol: float | None = None,
        against: str = "the float64 large-batch reference",
    ) -> None:
        """Assert ``actual`` matches ``expected`` (see ``assert_trajectory``)."""
        assert_trajectory(
            actual,
            expected,
            tol=TOLERANCES[scenario.precision] if tol is None else tol,
            promises=self.promises,
            harness=self.harness.name,
            scenario=scenario,
            against=against,
        )

    def check(self, scenario: Scenario | str) -> ReferenceRun:
        """Run the harness and compare with the float64 reference.

        Under bf16 the harness's bf16 run is compared with its own float32
        run of the same scenario, which is itself compared with the reference.
        """
        if isinstance(scenario, str):
            scenario = self.scenario(scenario)
        reference = run_reference(scenario)
        if scenario.precision == "bf16":
            baseline_scenario = scenario.replace(precision="float32")
            baseline = self.run(baseline_scenario)
            self.compare(baseline, reference.trajectory, baseline_scenario)
            actual = self.run(scenario)
            self.compare(actual, baseline, scenario, against="the same harness's float32 run")
        else:
            actual = self.run(scenario)
            self.compare(actual, reference.trajectory, scenario)
        return reference

    def skip_under_fp16(self, why: str) -> None:
        """Skip (with ``why``) when the precision is fp16 with a GradScaler."""
        if self.precision == "fp16":
            pytest.skip(f"not applicable under fp16: {why}")

    def probe(self, name: str, probe: Probe) -> tuple[Scenario, list[MicrobatchRecord]]:
        """Run the catalogue scenario ``name`` with ``probe`` asked for; return
        the scenario and the harness's per-microbatch records, after checking
        that there is one per microbatch with the measurement in it."""
        scenario = self.scenario(name).replace(probes=(probe,))
        trajectory = self.run(scenario)
        records = list(trajectory.microbatches)
        where = f"harness {self.harness.name!r} declares capability 'probes', but on {name!r}"
        fix = (
            "record every microbatch with TrajectoryRecorder.microbatch "
            "(gradaccum_conformance.probes.MicrobatchProbes.record does it)"
        )
        if len(records) != scenario.total_microbatches:
            raise AssertionError(
                f"{where} it recorded {len(records)} microbatch(es) of "
                f"{scenario.total_microbatches}; {fix}"
            )
        boundaries = sum(r.boundary for r in records)
        if boundaries != len(trajectory.params):
            raise AssertionError(
                f"{where} it recorded {boundaries} boundary microbatch(es) for "
                f"{len(trajectory.params)} closed window(s); record boundary=True exactly "
                f"for the microbatches whose window closed"
            )
        missing = [
            i
            for i, r in enumerate(records)
            if (r.host_reads if probe == "host_reads" else r.extra_bytes) is None
            and (probe == "host_reads" or not r.boundary)
        ]
        if missing:
            raise AssertionError(f"{where} microbatches {missing} carry no {probe!r}; {fix}")
        _check_teeth(boundaries < len(records), "has microbatches that are not boundaries")
        return scenario, records

    def broken(self, promise: str, scenario: Scenario, what: str, lines: list[str]) -> None:
        """Raise `BrokenPromiseError` blaming ``promise``."""
        raise BrokenPromiseError(
            (promise,),
            f"  harness {self.harness.name!r}; {scenario.describe()}\n  {what}:\n"
            + "\n".join(f"    {line}" for line in lines),
        )


def _record_lines(records: list[tuple[int, MicrobatchRecord]], value: str) -> list[str]:
    lines: list[str] = []
    for index, record in records:
        kind = "boundary" if record.boundary else "not a boundary"
        lines.append(f"microbatch {index} ({kind}): {value.format(r=record)}")
        lines += [f"  {note}" for note in record.notes[:8]]
    return lines


PROBE_READS = [
    pytest.param("probe_mean", id="mean"),
    pytest.param("probe_items_device", id="items_device", marks=requires("device_items")),
    pytest.param("probe_clip_norm", id="clip_norm"),
    pytest.param("probe_distributed", id="distributed", marks=requires("distributed")),
]
PROBE_MEMORY = [
    pytest.param("probe_mean", id="mean"),
    pytest.param("probe_items_device", id="items_device", marks=requires("device_items")),
    pytest.param("probe_clip_norm", id="clip_norm"),
    pytest.param("probe_distributed", id="distributed", marks=requires("distributed")),
]


def _check_teeth(condition: bool, what: str) -> None:
    # A scenario that no longer exercises its feature would pass vacuously.
    if not condition:
        raise AssertionError(f"conformance suite bug: the scenario no longer {what}")


class ConformanceSuite:
    """The suite. Subclass it (the class name must start with ``Test``) and
    provide a ``harness`` fixture returning your `Harness`."""

    @pytest.fixture
    def harness(self) -> Harness:
        """Override in your subclass: return the harness under test."""
        raise NotImplementedError(
            "subclass ConformanceSuite and define a `harness` fixture returning your Harness, "
            "or run `pytest --pyargs gradaccum_conformance --gradaccum-harness=pkg.mod:Cls`"
        )

    @pytest.fixture(autouse=True)
    def _gradaccum_gate(
        self, request: pytest.FixtureRequest, harness: Harness, gradaccum_device: str
    ) -> None:
        """Skip on missing capabilities, apply expected failures, record the harness."""
        check_harness(harness)
        node = request.node
        node.user_properties.append((HARNESS_PROPERTY, harness.name))
        needed = list(_marked(node, REQUIRES_MARK))
        if gradaccum_device != "cpu":
            needed.append("cuda")
        if "gradaccum_precision" in request.fixturenames:
            precision = request.getfixturevalue("gradaccum_precision")
            needed += {"bf16": ["amp_bf16"], "fp16": ["amp_fp16"]}.get(precision, [])
        for capability in needed:
            if capability not in harness.capabilities:
                node.user_properties.append((MISSING_CAPABILITY, capability))
                pytest.skip(f"harness {harness.name} does not declare capability {capability}")
        if gradaccum_device != "cpu" and not torch.cuda.is_available():
            pytest.skip(f"--gradaccum-device={gradaccum_device} but CUDA is not available")
        unknown = [key for key in harness.expected_failures if not _names_a_test(key)]
        if unknown:
            raise TypeError(
                f"harness {harness.name!r} lists expected failures {unknown} that name no "
                f"conformance test"
            )
        for key in (node.name, getattr(node, "originalname", node.name)):
            if key in harness.expected_failures:
                reason = harness.expected_failures[key]
                node.add_marker(pytest.mark.xfail(reason=reason, strict=True))
                break

    @pytest.fixture
    def conformance(
        self,
        request: pytest.FixtureRequest,
        harness: Harness,
        gradaccum_precision: Precision,
        gradaccum_device: str,
        tmp_path: Path,
    ) -> Conformance:
        """The checks, at the precision from ``--gradaccum-dtype``."""
        return Conformance(
            harness,
            gradaccum_precision,
            gradaccum_device,
            tmp_path,
            _marked(request.node, PROMISE_MARK),
        )

    @pytest.fixture
    def conformance_amp(
        self,
        request: pytest.FixtureRequest,
        harness: Harness,
        gradaccum_device: str,
        tmp_path: Path,
    ) -> Conformance:
        """The checks for tests that choose their own precision."""
        return Conformance(
            harness, "float32", gradaccum_device, tmp_path, _marked(request.node, PROMISE_MARK)
        )

    # -- ACC-W: windows ---------------------------------------------------------
    @promises("ACC-W2", "ACC-N1", "ACC-S1", "ACC-C3")
    def test_full_windows_equal_large_batch(self, conformance: Conformance) -> None:
        """ACC-W2: three full windows of equal microbatches equal three large-batch steps."""
        conformance.check("equal_sgd")

    @promises("ACC-W3", "ACC-N1")
    def test_short_last_window_known_length(self, conformance: Conformance) -> None:
        """ACC-W3: with the pass length known, each pass's short last window
        (2 of 4) steps exactly as the large batch of its 2 microbatches."""
        conformance.check("short_last_known")

    @promises("ACC-W3", "ACC-N1")
    def test_short_last_window_last_only(self, conformance: Conformance) -> None:
        """ACC-W3: the same when the adapter learns only that a microbatch is
        the last of its pass (no prefetching)."""
        conformance.check("short_last_last_only")

    @requires("partial_drop")
    @promises("ACC-W5", "ACC-C2")
    def test_partial_window_drop(self, conformance: Conformance) -> None:
        """ACC-W5: the short window ending each pass is discarded, and its
        gradient does not leak into the next pass's first window."""
        reference = conformance.check("partial_drop")
        _check_teeth(reference.plan.dropped_windows == 2, "drops a window")

    @requires("partial_carry")
    @promises("ACC-W6")
    def test_partial_window_carry(self, conformance: Conformance) -> None:
        """ACC-W6: the window open at the end of pass 0 continues into pass 1
        and equals the large batch of its 4 microbatches from both passes."""
        conformance.check("partial_carry")

    @promises("ACC-N7")
    def test_single_step_is_plain_loop(self, conformance: Conformance) -> None:
        """ACC-N7: steps=1 is a plain loop; bitwise in float64 and float32."""
        scenario = conformance.scenario("steps1")
        reference = run_reference(scenario)
        plain = plain_loop_trajectory(scenario, reference.trajectory.stats)
        actual = conformance.run(scenario)
        exact = scenario.precision in ("float64", "float32")
        conformance.compare(
            actual,
            plain,
            scenario,
            tol=0.0 if exact else None,
            against=f"a plain loop without accumulation in {scenario.precision}"
            + (" (bitwise)" if exact else ""),
        )

    # -- ACC-S: steps and scheduler ------------------------------------------------
    @promises("ACC-S3", "ACC-W2")
    def test_scheduler_steps_once_per_window(self, conformance: Conformance) -> None:
        """ACC-S3: AdamW with weight decay and a per-step LambdaLR: the LR
        decays once per optimizer step, never per microbatch."""
        conformance.check("adamw_lambda")

    # -- ACC-N: normalization -------------------------------------------------------
    @promises("ACC-N2", "ACC-W3")
    def test_items_normalization_unequal_microbatches(self, conformance: Conformance) -> None:
        """ACC-N2: unequal microbatches (1..7 items) in items mode equal the
        large batch's item mean, short last window included."""
        conformance.check("items_unequal")

    @promises("ACC-N1", "ACC-W3")
    def test_mean_normalization_unequal_microbatches(self, conformance: Conformance) -> None:
        """ACC-N1: unequal microbatches in mean mode give the mean of the
        microbatch means (not the item mean), short last window included."""
        conformance.check("mean_unequal")

    @promises("ACC-N4")
    def test_sum_normalization(self, conformance: Conformance) -> None:
        """ACC-N4: sum mode adds microbatch gradients without any division."""
        conformance.check("sum")

    # -- ACC-L: clipping ---------------------------------------------------------------
    @promises("ACC-L1", "ACC-B1")
    def test_clip_norm_once_at_boundary(self, conformance: Conformance) -> None:
        """ACC-L1, ACC-B1: clipping by norm applies once to the normalized
        window gradient, not to each microbatch."""
        reference = conformance.check("clip_norm")
        _check_teeth(any(reference.clipped), "clips any window")

    @promises("ACC-L1", "ACC-B1")
    def test_clip_value_once_at_boundary(self, conformance: Conformance) -> None:
        """ACC-L1: clipping by value applies once to the window gradient."""
        reference = conformance.check("clip_value")
        _check_teeth(any(reference.clipped), "clips any window")

    @requires("per_microbatch_clip")
    @promises("ACC-L2")
    @pytest.mark.parametrize("normalization", ["sum", "mean", "items"])
    def test_clip_per_microbatch(self, conformance: Conformance, normalization: str) -> None:
        """ACC-L2: with per_microbatch=True each microbatch's own mean-loss
        gradient is clipped to max before it joins the window, which then
        combines the clipped gradients as its normalization says."""
        reference = conformance.check(f"clip_per_microbatch_{normalization}")
        _check_teeth(any(reference.clipped), "clips any microbatch")

    # -- ACC-G: weights ----------------------------------------------------------------
    @requires("weights")
    @promises("ACC-G2", "ACC-B1")
    def test_weights_by_name(self, conformance: Conformance) -> None:
        """ACC-G2, ACC-B1: name weights ('2.*' x0.5, '0.bias' x0) multiply the
        clipped window gradient once."""
        conformance.check("weights_by_name")

    @requires("weights")
    @promises("ACC-G1")
    def test_weights_by_group(self, conformance: Conformance) -> None:
        """ACC-G1: group weights (group 'head' x2, group 0 x0.5) multiply the
        window gradient of their groups' parameters once."""
        conformance.check("weights_by_group")

    # -- ACC-F: non-finite ---------------------------------------------------------------
    @promises("ACC-F1", "ACC-S3")
    def test_non_finite_skip(self, conformance: Conformance) -> None:
        """ACC-F1, ACC-S3: a NaN in window 1 skips its step and the scheduler;
        window 2 is normal."""
        conformance.skip_under_fp16("a non-finite gradient is an AMP overflow (ACC-F4)")
        conformance.check("non_finite_skip")

    @promises("ACC-F2")
    def test_non_finite_raise(self, conformance: Conformance) -> None:
        """ACC-F2: a NaN in window 1 raises NonFiniteGradientError from the run."""
        conformance.skip_under_fp16("a non-finite gradient is an AMP overflow (ACC-F4)")
        scenario = conformance.scenario("non_finite_raise")
        try:
            conformance.run(scenario)
        except NonFiniteGradientError:
            return
        raise BrokenPromiseError(
            conformance.promises,
            f"  harness {conformance.harness.name!r}; {scenario.describe()}\n"
            f"  the run finished without raising NonFiniteGradientError",
        )

    @requires("drop_microbatch")
    @promises("ACC-F3", "ACC-N1")
    def test_non_finite_drop_microbatch(self, conformance: Conformance) -> None:
        """ACC-F3: the NaN microbatch is left out; window 1 is the mean of
        its other three microbatches."""
        conformance.skip_under_fp16("a non-finite gradient is an AMP overflow (ACC-F4)")
        reference = conformance.check("non_finite_drop")
        _check_teeth(reference.dropped_microbatches == [5], "drops microbatch 5")

    # -- ACC-C: counters --------------------------------------------------------------------
    @promises("ACC-C3", "ACC-C2", "ACC-N2")
    def test_counters_and_stats(self, conformance: Conformance) -> None:
        """ACC-C3, ACC-C2: two passes of 7 microbatches in windows of 3, one
        skipped: micro_steps 14, optimizer_steps 5, skipped_steps 1, epoch 2,
        items_total of the stepped windows."""
        conformance.skip_under_fp16("a non-finite gradient is an AMP overflow (ACC-F4)")
        reference = conformance.check("counters")
        _check_teeth(reference.trajectory.skipped_steps == 1, "skips one window")

    # -- ACC-K: schedules ------------------------------------------------------------------
    @requires("schedules")
    @promises("ACC-K2")
    def test_schedule_by_epoch(self, conformance: Conformance) -> None:
        """ACC-K2: ByEpoch({0: 2, 1: 3}) gives windows 2, 2, 2 then 3, 3."""
        reference = conformance.check("by_epoch")
        _check_teeth(
            [len(w) for w in reference.plan.windows] == [2, 2, 2, 3, 3], "follows the table"
        )

    @requires("schedules")
    @promises("ACC-K3", "ACC-F1")
    def test_schedule_by_step(self, conformance: Conformance) -> None:
        """ACC-K3: ByStep({0: 1, 2: 2, 4: 3}) gives windows 1, 1, 2, 2, 3, 3,
        the skipped window 1 counting as closed."""
        conformance.skip_under_fp16("a non-finite gradient is an AMP overflow (ACC-F4)")
        reference = conformance.check("by_step")
        _check_teeth(
            [len(w) for w in reference.plan.windows] == [1, 1, 2, 2, 3, 3], "follows the table"
        )

    # -- ACC-R: resume --------------------------------------------------------------------
    @requires("checkpoint_mid_window")
    @promises("ACC-R2")
    def test_resume_mid_window(self, conformance: Conformance) -> None:
        """ACC-R2: a checkpoint after microbatch 5 (2 of 4 in window 1, items
        mode, AdamW, LambdaLR) resumed in fresh objects equals the
        uninterrupted run and the reference."""
        self._check_resume(conformance, "checkpoint_mid_window")

    @requires("checkpoint")
    @promises("ACC-R3")
    def test_resume_at_boundary(self, conformance: Conformance) -> None:
        """ACC-R3: a checkpoint right after window 1 closes resumes exactly."""
        self._check_resume(conformance, "checkpoint_boundary")

    @staticmethod
    def _check_resume(conformance: Conformance, name: str) -> None:
        scenario = conformance.scenario(name)
        conformance.check(scenario)
        uninterrupted = scenario.replace(checkpoint_after=None)
        straight = conformance.run(uninterrupted)
        resumed = conformance.run(scenario)
        conformance.compare(
            resumed, straight, scenario, against="the same harness's uninterrupted run"
        )

    # -- ACC-P: precision and memory -----------------------------------------------------
    @requires("amp_fp16")
    @promises("ACC-F4", "ACC-S3")
    def test_fp16_overflow_skips_window(self, conformance_amp: Conformance) -> None:
        """ACC-F4, ACC-S3: GradScaler(init_scale=2**40) overflows window 0:
        no optimizer or scheduler step; the scale backs off and the
        remaining windows step normally (fp16 tolerance, vs float64)."""
        conformance_amp.check(conformance_amp.scenario("fp16_overflow", "fp16"))

    @requires("amp_bf16")
    @promises("ACC-P3", "ACC-W3")
    def test_bf16_follows_float32(self, conformance_amp: Conformance) -> None:
        """ACC-P3: under bf16 autocast the trajectory stays within 5e-2 of
        the same harness's float32 run (which matches the reference)."""
        conformance_amp.check(conformance_amp.scenario("short_last_known", "bf16"))

    @requires("offload")
    @promises("ACC-P2")
    def test_offload_is_exact(self, conformance: Conformance) -> None:
        """ACC-P2: offload=True gives the reference trajectory."""
        conformance.check("offload")

    @requires("fp32_accumulation")
    @promises("ACC-P1")
    def test_fp32_accumulation_is_exact(self, conformance_amp: Conformance) -> None:
        """ACC-P1: accumulation_dtype='float32' on float32 parameters gives
        the reference trajectory."""
        conformance_amp.check(conformance_amp.scenario("fp32_accumulation", "float32"))

    # -- ACC-B3, ACC-B4, ACC-P4: what the probes see -----------------------------------------
    @requires("probes")
    @promises("ACC-B3", "ACC-B4")
    @pytest.mark.parametrize("name", PROBE_READS)
    def test_host_reads_only_at_the_boundary(self, conformance: Conformance, name: str) -> None:
        """ACC-B3, ACC-B4: two windows of 3 (mean; items with device counts;
        clipping by norm; two ranks with the positions compared at every
        boundary): no device-to-host read on a microbatch that is not a
        boundary (on CUDA, no synchronisation at all), at most one at a
        boundary."""
        scenario, records = conformance.probe(name, "host_reads")
        off = [(i, r) for i, r in enumerate(records) if not r.boundary and r.host_reads]
        if off:
            conformance.broken(
                "ACC-B3",
                scenario,
                "host reads on microbatches that are not boundaries (allowed: 0)",
                _record_lines(off, "{r.host_reads} read(s)"),
            )
        # ACC-D6: on several ranks a pass of unknown length ends with one comparison of the
        # ranks' positions (one read) in end_pass, which harnesses count with the pass's
        # last microbatch.
        pass_end = scenario.world_size > 1 and scenario.pass_length != "known"
        last = {v.global_index for v in scenario.iter_microbatches() if v.is_last_in_pass}
        over = [
            (i, r)
            for i, r in enumerate(records)
            if r.boundary and (r.host_reads or 0) > 1 + (pass_end and i in last)
        ]
        if over:
            conformance.broken(
                "ACC-B4",
                scenario,
                "more than one host read at a boundary (allowed: 1, plus the pass-end "
                "comparison of ACC-D6 on the last microbatch of a pass of unknown length "
                "on several ranks)",
                _record_lines(over, "{r.host_reads} reads"),
            )
        if not any(r.host_reads for r in records if r.boundary):
            raise AssertionError(
                f"harness {conformance.harness.name!r} recorded no host read at any boundary of "
                f"{name!r}: a boundary reads the non-finite verdict (ACC-B4), so the reads are "
                f"not counted around the adapter's work; count them around the microbatch "
                f"block and the end_pass after it (MicrobatchProbes.counting)"
            )

    @requires("probes")
    @promises("ACC-P4")
    @pytest.mark.parametrize("name", PROBE_MEMORY)
    def test_no_buffer_held_between_microbatches(self, conformance: Conformance, name: str) -> None:
        """ACC-P4: in the default configuration (mean; items with device counts;
        clipping by norm; two ranks), after each microbatch that is not a
        boundary the adapter holds less tensor memory than the smallest
        parameter (a few 0-d scalars at most) beyond the parameters, their
        gradients and the optimizer's state."""
        scenario, records = conformance.probe(name, "memory")
        smallest = min(p.numel() * p.element_size() for p in scenario.make_model().parameters())
        held = [
            (i, r)
            for i, r in enumerate(records)
            if not r.boundary and (r.extra_bytes or 0) >= smallest
        ]
        if held:
            conformance.broken(
                "ACC-P4",
                scenario,
                f"tensor memory held between microbatches (allowed: less than the smallest "
                f"parameter, {smallest} B)",
                _record_lines(held, "{r.extra_bytes} B held"),
            )

    # -- ACC-D: distributed ----------------------------------------------------------------
    @requires("distributed")
    @promises("ACC-D1", "ACC-D3", "ACC-N2")
    def test_distributed_items(self, conformance: Conformance) -> None:
        """ACC-D1, ACC-D3: two ranks with unequal shards in items mode equal
        the large batch of both ranks' items, with one reduction per window."""
        conformance.check("distributed_items")

    @requires("distributed")
    @promises("ACC-D1", "ACC-D3", "ACC-N1")
    def test_distributed_mean(self, conformance: Conformance) -> None:
        """ACC-D1, ACC-D3: the same in mean mode (mean over ranks and microbatches)."""
        conformance.check("distributed_mean")


def _names_a_test(key: str) -> bool:
    base = key.split("[", 1)[0]
    return base.startswith("test_") and callable(getattr(ConformanceSuite, base, None))


def suite_tests() -> dict[str, tuple[str, ...]]:
    """``{test name: promise IDs}`` for every test of the suite."""
    out: dict[str, tuple[str, ...]] = {}
    for name in dir(ConformanceSuite):
        if name.startswith("test_"):
            marks: Any = getattr(getattr(ConformanceSuite, name), "pytestmark", [])
            out[name] = tuple(a for m in marks if m.name == PROMISE_MARK for a in m.args)
    return out
