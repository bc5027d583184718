"""The declared torch range: the code paths that differ between torch releases agree.

`gradaccum_torch.grads` computes the float32 norm of bf16/fp16 gradients with
``torch._foreach_norm(..., dtype=float32)`` on torch 2.4 and later, and through float32 copies
on torch 2.3, which has no ``dtype`` there. The version cells of the nox matrix run the whole
suite on each release; this file runs both paths on whichever torch is installed.
"""

from __future__ import annotations

import pytest
import torch

from gradaccum import ClipPolicy
from gradaccum_torch import grads


@pytest.fixture
def old_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the torch-2.3 path (float32 copies) on this torch."""
    monkeypatch.setattr(grads, "_FOREACH_NORM_DTYPE", False)


def _grads(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    # values in the hundreds: their squares (up to about 4e5) overflow fp16 (65504)
    return [(torch.randn(n, generator=gen) * 200).to(dtype) for n in (100, 120, 80)]


def _float64_norm(gs: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in gs])))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_norm_is_float32_on_both_paths(
    dtype: torch.dtype, old_torch_path: None
) -> None:
    """ACC-B1 (clip by norm): the total norm of fp16/bf16 gradients whose squares overflow fp16
    is a float32 equal to the float64 norm of the same values within 1e-6 relative, on the
    torch-2.3 path (float32 copies)."""
    gs = _grads(dtype)
    norm = grads.total_norm(gs)
    assert norm.dtype == torch.float32
    expected = _float64_norm(gs)
    assert abs(norm.item() - expected) <= 1e-6 * expected
    assert all(g.dtype == dtype for g in gs)  # the gradients themselves are not converted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_both_paths_clip_alike(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """ACC-B1: clipping fp16/bf16 gradients to norm 1.0 gives bit-identical gradients and the
    same pre-clip norm on the torch >= 2.4 path (where this torch has it) and on the
    torch-2.3 path."""
    if not grads._FOREACH_NORM_DTYPE:
        pytest.skip(f"torch {torch.__version__} has only the float32-copy path")
    new = _grads(dtype)
    new_norm = grads.clip_(new, ClipPolicy(1.0))
    monkeypatch.setattr(grads, "_FOREACH_NORM_DTYPE", False)
    old = _grads(dtype)
    old_norm = grads.clip_(old, ClipPolicy(1.0))
    assert new_norm is not None and old_norm is not None
    assert torch.equal(new_norm, old_norm)
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a, b)
