"""Level 3: DiT weights kept in pinned host memory and streamed to the GPU one module ahead of use.

Every module a forward calls in turn (patch / text / time embeddings, each block, the head) is a *unit*: its
parameters are packed into one pinned host buffer, and two device *slots*, each the size of the largest unit,
are shared by all units of all experts. A forward pre-hook on a unit waits (on the compute stream, through an
event) for its own copy only, points its parameters at the slot, and starts copying the unit predicted to run
next into the other slot on a side stream, after the compute stream is done with that slot's previous unit.
The forward hook points the parameters back at host memory. So at most two units' weights are on the device,
the copy of unit i+1 overlaps the compute of unit i, and an idle Wan2.2 expert has nothing on the device.

The prediction is learned: "the unit that followed this one last time" (initially the declaration order), so
units skipped by a request (the text embedding after the first step, a block stack replayed from a cache)
cost one synchronous copy, then are predicted right.

On a CPU device the same mechanism runs with plain copies (no pinning, no streams): tests use it to prove the
logic; the overlap itself needs CUDA (the policy check in shared/memory.py refuses level 3 without it).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

_ALIGN = 256  # byte alignment of each tensor inside a packed buffer (as cudaMalloc aligns)

Layout = tuple[tuple[int, torch.dtype, tuple[int, ...]], ...]  # (byte offset, dtype, shape) per tensor


def _views(buf: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Typed views of a uint8 buffer, one per (offset, dtype, shape)."""
    out = []
    for offset, dtype, shape in layout:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(buf[offset:offset + n].view(dtype).view(shape))
    return out


@dataclass(eq=False)
class _Unit:
    """One module streamed as a whole: its tensors, their packed host copy, and the unit predicted next."""

    name: str
    module: nn.Module
    tensors: list[torch.Tensor]  # the module's parameters and buffers (their .data is re-pointed)
    layout: Layout
    host: torch.Tensor  # uint8 [nbytes], pinned when streaming to CUDA
    host_views: list[torch.Tensor]
    next: "_Unit | None" = None


@dataclass(eq=False)
class _Slot:
    """A device buffer holding one unit's weights (or receiving them)."""

    buf: torch.Tensor
    views: dict[Layout, list[torch.Tensor]] = field(default_factory=dict)
    unit: _Unit | None = None  # the unit it holds or is receiving
    busy: bool = False  # a unit bound to it is running
    ready: torch.cuda.Event | None = None  # recorded on the copy stream when the copy is done
    free: torch.cuda.Event | None = None  # recorded on the compute stream when its unit's forward is done


@dataclass
class OffloadStats:
    loads: int = 0  # host -> device copies issued
    prefetched: int = 0  # of which ahead of use
    waited: int = 0  # units not in a slot when called (copied synchronously)


def stream_units(model: nn.Module) -> list[nn.Module]:
    """The modules a forward of `model` calls in turn: its children, ModuleLists (the blocks) expanded."""
    units: list[nn.Module] = []
    for child in model.children():
        units.extend(child if isinstance(child, nn.ModuleList) else [child])
    return units


class BlockOffloader:
    """Streams the weights of one or more experts (WanDiT) through two shared device slots.

    The experts' tensors are moved into packed host buffers (pinned for CUDA) at construction: the models
    keep working as before, with their weights on the device only inside each unit's forward. Parameters
    owned directly by an expert (outside any unit) stay resident on the device.
    """

    def __init__(self, experts: Sequence[nn.Module], device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stats = OffloadStats()
        self._packed: set[int] = set()
        self.units = [u for k, expert in enumerate(experts) for u in self._pack_expert(k, expert)]
        size = max((u.host.numel() for u in self.units), default=0)
        self.slots = [self._slot(size) for _ in range(2)]
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._last: _Unit | None = None
        self._handles = [h for u in self.units for h in (
            u.module.register_forward_pre_hook(lambda m, args, u=u: self._before(u), prepend=True),
            u.module.register_forward_hook(lambda m, args, out, u=u: self._after(u), always_call=True))]
        log.info("DiT offload: %d units in host memory (%.2f GiB), 2 device slots of %.2f GiB",
                 len(self.units), sum(u.host.numel() for u in self.units) / 2**30, size / 2**30)

    @property
    def slot_bytes(self) -> int:
        """Device memory the weights can occupy at once (both slots)."""
        return sum(s.buf.numel() for s in self.slots)

    def close(self) -> None:
        """Remove the hooks (weights stay in host memory)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- construction ---------------------------------------------------------------------------------------

    def _pack_expert(self, k: int, expert: nn.Module) -> list[_Unit]:
        """Pack every unit of one expert; its own direct tensors (none in WanDiT) stay on the device."""
        for t in list(expert.parameters(recurse=False)) + list(expert.buffers(recurse=False)):
            t.data = t.data.to(self.device)
        units = [self._pack(f"expert{k}.{i}", m) for i, m in enumerate(stream_units(expert))]
        units = [u for u in units if u is not None]
        for a, b in zip(units, units[1:] + units[:1]):
            a.next = b  # initial prediction: declaration order, cyclic
        return units

    def _slot(self, size: int) -> _Slot:
        slot = _Slot(torch.empty(size, dtype=torch.uint8, device=self.device))
        for u in self.units:  # views made once, outside inference mode
            if u.layout not in slot.views:
                slot.views[u.layout] = _views(slot.buf, u.layout)
        if self.cuda:
            slot.ready, slot.free = torch.cuda.Event(), torch.cuda.Event()
        return slot

    def _pack(self, name: str, module: nn.Module) -> _Unit | None:
        tensors = []
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in self._packed:
                if any(t is x for x in tensors):
                    continue
                raise ValueError(f"offload: a tensor of {name} ({type(module).__name__}) is in two units")
            if t.numel() > 0:
                self._packed.add(id(t))
                tensors.append(t)
        if not tensors:
            return None
        layout, offset = [], 0
        for t in tensors:
            layout.append((offset, t.dtype, tuple(t.shape)))
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        layout = tuple(layout)
        host = self._host_buffer(offset)
        host_views = _views(host, layout)
        for t, v in zip(tensors, host_views):
            v.copy_(t.data)
            t.data = v  # the original storage is freed here unless referenced elsewhere
        return _Unit(name, module, tensors, layout, host, host_views)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if not self.cuda:
            return buf
        # cudaHostRegister pins exactly this buffer (torch's pinned allocator would round up to a power of 2).
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(err) == 0:
            # Unpinned when this tensor object goes (before its memory can be freed; views outliving it stay
            # valid, unpinned).
            weakref.finalize(buf, torch.cuda.cudart().cudaHostUnregister, buf.data_ptr()).atexit = False
            return buf
        log.warning("cudaHostRegister failed (%s); using torch's pinned allocator", err)
        return buf.pin_memory()

    # -- hooks ----------------------------------------------------------------------------------------------

    def _before(self, unit: _Unit) -> None:
        if self._last is not None:
            self._last.next = unit  # learn the order actually run
        slot = self._slot_of(unit)
        if slot is None:
            victim = self._victim(keep=unit.next)
            if victim is None:
                raise RuntimeError(f"offload: {unit.name} called while two other units run (nested units)")
            self.stats.waited += 1
            slot = self._load(unit, victim)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        for t, v in zip(unit.tensors, slot.views[unit.layout]):
            t.data = v
        slot.busy = True
        nxt = unit.next
        if nxt is not None and self._slot_of(nxt) is None:
            victim = self._victim(keep=unit)
            if victim is not None:
                self.stats.prefetched += 1
                self._load(nxt, victim)

    def _after(self, unit: _Unit) -> None:
        slot = self._slot_of(unit)
        if self.cuda:
            slot.free.record(torch.cuda.current_stream(self.device))
        for t, v in zip(unit.tensors, unit.host_views):
            t.data = v
        slot.busy = False
        self._last = unit

    def _slot_of(self, unit: _Unit) -> _Slot | None:
        return next((s for s in self.slots if s.unit is unit), None)

    def _victim(self, keep: _Unit | None) -> _Slot | None:
        """A slot that may be overwritten: not running, preferably not holding `keep`."""
        idle = [s for s in self.slots if not s.busy]
        return next((s for s in idle if s.unit is not keep), idle[0] if idle else None)

    def _load(self, unit: _Unit, slot: _Slot) -> _Slot:
        """Copy `unit` into `slot` once the compute stream is done with the slot's previous unit."""
        self.stats.loads += 1
        slot.unit = unit
        dst = slot.buf[:unit.host.numel()]
        if not self.cuda:
            dst.copy_(unit.host)
            return slot
        self._copy_stream.wait_event(slot.free)
        with torch.cuda.stream(self._copy_stream):
            dst.copy_(unit.host, non_blocking=True)
            slot.ready.record(self._copy_stream)
        return slot

