"""Low-memory levels (a system parameter of every stage), their check against the hardware, and peak memory.

    0  everything resident on the device
    1  + VAE decode in overlapping spatial tiles (and a few video frames per decoder call past the temporal
         upsamplers: services/vae/tiling.py, TilingConfig.for_dtype)
    2  + the T5 encoder kept and run on the CPU
    3  + DiT weights in pinned host memory, streamed to the GPU one module ahead of use on a side CUDA stream

Each level includes the ones below it. A stage acts only on the part that concerns it (the VAE on level >= 1,
the text encoder on level >= 2, the denoiser on level 3), so one deployment-wide value can be given to all.
"""

from __future__ import annotations

import enum
import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


class LowMemLevel(enum.IntEnum):
    RESIDENT = 0
    VAE_TILING = 1
    TEXT_ENCODER_ON_CPU = 2
    DIT_OFFLOAD = 3


_WHAT = {
    LowMemLevel.RESIDENT: "all weights resident",
    LowMemLevel.VAE_TILING: "VAE tiled decode",
    LowMemLevel.TEXT_ENCODER_ON_CPU: "VAE tiled decode, T5 on the CPU",
    LowMemLevel.DIT_OFFLOAD: "VAE tiled decode, T5 on the CPU, DiT streamed from pinned host memory",
}


class MemoryPolicyError(ValueError):
    """A low_mem_level this deployment cannot run; the message names `low_mem_level` and the rule."""


@dataclass(frozen=True)
class MemoryPolicy:
    """The low-memory level in force for one stage process.

    `offload_without_cuda` is for tests only: it lets level 3 run its streaming mechanism with the CPU as
    both host and device (no pinned memory, no side stream), which proves the logic, not the overlap.
    """

    level: LowMemLevel = LowMemLevel.RESIDENT
    offload_without_cuda: bool = False

    def __post_init__(self) -> None:
        level = self.level
        if isinstance(level, bool) or not isinstance(level, int) or level not in tuple(LowMemLevel):
            raise MemoryPolicyError(f"low_mem_level: must be one of 0, 1, 2, 3, got {level!r}")
        object.__setattr__(self, "level", LowMemLevel(level))

    @classmethod
    def resolve(cls, level: "int | MemoryPolicy", device: torch.device | str, stage: str) -> "MemoryPolicy":
        """An int level or a policy, checked against `device` for `stage` (text_encoder, denoiser, vae)."""
        policy = level if isinstance(level, MemoryPolicy) else cls(level)
        policy.validate(device, stage)
        return policy

    def validate(self, device: torch.device | str, stage: str) -> None:
        """Refuse a level the hardware cannot run for this stage, with the rule in the message."""
        device = torch.device(device)
        if stage == "denoiser" and self.dit_offload and not self.offload_without_cuda:
            if device.type != "cuda":
                raise MemoryPolicyError(
                    f"--low-mem-level 3 (DiT streamed from pinned host memory on a side CUDA stream) needs a "
                    f"CUDA device, got device {device}; use --low-mem-level 0..2 on this machine")
            if not torch.cuda.is_available():
                raise MemoryPolicyError("--low-mem-level 3 needs CUDA, and torch.cuda.is_available() is False")

    @property
    def vae_tiling(self) -> bool:
        return self.level >= LowMemLevel.VAE_TILING

    @property
    def text_encoder_on_cpu(self) -> bool:
        return self.level >= LowMemLevel.TEXT_ENCODER_ON_CPU

    @property
    def dit_offload(self) -> bool:
        return self.level >= LowMemLevel.DIT_OFFLOAD

    def describe(self) -> str:
        """E.g. 'low_mem_level 1 (VAE tiled decode)', for logs and per-request reports."""
        return f"low_mem_level {int(self.level)} ({_WHAT[self.level]})"


@dataclass
class PeakMemory:
    """Peak device memory allocated during a `measure_peak` block; None where it cannot be measured (CPU)."""

    bytes: int | None = None

    @property
    def gib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**30

    def __str__(self) -> str:
        return "n/a" if self.bytes is None else f"{self.gib:.2f} GiB"


_active: dict[torch.device, int] = {}  # measure_peak blocks open per device
_lock = threading.Lock()


@contextmanager
def measure_peak(device: torch.device | str) -> Iterator[PeakMemory]:
    """`with measure_peak(dev) as peak: ...` then `peak.bytes` (int, or None on a non-CUDA device).

    torch.cuda.max_memory_allocated over the block, so it counts everything allocated on the device (resident
    weights included). The statistic is per device: the first open block resets it, and a block that overlaps
    another one on the same device (stages sharing a GPU) reports the peak since the earliest of them opened,
    an upper bound for its own request. No synchronisation: the allocator counts on the host side.
    """
    device = torch.device(device)
    peak = PeakMemory()
    if device.type != "cuda" or not torch.cuda.is_available():
        yield peak
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _lock:
        if not _active.get(device):
            torch.cuda.reset_peak_memory_stats(device)
        _active[device] = _active.get(device, 0) + 1
    try:
        yield peak
    finally:
        with _lock:
            peak.bytes = torch.cuda.max_memory_allocated(device)
            _active[device] -= 1


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error (torch.cuda.OutOfMemoryError is the same class)."""
    return isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def oom_detail(exc: BaseException) -> str:
    """The first line of an out-of-memory error's message (what the device said), for a one-line report."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def release_cached_memory() -> None:
    """After an out-of-memory error: collect the failed request's tensors and give the CUDA allocator's cached
    blocks back, so the next request starts from the resident weights alone."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
