"""No host-device synchronisation on microbatches that are not the last of
their window, and at most one read at a boundary (spec ACC-B3, ACC-B4,
ACC-N3, ACC-L3).

On a CPU there is no device to wait for, so the test counts every call that
would force a CUDA host sync — ``Tensor.item``, ``__bool__``, ``__float__``
(``math.isfinite(tensor)`` goes through it), ``__int__``, ``__index__``,
``tolist``, ``numpy`` — while the accumulator runs, and attributes each to
the microbatch in which it happened. On a GPU the same promise is checked
with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import make_batches, make_model, sum_loss

from gradaccum import ClipPolicy, GradientWeights
from gradaccum_torch import Accumulator

SYNCING = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def count_host_reads(counter: list[int]) -> Iterator[None]:
    """Count calls of every tensor method that reads a value back to the host."""
    originals: dict[str, Callable[..., Any]] = {
        name: getattr(torch.Tensor, name) for name in SYNCING
    }

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            return original(self, *args, **kwargs)

        return counted

    try:
        for name in SYNCING:
            setattr(torch.Tensor, name, wrap(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


CONFIGS: dict[str, dict[str, Any]] = {
    "mean": {"normalization": "mean"},
    "items-int": {"normalization": "items"},
    "items-tensor": {"normalization": "items"},
    "clip-norm": {"normalization": "mean", "clip": ClipPolicy(1.0)},
    "clip-value": {"normalization": "mean", "clip": ClipPolicy(0.1, mode="value")},
    "weights": {"normalization": "mean", "weights": GradientWeights.of({"0.*": 0.5})},
    "fp32-accumulation": {"normalization": "mean", "accumulation_dtype": "float32"},
    "offload": {"normalization": "mean", "offload": True},
    "amp-fp16": {"normalization": "mean"},
    "track-grad-norm": {"normalization": "mean", "track_grad_norm": True},
    "clip-per-microbatch": {"normalization": "mean", "clip": ClipPolicy(1.0, per_microbatch=True)},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_host_reads_off_the_boundary(name: str) -> None:
    """ACC-B3, ACC-N3: zero host reads on the k-1 microbatches before each boundary."""
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu") if name == "amp-fp16" else None
    acc = Accumulator(model, opt, steps=4, scaler=scaler, **CONFIGS[name])
    batches = make_batches([3, 2, 4, 1, 3, 2, 2, 5], dtype=torch.float32)
    per_microbatch: list[tuple[bool, int]] = []
    counter = [0]
    with count_host_reads(counter):
        for batch in acc.iterate(batches):
            before = counter[0]
            n = len(batch[0])
            items: int | torch.Tensor = torch.tensor(n) if name == "items-tensor" else n
            with acc.microbatch(items=items):
                boundary = acc.sync_gradients
                if name == "amp-fp16":
                    with torch.autocast("cpu", dtype=torch.float16):
                        out = model(batch[0])
                    loss = ((out.float() - batch[1]) ** 2).sum()
                else:
                    loss = sum_loss(model, batch)
                acc.backward(loss if acc.config.normalization == "items" else loss / n)
            per_microbatch.append((boundary, counter[0] - before))
    off_boundary = [reads for boundary, reads in per_microbatch if not boundary]
    assert len(off_boundary) == 6
    assert off_boundary == [0] * 6, f"host reads per non-boundary microbatch: {per_microbatch}"
    # The boundary does read (the non-finite verdict), so the counter can see reads.
    assert all(reads > 0 for boundary, reads in per_microbatch if boundary)
    assert acc.stats.optimizer_steps == 2


def test_the_counter_sees_every_read_path() -> None:
    """The probe itself: each way of reading a tensor's value on the host counts at least
    once — math.isfinite(t) and float(t) (__float__), bool(t), int(t), operator.index(t),
    t.item(), t.tolist(), t.numpy() — and nothing is counted outside the context."""
    t = torch.tensor(1.5)
    i = torch.tensor(2)
    reads: list[Callable[[], object]] = [
        lambda: math.isfinite(t),  # type: ignore[arg-type]
        lambda: float(t),
        lambda: bool(t),
        lambda: int(t),
        lambda: operator.index(i),
        lambda: t.item(),
        lambda: t.tolist(),
        lambda: t.numpy(),
    ]
    counter = [0]
    with count_host_reads(counter):
        counts = []
        for read in reads:
            before = counter[0]
            read()
            counts.append(counter[0] - before)
    assert all(c >= 1 for c in counts), counts
    after = counter[0]
    math.isfinite(t)  # type: ignore[arg-type]
    assert counter[0] == after


BOUNDARY_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "clip-norm": {"clip": ClipPolicy(1.0)},
    "clip-value": {"clip": ClipPolicy(0.1, mode="value")},
    "items-int": {"normalization": "items"},
    "items-tensor": {"normalization": "items"},
    "amp-fp16": {},
    "track-grad-norm": {"track_grad_norm": True},
}


@pytest.mark.parametrize("name", list(BOUNDARY_CONFIGS))
def test_at_most_one_host_read_per_boundary(name: str) -> None:
    """ACC-B4, ACC-B3: 10 microbatches at steps=4 (windows of 4, 4 and a short last 2): each
    of the 3 boundaries makes at most one device-to-host read, the 7 other microbatches and
    the end of the pass none, and all 3 windows step. The code before spec 1.1 read the
    norm, the device item count and the scaler's found-inf separately (up to 3 per
    boundary)."""
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu") if name == "amp-fp16" else None
    acc = Accumulator(model, opt, steps=4, scaler=scaler, **BOUNDARY_CONFIGS[name])
    batches = make_batches([3, 2, 4, 1, 3, 2, 2, 5, 1, 4], dtype=torch.float32)
    per_microbatch: list[tuple[bool, int]] = []
    counter = [0]
    with count_host_reads(counter):
        for batch in acc.iterate(batches):
            before = counter[0]
            n = len(batch[0])
            items: int | torch.Tensor = torch.tensor(n) if name == "items-tensor" else n
            with acc.microbatch(items=items):
                boundary = acc.sync_gradients
                if name == "amp-fp16":
                    with torch.autocast("cpu", dtype=torch.float16):
                        out = model(batch[0])
                    loss = ((out.float() - batch[1]) ** 2).sum()
                else:
                    loss = sum_loss(model, batch)
                acc.backward(loss if acc.config.normalization == "items" else loss / n)
            per_microbatch.append((boundary, counter[0] - before))
    at_boundary = [reads for boundary, reads in per_microbatch if boundary]
    assert len(at_boundary) == 3
    assert all(reads <= 1 for reads in at_boundary), f"reads per microbatch: {per_microbatch}"
    assert counter[0] == sum(at_boundary), f"reads off the boundaries: {per_microbatch}"
    assert acc.stats.optimizer_steps == 3
