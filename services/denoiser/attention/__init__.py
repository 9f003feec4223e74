"""Self-attention backends of the DiT: a registry keyed by name, and the per-request API (choice -> attach).

Every backend takes q, k, v [B, L, N, D] and returns [B, L, N, D]; it declares its constraints (BackendInfo)
and imports its kernel only when built. Adding one is adding a file and a line in _REGISTRY.

    choice = AttentionChoice.from_proto(params.attention)            # RequestError on bad values
    with attach(engine.experts, choice) as handle:                   # refuses (RequestError) or falls back
        ... run the denoising loop ...
    handle.report()  # AttentionReport(backend="sage", kernel="sage[triton]", selection="sage[triton]")
"""

from __future__ import annotations

import importlib

import torch

from smartdiff.shared.errors import RequestError

from .base import AttentionFn, Backend, BackendInfo, BackendStatus, Kernel

EXACT = "sdpa"  # the exact reference every lossy backend is checked against

# name -> (module, attribute). Order = preference of `auto` when timings tie (fastest expected first; on Hopper
# sage_fp8 and sage_int8 are within a few per cent of each other, docs/benchmarks.md).
_REGISTRY: dict[str, tuple[str, str]] = {
    "sparge": ("sparge", "BACKEND"),
    "sage_fp8": ("sage", "SAGE_FP8"),
    "sage_int8": ("sage", "SAGE_INT8"),
    "sage": ("sage", "SAGE"),
    "flash_attn": ("flash", "BACKEND"),
    "sdpa": ("sdpa", "BACKEND"),
    "auto": ("auto", "BACKEND"),
}


def default_backend(device: torch.device | str, dtype: torch.dtype | None = None, head_dim: int | None = None,
                    allowed: tuple[str, ...] | None = None) -> str:
    """The backend of requests that name none when the deployment sets no default: the fastest exact one here,
    `flash_attn` where it can run (CUDA: FlashAttention when installed, our exact kernel on Hopper, else SDPA's
    fastest kernel) and is allowed, else `sdpa`."""
    if allowed is not None and "flash_attn" not in allowed:
        return EXACT
    why_not = get_backend("flash_attn").unavailable_reason(torch.device(device), dtype, head_dim)
    return EXACT if why_not else "flash_attn"


def backend_names() -> tuple[str, ...]:
    """Every registered backend name, `auto` included."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The registry entry for `name` (KeyError for an unknown name)."""
    module, attr = _REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def ring_refusal(name: str, ring_degree: int) -> RequestError | None:
    """Why `name` cannot run under ring attention, which merges partial results by their log-sum-exp (None: it
    can): the exact backend and those whose kernels return it can; `auto` cannot."""
    def ok(n: str) -> bool:
        return n == EXACT or get_backend(n).info.returns_lse  # (auto's info says False)

    if ring_degree <= 1 or ok(name):
        return None
    capable = ", ".join(n for n in _REGISTRY if ok(n))
    return RequestError("attention.backend", f"{name!r} cannot run under ring attention (ring degree {ring_degree}): "
                                             f"it does not return the log-sum-exp; the backends that do: {capable}")


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None,
                       head_dim: int | None = None) -> list[BackendStatus]:
    """Every backend with whether it can run on this device (and dtype / head dim when given), and why not."""
    device = torch.device(device)
    out = []
    for name in _REGISTRY:
        backend = get_backend(name)
        out.append(BackendStatus(backend.info, backend.unavailable_reason(device, dtype, head_dim)))
    return out


from .choice import AttentionChoice, SpargeParams  # noqa: E402  (validates names against the registry above)
from .handle import AttentionHandle, AttentionReport, attach, resolve  # noqa: E402

__all__ = [
    "EXACT", "AttentionChoice", "AttentionFn", "AttentionHandle", "AttentionReport", "Backend", "BackendInfo",
    "BackendStatus", "Kernel", "SpargeParams", "attach", "available_backends", "backend_names", "default_backend",
    "get_backend", "resolve", "ring_refusal",
]
