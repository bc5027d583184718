"""The test launcher's contract (`gradaccum_ddp.testing.launch`): a rank's exit
code is its program's outcome alone — 0 when it returns, a `SystemExit`'s code,
1 with the traceback on stderr for any other exception — and the rank leaves without
interpreter finalization (no `atexit` handler runs), so never aborts there. Ranks here
train a real DDP model over gloo first, which leaves torch's gloo threads alive past
``destroy_process_group``."""

from __future__ import annotations

import json
from pathlib import Path

import ddp_workers as W
import pytest

from gradaccum_ddp.testing import launch


def _params(tmp_path: Path, rank: int) -> list[list[float]]:
    data = json.loads((tmp_path / f"exit.rank{rank}.json").read_text())
    params: list[list[float]] = data["params"]
    return params


@pytest.mark.parametrize(
    ("outcomes", "codes"),
    [
        (("return", "return"), [0, 0]),
        (("return", "raise"), [0, 1]),
        (("exit4", "return"), [4, 0]),
        (("return", "exit-message"), [0, 1]),
    ],
)
def test_exit_code_is_the_programs_outcome(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], outcomes: tuple[str, str], codes: list[int]
) -> None:
    result = launch(W.exit_program, 2, str(tmp_path), outcomes, timeout=120)
    assert not result.timed_out, result
    assert result.exitcodes == codes, result
    assert result.ok is (codes == [0, 0])
    # Both ranks finished their window and wrote their results before leaving, and DDP kept
    # them in step: the same parameters on both ranks, bit for bit.
    assert _params(tmp_path, 0) == _params(tmp_path, 1)
    err = capfd.readouterr().err
    if "raise" in outcomes:
        assert "ValueError: rank 1 raises on purpose" in err
    if "exit-message" in outcomes:
        assert "rank 1 exits with a message" in err
    assert "terminate called" not in err
    # Each rank left without interpreter finalization (its atexit handler never ran), where
    # torch's surviving gloo threads could abort it.
    assert not list(tmp_path.glob("atexit.rank*"))
