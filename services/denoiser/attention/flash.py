"""`flash_attn`: FlashAttention 3 (`flash_attn_interface`) or 2 (`flash_attn`) when installed, exact.

Without either package it runs the fastest exact kernel present, and the response says which one ran: on
Hopper GPUs our own exact kernel (gluon_sage.exact_attention: FlashAttention-3's schedule in Gluon, faster than
cuDNN SDPA on Wan shapes, docs/benchmarks.md), elsewhere SDPA's fastest kernel (probed as `sdpa` does). It is
the default backend on CUDA (default_backend). Both packages take our [B, L, N, D] layout as it is. With the
log-sum-exp (ring attention), the packages' calls go through PyTorch's fused exact kernels instead.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .base import Backend, BackendInfo, Kernel, package_version
from .sdpa import SdpaKernel

INFO = BackendInfo(
    name="flash_attn", description="FlashAttention 3 / 2 when installed (exact), else the fastest exact kernel "
                                   "present: ours on Hopper, SDPA's elsewhere",
    lossy=False, devices=("cuda",), dtypes=(torch.bfloat16, torch.float16), returns_lse=True,
)
PACKAGES = (("flash_attn_interface", "fa3", "flash-attn-3"), ("flash_attn", "fa2", "flash-attn"))
GLUON_KEY = "exact"  # sage.gluon_failed's key (with the head dim) for our exact kernel


def installed() -> tuple[str, str, str] | None:
    """(module, tag, distribution) of the newest FlashAttention installed, or None."""
    for module, tag, dist in PACKAGES:
        if importlib.util.find_spec(module) is not None:
            return module, tag, dist
    return None


def _fused_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..parallel import attention_with_lse

    return attention_with_lse(q.device)(q, k, v)


class FlashKernel(Kernel):
    name = "flash_attn"

    def __init__(self, module: str, tag: str, dist: str):
        self.fn = importlib.import_module(module).flash_attn_func
        version = package_version(dist)
        self.label = f"flash_attn[{tag}{' ' + version if version else ''}]"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _fused_with_lse(q, k, v)


class FallbackKernel(SdpaKernel):
    """No FlashAttention package and not our Hopper kernel: the fastest exact SDPA kernel, reported as such."""

    name = "flash_attn"

    def describe(self) -> str:
        return f"{self.label} (flash_attn: no flash-attn package installed, fastest exact kernel present)"

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _fused_with_lse(q, k, v)


class GluonFlashKernel(Kernel):
    """Our exact Hopper kernel. A build failure is logged and remembered for the process (sage.gluon_failed);
    that call and every later one run the fallback (SDPA's fastest kernel)."""

    name = "flash_attn"

    def __init__(self, device: torch.device, head_dim: int):
        from triton.errors import TritonError

        from . import gluon_sage

        self.key = (GLUON_KEY, head_dim)
        self.run, self.build_errors = gluon_sage.exact_attention, TritonError
        self.fallback = FallbackKernel(device)
        self.label = "flash_attn[gluon]"

    def _call(self, q, k, v, lse: bool):
        from .sage import gluon_failed, gluon_failure

        if not gluon_failure(self.key):
            try:
                return self.run(q, k, v, lse=lse)
            except self.build_errors as e:  # compilation, ptxas, resources: raised before the kernel launches
                gluon_failed(self.key, self.name, e, instead="SDPA")
        out = self.fallback.with_lse(q, k, v) if lse else self.fallback(q, k, v)
        self.label = self.fallback.label
        return out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._call(q, k, v, lse=False)

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._call(q, k, v, lse=True)

    def describe(self) -> str:
        from .sage import gluon_failure

        why = gluon_failure(self.key)
        if why:
            return (f"{self.fallback.label} (flash_attn: no flash-attn package installed, and our Hopper kernel "
                    f"failed to build: {why})")
        return self.label


def _check(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    if head_dim is not None and (head_dim > 256 or head_dim % 8):
        return f"supports head dims up to 256 in multiples of 8, not {head_dim}"
    return None


def build(choice, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    found = installed()
    if found:
        return FlashKernel(*found)
    if _gluon_usable(device, head_dim):
        return GluonFlashKernel(device, head_dim)
    return FallbackKernel(device)


def _redundant(device: torch.device, head_dim: int | None) -> str | None:
    if installed() or (head_dim is not None and _gluon_usable(device, head_dim)):
        return None
    return "no flash-attn package and not a Hopper GPU: it would run the sdpa kernel"


def _gluon_usable(device: torch.device, head_dim: int) -> bool:
    from .sage import gluon_usable

    return gluon_usable(device, head_dim, (GLUON_KEY, head_dim))


BACKEND = Backend(INFO, _check, build, _redundant)
