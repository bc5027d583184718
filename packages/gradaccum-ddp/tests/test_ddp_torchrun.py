"""The example under torchrun: two processes on one machine, and two simulated nodes
(two `torchrun --nnodes=2` agents meeting through a c10d rendezvous on loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from gradaccum_ddp.testing import free_port

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "ddp_train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEP = re.compile(
    r"^epoch (\d+) step +(\d+) stepped .* items (\d+) \(all ranks\) reductions (\d+)$"
)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _check_output(stdout: str, *, epochs: int) -> None:
    steps = [STEP.match(line) for line in stdout.splitlines()]
    found = [m for m in steps if m]
    # 600 samples, 2 ranks, microbatches of 4, 8 per window: 9 full windows and one of 3.
    assert len(found) == 10 * epochs, stdout
    assert [int(m.group(4)) for m in found] == [1] * len(found), "one reduction per window"
    assert [int(m.group(3)) for m in found[:10]] == [64] * 9 + [24]
    assert f"done: {10 * epochs} steps, {600 * epochs} items" in stdout


def test_example_runs_under_torchrun_on_two_processes() -> None:
    done = subprocess.run(
        [*TORCHRUN, "--nproc-per-node=2", "--max-restarts=0", str(EXAMPLE), "--epochs", "1"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    _check_output(done.stdout, epochs=1)


def test_two_nodes_simulated_with_two_torchrun_agents_on_loopback(tmp_path: Path) -> None:
    port = free_port()
    agents = []
    for node in range(2):
        command = [
            *TORCHRUN,
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=gradaccum-ddp-test",
            "--max-restarts=0",
            str(EXAMPLE),
            "--epochs",
            "1",
        ]
        log = (tmp_path / f"node{node}.log").open("w")
        agents.append(
            (
                subprocess.Popen(
                    command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
    try:
        codes = [agent.wait(timeout=150) for agent, _ in agents]
    finally:
        for agent, log in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            log.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert codes == [0, 0], logs
    # Exactly one agent hosts global rank 0, which prints.
    printing = [log for log in logs if "done:" in log]
    assert len(printing) == 1, logs
    _check_output(printing[0], epochs=1)
