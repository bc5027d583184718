"""In-process checks on a one-rank gloo process group: argument errors, and world size 1
giving exactly what single-process gradaccum-torch gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ddp_workers as W
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradaccum.checkpoint import read_checkpoint
from gradaccum.errors import ConfigError, UsageError
from gradaccum_ddp import DDPAccumulator
from gradaccum_ddp.collectives import pack_files, unpack_files
from gradaccum_ddp.testing import ReductionCounter, one_rank_group
from gradaccum_torch import Accumulator

SIZES = [2, 5, 1, 3, 4, 2, 6]


@pytest.fixture
def group() -> Iterator[None]:
    with one_rank_group():
        yield


def test_needs_an_initialised_process_group() -> None:
    assert not dist.is_initialized()
    model = W.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="init_process_group"):
        DDPAccumulator(model, opt, steps=2)  # type: ignore[arg-type]


@pytest.mark.usefixtures("group")
def test_needs_a_ddp_model() -> None:
    model = W.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="DistributedDataParallel"):
        DDPAccumulator(model, opt, steps=2)  # type: ignore[arg-type]


@pytest.mark.usefixtures("group")
def test_bad_lockstep_is_a_config_error() -> None:
    ddp = DistributedDataParallel(W.make_model(0))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="lockstep"):
        DDPAccumulator(ddp, opt, steps=2, lockstep="never")  # type: ignore[arg-type]


@pytest.mark.usefixtures("group")
def test_accumulate_is_refused_under_ddp() -> None:
    ddp = DistributedDataParallel(W.make_model(0))
    acc = DDPAccumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), steps=2)
    with pytest.raises(UsageError, match=r"acc\.microbatch"):
        acc.accumulate(ddp.module(torch.ones(1, W.IN, dtype=torch.float64)).sum())


def _train(
    acc: Accumulator, model: torch.nn.Module, normalization: str
) -> list[dict[str, list[float]]]:
    out = []
    for j, x_y in enumerate(acc.iterate([W.microbatch(0, 0, j, n) for j, n in enumerate(SIZES)])):
        x, y = x_y
        before = acc.machine.state.windows
        with acc.microbatch(SIZES[j]):
            acc.backward(W.loss_fn(model(x), y, normalization))
        if acc.machine.state.windows != before:
            out.append(W.params_json(model))
    return out


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("normalization", ["items", "mean"])
def test_world_size_one_equals_gradaccum_torch_bitwise(normalization: str) -> None:
    ddp = DistributedDataParallel(W.make_model(0))
    acc = DDPAccumulator(
        ddp,
        torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9),
        steps=3,
        normalization=normalization,
    )
    counter = ReductionCounter(ddp, acc)
    got = _train(acc, ddp, normalization)
    plain = W.make_model(0)
    single = Accumulator(
        plain,
        torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9),
        steps=3,
        normalization=normalization,
    )
    assert got == _train(single, plain, normalization)
    assert counter.total == len(got) == 3
    assert acc.stats.world_size == 1


@pytest.mark.usefixtures("group")
def test_world_size_one_checkpoint_is_a_single_process_checkpoint(tmp_path: Path) -> None:
    ddp = DistributedDataParallel(W.make_model(0))
    acc = DDPAccumulator(
        ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), steps=3, normalization="items"
    )
    for j, (x, y) in enumerate(
        acc.iterate([W.microbatch(0, 0, j, n) for j, n in enumerate(SIZES[:5])])
    ):
        with acc.microbatch(SIZES[j]):
            acc.backward(W.loss_fn(ddp(x), y, "items"))
        if j == 3:
            acc.save(tmp_path / "ckpt")
            break
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.world_size == 1 and {"gradients", "items"} <= set(ckpt.roles)
    plain = W.make_model(5)
    single = Accumulator(
        plain, torch.optim.SGD(plain.parameters(), lr=0.1), steps=3, normalization="items"
    )
    single.load(tmp_path / "ckpt")
    assert single.machine.state.position == 1


def test_pack_files_round_trips() -> None:
    files = {"gradients.rank1": b"\x00\x01abc", "items.rank1": b"", "x": b"y" * 1000}
    assert unpack_files(pack_files(files)) == files
    assert unpack_files(pack_files({})) == {}
