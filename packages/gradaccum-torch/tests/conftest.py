"""Shared builders for gradaccum-torch's tests: tiny deterministic models and data."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A 2-layer MLP with fixed initial weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        dtype
    )


def make_batches(
    sizes: list[int], dtype: torch.dtype = torch.float64, seed: int = 1
) -> list[Batch]:
    """Microbatches of the given sizes (rows), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 4, generator=gen, dtype=dtype),
            torch.randn(n, 1, generator=gen, dtype=dtype),
        )
        for n in sizes
    ]


def sum_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Squared error summed over rows (for ``items`` normalization)."""
    x, y = batch
    return ((model(x) - y) ** 2).sum()


def mean_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Squared error averaged over rows."""
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of the parameters, in order."""
    return [p.detach().clone() for p in model.parameters()]


def max_rel_dev(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max|a-b| / max|b|."""
    return max(
        ((x - y).abs().max() / y.abs().max().clamp(min=1e-30)).item()
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture
def model_factory() -> Callable[..., torch.nn.Module]:
    """The model builder, as a fixture."""
    return make_model


def pytest_configure(config: pytest.Config) -> None:
    """gradaccum-torch promises every precision: unless ``--gradaccum-dtype`` is
    given, its conformance run covers float64, float32, bf16 and fp16."""
    given = any(str(a).startswith("--gradaccum-dtype") for a in config.invocation_params.args)
    if not given:
        config.option.gradaccum_dtype = "float64,float32,bf16,fp16"
