"""gradaccum-torch on a CUDA device (the `gpu` nox session runs these; on a machine without CUDA
every test here skips, saying so).

What the CPU tests prove by counting host-read calls (test_host_sync.py), this file proves on
the GPU with torch's own detector: ``torch.cuda.set_sync_debug_mode("error")`` is on for every
microbatch that is not a boundary, so any host-device synchronisation there raises (ACC-B3).
The trajectory is compared with the same accumulator's float64 run on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import make_batches, make_model, params_of

from gradaccum_torch import Accumulator

CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA is not available (torch.cuda.is_available() is False): run `nox -s gpu` on a GPU"
pytestmark = pytest.mark.skipif(not CUDA, reason=NO_CUDA)

SIZES = [3, 2, 4, 1, 3, 2, 2, 5, 1, 4]  # steps=4: windows of 4, 4 and a short last one of 2
STEPS = 4
# relative to the float64 CPU run, after 3 SGD steps on a 2-layer MLP
TOLERANCE = {"float32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


@contextmanager
def sync_is_an_error(on: bool) -> Iterator[None]:
    """Within the block, any CUDA host synchronisation raises (when ``on``)."""
    previous = torch.cuda.get_sync_debug_mode()
    if on:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def train(device: str, precision: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], int]:
    """Run the accumulator over SIZES; return the final parameters (on the CPU, float64) and
    the number of optimizer steps. On CUDA, a sync off the boundary raises."""
    model = make_model(dtype).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # a real GradScaler; 2**8, not the default 2**16, so that the fp16 activation gradients
    # of this loss stay finite and every window steps
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8) if precision == "fp16" else None
    acc = Accumulator(model, opt, steps=STEPS, scaler=scaler, normalization="mean")
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(SIZES, dtype=dtype)]
    autocast: dict[str, Any] = {
        "bf16": {"dtype": torch.bfloat16},
        "fp16": {"dtype": torch.float16},
    }.get(precision, {})
    if device == "cuda":
        torch.cuda.synchronize()  # the set-up copies are done before the checked loop
    for index, batch in enumerate(acc.iterate(batches)):
        boundary = index % STEPS == STEPS - 1 or index == len(SIZES) - 1
        checked = device == "cuda" and not boundary
        with sync_is_an_error(checked), acc.microbatch(items=len(batch[0])):
            assert acc.sync_gradients == boundary
            with torch.autocast(device, enabled=bool(autocast), **autocast):
                out = model(batch[0])
            loss = ((out.float() - batch[1].float()) ** 2).mean()
            acc.backward(loss)
    return [p.double().cpu() for p in params_of(model)], acc.stats.optimizer_steps


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_cuda_run_has_no_sync_off_the_boundary_and_follows_float64(precision: str) -> None:
    """ACC-B3, ACC-P3, ACC-F4: on CUDA at float32, bf16 autocast and fp16 autocast with a real
    GradScaler, no host synchronisation happens on the 7 microbatches that are not boundaries
    (set_sync_debug_mode("error") raises on one), all 3 windows step, and the parameters equal
    the float64 CPU run within 1e-4 (float32), 5e-2 (bf16), 1e-2 (fp16) relative."""
    expected, expected_steps = train("cpu", "float64", torch.float64)
    found, steps = train("cuda", precision, torch.float32)
    assert expected_steps == 3
    assert steps == 3
    for a, b in zip(found, expected, strict=True):
        deviation = ((a - b).abs().max() / b.abs().max()).item()
        assert deviation <= TOLERANCE[precision], (precision, deviation)


def test_the_detector_raises_on_a_sync() -> None:
    """The probe itself: with the mode on, reading a CUDA value on the host raises, and the
    previous mode is restored afterwards (ACC-B3)."""
    value = torch.ones(1, device="cuda")
    with pytest.raises(RuntimeError), sync_is_an_error(True):
        value.item()
    assert torch.cuda.get_sync_debug_mode() == 0
