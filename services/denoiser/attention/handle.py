"""The engine-facing API: resolve a request's AttentionChoice here, attach it to the DiT(s), report what ran."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from smartdiff.shared.errors import RequestError

from . import EXACT, backend_names, get_backend
from .auto import AutoKernel
from .base import AttentionFn, Kernel
from .choice import AttentionChoice


@dataclass(frozen=True)
class AttentionReport:
    """What ran for a request: for DenoiseSummary.effective.attention.backend and .attention_selection."""

    backend: str  # registry name of the backend that ran (never "auto")
    kernel: str  # the kernel, e.g. "sdpa[cudnn]", "sage[triton]"
    selection: str  # how it was chosen, e.g. "sage[triton]", "auto->sage[triton] (rel err ...)", "... (fallback ...)"


@dataclass(frozen=True)
class Resolution:
    """What to build for a choice on this deployment (resolve() has already refused what cannot run)."""

    backend: str  # the backend to build ("auto" included)
    note: str | None = None  # why the requested backend was replaced (fallback)
    candidates: tuple[str, ...] = ()  # auto: the candidates that can run here
    skipped: tuple[tuple[str, str], ...] = ()  # auto: (candidate, why it cannot run here)


def resolve(choice: AttentionChoice, device: torch.device | str, dtype: torch.dtype, head_dim: int,
            allowed: Collection[str] | None = None) -> Resolution:
    """Check a choice against this deployment; RequestError("attention.backend", why + what is available).

    allowed: the backends the deployment allows (system parameter); None: all. The exact one always is.
    """
    device = torch.device(device)

    def reason(name: str) -> str | None:
        if allowed is not None and name not in allowed and name != EXACT:
            return "not allowed by this deployment"
        return get_backend(name).unavailable_reason(device, dtype, head_dim)

    def auto_reason(name: str) -> str | None:
        backend = get_backend(name)
        return reason(name) or (backend.redundant(device, head_dim) if backend.redundant is not None else None)

    if choice.backend == "auto":
        names = choice.candidates or tuple(n for n in backend_names() if n not in ("auto", EXACT))
        names = tuple(n for n in names if n != EXACT)
        why = {n: auto_reason(n) for n in names}
        return Resolution("auto", candidates=tuple(n for n in names if why[n] is None),
                          skipped=tuple((n, w) for n, w in why.items() if w is not None))
    why = reason(choice.backend)
    if why is None:
        return Resolution(choice.backend)
    if choice.allow_fallback:
        return Resolution(EXACT, note=f"fallback from {choice.backend}: {why}")
    available = ", ".join(n for n in backend_names() if reason(n) is None)
    raise RequestError("attention.backend", f"{choice.backend!r} cannot run here: {why}; available here: {available} "
                                            f"(or set allow_fallback to run {EXACT} instead)")


def build_kernel(res: Resolution, choice: AttentionChoice, device: torch.device, dtype: torch.dtype,
                 head_dim: int) -> Kernel:
    """A fresh kernel object for one request."""
    if res.backend != "auto":
        return get_backend(res.backend).build(choice, device, dtype, head_dim)
    exact = get_backend(EXACT).build(choice, device, dtype, head_dim)
    candidates, skipped = [], list(res.skipped)
    for name in res.candidates:
        backend = get_backend(name)
        try:
            candidates.append((backend.build(choice, device, dtype, head_dim), backend.info.lossy))
        except (ImportError, RuntimeError) as e:  # a kernel that cannot be built here is skipped, with why
            skipped.append((name, f"failed to build: {e}"))
    return AutoKernel(exact, candidates, choice.tolerance, skipped)


class AttentionHandle:
    """One request's attention on one or more DiTs; use as a context manager so the state is dropped after."""

    def __init__(self, dits: Sequence[nn.Module], kernel: Kernel, res: Resolution,
                 wrap: Callable[[AttentionFn], AttentionFn] | None = None):
        self.kernel: Kernel | None = kernel
        self.resolution = res
        self._report: AttentionReport | None = None
        self._saved = []
        for d, dit in enumerate(dits):
            for i, block in enumerate(dit.blocks):
                attn = block.self_attn
                self._saved.append((attn, attn.attention_fn))
                fn = kernel.for_layer((d, i))
                attn.attention_fn = wrap(fn) if wrap is not None else fn

    def report(self) -> AttentionReport:
        """The backend that ran and how it was chosen (for auto, decides now if it has not yet)."""
        if self._report is None:
            k = self.kernel
            text = k.describe()
            if self.resolution.note:
                text = f"{text} ({self.resolution.note})"
            self._report = AttentionReport(backend=k.name, kernel=k.label, selection=text)
        return self._report

    @property
    def selection(self) -> str:
        return self.report().selection

    def detach(self) -> None:
        """Put back the previous attention functions and drop the request's kernel state."""
        for attn, fn in reversed(self._saved):
            attn.attention_fn = fn
        self._saved = []
        if self.kernel is not None:
            try:
                self.report()
            finally:
                self.kernel = None

    def __enter__(self) -> "AttentionHandle":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.detach()
            return
        try:  # failing request: restore the DiT whatever happens to the report
            self.detach()
        except Exception:  # noqa: BLE001 - the original exception is the one to surface
            self.kernel = None


def attach(dits: nn.Module | Sequence[nn.Module], choice: AttentionChoice | None = None,
           allowed: Collection[str] | None = None,
           wrap: Callable[[AttentionFn], AttentionFn] | None = None,
           device: torch.device | None = None) -> AttentionHandle:
    """Set the self-attention backend of every block of `dits` (one request's DiT experts) to `choice`.

    Refuses with RequestError what cannot run here (unless choice.allow_fallback). Each call builds fresh state,
    so requests on different DiT instances never share any; one DiT serves one request at a time.
    wrap(fn) -> fn: installed around each layer's backend (e.g. sequence-parallel attention around it).
    device: where the blocks run (default: where their weights are; they differ when blocks are offloaded).
    """
    dits = [dits] if isinstance(dits, nn.Module) else list(dits)
    choice = choice or AttentionChoice()
    probe = dits[0].patch_embedding.weight  # in the model dtype (the blocks' GEMMs may be FP8: fp8.py)
    device, dtype, head_dim = torch.device(device or probe.device), probe.dtype, dits[0].cfg.head_dim
    res = resolve(choice, device, dtype, head_dim, allowed)
    return AttentionHandle(dits, build_kernel(res, choice, device, dtype, head_dim), res, wrap)


def warm_kernels(device: torch.device | str, dtype: torch.dtype, head_dim: int, heads: int, seq_len: int,
                 allowed: Collection[str] | None = None) -> list[str]:
    """Run each allowed backend that can run here once on random q = k = v [1, seq_len, heads, head_dim], so
    that its JIT kernels (ours: Triton, Gluon; `flash_attn` runs ours on Hopper) are compiled for that shape
    before a request waits for them.

    Returns what ran (kernel labels). `sdpa` runs library kernels (nothing to compile) and `auto` runs the
    others, so neither is called."""
    from . import available_backends

    device = torch.device(device)
    x = torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype)
    warmed = []
    for status in available_backends(device, dtype, head_dim):
        name = status.info.name
        if not status.available or name in (EXACT, "auto"):
            continue
        if allowed is not None and name not in allowed:
            continue
        kern = get_backend(name).build(AttentionChoice(name), device, dtype, head_dim)
        kern(x, x, x)
        warmed.append(kern.describe())
    return warmed
