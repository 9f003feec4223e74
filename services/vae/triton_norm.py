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
                   block_p: int | None = None, block_c: int | None = None) -> None:
    """out[...] = silu(rms_norm(x) * gamma): x [B, C, T, H, W] dense (NCDHW or channels-last 3D), gamma [C], out
    any view of x's shape (the interior of a padded buffer). Tiles per step: block_c channels x block_p positions,
    by default 32 x 128 for NCDHW and 64 x 64 for channels-last (where the channels are the contiguous dim)."""
    b, c, t, h, w = x.shape
    layout = dense_layout(x)
    if layout is None or out.shape != x.shape or gamma.shape != (c,):
        raise ValueError(f"norm_silu_into: x [B, C, T, H, W] contiguous (NCDHW or channels-last), out of its "
                         f"shape, gamma [C]; got {tuple(x.shape)} {x.stride()}, {tuple(out.shape)}, "
                         f"{tuple(gamma.shape)}")
    if x.numel() == 0:
        return
    if layout is torch.contiguous_format:
        x_st, x_sp, default = h * w, 1, (128, 32)
    else:
        x_st, x_sp, default = h * w * c, c, (64, 64)
    block_p, block_c = block_p or default[0], block_c or default[1]
    grid = (triton.cdiv(h * w, block_p), b * t)
    _norm_silu_kernel[grid](x, gamma, out, c, t, h * w, w, x.stride(0), x.stride(1), x_st, x_sp, out.stride(0),
                            out.stride(1), out.stride(2), out.stride(3), out.stride(4), float(scale),
                            BLOCK_C=block_c, BLOCK_P=block_p)
