"""What GradAccum refuses (``ConfigError`` naming the fix, before anything trains),
``estimated_optimizer_steps`` against the steps a fit takes, and a module reused after a
failed fit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import trainer_workers as W
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import SingleDeviceStrategy

from gradaccum import AccumulationConfig, ByEpoch, ByStep, ClipPolicy, ConfigError
from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import ListLoader

SIZES = [3] * 10


def _fit(module: Any, ga: GradAccum | None = None, **kwargs: Any) -> Any:
    tr = W.trainer([ga if ga is not None else GradAccum(4), *kwargs.pop("callbacks", [])], **kwargs)
    tr.fit(module, ListLoader(W.batches(SIZES)))
    return tr


def _refused(match: str, module: Any = None, ga: GradAccum | None = None, **kwargs: Any) -> None:
    module = W.Net() if module is None else module
    before = W.params(module)
    with pytest.raises(ConfigError, match=match):
        _fit(module, ga, **kwargs)
    after = W.params(module)
    assert all(torch.equal(before[n], after[n]) for n in before), "nothing trained"


def test_accumulate_grad_batches_is_refused() -> None:
    """ACC-E3: Lightning's own accumulation on top would accumulate twice."""
    _refused(
        r"accumulate_grad_batches=2\) would accumulate a second time", accumulate_grad_batches=2
    )


def test_gradient_accumulation_scheduler_is_refused() -> None:
    """ACC-E3: a GradientAccumulationScheduler; the message names ByEpoch."""
    _refused(
        r"GradientAccumulationScheduler callback would accumulate a second time.*ByEpoch",
        callbacks=[GradientAccumulationScheduler({0: 2})],
    )


@pytest.mark.parametrize(
    "hook",
    [
        "optimizer_step",
        "optimizer_zero_grad",
        "backward",
        "lr_scheduler_step",
        "configure_gradient_clipping",
    ],
)
def test_overridden_automatic_optimization_hooks_are_refused(hook: str) -> None:
    """ACC-E3: hooks manual optimization never calls would be silently lost."""

    def override(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    module = type(f"Net_{hook}", (W.Net,), {hook: override})()
    _refused(rf"overrides \['{hook}'\].*on_before_optimizer_step", module)


class _TwoOptimizers(W.Net):
    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.model[0].parameters(), lr=0.1),
            torch.optim.SGD(self.model[2].parameters(), lr=0.1),
        ]


def test_two_optimizers_are_refused() -> None:
    """ACC-E3: several optimizers are refused before anything trains. Lightning itself refuses
    them first (in automatic optimization, which the module is in until GradAccum takes over
    at on_fit_start) with its RuntimeError; docs/lightning.md says to combine the parameter
    groups into one optimizer."""
    with pytest.raises(RuntimeError, match="multiple optimizers"):
        _fit(_TwoOptimizers(), GradAccum(2), max_epochs=1)


class _IterStep(W.Net):
    def training_step(self, dataloader_iter: Any) -> Any:  # type: ignore[override]
        x, y, _ = next(dataloader_iter)
        return W.loss_fn(self.model(x), y, "mean")


@pytest.mark.filterwarnings("ignore:You are using the `dataloader_iter` step flavor")
def test_dataloader_iter_training_step_is_refused() -> None:
    """ACC-E3: a ``dataloader_iter`` step cannot say where a pass ends."""
    _refused(r"dataloader_iter .* take \(batch, batch_idx\)", _IterStep())


class _Manual(W.Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_module_in_manual_optimization_is_refused() -> None:
    """ACC-E3: a module that steps its own optimizer."""
    _refused("in manual optimization already .* return the loss from training_step", _Manual())


class _ThirdPartyStrategy(SingleDeviceStrategy):
    """A strategy GradAccum does not know (a subclass stands for one: FSDP needs a GPU here,
    DeepSpeed is not installed, and ModelParallelStrategy is absent from Lightning 2.1)."""


def test_unsupported_strategy_is_refused() -> None:
    """ACC-E3: a strategy other than a single device and ``"ddp"`` is refused, naming it.
    (``ddp_spawn``/``ddp_fork`` are ``DDPStrategy`` too: refused for another reason, below.)"""
    _refused(
        "a single device and strategy='ddp' for now, not _ThirdPartyStrategy",
        strategy=_ThirdPartyStrategy(device=torch.device("cpu")),
    )


def test_gradient_clip_val_and_clip_together_are_refused() -> None:
    """ACC-E3: two clipping settings; keep one."""
    _refused(
        r"gradient_clip_val=0.5\) and GradAccum\(clip=...\) .* keep one",
        ga=GradAccum(4, clip=ClipPolicy(1.0)),
        gradient_clip_val=0.5,
    )


def test_unknown_and_conflicting_keywords_are_refused() -> None:
    """ACC-E2, ACC-E3: a misspelt keyword names the closest valid one; ``config=`` with
    options is ambiguous."""
    with pytest.raises(ConfigError, match="'step' \\(did you mean 'steps'\\?\\)"):
        GradAccum(step=4)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="'model_atr' \\(did you mean 'model_attr'\\?\\)"):
        GradAccum(4, model_atr="model")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="put everything in the config"):
        GradAccum(config=AccumulationConfig(4), normalization="items")


@pytest.mark.parametrize(
    ("options", "trainer_kwargs", "expected"),
    [
        ({"steps": 4}, {"max_epochs": 2}, 6),  # 4, 4, 2 per epoch
        ({"steps": 4, "partial_window": "drop"}, {"max_epochs": 2}, 4),
        ({"steps": 4, "partial_window": "carry"}, {"max_epochs": 2}, 5),
        ({"steps": 4}, {"max_epochs": 5, "max_steps": 4}, 4),
        ({"steps": 4}, {"max_epochs": 2, "limit_train_batches": 7}, 4),  # 4, 3 per epoch
        ({"schedule": ByEpoch({0: 2, 1: 3})}, {"max_epochs": 2}, 9),  # 5 + 4
        ({"schedule": ByStep({0: 1, 2: 3})}, {"max_epochs": 2}, 9),  # 1,1,3,3,2 + 3,3,3,1
    ],
    ids=["fixed", "drop", "carry", "max_steps", "limit_train_batches", "by_epoch", "by_step"],
)
def test_estimated_optimizer_steps_matches_the_steps_taken(
    options: dict[str, Any], trainer_kwargs: dict[str, Any], expected: int
) -> None:
    """ACC-W3, ACC-W5, ACC-W6, ACC-K2, ACC-K3: ``estimated_optimizer_steps`` is the number
    of optimizer steps the fit takes (``trainer.estimated_stepping_batches`` counts
    microbatches under GradAccum)."""
    ga = GradAccum(**options)
    tr = _fit(W.Net(), ga, **trainer_kwargs)
    assert tr.global_step == expected
    assert ga.estimated_optimizer_steps(tr) == expected


class _EstimatingNet(W.Net):
    """Sizes a schedule by the steps to come, where users do: in configure_optimizers."""

    def configure_optimizers(self) -> Any:
        self.estimated = (
            GradAccum.of(self.trainer).estimated_optimizer_steps(self.trainer),
            self.trainer.estimated_stepping_batches,
        )
        return super().configure_optimizers()


def test_estimated_optimizer_steps_inside_configure_optimizers() -> None:
    """Where ``trainer.estimated_stepping_batches`` is meant to be used (OneCycleLR's
    ``total_steps``), ``estimated_optimizer_steps`` works too."""
    module = _EstimatingNet()
    tr = _fit(module, GradAccum(4), max_epochs=2)
    assert module.estimated == (6, 20)
    assert tr.global_step == 6


class _Boom(W.Net):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if getattr(self, "boom", False) and batch_idx == 5:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_module_reused_after_a_failed_fit() -> None:
    """A fit that raised (a user's error, ``NonFiniteGradientError``...) leaves the module
    usable: a second fit with a new GradAccum trains as a first one does."""
    module = _Boom()
    module.boom = True
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module)
    module.boom = False
    fresh = _Boom()
    _fit(fresh)
    tr = _fit(module)
    assert tr.global_step == 3


def test_spawned_ddp_strategies_are_refused() -> None:
    """ACC-E3: ``strategy="ddp_spawn"`` (and fork, notebook) runs the fit in child processes,
    whose GradAccum this process never sees: the callback's first hook refuses it, naming
    ``strategy='ddp'``. (The hook is called here directly on a Trainer built with that
    strategy: in a real fit it runs in the spawned child, and no port is opened here.)"""
    ga = GradAccum(4)
    tr = W.trainer([ga], strategy="ddp_spawn", devices=1)
    with pytest.raises(ConfigError, match=r"strategy='ddp_spawn'.*use strategy='ddp'"):
        ga.setup(tr, W.Net(), "fit")


class _SkipsTheLastBatch(W.Net):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx == len(SIZES) - 1:
            return None  # Lightning's "skip this batch"
        return super().training_step(batch, batch_idx)


def test_a_skipped_last_batch_still_ends_the_pass() -> None:
    """ACC-W3, ACC-W7: ``training_step`` returning None on an epoch's last batch skips that
    batch, and the pass still ends: the partial window of the microbatches before it is
    stepped (10 batches, the last skipped, N=4: windows of 4, 4 and 1), the epoch advances,
    and nothing is left open."""
    module = _SkipsTheLastBatch()
    ga = GradAccum(4)
    tr = _fit(module, ga, max_epochs=1)
    assert tr.global_step == 3
    assert ga.stats.epoch == 1 and not ga.accumulator.is_accumulating
    assert ga.stats.micro_steps == 9
