"""Adaptive microbatching (`Accumulator.run`): recovery from out-of-memory errors,
exactness, grow-back, checkpoints (spec ACC-K5, ACC-N2).

The central test is real: a child process caps its address space with
``RLIMIT_AS`` and the CPU allocator fails for real. Injected errors only add the
cases a real fault cannot place precisely (a failure mid-window, in a backward).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_batches, make_model, params_of, sum_loss

from gradaccum import AdaptiveMicrobatch, ConfigError, UsageError
from gradaccum_torch import Accumulator
from gradaccum_torch.adaptive import AdaptiveOutOfMemoryError, is_out_of_memory, slice_batch
from gradaccum_torch.demo import adaptive as demo

CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"


def batches(windows: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches([rows] * windows)


def adaptive_acc(
    model: torch.nn.Module, target: int, micro: int, grow_after: int = 50, **kw: object
) -> Accumulator:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = AdaptiveMicrobatch(
        target=target,
        micro_batch=micro,
        grow_after=grow_after,
        **kw,  # type: ignore[arg-type]
    )
    return Accumulator(model, opt, schedule=schedule, normalization="items")


def fixed_params(data: list[tuple[torch.Tensor, torch.Tensor]], micro: int) -> list[torch.Tensor]:
    """The reference: the same data with a fixed microbatch of ``micro`` rows."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = len(data[0][0])
    acc = Accumulator(model, opt, -(-rows // micro), normalization="items")
    for batch in data:
        for start in range(0, rows, micro):
            part = slice_batch(batch, start, start + micro)
            with acc.microbatch(len(part[0])):
                acc.backward(sum_loss(model, part))  # type: ignore[arg-type]
    return params_of(model)


def failing(
    model: torch.nn.Module,
    fail_at: set[int],
    where: str = "forward",
    exc: Callable[[], BaseException] | None = None,
) -> Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A summed loss whose ``n``-th calls (from 1) fail with the CPU allocator's
    error, in the forward or inside the backward (a hook on the output)."""
    calls = [0]
    make = exc or (lambda: RuntimeError(CPU_OOM))

    def loss_fn(part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls[0] += 1
        if calls[0] in fail_at and where == "forward":
            raise make()
        loss = sum_loss(model, part)
        if calls[0] in fail_at and where == "backward":
            out = loss * 1.0

            def boom(grad: torch.Tensor) -> torch.Tensor:
                raise make()

            # The backward starts, then fails (the allocator's error, raised by a hook).
            out.register_hook(boom)
            return out
        return loss

    return loss_fn


def test_real_allocation_failure_recovers_and_matches_fixed_size(tmp_path: Path) -> None:
    """ACC-K5, ACC-N2: in a child whose address space is capped (RLIMIT_AS), a
    microbatch of 256 rows fails in the real CPU allocator; the run halves, goes
    on, grows back after 2 clean windows, and its parameters equal a fixed run
    with the final microbatch size within 1e-12 (float64)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc are Linux-only")
    record, params = demo.run_capped(workdir=tmp_path, echo=False)
    assert record["events"], "the cap did not produce an allocation failure"
    assert all("can't allocate memory" in e["error"] for e in record["events"])
    assert record["events"][0]["old_size"] == 256 and record["events"][0]["new_size"] == 128
    sizes = record["sizes"]
    assert min(sizes) < 256 and sizes[-1] > min(sizes), f"no grow-back: {sizes}"
    assert record["optimizer_steps"] == 7
    final = record["final_size"]
    reference = demo.fixed_run(7, 256, final)
    assert demo.deviation(params, reference) <= 1e-12


def test_demo_prints_recovery_growth_and_monitors(capsys: pytest.CaptureFixture[str]) -> None:
    """ACC-K5: ``python -m gradaccum_torch.demo.adaptive`` (5 windows) exits 0 — its
    parameters equal the fixed-size run within 1e-12 — and prints the real
    allocation failure, the grow-back, the MemoryMonitor's advice and the
    PerformanceTracker's metrics."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc are Linux-only")
    assert demo.main(["--windows", "5"]) == 0
    out = capsys.readouterr().out
    assert "OOM in window 0 after 0 kept microbatch(es): 256 -> 128 rows" in out
    assert "can't allocate memory" in out
    assert "started at micro_batch=128, now 256" in out  # grown back
    assert "advice: a row of a microbatch takes about" in out
    assert "host_reads_per_step=1" in out
    assert "final micro_batch=256; parameters vs a fixed micro_batch=256 run" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: needs a real GPU OOM")
def test_real_cuda_out_of_memory_recovers() -> None:  # pragma: no cover - GPU only
    """ACC-K5: a real torch.cuda.OutOfMemoryError under
    set_per_process_memory_fraction is recovered from; the parameters equal a
    fixed run with the final size within 1e-12 (float64)."""
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    rows, width = 512, 16384
    per_row = 4 * width * 8
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved(device)
    budget = base + 64 * 2**20 + per_row * rows // 3  # about a third of the batch fits
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
        ).to(device, torch.float64)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(1)
        data = [
            (torch.randn(rows, 16, generator=gen, dtype=torch.float64).to(device),
             torch.randn(rows, 1, generator=gen, dtype=torch.float64).to(device))
            for _ in range(3)
        ]  # fmt: skip
        acc = adaptive_acc(model, rows, rows)
        for batch in data:
            acc.run(batch, lambda p: ((model(p[0]) - p[1]) ** 2).sum())
        assert acc.adaptive.events and acc.adaptive.micro_batch < rows
        final = acc.adaptive.micro_batch
        got = [p.detach().clone() for p in model.parameters()]
        model.load_state_dict(start)
        ref = Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.1), -(-rows // final),
            normalization="items",
        )  # fmt: skip
        for x, y in data:
            for s in range(0, rows, final):
                with ref.microbatch(len(x[s : s + final])):
                    ref.backward(((model(x[s : s + final]) - y[s : s + final]) ** 2).sum())
        for a, b in zip(got, model.parameters(), strict=True):
            assert (a - b).abs().max().item() <= 1e-12
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_forward_oom_mid_window_keeps_earlier_microbatches() -> None:
    """ACC-K5: an OOM in the 3rd microbatch's forward cancels only it: the two
    earlier microbatches stay, the size halves 4 -> 2, and the parameters equal the large-batch step
    within 1e-12 (injected, in addition to the real fault above)."""
    data = batches(2, 16)
    model = make_model()
    acc = adaptive_acc(model, 16, 4)
    loss_fn = failing(model, {3})
    acc.run(data[0], loss_fn)
    # 2 microbatches of 4 kept, then 8 rows left at 2 rows: 4 more microbatches.
    assert acc.stats.micro_steps == 6
    assert acc.stats.dropped_windows == 0
    assert acc.adaptive.micro_batch == 2
    event = acc.adaptive.events[0]
    assert (event.position, event.old_size, event.new_size, event.replayed) == (2, 4, 2, False)
    acc.run(data[1], loss_fn)
    assert acc.stats.optimizer_steps == 2
    reference = fixed_params(data, 16)
    for a, b in zip(params_of(model), reference, strict=True):
        assert (a - b).abs().max().item() <= 1e-12


def test_backward_oom_after_grad_holds_the_window_replays_it() -> None:
    """ACC-K5: an OOM inside the 2nd microbatch's backward (param.grad already
    holds the 1st) cannot be separated, so the window is replayed from its first
    row at the halved size; the update is still the large-batch one (1e-12)."""
    data = batches(1, 8)
    model = make_model()
    acc = adaptive_acc(model, 8, 4)
    acc.run(data[0], failing(model, {2}, where="backward"))
    event = acc.adaptive.events[0]
    assert event.replayed and event.position == 0 and event.new_size == 2
    assert acc.stats.dropped_windows == 1 and acc.stats.optimizer_steps == 1
    for a, b in zip(params_of(model), fixed_params(data, 8), strict=True):
        assert (a - b).abs().max().item() <= 1e-12


def test_backward_oom_with_offload_is_cancelled_exactly() -> None:
    """ACC-K5, ACC-P2: with the window in a buffer (offload=True) a backward OOM
    mid-window cancels only that microbatch (no replay, 1e-12)."""
    data = batches(1, 8)
    model = make_model()
    acc = adaptive_acc(model, 8, 4)
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=AdaptiveMicrobatch(target=8, micro_batch=4),
        normalization="items",
        offload=True,
    )
    acc.run(data[0], failing(model, {2}, where="backward"))
    event = acc.adaptive.events[0]
    assert not event.replayed and event.position == 1
    assert acc.stats.dropped_windows == 0
    for a, b in zip(params_of(model), fixed_params(data, 8), strict=True):
        assert (a - b).abs().max().item() <= 1e-12


def test_grows_back_after_clean_windows() -> None:
    """ACC-K5: after one OOM (8 -> 4) and grow_after=2 clean windows the size is 8 again."""
    data = batches(4, 8)
    model = make_model()
    acc = adaptive_acc(model, 8, 8, grow_after=2)
    loss_fn = failing(model, {1}, exc=lambda: MemoryError("real MemoryError type"))
    seen = []
    for batch in data:
        acc.run(batch, loss_fn)
        seen.append(acc.adaptive.micro_batch)
    # The window that ran out of memory does not count as clean.
    assert seen == [4, 4, 8, 8]


def test_min_size_oom_raises_and_discards() -> None:
    """ACC-K5, ACC-E4: when even min_micro_batch rows fail, AdaptiveOutOfMemoryError
    (a GradAccumError) says so; the window is discarded and the accumulator idle."""
    model = make_model()
    before = params_of(model)
    acc = adaptive_acc(model, 4, 2, min_micro_batch=1)
    with pytest.raises(AdaptiveOutOfMemoryError, match="min_micro_batch=1"):
        acc.run(batches(1, 4)[0], failing(model, {1, 2, 3, 4}))
    assert not acc.is_accumulating
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before, strict=True))


def test_other_errors_propagate_unchanged() -> None:
    """ACC-K5: an error that is not out-of-memory is not swallowed; the window it broke
    (one microbatch already summed) is discarded, parameters untouched, and the next
    run() starts a clean window and steps."""
    model = make_model()
    before = params_of(model)
    acc = adaptive_acc(model, 4, 2)
    with pytest.raises(ValueError, match="bad data"):
        acc.run(batches(1, 4)[0], failing(model, {2}, exc=lambda: ValueError("bad data")))
    assert acc.adaptive.events == []
    assert not acc.is_accumulating and acc.machine.state.position == 0
    assert acc.stats.dropped_windows == 1 and acc.stats.optimizer_steps == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before, strict=True))
    result = acc.run(batches(1, 4)[0], lambda part: sum_loss(model, part))
    assert result.stepped and acc.stats.optimizer_steps == 1


def test_bad_use_is_refused_before_anything_runs() -> None:
    """ACC-E4: a fixed schedule (ConfigError), a batch of the wrong length and
    mixed tensor lengths (UsageError) are refused with the fix; mean is refused by
    the schedule itself (ConfigError)."""
    model = make_model()
    fixed = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    with pytest.raises(ConfigError, match="AdaptiveMicrobatch"):
        fixed.run(batches(1, 4)[0], lambda p: sum_loss(model, p))
    acc = adaptive_acc(model, 4, 2)
    with pytest.raises(UsageError, match="holds 6 rows"):
        acc.run(batches(1, 6)[0], lambda p: sum_loss(model, p))
    with pytest.raises(UsageError, match="different lengths"):
        acc.run((torch.zeros(4, 4), torch.zeros(3, 1)), lambda p: sum_loss(model, p))
    with pytest.raises(ConfigError, match="normalization='items'"):
        Accumulator(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            schedule=AdaptiveMicrobatch(target=4, micro_batch=2),
            normalization="mean",
        )
    assert acc.stats.micro_steps == 0


def test_dict_batches_and_item_counts() -> None:
    """ACC-K5, ACC-N3: a dict batch with a token-style item count (a device
    tensor) gives the same update as the fixed run over the same counts (1e-12)."""
    data = batches(1, 8)
    x, y = data[0]
    mask = (torch.arange(8) % 3 != 0).to(torch.float64)
    model = make_model()
    acc = adaptive_acc(model, 8, 8)
    calls = [0]

    def loss_fn(part: dict[str, torch.Tensor]) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError(CPU_OOM)
        per_row = ((model(part["x"]) - part["y"]) ** 2).sum(dim=1)
        return (per_row * part["m"]).sum()

    acc.run({"x": x, "y": y, "m": mask}, loss_fn, items=lambda p: p["m"].sum())
    ref_model = make_model()
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    per_row = ((ref_model(x) - y) ** 2).sum(dim=1)
    ((per_row * mask).sum() / mask.sum()).backward()
    opt.step()
    for a, b in zip(params_of(model), params_of(ref_model), strict=True):
        assert (a - b).abs().max().item() <= 1e-12


def test_checkpoint_after_shrink_resumes_identically(tmp_path: Path) -> None:
    """ACC-K5, CKPT: the adaptive state (size 2, clean-window count, OOM count)
    is saved in the checkpoint's schedule state; fresh objects loaded from it
    continue exactly like the original (parameters equal, same sizes)."""
    data = batches(5, 8)
    model = make_model()
    acc = adaptive_acc(model, 8, 8, grow_after=3)
    acc.run(data[0], failing(model, {1, 2}))  # 8 -> 4 -> 2
    acc.run(data[1], lambda p: sum_loss(model, p))
    saved = dict(acc.machine.state.schedule_state)
    assert saved == {"micro_batch": 2, "clean_windows": 1, "ooms": 2}
    acc.save(tmp_path / "ckpt")
    fresh = make_model(seed=5)
    acc2 = adaptive_acc(fresh, 8, 8, grow_after=3)
    acc2.load(tmp_path / "ckpt")
    assert acc2.adaptive.micro_batch == 2 and acc2.adaptive.clean_windows == 1
    sizes, sizes2 = [], []
    for batch in data[2:]:
        acc.run(batch, lambda p: sum_loss(model, p))
        acc2.run(batch, lambda p: sum_loss(fresh, p))
        sizes.append(acc.adaptive.micro_batch)
        sizes2.append(acc2.adaptive.micro_batch)
    assert sizes == sizes2 == [2, 4, 4]
    for a, b in zip(params_of(model), params_of(fresh), strict=True):
        assert torch.equal(a, b)


def test_is_out_of_memory_classifies() -> None:
    """ACC-K5: the recovered errors are exactly the allocator's."""
    assert is_out_of_memory(RuntimeError(CPU_OOM))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(AdaptiveOutOfMemoryError("x"))


def test_example_runs(tmp_path: Path) -> None:
    """The example trains 3 steps with acc.run and prints the monitors' numbers."""
    script = Path(__file__).parents[3] / "examples" / "adaptive_train.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--batch", "16", "--width", "64"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "step   3: micro_batch   16 ->   16" in out
    assert "perf/host_reads_per_step': 1.0" in out
