"""Scenarios: everything a harness needs to run one training run.

A `Scenario` is plain, frozen data plus small factories: the model,
the optimizer and the LR scheduler are described by specs
(`ModelSpec`, `OptimizerSpec`, `SchedulerSpec`,
`ScalerSpec`) whose ``build`` methods make fresh, deterministic torch
objects, so a harness can build them as many times as it needs (again after
a checkpoint, once per rank, inside a framework's own hooks).

The data are *canonical*: float64 CPU tensors. `Scenario.inputs` and
`Scenario.iter_microbatches` hand them out in the scenario's parameter
dtype on its device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor, nn

from gradaccum import AccumulationConfig

__all__ = [
    "PRECISIONS",
    "AmpMode",
    "LossReduction",
    "Microbatch",
    "MicrobatchView",
    "ModelSpec",
    "OptimizerSpec",
    "PassLength",
    "Precision",
    "Probe",
    "ScalerSpec",
    "Scenario",
    "SchedulerSpec",
    "Shard",
    "make_passes",
]

Precision: TypeAlias = Literal["float64", "float32", "bf16", "fp16"]
"""``float64``/``float32``: parameters and compute in that dtype, no AMP.
``bf16``: float32 parameters, bf16 autocast. ``fp16``: float32 parameters,
fp16 autocast and a GradScaler."""

PRECISIONS: tuple[Precision, ...] = ("float64", "float32", "bf16", "fp16")

AmpMode: TypeAlias = Literal["none", "fp16-scaler", "bf16-autocast"]
LossReduction: TypeAlias = Literal["mean", "sum"]
PassLength: TypeAlias = Literal["known", "last_only"]
"""What the harness may tell its adapter about the end of a pass: ``known``
(the pass length: ``remaining_in_pass``) or ``last_only`` (only that a
microbatch is the last one, from a one-ahead look: ``mark_last``)."""

Probe: TypeAlias = Literal["host_reads", "memory"]
"""What a harness that declares the ``probes`` capability measures around
each microbatch (see `gradaccum_conformance.probes`): ``host_reads``
(device-to-host reads, ACC-B3, ACC-B4) or ``memory`` (tensor memory held
between microbatches, ACC-P4)."""


@dataclass(frozen=True, eq=False)
class Shard:
    """One rank's part of a microbatch: inputs ``x`` (items × features) and
    targets ``y`` (items × outputs), canonical float64 on the CPU."""

    x: Tensor
    y: Tensor

    @property
    def items(self) -> int:
        """Items (rows) in this shard: the count the ``items`` normalization divides by."""
        return int(self.x.shape[0])


@dataclass(frozen=True, eq=False)
class Microbatch:
    """One global microbatch: one `Shard` per rank."""

    shards: tuple[Shard, ...]

    @property
    def items(self) -> int:
        """Items over all ranks."""
        return sum(s.items for s in self.shards)


@dataclass(frozen=True, eq=False)
class MicrobatchView:
    """One microbatch as one rank's training loop sees it.

    ``x`` and ``y`` are in the scenario's parameter dtype on its device.
    ``global_index`` counts microbatches over all passes from 0 (the unit of
    `Scenario.checkpoint_after`).
    """

    pass_index: int
    index_in_pass: int
    global_index: int
    pass_length: int
    x: Tensor
    y: Tensor
    items: int
    world_items: int
    items_tensor: Tensor | None = None

    @property
    def count(self) -> int | Tensor:
        """The item count to give the adapter: `items` as a host int, or,
        when the scenario sets ``items_on_device``, the same count as a 0-d
        int64 tensor on the scenario's device (made with the view, so passing
        it costs no host-device copy)."""
        return self.items if self.items_tensor is None else self.items_tensor

    @property
    def is_last_in_pass(self) -> bool:
        """This microbatch ends its pass."""
        return self.index_in_pass == self.pass_length - 1

    @property
    def remaining_in_pass(self) -> int:
        """Microbatches left in the pass, this one included."""
        return self.pass_length - self.index_in_pass


@dataclass(frozen=True)
class ModelSpec:
    """``Linear(in, hidden) -> Tanh -> Linear(hidden, out)`` with a
    deterministic initialisation from ``seed``.

    Parameter names (the canonical names of every trajectory): ``0.weight``,
    ``0.bias``, ``2.weight``, ``2.bias``.
    """

    in_features: int = 6
    hidden: int = 12
    out_features: int = 3
    seed: int = 0

    def build(self, dtype: torch.dtype = torch.float64) -> nn.Sequential:
        """A fresh CPU model in ``dtype``; does not touch the global RNG.

        The values are drawn in float64 and rounded to ``dtype``, so a
        float32 model starts from exactly the rounded float64 start.
        """
        with torch.random.fork_rng(devices=[]):
            model = nn.Sequential(
                nn.Linear(self.in_features, self.hidden, dtype=torch.float64),
                nn.Tanh(),
                nn.Linear(self.hidden, self.out_features, dtype=torch.float64),
            )
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for _, param in model.named_parameters():
                fan_in = param.shape[-1] if param.dim() == 2 else self.hidden
                values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.copy_(values * (1.5 / fan_in**0.5))
        return model.to(dtype)


@dataclass(frozen=True)
class OptimizerSpec:
    """``kind`` ``"sgd"`` (with optional ``momentum``) or ``"adamw"``, with
    ``lr`` and ``weight_decay``. With ``two_groups`` the parameters of the
    first layer form group 0 named ``"hidden"`` and those of the last layer
    group 1 named ``"head"`` (the latter with ``head_lr_scale × lr``)."""

    kind: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    two_groups: bool = False
    head_lr_scale: float = 0.5

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh optimizer over ``model``'s parameters."""
        named = list(model.named_parameters())
        groups: list[dict[str, object]]
        if self.two_groups:
            # Group membership is by name prefix, so it works whatever prefix
            # a framework wrapper adds ("model.0.weight").
            hidden = [p for n, p in named if n.split(".")[-2] == "0"]
            head = [p for n, p in named if n.split(".")[-2] != "0"]
            groups = [
                {"params": hidden, "name": "hidden"},
                {"params": head, "name": "head", "lr": self.lr * self.head_lr_scale},
            ]
        else:
            groups = [{"params": [p for _, p in named]}]
        if self.kind == "sgd":
            return torch.optim.SGD(
                groups,
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
            )
        return torch.optim.AdamW(
            groups,
            lr=self.lr,
            weight_decay=self.weight_decay,
        )


@dataclass(frozen=True)
class _Decay:
    gamma: float

    def __call__(self, step: int) -> float:
        return float(self.gamma**step)


@dataclass(frozen=True)
class SchedulerSpec:
    """``LambdaLR`` with ``lr = base_lr × gamma ** step``: every step changes
    the learning rate, so a scheduler stepped at the wrong time changes the
    trajectory. ``scheduler.last_epoch`` counts its steps."""

    gamma: float = 0.8

    def build(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A fresh scheduler on ``optimizer``."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _Decay(self.gamma))


@dataclass(frozen=True)
class ScalerSpec:
    """Arguments of ``torch.amp.GradScaler`` (fp16 scenarios only).

    The default scale is small and never grows, so a healthy run never
    overflows; overflow scenarios set a huge ``init_scale`` and a steep
    ``backoff_factor`` so that exactly the first window overflows.
    """

    init_scale: float = 2.0**8
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1_000_000

    def build(self, device: str) -> torch.amp.GradScaler:
        """A fresh GradScaler for ``device`` (``"cpu"`` or ``"cuda"``)."""
        return torch.amp.GradScaler(
            torch.device(device).type,
            init_scale=self.init_scale,
            growth_factor=self.growth_factor,
            backoff_factor=self.backoff_factor,
            growth_interval=self.growth_interval,
        )


@dataclass(frozen=True, eq=False)
class Scenario:
    """One training run for a harness to execute through its adapter.

    Attributes:
        name: short identifier, used in messages and reports.
        config: the `AccumulationConfig` to give the adapter.
        passes: the data: ``passes[p][i]`` is microbatch ``i`` of pass (epoch) ``p``.
        model / optimizer / scheduler: specs; build with `make_model`,
            `make_optimizer`, `make_scheduler`.
        loss_reduction: ``"mean"`` or ``"sum"`` of the per-item losses
            (``"sum"`` exactly when ``config.normalization == "items"``);
            compute the loss with `loss`.
        precision: see `Precision`; derived: `param_dtype`,
            `amp`, `autocast_dtype`.
        device: ``"cpu"`` or ``"cuda"``.
        world_size: ranks; rank ``r`` feeds ``iter_microbatches(rank=r)``.
        scaler: GradScaler arguments (fp16 only); build with `make_scaler`.
        checkpoint_after: save after the backward of this global microbatch
            index (and after its pass ended, if it is the last of its pass),
            resume in fresh objects, continue (``None``: no checkpoint).
        pass_length: see `PassLength`.
        amp_overflow_windows: closed-window indices the scaler is set up to
            overflow on (the reference skips them).
        promises: the spec IDs the scenario is built to check.
        items_on_device: under ``items``, give the adapter each item count as
            a 0-d tensor on the device (`MicrobatchView.count`); needs
            the ``device_items`` capability.
        probes: what a harness declaring the ``probes`` capability measures
            per microbatch and records with
            `microbatch`
            (see `Probe`; `MicrobatchProbes`
            does it). Empty: nothing to measure.
    """

    name: str
    config: AccumulationConfig
    passes: tuple[tuple[Microbatch, ...], ...]
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec | None = None
    loss_reduction: LossReduction = "mean"
    precision: Precision = "float64"
    device: str = "cpu"
    world_size: int = 1
    scaler: ScalerSpec | None = None
    checkpoint_after: int | None = None
    pass_length: PassLength = "known"
    amp_overflow_windows: tuple[int, ...] = ()
    promises: tuple[str, ...] = ()
    items_on_device: bool = False
    probes: tuple[Probe, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; use one of {PRECISIONS}")
        if self.config.normalization == "items" and self.loss_reduction != "sum":
            raise ValueError(
                f"scenario {self.name!r}: normalization='items' needs loss_reduction='sum'"
            )
        if self.config.normalization == "mean" and self.loss_reduction != "mean":
            raise ValueError(
                f"scenario {self.name!r}: normalization='mean' needs loss_reduction='mean'"
            )
        for pass_ in self.passes:
            for mb in pass_:
                if len(mb.shards) != self.world_size:
                    raise ValueError(
                        f"scenario {self.name!r}: a microbatch has {len(mb.shards)} shards "
                        f"for world_size={self.world_size}"
                    )
        if self.items_on_device and self.config.normalization != "items":
            raise ValueError(
                f"scenario {self.name!r}: items_on_device needs normalization='items' "
                f"(a device count under {self.config.normalization!r} is an ItemCountError)"
            )
        unknown = [p for p in self.probes if p not in ("host_reads", "memory")]
        if unknown:
            raise ValueError(
                f"scenario {self.name!r}: unknown probes {unknown}; use 'host_reads', 'memory'"
            )
        if self.precision == "fp16" and self.scaler is None:
            object.__setattr__(self, "scaler", ScalerSpec())

    # -- precision -------------------------------------------------------
    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of parameters and data (float32 under AMP)."""
        return torch.float64 if self.precision == "float64" else torch.float32

    @property
    def amp(self) -> AmpMode:
        """The AMP mode implied by `precision`."""
        if self.precision == "fp16":
            return "fp16-scaler"
        if self.precision == "bf16":
            return "bf16-autocast"
        return "none"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype to autocast the forward to, or ``None`` for no autocast."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    # -- factories ---------------------------------------------------------
    def make_model(self) -> nn.Sequential:
        """A fresh CPU model in `param_dtype` (move it to `device`)."""
        return self.model.build(self.param_dtype)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh optimizer over ``model`` (build it after moving the model)."""
        return self.optimizer.build(model)

    def make_scheduler(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.LambdaLR | None:
        """A fresh LR scheduler, or ``None`` when the scenario has none."""
        return None if self.scheduler is None else self.scheduler.build(optimizer)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh GradScaler under fp16 precision, else ``None``."""
        if self.precision != "fp16" or self.scaler is None:
            return None
        return self.scaler.build(self.device)

    def autocast(self) -> torch.autocast:
        """The autocast context for the forward (disabled without AMP)."""
        dtype = self.autocast_dtype
        return torch.autocast(
            torch.device(self.device).type,
            dtype=dtype if dtype is not None else torch.float32,
            enabled=dtype is not None,
        )

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The microbatch loss: per-item ``sum((output - target)**2)``,
        then the mean or the sum over items (`loss_reduction`)."""
        per_item = ((output - target) ** 2).sum(dim=-1)
        return per_item.mean() if self.loss_reduction == "mean" else per_item.sum()

    # -- data ----------------------------------------------------------------
    def inputs(self, shard: Shard) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``shard`` in `param_dtype` on `device`."""
        return (
            shard.x.to(device=self.device, dtype=self.param_dtype),
            shard.y.to(device=self.device, dtype=self.param_dtype),
        )

    def iter_microbatches(self, rank: int = 0) -> Iterator[MicrobatchView]:
        """Every microbatch of every pass, as rank ``rank`` sees it."""
        global_index = 0
        for p, pass_ in enumerate(self.passes):
            for i, mb in enumerate(pass_):
                x, y = self.inputs(mb.shards[rank])
                count = None
                if self.items_on_device:
                    count = torch.tensor(mb.shards[rank].items, dtype=torch.int64)
                    count = count.to(self.device)
                yield MicrobatchView(
                    pass_index=p,
                    index_in_pass=i,
                    global_index=global_index,
                    pass_length=len(pass_),
                    x=x,
                    y=y,
                    items=mb.shards[rank].items,
                    world_items=mb.items,
                    items_tensor=count,
                )
                global_index += 1

    @property
    def total_microbatches(self) -> int:
        """Microbatches over all passes."""
        return sum(len(p) for p in self.passes)

    def replace(self, **changes: object) -> Scenario:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line for failure messages."""
        sizes = [[mb.items for mb in pass_] for pass_ in self.passes]
        counts = ", item counts on the device" if self.items_on_device else ""
        return (
            f"scenario {self.name!r}: precision {self.precision}, device {self.device}, "
            f"world_size {self.world_size}, config {self.config.to_dict()}, "
            f"items per microbatch {sizes}{counts}"
        )


def make_passes(
    sizes: Sequence[Sequence[int | Sequence[int]]],
    *,
    model: ModelSpec,
    seed: int = 1,
    nan_at: int | None = None,
) -> tuple[tuple[Microbatch, ...], ...]:
    """Deterministic regression data: ``sizes[p][i]`` is the item count of
    microbatch ``i`` of pass ``p`` (a sequence of counts gives one per rank).

    ``nan_at`` puts a NaN into the first input of that global microbatch
    (rank 0's shard), which makes its loss and gradients non-finite.
    """
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(model.in_features, model.out_features, generator=generator)
    teacher = teacher.to(torch.float64)
    passes: list[tuple[Microbatch, ...]] = []
    global_index = 0
    for pass_sizes in sizes:
        microbatches: list[Microbatch] = []
        for size in pass_sizes:
            per_rank = [size] if isinstance(size, int) else list(size)
            shards: list[Shard] = []
            for rank, n in enumerate(per_rank):
                x = torch.randn(n, model.in_features, generator=generator, dtype=torch.float64)
                noise = torch.randn(n, model.out_features, generator=generator, dtype=torch.float64)
                y = torch.sin(x @ teacher) + 0.1 * noise
                if nan_at == global_index and rank == 0:
                    x[0, 0] = float("nan")
                shards.append(Shard(x=x, y=y))
            microbatches.append(Microbatch(shards=tuple(shards)))
            global_index += 1
        passes.append(tuple(microbatches))
    return tuple(passes)
