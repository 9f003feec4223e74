"""Triton kernel of the DiT's q/k RMS norm (over all heads), with or without RoPE: fused.rms_norm and
fused.norm_rope in one pass over memory.

Inductor compiles those two functions into a reduction that reads each row twice and a second kernel for the
other output (0.9 TB/s on an H100 at Wan-1.3B 480p, 0.3 TB/s at Wan-14B's width). Here one program reads BLOCK_T
whole rows once, takes their inverse RMS, and writes the normed, rotated rows in the layout attention reads:
2.0-2.3 TB/s on that card (docs/benchmarks.md). The rounding steps are the reference's (fused.rms_norm, then
fused.rope).

Used by FusedOps on CUDA when compiled (the deployment default), or by its tests under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# rows and L only bound masks and index the RoPE table: no variant per divisibility of them (a new resolution
# would otherwise build again); the strides and o_group stay specialised, which keeps the loads and stores wide.
@triton.jit(do_not_specialize=["rows", "L"])
def _rms_rope_kernel(X, Wt, COS, SIN, O, rows, L, N, x_row, cos_row, group_n, o_group, eps,
                     ROPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Rows r = b * L + l of x [rows, N * D] (row stride x_row, unit channel stride), as [BLOCK_T, heads, D] tiles.

    out: head h of row r at O + g * o_group + (r * group_n + h - g * group_n) * D with g = h // group_n (heads
    in groups of group_n; one group: [rows, N, D] dense, several: Ulysses' head-group-major layout). RoPE rotates
    channel pairs (2i, 2i + 1) of every head by cos / sin[l, i] (tables [L, D / 2], row stride cos_row)."""
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    hd = h[:, None] * D + d[None, :]  # [BLOCK_N, D] channel index
    m = (r < rows)[:, None, None] & (h < N)[None, :, None]
    x = tl.load(X + r.to(tl.int64)[:, None, None] * x_row + hd[None, :, :], mask=m, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / (N * D) + eps)[:, None, None]
    w = tl.load(Wt + hd, mask=(h < N)[:, None], other=0.0).to(tl.float32)[None, :, :]
    # as the reference: normalised in float32, rounded to x's dtype, times the gain, rounded to out's dtype
    z = ((x * inv).to(X.dtype.element_ty).to(tl.float32) * w).to(O.dtype.element_ty).to(tl.float32)
    if ROPE:
        z1, z2 = tl.split(tl.reshape(z, (BLOCK_T, BLOCK_N, D // 2, 2)))  # even, odd channels of each pair
        i = tl.arange(0, D // 2)
        t = (r % L).to(tl.int64)[:, None] * cos_row + i[None, :]
        tm = (r < rows)[:, None]
        cs = tl.load(COS + t, mask=tm, other=0.0)[:, None, :]  # one row of the table for all heads
        sn = tl.load(SIN + t, mask=tm, other=0.0)[:, None, :]
        z = tl.reshape(tl.join(z1 * cs - z2 * sn, z1 * sn + z2 * cs), (BLOCK_T, BLOCK_N, D))
    g = h // group_n
    dst = (g.to(tl.int64) * o_group)[None, :, None] + (r.to(tl.int64)[:, None] * group_n + (h - g * group_n)[None, :]
                                                         )[:, :, None] * D + d[None, None, :]
    tl.store(O + dst, z.to(O.dtype.element_ty), mask=m)


def rms_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None, groups: int = 1) -> torch.Tensor:
    """RMS norm of x [B, L, C] over C with gain `weight` [C], then (if `rope`: cos / sin [L, 1, D/2] float32)
    RoPE per head -> [B, L, N, D], or [G, B, L, N / G, D] for `groups` > 1 (head group g contiguous).

    x is read in place when its rows have one stride and its channels unit stride (a column slice of a fused
    projection, say), else from a contiguous copy. Same values as fused.rope(fused.rms_norm(...)) (and
    fused.head_groups). Raises ValueError for arguments it cannot compute from."""
    b, length, c = x.shape
    if weight.shape != (c,) or weight.device != x.device:
        raise ValueError(f"rms_rope: weight must be [C] = [{c}] on {x.device}; got {tuple(weight.shape)} on "
                         f"{weight.device}")
    if c % heads or heads % groups:
        raise ValueError(f"rms_rope: {heads} heads must divide C = {c}, and {groups} groups the heads")
    d = c // heads
    if d < 2 or d & (d - 1):
        raise ValueError(f"rms_rope: the head dim must be a power of 2 (>= 2); got C = {c} over {heads} heads")
    if length == 1:
        x_row = x.stride(0)
    elif b == 1 or x.stride(0) == length * x.stride(1):
        x_row = x.stride(1)
    else:
        x, x_row = x.contiguous(), c
    if x.stride(2) != 1:
        x, x_row = x.contiguous(), c
    weight = weight.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = x.new_empty((groups, b, length, heads // groups, d) if groups > 1 else (b, length, heads, d),
                      dtype=out_dtype)
    rows = b * length
    if rows == 0:
        return out
    if rope is None:
        cos = sin = out  # not read
        cos_row = 0
    else:
        cos, sin = (t.reshape(t.shape[0], -1) for t in rope)
        if (cos.shape != (length, d // 2) or sin.shape != cos.shape or cos.stride(1) != 1
                or sin.stride() != cos.stride() or cos.device != x.device or sin.device != x.device
                or cos.dtype != torch.float32 or sin.dtype != torch.float32):
            raise ValueError(f"rms_rope: RoPE tables must be float32 [L, 1, D/2] = [{length}, 1, {d // 2}] on "
                             f"{x.device}, with the same unit-last strides; got {tuple(rope[0].shape)} "
                             f"{rope[0].dtype} and {tuple(rope[1].shape)} {rope[1].dtype}")
        cos_row = cos.stride(0)
    block_n = triton.next_power_of_2(heads)
    block_t = max(1, min(16, 4096 // (block_n * d)))
    _rms_rope_kernel[(triton.cdiv(rows, block_t),)](
        x, weight, cos, sin, out, rows, length, heads, x_row, cos_row, heads // groups,
        rows * (c // groups), eps, ROPE=rope is not None, BLOCK_T=block_t, BLOCK_N=block_n, D=d,
        num_warps=4 if block_n * d <= 2048 else 8)
    return out
