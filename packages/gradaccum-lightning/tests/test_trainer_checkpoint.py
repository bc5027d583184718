"""Checkpoints through the Trainer on one process: ``trainer.save_checkpoint`` inside a window
and ``fit(ckpt_path=...)`` resume bitwise (a stateful loader feeds the microbatch after the
checkpoint); without one the resume is refused unless ``allow_replay=True``;
``ModelCheckpoint(every_n_train_steps=n)`` saves after boundaries, quietly;
``GradAccum.save`` writes the shared format that plain gradaccum-torch resumes, and
``GradAccum(resume=...)`` restores it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_workers as W
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from gradaccum import ConfigError
from gradaccum.checkpoint import read_checkpoint
from gradaccum.policies import PartialWindowPolicy
from gradaccum_lightning import GradAccum
from gradaccum_lightning.testing import ListLoader
from gradaccum_torch import Accumulator
from gradaccum_torch.tensor_io import tensors_from_bytes

SIZES = [2, 5, 1, 3, 4, 2, 6, 1, 2, 3]  # windows of 4: [0-3], [4-7], [8, 9]
NAMES = {"0.weight", "0.bias", "2.weight", "2.bias"}


def _step_lr(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5), "interval": "step"}


def _net(seed: int = 0) -> W.Net:
    return W.Net("items", seed=seed, device_items=True, scheduler=_step_lr)


def _ga(**kwargs: Any) -> GradAccum:
    return GradAccum(4, normalization="items", **kwargs)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _straight(epochs: int = 2, **ga: Any) -> tuple[Any, W.Net, W.Windows]:
    module, windows = _net(), W.Windows()
    tr = W.trainer([_ga(**ga), windows], max_epochs=epochs)
    tr.fit(module, ListLoader(W.batches(SIZES)))
    return tr, module, windows


@pytest.mark.parametrize(
    ("epoch", "index", "position"),
    [(0, 5, 2), (1, 1, 2), (0, 6, 3), (0, 7, 0)],
    ids=["epoch0-mid", "epoch1-mid", "epoch0-last-but-one", "boundary"],
)
def test_save_checkpoint_mid_window_resumes_bitwise(
    tmp_path: Path, epoch: int, index: int, position: int
) -> None:
    """ACC-R2, ACC-R3, ACC-R1: ``trainer.save_checkpoint`` after microbatch ``index`` of
    ``epoch`` (``should_stop`` then stops right there), a fresh module (another seed),
    GradAccum and Trainer, ``fit(ckpt_path=...)``: every window after the checkpoint, the
    final parameters, the learning rate, ``global_step`` and the counters equal the
    uninterrupted run's bitwise — the in-flight gradients and device item count came back
    (``items``, int and 0-d tensor counts, momentum, a step scheduler, 2 epochs)."""
    straight_tr, straight, straight_windows = _straight()
    path = tmp_path / "mid.ckpt"
    stop = W.StopAfter(index, lambda t: t.save_checkpoint(path), epoch=epoch)
    first_windows = W.Windows()
    first = W.trainer([_ga(), first_windows, stop], max_epochs=2)
    first.fit(_net(), ListLoader(W.batches(SIZES)))
    assert stop.seen[-1] == (epoch, index)  # should_stop took effect after that microbatch
    state = torch.load(path, weights_only=False)["callbacks"]["GradAccum"]
    assert state["accumulation"]["position"] == position
    assert set(state["gradients"][0]) == ({f"model.{n}" for n in NAMES} if position else set())

    module, windows = _net(seed=7), W.Windows()
    ga = _ga()
    resumed = W.trainer([ga, windows], max_epochs=2)
    resumed.fit(module, ListLoader(W.batches(SIZES)), ckpt_path=str(path))
    done = len(first_windows.params)
    assert len(windows.params) == len(straight_windows.params) - done
    for got, want in zip(windows.params, straight_windows.params[done:], strict=True):
        assert _equal(got, want)
    assert _equal(W.params(module), W.params(straight))
    assert windows.lrs == straight_windows.lrs[done:]
    assert resumed.global_step == straight_tr.global_step == 6
    keys = ("micro_steps", "optimizer_steps", "skipped_steps", "epoch", "items_total")
    want_stats = GradAccum.of(straight_tr).stats.as_dict()
    assert {k: ga.stats.as_dict()[k] for k in keys} == {k: want_stats[k] for k in keys}


@pytest.mark.parametrize("policy", ["drop", "carry"])
def test_checkpoint_on_the_last_batch_of_an_epoch_keeps_the_pass_end(
    tmp_path: Path, policy: PartialWindowPolicy
) -> None:
    """ACC-R3, ACC-W5, ACC-W6, ACC-W7: ``save_checkpoint`` in ``on_train_batch_end`` of an
    epoch's last batch (where ``ModelCheckpoint(every_n_train_steps=...)`` saves when a step
    lands there) must resume as the uninterrupted run."""
    _, straight, _ = _straight(partial_window=policy)
    path = tmp_path / "last.ckpt"
    stop = W.StopAfter(len(SIZES) - 1, lambda t: t.save_checkpoint(path))
    W.trainer([_ga(partial_window=policy), stop], max_epochs=2).fit(
        _net(), ListLoader(W.batches(SIZES))
    )
    module, ga = _net(seed=7), _ga(partial_window=policy)
    W.trainer([ga], max_epochs=2).fit(module, ListLoader(W.batches(SIZES)), ckpt_path=str(path))
    assert ga.stats.epoch == 2
    assert _equal(W.params(module), W.params(straight))


def _plain_loader() -> DataLoader[Any]:
    """A plain DataLoader: not stateful (Lightning cannot put it back mid-epoch)."""
    return DataLoader(W.batches(SIZES), batch_size=None)  # type: ignore[arg-type]


def test_mid_window_resume_without_a_stateful_loader_is_refused(tmp_path: Path) -> None:
    """ACC-R2, ACC-E3: a mid-window checkpoint resumed with a plain DataLoader would feed
    the epoch's first microbatches again into the restored window: refused with a
    ConfigError naming the fixes; ``allow_replay=True`` accepts the replay (the result then
    differs from the uninterrupted run); a boundary checkpoint is accepted."""
    mid, boundary = tmp_path / "mid.ckpt", tmp_path / "boundary.ckpt"
    for index, path in ((5, mid), (7, boundary)):
        stop = W.StopAfter(index, lambda t, p=path: t.save_checkpoint(p))
        W.trainer([_ga(), stop]).fit(_net(), _plain_loader())
    with pytest.raises(ConfigError) as caught:
        W.trainer([_ga()]).fit(_net(), _plain_loader(), ckpt_path=str(mid))
    message = str(caught.value)
    assert "middle of a window (2 microbatches in)" in message
    for fix in ("StatefulDataLoader", "every_n_train_steps", "allow_replay=True"):
        assert fix in message

    _, straight, _ = _straight(epochs=1)
    replayed, ga = _net(seed=7), _ga(allow_replay=True)
    tr = W.trainer([ga])
    tr.fit(replayed, _plain_loader(), ckpt_path=str(mid))
    assert tr.global_step == 3 and ga.stats.micro_steps == 10
    assert W.rel_error(W.params(replayed), W.params(straight)) > 1e-3  # the replay shows

    # At a boundary nothing is in flight: accepted (Lightning itself warns that the plain
    # loader restarts the epoch's data).
    tr = W.trainer([_ga()])
    tr.fit(_net(seed=7), _plain_loader(), ckpt_path=str(boundary))
    assert tr.global_step == 3


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_model_checkpoint_every_n_train_steps_saves_after_boundaries_quietly(
    tmp_path: Path,
) -> None:
    """ACC-S2, ACC-R3: ``ModelCheckpoint(every_n_train_steps=2)`` counts optimizer steps:
    with 14 microbatches in windows of 3 it saves at steps 2 and 4, each right after a
    boundary (no gradient in flight), without Lightning's manual-optimization warning on
    every save; a resume from the step-2 file equals the uninterrupted run bitwise."""
    sizes = [2, 5, 1, 3, 4, 2, 6, 1, 2, 3, 1, 4, 2, 2]
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = W.trainer([GradAccum(3, normalization="items"), callback], enable_checkpointing=True)
        tr.fit(_net(), ListLoader(W.batches(sizes)))
    assert tr.global_step == 5
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
    ]
    assert not [w for w in caught if "ModelCheckpoint" in str(w.message)]
    for step, microbatches in ((2, 6), (4, 12)):
        ckpt = torch.load(tmp_path / f"epoch=0-step={step}.ckpt", weights_only=False)
        state = ckpt["callbacks"]["GradAccum"]["accumulation"]
        assert ckpt["global_step"] == step
        assert (state["position"], state["optimizer_steps"]) == (0, step)
        assert state["micro_steps"] == microbatches

    straight = _net()
    W.trainer([GradAccum(3, normalization="items")]).fit(straight, ListLoader(W.batches(sizes)))
    resumed = _net(seed=7)
    W.trainer([GradAccum(3, normalization="items")]).fit(
        resumed, ListLoader(W.batches(sizes)), ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt")
    )
    assert _equal(W.params(resumed), W.params(straight))


def test_shared_format_save_resumes_in_plain_gradaccum_torch_and_in_resume(
    tmp_path: Path,
) -> None:
    """ACC-R2, CKPT-5, CKPT-18, CKPT-26: ``GradAccum.save(dir)`` after microbatch 5
    (mid-window) writes the shared format (format 3; ``format_version=2`` on request) with
    parameter names without ``model.``; a plain ``gradaccum_torch.Accumulator`` over the
    bare model loads either and finishes the epoch bitwise like the uninterrupted Trainer
    run; so does a fresh Trainer with ``GradAccum(resume=dir)`` fed the rest of the epoch."""
    _, straight, _ = _straight(epochs=1)
    shared, shared_v2 = tmp_path / "shared", tmp_path / "shared-v2"

    def save_both(t: Any) -> None:
        GradAccum.of(t).save(shared)
        GradAccum.of(t).save(shared_v2, format_version=2)

    stop = W.StopAfter(5, save_both)
    W.trainer([_ga(model_attr="model"), stop]).fit(_net(), ListLoader(W.batches(SIZES)))

    assert read_checkpoint(shared).manifest.format_version == 3
    assert read_checkpoint(shared_v2).manifest.format_version == 2
    ckpt = read_checkpoint(shared)
    assert ckpt.producer.name == "gradaccum-lightning"
    assert set(tensors_from_bytes(ckpt.file_bytes("model"))) == NAMES
    assert set(tensors_from_bytes(ckpt.file_bytes("gradients"))) == NAMES
    assert ckpt.state["position"] == 2

    # Plain gradaccum-torch: the bare model, its optimizer and scheduler, the rest of the pass.
    for path in (shared, shared_v2):
        model = W.make_model(seed=11)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
        acc = Accumulator(model, opt, steps=4, normalization="items", scheduler=scheduler)
        acc.load(path)
        rest = W.batches(SIZES)[6:]
        for j, (x, y, n) in enumerate(acc.iterate(rest), start=6):
            with acc.microbatch(torch.tensor(n) if j % 2 else n):
                acc.backward(W.loss_fn(model(x), y, "items"))
        assert _equal(W.params(model), W.params(straight)), path.name
        assert acc.stats.optimizer_steps == 3

    # GradAccum(resume=dir): a fresh module; the stateful loader holds the rest of the pass.
    module, ga = _net(seed=7), _ga(model_attr="model", resume=shared)
    W.trainer([ga]).fit(module, ListLoader(W.batches(SIZES)[6:]))
    assert ga.stats.optimizer_steps == 3
    assert _equal(W.params(module), W.params(straight))


def test_resume_dir_mid_window_with_a_plain_loader_is_refused_before_loading(
    tmp_path: Path,
) -> None:
    """ACC-R2, ACC-E: ``GradAccum(resume=dir)`` from a mid-window shared checkpoint with a
    loader that is not stateful: the callback cannot tell where the loader starts, so it
    refuses with a ConfigError that names ``resume=``, the position and the ways out, before
    the load — the module keeps its own parameters bitwise. With ``allow_replay=True`` and a
    plain loader over the rest of the pass, the run ends bitwise on the uninterrupted one."""
    _, straight, _ = _straight(epochs=1)
    shared = tmp_path / "shared"
    stop = W.StopAfter(5, lambda t: GradAccum.of(t).save(shared))
    W.trainer([_ga(model_attr="model"), stop]).fit(_net(), ListLoader(W.batches(SIZES)))

    module = _net(seed=7)
    before = W.params(module)
    rest = DataLoader(W.batches(SIZES)[6:], batch_size=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        W.trainer([_ga(model_attr="model", resume=shared)]).fit(module, rest)
    message = str(caught.value)
    assert f"GradAccum(resume={str(shared)!r})" in message
    assert "middle of a window (2 microbatches in)" in message
    for fix in ("allow_replay=True", "between windows", "nothing was loaded"):
        assert fix in message
    assert "StatefulDataLoader" not in message  # Lightning restores no loader for resume=
    assert _equal(W.params(module), before)

    module, ga = _net(seed=7), _ga(model_attr="model", resume=shared, allow_replay=True)
    W.trainer([ga]).fit(module, rest)
    assert ga.stats.optimizer_steps == 3
    assert _equal(W.params(module), W.params(straight))


class _ReadsTheStepsEarly(W.Net):
    """Reads ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (as OneCycleLR
    users do): Lightning then sets the train loader up before it restores the checkpoint, and
    never hands the stateful loader its saved position (Lightning #20550)."""

    def configure_optimizers(self) -> Any:
        assert self.trainer.estimated_stepping_batches > 0
        return super().configure_optimizers()


def test_mid_window_resume_whose_loader_position_was_never_applied_is_refused(
    tmp_path: Path,
) -> None:
    """ACC-R3: a mid-window resume whose stateful loader Lightning set up too early (its saved
    position still waiting to be applied) would replay the epoch's first batches into the
    restored window: refused with ConfigError naming the cause, unless allow_replay=True."""
    path = tmp_path / "mid.ckpt"
    stop = W.StopAfter(5, lambda t: t.save_checkpoint(path), epoch=0)
    W.trainer([_ga(), stop], max_epochs=2).fit(_net(), ListLoader(W.batches(SIZES)))
    module = _ReadsTheStepsEarly("items", seed=7, device_items=True, scheduler=_step_lr)
    with pytest.raises(ConfigError, match=r"#20550.*allow_replay=True"):
        W.trainer([_ga()], max_epochs=2).fit(
            module, ListLoader(W.batches(SIZES)), ckpt_path=str(path)
        )
    module = _ReadsTheStepsEarly("items", seed=7, device_items=True, scheduler=_step_lr)
    W.trainer([_ga(allow_replay=True)], max_epochs=2).fit(
        module, ListLoader(W.batches(SIZES)), ckpt_path=str(path)
    )
