"""`flash_attn`: FlashAttention 3 (`flash_attn_interface`) or 2 (`flash_attn`) when installed, exact.

Without either package it runs the fastest exact kernel present (SDPA's, probed as `sdpa` does) and the
response says so. Both packages take our [B, L, N, D] layout as it is.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .base import Backend, BackendInfo, Kernel, package_version
from .sdpa import SdpaKernel

INFO = BackendInfo(
    name="flash_attn", description="FlashAttention 3 / 2 when installed (exact), else the fastest exact SDPA kernel",
    lossy=False, devices=("cuda",), dtypes=(torch.bfloat16, torch.float16),
)
PACKAGES = (("flash_attn_interface", "fa3", "flash-attn-3"), ("flash_attn", "fa2", "flash-attn"))


def installed() -> tuple[str, str, str] | None:
    """(module, tag, distribution) of the newest FlashAttention installed, or None."""
    for module, tag, dist in PACKAGES:
        if importlib.util.find_spec(module) is not None:
            return module, tag, dist
    return None


class FlashKernel(Kernel):
    name = "flash_attn"

    def __init__(self, module: str, tag: str, dist: str):
        self.fn = importlib.import_module(module).flash_attn_func
        version = package_version(dist)
        self.label = f"flash_attn[{tag}{' ' + version if version else ''}]"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE


class FallbackKernel(SdpaKernel):
    """No FlashAttention package: the fastest exact SDPA kernel, reported as such."""

    def describe(self) -> str:
        return f"{self.label} (flash_attn requested: no flash-attn package installed, fastest exact kernel present)"


def _check(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    if head_dim is not None and (head_dim > 256 or head_dim % 8):
        return f"supports head dims up to 256 in multiples of 8, not {head_dim}"
    return None


def build(choice, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    found = installed()
    return FlashKernel(*found) if found else FallbackKernel(device)


def _redundant() -> str | None:
    return None if installed() else "no flash-attn package: it would run the sdpa kernel"


BACKEND = Backend(INFO, _check, build, _redundant)
