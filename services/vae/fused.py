"""RMSNorm + SiLU written straight into a causal conv's padded input: one Triton kernel for the VAE on CUDA.

Each residual block (decoder and encoder) and the decoder head run RMSNorm over channels, SiLU, then a 3x3x3
causal conv whose input is padded in time (the previous chunk's frames, or zeros) and in space (zeros).
Unfused, that is ~8 passes over the activation (norm reduction, divide, two scalings, SiLU, zero fill, copy into
the padded buffer); here one kernel reads x twice (sum of squares, then normalise, scale, SiLU) and writes the
padded buffer's interior once; only its borders and time-padding frames are set apart. Same arithmetic in
float32 (one rounding to the output dtype). Inference only (no autograd through the kernel). A GPU Triton cannot
build for, or a failed build, leaves the unfused ops running (logged once). Measured: docs/benchmarks.md
(bench/vae_decode.py). Written for this project.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import CausalConv3d, FeatureCache, RMSNorm

log = logging.getLogger(__name__)

ENABLED = True  # set False to run the unfused ops (bench/vae_decode.py times both)
MIN_CAPABILITY = (8, 0)  # the GPUs our Triton kernels are built and tested for
_failed: str | None = None  # why the kernel failed to build in this process (then the unfused ops run)


def applies(x: torch.Tensor) -> bool:
    """The fused kernel runs for x: ENABLED, inference (no grad), a CUDA tensor on a GPU it builds for."""
    return ENABLED and _failed is None and x.is_cuda and not torch.is_grad_enabled() and _kernel_ok(x.device)


def _kernel_ok(device: torch.device) -> bool:
    return (importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY)


def norm_silu_conv(norm: "RMSNorm", conv: "CausalConv3d", x: torch.Tensor,
                   cache: "FeatureCache | None") -> torch.Tensor:
    """conv(silu(norm(x))) with the causal cache handled as CausalConv3d.forward does; x [B, C, T, H, W]."""
    global _failed
    if _failed is not None:  # an earlier call's build failed (after applies() let this call in)
        return conv(F.silu(norm(x)), cache)
    from triton.errors import TritonError

    from .model import layout_of
    from .triton_norm import norm_silu_into

    x = x.contiguous(memory_format=layout_of(x))  # dense, in its layout family (no copy if it already is)
    prev = cache.frames.get(conv) if cache is not None and conv.time_pad else None
    buf, act = conv.padded_buffer(x, prev)
    try:
        norm_silu_into(x, norm.gamma.reshape(-1), norm.scale, act)
    except TritonError as e:  # raised before the kernel launches: nothing written, the cache untouched
        _failed = str(e).strip().splitlines()[-1][:200] if str(e).strip() else repr(e)
        log.warning("VAE: the fused norm + SiLU kernel failed to build (%s); using the unfused ops", _failed)
        return conv(F.silu(norm(x)), cache)
    if cache is not None and conv.time_pad:  # what CausalConv3d.forward keeps: the last frames of its input
        cache.frames[conv] = conv._last_frames(prev, act)
    return nn.Conv3d.forward(conv, buf)
