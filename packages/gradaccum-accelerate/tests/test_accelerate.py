"""gradaccum-accelerate in one process: real ``Accelerator(cpu=True)``, ``prepare`` (a
prepared DataLoader where the loop has one), and the adapter's public API, against a float64
large-batch reference computed by hand; ``sync_gradients``; stray steps; refusals;
``save_state``/``load_state`` and ``acc.save`` checkpoints; and plain Accelerate side by
side on the same scenarios. Every test runs on fresh Accelerate singletons."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import accelerate_workers as W
import pytest
import torch
from accelerate import Accelerator

from gradaccum.checkpoint import FORMAT_VERSION, read_checkpoint
from gradaccum.errors import ConfigError, UsageError
from gradaccum_accelerate import Accumulator
from gradaccum_accelerate.testing import fresh_accelerator, one_process
from gradaccum_torch import Accumulator as TorchAccumulator

SIZES = [2, 5, 1, 3, 4, 2, 6, 1]  # unequal; windows of 3: 3, 3, 2
REL = 1e-12


@pytest.fixture(autouse=True)
def _single_process() -> Iterator[None]:
    with one_process():
        yield


def _generator(items: list[Any]) -> Iterator[Any]:
    yield from items


def adapter_windows(
    sizes: list[int],
    normalization: str,
    *,
    steps: int = 3,
    passes: int = 1,
    counts: str = "host",
    source: str = "loader",
    seed: int = 0,
) -> tuple[list[dict[str, list[float]]], Accumulator, Any]:
    """Train through a prepared model, optimizer, LambdaLR and (``source="loader"``) a
    prepared DataLoader of unequal batches; the parameters after every window."""
    accelerator = fresh_accelerator()
    model, opt, sched = accelerator.prepare(*W.make_objects(seed))
    acc = Accumulator(
        accelerator, model, opt, steps=steps, normalization=normalization, scheduler=sched
    )
    if source == "loader":
        data: Any = W.sized_loader(accelerator, seed, sizes)
    else:
        data = [W.microbatch(seed, 0, j, n) for j, n in enumerate(sizes)]
    windows = []
    for _ in range(passes):
        batches = _generator(list(data)) if source == "generator" else data
        for x, y in acc.iterate(batches):
            n = x.shape[0]
            items: Any = None
            if normalization == "items":
                items = torch.tensor(n) if counts == "device" else n
            before = acc.machine.state.windows
            with acc.microbatch(items):
                acc.backward(W.loss_fn(model(x), y, normalization))
            if acc.machine.state.windows != before:
                windows.append(W.params_json(model))
    return windows, acc, sched


def reference(sizes: list[int], normalization: str, **extra: Any) -> list[dict[str, list[float]]]:
    spec = {"sizes": [sizes], "steps": 3, "seed": 0, "scheduler": True}
    return W.reference({**spec, "normalization": normalization, **extra})


# -- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", ["host", "device"])
def test_items_unequal_microbatches_equal_the_large_batch(counts: str) -> None:
    """ACC-N2, ACC-W2, ACC-W3, ACC-N8: unequal microbatches (1..6 items) from a prepared
    DataLoader under ``items`` (host or device counts): after every window, short last
    window included, the parameters equal one float64 large-batch step within 1e-12."""
    windows, acc, sched = adapter_windows(SIZES, "items", counts=counts)
    assert W.worst_error(windows, reference(SIZES, "items")) <= REL
    assert acc.stats.items_total == sum(SIZES)
    assert sched.scheduler.last_epoch == acc.stats.optimizer_steps == 3


@pytest.mark.parametrize("source", ["loader", "generator"])
def test_mean_short_last_window_equals_the_large_batch(source: str) -> None:
    """ACC-N1, ACC-W3, ACC-W4: under ``mean`` the short last window of each of 2 passes
    (2 of 3 microbatches; from a prepared DataLoader whose length ``iterate`` reads, or from
    a generator where only the look-ahead marks the last microbatch) equals the large batch
    of its microbatches within 1e-12, not 2/3 of it."""
    windows, acc, _ = adapter_windows(SIZES, "mean", passes=2, source=source)
    assert W.worst_error(windows, reference(SIZES, "mean", passes=2)) <= REL
    assert acc.stats.epoch == 2 and acc.stats.optimizer_steps == 6


def test_bf16_mixed_precision_of_accelerate_runs_the_forward_in_bf16() -> None:
    """ACC-P3: with ``Accelerator(cpu=True, mixed_precision="bf16")`` (Accelerate's own AMP,
    no scaler) the prepared model's linear layers compute in bfloat16 and the adapter's
    windows stay within 5e-2 of the float64 reference."""
    accelerator = fresh_accelerator(mixed_precision="bf16")
    model, opt, sched = accelerator.prepare(*W.make_objects(0, dtype=torch.float32))
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    acc = Accumulator(accelerator, model, opt, steps=3, normalization="items", scheduler=sched)
    data = [W.microbatch(0, 0, j, n, torch.float32) for j, n in enumerate(SIZES)]
    windows = []
    for x, y in acc.iterate(data):
        before = acc.machine.state.windows
        with acc.microbatch(x.shape[0]):
            acc.backward(W.loss_fn(model(x), y, "items"))
        if acc.machine.state.windows != before:
            windows.append(W.params_json(model))
    assert seen and set(seen) == {torch.bfloat16}
    assert acc.framework.scaler is None
    error = W.worst_error(windows, reference(SIZES, "items"))
    assert 0 < error <= 5e-2


# -- sync_gradients, stray steps ------------------------------------------------------------------


def test_sync_gradients_is_true_exactly_on_the_boundary_microbatch() -> None:
    """ACC-D1: ``accelerator.sync_gradients`` read inside each ``with acc.microbatch()`` block
    and right after it is True exactly on the microbatches that close a window (8
    microbatches in windows of 3: the 3rd, the 6th and the last)."""
    accelerator = fresh_accelerator()
    model, opt = accelerator.prepare(*W.make_objects(0, scheduler=False)[:2])
    acc = Accumulator(accelerator, model, opt, steps=3)
    inside, after = [], []
    for x, y in acc.iterate([W.microbatch(0, 0, j, n) for j, n in enumerate(SIZES)]):
        with acc.microbatch():
            inside.append(accelerator.sync_gradients)
            acc.backward(W.loss_fn(model(x), y, "mean"))
        after.append(accelerator.sync_gradients)
    expected = [False, False, True, False, False, True, False, True]
    assert inside == expected
    assert after == expected


@pytest.mark.parametrize("where", ["mid_window", "boundary"])
def test_stray_steps_raise_naming_the_call_and_step_nothing(where: str) -> None:
    """ACC-S1, ACC-S3, ACC-E3: ``optimizer.step()`` and ``scheduler.step()`` left in the loop
    on the prepared objects raise UsageError naming the call to remove; the parameters, the
    optimizer's momentum, the scheduler and the counters are as the adapter left them."""
    accelerator = fresh_accelerator()
    model, opt, sched = accelerator.prepare(*W.make_objects(0))
    acc = Accumulator(accelerator, model, opt, steps=3, scheduler=sched)
    stop = 1 if where == "mid_window" else 2
    data = [W.microbatch(0, 0, j, n) for j, n in enumerate(SIZES)]
    for j, (x, y) in enumerate(acc.iterate(data)):
        with acc.microbatch():
            acc.backward(W.loss_fn(model(x), y, "mean"))
        if j == stop:
            break
    params = W.params_json(model)
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.optimizer.state.items()}
    steps = acc.stats.optimizer_steps
    assert steps == (0 if where == "mid_window" else 1)
    with pytest.raises(UsageError, match=r"optimizer\.step\(\) was called.*remove the call"):
        opt.step()
    with pytest.raises(UsageError, match=r"scheduler\.step\(\) was called.*remove the call"):
        sched.step()
    assert W.params_json(model) == params
    assert acc.stats.optimizer_steps == steps
    assert sched.scheduler.last_epoch == steps
    assert opt.param_groups[0]["lr"] == W.LR * W.GAMMA**steps
    after = opt.optimizer.state
    assert set(after) == set(momentum)
    assert all(torch.equal(after[k]["momentum_buffer"], v) for k, v in momentum.items())


# -- refusals -------------------------------------------------------------------------------------


def _untouched(accelerator: Accelerator, opt: Any, sched: Any, tmp_path: Path) -> None:
    """Nothing changed: the prepared optimizer and scheduler keep their own ``step``, no
    checkpoint hook was registered (``save_state`` writes no ``gradaccum/``)."""
    assert "step" not in vars(opt) and "step" not in vars(sched)
    accelerator.save_state(str(tmp_path / "state"))
    assert not (tmp_path / "state" / "gradaccum").exists()


def test_refuses_an_accelerator_that_accumulates(tmp_path: Path) -> None:
    """ACC-E2, ACC-E3: ``Accelerator(gradient_accumulation_steps=2)`` is refused (two
    accumulators would multiply the normalization) before anything changes."""
    accelerator = fresh_accelerator(gradient_accumulation_steps=2)
    model, opt, sched = accelerator.prepare(*W.make_objects(0))
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2.*steps= here"):
        Accumulator(accelerator, model, opt, steps=2, scheduler=sched)
    _untouched(accelerator, opt, sched, tmp_path)


def test_fp16_on_the_cpu_needs_an_explicit_scaler(tmp_path: Path) -> None:
    """ACC-E2, ACC-E3, ACC-F4: ``Accelerator(cpu=True, mixed_precision="fp16")`` has no loss
    scaler (Accelerate silently trains in fp32 on the CPU): refused without ``scaler=``;
    accepted with one, whose scale then applies (a window steps under fp16 autocast)."""
    accelerator = fresh_accelerator(mixed_precision="fp16")
    assert accelerator.scaler is None
    model, opt, sched = accelerator.prepare(*W.make_objects(0, dtype=torch.float32))
    with pytest.raises(ConfigError, match=r"mixed_precision='fp16'.*scaler="):
        Accumulator(accelerator, model, opt, steps=2, scheduler=sched)
    _untouched(accelerator, opt, sched, tmp_path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    acc = Accumulator(accelerator, model, opt, steps=2, scheduler=sched, scaler=scaler)
    assert acc.framework.scaler is scaler
    for x, y in acc.iterate([W.microbatch(0, 0, j, 3, torch.float32) for j in range(2)]):
        with acc.microbatch(), torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
            assert out.dtype == torch.float16
            acc.backward(W.loss_fn(out, y, "mean"))
    assert acc.stats.optimizer_steps == 1 and sched.scheduler.last_epoch == 1


def test_refuses_a_scaler_when_the_accelerator_has_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ACC-E2, ACC-E3: ``scaler=`` next to the Accelerator's own (enabled) loss scaler is
    refused; a scaler Accelerate made but torch disabled does not count.

    Accelerate makes its scaler only for fp16 on an accelerator device. With CUDA this is
    ``Accelerator(mixed_precision="fp16")``, whose enabled scaler makes ``scaler=`` a
    ConfigError. Without CUDA the same Accelerator is built on the device Accelerate's own
    ``ACCELERATE_TORCH_DEVICE`` names (``cuda``): Accelerate then makes a
    ``GradScaler("cuda")`` that torch disables for want of CUDA — it scales nothing, so
    ``scaler=`` is accepted and is the one used. The model is not looked at before the
    scaler checks, so an unprepared one serves."""
    cuda = torch.cuda.is_available()
    if not cuda:
        monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cuda")
    expected: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if not cuda:
        expected = pytest.warns(UserWarning, match="CUDA is not available")
    with expected:
        accelerator = Accelerator(mixed_precision="fp16")
    assert accelerator.scaler is not None
    assert accelerator.scaler.is_enabled() is cuda
    model, opt, _ = W.make_objects(0, scheduler=False)
    given = torch.amp.GradScaler("cpu")
    if cuda:
        with pytest.raises(ConfigError, match=r"has its own loss scaler.*drop scaler="):
            Accumulator(accelerator, model, opt, steps=2, scaler=given)
        assert "step" not in vars(opt)
    else:
        acc = Accumulator(accelerator, model, opt, steps=2, scaler=given)
        assert acc.scaler is given


def test_refuses_an_unknown_keyword_naming_the_closest(tmp_path: Path) -> None:
    """ACC-E2, ACC-E3, ACC-E4: an unknown keyword raises ConfigError naming the closest
    valid one, before anything changes."""
    accelerator = fresh_accelerator()
    model, opt, sched = accelerator.prepare(*W.make_objects(0))
    with pytest.raises(ConfigError, match=r"'lock_step' \(did you mean 'lockstep'\?\)"):
        Accumulator(accelerator, model, opt, steps=2, scheduler=sched, lock_step="window")
    _untouched(accelerator, opt, sched, tmp_path)


@pytest.mark.parametrize("bad", [0, 4, "3", True, 3.0])
def test_refuses_a_checkpoint_format_version_it_does_not_write(tmp_path: Path, bad: Any) -> None:
    """ACC-E2, ACC-E3, CKPT-26: ``checkpoint_format_version`` outside 1, 2, 3 (or not an
    int) raises ConfigError naming the value and the choices, before anything changes:
    no hook registered, the optimizer's ``step`` still Accelerate's."""
    accelerator = fresh_accelerator()
    model, opt, sched = accelerator.prepare(*W.make_objects(0))
    with pytest.raises(ConfigError, match=r"checkpoint_format_version=.*pass 1, 2, 3"):
        Accumulator(accelerator, model, opt, steps=2, checkpoint_format_version=bad)
    _untouched(accelerator, opt, sched, tmp_path)


def test_refuses_what_is_not_an_accelerator(tmp_path: Path) -> None:
    """ACC-E2, ACC-E3: a first argument that is not an ``accelerate.Accelerator`` (the model,
    as in gradaccum-torch's signature) is refused naming the type seen."""
    accelerator = fresh_accelerator()
    model, opt, sched = accelerator.prepare(*W.make_objects(0))
    with pytest.raises(ConfigError, match=r"must be an accelerate\.Accelerator, got Sequential"):
        Accumulator(model, model, opt, steps=2, scheduler=sched)  # type: ignore[arg-type]
    _untouched(accelerator, opt, sched, tmp_path)


# -- AMP ------------------------------------------------------------------------------------------


def test_amp_overflow_skips_the_optimizer_and_the_scheduler() -> None:
    """ACC-F4, ACC-S3: fp16 on the CPU with ``GradScaler("cpu", init_scale=2**40)`` and
    autocast: window 0 overflows and is skipped without a scheduler step; the scale backs
    off (to 2**10) and the two later windows step, the scheduler once each."""
    accelerator = fresh_accelerator(mixed_precision="fp16")
    model, opt, sched = accelerator.prepare(*W.make_objects(0, dtype=torch.float32))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    acc = Accumulator(accelerator, model, opt, steps=3, scheduler=sched, scaler=scaler)
    initial = W.params_json(model)
    seen = []
    data = [W.microbatch(0, 0, j, n, torch.float32) for j, n in enumerate(SIZES)]
    for x, y in acc.iterate(data):
        with acc.microbatch():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = W.loss_fn(model(x), y, "mean")
            result = acc.backward(loss)
        if result.boundary:
            seen.append(
                (
                    result.outcome,
                    acc.stats.optimizer_steps,
                    sched.scheduler.last_epoch,
                    scaler.get_scale(),
                    W.params_json(model) == initial,
                )
            )
    assert seen == [
        ("amp_overflow", 0, 0, 2.0**10, True),
        ("stepped", 1, 1, 2.0**10, False),
        ("stepped", 2, 2, 2.0**10, False),
    ]
    assert acc.stats.skipped_steps == 1


# -- checkpoints ----------------------------------------------------------------------------------

CKPT: dict[str, Any] = {"sizes": [[2, 5, 1, 3, 4, 2, 6, 1, 2]], "steps": 3, "seed": 0}


@pytest.mark.parametrize("format_version", [None, 1, 2, 3])
def test_save_state_mid_window_resumes_bitwise(tmp_path: Path, format_version: int | None) -> None:
    """ACC-R2, ACC-R3, CKPT-26: ``accelerator.save_state`` at position 2 of window 1 (items,
    host and device counts mixed), then fresh singletons, a fresh Accelerator and objects of
    another seed, ``load_state``: the rest of the run equals the uninterrupted one bitwise;
    the ``gradaccum/`` folder holds the in-flight gradients and the device item count, in the
    format ``checkpoint_format_version`` names (default: the current one)."""
    spec: dict[str, Any] = {**CKPT, "mid": 4, "boundary": 5}
    if format_version is not None:
        spec["format_version"] = format_version
    run = W.checkpoint_adapter(0, spec, tmp_path, "run")
    resume = W.checkpoint_adapter(0, spec, tmp_path, "resume")
    assert resume["windows"] == run["windows"][1:]
    assert resume["final"] == run["final"]
    assert resume["stats"] == run["stats"]
    assert resume["last_epoch"] == run["last_epoch"] == 3
    ckpt = read_checkpoint(tmp_path / "mid" / "gradaccum")
    assert ckpt.world_size == 1
    assert {"gradients", "items"} <= set(ckpt.roles)
    assert dict(ckpt.state)["position"] == 2
    assert ckpt.manifest.format_version == (format_version or FORMAT_VERSION)
    reference = W.reference({**spec, "normalization": "items", "scheduler": True})
    assert W.worst_error(run["windows"], reference) <= REL


def test_acc_save_mid_window_resumes_in_plain_gradaccum_torch_bitwise(tmp_path: Path) -> None:
    """ACC-R2, ACC-R5, CKPT-18: ``acc.save(dir)`` mid-window (items, a device count in the
    window) writes the shared format with the model, optimizer and scheduler; a plain-torch
    gradaccum Accumulator on a plain model of another seed loads it and finishes the pass
    bitwise equal to the uninterrupted Accelerate run."""
    sizes = CKPT["sizes"][0]
    data = [W.microbatch(0, 0, j, n) for j, n in enumerate(sizes)]

    def accelerate_run(save_after: int | None) -> list[dict[str, list[float]]]:
        accelerator = fresh_accelerator()
        model, opt, sched = accelerator.prepare(*W.make_objects(0))
        acc = Accumulator(accelerator, model, opt, steps=3, normalization="items", scheduler=sched)
        windows = []
        for j, (x, y) in enumerate(acc.iterate(data)):
            before = acc.machine.state.windows
            with acc.microbatch(torch.tensor(sizes[j]) if j % 2 else sizes[j]):
                acc.backward(W.loss_fn(model(x), y, "items"))
            if acc.machine.state.windows != before:
                windows.append(W.params_json(model))
            if j == save_after:
                acc.save(tmp_path / "xstack")
        return windows

    straight = accelerate_run(save_after=4)
    ckpt = read_checkpoint(tmp_path / "xstack")
    assert ckpt.producer.name == "gradaccum-accelerate"
    assert {"model", "optimizer", "gradients", "items"} <= set(ckpt.roles)
    assert ckpt.metadata["scheduler"]["class"] == "LambdaLR"  # the scheduler's JSON state

    model, opt, sched = W.make_objects(7)
    acc = TorchAccumulator(model, opt, steps=3, normalization="items", scheduler=sched)
    acc.load(tmp_path / "xstack")
    assert acc.machine.state.position == 2
    windows = []
    for j, (x, y) in enumerate(acc.iterate(data[5:]), start=5):
        before = acc.machine.state.windows
        with acc.microbatch(sizes[j]):
            acc.backward(W.loss_fn(model(x), y, "items"))
        if acc.machine.state.windows != before:
            windows.append(W.params_json(model))
    assert windows == straight[1:]
    assert sched.last_epoch == 3


def test_save_state_carries_the_explicit_scaler(tmp_path: Path) -> None:
    """ACC-R2, ACC-R3, ACC-F4: under fp16 on the CPU (``scaler=`` given, the documented
    way) the GradScaler's state (its scale after growing) must survive
    ``save_state``/``load_state`` like the rest of the state, or the resumed run scales
    its losses differently from the uninterrupted one."""

    def build() -> tuple[Accelerator, Any, Accumulator, torch.amp.GradScaler]:
        accelerator = fresh_accelerator(mixed_precision="fp16")
        objects = W.make_objects(0, scheduler=False, dtype=torch.float32)
        model, opt = accelerator.prepare(*objects[:2])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
        acc = Accumulator(accelerator, model, opt, steps=2, scaler=scaler)
        return accelerator, model, acc, scaler

    accelerator, model, acc, scaler = build()
    for x, y in acc.iterate([W.microbatch(0, 0, j, 3, torch.float32) for j in range(4)]):
        with acc.microbatch():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = W.loss_fn(model(x), y, "mean")
            acc.backward(loss)
    assert scaler.get_scale() == 2.0**6  # grown after each of the 2 steps
    accelerator.save_state(str(tmp_path / "state"))
    fresh, _, _, fresh_scaler = build()
    fresh.load_state(str(tmp_path / "state"))
    assert fresh_scaler.get_scale() == 2.0**6, f"scale {fresh_scaler.get_scale()} after load"


# -- plain Accelerate, side by side ---------------------------------------------------------------


def test_side_by_side_accumulate_under_weights_the_short_last_window() -> None:
    """Side by side, ACC-W3, ACC-N1: 7 microbatches from a prepared DataLoader in windows
    of 3 (3, 3, 1). Plain Accelerate (``gradient_accumulation_steps=3``,
    ``accelerator.accumulate``) divides every loss by 3, so the last window's step is a
    third of the large-batch step: its parameters leave the float64 reference by more
    than 1e-3 (relative); the adapter's stay within 1e-12."""
    sizes = [3] * 7
    accelerator = fresh_accelerator(gradient_accumulation_steps=3)
    model, opt, sched = accelerator.prepare(*W.make_objects(0))
    loader = W.sized_loader(accelerator, 0, sizes)
    plain = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(W.loss_fn(model(x), y, "mean"))
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            plain.append(W.params_json(model))
    want = reference(sizes, "mean")
    assert len(plain) == len(want) == 3
    full_windows = W.worst_error(plain[:2], want[:2])
    plain_error = W.rel_error(plain[2], want[2])
    adapter, _, _ = adapter_windows(sizes, "mean")
    adapter_error = W.worst_error(adapter, want)
    print(
        f"\nshort last window (1 of 3): plain Accelerate rel. error {plain_error:.3g} "
        f"(full windows {full_windows:.3g}); adapter {adapter_error:.3g}"
    )
    assert full_windows <= REL  # plain Accelerate is exact on full windows
    assert plain_error > 1e-3
    assert adapter_error <= REL


def test_side_by_side_save_state_mid_window(tmp_path: Path) -> None:
    """Side by side, ACC-R2: ``save_state`` after microbatch 4 (position 2 of window 1),
    resumed in fresh objects. Plain Accelerate saves no gradient: the resumed run's final
    parameters leave the uninterrupted run's (window 1 steps without its first two
    microbatches); the adapter's resume is bitwise, window by window."""
    spec = {**CKPT, "mid": 4, "boundary": 5}
    plain_run = W.checkpoint_plain(0, spec, tmp_path, "run")
    plain_resume = W.checkpoint_plain(0, spec, tmp_path, "resume")
    run = W.checkpoint_adapter(0, spec, tmp_path, "run")
    resume = W.checkpoint_adapter(0, spec, tmp_path, "resume")
    # The final parameters, not window by window: how many windows Accelerate closes after
    # load_state depends on its release (1.15 restores its step counter, 1.0 does not).
    plain_error = W.rel_error(plain_resume["final"], plain_run["final"])
    adapter_error = W.worst_error(resume["windows"], run["windows"][1:])
    print(
        f"\nmid-window save_state/load_state, one process: plain Accelerate resume deviates "
        f"by {plain_error:.3g} (rel.); adapter {adapter_error}"
    )
    assert plain_error > 1e-3
    assert adapter_error == 0.0 and resume["final"] == run["final"]


def test_zero_grad_inside_an_open_window_is_refused() -> None:
    """ACC-E4, ACC-B2: ``optimizer.zero_grad()`` on the prepared optimizer inside an open
    window would discard the window's gradient (Accelerate lets it through on the boundary
    microbatch): it raises UsageError naming the call to remove, and the window's gradient is
    untouched; between windows it is harmless and allowed."""
    from gradaccum import UsageError

    _accelerator, model, optimizer, acc = _zero_grad_setup()
    x = torch.randn(4, 3, dtype=torch.float64)
    optimizer.zero_grad()  # no window open: allowed
    with acc.microbatch():
        acc.backward(model(x).pow(2).mean())
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(UsageError, match=r"optimizer\.zero_grad\(\)"):
        optimizer.zero_grad()
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with acc.microbatch():
        acc.backward(model(x).pow(2).mean())
    assert acc.stats.optimizer_steps == 1
    optimizer.zero_grad()  # after the boundary: allowed again


def _zero_grad_setup() -> tuple[Any, Any, Any, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from gradaccum_accelerate import Accumulator

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    return accelerator, model, optimizer, Accumulator(accelerator, model, optimizer, steps=2)


# -- claims of docs/accelerate.md ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM"])
def test_refuses_distributed_types_it_does_not_support(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ACC-E2, ACC-E3: DeepSpeed, FSDP, XLA and Megatron-LM are refused with ConfigError naming
    what is supported. (None of them can run on this machine: the Accelerator's distributed
    type is set on its state, the fault alone.)"""
    from accelerate.utils import DistributedType

    with one_process():
        accelerator = fresh_accelerator()
        model, opt, _ = W.make_objects(0, scheduler=False)
        model, opt = accelerator.prepare(model, opt)
        monkeypatch.setattr(accelerator.state, "distributed_type", DistributedType[kind])
        with pytest.raises(ConfigError, match=rf"{kind}.*supported: one process, MULTI_CPU"):
            Accumulator(accelerator, model, opt, steps=2)
        assert "step" not in vars(opt)


def test_refuses_an_unprepared_model_on_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """ACC-E2, ACC-E3: on several processes the model must be the DistributedDataParallel that
    accelerator.prepare returned; a bare module is refused naming the type seen. (The process
    count is set on the Accelerator's state: the check comes before any collective.)"""
    with one_process():
        accelerator = fresh_accelerator()
        model, opt, _ = W.make_objects(0, scheduler=False)
        model, opt = accelerator.prepare(model, opt)
        monkeypatch.setattr(accelerator.state, "num_processes", 2)
        with pytest.raises(ConfigError, match=r"DistributedDataParallel\), got Sequential"):
            Accumulator(accelerator, model, opt, steps=2)


def test_load_state_without_a_gradaccum_folder_loads_as_usual(tmp_path: Path) -> None:
    """ACC-R3: ``load_state`` of a checkpoint written without gradaccum (no ``gradaccum/``
    folder) restores Accelerate's part and leaves the accumulator where it was (no window
    open): the model's parameters are the saved ones, bitwise."""
    with one_process():
        accelerator = fresh_accelerator()
        model, opt, _ = W.make_objects(0, scheduler=False)
        model, opt = accelerator.prepare(model, opt)
        accelerator.save_state(str(tmp_path / "plain"))
        saved = W.params_json(model)
        assert not (tmp_path / "plain" / "gradaccum").exists()
        accelerator = fresh_accelerator()
        model, opt, _ = W.make_objects(1, scheduler=False)  # other weights
        model, opt = accelerator.prepare(model, opt)
        acc = Accumulator(accelerator, model, opt, steps=2)
        accelerator.load_state(str(tmp_path / "plain"))
        assert W.params_json(model) == saved
        assert acc.machine.state.micro_steps == 0 and not acc.is_accumulating


def test_optimizer_step_was_skipped_is_not_updated_an_overflow_shows_in_the_result() -> None:
    """ACC-F4: an AMP overflow (fp16 on the CPU with an explicit GradScaler) skips the step;
    ``accelerator.optimizer_step_was_skipped`` stays False (the accumulator steps the raw
    optimizer, not Accelerate's wrapper) while ``BackwardResult.outcome`` and
    ``stats.skipped_steps`` report it."""
    with one_process():
        accelerator = fresh_accelerator(mixed_precision="fp16")
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
        acc = Accumulator(accelerator, model, opt, steps=1, scaler=scaler)
        with acc.microbatch(), torch.autocast("cpu", dtype=torch.float16):
            result = acc.backward(model(torch.full((4, 3), 1e3)).pow(2).sum())
        assert result.outcome == "amp_overflow" and not result.stepped
        assert acc.stats.skipped_steps == 1
        assert accelerator.optimizer_step_was_skipped is False
