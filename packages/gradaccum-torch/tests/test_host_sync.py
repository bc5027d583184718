"""No host-device synchronisation on microbatches that are not the last of
their window (spec ACC-B3, ACC-N3, ACC-L3).

On a CPU there is no device to wait for, so the test counts every call that
would force a CUDA host sync — ``Tensor.item``, ``__bool__``, ``__float__``,
``__int__``, ``__index__``, ``tolist`` — while the accumulator runs, and
attributes each to the microbatch in which it happened. On a GPU the same
promise is checked with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import make_batches, make_model, sum_loss

from gradaccum import ClipPolicy, GradientWeights
from gradaccum_torch import Accumulator

SYNCING = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


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
