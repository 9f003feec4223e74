"""`sdpa`: PyTorch scaled_dot_product_attention, exact; on a GPU the fastest SDPA kernel that accepts the call.

Which kernel PyTorch dispatches to depends on its priority list, the layout and the version (on Hopper, cuDNN
runs 12x32760x128 bf16 attention at 644 TFLOP/s against 367 for flash). So the first call of a request tries
cuDNN, then flash, then efficient, then math, each alone, and pins the first one that runs: the response
reports the kernel that actually ran.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Backend, BackendInfo, Kernel

INFO = BackendInfo(
    name="sdpa", description="PyTorch scaled_dot_product_attention (exact): cuDNN on Hopper, else flash / "
                             "efficient / math", lossy=False, devices=("cuda", "cpu"),
    dtypes=(torch.bfloat16, torch.float16, torch.float32),
)

GPU_ORDER = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
             ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH))


def _heads_first(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, L, N, D] -> [B, N, L, D] views (SDPA's layout; the kernels take these strides as they are)."""
    return tuple(x.transpose(1, 2) for x in xs)


class SdpaKernel(Kernel):
    """Exact attention through one pinned SDPA kernel (probed on the first call of the request)."""

    name = "sdpa"

    def __init__(self, device: torch.device, contiguous: bool = False):
        self.device = device
        self.contiguous = contiguous  # copy q/k/v to contiguous [B, N, L, D] first
        self.pinned: SDPBackend | None = None
        self.label = "sdpa[cpu]" if device.type == "cpu" else "sdpa"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = _heads_first(q, k, v)
        if self.contiguous:
            qt, kt, vt = qt.contiguous(), kt.contiguous(), vt.contiguous()
        if q.device.type != "cuda":
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        if self.pinned is None:
            return self._probe(qt, kt, vt).transpose(1, 2)
        with sdpa_kernel([self.pinned]):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    def _probe(self, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
        errors = []
        for name, backend in GPU_ORDER:
            try:
                with warnings.catch_warnings(), sdpa_kernel([backend]):
                    warnings.simplefilter("ignore")  # PyTorch warns why each refused kernel was not used
                    out = F.scaled_dot_product_attention(qt, kt, vt)
            except RuntimeError as e:  # this kernel does not take these inputs: try the next one
                errors.append(f"{name}: {str(e).splitlines()[0]}")
                continue
            self.pinned, self.label = backend, f"sdpa[{name}]"
            return out
        raise RuntimeError("no SDPA kernel accepted the inputs: " + "; ".join(errors))


def _check(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    return None


def build(choice, device: torch.device, dtype: torch.dtype, head_dim: int) -> SdpaKernel:
    return SdpaKernel(device)


BACKEND = Backend(INFO, _check, build)
