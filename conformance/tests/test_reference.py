"""The reference itself, checked against first principles."""

from __future__ import annotations

import math

import pytest
import torch

from gradaccum import AccumulationConfig, ByEpoch, ClipPolicy
from gradaccum_conformance import (
    ModelSpec,
    OptimizerSpec,
    Scenario,
    build_scenario,
    deviation,
    load_harness,
    make_passes,
    plan_windows,
    run_reference,
)


def _scenario(config: AccumulationConfig, sizes: list[list[int]]) -> Scenario:
    model = ModelSpec()
    return Scenario(
        name="t",
        config=config,
        passes=make_passes(sizes, model=model),
        loss_reduction="sum" if config.normalization == "items" else "mean",
        optimizer=OptimizerSpec("sgd", lr=0.1),
    )


@pytest.mark.parametrize(
    ("policy", "windows", "dropped", "left_open"),
    [
        ("step", [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]], 0, []),
        ("drop", [[0, 1, 2, 3], [6, 7, 8, 9]], 2, []),
        ("carry", [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], 0, []),
    ],
)
def test_plan_windows_partial_policies(
    policy: str, windows: list[list[int]], dropped: int, left_open: list[int]
) -> None:
    config = AccumulationConfig(4, partial_window=policy)  # type: ignore[arg-type]
    plan = plan_windows(_scenario(config, [[1] * 6, [1] * 6]))
    assert (plan.windows, plan.dropped_windows, plan.left_open) == (windows, dropped, left_open)


def test_plan_windows_by_epoch_with_carry_keeps_the_size_a_window_opened_with() -> None:
    config = AccumulationConfig(schedule=ByEpoch({0: 4, 1: 2}), partial_window="carry")
    plan = plan_windows(_scenario(config, [[1] * 6, [1] * 5]))
    assert plan.windows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan.left_open == [10]


def _large_batch_grad(scenario: Scenario, indices: list[int], how: str) -> list[torch.Tensor]:
    model = scenario.make_model().to(torch.float64)
    mbs = [mb for p in scenario.passes for mb in p]
    if how == "item_mean":
        x = torch.cat([mbs[i].shards[0].x for i in indices])
        y = torch.cat([mbs[i].shards[0].y for i in indices])
        loss = ((model(x) - y) ** 2).sum(-1).mean()
    else:  # mean of microbatch means
        losses = [
            ((model(mbs[i].shards[0].x) - mbs[i].shards[0].y) ** 2).sum(-1).mean() for i in indices
        ]
        loss = torch.stack(losses).mean()
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize(
    ("normalization", "how"), [("items", "item_mean"), ("mean", "mean_of_means")]
)
def test_first_window_is_a_plain_sgd_step_on_the_spec_gradient(
    normalization: str, how: str
) -> None:
    scenario = _scenario(AccumulationConfig(3, normalization=normalization), [[1, 5, 2, 7]])  # type: ignore[arg-type]
    run = run_reference(scenario)
    start = run.trajectory.initial_params
    grads = _large_batch_grad(scenario, [0, 1, 2], how)
    names = list(start)
    for name, grad in zip(names, grads, strict=True):
        expected = start[name] - 0.1 * grad
        assert deviation(run.trajectory.params[0][name], expected)[1] < 1e-14


def test_items_and_mean_differ_on_unequal_microbatches() -> None:
    # Otherwise ACC-N1 and ACC-N2 could not tell the two apart.
    scenario = _scenario(AccumulationConfig(3), [[1, 5, 2]])
    a = _large_batch_grad(scenario, [0, 1, 2], "item_mean")
    b = _large_batch_grad(scenario, [0, 1, 2], "mean_of_means")
    assert max(deviation(x, y)[1] for x, y in zip(a, b, strict=True)) > 1e-2


def test_every_scenario_builds_and_the_reference_runs_it() -> None:
    from gradaccum_conformance import SCENARIOS

    for name in SCENARIOS:
        scenario = build_scenario(name)
        if scenario.config.non_finite == "raise":
            continue
        run = run_reference(scenario)
        assert run.trajectory.outcomes, name
        assert all(
            math.isfinite(float(t.abs().max())) for p in run.trajectory.params for t in p.values()
        )


def test_per_microbatch_clip_is_pinned_on_one_rank_only() -> None:
    config = AccumulationConfig(2, clip=ClipPolicy(1.0, per_microbatch=True))
    run_reference(_scenario(config, [[2, 2]]))  # one rank: pinned (ACC-L2)
    with pytest.raises(NotImplementedError, match="per-microbatch"):
        run_reference(
            Scenario(
                name="t2",
                config=config,
                passes=make_passes([[(2, 2), (2, 2)]], model=ModelSpec()),
                optimizer=OptimizerSpec("sgd", lr=0.1),
                world_size=2,
            )
        )


def test_deviation_is_relative_to_the_largest_expected_magnitude() -> None:
    b = torch.tensor([2.0, 0.001])
    a = torch.tensor([2.0, 0.002])
    assert deviation(a, b) == pytest.approx((0.001, 0.0005))
    assert deviation(torch.tensor([math.nan]), torch.tensor([1.0]))[1] == math.inf
    assert deviation(b, b) == (0.0, 0.0)


def test_scenario_rejects_a_loss_that_does_not_match_the_normalization() -> None:
    with pytest.raises(ValueError, match="items"):
        Scenario(
            name="bad",
            config=AccumulationConfig(2, normalization="items"),
            passes=make_passes([[1, 1]], model=ModelSpec()),
        )


def test_load_harness_names_the_expected_form() -> None:
    with pytest.raises(ValueError, match=r"package\.module:HarnessClass"):
        load_harness("no_colon_here")
    with pytest.raises(TypeError, match=r"not a gradaccum_conformance\.Harness"):
        load_harness("collections:OrderedDict")
