"""Weight streaming, Superpipeline style (arXiv 2410.08791; method notes section 6):
the weights of frozen tensors live in (pinned) host memory and only ``resident``
layer units (k) hold theirs on the device at once; the next ``prefetch`` units
(k') are copied in on a side CUDA stream while the current unit computes, in
forward order during forward and in reverse order during backward.

Why this shape. Under SlimFit 80-95% of the weight tensors are frozen in any
step: they need no gradient and no optimizer step, only their values, and
only while their block runs forward and while autograd reads them back in
backward. So a tensor is streamed exactly when ``requires_grad`` is False;
everything that may receive a gradient (the trained tensors of the step,
biases, a new head) stays resident, so the optimizer never sees a streamed
weight. The freezer changes ``requires_grad`` every step and the streamer
follows it with no extra call.

Mechanism (the one FSDP uses for sharded weights): a streamed parameter keeps
its tensor object, and its storage is resized to 0 bytes when evicted and back
when fetched, then filled from its host master copy through ``.data`` (which
does not bump autograd's version counter). Autograd's saved references to the
weight (a Linear saves ``weight``, some ops a view of it) point at the same
storage, so they see the refilled bytes. Saved-tensor hooks scoped to each unit
replace a saved weight by a small reference; unpacking it in backward fetches
the unit (if a prefetch has not already), which is the exact moment the weight
is needed, whatever op saved it. Other saved tensors (compressed by SlimFit's
compression scopes inside a block, or not) go on to the hooks outside (the
ledger, activation offload). A weight changed on the device
(trained last step, or written by ``load_state_dict``) is copied back to its
master before it is evicted: detected by its version counter, or because it
required grad since the last write-back (bitsandbytes' optimizers write
through raw pointers and bump no version), so nothing stale is ever fetched.

Limits: one process (no DDP: the strategy's hooks and broadcasts expect
resident weights); no ``torch.compile``; the model must not be moved (``.to``)
once streaming; a block may use only its own frozen weights in its forward (a
use seen from another block is refused with an error); code that reads a
streamed weight outside a forward pass must do so inside
:meth:`WeightStreamer.gathered` (``state_dict`` and ``load_state_dict`` are
handled: an evicted weight appears in the state dict as its host copy). On a
machine without CUDA the copies are host-to-host and synchronous: the
bookkeeping, residency limits and exactness are the same, the memory is not
saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch import nn

from slimfit.errors import SelectionError, SlimFitError, UnsupportedSetupError
from slimfit.hooks import ScopedHooks
from slimfit.ledger import format_bytes, storage_identity
from slimfit.selection import Pattern, _validate_pattern, is_compiled, iter_modules, matches

__all__ = ["StreamConfig", "WeightStreamer", "default_stream_units"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Options of weight streaming.

    Attributes:
        units: the modules streamed as units, in execution order (regex full
            match or list of names); default: the blocks of the model's
            longest list of same-type modules (``encoder.layer.N``, ``blocks.N``).
        resident: k, the most units whose streamed weights are on the device
            at once (>= 1; counts the unit computing and those prefetched).
        prefetch: k', how many units ahead are fetched while one computes
            (0 <= k' < k; 0 fetches on demand, with no overlap; default
            ``min(1, k - 1)``).
        pin_memory: page-locked host masters (default: when CUDA is
            available); needed for copies that overlap compute.
    """

    units: Pattern | None = None
    resident: int = 2
    prefetch: int | None = None
    pin_memory: bool | None = None

    def __post_init__(self):
        _validate_pattern(self.units, "units")
        if self.prefetch is None and isinstance(self.resident, int):
            object.__setattr__(self, "prefetch", min(1, max(self.resident - 1, 0)))
        for name in ("resident", "prefetch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SlimFitError(f"StreamConfig.{name} must be an int, got {v!r}.")
        if self.resident < 1:
            raise SlimFitError(f"StreamConfig.resident (k) must be >= 1, got {self.resident}: at "
                               "least the unit that computes must be on the device.")
        if not 0 <= self.prefetch < self.resident:
            raise SlimFitError(
                f"StreamConfig.prefetch (k') must be in [0, resident - 1] = [0, "
                f"{self.resident - 1}], got {self.prefetch}: the unit computing and the "
                "units prefetched must fit in the resident window. Raise resident or "
                "lower prefetch.")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise SlimFitError(f"StreamConfig.pin_memory must be a bool or None, got "
                               f"{self.pin_memory!r}.")


def default_stream_units(model: nn.Module) -> list[str]:
    """Names of the blocks of the longest ``nn.ModuleList``/``nn.Sequential`` whose
    children share one type and hold parameters (transformer layers).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
        >>> default_stream_units(m)
        ['1.0', '1.1', '1.2']
    """
    best: list[str] = []
    for name, mod in iter_modules(model, lambda m, _n: isinstance(m, (nn.ModuleList, nn.Sequential))):
        kids = list(mod.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        if not any(True for _ in kids[0][1].parameters()):
            continue
        if len(kids) > len(best):
            best = [f"{name}.{k}" if name else k for k, _ in kids]
    return best


class _Tensor:
    """One streamed parameter: its host master and residency."""

    __slots__ = ("param", "name", "master", "nbytes", "resident", "version", "trained", "written")

    def __init__(self, param: nn.Parameter, name: str, master: torch.Tensor):
        self.param, self.name, self.master = param, name, master
        self.nbytes = param.untyped_storage().nbytes()
        self.resident = True
        self.version = param._version  # device bytes == master bytes at this version
        # seen requiring grad since the master was written: an optimizer may have
        # changed it without bumping the version (bitsandbytes writes raw pointers)
        self.trained = False
        self.written: Any = None  # CUDA event of the last write-back into master


class _Unit:
    __slots__ = ("index", "name", "module", "tensors", "ready", "last_use")

    def __init__(self, index: int, name: str, module: nn.Module, tensors: list[_Tensor]):
        self.index, self.name, self.module, self.tensors = index, name, module, tensors
        self.ready: Any = None  # CUDA event: the unit's H2D copies are done
        self.last_use = -1


class _Ref:
    """What autograd stores for a saved streamed weight (or a view of it)."""

    __slots__ = ("unit", "tensor")

    def __init__(self, unit: int, tensor: torch.Tensor):
        self.unit, self.tensor = unit, tensor


class _Scope(ScopedHooks):
    """Saved-tensor hooks pushed while one unit's forward runs."""

    def __init__(self, streamer: "WeightStreamer", unit: int):
        self.streamer, self.unit = streamer, unit

    def pack(self, t: torch.Tensor) -> Any:
        hit = self.streamer._by_storage.get(storage_identity(t))
        if hit is not None:
            if hit[0] != self.unit and not hit[1].param.requires_grad:
                units = self.streamer.units
                raise SlimFitError(
                    f"weight streaming: {hit[1].name} (unit {units[hit[0]].name}) was used inside "
                    f"the forward of {units[self.unit].name}; a streamed block may only use its "
                    "own weights. Stream coarser units (StreamConfig(units=...)) so both are in "
                    "one, or leave these modules out of the units.")
            return _Ref(hit[0], t.detach())  # no bytes held: the storage is resized in place
        return ("o", self.pack_outer(t))

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, _Ref):
            self.streamer._use(obj.unit, direction=-1)
            return obj.tensor
        return self.unpack_outer(obj[1])


class WeightStreamer:
    """Keep at most k units of frozen weights on the device; stream the rest.

    Args:
        model: the model, already on its training device.
        config: a :class:`StreamConfig` (default: k=2, k'=1, default units).

    Raises:
        SelectionError: ``units`` matched no module, the model has no stream
            units, or units nest.
        SlimFitError: the model is ``torch.compile``-d.
        UnsupportedSetupError: (at ``install``) a process group of more than
            one process is running.

    Example:
        >>> m = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
        >>> m.requires_grad_(False)  # doctest: +ELLIPSIS
        Sequential(...)
        >>> s = WeightStreamer(m, StreamConfig(units=r"\\d", resident=2, prefetch=1)).install()
        >>> y = m(torch.randn(1, 4)); s.resident_units() <= 2
        True
        >>> s.remove()
    """

    def __init__(self, model: nn.Module, config: StreamConfig | None = None):
        if is_compiled(model):
            raise SlimFitError(
                "weight streaming fetches a block's weights back for backward through "
                "saved-tensor hooks, which torch.compile runs all at once at the end of the "
                "forward (pytorch #148222): backward would read evicted weights. Stream the "
                "uncompiled model, or drop stream_weights under torch.compile.")
        self.model = model
        self.config = config or StreamConfig()
        names = self._select_units()
        modules = dict(model.named_modules())
        owners: dict[int, int] = {}
        for name, mod in model.named_modules():  # parameters shared across modules stay resident
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        storage_users: dict[Any, int] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            sid = storage_identity(t)
            storage_users[sid] = storage_users.get(sid, 0) + 1
        self.kept: list[str] = []  # unit parameters that cannot be streamed, with why
        self._specs: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]] = []
        for name in names:
            mod, params = modules[name], []
            for pname, p in mod.named_parameters():
                full = f"{name}.{pname}"
                if owners.get(id(p), 0) > 1 or storage_users.get(storage_identity(p), 0) > 1:
                    self.kept.append(f"{full} (shared with another module)")
                elif p.storage_offset() != 0 or not p.is_contiguous():
                    self.kept.append(f"{full} (a view into a larger storage)")
                else:
                    params.append((full, p))
            self._specs.append((name, mod, params))
        self.units: list[_Unit] = []
        self._by_storage: dict[Any, tuple[int, _Tensor]] = {}
        self._handles: list[Any] = []
        self._stream: Any = None
        self._cuda = False
        self._clock = 0
        self._current: tuple[int, int] | None = None  # (unit, direction) last used
        self.resident_bytes = 0  # streamed bytes on the device now
        self.peak_resident_bytes = 0
        self.stats = {"fetches": 0, "on_demand": 0, "late": 0, "hits": 0, "write_backs": 0,
                      "bytes_in": 0, "bytes_out": 0}

    def _select_units(self) -> list[str]:
        pattern = self.config.units
        if pattern is None:
            names = default_stream_units(self.model)
            if not names:
                raise SelectionError(
                    f"{type(self.model).__name__} has no list of same-type blocks to stream; "
                    "name the units with StreamConfig(units=...) (a regex such as "
                    r"'encoder\.layer\.\d+' or a list of module names).")
        else:
            names = [n for n, _ in iter_modules(self.model) if n and matches(n, pattern)]
            if not names:
                sample = ", ".join(n for n, _ in list(iter_modules(self.model))[1:8])
                raise SelectionError(
                    f"StreamConfig.units={pattern!r} matched no module. Patterns are full-match "
                    f"regexes (a string) or exact/dotted-suffix names (a list). Some module names "
                    f"in this model: {sample}.")
        for a in names:
            for b in names:
                if b.startswith(a + "."):
                    raise SelectionError(f"stream units nest: {b!r} is inside {a!r}; name "
                                         "non-overlapping modules (one per block).")
        return names

    # -- life cycle ----------------------------------------------------------------
    def install(self) -> "WeightStreamer":
        """Copy every streamable weight to its host master, evict the frozen ones,
        and hook the units. Idempotent."""
        if self._handles:
            return self
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise UnsupportedSetupError(
                "weight streaming runs in one process; this one is rank "
                f"{torch.distributed.get_rank()} of {torch.distributed.get_world_size()}. DDP "
                "reads and broadcasts weights outside forward: stream in single-device runs, "
                "or use optimizer-state offload and compression, which work with DDP.")
        pin = self.config.pin_memory
        self.units, self._clock, self._current = [], 0, None
        self.resident_bytes = self.peak_resident_bytes = 0
        self._cuda = any(p.is_cuda for _, _, ps in self._specs for _, p in ps)
        pin = self._cuda if pin is None else pin
        if pin and not torch.cuda.is_available():
            raise SlimFitError("StreamConfig.pin_memory=True needs CUDA (page-locked memory is a "
                               "CUDA facility); leave it None on this machine.")
        self._stream = torch.cuda.Stream() if self._cuda else None
        for i, (name, mod, params) in enumerate(self._specs):
            tensors = []
            for full, p in params:
                if not p.untyped_storage().resizable():
                    # e.g. memory-mapped from a safetensors file: give the weight
                    # its own storage (one copy now) so eviction can free it
                    p.data = p.detach().clone()
                master = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                master.copy_(p.detach())  # a one-off D2H of every streamed weight
                t = _Tensor(p, full, master)
                tensors.append(t)
                self._by_storage[storage_identity(p)] = (i, t)
                self.resident_bytes += t.nbytes
            unit = _Unit(i, name, mod, tensors)
            self.units.append(unit)
            self._handles.append(mod.register_forward_pre_hook(
                lambda _m, _a, i=i: self._enter(i)))
            self._handles.append(mod.register_forward_hook(
                lambda _m, _a, _o, i=i: self._exit(i), always_call=True))
            self._handles.append(mod.register_state_dict_post_hook(
                lambda _m, sd, prefix, _meta, i=i: self._state_dict_hook(i, sd, prefix)))
            self._handles.append(mod.register_load_state_dict_pre_hook(
                lambda *_a, i=i, **_k: self._fetch(i, ready=True)))
            self._handles.append(mod.register_load_state_dict_post_hook(
                lambda _m, _keys, i=i: self._evict(i)))
        self._scopes = [_Scope(self, u.index) for u in self.units]
        self.peak_resident_bytes = self.resident_bytes
        for u in self.units:
            self._evict(u.index)
        return self

    def remove(self) -> None:
        """Bring every weight back to the device for good and remove the hooks."""
        for u in self.units:
            self._fetch(u.index, ready=True, bounded=False)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._by_storage.clear()
        self.units.clear()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """All weights on the device inside the context (e.g. to read or edit them),
        evicted again on exit (written back first if changed)."""
        for u in self.units:
            self._fetch(u.index, ready=True, bounded=False)
        try:
            yield
        finally:
            for u in self.units:
                self._evict(u.index)

    # -- hooks ----------------------------------------------------------------------
    def _enter(self, i: int) -> None:
        self._use(i, direction=+1)
        self._scopes[i].push()  # after the fetch: its copies save nothing

    def _exit(self, i: int) -> None:
        self._scopes[i].pop()

    def _use(self, i: int, direction: int) -> None:
        """Unit ``i`` is about to compute: make it resident, prefetch ahead, and
        trim the window back to k units."""
        unit = self.units[i]
        if self._current == (i, direction):
            return  # same unit again (another saved weight of it): nothing to do
        if all(t.resident for t in unit.tensors):
            self.stats["hits"] += 1
            if self._cuda and unit.ready is not None and not unit.ready.query():
                self.stats["late"] += 1  # prefetched, copy still in flight: a partial stall
        else:
            self.stats["on_demand"] += 1
        ahead = [i + direction * d for d in range(1, self.config.prefetch + 1)]
        protect = {i, *(j for j in ahead if 0 <= j < len(self.units))}
        self._fetch(i, protect, ready=True)
        for t in unit.tensors:
            if t.param.requires_grad:
                t.trained = True
        self._clock += 1
        unit.last_use = self._clock
        self._current = (i, direction)
        for j in sorted(protect - {i}, key=lambda j: abs(j - i)):
            self._fetch(j, protect)
        self._trim(self.config.resident, protect)

    # -- moving units -----------------------------------------------------------------
    @staticmethod
    def _occupies(unit: _Unit) -> bool:
        """A unit takes one of the k slots while a frozen weight of it is on the device."""
        return any(t.resident and not t.param.requires_grad for t in unit.tensors)

    def resident_units(self) -> int:
        """Units holding frozen weights on the device now (at most k after each use)."""
        return sum(self._occupies(u) for u in self.units)

    def sync(self) -> None:
        """Trim to k units now; call after the freezing decision is applied (tensors
        frozen this step may still be on the device), so the step starts within k."""
        self._trim(self.config.resident, set())

    def _trim(self, limit: int, protect: set[int]) -> None:
        """Evict least recently used unprotected units until at most ``limit`` occupy slots."""
        occupied = [u for u in self.units if self._occupies(u)]
        victims = sorted((u for u in occupied if u.index not in protect), key=lambda u: u.last_use)
        for u in victims[:max(len(occupied) - limit, 0)]:
            self._evict(u.index)

    def _fetch(self, i: int, protect: set[int] | None = None, ready: bool = False,
               bounded: bool = True) -> None:
        """Copy unit ``i``'s evicted weights in (side stream on CUDA). ``ready``:
        the current stream waits for them (the unit computes next); ``bounded``:
        evict least recently used units first to stay within k."""
        unit = self.units[i]
        missing = [t for t in unit.tensors if not t.resident]
        if missing:
            if bounded and not self._occupies(unit):
                self._trim(self.config.resident - 1, protect if protect is not None else {i})
            stream = self._stream
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                for t in missing:
                    if stream is not None and t.written is not None:
                        stream.wait_event(t.written)  # the master's last write-back landed
                    # allocated on the side stream, from its pool: the block is
                    # recorded on the compute stream when used (see below)
                    t.param.untyped_storage().resize_(t.nbytes)
                    t.param.data.copy_(t.master, non_blocking=stream is not None)  # H2D
                    t.resident = True
                    self.resident_bytes += t.nbytes
                    self.stats["bytes_in"] += t.nbytes
                if stream is not None:
                    unit.ready = unit.ready or torch.cuda.Event()  # one event per unit, re-recorded
                    unit.ready.record(stream)
            self.stats["fetches"] += 1
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        if ready and self._cuda and unit.ready is not None:
            compute = torch.cuda.current_stream()
            compute.wait_event(unit.ready)
            for t in unit.tensors:
                if t.resident:  # freeing waits for the compute stream's use of it
                    t.param.data.record_stream(compute)

    def _evict(self, i: int) -> None:
        """Free unit ``i``'s weights that need no gradient (written back first if changed)."""
        unit = self.units[i]
        for t in unit.tensors:
            p = t.param
            if p.requires_grad:
                t.trained = True
                continue  # may get a gradient and an optimizer step: stays on the device
            if not t.resident:
                continue
            if t.trained or p._version != t.version:  # trained or loaded since the last write
                t.master.copy_(p.detach(), non_blocking=self._cuda)  # D2H, compute stream
                if self._cuda:
                    t.written = t.written or torch.cuda.Event()  # one per tensor, re-recorded
                    t.written.record(torch.cuda.current_stream())
                t.version, t.trained = p._version, False
                self.stats["write_backs"] += 1
                self.stats["bytes_out"] += t.nbytes
            if self._cuda:
                p.data.record_stream(torch.cuda.current_stream())
            p.untyped_storage().resize_(0)
            t.resident = False
            self.resident_bytes -= t.nbytes
        if self._current is not None and self._current[0] == i:
            self._current = None

    # -- checkpoints ------------------------------------------------------------------------
    def _state_dict_hook(self, i: int, sd: dict, prefix: str) -> None:
        """An evicted weight's value is its master: put that in the state dict."""
        unit = self.units[i]
        for t in unit.tensors:
            if t.resident:
                continue
            if t.written is not None:
                t.written.synchronize()  # the write-back into the master has landed
            key = prefix + t.name[len(unit.name) + 1:]
            if key in sd:
                sd[key] = t.master

    # -- reporting -----------------------------------------------------------------------------
    def reset_peak(self) -> None:
        self.peak_resident_bytes = self.resident_bytes

    def streamed_bytes(self) -> int:
        return sum(t.nbytes for u in self.units for t in u.tensors)

    def host_bytes(self) -> int:
        """Bytes of the host masters (all streamable weights have one)."""
        return sum(t.master.numel() * t.master.element_size() for u in self.units for t in u.tensors)

    def overlap(self) -> float:
        """Fraction of unit uses that found their weights prefetched (no demand fetch)."""
        n = self.stats["hits"] + self.stats["on_demand"]
        return self.stats["hits"] / n if n else 1.0

    def describe(self) -> str:
        k, kp = self.config.resident, self.config.prefetch
        lines = [f"weight streaming: {len(self.units)} units ({self.units[0].name} ... "
                 f"{self.units[-1].name}), k={k} resident, k'={kp} prefetched; "
                 f"{format_bytes(self.streamed_bytes())} streamable, host masters "
                 f"{format_bytes(self.host_bytes())}"] if self.units else ["weight streaming: off"]
        if self.kept:
            lines.append(f"  kept resident ({len(self.kept)}): " + ", ".join(self.kept[:4])
                         + (" ..." if len(self.kept) > 4 else ""))
        return "\n".join(lines)
