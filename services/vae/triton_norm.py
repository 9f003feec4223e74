"""The Triton kernel of fused.norm_silu_conv: silu(x / max(||x||_channels, 1e-12) * scale * gamma) into a view.

Imported only when the fused path runs (CUDA), or by its tests under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .model import dense_layout


# Triton specialises sizes of 1 and divisibilities by 16 (which give vectorized loads: 2.55 s against 3.03 s for
# a 480p decode without them), so it builds a few variants per resolution: the VAE service's warm-up decodes two
# latent frames at the model's default size on CUDA, which builds those of the usual request.
@triton.jit
def _norm_silu_kernel(X, G, O, C, T, HW, W, x_sb, x_sc, x_st, x_sp, o_sb, o_sc, o_st, o_sh, o_sw, scale,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: BLOCK_P positions of one frame (b, t) of x [B, C, T, H, W], every channel. x is dense in
    either layout: position p = h * W + w at p * x_sp (1 in NCDHW, C in channels-last); strides in elements."""
    bt = tl.program_id(1).to(tl.int64)
    b = bt // T
    t = bt % T
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_frame = p < HW
    xb = X + b * x_sb + t * x_st  # x[b, 0, t, 0, 0] (64-bit offsets; the strides come from the host)
    x_pos = p[None, :].to(tl.int64) * x_sp
    ssq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        m = (cs < C)[:, None] & in_frame[None, :]
        v = tl.load(xb + cs[:, None].to(tl.int64) * x_sc + x_pos, mask=m, other=0.0).to(tl.float32)
        ssq += tl.sum(v * v, axis=0)
    inv = scale / tl.maximum(tl.sqrt(ssq), 1e-12)  # F.normalize's eps
    ob = O + b * o_sb + t * o_st + (p // W).to(tl.int64) * o_sh + (p % W).to(tl.int64) * o_sw
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        m = (cs < C)[:, None] & in_frame[None, :]
        v = tl.load(xb + cs[:, None].to(tl.int64) * x_sc + x_pos, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + cs, mask=cs < C, other=0.0).to(tl.float32)
        y = v * inv[None, :] * g[:, None]
        y = y / (1.0 + tl.exp(-y))
        tl.store(ob[None, :] + cs[:, None].to(tl.int64) * o_sc, y.to(O.dtype.element_ty), mask=m)


def norm_silu_into(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor,
                   block_p: int = 128, block_c: int = 32) -> None:
    """out[...] = silu(rms_norm(x) * gamma): x [B, C, T, H, W] contiguous (NCDHW or channels-last 3D), gamma
    [C], out any view of x's shape (the interior of a padded buffer)."""
    b, c, t, h, w = x.shape
    if dense_layout(x) is None or out.shape != x.shape or gamma.shape != (c,):
        raise ValueError(f"norm_silu_into: x [B, C, T, H, W] contiguous (NCDHW or channels-last), out of its "
                         f"shape, gamma [C]; got {tuple(x.shape)} {x.stride()}, {tuple(out.shape)}, "
                         f"{tuple(gamma.shape)}")
    if x.numel() == 0:
        return
    if dense_layout(x) is torch.contiguous_format:
        x_st, x_sp = h * w, 1
    else:
        x_st, x_sp = h * w * c, c
        block_c, block_p = 64, 64  # channels are the contiguous dim: wider along them
    grid = (triton.cdiv(h * w, block_p), b * t)
    _norm_silu_kernel[grid](x, gamma, out, c, t, h * w, w, x.stride(0), x.stride(1), x_st, x_sp, out.stride(0),
                            out.stride(1), out.stride(2), out.stride(3), out.stride(4), float(scale),
                            BLOCK_C=block_c, BLOCK_P=block_p)
