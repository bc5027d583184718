"""The probes themselves: what they count, what they ignore, and that they
leave torch and the garbage collector as they found them."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch

from gradaccum_conformance.probes import (
    READ_METHODS,
    HostReadCounter,
    HostReads,
    MemoryProbe,
    MicrobatchProbes,
)
from gradaccum_conformance.scenarios import build_scenario


def _patched_state() -> dict[str, object]:
    return {name: vars(torch.Tensor).get(name) for name in READ_METHODS} | {
        "torch.equal": torch.equal,
        "torch.allclose": torch.allclose,
    }


def test_every_kind_of_read_counts_once() -> None:
    t = torch.arange(4.0)
    with HostReadCounter() as counter:
        t.sum().item()
        t.tolist()
        t.numpy()
        np.asarray(t)  # __array__ calls numpy(): one read, not two
        float(t[0])
        int(t[1])
        bool(t[2])
        [10, 20][t[1].long()]  # __index__
        f"{t[3]:.1f}"  # __format__ calls item(): one read
        torch.equal(t, t)
        t.allclose(t)
        x = t * 2  # no read
        del x
    assert counter.reads == 11, counter.total.sites
    assert all(
        site.endswith("(test_every_kind_of_read_counts_once)") for site in counter.total.sites
    )


def test_restored_after_an_error_and_nesting() -> None:
    before = _patched_state()
    t = torch.ones(2)
    with pytest.raises(ZeroDivisionError), HostReadCounter() as outer:
        t.sum().item()
        with HostReadCounter() as inner:
            t.tolist()
            with inner.paused():
                t.sum().item()
        with pytest.raises(RuntimeError, match="already counting"):
            outer.__enter__()
        _ = 1 / 0
    assert (outer.reads, inner.reads) == (3, 1)  # pausing one counter pauses only it
    assert _patched_state() == before
    assert "item" not in vars(torch.Tensor)  # the inherited method, not a copy of it
    t.sum().item()  # nothing counts any more
    assert outer.reads == 3


def test_take_and_allowed_reads() -> None:
    t = torch.ones(2)
    with HostReadCounter() as counter:
        t.sum().item()
        first = counter.take()
        t.tolist()
        t.sum().item()
        second = counter.take()
    assert (first.reads, second.reads) == (1, 2)
    assert (first + second).reads == 3
    assert second.minus_reads(1) == HostReads(1, None, second.sites[1:])
    assert second.minus_reads(5).reads == 0


def test_memory_probe_sees_buffers_not_views_params_or_graphs() -> None:
    model = torch.nn.Linear(6, 4, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 6, dtype=torch.float64)
    with MemoryProbe(model, optimizer) as probe:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        out = model(x).tanh().sum()  # a graph holding saved tensors
        assert probe.measure().extra_bytes > 0
        out.backward()  # type: ignore[no-untyped-call]
        del out  # the graph's saved tensors are gone; .grad is the model's
        assert probe.measure().extra_bytes == 0
        optimizer.step()  # momentum buffers: the optimizer's state
        grad_view = model.weight.grad[0]  # a view: no memory of its own
        data_view = x[1:3]  # a view of baseline data
        assert probe.measure().extra_bytes == 0
        copy = model.weight.grad.clone()  # a parameter-sized buffer
        also = copy.view(-1)[:5]  # the same storage counts once
        held = probe.measure()
        assert held.extra_bytes == 4 * 6 * 8
        assert held.tensors == ("float64[4, 6] cpu, 192 B",)
        x.resize_(50, 60)  # a baseline tensor whose storage was replaced counts
        assert probe.measure().extra_bytes == 192 + 50 * 60 * 8
        del copy, also, grad_view, data_view
    assert gc.get_freeze_count() == 0


def test_memory_probe_collects_cycles_and_thaws_when_dropped() -> None:
    probe = MemoryProbe()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    a.tensor = torch.zeros(16)  # type: ignore[attr-defined]
    del a, b  # garbage in a cycle: not held
    assert probe.measure().extra_bytes == 0
    assert gc.get_freeze_count() > 0
    del probe
    assert gc.get_freeze_count() == 0


def test_microbatch_probes_do_what_the_scenario_asks() -> None:
    scenario = build_scenario("probe_mean")
    nothing = MicrobatchProbes(scenario)
    assert not nothing.enabled and nothing.take() is None and nothing.measure(False) is None
    with MicrobatchProbes(scenario.replace(probes=("host_reads",))) as reads:
        assert reads.counter is not None and reads.memory is None
        with reads.counting():
            torch.ones(1).item()
        assert reads.take() == HostReads(1, reads.counter.syncs, reads.counter.total.sites)
    with pytest.raises(ValueError, match="unknown probes"):
        scenario.replace(probes=("flops",))
    with pytest.raises(ValueError, match="items_on_device needs normalization='items'"):
        scenario.replace(items_on_device=True)


def test_cuda_sync_warnings_count_as_syncs_and_others_pass_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA cross-check's plumbing, on the CPU: torch reports a sync as a
    UserWarning under set_sync_debug_mode("warn"); the counter counts those (every
    time, not once per place) and lets every other warning through."""
    modes: list[object] = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with warnings.catch_warnings(record=True) as seen, HostReadCounter(cuda=True) as counter:
        warnings.simplefilter("always")
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("unrelated", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["unrelated"]
    assert modes == ["warn", 0]  # turned on, then restored
    assert (counter.reads, counter.syncs) == (0, 2)
    assert counter.total.sites[0].startswith("CUDA sync at test_probes.py:")


def test_cuda_memory_no_tensor_explains_counts_from_the_first_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The allocator cross-check's arithmetic, on the CPU with a fake allocator:
    before the first boundary nothing is compared (workspaces); after it, device
    memory that grows without a live tensor to explain it counts."""
    allocated = [4096]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    with MemoryProbe(cuda=True) as probe:
        allocated[0] += 8192  # a workspace during the first window
        assert probe.measure().extra_bytes == 0
        probe.boundary()
        assert probe.measure().extra_bytes == 0
        allocated[0] += 1024  # held by C++, no Python tensor
        held = probe.measure()
        assert held.extra_bytes == 1024
        assert held.tensors == ("1024 B of CUDA memory that no live tensor explains",)


def test_reads_still_count_when_cuda_refuses_the_sync_debug_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(mode: object) -> None:
        raise RuntimeError("no CUDA here")

    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", refuse)
    before = warnings.showwarning
    with HostReadCounter(cuda=True) as counter:
        torch.ones(1).item()
    assert (counter.reads, counter.syncs, counter.watches_cuda) == (1, None, False)
    assert warnings.showwarning is before
