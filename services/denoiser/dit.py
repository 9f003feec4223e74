"""The Wan2.1 / Wan2.2 text-to-video diffusion transformer (one expert), with official Wan parameter names.

Shapes: B batch, C = dim, L = F*H*W patch tokens, N heads, D = head dim, T = text_len (512).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from smartdiff.shared.config import DiTConfig

from . import fused
from .attention.sdpa import GPU_ORDER
from .fp8 import ROW_CHUNK, Fp8Linear
from .fused import FusedOps
from .parallel import ParallelState, pad_rope

# Parameters that stay float32 whatever the serving dtype: the timestep path and the modulation tables
# feed every block's scale / shift / gate, and Wan computes them in float32.
KEEP_FP32 = ("time_embedding", "time_projection", "modulation", "norm3")

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# FlexCache hook points (services/denoiser/cache). `run(tokens, e6, ctx) -> tokens` computes the block stack
# for the rows it is given; a BlockStackHook gets (run, tokens [B, L, C], e [B, C], e6 [B, 6, C], ctx [B, T, C])
# and returns the stack's output, computed or rebuilt from a cached residual. An AttentionHook gets
# (block index, "self" | "cross", compute) and returns that attention module's output [B, L, C] (before the
# gate), from compute() or broadcast from an earlier step.
BlockStackFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BlockStackHook = Callable[[BlockStackFn, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
AttentionHook = Callable[[int, str, Callable[[], torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class ForwardHooks:
    """Hooks for one forward call of one request, passed as an argument and never stored on the module, so
    concurrent requests on the same weights each keep their own cache state."""

    blocks: BlockStackHook | None = None
    attention: AttentionHook | None = None


# On Hopper cuDNN's attention is ~1.7x PyTorch's default choice (flash); it goes first where it accepts the call.
SDPA_PRIORITY = [backend for _, backend in GPU_ORDER]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention (cross-attention, and self-attention outside a request). q [B, Lq, N, D], k/v [B, Lk, N, D]."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding [B] -> [B, dim] float32, cos half then sin half (computed in float64 as Wan does)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_angles(head_dim: int, max_len: int = 1024, theta: float = 10000.0) -> list[torch.Tensor]:
    """Per-axis RoPE angles for (frame, height, width): [max_len, d_axis / 2] float64 each.

    The head dim is split as Wan splits it: d - 4*(d//6) for time, 2*(d//6) for height and for width.
    """
    sizes = [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]
    pos = torch.arange(max_len, dtype=torch.float64)
    return [torch.outer(pos, 1.0 / theta ** (torch.arange(0, s, 2, dtype=torch.float64) / s)) for s in sizes]


@functools.lru_cache(maxsize=4)
def rope_cos_sin(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [L, 1, D/2] float32 for a (frames, height, width) token grid, row-major order.

    Cached per (head dim, grid, device): computed in float64 on the CPU once, not at every forward. An entry
    holds L * D * 4 bytes on its device (39 MB for 720p x 81 frames at D = 128); four shapes stay cached."""
    f, h, w = grid
    tf, th, tw = rope_angles(head_dim)
    angles = torch.cat(
        [
            tf[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            tw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    return torch.cos(angles).float().to(device), torch.sin(angles).float().to(device)


# Tokens per piece for the float32 temporaries of RoPE and the q/k norm: elementwise (and per-token) work, so
# the pieces give the same values, while at 480p x 81 (32,760 tokens) they are a fraction of the activations.
# The same piece size as the eager FP8 quantization's (fp8.ROW_CHUNK).
TOKEN_CHUNK = ROW_CHUNK


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fused.rope over TOKEN_CHUNK tokens at a time: x [B, L, N, D], cos / sin [L, 1, D/2] (same values)."""
    out = torch.empty_like(x)
    for s in range(0, x.shape[1], TOKEN_CHUNK):
        out[:, s:s + TOKEN_CHUNK] = fused.rope(x[:, s:s + TOKEN_CHUNK], cos[s:s + TOKEN_CHUNK], sin[s:s + TOKEN_CHUNK])
    return out


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, with a learned gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], normalised TOKEN_CHUNK tokens at a time (per-token: the same values, less memory)."""
        out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, self.weight.dtype))
        for s in range(0, x.shape[1], TOKEN_CHUNK):
            out[:, s:s + TOKEN_CHUNK] = fused.rms_norm(x[:, s:s + TOKEN_CHUNK], self.weight, self.eps)
        return out


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class WanAttention(nn.Module):
    """Multi-head attention with q/k RMS norm over all heads; self-attention (with RoPE) or cross-attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.eps = eps
        self.attention_fn: AttentionFn = sdpa_attention  # set per request for self-attention
        self.ops = FusedOps()  # eager or compiled elementwise work, set by WanDiT.set_compiled

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, L, C], context [B, T, C] (None for self-attention) -> [B, L, C].

        Under FP8 GEMMs x may come quantized by the kernel that computed it (fp8.Fp8Rows): it only feeds q/k/v."""
        if context is None and getattr(self.attention_fn, "runs_module", False):
            # Ulysses: it runs the projections too, ordered around its exchanges (parallel.py)
            return self.attention_fn.run_module(self, x, rope)
        src = x if context is None else context
        if context is not None and isinstance(self.k, Fp8Linear):
            src = self.k.quantize(context)  # k and v share one FP8 quantization of the text context
        q, k = self.project_qk(x, src, rope)
        v = self.v(src).unflatten(-1, (self.num_heads, -1))
        out = self.attention_fn(q, k, v) if context is None else sdpa_attention(q, k, v)
        return self.o(out.flatten(-2))

    def project_qk(self, x: torch.Tensor, src: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                   groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """q from x [B, L, C], k from src [B, T, C]: projected, RMS-normed, RoPE'd (self-attention) -> [B, *, N, D].

        groups > 1 (self-attention, Ulysses): [G, B, L, N / G, D], head group g contiguous (fused.norm_rope)."""
        if self.ops.compiled and rope is not None and isinstance(self.norm_q, RMSNorm):
            return self.ops.norm_rope(self.q(x), self.k(src), self.norm_q.weight, self.norm_k.weight, self.eps,
                                      self.num_heads, *rope, groups)  # fused: no float32 temporaries in memory
        if groups > 1:
            return tuple(fused.head_groups(t, groups) for t in self.project_qk(x, src, rope))
        if self.ops.compiled and isinstance(self.norm_q, RMSNorm):  # cross-attention: norms only
            return (self.ops.norm_heads(self.q(x), self.norm_q.weight, self.eps, self.num_heads),
                    self.ops.norm_heads(self.k(src), self.norm_k.weight, self.eps, self.num_heads))
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(src)).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k


class WanAttentionBlock(nn.Module):
    """Self-attention, cross-attention to the text, and a GELU MLP, modulated by the timestep (adaLN)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm32(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))  # shift/scale/gate for attention and MLP
        self.eps = cfg.eps
        self.ops = FusedOps()

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor],
                attention_hook: Callable[[str, Callable[[], torch.Tensor]], torch.Tensor] | None = None,
                ) -> torch.Tensor:
        """x [B, L, C], e [B, 6, C] float32 timestep projection, context [B, T, C] -> [B, L, C].

        attention_hook(kind, compute), when given, decides whether each attention output is computed.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(1)  # each [B, C] fp32
        hook = attention_hook or (lambda kind, compute: compute())
        ops = self.ops
        y = hook("self", lambda: self.self_attn(ops.modulate(x, shift1, scale1, self.eps), rope=rope))
        if ops.compiled and not ops.fp8 and attention_hook is None and isinstance(self.norm3, nn.LayerNorm):
            # the residual and the cross-attention norm in one kernel (a cache may skip the norm's consumer)
            x, c = ops.gated_affine_norm(x, y, gate1, self.norm3.weight, self.norm3.bias, self.eps)
            del y
            y = self.cross_attn(c, context=context)
        else:
            x = ops.gated_residual(x, y, gate1)
            y = hook("cross", lambda: self.cross_attn(self.cross_norm(x), context=context))
        if ops.compiled:  # the residual add and the MLP's norm + modulation in one kernel
            x, h = ops.add_modulate(x, y, shift2, scale2, self.eps)
            del y
        else:  # eager: each full-size input freed once used (the norm's float32 temporaries are the peak)
            x = x + y
            del y
            h = ops.modulate(x, shift2, scale2, self.eps)
        h = ops.linear_gelu(h, self.ffn[0])  # rebinding h frees each input once used
        h = self.ffn[2](h)
        return ops.gated_residual(x, h, gate2)

    def cross_norm(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm3, nn.Identity):
            return x
        return self.ops.affine_norm(x, self.norm3.weight, self.norm3.bias, self.eps)


class WanHead(nn.Module):
    """Final adaLN modulation and projection back to patch pixels."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], e [B, C] float32 timestep embedding -> [B, L, out_dim * prod(patch)]."""
        shift, scale = (self.modulation + e[:, None]).unbind(1)
        return self.head((self.norm(x) * (1 + scale[:, None]) + shift[:, None]).type_as(x))


class WanDiT(nn.Module):
    """One Wan text-to-video DiT expert: latents [B, 16, F', H/8, W/8] + t [B] + text [B, T, 4096] -> velocity."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)

    def set_compiled(self, compile: bool) -> None:
        """Run the blocks' elementwise work (norms, modulation, RoPE, gated residuals) through torch.compile.

        A deployment setting: compilation happens on first use per shape (the denoiser's warm-up). With FP8
        GEMMs (fp8.quantize_blocks_fp8) the quantization of each GEMM input goes with it."""
        ops = FusedOps(compile, fp8=self.fp8_gemms)
        for block in self.blocks:
            block.ops = block.self_attn.ops = block.cross_attn.ops = ops
            for m in block.modules():
                if isinstance(m, Fp8Linear):
                    m.quantize = ops.quantize_rows

    @property
    def fp8_gemms(self) -> bool:
        """Whether the blocks' linears are FP8 (`--gemm fp8`, fp8.py)."""
        return len(self.blocks) > 0 and isinstance(self.blocks[0].ffn[0], Fp8Linear)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Padded T5 embeddings [B, T, text_dim] -> [B, T, C]; constant across steps, so computed once."""
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> (e [B, C], e6 [B, 6, C]), float32."""
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim).to(self.time_embedding[0].weight.dtype))
        return e.float(), self.time_projection(e).float().unflatten(1, (6, self.cfg.dim))

    def run_blocks(self, tokens: torch.Tensor, e6: torch.Tensor, ctx: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], attention_hook: AttentionHook | None = None,
                   between_blocks: Callable[[], None] | None = None) -> torch.Tensor:
        """The block stack: tokens [B, L, C], e6 [B, 6, C] float32, ctx [B, T, C] -> [B, L, C].

        `between_blocks()` runs before each block after the first (the engine's cancellation check raises there)."""
        for i, block in enumerate(self.blocks):
            if i > 0 and between_blocks is not None:
                between_blocks()
            hook = None if attention_hook is None else (lambda kind, fn, i=i: attention_hook(i, kind, fn))
            tokens = block(tokens, e6, ctx, rope, hook)
        return tokens

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_embedded: bool = False, hooks: ForwardHooks | None = None,
                parallel: ParallelState | None = None,
                between_blocks: Callable[[], None] | None = None) -> torch.Tensor:
        """x [B, 16, F', h, w], t [B], context [B, T, text_dim] (or [B, T, C] if already embedded).

        Returns the predicted flow (velocity) [B, out_dim, F', h, w] in x's dtype. `hooks`: this call's
        FlexCache hooks (None: compute everything). `parallel` (sequence parallel): the blocks run on this
        rank's shard of the tokens (self-attention must be a SequenceParallelAttention), the output is
        gathered back on every rank. `between_blocks`: see run_blocks; called len(blocks) - 1 times per forward,
        also when a cache's block hook replays the stack without running it.
        """
        pt, ph, pw = self.cfg.patch_size
        b, _, f, h, w = x.shape
        grid = (f // pt, h // ph, w // pw)
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # [B, L, C]
        ctx = context.to(dtype) if context_embedded else self.embed_text(context)
        e, e6 = self.embed_time(t)
        rope = rope_cos_sin(self.cfg.head_dim, grid, x.device)
        length = tokens.shape[1]
        if parallel is not None:
            tokens, rope = parallel.shard_tokens(tokens), pad_rope(*rope, parallel)
        attention_hook = None if hooks is None else hooks.attention
        if hooks is None or hooks.blocks is None:
            tokens = self.run_blocks(tokens, e6, ctx, rope, attention_hook, between_blocks)
        else:
            ran = []

            def run(tk, e6_, ctx_):
                ran.append(True)
                return self.run_blocks(tk, e6_, ctx_, rope, attention_hook, between_blocks)

            tokens = hooks.blocks(run, tokens, e, e6, ctx)
            if not ran and between_blocks is not None:  # a cache replayed the stack: the same checks all the same,
                for _ in range(len(self.blocks) - 1):  # as ranks that decide apart (CFG branches) check in lockstep
                    between_blocks()
        out = self.head(tokens, e)  # [B, L, out * pt*ph*pw]
        if parallel is not None:
            out = parallel.gather_tokens(out, length)
        return self.unpatchify(out, grid).to(x.dtype)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, out*pt*ph*pw] -> [B, out, F'*pt, h*ph, w*pw]."""
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)
