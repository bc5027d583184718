"""Where a window's gradient lives between microbatches.

* `InPlaceGradients` (the default): in ``param.grad``, where backward adds
  it; no other buffer (ACC-P4).
* `BufferedGradients`: in buffers beside the parameters — float32 buffers
  for low-precision parameters (``accumulation_dtype="float32"``, ACC-P1)
  and/or on the CPU (``offload=True``, ACC-P2). Each backward writes a fresh
  ``param.grad``, which is folded into the buffers and released.

Either store can *isolate* a microbatch: its backward starts from empty
gradients, so its own gradient can be checked or clipped before it joins
the window (``drop_microbatch``, per-microbatch clipping; ACC-F3, ACC-L2).

The life of one microbatch::

    store.open_microbatch(isolate)      # before backward
    ... backward ...
    fresh = store.microbatch_gradients()  # isolated: this microbatch alone
    store.close_microbatch(keep=True)     # join the window (or leave it out)

and `rollback` when backward failed. At the boundary, `window_gradients`
are the tensors the boundary normalizes; `finish` puts them in
``param.grad`` for the optimizer; `zero` empties the store. `export` and
`load` move the in-flight gradient through checkpoints, by canonical name.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import torch

from gradaccum.config import AccumulationConfig
from gradaccum.errors import CheckpointMismatchError

__all__ = ["BufferedGradients", "GradientStore", "InPlaceGradients", "gradient_store"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class GradientStore(abc.ABC):
    """The window's gradient, for a fixed list of parameters with canonical names."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        names: Sequence[str],
        bystanders: Sequence[torch.nn.Parameter] = (),
    ) -> None:
        self.params: list[torch.nn.Parameter] = list(params)
        self.names: list[str] = list(names)
        self.bystanders: list[torch.nn.Parameter] = list(bystanders)
        """The model's other trainable parameters (not in the optimizer): their
        ``.grad`` is cleared with the window's, so a param group that adopts
        them later starts from this window's gradient only (ACC-N9)."""
        self._stash: list[torch.Tensor | None] | None = None

    def adopt(
        self,
        params: Sequence[torch.nn.Parameter],
        names: Sequence[str],
        bystanders: Sequence[torch.nn.Parameter] = (),
    ) -> None:
        """Track a new parameter list (the optimizer gained a param group).
        Gradients held for parameters still in the list are kept."""
        self.params = list(params)
        self.names = list(names)
        self.bystanders = list(bystanders)

    def _clear_bystanders(self) -> None:
        for param in self.bystanders:
            param.grad = None

    @property
    def by_name(self) -> dict[str, torch.nn.Parameter]:
        """``{canonical name: parameter}``."""
        return dict(zip(self.names, self.params, strict=True))

    # -- one microbatch ------------------------------------------------------

    @abc.abstractmethod
    def open_microbatch(self, isolate: bool, first: bool) -> None:
        """Prepare ``param.grad`` for the microbatch's backward; with
        ``isolate`` the backward starts from no gradient at all. ``first``:
        the microbatch opens its window (the store holds no gradient)."""

    def microbatch_gradients(self) -> list[torch.Tensor]:
        """After an isolated backward: this microbatch's own gradients."""
        return [p.grad for p in self.params if p.grad is not None]

    @abc.abstractmethod
    def close_microbatch(self, keep: bool) -> None:
        """Add the microbatch's gradient to the window (``keep``) or leave it out."""

    @abc.abstractmethod
    def rollback(self) -> bool:
        """Undo a microbatch whose backward failed part-way. Returns True when
        the window is exactly as before the microbatch began; False when the
        partial gradient could not be separated from the window's (the caller
        then discards the window)."""

    # -- the boundary -----------------------------------------------------------

    @abc.abstractmethod
    def window_gradients(self) -> list[torch.Tensor]:
        """The accumulated window gradient, to reduce and normalize in place."""

    def finish(self) -> list[torch.Tensor]:
        """Put the window gradient in ``param.grad`` for the step (in the
        parameter's dtype and device) and return those ``.grad`` tensors."""
        return [p.grad for p in self.params if p.grad is not None]

    @abc.abstractmethod
    def zero(self) -> None:
        """Forget the window: every ``param.grad`` to ``None``, buffers released."""

    # -- checkpoints -----------------------------------------------------------------

    @abc.abstractmethod
    def export(self) -> dict[str, torch.Tensor]:
        """The in-flight (not yet stepped) gradient by canonical name (live
        tensors: copy them before the next microbatch changes them)."""

    def check(self, gradients: Mapping[str, torch.Tensor]) -> None:
        """Raise `CheckpointMismatchError` unless every name is one of this
        store's parameters with the same shape (first mismatch in model order)."""
        by_name = self.by_name
        unknown = sorted(set(gradients) - set(by_name))
        if unknown:
            raise CheckpointMismatchError(
                f"the checkpoint holds gradients for {unknown[:5]}, which this model/optimizer "
                f"lacks; its parameters are {self.names[:5]}…; load it into the same model"
            )
        for name in (n for n in self.names if n in gradients):
            tensor = gradients[name]
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointMismatchError(
                    f"gradient {name!r} is a {type(tensor).__name__}, not a tensor"
                )
            if tuple(tensor.shape) != tuple(by_name[name].shape):
                raise CheckpointMismatchError(
                    f"gradient {name!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                    f"the parameter has shape {tuple(by_name[name].shape)}"
                )

    def load(self, gradients: Mapping[str, torch.Tensor], *, owned: bool = False) -> None:
        """Replace the window gradient with ``gradients``: `check` first (raises
        `CheckpointMismatchError`, nothing changed), then `_install`. The store
        keeps copies, or — ``owned``: tensors nobody else holds — the tensors
        themselves wherever their device and dtype are already the right ones."""
        self.check(gradients)
        self._install(gradients, owned)

    @abc.abstractmethod
    def _install(self, gradients: Mapping[str, torch.Tensor], owned: bool) -> None:
        """Replace the window gradient with checked ``gradients`` (``owned``: see `load`)."""

    def held(self) -> list[torch.Tensor]:
        """Tensors this store holds besides ``param.grad`` (memory probes, ACC-P4)."""
        return [g for g in self._stash or () if g is not None]


class InPlaceGradients(GradientStore):
    """The window's gradient in ``param.grad`` (the default: no extra buffer)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        names: Sequence[str],
        bystanders: Sequence[torch.nn.Parameter] = (),
    ) -> None:
        super().__init__(params, names, bystanders)
        self._fresh_window = False

    def open_microbatch(self, isolate: bool, first: bool) -> None:
        if isolate:
            # Keep references to the window's gradients; backward starts from none.
            self._stash = [p.grad for p in self.params]
            for param in self.params:
                param.grad = None
        else:
            # A window with no gradient yet rolls back exactly: to no gradient.
            self._fresh_window = first

    def close_microbatch(self, keep: bool) -> None:
        stash = self._stash
        if stash is None:
            return
        self._stash = None
        for param, old in zip(self.params, stash, strict=True):
            new = param.grad
            if not keep or new is None:
                param.grad = old
            elif old is not None:
                param.grad = old.add_(new)

    def rollback(self) -> bool:
        stash = self._stash
        if stash is not None:
            self._stash = None
            for param, old in zip(self.params, stash, strict=True):
                param.grad = old
            return True
        if self._fresh_window:
            for param in self.params:
                param.grad = None
            return True
        return False

    def window_gradients(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def zero(self) -> None:
        for param in self.params:
            param.grad = None
        self._clear_bystanders()

    def export(self) -> dict[str, torch.Tensor]:
        return {
            n: p.grad for n, p in zip(self.names, self.params, strict=True) if p.grad is not None
        }

    def _install(self, gradients: Mapping[str, torch.Tensor], owned: bool) -> None:
        self.zero()
        by_name = self.by_name
        for name, tensor in gradients.items():
            param = by_name[name]
            param.grad = tensor.to(device=param.device, dtype=param.dtype, copy=not owned)


class BufferedGradients(GradientStore):
    """The window's gradient in buffers: float32 for low-precision parameters
    (``to_float32``; other dtypes keep theirs, ACC-P1) and/or on the CPU
    (``offload``). ``param.grad`` holds one microbatch at a time."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        names: Sequence[str],
        bystanders: Sequence[torch.nn.Parameter] = (),
        *,
        to_float32: bool,
        offload: bool,
    ) -> None:
        super().__init__(params, names, bystanders)
        self._to_float32 = to_float32
        self._device = torch.device("cpu") if offload else None
        self._buffers: dict[int, torch.Tensor] = {}

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self._to_float32 and dtype in _LOW_PRECISION else dtype

    def open_microbatch(self, isolate: bool, first: bool) -> None:
        # param.grad is empty between microbatches: every backward is isolated already.
        return

    def close_microbatch(self, keep: bool) -> None:
        for param in self.params:
            grad = param.grad
            if grad is None:
                continue
            param.grad = None
            if not keep:
                continue
            buf = self._buffers.get(id(param))
            if buf is None:
                self._buffers[id(param)] = grad.to(
                    device=self._device or grad.device, dtype=self._dtype(grad.dtype), copy=True
                )
            else:
                buf.add_(grad.to(device=buf.device, dtype=buf.dtype, non_blocking=True))

    def rollback(self) -> bool:
        for param in self.params:
            param.grad = None
        return True

    def window_gradients(self) -> list[torch.Tensor]:
        return [self._buffers[id(p)] for p in self.params if id(p) in self._buffers]

    def finish(self) -> list[torch.Tensor]:
        out = []
        for param in self.params:
            buf = self._buffers.get(id(param))
            if buf is not None:
                param.grad = grad = buf.to(device=param.device, dtype=param.dtype)
                out.append(grad)
        return out

    def zero(self) -> None:
        for param in self.params:
            param.grad = None
        self._buffers.clear()
        self._clear_bystanders()

    def export(self) -> dict[str, torch.Tensor]:
        return {
            name: self._buffers[id(p)]
            for name, p in zip(self.names, self.params, strict=True)
            if id(p) in self._buffers
        }

    def _install(self, gradients: Mapping[str, torch.Tensor], owned: bool) -> None:
        self.zero()
        by_name = self.by_name
        for name, tensor in gradients.items():
            param = by_name[name]
            self._buffers[id(param)] = tensor.to(
                device=self._device or param.device,
                dtype=self._dtype(param.dtype),
                copy=not owned,
            )

    def adopt(
        self,
        params: Sequence[torch.nn.Parameter],
        names: Sequence[str],
        bystanders: Sequence[torch.nn.Parameter] = (),
    ) -> None:
        keep = {id(p) for p in params}
        self._buffers = {k: v for k, v in self._buffers.items() if k in keep}
        super().adopt(params, names, bystanders)

    def held(self) -> list[torch.Tensor]:
        return [*self._buffers.values(), *super().held()]


def gradient_store(
    config: AccumulationConfig,
    params: Sequence[torch.nn.Parameter],
    names: Sequence[str],
    bystanders: Sequence[torch.nn.Parameter] = (),
) -> GradientStore:
    """The store ``config`` asks for: buffered under ``accumulation_dtype="float32"``
    or ``offload``, in place otherwise."""
    if config.accumulation_dtype == "float32" or config.offload:
        return BufferedGradients(
            params,
            names,
            bystanders,
            to_float32=config.accumulation_dtype == "float32",
            offload=config.offload,
        )
    return InPlaceGradients(params, names, bystanders)
