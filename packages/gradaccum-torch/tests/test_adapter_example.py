"""The third-party adapter example (``examples/custom_adapter.py``) keeps every
promise it declares, and what ``docs/adapter-authors.md``, ``docs/torch.md`` and
``docs/getting-started.md`` claim about writing adapters and resuming is true.

The example is imported by path, as a third party's module would be: it is not
part of any package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import make_batches, make_model, mean_loss, params_of, sum_loss
from test_host_sync import count_host_reads

from gradaccum import ConfigError, ItemCountError, UsageError
from gradaccum.checkpoint import read_checkpoint
from gradaccum.policies import Normalization
from gradaccum_conformance import Conformance, ConformanceSuite, Harness
from gradaccum_torch import Accumulator, Framework

ROOT = Path(__file__).parents[3]
EXAMPLE = ROOT / "examples" / "custom_adapter.py"


def _import_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("custom_adapter", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ca = _import_example()


# -- the example under the conformance suite ------------------------------------------


class TestCustomAdapterConformance(ConformanceSuite):
    """The full suite (float64, float32, bf16, fp16: see conftest.py) on the example."""

    @pytest.fixture
    def harness(self) -> Harness:
        return ca.MiniHarness()  # type: ignore[no-any-return]


# Every scenario that runs under fp16 with a GradScaler (the non-finite ones are AMP
# overflows there, and the distributed ones need ranks).
FP16_SCENARIOS = [
    "equal_sgd",
    "adamw_lambda",
    "short_last_known",
    "short_last_last_only",
    "items_unequal",
    "mean_unequal",
    "sum",
    "clip_norm",
    "clip_value",
    "clip_per_microbatch_sum",
    "clip_per_microbatch_mean",
    "clip_per_microbatch_items",
    "weights_by_name",
    "weights_by_group",
    "partial_drop",
    "partial_carry",
    "by_epoch",
    "checkpoint_mid_window",
    "checkpoint_boundary",
    "fp16_overflow",
    "offload",
]


@pytest.mark.parametrize("name", FP16_SCENARIOS)
def test_scaled_boundary_keeps_the_amp_promises(name: str, tmp_path: Path) -> None:
    """A trainer whose step unscales itself (``scaled_boundary=True``): the boundary
    checks and clips the still-scaled gradient, and the run matches the float64
    reference at the fp16 tolerance, overflow and clipping included."""
    harness = ca.ScaledBoundaryHarness()
    Conformance(harness, "fp16", "cpu", tmp_path, ()).check(name)


def test_plugin_path_runs_the_example_harness(tmp_path: Path) -> None:
    """``pytest --pyargs gradaccum_conformance --gradaccum-harness=custom_adapter:MiniHarness``
    (with examples/ importable) runs the suite on the example."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "gradaccum_conformance",
            "--gradaccum-harness=custom_adapter:MiniHarness",
            "--gradaccum-dtype=float64,float32,bf16,fp16",
            "-k",
            "test_full_windows_equal_large_batch or test_resume_mid_window",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "adapter custom-adapter-example (custom_adapter:MiniHarness)" in run.stdout
    assert "8 passed" in run.stdout


# -- the example itself ------------------------------------------------------------------


def _trainer(**options: Any) -> tuple[Any, torch.nn.Module]:
    model = make_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return ca.MiniTrainer(model, optimizer, **options), model


def test_the_framework_implements_the_protocol() -> None:
    trainer, _ = _trainer()
    assert isinstance(ca.MiniFramework(trainer), Framework)

    class Incomplete:  # no skip_step, no step_scheduler, ...
        optimizer = trainer.optimizer
        scheduler = scaler = None

        def backward(self, loss: torch.Tensor) -> None:
            loss.backward()  # type: ignore[no-untyped-call]

    with pytest.raises(ConfigError, match=r"does not implement gradaccum_torch\.Framework"):
        Accumulator(trainer.module, trainer.optimizer, steps=2, framework=Incomplete())  # type: ignore[arg-type]


def test_a_skip_step_that_does_not_update_the_scaler_breaks_the_next_window() -> None:
    """The boundary unscaled an overflowing window; a skip_step that leaves the scaler
    alone leaves it unscaled, and the next window's boundary refuses with UsageError (a
    RuntimeError) saying the scaler was unscaled since its last update."""

    class Forgetful(ca.MiniFramework):  # type: ignore[misc,name-defined]
        def skip_step(self) -> None:
            pass

    trainer, _ = _trainer(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40))
    acc = Accumulator(trainer.module, trainer.optimizer, steps=1, framework=Forgetful(trainer))
    first, second = make_batches([2, 2], dtype=torch.float32)
    with acc.microbatch():
        with torch.autocast("cpu", dtype=torch.float16):
            out = trainer.module(first[0])
        assert acc.backward(((out.float() - first[1]) ** 2).mean()).outcome == "amp_overflow"
    with (
        pytest.raises(UsageError, match=r"unscaled since its last update"),
        acc.microbatch(),
    ):
        acc.backward(mean_loss(trainer.module, second))


@pytest.mark.parametrize("amp", [False, True])
def test_the_trainers_backward_and_step_are_the_ones_called(amp: bool) -> None:
    """Every microbatch goes through trainer.backward, every optimizer step through
    trainer.step, and an AMP-overflow window calls neither step (nor the scheduler)."""
    # Under AMP the first window overflows (scale 2**40), the scale drops to 2**10, and
    # the other two windows step.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30, enabled=amp)
    trainer, _ = _trainer(scaler=scaler)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1)
    trainer.scheduler = scheduler
    optimizer_steps = [0]

    def count(*args: Any) -> None:
        optimizer_steps[0] += 1

    trainer.optimizer.register_step_post_hook(count)
    acc = ca.accumulator(trainer, steps=3)
    batches = make_batches([2, 3, 1, 4, 2, 2, 3, 1], dtype=torch.float32)
    for batch in acc.iterate(batches):
        with acc.microbatch():
            with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
                out = trainer.module(batch[0])
            acc.backward(((out.float() - batch[1]) ** 2).mean())
    stats = acc.stats
    assert trainer.backward_calls == stats.micro_steps == 8
    assert trainer.step_calls == optimizer_steps[0] == stats.optimizer_steps
    assert scheduler.last_epoch == stats.optimizer_steps
    assert (stats.optimizer_steps, stats.skipped_steps) == ((2, 1) if amp else (3, 0))


def test_a_wrong_scaled_boundary_fails_loudly() -> None:
    """A framework that says the boundary may unscale while its step unscales too:
    torch refuses the second unscale_ at the first step."""

    class Wrong(ca.MiniFramework):  # type: ignore[misc,name-defined]
        scaled_boundary = False

    trainer, _ = _trainer(scaler=torch.amp.GradScaler("cpu"), unscale_in_step=True)
    acc = Accumulator(trainer.module, trainer.optimizer, steps=1, framework=Wrong(trainer))
    (batch,) = make_batches([2], dtype=torch.float32)
    with (
        pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"),
        acc.microbatch(),
    ):
        acc.backward(mean_loss(trainer.module, batch))


@pytest.mark.parametrize(("amp", "stepped_reads"), [(False, 1), (True, 2)])
def test_host_reads(amp: bool, stepped_reads: int) -> None:
    """No host read off the boundary (ACC-B3); at a stepped boundary the accumulator's
    one read, plus, under AMP, the one GradScaler.step makes inside trainer.step()."""
    scaler = torch.amp.GradScaler("cpu", enabled=amp)
    trainer, _ = _trainer(scaler=scaler)
    acc = ca.accumulator(trainer, steps=4)
    per_microbatch: list[tuple[bool, int]] = []
    counter = [0]
    with count_host_reads(counter):
        for batch in acc.iterate(make_batches([3] * 8, dtype=torch.float32)):
            before = counter[0]
            with acc.microbatch():
                boundary = acc.sync_gradients
                with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
                    out = trainer.module(batch[0])
                acc.backward(((out.float() - batch[1]) ** 2).mean())
            per_microbatch.append((boundary, counter[0] - before))
    assert acc.stats.optimizer_steps == 2
    assert [r for b, r in per_microbatch if not b] == [0] * 6
    assert [r for b, r in per_microbatch if b] == [stepped_reads] * 2


def test_checkpoints_carry_the_models_own_names_and_load_into_plain_torch(
    tmp_path: Path,
) -> None:
    """CKPT-5, ACC-R5: name_prefix: the example's mid-window checkpoint names parameters as
    the user's model does ('0.weight', not 'net.0.weight'), so a plain gradaccum_torch
    Accumulator on the bare model resumes it on the same trajectory, bitwise."""
    batches = make_batches([3, 2, 4, 1, 3, 2, 5, 2, 3, 1])

    def build_example() -> tuple[Any, Accumulator]:
        model = make_model()
        trainer = ca.MiniTrainer(model, torch.optim.AdamW(model.parameters(), lr=0.01))
        return trainer, ca.accumulator(trainer, steps=4, normalization="items")

    def run(acc: Accumulator, module: torch.nn.Module, part: list[Any], start: int) -> None:
        for i, batch in enumerate(part, start=start):
            last = i == len(batches) - 1
            with acc.microbatch(items=len(batch[0]), last=last):
                acc.backward(sum_loss(module, batch))

    trainer, acc = build_example()
    run(acc, trainer.module, batches, 0)
    expected = params_of(trainer.module)

    trainer, acc = build_example()
    run(acc, trainer.module, batches[:6], 0)
    acc.save(tmp_path / "ckpt")
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.state["position"] == 2
    assert list(acc.named_parameters()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "model" in ckpt.roles and "gradients" in ckpt.roles

    bare = make_model(seed=7)
    plain = Accumulator(
        bare, torch.optim.AdamW(bare.parameters(), lr=0.01), steps=4, normalization="items"
    )
    plain.load(tmp_path / "ckpt")
    run(plain, bare, batches[6:], 6)
    assert all(torch.equal(a, b) for a, b in zip(expected, params_of(bare), strict=True))


def test_scheduler_and_scaler_belong_to_the_framework() -> None:
    trainer, _ = _trainer()
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1)
    with pytest.raises(ConfigError, match="belong to the framework"):
        ca.accumulator(trainer, steps=2, scheduler=scheduler)
    other = torch.optim.SGD(trainer.module.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="not the optimizer given"):
        Accumulator(trainer.module, other, steps=2, framework=ca.MiniFramework(trainer))


def test_the_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ca.main()
    out = capsys.readouterr().out
    assert "20 trainer.backward() calls, 6 trainer.step() calls, 6 optimizer steps" in out


# -- what the user guides claim ----------------------------------------------------------


def test_an_unknown_keyword_names_the_closest_one() -> None:
    """getting-started.md: a misspelt option is a ConfigError naming the closest one."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"'normalisation' \(did you mean 'normalization'\?\)"):
        Accumulator(model, optimizer, steps=4, normalisation="items")  # type: ignore[arg-type]


def test_backward_result_and_before_step() -> None:
    """getting-started.md: BackwardResult is truthy exactly when a step was taken;
    before_step runs once per step, after the commit (effective_step already counts it)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[int] = []
    acc = Accumulator(
        model, optimizer, steps=2, before_step=lambda a: seen.append(a.effective_step)
    )
    results = []
    for batch in acc.iterate(make_batches([2, 3, 4, 1, 2])):
        with acc.microbatch():
            results.append(acc.backward(mean_loss(model, batch)))
    assert [r.boundary for r in results] == [False, True, False, True, True]
    assert [bool(r) for r in results] == [False, True, False, True, True]
    assert [r.outcome for r in results] == [None, "stepped", None, "stepped", "stepped"]
    assert [r.window_items for r in results] == [None, 0, None, 0, 0]  # no counts given
    assert all(r.grad_norm is None for r in results)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("normalization", ["items", "mean"])
def test_window_items_is_an_int_for_host_counts_and_a_tensor_for_device_counts(
    normalization: Normalization,
) -> None:
    model = make_model()
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=2,
        normalization=normalization,
    )
    batches = make_batches([2, 3, 4, 1])
    results = []
    for i, batch in enumerate(batches):
        n = len(batch[0])
        device = i >= 2 and normalization == "items"  # device counts only under items
        with acc.microbatch(items=torch.tensor(n) if device else n):
            loss = sum_loss(model, batch) if normalization == "items" else mean_loss(model, batch)
            results.append(acc.backward(loss))
    assert results[1].window_items == 5 and isinstance(results[1].window_items, int)
    last = results[3].window_items
    if normalization == "items":
        assert isinstance(last, torch.Tensor) and float(last) == 5.0
    else:
        assert last == 5 and isinstance(last, int)


def test_reduce_lr_on_plateau_is_refused() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ConfigError, match=r"ReduceLROnPlateau.*scheduler\.step\(metric\)"):
        Accumulator(model, optimizer, steps=2, scheduler=plateau)
    trainer = ca.MiniTrainer(model, optimizer, scheduler=plateau)  # through a Framework too
    with pytest.raises(ConfigError, match="ReduceLROnPlateau"):
        ca.accumulator(trainer, steps=2)


def _large_batch_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    on_grads: Callable[[list[torch.Tensor]], None] = lambda grads: None,
) -> None:
    for start in range(0, len(batches), steps):
        window = batches[start : start + steps]
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        ((model(x) - y) ** 2).mean().backward()
        on_grads([p.grad.clone() for p in model.parameters() if p.grad is not None])
        optimizer.step()
        model.zero_grad(set_to_none=True)


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 2e-15), (torch.float32, 2e-6)])
def test_accumulated_gradient_matches_one_large_batch(dtype: torch.dtype, bound: float) -> None:
    """torch.md, tolerances: the window gradient of 4 equal microbatches against one
    batch of 32 (MLP 16-32-4, 5 windows, 3 data seeds): float64 within 2e-15, float32
    within 2e-6, relative to each tensor's largest entry. Not 0: the sums run in
    another order."""
    worst = 0.0
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        batches = [
            (
                torch.randn(8, 16, generator=gen).to(dtype),
                torch.randn(8, 4, generator=gen).to(dtype),
            )
            for _ in range(20)
        ]

        def mlp() -> torch.nn.Module:
            torch.manual_seed(1)
            return torch.nn.Sequential(
                torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
            ).to(dtype)

        model = mlp()
        accumulated: list[list[torch.Tensor]] = []

        def record(
            acc: Accumulator,
            model: torch.nn.Module = model,
            accumulated: list[list[torch.Tensor]] = accumulated,
        ) -> None:
            accumulated.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]

        acc = Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.1), steps=4, before_step=record
        )
        for x, y in acc.iterate(batches):
            with acc.microbatch():
                acc.backward(((model(x) - y) ** 2).mean())
        reference = mlp()
        large: list[list[torch.Tensor]] = []
        _large_batch_steps(
            reference, torch.optim.SGD(reference.parameters(), lr=0.1), batches, 4, large.append
        )
        assert len(accumulated) == len(large) == 5
        worst = max(worst, *(_relative(a, b) for a, b in zip(accumulated, large, strict=True)))
    assert 0.0 < worst < bound, worst


def _centered_problem(
    seed: int, dtype: torch.dtype, steps: int = 4, windows: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and targets centered per window (in float64): the bias's true gradient
    is 0, so what each run computes for it is rounding."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(windows):
        x = torch.randn(steps * 8, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(steps * 8, 1, generator=gen, dtype=torch.float64)
        x, y = x - x.mean(0), y - y.mean(0) + 0.5
        out += [
            (x[j * 8 : (j + 1) * 8].to(dtype), y[j * 8 : (j + 1) * 8].to(dtype))
            for j in range(steps)
        ]
    return out


def _linear(dtype: torch.dtype) -> torch.nn.Linear:
    model = torch.nn.Linear(4, 1).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25, 1.0, 0.75]]))
        model.bias.fill_(0.5)
    return model


@pytest.mark.parametrize(
    ("optimizer", "dtype", "smallest", "largest"),
    [
        ("adam", torch.float32, 1e-4, 1e-2),
        ("adam", torch.float64, 1e-9, 1e-4),
        ("sgd", torch.float32, 0.0, 1e-7),
        ("sgd", torch.float64, 0.0, 1e-15),
    ],
)
def test_adam_amplifies_rounding_on_a_parameter_whose_gradient_is_near_zero(
    optimizer: str, dtype: torch.dtype, smallest: float, largest: float
) -> None:
    """torch.md, tolerances: a bias whose true gradient is 0 gets a gradient of rounding,
    different in the accumulated and the large-batch run (the sums run in another order).
    Where |g| << eps, Adam's step lr*m/(sqrt(v)+eps) is about lr*g/eps: it multiplies
    the difference by lr/eps (1e5 here) where SGD multiplies it by lr (1e-3). After 3
    windows the bias differs by more than 1e-4 relative in float32 (the conformance
    suite's float32 tolerance is 1e-5) and more than 1e-9 in float64 (tolerance 1e-12),
    yet by at most lr per step in absolute terms; under SGD nothing shows. The weights,
    whose gradients are far above eps, agree in every case."""
    lr, windows = 1e-3, 3
    data = _centered_problem(2, dtype, windows=windows)

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        if optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        return torch.optim.SGD(model.parameters(), lr=lr)

    model = _linear(dtype)
    acc = Accumulator(model, make(model), steps=4)
    for x, y in acc.iterate(data):
        with acc.microbatch():
            acc.backward(((model(x) - y) ** 2).mean())
    reference = _linear(dtype)
    _large_batch_steps(reference, make(reference), data, 4)
    bias = _relative([model.bias.detach()], [reference.bias.detach()])
    weight = _relative([model.weight.detach()], [reference.weight.detach()])
    assert smallest <= bias <= largest, bias
    assert weight <= 1e-6
    assert float((model.bias - reference.bias).detach().abs().max()) <= windows * lr


# -- resuming a pass ---------------------------------------------------------------------

PASS = 10  # microbatches per pass; windows of 3: 3, 3, 3 and a short 1


def _resume_run(
    feed: str, cut: int, tmp_path: Path
) -> tuple[list[torch.Tensor], list[torch.Tensor], Accumulator]:
    """The uninterrupted two-pass run, and the run interrupted after ``cut`` microbatches
    of pass 1 and resumed in fresh objects by feeding the rest of the pass as ``feed`` says."""
    batches = make_batches([3] * PASS)

    def build(seed: int = 0) -> tuple[torch.nn.Module, Accumulator]:
        model = make_model(seed=seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, Accumulator(model, optimizer, steps=3)

    model, acc = build()
    for _ in range(2):
        for batch in acc.iterate(batches):
            with acc.microbatch():
                acc.backward(mean_loss(model, batch))
    expected = params_of(model)

    model, acc = build()
    for batch in acc.iterate(batches):  # pass 0
        with acc.microbatch():
            acc.backward(mean_loss(model, batch))
    for i, batch in enumerate(acc.iterate(batches)):  # pass 1, interrupted
        with acc.microbatch():
            acc.backward(mean_loss(model, batch))
        if i + 1 == cut:
            acc.save(tmp_path / "ckpt")
            break

    model, acc = build(seed=5)
    acc.load(tmp_path / "ckpt")
    consumed = acc.stats.micro_steps - acc.stats.epoch * len(batches)
    assert consumed == cut
    if feed == "slice":  # the remaining part, with its own len()
        for batch in acc.iterate(batches[consumed:]):
            with acc.microbatch():
                acc.backward(mean_loss(model, batch))
    elif feed == "islice":  # no len(): the one-ahead look finds the pass's end
        for batch in acc.iterate(itertools.islice(batches, consumed, None)):
            with acc.microbatch():
                acc.backward(mean_loss(model, batch))
    elif feed == "whole_len":  # skips ahead, but its len() counts the whole pass

        class SkipsAhead:
            def __len__(self) -> int:
                return len(batches)

            def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                return itertools.islice(batches, consumed, None)

        for batch in acc.iterate(SkipsAhead()):
            with acc.microbatch():
                acc.backward(mean_loss(model, batch))
    elif feed == "remaining":  # the loop driven by hand, with the pass length
        left = len(batches) - consumed
        for i, batch in enumerate(itertools.islice(batches, consumed, None)):
            with acc.microbatch(remaining=left - i):
                acc.backward(mean_loss(model, batch))
        acc.end_pass()
    elif feed == "whole_pass":  # the mistake: the pass again from its start
        for batch in acc.iterate(batches):
            with acc.microbatch():
                acc.backward(mean_loss(model, batch))
    return expected, params_of(model), acc


@pytest.mark.parametrize("cut", [1, 4, 9, 10])
@pytest.mark.parametrize("feed", ["slice", "remaining"])
def test_resume_with_the_rest_of_the_pass_is_bitwise(feed: str, cut: int, tmp_path: Path) -> None:
    """torch.md, resume: feed the remaining microbatches of the interrupted pass (a
    slice with len(), or microbatch(remaining=...)): the uninterrupted run, bitwise."""
    expected, resumed, acc = _resume_run(feed, cut, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=True))
    assert (acc.stats.epoch, acc.stats.micro_steps, acc.stats.optimizer_steps) == (2, 20, 8)


@pytest.mark.parametrize("cut", [1, 4, 9, 10])
@pytest.mark.parametrize("feed", ["islice", "whole_len"])
def test_resume_through_islice_is_exact_to_rounding(feed: str, cut: int, tmp_path: Path) -> None:
    """islice has no len(), and a loader that skips ahead but reports the whole pass's
    length makes iterate plan as if more followed: either way the short last window (1 of
    a planned 3) is closed by the one-ahead look and corrected by k/c at its boundary:
    the same update up to rounding."""
    expected, resumed, acc = _resume_run(feed, cut, tmp_path)
    assert _relative(resumed, expected) < 1e-14
    assert (acc.stats.epoch, acc.stats.micro_steps, acc.stats.optimizer_steps) == (2, 20, 8)


def test_resume_with_the_whole_pass_again_is_wrong(tmp_path: Path) -> None:
    """Feeding the pass from its start after load() runs the consumed microbatches twice."""
    expected, resumed, acc = _resume_run("whole_pass", 4, tmp_path)
    assert acc.stats.micro_steps == 24
    assert _relative(resumed, expected) > 1e-3


# -- exceptions, item counts, param groups, tied weights ----------------------------------


@contextlib.contextmanager
def _failing_backward(
    model: torch.nn.Module, error: type[BaseException] = RuntimeError
) -> Iterator[None]:
    def boom(grad: torch.Tensor) -> torch.Tensor:
        raise error("boom in backward")

    handle = next(iter(model.parameters())).register_hook(boom)  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("options", [{}, {"accumulation_dtype": "float32"}, {"offload": True}])
def test_an_exception_in_a_later_backward(options: dict[str, Any]) -> None:
    """ACC-E5: a backward that fails after the window's first microbatch. In param.grad
    (the default) the window is discarded and a note says so; in a buffer it rolls back
    exactly. Either way training goes on."""
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, **options)
    batches = make_batches([2, 3, 4, 1])
    with acc.microbatch():
        acc.backward(mean_loss(model, batches[0]))
    window = {n: t.clone() for n, t in acc.gradients.export().items()}
    with (
        pytest.raises(RuntimeError, match="boom") as raised,
        _failing_backward(model),
        acc.microbatch(),
    ):
        acc.backward(mean_loss(model, batches[1]))
    notes = getattr(raised.value, "__notes__", [])
    if options:
        assert notes == []
        assert acc.stats.position == 1 and acc.stats.dropped_windows == 0
        kept = acc.gradients.export()
        assert all(torch.equal(window[n], kept[n]) for n in window)
    else:
        assert "window was discarded" in notes[0] and "accumulation_dtype='float32'" in notes[0]
        assert acc.stats.position == 0 and acc.stats.dropped_windows == 1
        assert all(p.grad is None for p in model.parameters())
    assert acc.stats.micro_steps == 1
    with acc.microbatch():
        acc.backward(mean_loss(model, batches[2]))
    assert acc.stats.micro_steps == 2


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_in_the_first_backward_of_a_window_rolls_back(
    error: type[BaseException],
) -> None:
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3)
    (batch,) = make_batches([2])
    with (
        pytest.raises(error, match="boom") as raised,
        _failing_backward(model, error),
        acc.microbatch(),
    ):
        acc.backward(mean_loss(model, batch))
    assert getattr(raised.value, "__notes__", []) == []
    assert (acc.stats.micro_steps, acc.stats.dropped_windows, acc.stats.position) == (0, 0, 0)
    assert all(p.grad is None for p in model.parameters())


def test_a_failing_step_still_zeroes_the_gradients() -> None:
    """ACC-B5: an exception after the commit (here in a before_step hook) propagates,
    and the window's gradient is zeroed all the same; the next window works."""

    failures = [RuntimeError("hook failed")]

    def fail(acc: Accumulator) -> None:
        if failures:
            raise failures.pop()

    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    acc.add_before_step(fail)
    batches = make_batches([2, 3, 2, 3])
    with acc.microbatch():
        acc.backward(mean_loss(model, batches[0]))
    with pytest.raises(RuntimeError, match="hook failed"), acc.microbatch():
        acc.backward(mean_loss(model, batches[1]))
    assert all(p.grad is None for p in model.parameters())
    for batch in batches[2:]:
        with acc.microbatch():
            result = acc.backward(mean_loss(model, batch))
    assert result.stepped


def test_discard_window() -> None:
    model = make_model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3)
    with acc.microbatch():
        acc.backward(mean_loss(model, make_batches([2])[0]))
    acc.discard_window()
    assert all(p.grad is None for p in model.parameters())
    assert (acc.stats.position, acc.stats.dropped_windows, acc.stats.optimizer_steps) == (0, 1, 0)


def test_a_bad_device_item_count_discards_the_window_at_the_boundary() -> None:
    """ACC-N8, ACC-B5: a negative count in a tensor is found at the boundary (no read
    before); the window is discarded, ItemCountError raised, the next window works."""
    model = make_model()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, normalization="items"
    )
    batches = make_batches([3, 3, 3, 3])
    with acc.microbatch(items=torch.tensor(-3)):
        acc.backward(sum_loss(model, batches[0]))
    with (
        pytest.raises(ItemCountError, match="window was discarded"),
        acc.microbatch(items=torch.tensor(3)),
    ):
        acc.backward(sum_loss(model, batches[1]))
    assert (acc.stats.dropped_windows, acc.stats.optimizer_steps) == (1, 0)
    assert all(p.grad is None for p in model.parameters())
    for batch in batches[2:]:
        with acc.microbatch(items=torch.tensor(3)):
            result = acc.backward(sum_loss(model, batch))
    assert result.stepped and acc.stats.optimizer_steps == 1


@pytest.mark.parametrize("options", [{}, {"accumulation_dtype": "float32"}])
@pytest.mark.parametrize(
    ("frozen", "at"), [(True, 4), (False, 4), (False, 6)], ids=["unfrozen", "trained", "mid"]
)
def test_a_param_group_added_later_is_adopted(
    options: dict[str, Any], frozen: bool, at: int
) -> None:
    """ACC-N9: the head joins the optimizer with add_param_group before microbatch `at`
    (4: between windows; 6: inside the second window), having been frozen or trainable
    but outside the optimizer until then: it is normalized with the rest, and its first
    update is the large-batch gradient of the whole window it joined."""

    def run(accumulate: bool) -> torch.nn.Module:
        model = make_model()
        body, _, last = model.children()
        head = list(last.parameters())
        for p in head:
            p.requires_grad_(not frozen)
        optimizer = torch.optim.SGD(body.parameters(), lr=0.1)
        batches = make_batches([3] * 8)

        def add_head() -> None:
            for p in head:
                p.requires_grad_(True)
            optimizer.add_param_group({"params": head})

        if not accumulate:  # the large-batch loop adds it at the start of window 1
            for w in range(2):
                if w == 1:
                    add_head()
                _large_batch_steps(model, optimizer, batches[4 * w : 4 * w + 4], 4)
            return model
        acc = Accumulator(model, optimizer, steps=4, **options)
        for i, batch in enumerate(batches):
            if i == at:
                add_head()
            with acc.microbatch():
                acc.backward(mean_loss(model, batch))
        assert list(acc.named_parameters()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        return model

    assert _relative(params_of(run(True)), params_of(run(False))) < 1e-14


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    """CKPT-19: an embedding tied to the output head is stored once, with an alias."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))  # type: ignore[no-any-return]

    model = Tied()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    with acc.microbatch():
        acc.backward(model(torch.tensor([1, 2, 3])).logsumexp(-1).mean())
    acc.save(tmp_path / "ckpt")
    assert read_checkpoint(tmp_path / "ckpt").metadata["model"] == {
        "aliases": {"head.weight": "embed.weight"}
    }
    fresh = Tied()
    Accumulator(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), steps=2).load(tmp_path / "ckpt")
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


# -- the distributed side: when the accumulator calls it --------------------------------


class MirroredRanks:
    """A `Distributed` for two simulated ranks that run exactly what this process runs:
    every row gathered comes back twice, reductions change nothing. It records which
    member the accumulator called, and for all_gather the row's tag
    (`gradaccum.lockstep.Tag`; 0 for a row that carries only item counts)."""

    world_size = 2
    rank = 0
    averages = True

    def __init__(self, check_windows: bool = True) -> None:
        self.check_windows = check_windows
        self.calls: list[str] = []

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        self.calls.append("sync" if sync else "no_sync")
        return contextlib.nullcontext()

    def reduce_gradients(self, grads: Any) -> None:
        self.calls.append("reduce")

    def all_gather(self, row: torch.Tensor) -> torch.Tensor:
        assert row.dtype == torch.float64 and row.dim() == 1 and len(row) == 10
        tag = {0: "counts", 1: "INIT", 2: "PASS", 3: "WINDOW", 4: "END_PASS"}[int(row[2])]
        self.calls.append(f"gather:{tag}")
        return torch.stack([row, row])


S, N, G = "sync", "no_sync", "gather:"


@pytest.mark.parametrize(
    ("normalization", "known", "check_windows", "expected"),
    [
        ("mean", True, True, [G + "INIT", G + "PASS", N, N, S, N, S]),
        ("items", True, True, [G + "INIT", G + "PASS", N, N, S, G + "counts", N, S, G + "counts"]),
        (
            "mean",
            False,
            True,
            [G + "INIT", N, N, S, G + "WINDOW", N, S, G + "WINDOW", G + "END_PASS"],
        ),
        (
            "items",
            False,
            True,
            [G + "INIT", N, N, S, G + "WINDOW", N, S, G + "WINDOW", G + "END_PASS"],
        ),
        ("mean", False, False, [G + "INIT", N, N, S, N, S]),
        ("items", False, False, [G + "INIT", N, N, S, G + "counts", N, S, G + "counts"]),
    ],
)
def test_when_the_accumulator_calls_the_distributed_side(
    normalization: Normalization, known: bool, check_windows: bool, expected: list[str]
) -> None:
    """adapter-authors.md and ddp.md: one all_gather when the accumulator is built (the
    config), one before a pass whose length iterate() knows; then nothing but the
    no-sync context until a boundary, whose one exchange carries the item counts
    (items) and, when the pass length was not agreed, the ranks' positions; a pass of
    unknown length ends with one more comparison. check_windows=False (DDP's
    lockstep='pass') leaves only the item counts."""
    distributed = MirroredRanks(check_windows)
    model = make_model()
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=3,
        normalization=normalization,
        distributed=distributed,
    )
    batches = make_batches([2] * 5)
    for batch in acc.iterate(batches if known else iter(batches)):
        items = len(batch[0]) if normalization == "items" else None
        with acc.microbatch(items=items):
            loss = sum_loss(model, batch) if items else mean_loss(model, batch)
            acc.backward(loss)
    assert distributed.calls == expected
    assert acc.stats.optimizer_steps == 2


def test_a_window_closed_by_end_pass_is_reduced_by_hand() -> None:
    """needs_manual_sync: without a one-ahead look the pass's last window is closed by
    end_pass(), after a backward that did not communicate: one reduce_gradients."""
    distributed = MirroredRanks()
    model = make_model()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, distributed=distributed
    )
    for batch in make_batches([2] * 4):
        with acc.microbatch():  # no last=, no iterate(): the pass's end is not known
            acc.backward(mean_loss(model, batch))
    acc.end_pass()
    assert distributed.calls == [G + "INIT", N, N, S, G + "WINDOW", N, "reduce", G + "WINDOW"]


def test_window_items_on_several_ranks_is_a_device_tensor() -> None:
    """getting-started.md: under items on several ranks the window's item count comes from
    the boundary's exchange: a 0-d tensor, the count over all ranks."""
    model = make_model()
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=2,
        normalization="items",
        distributed=MirroredRanks(),
    )
    for batch in acc.iterate(make_batches([2, 3])):
        with acc.microbatch(items=len(batch[0])):
            result = acc.backward(sum_loss(model, batch))
    assert isinstance(result.window_items, torch.Tensor) and float(result.window_items) == 10.0
    assert acc.stats.items_total == 10


def test_a_bad_item_count_on_another_rank_discards_the_window_here() -> None:
    """ACC-N8, ACC-B5: the bad-count flag travels in the boundary's exchange, so a bad
    device count on rank 1 fails the window on rank 0 too, naming rank 1."""

    class BadPeer(MirroredRanks):
        def all_gather(self, row: torch.Tensor) -> torch.Tensor:
            rows = super().all_gather(row)
            if int(row[2]) == 0:  # the boundary's item-count row: rank 1 saw a bad count
                rows[1, 1] = 1.0
            return rows

    model = make_model()
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=2,
        normalization="items",
        distributed=BadPeer(),
    )
    batches = make_batches([2, 3, 2, 3])
    with pytest.raises(ItemCountError, match=r"on rank\(s\) \[1\]"):
        for batch in acc.iterate(batches[:2]):
            with acc.microbatch(items=torch.tensor(len(batch[0]))):
                acc.backward(sum_loss(model, batch))
    assert (acc.stats.dropped_windows, acc.stats.optimizer_steps) == (1, 0)
    assert all(p.grad is None for p in model.parameters())


def test_one_process_save_is_refused_on_several_ranks(tmp_path: Path) -> None:
    """On several ranks Accumulator.save() would write one rank's in-flight gradients:
    it refuses unless the distributed side gathers them (a DistributedCheckpoints, as
    gradaccum_ddp.DDPDistributed is), and nothing is written."""
    model = make_model()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, distributed=MirroredRanks()
    )
    with pytest.raises(UsageError, match=r"on 2 ranks need a distributed side that gathers"):
        acc.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


class FirstSignatureCheckpoints(MirroredRanks):
    """A `DistributedCheckpoints` written before ``format_version`` existed: its
    ``save_checkpoint`` takes the first signature only; it records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[dict[str, Any]] = []

    def save_checkpoint(
        self, acc: Any, path: Any, *, model: bool, optimizer: bool, scheduler: bool, scaler: bool
    ) -> None:
        self.saved.append({"model": model, "optimizer": optimizer})

    def load_checkpoint(self, acc: Any, path: Any) -> None:
        raise AssertionError("not called")


class CurrentSignatureCheckpoints(FirstSignatureCheckpoints):
    """The same with today's signature: it also receives ``format_version``."""

    def save_checkpoint(  # type: ignore[override]
        self,
        acc: Any,
        path: Any,
        *,
        model: bool,
        optimizer: bool,
        scheduler: bool,
        scaler: bool,
        format_version: int,
    ) -> None:
        self.saved.append({"model": model, "optimizer": optimizer, "format": format_version})


def test_distributed_checkpoints_of_the_first_signature_still_save(tmp_path: Path) -> None:
    """CKPT-26: a distributed side whose save_checkpoint predates format_version
    still receives the default save (without the keyword), and a save asking
    for another format version is refused with a UsageError naming the fix,
    before it is called; one of today's signature receives the version."""
    model = make_model()
    old = FirstSignatureCheckpoints()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, distributed=old)
    acc.save(tmp_path / "ckpt")
    assert old.saved == [{"model": True, "optimizer": True}]
    with pytest.raises(UsageError, match=r"save_checkpoint takes no format_version.*format 3"):
        acc.save(tmp_path / "ckpt", format_version=2)
    assert old.saved == [{"model": True, "optimizer": True}]
    new = CurrentSignatureCheckpoints()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, distributed=new)
    acc.save(tmp_path / "ckpt", format_version=2, optimizer=False)
    acc.save(tmp_path / "ckpt")
    assert new.saved == [
        {"model": True, "optimizer": False, "format": 2},
        {"model": True, "optimizer": True, "format": 3},
    ]
