"""What every attention backend declares (BackendInfo), how it is built (Backend) and what it builds (Kernel)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class BackendInfo:
    """A backend's static constraints: what it runs on and whether its output is exact."""

    name: str
    description: str
    lossy: bool  # quantized or sparse: output only approximates exact attention
    devices: tuple[str, ...]  # torch device types, e.g. ("cuda", "cpu")
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None  # None: any head dim
    returns_lse: bool = False  # Kernel.with_lse works: also returns the log-sum-exp (ring attention)

    def violation(self, device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
        """Why these static constraints exclude (device, dtype, head_dim), or None."""
        if device.type not in self.devices:
            return f"needs a {' or '.join(d.upper() if d == 'cuda' else d for d in self.devices)} device, not {device.type}"
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(DTYPE_NAMES.get(d, str(d)) for d in self.dtypes)
            return f"runs {names}, not {DTYPE_NAMES.get(dtype, dtype)}"
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return f"supports head dim {', '.join(map(str, self.head_dims))}, not {head_dim}"
        return None


class Kernel:
    """A backend built for one request on one device: q, k, v [B, L, N, D] -> out [B, L, N, D] in q's dtype.

    Holds only that request's state (probed kernel, statistics); dropped with the request's handle.
    """

    name: str = ""  # registry name of the backend that runs (never "auto")
    label: str = ""  # what actually runs, e.g. "sdpa[cudnn]", "sage[triton]"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, L, N, D], natural log-sum-exp of the scaled scores [B, N, L] float32), for ring attention."""
        raise NotImplementedError(f"{self.label} does not return the log-sum-exp")

    def for_layer(self, key: Hashable) -> AttentionFn:
        """The function installed on one attention layer; `key` names the layer (auto measures per layer)."""
        return self

    def describe(self) -> str:
        """What ran, with any per-request statistics (e.g. sparsity), for the response."""
        return self.label


@dataclass(frozen=True)
class Backend:
    """A registry entry: the static info, a runtime check (packages, GPU) and a builder."""

    info: BackendInfo
    check: Callable[[torch.device, torch.dtype | None, int | None], str | None]
    build: Callable[..., Kernel]  # (choice, device, dtype, head_dim) -> Kernel
    # (device, head_dim) -> why `auto` need not try it here (it would run the exact kernel), or None
    redundant: Callable[[torch.device, int | None], str | None] | None = None

    @property
    def name(self) -> str:
        return self.info.name

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype | None = None,
                           head_dim: int | None = None) -> str | None:
        """Why this backend cannot run here (device, dtype, head dim, missing package), or None."""
        return self.info.violation(device, dtype, head_dim) or self.check(device, dtype, head_dim)


@dataclass(frozen=True)
class BackendStatus:
    """A backend's info and whether it can run on a given device / dtype / head dim."""

    info: BackendInfo
    reason: str | None  # why not, when it cannot

    @property
    def available(self) -> bool:
        return self.reason is None


def triton_interpreter_on() -> bool:
    """TRITON_INTERPRET=1 (Triton kernels run on the CPU through its interpreter: tests only). Read here alone."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_reason(device: torch.device, min_capability: tuple[int, int] = (8, 0), what: str = "") -> str | None:
    """Why our Triton kernels cannot run on `device`, or None."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cpu":
        return None if triton_interpreter_on() else "needs a CUDA GPU (Triton kernel; CPU only under TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return f"needs a CUDA GPU, not {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < min_capability:
        return f"needs compute capability {min_capability[0]}.{min_capability[1]}+{what}, this GPU is {cap[0]}.{cap[1]}"
    return None


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
