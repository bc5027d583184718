"""Checkpoints on 2 processes through Accelerate: ``accelerator.save_state`` mid-window,
then fresh processes (a fresh process group), fresh singletons and objects and
``accelerator.load_state``: the resumed trajectory equals the uninterrupted one bitwise,
because the adapter's pre-hooks carry every process's in-flight gradients and item
counts. Plain Accelerate, side by side, loses the partial window. ``acc.save`` writes the
shared format, which single-process gradaccum-torch resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import accelerate_workers as W
import pytest
import torch

from gradaccum.checkpoint import read_checkpoint
from gradaccum_accelerate.testing import launch_accelerate
from gradaccum_torch import Accumulator
from gradaccum_torch.tensor_io import tensors_from_bytes

SPEC: dict[str, Any] = {
    "sizes": [[2, 5, 1, 3, 4, 2, 6, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5]],
    "steps": 3,
    "seed": 0,
    "mid": 4,  # after microbatch 4: position 2 of window 1
    "boundary": 5,  # after microbatch 5: window 1 has just stepped
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Any]]]:
    out = tmp_path_factory.mktemp("accelerate-ckpt")
    first = launch_accelerate(W.checkpoint_program, 2, str(out), SPEC, "run", timeout=120)
    assert first.ok, f"the uninterrupted run failed: {first}"
    second = launch_accelerate(W.checkpoint_program, 2, str(out), SPEC, "resume", timeout=120)
    assert second.ok, f"the resumed run failed: {second}"
    results: dict[str, list[Any]] = {}
    for name in ("run", "resume", "plain_run", "plain_resume"):
        results[name] = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        for result in results[name]:
            assert "error" not in result, result["error"]["trace"]
    return out, results


def test_resume_mid_window_on_fresh_processes_is_bitwise(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R2, ACC-R3: ``save_state`` at position 2 of window 1 (items, host and device
    counts), load_state on 2 fresh processes into objects of another seed: every later
    window, the final parameters, the stats and the scheduler equal the uninterrupted run's
    bitwise, on both processes."""
    _, results = runs
    for rank in range(2):
        run, resume = results["run"][rank], results["resume"][rank]
        assert resume["windows"] == run["windows"][1:]
        assert resume["final"] == run["final"]
        assert resume["stats"] == run["stats"]
        assert resume["last_epoch"] == run["last_epoch"] == 3
    assert results["run"][0]["mid_state"]["position"] == 2


def test_uninterrupted_run_is_exact(runs: tuple[Path, dict[str, list[Any]]]) -> None:
    """ACC-N2, ACC-D3: the run the resume is compared with is itself the large batch."""
    _, results = runs
    reference = W.reference({**SPEC, "normalization": "items", "scheduler": True})
    assert W.worst_error(results["run"][0]["windows"], reference) <= 1e-12


def test_save_state_holds_every_process_gradients_and_items(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R2, ACC-R5, CKPT-18: the ``gradaccum/`` folder of the ``save_state`` directory is a
    shared-format checkpoint of world size 2 holding each process's own in-flight gradients
    (``gradients.rank0``, ``gradients.rank1``) and item counts (``items.rank<r>``), and no
    model or optimizer (Accelerate saves those next to it)."""
    out, _ = runs
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "gradaccum"} <= {
        p.name for p in (out / "mid").iterdir()
    }
    ckpt = read_checkpoint(out / "mid" / "gradaccum")
    assert ckpt.world_size == 2
    assert ckpt.producer.name == "gradaccum-accelerate"
    roles = set(ckpt.roles)
    assert {"gradients.rank0", "gradients.rank1", "items.rank0", "items.rank1"} <= roles
    assert not {"model", "optimizer", "scheduler"} & roles
    g0 = tensors_from_bytes(ckpt.file_bytes("gradients.rank0"))
    g1 = tensors_from_bytes(ckpt.file_bytes("gradients.rank1"))
    assert set(g0) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not torch.equal(g0["0.weight"], g1["0.weight"]), "in-flight gradients differ by rank"
    sizes = SPEC["sizes"]
    for rank in range(2):
        items = tensors_from_bytes(ckpt.file_bytes(f"items.rank{rank}"))["items"]
        assert float(items) == sizes[rank][3] + sizes[rank][4]


def test_boundary_checkpoint_resumes_in_single_process_gradaccum_torch(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """ACC-R5, CKPT-18: ``acc.save(dir)`` at a boundary on 2 processes writes the shared
    format, model and optimizer included; a plain-torch single-process Accumulator loads it
    (another world size: no gradient in flight) and continues exactly as the large batch."""
    out, results = runs
    model = W.make_model(123)
    opt = torch.optim.SGD(model.parameters(), lr=W.LR, momentum=W.MOMENTUM)
    # steps=6: one process takes both processes' 3 microbatches (the global batch).
    acc = Accumulator(model, opt, steps=6, normalization="items")
    acc.load(out / "boundary")
    assert read_checkpoint(out / "boundary").world_size == 2
    assert W.params_json(model) == results["run"][0]["boundary_params"]
    assert acc.machine.state_dict() == results["run"][0]["boundary_state"]
    # The saved scheduler state is there too: lr after 2 steps.
    assert opt.param_groups[0]["lr"] == pytest.approx(W.LR * W.GAMMA**2, rel=1e-15)
    reference = W.reference({**SPEC, "normalization": "items", "scheduler": True})[-1]
    for rank in range(2):
        for j in (6, 7, 8):
            n = SPEC["sizes"][rank][j]
            x, y = W.microbatch(SPEC["seed"], rank, j, n)
            with acc.microbatch(n):
                acc.backward(W.loss_fn(model(x), y, "items"))
    assert W.rel_error(W.params_json(model), reference) <= 1e-12


def test_side_by_side_plain_accelerate_loses_the_partial_window(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """Side by side, ACC-R2: plain Accelerate (``accumulate``) saved at the same point and
    resumed on fresh processes: ``save_state`` holds no gradients, so the resumed run's final
    parameters leave the uninterrupted run's; the adapter's resume is bitwise (above)."""
    _, results = runs
    errors = []
    for rank in range(2):
        run, resume = results["plain_run"][rank], results["plain_resume"][rank]
        # Final parameters: how many windows Accelerate closes after load_state depends on
        # its release (1.15 restores its step counter, 1.0 does not).
        errors.append(W.rel_error(resume["final"], run["final"]))
        adapter = results["resume"][rank]
        assert W.worst_error(adapter["windows"], results["run"][rank]["windows"][1:]) == 0.0
    print(f"\nplain Accelerate mid-window resume on 2 processes: rel. deviation {max(errors):.3g}")
    assert min(errors) > 1e-3
