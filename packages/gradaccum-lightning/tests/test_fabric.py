"""`FabricAccumulator` with real Lightning Fabric: exactness against a float64 large-batch
reference computed by hand, one gradient reduction per window on 2 ranks through
``fabric.no_backward_sync``, fp16 through Fabric's explicit ``MixedPrecision`` plugin, the
refusals, checkpoints (mid-window resume, canonical names, a plain-torch reader), and a
side-by-side with Fabric's own documented accumulation idiom.

One rank runs in this process (``Fabric(accelerator="cpu", devices=1)``); the 2-rank cases
run in one launch for the whole module (`fabric_workers.rank_program`: two spawned gloo
ranks, a torchrun environment, ``Fabric(accelerator="cpu", devices=2, strategy="ddp")``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fabric_workers as W
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DataParallelStrategy, DDPStrategy

from gradaccum.checkpoint import read_checkpoint
from gradaccum.errors import ConfigError, UsageError
from gradaccum_lightning import FabricAccumulator
from gradaccum_lightning.fabric_harness import launch_fabric, make_fabric, one_process
from gradaccum_torch import Accumulator
from gradaccum_torch.tensor_io import tensors_from_bytes

# Unequal item counts across ranks and microbatches.
SIZES = [[2, 5, 1, 3, 4, 2, 6, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
BASE: dict[str, Any] = {"steps": 3, "lr": 0.1, "momentum": 0.9, "seed": 0, "sizes": SIZES}
ITEMS = {**BASE, "normalization": "items"}  # 3 windows of 3
# 7 microbatches a pass, 2 passes: windows of 3, 3, 1 in each pass.
MEAN_SHORT_LAST = {**BASE, "normalization": "mean", "sizes": [s[:7] for s in SIZES], "passes": 2}
# 9 microbatches, steps 4: windows of 4, 4, 1; checkpoints after microbatch 5 (position 2
# of window 1) and after microbatch 3 (window 0 just stepped); an LR scheduler.
CHECKPOINT = {**ITEMS, "steps": 4, "mid": 5, "boundary": 3, "scheduler": True}
REL = 1e-12

CASES: dict[str, dict[str, Any]] = {
    "items": {**ITEMS, "kind": "train"},
    "items_device": {**ITEMS, "kind": "train", "device_items": True},
    "mean_short_last": {**MEAN_SHORT_LAST, "kind": "train"},
    "idiom": {**MEAN_SHORT_LAST, "kind": "idiom"},
    "checkpoint": {**CHECKPOINT, "kind": "checkpoint"},
    "compiled": {**ITEMS, "kind": "compiled"},
    "lightning_environment": {**ITEMS, "kind": "train", "lightning_environment": True},
}
TRAINING = ["items", "items_device", "mean_short_last"]


def one_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` on rank 0's data only."""
    return {**spec, "sizes": spec["sizes"][:1]}


@pytest.fixture(autouse=True)
def _no_launcher() -> Iterator[None]:
    """The one-rank tests run in this process: no launcher variables for Fabric to find."""
    with one_process():
        yield


# -- the 2-rank launch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Any]]]:
    out = tmp_path_factory.mktemp("fabric-2-ranks")
    run = launch_fabric(W.rank_program, 2, str(out), CASES, timeout=300, pg_timeout=120)
    assert run.ok, f"rank processes failed: {run}"
    results = {
        name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        for name in CASES
    }
    return out, results


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result.get("error", {}).get("trace")
    return result


def _fabric_objects(spec: dict[str, Any], fabric: Fabric | None = None, **setup: Any) -> W.Setup:
    return W.Setup(fabric or make_fabric(1), spec, **setup)


# -- exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec", "device_items"),
    [
        ("items_host", ITEMS, False),
        ("items_device", ITEMS, True),
        ("mean_short_last", MEAN_SHORT_LAST, False),
        ("mean_short_last_unknown_length", {**MEAN_SHORT_LAST, "known_length": False}, False),
    ],
)
def test_one_rank_equals_large_batch(name: str, spec: dict[str, Any], device_items: bool) -> None:
    """Unequal microbatches under ``items`` (host and device counts), ``mean`` with a short
    last window (pass length known, and only the last microbatch marked): the parameters
    after every window equal one float64 step on the window's batch, within 1e-12."""
    spec = one_rank(spec)
    setup = _fabric_objects(spec)
    windows = W.train(setup, spec, W.data(spec, 0), device_items=device_items)
    assert W.rel_error(windows, W.reference(spec)) <= REL


@pytest.mark.parametrize("name", TRAINING)
def test_two_ranks_equal_large_batch(
    two_ranks: tuple[Path, dict[str, list[Any]]], name: str
) -> None:
    """The same on 2 ranks: every window equals the float64 large batch of both ranks'
    microbatches (items over both ranks; mean over ranks and microbatches), and the ranks
    agree bitwise."""
    _, results = two_ranks
    reference = W.reference(CASES[name])
    windows = [ok(results[name][r])["windows"] for r in range(2)]
    assert windows[0] == windows[1]
    assert W.rel_error(windows[0], reference) <= REL


@pytest.mark.parametrize(
    ("name", "environment"),
    [("items", "TorchElasticEnvironment"), ("lightning_environment", "LightningEnvironment")],
)
def test_two_ranks_are_fabric_ddp_on_the_launch_group(
    two_ranks: tuple[Path, dict[str, list[Any]]], name: str, environment: str
) -> None:
    """In the torchrun environment Fabric picks TorchElasticEnvironment (without
    TORCHELASTIC_RUN_ID, LightningEnvironment: LOCAL_RANK set, so it starts no copies of the
    script); either way ``fabric.launch()`` creates no process, keeps the process group that
    already exists (its DDP model uses the default group, MASTER_PORT is never dialled),
    keeps the thread count (OMP_NUM_THREADS is set), the adapter's distributed side is
    FabricProcessGroup, and the run is exact."""
    _, results = two_ranks
    for rank in range(2):
        result = ok(results[name][rank])
        assert W.rel_error(result["windows"], W.reference(CASES[name])) <= REL
        assert result["strategy"] == "DDPStrategy"
        assert result["environment"] == environment
        assert (result["global_rank"], result["world_size"]) == (rank, 2)
        assert result["default_group"] is True
        assert result["threads"] == 1
        assert result["distributed"] == "FabricProcessGroup"


@pytest.mark.parametrize("name", TRAINING)
def test_one_reduction_per_window_through_no_backward_sync(
    two_ranks: tuple[Path, dict[str, list[Any]]], name: str
) -> None:
    """ACC-D1, ACC-B3: on 2 ranks DDP all-reduces in the backward of the window's last
    microbatch only (ReductionCounter on the DDP inside the _FabricModule: one reduction
    per window, none elsewhere, no manual one). Off the boundary the adapter enters
    ``fabric.no_backward_sync(model, enabled=True)``, which enters DDP's ``no_sync()``;
    at the boundary it enters neither."""
    _, results = two_ranks
    for rank in range(2):
        result = ok(results[name][rank])
        records = result["microbatches"]
        assert sum(r["boundary"] for r in records) == len(result["windows"])
        for index, record in enumerate(records):
            if record["boundary"]:
                expected = {"reductions": 1, "no_backward_sync": [], "ddp_no_sync": 0}
            else:
                expected = {"reductions": 0, "no_backward_sync": [True], "ddp_no_sync": 1}
            got = {key: record[key] for key in expected}
            assert got == expected, f"rank {rank}, microbatch {index}"


# -- fp16 and bf16 through Fabric's precision plugins --------------------------------------


def test_fp16_plugin_overflow_skips_step_and_scheduler_and_unscales_once() -> None:
    """ACC-F4, ACC-S3 with ``Fabric(plugins=[MixedPrecision("16-mixed", "cpu", scaler=...)])``:
    the forward runs in float16; the adapter uses the plugin's scaler; window 0 overflows
    (init_scale 2**40): no optimizer step, no scheduler step, the scale backs off to 2**10;
    windows 1 and 2 step. Every boundary unscales exactly once, the raw optimizer (no
    "unscale_() has already been called"), and the stepped windows follow the float64
    reference within the fp16 tolerance."""
    spec = {**one_rank(ITEMS), "normalization": "mean", "scheduler": True}
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**40, backoff_factor=2.0**-30, growth_interval=1_000_000
    )
    fabric = make_fabric(1, "fp16", scaler=scaler)
    precision = fabric.strategy.precision
    assert (precision.precision, getattr(precision, "scaler", None)) == ("16-mixed", scaler)
    module = W.make_model(spec["seed"], torch.float32)
    optimizer = W.make_optimizer(module, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, W._decay)
    model, fabric_optimizer = fabric.setup(module, optimizer)
    acc = FabricAccumulator(
        fabric, model, fabric_optimizer, steps=3, normalization="mean", scheduler=scheduler
    )
    assert acc.scaler is scaler
    dtypes: list[torch.dtype] = []
    module[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    unscaled: list[Any] = []
    unscale = scaler.unscale_

    def counting_unscale(opt: torch.optim.Optimizer) -> None:
        unscaled.append(opt)
        unscale(opt)

    scaler.unscale_ = counting_unscale  # type: ignore[method-assign]
    initial = W.params_json(module)
    windows = []
    for x, y, _ in acc.iterate([(x.float(), y.float(), n) for x, y, n in W.data(spec, 0)]):
        with acc.microbatch():
            result = acc.backward(W.loss_fn(model(x), y, "mean"))
        if result.boundary:
            windows.append(
                {
                    "outcome": result.outcome,
                    "stepped": result.stepped,
                    "scale": scaler.get_scale(),
                    "scheduler": scheduler.last_epoch,
                    "unscales": len(unscaled),
                    "params": W.params_json(module),
                }
            )
            assert all(opt is optimizer for opt in unscaled)  # the raw optimizer
            unscaled.clear()
    assert set(dtypes) == {torch.float16}
    assert [(w["outcome"], w["stepped"]) for w in windows] == [
        ("amp_overflow", False),
        ("stepped", True),
        ("stepped", True),
    ]
    assert [w["scale"] for w in windows] == [2.0**10] * 3
    assert [w["scheduler"] for w in windows] == [0, 1, 2]
    assert [w["unscales"] for w in windows] == [1, 1, 1]
    assert windows[0]["params"] == initial
    assert (acc.stats.optimizer_steps, acc.stats.skipped_steps) == (2, 1)
    reference = W.reference({**spec, "skip_windows": [0]})
    assert W.rel_error([w["params"] for w in windows], reference) <= 1e-2


def test_precision_16_mixed_on_cpu_is_bf16_without_a_scaler() -> None:
    """``Fabric(accelerator="cpu", precision="16-mixed")`` warns and runs bf16 autocast with
    no scaler (Fabric's connector): the adapter then has no scaler either. Real fp16 on the
    CPU needs the explicit plugin (previous test)."""
    with pytest.warns(UserWarning, match="not supported on CPU"):
        fabric = Fabric(accelerator="cpu", devices=1, precision="16-mixed")
    precision = fabric.strategy.precision
    assert precision.precision == "bf16-mixed"
    assert getattr(precision, "scaler", None) is None
    spec = one_rank(ITEMS)
    module = W.make_model(0, torch.float32)
    model, fabric_optimizer = fabric.setup(module, W.make_optimizer(module, spec))
    acc = FabricAccumulator(fabric, model, fabric_optimizer, steps=3)
    assert acc.scaler is None
    dtypes: list[torch.dtype] = []
    module[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    x, y, _ = W.data(spec, 0)[0]
    with acc.microbatch():
        acc.backward(W.loss_fn(model(x.float()), y.float(), "mean"))
    assert dtypes == [torch.bfloat16]


# -- misuse and refusals -------------------------------------------------------------------


def test_stray_optimizer_step_raises_usage_error() -> None:
    """ACC-S1: gradaccum steps at the boundary; ``optimizer.step()`` on Fabric's optimizer
    inside the loop raises UsageError and changes nothing: the run stays exact."""
    spec = one_rank(ITEMS)
    setup = _fabric_objects(spec)
    acc = setup.acc
    assert acc is not None
    initial = W.params_json(setup.module)

    def stray_step(index: int, boundary: bool) -> None:
        if index in (0, 2):  # inside a window, and right after its boundary
            with pytest.raises(UsageError, match=r"optimizer\.step\(\)"):
                setup.fabric_optimizer.step()
            if index == 0:
                assert W.params_json(setup.module) == initial

    windows = W.train(setup, spec, W.data(spec, 0), on_microbatch=stray_step)
    assert W.rel_error(windows, W.reference(spec)) <= REL


def _prepared() -> tuple[Fabric, Any, Any]:
    fabric = make_fabric(1)
    module = W.make_model(0)
    model, optimizer = fabric.setup(module, W.make_optimizer(module, ITEMS))
    return fabric, model, optimizer


@pytest.mark.parametrize("what", ["object", "strategy"])
def test_refuses_what_is_not_a_fabric(what: str) -> None:
    fabric, model, optimizer = _prepared()
    not_fabric = object() if what == "object" else fabric.strategy
    with pytest.raises(ConfigError, match=r"lightning\.Fabric"):
        FabricAccumulator(not_fabric, model, optimizer, steps=2)  # type: ignore[arg-type]


def test_refuses_a_model_fabric_did_not_set_up() -> None:
    fabric = make_fabric(1)
    module = W.make_model(0)
    optimizer = W.make_optimizer(module, ITEMS)
    with pytest.raises(ConfigError, match=r"fabric\.setup"):
        FabricAccumulator(fabric, module, optimizer, steps=2)


def test_refuses_an_unsupported_strategy() -> None:
    """``DataParallelStrategy`` is the one other strategy that sets up on a CPU in one
    process (``strategy="dp"`` becomes ``"ddp"`` on the CPU, FSDP is refused by Fabric on
    the CPU, DeepSpeed is not installed; ``"ddp_spawn"`` is ``DDPStrategy`` with another
    launcher, which the adapter supports)."""
    assert type(Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").strategy) is DDPStrategy
    fabric = Fabric(accelerator="cpu", devices=1, strategy=DataParallelStrategy())
    module = W.make_model(0)
    model, optimizer = fabric.setup(module, W.make_optimizer(module, ITEMS))
    with pytest.raises(ConfigError, match="DataParallelStrategy"):
        FabricAccumulator(fabric, model, optimizer, steps=2)


def test_refuses_unknown_keywords() -> None:
    fabric, model, optimizer = _prepared()
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        FabricAccumulator(fabric, model, optimizer, step=2)  # type: ignore[call-arg]
    # The scaler is the precision plugin's: FabricAccumulator takes none.
    with pytest.raises(ConfigError, match=r"unknown keyword argument.*'scaler'"):
        FabricAccumulator(
            fabric,
            model,
            optimizer,
            steps=2,
            scaler=torch.amp.GradScaler("cpu"),  # type: ignore[call-arg]
        )


def test_unknown_keyword_message_lists_only_fabric_options() -> None:
    fabric, model, optimizer = _prepared()
    with pytest.raises(ConfigError) as info:
        FabricAccumulator(
            fabric,
            model,
            optimizer,
            steps=2,
            scaler=torch.amp.GradScaler("cpu"),  # type: ignore[call-arg]
        )
    options = {o.strip() for o in str(info.value).split("the options are ", 1)[1].split(",")}
    assert not options & {"scaler", "distributed", "framework"}, sorted(options)


# -- checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fabric-1-rank-ckpt")
    with one_process():
        result = W.checkpoint_runs(lambda: make_fabric(1), one_rank(CHECKPOINT), 0, out)
    return out, result


def test_resume_mid_window_one_rank_is_bitwise(
    one_rank_checkpoints: tuple[Path, dict[str, Any]],
) -> None:
    """ACC-R2: ``acc.save(dir)`` after microbatch 5 (position 2 of window 1), then a fresh
    Fabric, model (another seed), optimizer, scheduler and accumulator and ``acc.load(dir)``:
    the rest of the run equals the uninterrupted one bitwise (parameters, stats, the
    scheduler), and the uninterrupted run is exact."""
    _, result = one_rank_checkpoints
    assert result["mid_state"]["position"] == 2
    assert result["resumed"] == {**result["straight"], "windows": result["straight"]["windows"][1:]}
    assert W.rel_error(result["straight"]["windows"], W.reference(one_rank(CHECKPOINT))) <= REL


def test_resume_mid_window_two_ranks_is_bitwise(
    two_ranks: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R2 on 2 ranks: the checkpoint holds every rank's in-flight gradients; fresh
    objects and a fresh Fabric on both ranks resume bitwise."""
    out, results = two_ranks
    ckpt = read_checkpoint(out / "checkpoint" / "mid")
    assert ckpt.world_size == 2
    assert {"gradients.rank0", "gradients.rank1"} <= set(ckpt.roles)
    for rank in range(2):
        result = ok(results["checkpoint"][rank])
        assert result["mid_state"]["position"] == 2
        straight = result["straight"]
        assert result["resumed"] == {**straight, "windows": straight["windows"][1:]}
    straight = results["checkpoint"][0]["straight"]
    assert straight == results["checkpoint"][1]["straight"]
    assert W.rel_error(straight["windows"], W.reference(CHECKPOINT)) <= REL


def _all_names(path: Path) -> set[str]:
    """Every tensor name of every role, and the optimizer's parameter names."""
    ckpt = read_checkpoint(path)
    names = {name for role in ckpt.roles for name in ckpt.tensors(role)}
    for group in ckpt.metadata.get("optimizer", {}).get("param_groups", []):
        names |= set(group["params"])
    return names


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("which", ["mid", "boundary"])
def test_checkpoint_names_are_the_bare_models(
    one_rank_checkpoints: tuple[Path, dict[str, Any]],
    two_ranks: tuple[Path, dict[str, list[Any]]],
    ranks: int,
    which: str,
) -> None:
    """CKPT names: the model, optimizer and gradient names are the bare model's own
    (``0.weight``, ...): no ``_forward_module`` (the _FabricModule) or ``module`` (DDP)."""
    folder = one_rank_checkpoints[0] if ranks == 1 else two_ranks[0] / "checkpoint"
    names = _all_names(folder / which)
    bare = {name for name, _ in W.make_model(0).named_parameters()}
    wrapped = [
        n for n in names if {"_forward_module", "_original_module", "module"} & set(n.split("."))
    ]
    assert not wrapped
    assert bare <= names
    assert read_checkpoint(folder / which).producer.name == "gradaccum-lightning"


def test_boundary_checkpoint_loads_into_plain_torch_one_rank(
    one_rank_checkpoints: tuple[Path, dict[str, Any]],
) -> None:
    """ACC-R5: the boundary checkpoint of a Fabric run loads into a plain
    ``gradaccum_torch.Accumulator`` on the bare model, which continues bitwise like the
    Fabric run."""
    out, result = one_rank_checkpoints
    spec = one_rank(CHECKPOINT)
    module = W.make_model(123)
    optimizer = W.make_optimizer(module, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, W._decay)
    acc = Accumulator(module, optimizer, steps=4, normalization="items", scheduler=scheduler)
    acc.load(out / "boundary")
    assert W.params_json(module) == result["boundary_params"]
    assert acc.machine.state_dict() == result["boundary_state"]
    windows = []
    for x, y, n in acc.iterate(W.data(spec, 0)[spec["boundary"] + 1 :]):
        with acc.microbatch(n):
            if acc.backward(W.loss_fn(module(x), y, "items")).boundary:
                windows.append(W.params_json(module))
    assert windows == result["straight"]["windows"][1:]
    assert scheduler.last_epoch == result["straight"]["scheduler_steps"]


def test_boundary_checkpoint_of_two_ranks_loads_into_plain_torch(
    two_ranks: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R5: the 2-rank boundary checkpoint loads into one plain Accumulator whose window
    takes both ranks' microbatches (steps 8 = 2 x 4): it continues like the large batch."""
    out, results = two_ranks
    result = ok(results["checkpoint"][0])
    module = W.make_model(123)
    optimizer = W.make_optimizer(module, CHECKPOINT)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, W._decay)
    acc = Accumulator(module, optimizer, steps=8, normalization="items", scheduler=scheduler)
    acc.load(out / "checkpoint" / "boundary")
    assert W.params_json(module) == result["boundary_params"]
    for rank in range(2):
        for j in range(4, 8):  # window 1 of both ranks
            x, y = W.microbatch(CHECKPOINT["seed"], rank, j, SIZES[rank][j])
            with acc.microbatch(SIZES[rank][j]):
                acc.backward(W.loss_fn(module(x), y, "items"))
    assert W.rel_error([W.params_json(module)], W.reference(CHECKPOINT)[1:2]) <= REL


def test_checkpoint_gradients_are_each_ranks_own(
    two_ranks: tuple[Path, dict[str, list[Any]]],
) -> None:
    out, _ = two_ranks
    ckpt = read_checkpoint(out / "checkpoint" / "mid")
    g0 = tensors_from_bytes(ckpt.file_bytes("gradients.rank0"))
    g1 = tensors_from_bytes(ckpt.file_bytes("gradients.rank1"))
    assert set(g0) == set(g1) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not torch.equal(g0["0.weight"], g1["0.weight"])


# -- side by side with Fabric's own accumulation idiom -------------------------------------


def _final_deviation(got: dict[str, list[float]], want: dict[str, list[float]]) -> float:
    return W.rel_error([got], [want])


@pytest.mark.parametrize("step_at_pass_end", [True, False], ids=["step_at_pass_end", "every_k"])
def test_fabric_idiom_deviates_on_a_short_last_window_the_adapter_does_not(
    step_at_pass_end: bool,
) -> None:
    """Fabric's documented loop (``no_backward_sync(model, enabled=is_accumulating)``,
    ``fabric.backward(loss / k)``, a step every k) on passes of 7 microbatches, k = 3:
    the last window of each pass has 1 microbatch. Stepping it at the pass's end, its
    gradient is 1/3 of the batch's; stepping only every k, it joins the next pass's first
    window (4 microbatches divided by 3). Either way the run leaves the float64 large-batch
    reference by more than 1e-3; the adapter stays within 1e-12."""
    spec = one_rank(MEAN_SHORT_LAST)
    reference = W.reference(spec)
    adapter = W.train(_fabric_objects(spec), spec, W.data(spec, 0))
    assert W.rel_error(adapter, reference) <= REL
    setup = _fabric_objects(spec, accumulator=False)
    idiom = W.fabric_idiom(setup, spec, W.data(spec, 0), step_at_pass_end=step_at_pass_end)
    deviation = _final_deviation(idiom[-1], reference[-1])
    assert deviation > 1e-3, f"Fabric's idiom deviates by only {deviation:.3e}"
    if step_at_pass_end:
        # The full windows before the first short one agree: the idiom is right for them.
        assert W.rel_error(idiom[:2], reference[:2]) <= REL


def test_fabric_idiom_deviates_on_two_ranks_the_adapter_does_not(
    two_ranks: tuple[Path, dict[str, list[Any]]],
) -> None:
    _, results = two_ranks
    reference = W.reference(CASES["mean_short_last"])
    idiom = [ok(results["idiom"][r])["windows"] for r in range(2)]
    assert idiom[0] == idiom[1]
    assert W.rel_error(idiom[0][:2], reference[:2]) <= REL
    assert _final_deviation(idiom[0][-1], reference[-1]) > 1e-3
    adapter = ok(results["mean_short_last"][0])["windows"]
    assert W.rel_error(adapter, reference) <= REL


# -- torch.compile under DDP ---------------------------------------------------------------


@pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 4),
    reason="torch 2.3's torch.compile starts a process pool when it first imports its "
    "backends, which this test's rank processes (daemonic multiprocessing children) may not "
    "have; torch.compile under Fabric DDP is tested from torch 2.4",
)
def test_compiled_model_under_ddp(two_ranks: tuple[Path, dict[str, list[Any]]]) -> None:
    """``fabric.setup(torch.compile(model, backend="eager"))`` on 2 ranks trains exactly like
    the bare model (it does, 4e-16, once the check unwraps the compiled module)."""
    _, results = two_ranks
    for rank in range(2):
        error = results["compiled"][rank].get("error")
        if error is not None and error["type"] == "ConfigError":
            raise ConfigError(f"rank {rank}: {error['message']}")
        windows = ok(results["compiled"][rank])["windows"]
        assert W.rel_error(windows, W.reference(CASES["compiled"])) <= REL
