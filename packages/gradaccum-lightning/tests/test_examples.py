"""examples/lightning_train.py (the Trainer with the GradAccum callback) and
examples/fabric_train.py (FabricAccumulator), each on one process and on two
(``strategy="ddp"``, gloo; Lightning and Fabric start the second process themselves): the number
of optimizer steps and ``trainer.global_step``, the learning rate of each step (one scheduler
step per update), the tokens of every window over all processes, the short last window, the
parameters against a large-batch run computed by the example itself (``--check``), equal
parameters on every process, a mid-window checkpoint (``trainer.save_checkpoint`` /
``acc.save``) that resumes bit for bit, and the two examples ending with the same parameters."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = {
    "lightning": ROOT / "examples" / "lightning_train.py",
    "fabric": ROOT / "examples" / "fabric_train.py",
}
STEP = re.compile(r"^epoch (\d+) step +(\d+) loss +(\S+) +tokens (\S+) lr (\S+)$", re.MULTILINE)
HASHES = re.compile(r"^parameters sha256, process by process: ([0-9a-f ]+)$", re.MULTILINE)
DIFF = re.compile(r"^largest difference from one large batch per window: (\S+)$", re.MULTILINE)
SAMPLES, BATCH, STEPS, EPOCHS = 232, 4, 4, 2  # the examples' defaults
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)

_outputs: dict[tuple[str, int], tuple[str, Path]] = {}


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_train", EXAMPLES[name])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, processes: int, *args: str) -> str:
    """The example's stdout; the whole process group (the processes Lightning or Fabric start
    included) is killed if it outlives the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for variable in LAUNCH_VARIABLES:
        env.pop(variable, None)
    command = [sys.executable, str(EXAMPLES[name]), "--devices", str(processes), "--check", *args]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"{name} on {processes} process(es) timed out:\n{out[-2000:]}{err[-4000:]}")
    assert process.returncode == 0, out[-2000:] + err[-4000:]
    return out


def _per_process(processes: int) -> int:
    return math.ceil(math.ceil(SAMPLES / processes) / BATCH)


def _checkpoint_at(processes: int) -> int:
    # 3 microbatches into the second epoch's first window: the resumed run must restore the
    # open window and the epoch, and continue in the same order after the same batches.
    return _per_process(processes) + 3


def _uninterrupted(name: str, processes: int, tmp_path_factory: pytest.TempPathFactory) -> str:
    if (name, processes) not in _outputs:
        folder = tmp_path_factory.mktemp(f"{name}{processes}")
        out = _run(
            name,
            processes,
            "--checkpoint-at",
            str(_checkpoint_at(processes)),
            "--output-dir",
            str(folder),
        )
        _outputs[name, processes] = (out, folder)
    return _outputs[name, processes][0]


def _check_run(name: str, processes: int, out: str) -> list[tuple[str, ...]]:
    """What both examples promise about an uninterrupted run; its step lines."""
    example = _module(name)
    per_process = _per_process(processes)
    windows = math.ceil(per_process / STEPS)
    assert per_process % STEPS, "the defaults give every epoch a short last window"
    total = EPOCHS * windows
    steps = STEP.findall(out)
    assert [int(s[1]) for s in steps] == list(range(1, total + 1)), out
    assert [int(s[0]) for s in steps] == [e for e in range(EPOCHS) for _ in range(windows)]
    # One scheduler step per optimizer step, on any number of processes.
    factor = example.warmup_then_linear(total)
    lrs = [float(s[4]) for s in steps]
    assert lrs == pytest.approx([3e-2 * factor(i) for i in range(total)], abs=1e-6)
    # Every window's tokens are counted over all processes: each epoch sees every token once.
    tokens = sum(len(s) - 1 for s in example.make_dataset(SAMPLES))
    per_epoch = [sum(int(s[3]) for s in steps if int(s[0]) == e) for e in range(EPOCHS)]
    assert per_epoch == [tokens] * EPOCHS
    # The short last window is stepped as what it is, not as a full one.
    assert int(steps[windows - 1][3]) < min(int(s[3]) for s in steps[: windows - 1])
    # The update is the large batch's (float64: rounding is ~1e-13).
    (diff,) = DIFF.findall(out)
    assert float(diff) < 1e-10, out
    # Every process holds the same parameters.
    (hashes,) = HASHES.findall(out)
    assert len(hashes.split()) == processes
    assert len(set(hashes.split())) == 1, hashes
    return steps


@pytest.mark.parametrize("processes", [1, 2])
def test_the_trainer_example_is_exact_and_resumes_bitwise(
    processes: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = _uninterrupted("lightning", processes, tmp_path_factory)
    steps = _check_run("lightning", processes, out)
    total = len(steps)
    per_process = _per_process(processes)
    # trainer.global_step counts optimizer steps, and GradAccum's estimate is exact (Lightning's
    # estimated_stepping_batches counts microbatches under GradAccum).
    assert f"done: {total} optimizer steps, trainer.global_step {total}" in out
    assert (
        f"{per_process} microbatches of {BATCH} per process per epoch, {total} optimizer steps "
        f"planned: GradAccum.estimated_optimizer_steps {total}, "
        f"Trainer.estimated_stepping_batches {EPOCHS * per_process} (microbatches)"
    ) in out
    assert f"{processes} process(es) ({'DDP' if processes > 1 else 'SingleDevice'}Strategy)" in out

    folder = _outputs["lightning", processes][1]
    checkpoint = folder / f"microbatch-{_checkpoint_at(processes)}.ckpt"
    assert f"saved {checkpoint} (microbatch 3 of a window)" in out
    assert checkpoint.is_file()
    resumed = _run("lightning", processes, "--resume", str(checkpoint))
    windows = total // EPOCHS
    assert (
        f"resumed from {checkpoint}: epoch 1, {windows} optimizer steps, 3 microbatches into "
        f"a window"
    ) in resumed
    again = STEP.findall(resumed)
    # The window open at the checkpoint closes first, then the run goes on as before.
    assert [int(s[1]) for s in again] == list(range(windows + 1, total + 1))
    assert again[0][2:4] == ("n/a", "n/a")
    assert again[0][4] == steps[windows][4]  # the learning rate its step used
    assert again[1:] == steps[windows + 1 :]
    assert HASHES.findall(resumed) == HASHES.findall(out), "the resumed run ends where it did"


@pytest.mark.parametrize("processes", [1, 2])
def test_the_fabric_example_is_exact_and_resumes_bitwise(
    processes: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = _uninterrupted("fabric", processes, tmp_path_factory)
    steps = _check_run("fabric", processes, out)
    total = len(steps)
    assert f"done: {total} optimizer steps" in out
    assert (
        f"{processes} process(es) ({'DDP' if processes > 1 else 'SingleDevice'}Strategy), "
        f"{_per_process(processes)} microbatches of {BATCH} per process per epoch"
    ) in out

    checkpoint = _outputs["fabric", processes][1] / f"microbatch-{_checkpoint_at(processes)}"
    assert f"saved {checkpoint} (microbatch 3 of a window)" in out
    assert (checkpoint / "manifest.json").is_file()
    assert sorted(p.name for p in checkpoint.glob("gradients*")) == (
        ["gradients.safetensors"]
        if processes == 1
        else [f"gradients.rank{r}.safetensors" for r in range(processes)]
    )
    resumed = _run("fabric", processes, "--resume", str(checkpoint))
    assert f"resumed from {checkpoint}: epoch 1, microbatch 3" in resumed
    again = STEP.findall(resumed)
    windows = total // EPOCHS
    assert [int(s[1]) for s in again] == list(range(windows + 1, total + 1))
    assert again[0][2] == "n/a"
    assert again[0][3:] == steps[windows][3:]  # its tokens (all of the window's) and lr
    assert again[1:] == steps[windows + 1 :]
    assert HASHES.findall(resumed) == HASHES.findall(out), "the resumed run ends where it did"


@pytest.mark.parametrize("processes", [1, 2])
def test_the_trainer_and_fabric_examples_end_with_the_same_parameters(
    processes: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Same model, data, shards and schedule: GradAccum under the Trainer and FabricAccumulator
    take the same steps, bit for bit."""
    trainer = _uninterrupted("lightning", processes, tmp_path_factory)
    fabric = _uninterrupted("fabric", processes, tmp_path_factory)
    assert STEP.findall(trainer) == STEP.findall(fabric)
    assert HASHES.findall(trainer) == HASHES.findall(fabric)
