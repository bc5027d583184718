"""`WandbLogger` with the plain torch accumulator and a real offline wandb run, read back from
the run's ``.wandb`` file (one run shared by the assertions: wandb starts slowly).

The scenario: a float64 linear model with two param groups (``w`` at lr 0.1, ``b`` at 0.05), a
``LambdaLR`` of ``1/(1+e)``, windows of 3 microbatches of unequal item counts under
``normalization="items"``, gradient norm tracked, 12 microbatches. Microbatch 4 (window 1)
gets a NaN target, so window 1 is skipped (``non_finite="skip"``, ACC-F1): three optimizer
steps and one skipped window. Everything expected is computed here, independently of the logger.
"""

from __future__ import annotations

import contextlib
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb

from gradaccum.errors import ConfigError, GradAccumError, UsageError
from gradaccum_torch import Accumulator
from gradaccum_wandb import WandbLogger
from gradaccum_wandb.offline import OfflineRun, OfflineRunError, read_history, read_run

SIZES = [2, 5, 1, 3, 4, 2, 6, 1, 2, 3, 2, 4]
NAN_AT = 4
STEPS = 3
LR = {"w": 0.1, "b": 0.05}
SYNCING = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def count_host_reads(counter: list[int]) -> Iterator[None]:
    """Count every tensor method call that reads a value back to the host (a CUDA sync)."""
    originals: dict[str, Callable[..., Any]] = {n: getattr(torch.Tensor, n) for n in SYNCING}

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


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for i, n in enumerate(SIZES):
        x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        if i == NAN_AT:
            y[0, 0] = float("nan")
        out.append((x, y))
    return out


def window_grad_norm(
    model: torch.nn.Module, window: list[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """The norm of the large-batch gradient of the window's token-mean loss (the reference)."""
    params = list(model.parameters())
    total = sum(((model(x) - y) ** 2).sum() for x, y in window)
    count = sum(x.shape[0] for x, _ in window)
    grads = torch.autograd.grad(total / count, params)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("wandb-run")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(
        [
            {"params": [model.weight], "lr": LR["w"], "name": "w"},
            {"params": [model.bias], "lr": LR["b"], "name": "b"},
        ]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (1 + e))
    acc = Accumulator(
        model,
        optimizer,
        steps=STEPS,
        normalization="items",
        scheduler=scheduler,
        track_grad_norm=True,
        micro_batch_size=4,
    )
    run = wandb.init(mode="offline", dir=str(out), project="gradaccum-test")
    logger = WandbLogger(run, grad_norm=True, extra=[lambda: {"extra/const": 7.0}]).attach(acc)
    logger.add_extra(lambda: {"extra/tensor": torch.tensor(2.5, dtype=torch.float64)})
    data = batches()
    expected_norms = []
    reads_in_stage = [0]
    reads_per_microbatch = []
    for i, (x, y) in enumerate(acc.iterate(data)):
        if i % STEPS == 0 and i // STEPS != NAN_AT // STEPS:
            expected_norms.append(window_grad_norm(model, data[i : i + STEPS]))
        reads = [0]
        with count_host_reads(reads), acc.microbatch(items=x.shape[0]):
            loss = ((model(x) - y) ** 2).sum()
            per_item = loss.detach() / x.shape[0]
            with count_host_reads(reads_in_stage):
                logger.stage({"loss": loss})
                logger.stage({"loss_item_mean": per_item}, reduce="item_mean")
                logger.stage({"microbatch_mean": per_item}, reduce="mean")
                logger.stage({"count": 1}, reduce="sum")
            acc.backward(loss)
        reads_per_microbatch.append(reads[0])
    logger.log({"val/score": 0.5})
    run.finish()
    wandb.teardown()
    return {
        "run": read_run(out),
        "dir": out,
        "data": data,
        "norms": expected_norms,
        "reads_in_stage": reads_in_stage[0],
        "reads": reads_per_microbatch,
    }


def rows_of(run: OfflineRun, skipped: int | None = None) -> list[dict[str, Any]]:
    rows = [r for r in run.history if "accum/skipped" in r]
    return rows if skipped is None else [r for r in rows if r["accum/skipped"] == skipped]


def test_one_row_per_optimizer_step_on_its_own_axis(scenario: dict[str, Any]) -> None:
    """One row per successful optimizer step with x = 1, 2, 3 on ``optimizer_step``, a skipped
    window marked at the last step's x value with its reason (ACC-F1), a run that ended with an
    exit record, and every logger metric declared against ``optimizer_step``."""
    run: OfflineRun = scenario["run"]
    assert run.has_exit and run.exit_code == 0
    assert [r["optimizer_step"] for r in run.history] == [1, 1, 2, 3, 3]
    steps = rows_of(run, skipped=0)
    assert [r["optimizer_step"] for r in steps] == [1, 2, 3]
    (skip,) = rows_of(run, skipped=1)
    assert skip["optimizer_step"] == 1
    assert skip["accum/skip_reason"] == "non_finite"
    assert skip["accum/skipped_steps"] == 1 and skip["accum/micro_steps"] == 6
    assert "loss" not in skip  # a skipped window's staged metrics are discarded
    assert [r["accum/skipped_steps"] for r in steps] == [0, 1, 1]
    assert [r["accum/micro_steps"] for r in steps] == [3, 9, 12]
    assert [r["accum/microbatches"] for r in steps] == [3, 3, 3]
    assert run.history[-1] == {"optimizer_step": 3, "val/score": 0.5}
    assert run.metrics["optimizer_step"] == ""
    for name in ("accum/*", "loss", "count", "extra/const", "val/score"):
        assert run.metrics[name] == "optimizer_step", name


def test_items_and_effective_batch(scenario: dict[str, Any]) -> None:
    """Items in each stepped window and in total (skipped windows count no items), and the
    effective batch micro_batch_size x window x world = 4 x 3 x 1."""
    steps = rows_of(scenario["run"], skipped=0)
    windows = [SIZES[0:3], SIZES[6:9], SIZES[9:12]]
    assert [r["accum/items_in_window"] for r in steps] == [sum(w) for w in windows]
    assert [r["accum/items_total"] for r in steps] == [8, 17, 26]
    assert all(r["accum/effective_batch_size"] == 12 for r in steps)
    assert all(r["accum/epoch"] == 0 for r in steps)


def test_learning_rates_are_the_ones_each_step_used(scenario: dict[str, Any]) -> None:
    """Per param group, the lr the optimizer step used: base/(1+e) for the e-th scheduler step
    (ACC-S3: the scheduler steps once per optimizer step, not on the skipped window)."""
    steps = rows_of(scenario["run"], skipped=0)
    for e, row in enumerate(steps):
        for group, base in LR.items():
            assert row[f"accum/lr/{group}"] == pytest.approx(base / (1 + e), rel=1e-15)


def test_staged_metrics_reduce_like_the_normalization(scenario: dict[str, Any]) -> None:
    """Staged tensors reduced per window, recomputed here: under ``items`` the loss is
    Σ S_j / Σ n_j (the item-weighted mean, ACC-N2), ``item_mean`` of per-item means equals it,
    ``mean`` is the plain mean over the window's microbatches (ACC-N1), ``sum`` counts the
    microbatches; all within 1e-12 relative."""
    data = scenario["data"]
    torch.manual_seed(0)
    steps = rows_of(scenario["run"], skipped=0)
    # Recompute the losses with the parameters each window saw: replay the training exactly.
    model = torch.nn.Linear(3, 1).double()
    optimizer = torch.optim.SGD(
        [
            {"params": [model.weight], "lr": LR["w"]},
            {"params": [model.bias], "lr": LR["b"]},
        ]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (1 + e))
    got = iter(steps)
    for w in range(len(SIZES) // STEPS):
        window = data[w * STEPS : (w + 1) * STEPS]
        if w == NAN_AT // STEPS:
            continue
        with torch.no_grad():
            sums = [float(((model(x) - y) ** 2).sum()) for x, y in window]
        counts = [x.shape[0] for x, _ in window]
        row = next(got)
        want = sum(sums) / sum(counts)
        assert row["loss"] == pytest.approx(want, rel=1e-12)
        assert row["loss_item_mean"] == pytest.approx(want, rel=1e-12)
        plain = sum(s / n for s, n in zip(sums, counts, strict=True)) / STEPS
        assert row["microbatch_mean"] == pytest.approx(plain, rel=1e-12)
        assert abs(plain - want) > 1e-3  # the two reductions really differ here
        assert row["count"] == 3
        optimizer.zero_grad()
        total = sum(((model(x) - y) ** 2).sum() for x, y in window)
        (total / sum(counts)).backward()
        optimizer.step()
        scheduler.step()


def test_grad_norm_and_extra_metrics(scenario: dict[str, Any]) -> None:
    """``accum/grad_norm`` equals the norm of the large-batch gradient of each stepped window
    (float64 reference, 1e-12 relative); the ``extra`` callables' values are in every step row."""
    steps = rows_of(scenario["run"], skipped=0)
    assert len(scenario["norms"]) == 3
    for row, norm in zip(steps, scenario["norms"], strict=True):
        assert row["accum/grad_norm"] == pytest.approx(norm, rel=1e-12)
        assert row["extra/const"] == 7.0 and row["extra/tensor"] == 2.5


def test_no_host_read_per_microbatch(scenario: dict[str, Any]) -> None:
    """Staging device tensors reads nothing back (0 reads over 48 stage calls); microbatches
    that do not close a window read nothing; a boundary reads at most twice: the accumulator's
    one read (ACC-B4) and the logger's one transfer of the row's values."""
    assert scenario["reads_in_stage"] == 0
    reads = scenario["reads"]
    for i, count in enumerate(reads):
        if (i + 1) % STEPS:
            assert count == 0, (i, reads)
        else:
            assert count <= 2, (i, reads)


def test_reader_rejects_a_damaged_file(scenario: dict[str, Any], tmp_path: Path) -> None:
    """The reader verifies every chunk's CRC-32: one flipped payload byte raises
    `OfflineRunError` (a `GradAccumError`), as does a file that is only the header."""
    (source,) = [
        p for p in Path(scenario["dir"]).rglob("run-*.wandb") if "latest-run" not in p.parts
    ]
    data = bytearray(source.read_bytes())
    stored, length, kind = struct.unpack_from("<IHB", data, 7)
    assert stored == zlib.crc32(bytes([kind]) + bytes(data[14 : 14 + length]))
    data[14 + length // 2] ^= 0xFF
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(OfflineRunError, match="checksum"):
        read_history(bad)
    header_only = tmp_path / "run-header.wandb"
    header_only.write_bytes(bytes(data[:7]))
    assert read_run(header_only).has_exit is False
    with pytest.raises(GradAccumError, match="not a W&B run log"):
        read_history(_write(tmp_path / "run-junk.wandb", b"junk"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_arguments_raise_before_anything_changes() -> None:
    """Bad construction arguments and bad staged values raise `ConfigError` / `UsageError`
    naming the value, before any run is needed."""
    with pytest.raises(ConfigError, match="step_metric"):
        WandbLogger(step_metric="")
    with pytest.raises(ConfigError, match="prefix='accum/'"):
        WandbLogger(step_metric="accum/step")
    with pytest.raises(ConfigError, match="grad_norm=1"):
        WandbLogger(grad_norm=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot attach to int"):
        WandbLogger().attach(3)
    with pytest.raises(ConfigError, match=r"run=3 must be a wandb run"):
        WandbLogger(3)
    logger = WandbLogger(rank=0)
    with pytest.raises(UsageError, match="attach"):
        logger.stage({"loss": 1.0})
    with pytest.raises(ConfigError, match="reduce='median'"):
        logger.stage({"loss": 1.0}, reduce="median")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"'loss'.*shape \(2,\)"):
        logger.stage({"loss": torch.ones(2)}, reduce="mean")
    with pytest.raises(UsageError, match=r"'loss'.*'x' is not a number"):
        logger.stage({"loss": "x"}, reduce="mean")  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="x-axis"):
        logger.stage({"optimizer_step": 1}, reduce="mean")
    model = torch.nn.Linear(2, 1)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    logger.attach(acc)
    with pytest.raises(UsageError, match="already attached"):
        logger.attach(acc)
    logger.stage({"loss": 1.0}, reduce="mean")
    with pytest.raises(UsageError, match=r"'loss' was staged with reduce='mean' and now"):
        logger.stage({"loss": 1.0}, reduce="sum")  # refused at stage(), before any backward
    assert acc.stats.micro_steps == 0


def test_other_ranks_log_nothing() -> None:
    """On a rank other than 0 every call returns at once: no run is needed or looked up, even
    for a full window (the 2-rank test checks the same with real process groups)."""
    model = torch.nn.Linear(2, 1).double()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    logger = WandbLogger(run=lambda: pytest.fail("rank 1 looked up a run"), rank=1).attach(acc)
    for _ in range(4):
        with acc.microbatch():
            loss = model(torch.ones(1, 2, dtype=torch.float64)).sum()
            logger.stage({"loss": loss})
            acc.backward(loss)
    assert acc.stats.optimizer_steps == 2
    assert logger._pending == [] and logger._sums == {}


def test_device_item_counts_need_items_in_stage(tmp_path: Path) -> None:
    """With item counts on the device (ACC-N3) the logger cannot see them on the host: staging
    with ``items=`` (the same 0-d tensors) gives Σ S_j / Σ n_j (1e-12 relative) with no host
    read in ``stage``; staging without it raises `UsageError` naming ``items=`` at the step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, normalization="items"
    )
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradaccum-test")
    logger = WandbLogger(run).attach(acc)
    data = batches()[:3]
    sums, reads = [], [0]
    for x, y in data:
        n = torch.tensor(x.shape[0])
        with acc.microbatch(items=n):
            loss = ((model(x) - y) ** 2).sum()
            sums.append(float(loss.detach()))
            with count_host_reads(reads):
                logger.stage({"loss": loss}, items=n)
            acc.backward(loss)
    assert reads[0] == 0
    for x, y in data:
        with acc.microbatch(items=torch.tensor(x.shape[0])):
            loss = ((model(x) - y) ** 2).sum()
            logger.stage({"loss": loss})
            if acc.sync_gradients:
                with pytest.raises(UsageError, match="items=n"):
                    acc.backward(loss)
            else:
                acc.backward(loss)
    run.finish()
    wandb.teardown()
    history = read_history(tmp_path)
    assert [r["optimizer_step"] for r in history] == [1]
    assert history[0]["loss"] == pytest.approx(sum(sums) / sum(SIZES[:3]), rel=1e-12)
    assert history[0]["accum/items_in_window"] == sum(SIZES[:3])


def test_dropped_microbatches_and_windows_contribute_nothing(tmp_path: Path) -> None:
    """ACC-N5: a microbatch dropped by ``drop_microbatch`` adds neither its staged loss nor its
    items (window 0's loss is S_0 / n_0 alone); a partial window dropped at the end of a pass
    (``partial_window="drop"``, ACC-W) leaves nothing behind: the next pass's first window
    logs its own Σ S_j / Σ n_j (1e-12 relative). Two passes of 5 microbatches, windows of 2."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    acc = Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=2,
        normalization="items",
        non_finite="drop_microbatch",
        partial_window="drop",
    )
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradaccum-test")
    logger = WandbLogger(run).attach(acc)
    data = batches()[:5]
    data[1] = (data[1][0], torch.full_like(data[1][1], float("nan")))
    expected = []
    for _ in range(2):
        sums = []
        for i, (x, y) in enumerate(acc.iterate(data)):
            with acc.microbatch(items=x.shape[0]):
                loss = ((model(x) - y) ** 2).sum()
                sums.append((float(loss.detach()), x.shape[0]))
                logger.stage({"loss": loss})
                acc.backward(loss)
            if i in (1, 3):
                kept = [(s, n) for s, n in sums if math.isfinite(s)]
                expected.append(sum(s for s, _ in kept) / sum(n for _, n in kept))
                sums = []
    run.finish()
    wandb.teardown()
    history = read_history(tmp_path)
    assert [r["optimizer_step"] for r in history] == [1, 2, 3, 4]
    assert [r["accum/items_in_window"] for r in history] == [SIZES[0], SIZES[2] + SIZES[3]] * 2
    for row, want in zip(history, expected, strict=True):
        assert row["loss"] == pytest.approx(want, rel=1e-12)


def test_grad_norm_without_a_computed_norm_is_a_config_error() -> None:
    """``grad_norm=True`` with an accumulator that computes no norm (no ``track_grad_norm``, no
    clipping by norm) raises `ConfigError` at the first step, naming ``track_grad_norm``."""
    model = torch.nn.Linear(2, 1).double()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    WandbLogger(run=lambda: pytest.fail("no row may be written"), grad_norm=True).attach(acc)
    with acc.microbatch(), pytest.raises(ConfigError, match="track_grad_norm=True"):
        acc.backward(model(torch.ones(1, 2, dtype=torch.float64)).sum())


def test_resumed_mid_window_counts_from_the_checkpoint(tmp_path: Path) -> None:
    """A run resumed from a mid-window state (ACC state_dict, one microbatch of window 2 done)
    with a fresh logger continues the axis: the resumed window's row is at x = 2, counts the
    window's 3 microbatches and all its items (ACC-N2's N), micro_steps 6; its staged loss
    covers the microbatches after the resume."""
    data = [b for i, b in enumerate(batches()) if i != NAN_AT][:6]
    sizes = [x.shape[0] for x, _ in data]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, normalization="items"
    )
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradaccum-test")
    first = WandbLogger(run).attach(acc)
    for x, y in data[:4]:
        with acc.microbatch(items=x.shape[0]):
            loss = ((model(x) - y) ** 2).sum()
            first.stage({"loss": loss})
            acc.backward(loss)
    state = acc.state_dict()
    resumed = Accumulator(model, acc.optimizer, steps=3, normalization="items")
    resumed.load_state_dict(state)
    second = WandbLogger(run).attach(resumed)
    sums = []
    for x, y in data[4:]:
        with resumed.microbatch(items=x.shape[0]):
            loss = ((model(x) - y) ** 2).sum()
            sums.append(float(loss.detach()))
            second.stage({"loss": loss})
            resumed.backward(loss)
    run.finish()
    wandb.teardown()
    history = read_history(tmp_path)
    assert [r["optimizer_step"] for r in history] == [1, 2]
    row = history[1]
    assert row["accum/microbatches"] == 3 and row["accum/micro_steps"] == 6
    assert row["accum/items_in_window"] == sum(sizes[3:6])
    assert row["accum/items_total"] == sum(sizes)
    assert row["loss"] == pytest.approx(sum(sums) / sum(sizes[4:6]), rel=1e-12)
