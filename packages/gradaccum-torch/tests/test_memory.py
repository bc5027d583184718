"""ACC memory promise: in the default configuration the accumulator holds no
parameter-sized buffer; the only gradient storage is ``param.grad``.

The test walks everything an :class:`Accumulator` references (its attributes,
recursively through containers and helper objects, but not into the model,
optimizer, scheduler or scaler it was given) and collects every tensor.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gradaccum_torch import Accumulator


def held_tensors(acc: Accumulator) -> list[torch.Tensor]:
    """Every tensor reachable from ``acc``, except through the objects it was given and
    except the model's own parameters (references, not storage)."""
    given = {id(acc.model), id(acc.optimizer), id(acc.scheduler), id(acc.scaler)}
    params = {id(p) for p in acc.model.parameters()}
    seen: set[int] = set()
    found: list[torch.Tensor] = []

    def walk(obj: Any) -> None:
        if id(obj) in seen or id(obj) in given or obj is None:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in params:
                found.append(obj)
            return
        if isinstance(obj, (str, bytes, int, float, bool, type, torch.dtype, torch.device)):
            return
        if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
            return  # a module or optimizer it was not given: none exist, but never walk one
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(key)
                walk(value)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for item in obj:
                walk(item)
            return
        if callable(obj) and not hasattr(obj, "__dict__") and not hasattr(obj, "__slots__"):
            return
        for name in getattr(obj, "__dict__", {}):
            walk(getattr(obj, name))
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(obj, name):
                    walk(getattr(obj, name))

    walk(vars(acc))
    return found


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        dtype
    )


def _microbatch(acc: Accumulator, dtype: torch.dtype = torch.float32, **items: Any) -> bool:
    x = torch.randn(8, 16, dtype=dtype)
    y = torch.randn(8, 4, dtype=dtype)
    with acc.microbatch(**items):
        return bool(
            acc.backward(((acc.model(x) - y) ** 2).sum() if items else acc.model(x).pow(2).mean())
        )


def _param_sized(tensors: list[torch.Tensor], model: torch.nn.Module) -> list[torch.Tensor]:
    shapes = {tuple(p.shape) for p in model.parameters()}
    return [t for t in tensors if t.dim() > 0 and tuple(t.shape) in shapes]


@pytest.mark.parametrize("normalization", ["mean", "items"])
def test_default_config_holds_no_gradient_buffer(normalization: str) -> None:
    """ACC-P4, ACC-B2: mid-window the gradient lives in param.grad and nowhere else; the
    boundary steps and sets every .grad to None."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = Accumulator(model, opt, steps=4, normalization=normalization)
    items: dict[str, Any] = {"items": 8} if normalization == "items" else {}
    assert held_tensors(acc) == []

    for _ in range(2):  # mid-window: the gradient so far lives in param.grad, nowhere else
        assert _microbatch(acc, **items) is False
    held = held_tensors(acc)
    assert _param_sized(held, model) == []
    assert sum(t.numel() for t in held) <= 1  # at most a 0-d item count
    assert all(p.grad is not None for p in model.parameters())

    for _ in range(2):  # the boundary steps and frees the gradient
        stepped = _microbatch(acc, **items)
    assert stepped is True
    held = held_tensors(acc)
    # only the last pre-clip gradient norm, a 0-d tensor kept for acc.stats, may remain
    assert all(t.dim() == 0 for t in held), [tuple(t.shape) for t in held]
    assert sum(t.numel() * t.element_size() for t in held) <= 8
    assert all(p.grad is None for p in model.parameters())


def test_device_item_counts_stay_scalar() -> None:
    model = _model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, normalization="items")
    for _ in range(3):
        _microbatch(acc, items=torch.tensor(8))
    held = held_tensors(acc)
    assert _param_sized(held, model) == []
    assert all(t.dim() == 0 for t in held)


def test_float32_accumulation_does_hold_buffers() -> None:
    """The walk is able to see buffers: fp32 accumulation for a bf16 model holds one
    fp32 tensor per parameter during a window, and none after the boundary."""
    model = _model(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, steps=2, accumulation_dtype="float32")
    _microbatch(acc, torch.bfloat16)
    buffers = _param_sized(held_tensors(acc), model)
    assert len(buffers) == len(list(model.parameters()))
    assert all(t.dtype == torch.float32 for t in buffers)
    held_bytes = sum(t.numel() * t.element_size() for t in buffers)
    assert held_bytes == 4 * sum(p.numel() for p in model.parameters())

    _microbatch(acc, torch.bfloat16)
    assert _param_sized(held_tensors(acc), model) == []
