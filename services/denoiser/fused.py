"""The DiT's elementwise work between its GEMMs and attention, as small pure functions that can be compiled.

Each function is the reference math (eager PyTorch, float32 where Wan computes in float32). With
`FusedOps(compile=True)` they go through torch.compile, which fuses each into one or two kernels with no
float32 temporaries in memory: the layer norm + adaLN modulation, the q/k RMS norm + RoPE, and the gated
residuals. Attention and GEMMs stay outside (cuDNN / cuBLAS, or the request's attention backend).
Compilation happens once per process and shape family (dynamo marks the token dim dynamic on the second
shape it sees), at the denoiser's warm-up.

The q/k RMS norms (with RoPE for self-attention) and the layer norms run Triton kernels of our own on CUDA instead
(triton_norms.py): Inductor's code for the q/k norms reads each row twice and reaches about a quarter of memory
speed at Wan-1.3B and a tenth at Wan-14B's width (H100), and its layer norms slow down by up to 1.6x once dynamo
recompiles them with dynamic sizes (any request shape unlike the warm-up's); ours build once per width.

Under FP8 GEMMs (`--gemm fp8`, fp8.py) the regions whose output only feeds a GEMM (the modulated norms before
attention and the MLP, the cross-attention norm, the GELU) also quantize that output per row, in the same kernel
when compiled: `*_fp8` below, which return fp8.Fp8Rows for the next Fp8Linear.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .fp8 import Fp8Rows, quantize_rows

log = logging.getLogger(__name__)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine, float32) then adaLN: x [B, L, C] -> norm(x) * (1 + scale) + shift in x's dtype.

    shift, scale [B, C] float32.
    """
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (y * (1 + scale[:, None]) + shift[:, None]).type_as(x)


def affine_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with affine parameters, in float32, returned in x's dtype (the cross-attention norm)."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).type_as(x)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate, summed in float32: x, y [B, L, C], gate [B, C] float32."""
    return (x.float() + y.float() * gate[:, None]).type_as(x)


def add_modulate(x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention residual then the MLP's modulated norm in one pass: (x + y, modulate(x + y))."""
    x = x + y
    return x, modulate(x, shift, scale, eps)


def gated_affine_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-attention's gated residual then the cross-attention norm in one pass:
    (s, affine_norm(s)) with s = gated_residual(x, y, gate)."""
    x = gated_residual(x, y, gate)
    return x, affine_norm(x, weight, bias, eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The MLP's activation: GELU, tanh approximation (as Wan)."""
    return F.gelu(x, approximate="tanh")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x W^T + b) for the MLP's first layer (reference math; see FusedOps for the CUDA epilogue)."""
    return gelu(F.linear(x, weight, bias))


def linear_gelu_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """linear_gelu with the GELU in the GEMM's epilogue (cuBLASLt, tanh approximation): the [B, L, ffn] result
    is written once instead of written, read and written again. CUDA only: on the CPU the same op's GELU is
    the erf one, so the CPU keeps the reference path."""
    if not x.is_cuda:
        return linear_gelu(x, weight, bias)
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim in float32, gain applied in x's dtype (as Wan's WanRMSNorm)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.type_as(x) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, L, N, D] by cos / sin [L, 1, D/2], in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float, heads: int,
              cos: torch.Tensor, sin: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention q/k: RMS norm over all heads, split heads, RoPE. q, k [B, L, C] -> [B, L, N, D].

    groups > 1 (Ulysses): returned as [G, B, L, N / G, D], head group g contiguous for its rank, written in
    that layout by the same kernel."""
    q = rope(rms_norm(q, wq, eps).unflatten(-1, (heads, -1)), cos, sin)
    k = rope(rms_norm(k, wk, eps).unflatten(-1, (heads, -1)), cos, sin)
    if groups > 1:
        q, k = head_groups(q, groups), head_groups(k, groups)
    return q, k


def head_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, L, N, D] -> [G, B, L, N/G, D], contiguous: head group g first (what Ulysses rank g receives)."""
    return x.unflatten(2, (groups, -1)).permute(2, 0, 1, 3, 4).contiguous()


def modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Fp8Rows:
    return quantize_rows(modulate(x, shift, scale, eps))


def add_modulate_fp8(x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, Fp8Rows]:
    x, h = add_modulate(x, y, shift, scale, eps)
    return x, quantize_rows(h)


def affine_norm_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Fp8Rows:
    return quantize_rows(affine_norm(x, weight, bias, eps))


def gelu_fp8(x: torch.Tensor) -> Fp8Rows:
    return quantize_rows(gelu(x))


# Inductor tunes each compiled kernel's launch configuration at warm-up (coordinate descent): the reductions over
# the model width (layer / RMS norms) otherwise run well below memory speed.
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


class FusedOps:
    """The functions above, eager or compiled; one instance per DiT (a deployment setting, not per request).

    Compiled, on CUDA: the layer norms (with the adaLN modulation, the affine weights, or a residual add before
    them) and the q/k RMS norms run our Triton kernels (triton_norms.py; see the module docstring for why); the
    rest runs Inductor's code, and the MLP's first GEMM takes its GELU as a cuBLASLt epilogue
    (linear_gelu_epilogue). With `fp8` (the blocks' linears are fp8.Fp8Linear) `modulate`, `add_modulate`'s
    second output and `affine_norm` are the `*_fp8` variants (compiled, no Triton layer norm), and `quantize_rows`
    quantizes the GEMM inputs no region computes (the attention outputs, the text context)."""

    NAMES = ("modulate", "add_modulate", "affine_norm", "gated_residual", "gated_affine_norm")

    def __init__(self, compile: bool = False, fp8: bool = False, kernels: bool | None = None):
        """kernels: run the norms through triton_norms (None: when compiled, on CUDA; True: also on the CPU,
        for tests under TRITON_INTERPRET=1; False: never)."""
        self.compiled, self.fp8 = compile, fp8
        self.kernels = compile if kernels is None else kernels
        self._kernels_on_cpu = kernels is True

        def wrap(fn):
            return torch.compile(fn, fullgraph=True, options=COMPILE_OPTIONS) if compile else fn

        self._ref = {name: wrap(globals()[name]) for name in self.NAMES}
        self.gated_residual = self._ref["gated_residual"]
        self._norm_rope, self._rms_norm = wrap(norm_rope), wrap(rms_norm)
        self._linear_gelu = linear_gelu_epilogue if compile else linear_gelu
        self.gelu_fp8 = self.quantize_rows = None
        if fp8:  # the GEMM inputs these compute come out quantized
            self.modulate, self.add_modulate, self.affine_norm, self.gelu_fp8, self.quantize_rows = (
                wrap(fn) for fn in (modulate_fp8, add_modulate_fp8, affine_norm_fp8, gelu_fp8, quantize_rows))

    def _kernel(self, x: torch.Tensor, run, fallback, heads: int = 1, others: tuple = ()):
        """run() (a Triton kernel, given the module triton_norms) where it applies: compiled, on CUDA (or forced),
        a power-of-2 head dim, no autograd through x or the `others` tensors; else fallback(). A kernel that fails
        to build here (Triton builds each new specialisation at its first launch: the warm-up's, and a later
        request's whose sizes divide by 16 where the warm-up's did not) is logged and no kernel is tried again by
        this instance; any other error propagates."""
        d = x.shape[-1] // heads
        if (self.kernels and (x.is_cuda or self._kernels_on_cpu) and (heads == 1 or d >= 2 and d & (d - 1) == 0)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)))):
            from triton.errors import TritonError

            from . import triton_norms

            try:
                return run(triton_norms)
            except TritonError as err:  # raised before the launch: nothing written
                log.warning("norm kernel failed to build (%s: %s); using the compiled ops from now on",
                            type(err).__name__, str(err).strip()[-200:])
                self.kernels = False
        return fallback()

    # The layer norms. Under FP8 __init__ replaces the first three with their quantizing variants.
    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return self._kernel(x, lambda tn: tn.layer_norm(x, eps, shift=shift, scale=scale),
                            lambda: self._ref["modulate"](x, shift, scale, eps), others=(shift, scale))

    def add_modulate(self, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._kernel(x, lambda tn: tn.layer_norm(x, eps, residual=y, shift=shift, scale=scale),
                            lambda: self._ref["add_modulate"](x, y, shift, scale, eps), others=(y, shift, scale))

    def affine_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return self._kernel(x, lambda tn: tn.layer_norm(x, eps, weight=weight, bias=bias),
                            lambda: self._ref["affine_norm"](x, weight, bias, eps), others=(weight, bias))

    def gated_affine_norm(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """gated_affine_norm above (not under FP8, whose norm output is quantized)."""
        return self._kernel(x, lambda tn: tn.layer_norm(x, eps, residual=y, gate=gate, weight=weight, bias=bias),
                            lambda: self._ref["gated_affine_norm"](x, y, gate, weight, bias, eps),
                            others=(y, gate, weight, bias))

    def norm_rope(self, q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                  heads: int, cos: torch.Tensor, sin: torch.Tensor,
                  groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """norm_rope above (self-attention q / k, [B, L, C] -> [B, L, N, D] or Ulysses' [G, B, L, N / G, D])."""
        rope = (cos, sin)
        return self._kernel(
            q,
            lambda tn: (tn.rms_rope(q, wq, eps, heads, rope, groups), tn.rms_rope(k, wk, eps, heads, rope, groups)),
            lambda: self._norm_rope(q, k, wq, wk, eps, heads, cos, sin, groups), heads, (k, wq, wk))

    def norm_heads(self, x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
        """rms_norm above over all heads, split into heads: [B, L, C] -> [B, L, N, D] (cross-attention q / k)."""
        return self._kernel(x, lambda tn: tn.rms_rope(x, weight, eps, heads),
                            lambda: self._rms_norm(x, weight, eps).unflatten(-1, (heads, -1)), heads, (weight,))

    def linear_gelu(self, x: torch.Tensor | Fp8Rows, linear) -> torch.Tensor | Fp8Rows:
        """gelu(linear(x)), the MLP's first layer (an nn.Linear, or an fp8.Fp8Linear under FP8). Scaled FP8 GEMMs
        have no GELU epilogue: the GEMM writes its output, and the GELU runs in the kernel that quantizes it for
        the second layer (returns Fp8Rows)."""
        if self.fp8:
            return self.gelu_fp8(linear(x))
        return self._linear_gelu(x, linear.weight, linear.bias)
