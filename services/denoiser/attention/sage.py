"""`sage`, `sage_fp8` and `sage_int8`: quantized attention in the SageAttention style (lossy).

INT8 Q.K^T with per-tile scales after subtracting K's mean over tokens (softmax-invariant), then P.V in
FP16/BF16 (`sage`, ~1.3e-2 relative error on random, diffuse attention), FP8 e4m3 with per-channel V scales
(`sage_fp8`, ~4e-2 there, about the same as `sage` inside a DiT), or INT8 with P scaled per row and key block and
V per channel (`sage_int8`, ~2e-2; see triton_sage). Our Triton kernel runs all three; on Hopper GPUs `sage` and
`sage_int8` run our Gluon kernels instead (gluon_sage: warp-specialized, asynchronous wgmma, TMA), which are
faster there: 1.2-1.4x cuDNN SDPA on Wan shapes, about as fast as `sage_fp8` (docs/benchmarks.md). `sage` uses the
`sageattention` package instead when version 2 or later (CUDA kernels) is installed. Version 1.x (the one on
PyPI) is not used: it is slower than cuDNN SDPA on Hopper and than our kernels (bench/attention.py).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .base import Backend, BackendInfo, Kernel, package_version, triton_reason

log = logging.getLogger(__name__)

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

SAGE_INFO = BackendInfo(
    name="sage", description="SageAttention-style INT8 Q.K (smoothed K) + FP16 P.V; our Gluon kernel on Hopper, "
                             "Triton elsewhere, or the sageattention package >= 2 when installed (lossy)",
    lossy=True, devices=("cuda", "cpu"), dtypes=DTYPES, head_dims=HEAD_DIMS, returns_lse=True,
)
SAGE_FP8_INFO = BackendInfo(
    name="sage_fp8", description="SageAttention-style INT8 Q.K (smoothed K) + FP8 P.V; Triton kernel, compute "
                                 "capability 8.9+ (lossy; 3x the error of sage on diffuse attention)",
    lossy=True, devices=("cuda", "cpu"), dtypes=DTYPES, head_dims=HEAD_DIMS, returns_lse=True,
)
SAGE_INT8_INFO = BackendInfo(
    name="sage_int8", description="INT8 Q.K (smoothed K) + INT8 P.V (P scaled per row and key block); our "
                                  "Gluon kernel on Hopper, Triton elsewhere, compute capability 8.0+ (lossy; half "
                                  "the error of sage_fp8 on diffuse attention)",
    lossy=True, devices=("cuda", "cpu"), dtypes=DTYPES, head_dims=HEAD_DIMS, returns_lse=True,
)


def sageattention_package() -> str | None:
    """Version of an installed sageattention >= 2, else None (1.x is slower than our kernel)."""
    version = package_version("sageattention")
    if version is None or importlib.util.find_spec("sageattention") is None:
        return None
    return version if int(version.split(".")[0]) >= 2 else None


class TritonSageKernel(Kernel):
    def __init__(self, name: str, device: torch.device, pv: str):
        from . import triton_sage

        self.name, self.pv = name, pv
        self.cfg = triton_sage.default_config(device, pv)
        self.run = triton_sage.sage_attention
        self.label = f"{name}[triton]"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.run(q, k, v, pv=self.pv, cfg=self.cfg)

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(q, k, v, pv=self.pv, cfg=self.cfg, lse=True)


# (P.V precision, "sparge" or "exact", head dim) -> why our Gluon kernel failed to build in this process; from then
# on every request with that pair gets the Triton kernel (SDPA for "exact"), without trying again
_GLUON_FAILED: dict[tuple[str, int], str] = {}


class GluonSageKernel(Kernel):
    """Our Hopper kernels (gluon_sage) for FP16 or INT8 P.V. A build can fail (Gluon's API moves between Triton
    versions, and Triton compiles again for each new specialisation: tail, log-sum-exp); the log then says why and
    the Triton kernel runs, for this call and every later one of this process (_GLUON_FAILED)."""

    def __init__(self, name: str, device: torch.device, pv: str, head_dim: int):
        from triton.errors import TritonError

        from . import gluon_sage

        self.name, self.pv, self.key = name, pv, (pv, head_dim)
        self.run, self.build_errors = gluon_sage.sage_attention, TritonError
        self.fallback = TritonSageKernel(name, device, pv=pv)
        self.label = f"{name}[gluon]"

    def _call(self, q, k, v, lse: bool):
        if self.key not in _GLUON_FAILED:
            try:
                return self.run(q, k, v, pv=self.pv, lse=lse)
            except self.build_errors as e:  # compilation, ptxas, resources: raised before the kernel launches
                gluon_failed(self.key, self.name, e)
        self.label = self.fallback.label
        return self.fallback.with_lse(q, k, v) if lse else self.fallback(q, k, v)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._call(q, k, v, lse=False)

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._call(q, k, v, lse=True)


def gluon_failed(key: tuple[str, int], name: str, e: BaseException, instead: str = "the Triton kernel") -> None:
    """Remember for the process, and log, why our Gluon kernel for `key` failed to build (a Triton error: its
    message's last non-caret line, or the cause)."""
    lines = [ln.strip() for ln in str(getattr(e, "error_message", None) or e).splitlines()]
    lines = [ln for ln in lines if ln and set(ln) != {"^"}]
    _GLUON_FAILED[key] = (lines[-1] if lines else repr(e.__cause__ or e))[:200]
    log.warning("%s: the Gluon kernel failed to build (%s); using %s", name, _GLUON_FAILED[key], instead)


def gluon_failure(key: tuple[str, int]) -> str | None:
    """Why our Gluon kernel for `key` failed to build in this process, or None (not failed, or not tried)."""
    return _GLUON_FAILED.get(key)


def gluon_usable(device: torch.device, head_dim: int, key: tuple[str, int]) -> bool:
    """Our Hopper kernel for `key` runs here and has not failed to build in this process."""
    return gluon_supported(device, head_dim) and key not in _GLUON_FAILED


def gluon_supported(device: torch.device, head_dim: int) -> bool:
    """Whether our Hopper kernels can run here: a Hopper GPU, a head dim they take, and a Triton with Gluon."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9 or head_dim not in (64, 128):
        return False
    try:
        from . import gluon_sage  # noqa: F401
    except (ImportError, AttributeError):  # a Triton without Gluon's Hopper API: the Triton kernel runs instead
        return False
    return True


def _our_kernel(name: str, device: torch.device, head_dim: int, pv: str) -> Kernel:
    if gluon_usable(device, head_dim, (pv, head_dim)):
        return GluonSageKernel(name, device, pv, head_dim)
    return TritonSageKernel(name, device, pv=pv)


class PackageSageKernel(Kernel):
    """sageattention >= 2 (its own per-GPU dispatch); k is copied because the package may smooth it in place."""

    name = "sage"

    def __init__(self, version: str):
        from sageattention import sageattn

        self.fn = sageattn
        self.label = f"sage[sageattention {version}]"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(q, k.clone(), v, tensor_layout="NHD", is_causal=False)

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return TritonSageKernel("sage", q.device, pv="fp16").with_lse(q, k, v)  # same maths, ours has the LSE


def _check_sage(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    if device.type == "cuda" and sageattention_package() is not None:
        return None
    return triton_reason(device, (8, 0), " (INT8 tensor cores)")


def _check_fp8(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    return triton_reason(device, (8, 9), " (FP8 tensor cores)")


def _build_sage(choice, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    version = sageattention_package() if device.type == "cuda" else None
    if version is not None and dtype != torch.float32:
        return PackageSageKernel(version)
    return _our_kernel("sage", device, head_dim, "fp16")


def _build_fp8(choice, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    return TritonSageKernel("sage_fp8", device, pv="fp8")


def _check_int8(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    return triton_reason(device, (8, 0), " (INT8 tensor cores)")


def _build_int8(choice, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    return _our_kernel("sage_int8", device, head_dim, "int8")


SAGE = Backend(SAGE_INFO, _check_sage, _build_sage)
SAGE_FP8 = Backend(SAGE_FP8_INFO, _check_fp8, _build_fp8)
SAGE_INT8 = Backend(SAGE_INT8_INFO, _check_int8, _build_int8)
