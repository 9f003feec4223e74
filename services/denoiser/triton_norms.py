"""Triton kernels of the DiT's norms, each one pass over memory: the q/k RMS norm (over all heads), with or
without RoPE (fused.rms_norm and fused.norm_rope), and the layer norms with their adaLN modulation or affine
weights, after a residual add where the block has one (fused.modulate, affine_norm, add_modulate,
gated_affine_norm).

Inductor compiles the q/k functions into a reduction that reads each row twice and a second kernel for the
other output (0.9 TB/s on an H100 at Wan-1.3B 480p, 0.3 TB/s at Wan-14B's width). Here one program reads BLOCK_T
whole rows once, takes their inverse RMS, and writes the normed, rotated rows in the layout attention reads:
2.0-2.3 TB/s on that card (docs/benchmarks.md). The rounding steps are the reference's (fused.rms_norm, then
fused.rope). Inductor's layer norms run near memory speed while dynamo keeps their shapes static, and at ~1.5-2.6
TB/s on that card once it has recompiled them with dynamic sizes (a second batch size, length or width); the
layer-norm kernel here keeps whole rows in registers (mean, then the centred variance), builds once per width,
and reaches 2.4-2.8 TB/s at any batch size and length.

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


# L only bounds masks: no variant per divisibility of it (a new resolution would otherwise build again).
@triton.jit(do_not_specialize=["L"])
def _layer_norm_kernel(X, Y, GATE, SHIFT, SCALE, Wt, Bs, S, H, L, C, x_b, x_l, y_b, y_l, gate_b, shift_b, scale_b,
                       eps, RESIDUAL: tl.constexpr, MODULATE: tl.constexpr, AFFINE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """ROWS rows of batch element b = program_id(1) of x [B, L, C] (strides x_b, x_l, 1), BLOCK_T at a time.

    RESIDUAL 1: s = x + y rounded to x's dtype; 2: s = x + y * gate[b] summed in float32; s is stored to S
    [B, L, C] and normed instead of x. The layer norm (float32, no affine) is followed by the affine weight / bias
    (AFFINE, [C] vectors in any float dtype, taken to float32) or the adaLN modulation z * (1 + scale[b]) +
    shift[b] (MODULATE; float32 [B, C], batch stride 0 for one row shared by the batch), loaded once per program;
    the result is rounded to H's dtype."""
    b = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    if RESIDUAL == 2:
        gate = tl.load(GATE + b * gate_b + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if MODULATE:
        shift = tl.load(SHIFT + b * shift_b + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        scale1 = 1.0 + tl.load(SCALE + b * scale_b + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if AFFINE:
        w = tl.load(Wt + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        bias = tl.load(Bs + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    for t in range(0, ROWS, BLOCK_T):
        l = (tl.program_id(0) * ROWS + t + tl.arange(0, BLOCK_T)).to(tl.int64)
        m = (l < L)[:, None] & cm[None, :]
        x = tl.load(X + b.to(tl.int64) * x_b + l[:, None] * x_l + c[None, :], mask=m, other=0.0)
        out = (b.to(tl.int64) * L + l)[:, None] * C + c[None, :]
        if RESIDUAL != 0:
            y = tl.load(Y + b.to(tl.int64) * y_b + l[:, None] * y_l + c[None, :], mask=m, other=0.0)
            if RESIDUAL == 1:
                x = (x.to(tl.float32) + y.to(tl.float32)).to(X.dtype.element_ty)
            else:
                x = (x.to(tl.float32) + y.to(tl.float32) * gate).to(X.dtype.element_ty)
            tl.store(S + out, x, mask=m)
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=1)[:, None] / C
        xc = tl.where(m, xf - mean, 0.0)
        z = xc * tl.rsqrt(tl.sum(xc * xc, axis=1)[:, None] / C + eps)
        if AFFINE:
            z = z * w + bias
        if MODULATE:
            z = z * scale1 + shift
        tl.store(H + out, z.to(H.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, int, int]:
    """t [B, L, C] with unit channel stride (else a contiguous copy) -> (t, batch stride, row stride)."""
    if tuple(t.shape) != shape:
        raise ValueError(f"layer_norm: {name} must be {list(shape)}; got {list(t.shape)}")
    if t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) < t.shape[2]):
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def _vector(v: torch.Tensor | None, name: str, c: int, device: torch.device,
            batch: int | None = None) -> tuple[torch.Tensor | None, int]:
    """A [C] float vector (affine weights, any float dtype), or with `batch` a float32 [batch, C] or [1, C] one
    (the adaLN shift / scale / gate, as the DiT's float32 modulation), unit channel stride -> (v, batch stride)."""
    if v is None:
        return None, 0
    if batch is None:
        ok, want = v.is_floating_point() and tuple(v.shape) == (c,), f"a floating [{c}] vector"
    else:
        ok, want = v.dtype == torch.float32 and v.shape in ((batch, c), (1, c)), f"float32 [{batch}, {c}] or [1, {c}]"
    if not ok or v.device != device:
        raise ValueError(f"layer_norm: {name} must be {want} on {device}; got {v.dtype} {list(v.shape)} on "
                         f"{v.device}")
    if v.stride(-1) != 1:
        v = v.contiguous()
    return v, (v.stride(0) if v.dim() == 2 and v.shape[0] > 1 else 0)


def layer_norm(x: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
               shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Layer norm over C of x [B, L, C] in float32, returned in x's dtype, in one pass over memory:

    - with `shift` / `scale` float32 [B, C] (or [1, C]): adaLN, norm(x) * (1 + scale) + shift (fused.modulate);
    - with `weight` / `bias` [C], any float dtype, taken to float32: the affine layer norm (fused.affine_norm);
    - with `residual` y [B, L, C]: first s = x + y (in x's dtype), or with `gate` float32 [B, C] (or [1, C])
      s = x + y * gate summed in float32 (fused.gated_residual); returns (s, norm(s)) (fused.add_modulate's two
      outputs).

    Raises ValueError for arguments it cannot compute from."""
    b, length, c = x.shape
    if (shift is None) != (scale is None) or (weight is None) != (bias is None) or (
            shift is not None and weight is not None):
        raise ValueError("layer_norm: give shift and scale (adaLN), or weight and bias (affine), or neither")
    if gate is not None and residual is None:
        raise ValueError("layer_norm: a gate needs a residual")
    x, x_b, x_l = _rows(x, "x", (b, length, c))
    y, y_b, y_l = (x, 0, 0) if residual is None else _rows(residual, "residual", (b, length, c))
    if residual is not None and (residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"layer_norm: residual must be {x.dtype} on {x.device}; got {residual.dtype} on "
                         f"{residual.device}")
    gate, gate_b = _vector(gate, "gate", c, x.device, b)
    shift, shift_b = _vector(shift, "shift", c, x.device, b)
    scale, scale_b = _vector(scale, "scale", c, x.device, b)
    weight, _ = _vector(weight, "weight", c, x.device)
    bias, _ = _vector(bias, "bias", c, x.device)
    h = torch.empty((b, length, c), dtype=x.dtype, device=x.device)
    s = torch.empty_like(h) if residual is not None else h
    if h.numel() == 0:
        return h if residual is None else (s, h)
    block_c = triton.next_power_of_2(c)
    block_t, tiles, warps = layer_norm_config(block_c)
    rows = tiles * block_t  # per program, which loads the vectors once
    unused = x  # pointer arguments a variant does not read
    _layer_norm_kernel[(triton.cdiv(length, rows), b)](
        x, y, unused if gate is None else gate, unused if shift is None else shift,
        unused if scale is None else scale, unused if weight is None else weight, unused if bias is None else bias,
        s, h, length, c, x_b, x_l, y_b, y_l, gate_b, shift_b, scale_b, eps,
        RESIDUAL=0 if residual is None else (2 if gate is not None else 1), MODULATE=shift is not None,
        AFFINE=weight is not None, ROWS=rows, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=warps)
    return h if residual is None else (s, h)


def layer_norm_config(block_c: int) -> tuple[int, int, int]:
    """(rows per tile, tiles per program, warps) of _layer_norm_kernel for rows padded to block_c channels, as
    chosen by a sweep on an H100 at Wan-1.3B and 14B widths (docs/benchmarks.md)."""
    return 4, 2, 4 if block_c <= 2048 else 8
