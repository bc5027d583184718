"""Off the boundary, nothing (spec ACC-D6): two gloo ranks, 12 microbatches in windows of
4, the default ``lockstep``. Every collective of ``torch.distributed`` and every host read
is counted and attributed to the microbatch it happened in, to the pass start (before the
first microbatch) or to the pass end (after the last one, inside ``iterate``).

* A loader without ``len()`` (a generator), under ``mean`` and under ``items`` with host
  and with device counts: nothing at the pass start; on the 9 microbatches that are not
  boundaries no collective and no host read; at each of the 3 boundaries exactly one
  collective of the accumulator (the exchange: item counts and positions) beside DDP's
  one gradient reduction, and at most one host read.
* A list (``len()`` known): one collective at the pass start (the pass-length
  comparison, ACC-D5) and, under ``mean``, no collective of the accumulator at any
  boundary (under ``items``, the exchange of the item count).

The code before the lockstep rows moved into the boundary's exchange (a1ffce4) gathered
and read positions on the first microbatch of every window of a generator's pass: this
test fails there.
"""

from __future__ import annotations

import json
from typing import Any

import probe_workers as P
import pytest

from gradaccum_ddp.testing import launch

K, MICROBATCHES = 4, 12
BOUNDARIES = [3, 7, 11]
CONFIGS: dict[str, dict[str, Any]] = {
    "mean_generator": {"normalization": "mean", "sized": False},
    "items_generator": {"normalization": "items", "sized": False},
    "items_device_generator": {"normalization": "items", "sized": False, "device_items": True},
    "mean_list": {"normalization": "mean", "sized": True},
    "items_list": {"normalization": "items", "sized": True},
}
GENERATORS = [name for name, c in CONFIGS.items() if not c["sized"]]
LISTS = [name for name, c in CONFIGS.items() if c["sized"]]


def spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "steps": K,
        "microbatches": MICROBATCHES,
        "seed": 3,
        "device_items": False,
        **CONFIGS[name],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp-off-boundary")
    run = launch(P.off_boundary_program, 2, str(out), [spec(n) for n in CONFIGS], timeout=120)
    assert run.ok, f"rank processes failed: {run}"
    loaded: dict[str, list[dict[str, Any]]] = {}
    for name in CONFIGS:
        ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        for rank, result in enumerate(ranks):
            assert "error" not in result, f"{name} rank {rank}: {result['error']['trace']}"
        loaded[name] = ranks
    return loaded


def _where(name: str, rank: int, phase: str, counts: dict[str, Any]) -> str:
    sites = "; ".join(counts["sites"]) or "none"
    return (
        f"{name} rank {rank} {phase}: accumulator collectives {counts['acc']}, DDP "
        f"reductions {counts['ddp_reductions']}, host reads {counts['reads']} ({sites})"
    )


def _check_windows(name: str, rank: int, result: dict[str, Any]) -> list[dict[str, Any]]:
    microbatches = result["microbatches"]
    assert len(microbatches) == MICROBATCHES
    assert [j for j, m in enumerate(microbatches) if m["boundary"]] == BOUNDARIES
    assert result["optimizer_steps"] == result["windows"] == len(BOUNDARIES)
    for j, m in enumerate(microbatches):
        # DDP's own all-reduces are exactly the buckets its hook reduced: nothing is
        # mistaken for the accumulator's, nothing of DDP's is missed.
        assert m["ddp_calls"] == m["buckets"], _where(name, rank, f"microbatch {j}", m)
        if j < MICROBATCHES - 1:
            after = m["after"]
            quiet = not after["acc"] and not after["ddp_calls"] and not after["reads"]
            assert quiet, _where(name, rank, f"after microbatch {j}", after)
    return microbatches


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_collective_and_no_host_read_off_the_boundary(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """ACC-D6: non-boundary microbatches: 0 collectives (the accumulator's or DDP's), 0 host
    reads."""
    for rank, result in enumerate(results[name]):
        for j, m in enumerate(_check_windows(name, rank, result)):
            if m["boundary"]:
                continue
            quiet = not m["acc"] and m["ddp_reductions"] == 0 and m["reads"] == 0
            assert quiet, _where(name, rank, f"microbatch {j} (not a boundary)", m)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_boundary_makes_one_exchange_and_one_read_at_most(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Each boundary: DDP's one gradient reduction; one accumulator collective (the
    exchange) unless a sized pass under ``mean`` needs none; at most one host read."""
    exchange = [] if CONFIGS[name] == {"normalization": "mean", "sized": True} else ["all_gather"]
    for rank, result in enumerate(results[name]):
        microbatches = _check_windows(name, rank, result)
        for j in BOUNDARIES:
            m = microbatches[j]
            where = _where(name, rank, f"boundary microbatch {j}", m)
            assert m["ddp_reductions"] == 1, where
            assert m["acc"] == exchange, where
            assert m["reads"] <= 1, where
        # The counter does see reads in the ranks: a boundary reads its verdict.
        assert sum(microbatches[j]["reads"] for j in BOUNDARIES) >= 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_pass_start_compares_only_a_pass_of_known_length(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Before the first microbatch: one collective and at most one read for a list (the
    pass-length comparison, ACC-D5); nothing for a generator."""
    sized = CONFIGS[name]["sized"]
    for rank, result in enumerate(results[name]):
        start = result["start"]
        where = _where(name, rank, "pass start", start)
        assert start["acc"] == (["all_gather"] if sized else []), where
        assert start["reads"] <= (1 if sized else 0), where
        assert start["ddp_calls"] == 0, where


@pytest.mark.parametrize("name", LISTS)
def test_a_pass_of_known_length_ends_without_a_collective(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """ACC-D6: after the pass's last microbatch (a boundary), ``end_pass`` communicates nothing."""
    for rank, result in enumerate(results[name]):
        end = result["end"]
        assert not end["acc"] and not end["reads"], _where(name, rank, "pass end", end)


@pytest.mark.parametrize("name", GENERATORS)
def test_a_pass_of_unknown_length_ends_with_one_comparison(
    results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """ACC-D5, ACC-D6: a pass whose length the ranks never agreed on ends with exactly one
    comparison of their positions (one all-gather, at most one host read), between passes —
    even when its last window already compared them, so that a run resumed between that
    boundary and ``end_pass`` makes the same calls as the uninterrupted one."""
    for rank, result in enumerate(results[name]):
        end = result["end"]
        assert end["acc"] == ["all_gather"], _where(name, rank, "pass end", end)
        assert end["reads"] <= 1, _where(name, rank, "pass end", end)
