"""Checkpoints of the torch adapter: a mid-window save resumes on the same
trajectory, bitwise, in every normalization mode; names are wrapper-free
(spec ACC-R1..ACC-R5, checkpoint-v1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from ckpt_helpers import reseal
from conftest import Batch, make_batches, make_model, params_of, sum_loss

from gradaccum.checkpoint import open_checkpoint, read_checkpoint
from gradaccum.errors import CheckpointChecksumError, UsageError
from gradaccum_torch import Accumulator
from gradaccum_torch.checkpoint import prepare_load, verification_share

SIZES = [3, 2, 4, 1, 3, 2, 5, 2, 3, 1]


def _build(
    normalization: str, model: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, Accumulator]:
    model = model if model is not None else make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    return model, Accumulator(model, opt, steps=4, scheduler=sched, normalization=normalization)


def _loss(normalization: str) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
    def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        total = sum_loss(model, batch)
        return total if normalization == "items" else total / len(batch[0])

    return loss


def _run(
    acc: Accumulator,
    model: torch.nn.Module,
    batches: list[Batch],
    normalization: str,
    start: int = 0,
) -> None:
    loss = _loss(normalization)
    for i, batch in enumerate(batches):
        last = start + i == len(SIZES) - 1
        with acc.microbatch(items=len(batch[0]), last=last):
            acc.backward(loss(model, batch))


@pytest.mark.parametrize("normalization", ["mean", "items", "sum"])
@pytest.mark.parametrize("cut", [1, 5, 6, 9])
def test_mid_window_resume_is_bitwise_identical(
    tmp_path: Path, normalization: str, cut: int
) -> None:
    """ACC-R3: save after `cut` microbatches, resume in fresh objects: same parameters, bitwise."""
    batches = make_batches(SIZES)
    model, acc = _build(normalization)
    _run(acc, model, batches, normalization)
    expected = params_of(model)
    expected_stats = acc.stats

    model, acc = _build(normalization)
    _run(acc, model, batches[:cut], normalization)
    acc.save(tmp_path / "ckpt")
    assert read_checkpoint(tmp_path / "ckpt").state["position"] == cut % 4

    model2, acc2 = _build(normalization, make_model(seed=99))  # different init: load must overwrite
    acc2.load(tmp_path / "ckpt")
    _run(acc2, model2, batches[cut:], normalization, start=cut)
    for a, b in zip(expected, params_of(model2), strict=True):
        assert torch.equal(a, b)
    assert acc2.stats.optimizer_steps == expected_stats.optimizer_steps == 3
    assert acc2.stats.micro_steps == expected_stats.micro_steps == len(SIZES)
    assert acc2.scheduler is not None and acc2.scheduler.last_epoch == 3


def test_format_1_checkpoint_resumes_on_the_same_trajectory(tmp_path: Path) -> None:
    """ACC-R3, CKPT-25, CKPT-26: the adapter writes format 3 by default and
    format 2 or 1 when asked (``save(format_version=...)``); each, and the
    default checkpoint rewritten in format 1, loads and resumes bitwise like
    the uninterrupted run; a format-1 tensor file with one flipped byte is
    refused (whole-file digest) with the live objects unchanged; a format
    version the release does not write is refused before anything is
    written."""
    batches = make_batches(SIZES)
    model, acc = _build("items")
    _run(acc, model, batches, "items")
    expected = params_of(model)

    model, acc = _build("items")
    _run(acc, model, batches[:6], "items")
    acc.save(tmp_path / "v3")
    acc.save(tmp_path / "v2", format_version=2)
    acc.save(tmp_path / "v1-direct", format_version=1)
    for bad in (4, 0, "3", True, None):
        with pytest.raises(UsageError, match=r"format_version=.* is not one this release writes"):
            acc.save(tmp_path / "bad", format_version=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()
    for name, version in (("v3", 3), ("v2", 2), ("v1-direct", 1)):
        m = read_checkpoint(tmp_path / name).manifest
        assert m.format_version == version, name
        assert {e.tensor_digest for e in m.files.values()} == {
            "crc32" if version == 3 else "sha256"
        }
    reseal(tmp_path / "v3", tmp_path / "v1", format_version=1)
    v1 = read_checkpoint(tmp_path / "v1")
    assert v1.manifest.format_version == 1
    assert all(v1.manifest.files[r].sha256 is not None for r in v1.roles)

    for name in ("v3", "v2", "v1-direct", "v1"):
        model2, acc2 = _build("items", make_model(seed=99))
        acc2.load(tmp_path / name)
        _run(acc2, model2, batches[6:], "items", start=6)
        for a, b in zip(expected, params_of(model2), strict=True):
            assert torch.equal(a, b), name

    blob = bytearray((tmp_path / "v1" / "model.safetensors").read_bytes())
    blob[-3] ^= 0x10
    (tmp_path / "v1" / "model.safetensors").write_bytes(blob)
    model3, acc3 = _build("items", make_model(seed=7))
    before = params_of(model3)
    with pytest.raises(CheckpointChecksumError, match=r"file 'model.safetensors' has SHA-256"):
        acc3.load(tmp_path / "v1")
    for a, b in zip(before, params_of(model3), strict=True):
        assert torch.equal(a, b)
    assert acc3.stats.micro_steps == 0


def test_tensor_item_counts_survive_a_checkpoint(tmp_path: Path) -> None:
    """ACC-R2: device item counters of the open window are saved and restored."""
    batches = make_batches(SIZES)
    model, acc = _build("items")
    for i, batch in enumerate(batches):
        with acc.microbatch(items=torch.tensor(len(batch[0])), last=i == len(SIZES) - 1):
            acc.backward(sum_loss(model, batch))
    expected = params_of(model)
    model, acc = _build("items")
    for batch in batches[:6]:
        with acc.microbatch(items=torch.tensor(len(batch[0]))):
            acc.backward(sum_loss(model, batch))
    acc.save(tmp_path / "ckpt")
    assert "items" in read_checkpoint(tmp_path / "ckpt").roles
    model2, acc2 = _build("items", make_model(seed=7))
    acc2.load(tmp_path / "ckpt")
    for i, batch in enumerate(batches[6:]):
        with acc2.microbatch(items=torch.tensor(len(batch[0])), last=6 + i == len(SIZES) - 1):
            acc2.backward(sum_loss(model2, batch))
    for a, b in zip(expected, params_of(model2), strict=True):
        assert torch.equal(a, b)


def test_state_dict_round_trip_mid_window() -> None:
    """ACC-R3: state_dict()/load_state_dict() carry the in-flight gradients too."""
    batches = make_batches(SIZES)
    model, acc = _build("items")
    _run(acc, model, batches, "items")
    expected = params_of(model)
    model, acc = _build("items")
    _run(acc, model, batches[:6], "items")
    state = acc.state_dict()
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    optim_state = acc.optimizer.state_dict()
    model2, acc2 = _build("items", make_model(seed=3))
    model2.load_state_dict(model_state)
    acc2.optimizer.load_state_dict(optim_state)
    assert acc2.scheduler is not None and acc.scheduler is not None
    acc2.scheduler.load_state_dict(acc.scheduler.state_dict())
    acc2.load_state_dict(state)
    _run(acc2, model2, batches[6:], "items", start=6)
    for a, b in zip(expected, params_of(model2), strict=True):
        assert torch.equal(a, b)


def test_names_are_wrapper_free(tmp_path: Path) -> None:
    """CKPT-5: a checkpoint from a DataParallel-wrapped model loads into the bare model."""
    batches = make_batches(SIZES[:6])
    inner = make_model()
    wrapped = torch.nn.DataParallel(inner)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    acc = Accumulator(wrapped, opt, steps=4, normalization="items")
    for batch in batches:
        with acc.microbatch(items=len(batch[0])):
            acc.backward(sum_loss(wrapped, batch))
    acc.save(tmp_path / "ckpt")
    ckpt = read_checkpoint(tmp_path / "ckpt")
    names = sorted(ckpt.manifest.files["gradients"].tensors)
    assert names == ["0.bias", "0.weight", "2.bias", "2.weight"]
    bare = make_model(seed=11)
    acc2 = Accumulator(
        bare, torch.optim.SGD(bare.parameters(), lr=0.1), steps=4, normalization="items"
    )
    acc2.load(tmp_path / "ckpt")
    for a, b in zip(params_of(inner), params_of(bare), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(inner.parameters(), bare.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)
    assert acc2.stats.position == 2


def test_boundary_checkpoint_loads_under_another_schedule(tmp_path: Path) -> None:
    """ACC-R5: at a boundary no gradient is in flight, so the schedule may change on resume."""
    batches = make_batches(SIZES[:8])
    model, acc = _build("items")
    _run(acc, model, batches, "items")
    acc.save(tmp_path / "ckpt")
    assert "gradients" not in read_checkpoint(tmp_path / "ckpt").roles
    model2 = make_model(seed=2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01, weight_decay=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.9**s)
    acc2 = Accumulator(model2, opt2, steps=2, scheduler=sched2, normalization="items")
    acc2.load(tmp_path / "ckpt")
    assert acc2.stats.optimizer_steps == 2 and sched2.last_epoch == 2
    for a, b in zip(params_of(model), params_of(model2), strict=True):
        assert torch.equal(a, b)


def test_scaler_state_round_trips(tmp_path: Path) -> None:
    """checkpoint-v1: the GradScaler's scale and growth tracker are restored."""
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)
    acc = Accumulator(model, opt, steps=2, scaler=scaler)
    for batch in make_batches([2, 2, 2, 2], dtype=torch.float32):
        with acc.microbatch():
            acc.backward(sum_loss(model, batch))
    acc.save(tmp_path / "ckpt")
    model2 = make_model(torch.float32)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    acc2 = Accumulator(
        model2, torch.optim.SGD(model2.parameters(), lr=0.1), steps=2, scaler=scaler2
    )
    acc2.load(tmp_path / "ckpt")
    assert scaler2.get_scale() == scaler.get_scale()
    assert scaler2.state_dict() == scaler.state_dict()


def test_verification_shares_cover_every_tensor_once(tmp_path: Path) -> None:
    """CKPT-25, CKPT-26: verification_share splits a file's tensors (of a
    format-3 checkpoint, the default) among n processes,
    disjoint, covering every tensor, balanced by bytes (largest first, to the
    process with the fewest bytes so far); prepare_load refuses a share that
    is not (index, count) with 0 <= index < count, before anything changes."""
    model, acc = _build("mean")
    _run(acc, model, make_batches(SIZES)[:6], "mean")  # one optimizer step: Adam state
    acc.save(tmp_path / "c")
    with open_checkpoint(tmp_path / "c", verify=False) as ck:
        names = set(ck.manifest.files["optimizer"].tensors)
        assert len(names) >= 8
        sizes = {n: ck.header("optimizer").tensors[n].nbytes for n in names}
        for n in (1, 2, 3, 7):
            parts = [verification_share(ck, "optimizer", (i, n)) for i in range(n)]
            assert set().union(*parts) == names
            assert sum(len(p) for p in parts) == len(names)
            loads = [sum(sizes[t] for t in p) for p in parts]
            assert max(loads) - min(loads) <= max(sizes.values()), (n, loads)
    before = params_of(model)
    for bad in [(2, 2), (0, 0), (-1, 2), (0.0, 1), [0, 1], (0, 1, 2)]:
        with pytest.raises(UsageError, match="must be \\(index, count\\)"):
            prepare_load(acc, tmp_path / "c", share=bad)  # type: ignore[arg-type]
    for a, b in zip(before, params_of(model), strict=True):
        assert torch.equal(a, b)
