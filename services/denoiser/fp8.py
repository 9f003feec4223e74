"""FP8 GEMMs for the DiT's blocks (`--gemm fp8`): a lossy, opt-in deployment setting.

Every linear of the transformer blocks (self- and cross-attention q, k, v, o; both MLP layers) becomes an
`Fp8Linear`: its weight is quantized once, at load, to float8_e4m3fn with one float32 scale per output
channel; each call quantizes its activation per token (one scale per row) and runs `torch._scaled_mm`, which
multiplies in FP8 with float32 accumulation and applies both scales and the bias in its epilogue. These are
nearly all of the DiT's GEMM FLOPs and weights (whose memory FP8 halves once loaded: a model loaded whole onto
the GPU peaks at its bf16 size plus one layer while it is quantized; with weights kept in host memory, level 3,
each linear is quantized on the GPU one at a time and only the FP8 weights are streamed). The embeddings (patch,
text, time), the time projection and the head stay in the model dtype: they are small, and the timestep path is
float32 by design (dit.KEEP_FP32).

Quantizing is plain elementwise + row-reduction torch (`quantize_rows`), so that under `--compile` Inductor
fuses it with the work that computes the GEMM's input: the layer norm + modulation before q/k/v and the MLP,
the cross-attention norm, and the GELU between the two MLP layers (fused.py), which then hand the GEMM an
Fp8Rows instead of a bf16 activation (self-attention's q, k and v share one quantization of their input;
cross-attention's k and v share one of the text context).

Per-token and per-channel scales leave the error of FP8's 3 mantissa bits on each input (a few 1e-2 relative
on one GEMM of random data); whole forwards are measured by tests/denoiser/test_fp8.py and, on the GPU at full
size, by bench/dit_forward.py --fp8 (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from smartdiff.shared.config import ConfigError, DiTConfig

if TYPE_CHECKING:
    from .dit import WanDiT

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: the largest finite e4m3fn value (no infinities in this format)
GEMMS = ("exact", "fp8")  # --gemm: the blocks' GEMMs in the model dtype (default), or FP8 (this module)
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later


class GemmConfigError(ConfigError):
    """A `--gemm` choice this deployment cannot run; the message names the flag and the rule."""


class Fp8Rows(NamedTuple):
    """An activation [..., K] quantized per row: data float8 [..., K] and scale float32 [..., 1], with
    x ~= data * scale; `dtype` is x's dtype, in which the GEMM writes its output."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


ROW_CHUNK = 8192  # eager quantization works on this many rows at a time (float32 temporaries of [rows, K]);
# dit.TOKEN_CHUNK, for RoPE and the q/k norm, is the same


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """x [..., K] -> Fp8Rows: each row scaled so that its absolute maximum maps to FP8_MAX (all-zero rows get
    scale 1 and stay zero). The same rule quantizes weights [N, K] per output channel.

    Eager (not under torch.compile, which fuses it into one pass), large inputs go ROW_CHUNK rows at a time, so
    that its float32 temporaries stay small (the MLP's [tokens, ffn_dim] activation is the widest)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= ROW_CHUNK or torch.compiler.is_compiling():
        return _quantize(x)
    flat = x.reshape(rows, x.shape[-1])
    data = torch.empty(flat.shape, dtype=FP8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    for s in range(0, rows, ROW_CHUNK):
        part = _quantize(flat[s:s + ROW_CHUNK])
        data[s:s + ROW_CHUNK], scale[s:s + ROW_CHUNK] = part.data, part.scale
    return Fp8Rows(data.view(x.shape), scale.view(*x.shape[:-1], 1), x.dtype)


def _quantize(x: torch.Tensor) -> Fp8Rows:
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    data = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # the clamp only catches rounding past the bound
    return Fp8Rows(data, scale, x.dtype)


class Fp8Linear(nn.Module):
    """y = x W^T + b with an FP8 weight (per-output-channel scales) and FP8 activations (per-row scales).

    Takes a tensor [..., K] (quantized here, with `self.quantize`, which WanDiT.set_compiled points at the
    compiled quantize_rows) or an activation already quantized by the kernel that computed it (Fp8Rows).
    Returns [..., N] in the activation's dtype.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # float8 [N, K]
        self.register_buffer("weight_scale", weight_scale)  # float32 [1, N], contiguous (as _scaled_mm wants)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # model dtype [N]
        self.quantize = quantize_rows

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> "Fp8Linear":
        """Quantize `linear`'s weight (on `device` if given, e.g. the GPU for weights kept in host memory); the
        result lives where the linear's weight lives."""
        w = linear.weight.detach()
        q = quantize_rows(w.to(device) if device is not None else w)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q.data.to(w.device), q.scale.t().contiguous().to(w.device), bias)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        rows = x if isinstance(x, Fp8Rows) else self.quantize(x)
        lead = rows.data.shape[:-1]
        out = torch._scaled_mm(rows.data.reshape(-1, self.in_features), self.weight.t(),
                               scale_a=rows.scale.reshape(-1, 1), scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=rows.dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def block_linears(dit: "WanDiT") -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every linear of the transformer blocks: the ones --gemm fp8 quantizes."""
    out = []
    for block in dit.blocks:
        for attn in (block.self_attn, block.cross_attn):
            out += [(attn, name) for name in ("q", "k", "v", "o")]
        out += [(block.ffn, "0"), (block.ffn, "2")]
    return out


@torch.no_grad()
def quantize_blocks_fp8(dit: "WanDiT", device: torch.device | str | None = None) -> "WanDiT":
    """Replace the blocks' linears of `dit` by Fp8Linear, in place, one at a time (the peak is one extra layer).

    `device`: where to compute the quantization (default: where each weight is). The embeddings, the time
    projection and the head keep the model dtype. The fused ops are rebuilt for FP8 inputs, compiled or not as
    before. Idempotent: linears already FP8 are left as they are."""
    for parent, name in block_linears(dit):
        linear = getattr(parent, name)
        if isinstance(linear, nn.Linear):
            setattr(parent, name, Fp8Linear.from_linear(linear, device))
    dit.set_compiled(dit.blocks[0].ops.compiled if len(dit.blocks) else False)
    return dit


@functools.lru_cache(maxsize=None)
def rowwise_gemm_fails(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a 16 x 16 x 16 FP8 GEMM with row-wise scales writing `dtype` does not run here, or None: the device
    alone does not tell (row-wise scaling came to Ada and to the CPU in later torch releases; some newer GPUs lack
    it in cuBLAS)."""
    try:
        with torch.no_grad():
            w = Fp8Linear.from_linear(nn.Linear(16, 16, bias=False, device=device, dtype=dtype), device)
            w(torch.ones(16, 16, device=device, dtype=dtype))
    except RuntimeError as e:
        return str(e).strip().splitlines()[0][:200]
    return None


def check_gemm(gemm: str, device: torch.device | str, dtype: torch.dtype, cfg: DiTConfig) -> str:
    """Refuse, before any weight is read, a --gemm choice this device, dtype or model cannot run.

    fp8 runs torch._scaled_mm with row-wise scales: on CUDA that needs FP8 tensor cores (compute capability
    >= 8.9), writes bfloat16 only, and wants K and N multiples of 16; the CPU runs it in any dtype (the
    reference the tests use). Returns `gemm`."""
    if gemm not in GEMMS:
        raise GemmConfigError(f"gemm: must be one of {', '.join(GEMMS)}, got {gemm!r}")
    if gemm == "exact":
        return gemm
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GemmConfigError("gemm: fp8 needs CUDA, and torch.cuda.is_available() is False: use --gemm exact")
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise GemmConfigError(
                f"gemm: fp8 needs FP8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper or later); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use --gemm exact")
        if dtype != torch.bfloat16:
            name = str(dtype).removeprefix("torch.")
            raise GemmConfigError(f"gemm: fp8 on CUDA needs --dtype bfloat16 (row-wise scaled FP8 GEMMs write "
                                  f"bfloat16 only), got {name}: use --dtype bfloat16 or --gemm exact")
        bad = {name: v for name, v in (("dim", cfg.dim), ("ffn_dim", cfg.ffn_dim)) if v % 16}
        if bad:
            raise GemmConfigError(f"gemm: fp8 on CUDA needs the model's dim and ffn_dim to be multiples of 16 "
                                  f"(torch._scaled_mm), got {bad}: use --gemm exact")
    elif device.type != "cpu":
        raise GemmConfigError(f"gemm: fp8 runs on CUDA (compute capability >= 8.9) or the CPU, got device "
                              f"{device}: use --gemm exact")
    why = rowwise_gemm_fails(device, dtype)
    if why:
        raise GemmConfigError(f"gemm: fp8 needs torch._scaled_mm with row-wise scales, which this torch on "
                              f"{device.type} does not run ({why}): use --gemm exact")
    return gemm
