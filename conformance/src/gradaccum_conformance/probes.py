"""Probes for the promises a trajectory cannot show.

The parameters after every window say whether an adapter is *exact*; they
cannot say whether it read a value back to the host on a microbatch that is
not a boundary (ACC-B3), read more than once at a boundary (ACC-B4), or kept
a parameter-sized buffer between microbatches (ACC-P4). These probes measure
both, in the process (or rank) that runs the adapter:

* `HostReadCounter` counts device-to-host reads made by *any* code
  inside it: it wraps ``torch.Tensor.item``, ``tolist``, ``numpy``,
  ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``__complex__``,
  ``equal``, ``allclose``, ``is_nonzero`` and ``torch.equal``,
  ``torch.allclose``, ``torch.is_nonzero`` (a read that calls another —
  ``__format__`` calls ``item`` — counts once). On the CPU there is no device
  to wait for, so every such call counts: it is the call that would wait for
  a GPU. On CUDA it also turns on ``torch.cuda.set_sync_debug_mode("warn")``
  and counts the synchronisations torch reports (``syncs``), which also sees
  copies such as ``tensor.cpu()`` and syncs made without a read.
* `MemoryProbe` measures the tensor memory held beyond a baseline:
  it walks ``gc.get_objects()`` for live tensors, dedupes them by storage
  (views and tensors sharing storage count once), leaves out every storage
  that existed at the baseline and every storage reachable from the objects
  it was told to ignore (the model — parameters, their ``.grad`` and
  buffers — the optimizer and its state, the scaler, the recorder's
  snapshots), and sums ``untyped_storage().nbytes()`` of the rest. Tensors
  an autograd graph saved are freed by the backward, so after a microbatch
  what remains is what someone keeps. Memory held only by C++ (no Python
  tensor) is invisible to the walk; on CUDA the probe therefore also
  compares ``torch.cuda.memory_allocated`` with what the live tensors
  explain, from the first boundary on (before it, libraries allocate their
  workspaces), and counts what nothing explains.
* `MicrobatchProbes` is what a harness uses: both probes, as the
  scenario's ``probes`` field asks, recorded per microbatch with
  `microbatch`.

A harness (see the README)::

    views = list(scenario.iter_microbatches())  # the data exists before the baseline
    model, optimizer, scaler, adapter = ...
    recorder = TrajectoryRecorder(model)
    with MicrobatchProbes(scenario, model, optimizer, scaler, recorder) as probes:
        for view in views:
            with probes.counting():         # the adapter's work: reads count
                run_the_microbatch(view)    # (and end_pass after the last of a pass)
            closed = ...                    # did a window close?
            ...                             # recorder.window(...) after a closed window
            probes.record(recorder, boundary=closed)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gradaccum_conformance.harness import TrajectoryRecorder
from gradaccum_conformance.scenario import Scenario

__all__ = [
    "READ_FUNCTIONS",
    "READ_METHODS",
    "HeldMemory",
    "HostReadCounter",
    "HostReads",
    "MemoryProbe",
    "MicrobatchProbes",
]

READ_METHODS: tuple[str, ...] = (
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "equal",
    "allclose",
    "is_nonzero",
)
"""``torch.Tensor`` methods that hand a tensor's values to the host."""

READ_FUNCTIONS: tuple[str, ...] = ("equal", "allclose", "is_nonzero")
"""``torch`` functions that return a host value computed from tensors."""

_SYNC_TEXT = "called a synchronizing CUDA operation"
_HERE = os.path.abspath(__file__)
_WARNINGS = os.path.abspath(warnings.__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


# -- host reads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HostReads:
    """Reads counted over some stretch of code (see `HostReadCounter.take`).

    Attributes:
        reads: calls of the read methods and functions (outermost calls only).
        syncs: CUDA synchronisations torch reported (``set_sync_debug_mode``),
            ``None`` when not watched (no CUDA).
        sites: ``"Tensor.item at file.py:123"`` for each read and sync, in order.
    """

    reads: int = 0
    syncs: int | None = None
    sites: tuple[str, ...] = ()

    def __add__(self, other: HostReads) -> HostReads:
        syncs = None
        if self.syncs is not None or other.syncs is not None:
            syncs = (self.syncs or 0) + (other.syncs or 0)
        return HostReads(self.reads + other.reads, syncs, self.sites + other.sites)

    def minus_reads(self, n: int) -> HostReads:
        """The same with the first ``n`` reads (and their sites) left out:
        reads a promise allows, such as the one comparison before a pass of
        known length (ACC-D6)."""
        n = min(n, self.reads)
        if n <= 0:
            return self
        sites = list(self.sites)
        for _ in range(n):
            at = next((i for i, s in enumerate(sites) if not s.startswith("CUDA sync")), None)
            if at is not None:
                del sites[at]
        return HostReads(self.reads - n, self.syncs, tuple(sites))


class _Patches:
    """The wrappers installed while at least one counter is active (process-wide)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.active: list[HostReadCounter] = []
        self.saved: list[tuple[Any, str, bool, Any, Any]] = []
        self.local = threading.local()
        self.warning_context: warnings.catch_warnings[None] | None = None
        self.sync_mode: int | None = None

    def hit(self, what: str, sync: bool = False) -> None:
        site = f"{what} at {_caller()}"
        for counter in tuple(self.active):
            counter._hit(site, sync)

    def wrap(self, original: Callable[..., Any], what: str) -> Callable[..., Any]:
        local = self.local

        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(local, "depth", 0)
            if depth == 0:
                self.hit(what)
            local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                local.depth = depth

        counted.__name__ = getattr(original, "__name__", what)
        counted.__qualname__ = getattr(original, "__qualname__", what)
        counted.__doc__ = getattr(original, "__doc__", None)
        counted.__wrapped__ = original  # type: ignore[attr-defined]
        return counted

    def install(self, watch_cuda: bool) -> None:
        """Wrap the read methods; with ``watch_cuda`` also count CUDA syncs
        (best effort: if torch refuses, reads are still counted)."""
        targets: list[tuple[Any, str, str]] = [
            (torch.Tensor, name, f"Tensor.{name}") for name in READ_METHODS
        ]
        targets += [(torch, name, f"torch.{name}") for name in READ_FUNCTIONS]
        try:
            for owner, name, what in targets:
                original = getattr(owner, name, None)
                if original is None:
                    continue
                own = name in vars(owner)
                wrapper = self.wrap(original, what)
                setattr(owner, name, wrapper)
                self.saved.append((owner, name, own, original, wrapper))
        except BaseException:
            self.uninstall()
            raise
        if watch_cuda:
            try:
                self._watch_cuda()
            except Exception:
                self._unwatch_cuda()

    def _watch_cuda(self) -> None:
        context = warnings.catch_warnings()
        context.__enter__()
        self.warning_context = context
        warnings.filterwarnings("always", message=f".*{_SYNC_TEXT}", category=UserWarning)
        previous = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: Any = None,
            line: str | None = None,
        ) -> None:
            if _SYNC_TEXT in str(message):
                self.hit("CUDA sync", sync=True)
                return
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        self.sync_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")

    @property
    def watching_cuda(self) -> bool:
        return self.sync_mode is not None

    def _unwatch_cuda(self) -> None:
        if self.sync_mode is not None:
            with contextlib.suppress(Exception):
                torch.cuda.set_sync_debug_mode(self.sync_mode)
            self.sync_mode = None
        if self.warning_context is not None:
            context, self.warning_context = self.warning_context, None
            context.__exit__(None, None, None)

    def uninstall(self) -> None:
        self._unwatch_cuda()
        for owner, name, own, original, wrapper in reversed(self.saved):
            # Only undo our own wrapper: whoever wrapped it since keeps theirs
            # (ours then just calls through, counting for no one).
            if vars(owner).get(name) is wrapper:
                if own:
                    setattr(owner, name, original)
                else:
                    delattr(owner, name)
        self.saved.clear()


_PATCHES = _Patches()


def _caller() -> str:
    """The first frame outside torch and this module: who made the read."""
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path not in (_HERE, _WARNINGS) and not path.startswith(_TORCH_DIR):
            return f"{os.path.basename(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "torch internals"


class HostReadCounter:
    """Counts the device-to-host reads of the code run inside ``with counter:``.

    Counters nest: each active counter counts every read (an outer one sees
    what an inner one sees). The same counter cannot be entered twice at
    once (``RuntimeError``); entered again after it exited, it goes on
    counting. The wrapped methods are restored when the last counter exits,
    also when the block raises.

    Args:
        cuda: also count the CUDA synchronisations torch reports
            (``torch.cuda.set_sync_debug_mode("warn")``). ``None`` (default):
            when CUDA is initialised.

    Attributes:
        reads: reads counted so far.
        syncs: CUDA synchronisations counted so far (``None`` when not watched).
    """

    def __init__(self, *, cuda: bool | None = None) -> None:
        self._cuda = cuda
        self.reads = 0
        self.syncs: int | None = None
        self._sites: list[str] = []
        self._taken = HostReads()
        self._paused = 0
        self._inside = False

    @property
    def watches_cuda(self) -> bool:
        """Whether CUDA synchronisations are counted."""
        return self.syncs is not None

    def __enter__(self) -> HostReadCounter:
        patches = _PATCHES
        with patches.lock:
            if self._inside:
                raise RuntimeError(
                    "this HostReadCounter is already counting; nest another counter instead"
                )
            cuda = self._cuda
            if cuda is None:
                cuda = _cuda_in_use()
            if not patches.active:
                patches.install(watch_cuda=bool(cuda))
            if cuda and patches.watching_cuda:
                self.syncs = self.syncs or 0
            else:  # not asked, or torch refused, or an outer counter does not watch
                self.syncs = None
            patches.active.append(self)
            self._inside = True
        return self

    def __exit__(self, *exc: object) -> None:
        patches = _PATCHES
        with patches.lock:
            if self in patches.active:
                patches.active.remove(self)
            self._inside = False
            if not patches.active:
                patches.uninstall()

    def _hit(self, site: str, sync: bool) -> None:
        if self._paused:
            return
        if sync:
            if self.syncs is None:
                return
            self.syncs += 1
        else:
            self.reads += 1
        self._sites.append(site)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Reads inside this block are not counted (the harness's own work)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def total(self) -> HostReads:
        """Everything counted so far."""
        return HostReads(self.reads, self.syncs, tuple(self._sites))

    def take(self) -> HostReads:
        """What was counted since the previous ``take`` (or since the start)."""
        now, before = self.total, self._taken
        self._taken = now
        syncs = None if now.syncs is None else now.syncs - (before.syncs or 0)
        return HostReads(now.reads - before.reads, syncs, now.sites[len(before.sites) :])


# -- memory ------------------------------------------------------------------------------------

_Key = tuple[str, int]

_LEAVES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
    torch.dtype,
    torch.device,
    torch.Size,
)


@dataclass(frozen=True)
class HeldMemory:
    """Memory held beyond the baseline (see `MemoryProbe.measure`).

    Attributes:
        extra_bytes: bytes of the extra storages (plus, on CUDA, device
            memory no live tensor explains).
        tensors: one description per extra storage, largest first:
            ``"float64[8, 12] cpu, 768 B"``.
    """

    extra_bytes: int
    tensors: tuple[str, ...] = ()


def _storage(tensor: torch.Tensor) -> tuple[_Key, int, Any] | None:
    """``(key, nbytes, storage)`` of a tensor that owns memory, else ``None``."""
    try:
        if tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        size = storage.nbytes()
    except Exception:  # sparse, nested, functional or fake tensors: no plain storage
        return None
    if ptr == 0 or size == 0:
        return None
    return (str(storage.device), ptr), size, storage


def _cuda_in_use() -> bool:
    """CUDA is available and initialised (something ran on it)."""
    return torch.cuda.is_available() and bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def _live_tensors() -> list[torch.Tensor]:
    # type(), not isinstance(): isinstance reads __class__, which some lazy module
    # attributes answer with a deprecation warning.
    tensor = torch.Tensor
    return [obj for obj in gc.get_objects() if issubclass(type(obj), tensor)]


def _reachable_tensors(owners: Iterable[object]) -> list[torch.Tensor]:
    """Every tensor reachable from ``owners`` through containers and object
    attributes (and each leaf tensor's ``.grad``)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack: list[object] = list(owners)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            if obj.is_leaf and obj.requires_grad and obj.grad is not None:
                found.append(obj.grad)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
            continue
        if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            with contextlib.suppress(TypeError):
                stack.extend(vars(obj).values())
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if isinstance(name, str):
                    with contextlib.suppress(AttributeError):
                        stack.append(getattr(obj, name))
    return found


def _describe(tensor: torch.Tensor, size: int) -> str:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"{dtype}{list(tensor.shape)} {tensor.device}, {size} B"


def _rounded(size: int) -> int:
    """What the CUDA caching allocator reserves for ``size`` bytes (512-byte blocks)."""
    return 0 if size <= 0 else -(-size // 512) * 512


class _Frozen:
    """Whether a probe froze the garbage collector (shared with its finalizer)."""

    def __init__(self) -> None:
        self.frozen = False

    def thaw(self) -> None:
        if self.frozen:
            self.frozen = False
            gc.unfreeze()


class MemoryProbe:
    """Tensor memory held beyond a baseline, by the objects nobody told it to ignore.

    Create it (or call `baseline`) before the first microbatch, once
    the model, the optimizer and the adapter exist; call `measure`
    after a microbatch; `close` it (or use it as a context manager)
    when done. Storages live at the baseline are kept alive until then, so a
    new buffer can never take the address of one and hide behind it.

    To stay fast in a process with hundreds of thousands of objects, the
    probe freezes the garbage collector at the baseline (``gc.freeze()``,
    unless someone else froze it): measurements then walk only the objects
    created since, and the baseline's tensors through weak references (one
    whose storage changed counts). `close` unfreezes it; so does the
    probe's finalizer if it is dropped unclosed. Use one probe at a time in a
    process (nested ones must close first: a probe does not see the objects
    another one froze).

    Args:
        owners: objects whose tensors are not the adapter's memory: the
            model (its parameters, their ``.grad`` and its buffers), the
            optimizer (its state), the scaler, the recorder (its parameter
            snapshots), the data. Walked again at every measurement.
        cuda: cross-check with ``torch.cuda.memory_allocated`` (``None``:
            when CUDA is initialised).
        freeze: allow ``gc.freeze()`` (see above).
    """

    def __init__(self, *owners: object, cuda: bool | None = None, freeze: bool = True) -> None:
        self._owners: tuple[object, ...] = owners
        if cuda is None:
            cuda = _cuda_in_use()
        self._cuda = bool(cuda)
        self._freeze = freeze
        self._frozen = _Frozen()
        self._finalizer = weakref.finalize(self, self._frozen.thaw)
        self._kept: dict[_Key, Any] = {}
        self._baseline_tensors: list[weakref.ref[torch.Tensor]] = []
        self._unexplained_ref: int | None = None
        self.baseline()

    def __enter__(self) -> MemoryProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unfreeze the garbage collector and let the baseline's storages go."""
        self._frozen.thaw()
        self._kept = {}
        self._baseline_tensors = []

    def track(self, *owners: object) -> None:
        """Replace the objects to ignore (new ones after a checkpoint resume)."""
        self._owners = owners

    def baseline(self) -> None:
        """Forget what was extra: everything live now is the baseline (garbage
        included: no collection needed, it is ignored like the rest)."""
        self._frozen.thaw()
        self._kept = {}
        self._baseline_tensors = []
        for tensor in _live_tensors():
            found = _storage(tensor)
            if found is not None:
                self._kept.setdefault(found[0], found[2])
            with contextlib.suppress(TypeError):
                self._baseline_tensors.append(weakref.ref(tensor))
        self._unexplained_ref = None
        if self._freeze and gc.get_freeze_count() == 0:
            gc.freeze()
            self._frozen.frozen = True

    def _tensors(self) -> list[torch.Tensor]:
        """Every live tensor: the new ones, and the baseline's still alive."""
        tensors = _live_tensors()
        if self._frozen.frozen:
            tensors += [t for t in (ref() for ref in self._baseline_tensors) if t is not None]
        return tensors

    def _extra(self) -> tuple[int, list[tuple[int, str]], dict[_Key, int]]:
        ignored: set[_Key] = set()
        for tensor in _reachable_tensors(self._owners):
            found = _storage(tensor)
            if found is not None:
                ignored.add(found[0])
        extra: dict[_Key, tuple[int, str]] = {}
        cuda_sizes: dict[_Key, int] = {}
        for tensor in self._tensors():
            found = _storage(tensor)
            if found is None:
                continue
            key, size, _ = found
            if key[0].startswith("cuda"):
                cuda_sizes[key] = size
            if key in self._kept or key in ignored or key in extra:
                continue
            extra[key] = (size, _describe(tensor, size))
        items = sorted(extra.values(), key=lambda e: -e[0])
        return sum(size for size, _ in items), items, cuda_sizes

    def _unexplained(self, cuda_sizes: dict[_Key, int]) -> int:
        """CUDA bytes allocated that no live tensor (or kept baseline storage) explains."""
        for key, storage in self._kept.items():
            if key[0].startswith("cuda"):
                cuda_sizes.setdefault(key, int(storage.nbytes()))
        allocated = sum(
            torch.cuda.memory_allocated(device) for device in range(torch.cuda.device_count())
        )
        return allocated - sum(_rounded(size) for size in cuda_sizes.values())

    def measure(self) -> HeldMemory:
        """The memory held now beyond the baseline and the ignored objects.

        Garbage (reference cycles) is collected before a non-zero answer, so
        the answer does not depend on when Python last collected.
        """
        total, items, cuda_sizes = self._extra()
        if total > 0:
            gc.collect()
            total, items, cuda_sizes = self._extra()
        described = [text for _, text in items]
        if self._cuda and self._unexplained_ref is not None:
            unseen = self._unexplained(cuda_sizes) - self._unexplained_ref
            if unseen > 0:
                total += unseen
                described.append(f"{unseen} B of CUDA memory that no live tensor explains")
        return HeldMemory(total, tuple(described))

    def boundary(self) -> None:
        """After a boundary: on CUDA, what the allocator holds that no tensor
        explains becomes the reference for the next window (libraries
        allocate workspaces during the first window). No-op elsewhere."""
        if self._cuda:
            gc.collect()
            _, _, cuda_sizes = self._extra()
            self._unexplained_ref = self._unexplained(cuda_sizes)


# -- for harnesses -----------------------------------------------------------------------------


class MicrobatchProbes:
    """The probes a scenario asks for (``scenario.probes``), for a harness.

    Build it once the model, the optimizer and the adapter exist and the
    scenario's views were made (``list(scenario.iter_microbatches(rank))``),
    before the first microbatch: that is the memory baseline; use it as a
    context manager (or `close` it) around the run. Then, per
    microbatch, run the adapter's work inside `counting` and call
    `record` (or `take` and `measure` and record yourself,
    when reads must be attributed by hand — an adapter that ends the pass
    inside its own iterator). With nothing asked, every method is a cheap
    no-op and `record` records nothing.

    Args:
        scenario: the scenario being run.
        owners: what the memory probe ignores — the model, the optimizer,
            the scaler, the recorder (its snapshots), anything of the
            harness's own (not the adapter!).
    """

    def __init__(self, scenario: Scenario, *owners: object) -> None:
        self.counter = HostReadCounter() if "host_reads" in scenario.probes else None
        self.memory = MemoryProbe(*owners) if "memory" in scenario.probes else None

    def __enter__(self) -> MicrobatchProbes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the memory probe (see `MemoryProbe.close`)."""
        if self.memory is not None:
            self.memory.close()

    @property
    def enabled(self) -> bool:
        """Something is measured."""
        return self.counter is not None or self.memory is not None

    def track(self, *owners: object) -> None:
        """New objects to ignore (after a checkpoint resume)."""
        if self.memory is not None:
            self.memory.track(*owners)

    def counting(self) -> contextlib.AbstractContextManager[Any]:
        """Count the host reads of the code inside (the adapter's work)."""
        return self.counter if self.counter is not None else contextlib.nullcontext()

    def paused(self) -> contextlib.AbstractContextManager[Any]:
        """Inside `counting`: do not count this (the harness's own work)."""
        return self.counter.paused() if self.counter is not None else contextlib.nullcontext()

    def take(self) -> HostReads | None:
        """The reads counted since the previous ``take``; ``None`` when not measured."""
        return None if self.counter is None else self.counter.take()

    def measure(self, boundary: bool) -> HeldMemory | None:
        """Off the boundary, the memory held now (``None`` when not measured);
        at a boundary, ``None`` (and the CUDA reference moves on)."""
        if self.memory is None:
            return None
        if boundary:
            self.memory.boundary()
            return None
        return self.memory.measure()

    def record(
        self,
        recorder: TrajectoryRecorder,
        boundary: bool,
        reads: HostReads | None = None,
        memory: HeldMemory | None = None,
    ) -> None:
        """``recorder.microbatch(...)`` for one microbatch: the reads since the
        last `take` (or ``reads``) and, off the boundary, the memory
        (measured now unless ``memory`` is given).

        Off the boundary every CUDA synchronisation counts as a read (ACC-B3
        forbids any host sync there); at a boundary only reads count (ACC-B4
        bounds device-to-host reads; a host-to-device copy syncs too).
        """
        if not self.enabled:
            return
        if reads is None:
            reads = self.take()
        if memory is None:
            memory = self.measure(boundary)
        host_reads: int | None = None
        notes: list[str] = []
        if reads is not None:
            host_reads = reads.reads if boundary else max(reads.reads, reads.syncs or 0)
            notes += [f"read: {site}" for site in reads.sites]
        if memory is not None:
            notes += [f"held: {text}" for text in memory.tensors]
        recorder.microbatch(
            boundary,
            host_reads=host_reads,
            extra_bytes=None if memory is None else memory.extra_bytes,
            notes=notes,
        )
