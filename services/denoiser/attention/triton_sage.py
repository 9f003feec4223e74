"""Triton kernels of our quantized attention: INT8 quantization pre-pass, block-sparse plan and attention forward.

The maths is SageAttention's (INT8 Q.K^T with per-block scales after subtracting K's mean over tokens, which
leaves every softmax row unchanged; then P.V in FP16, or in FP8 with per-channel V scales), our INT8 P.V (below) and
SpargeAttn's block skipping: the same forward walks either every key block or a per-query-block list of kept
key blocks. Written for this project; imported only when a `sage` / `sparge` backend is built.

INT8 P.V: each row of a key block's probabilities is scaled by its own maximum, exp2(s - rowmax of the block),
so the largest is exactly 1 -> 127, and rounded to int8; V is int8 per channel. The row's factor
exp2(block rowmax - running max) multiplies the int32 product and the row sum, which is taken over the rounded
values, so each output row stays a weighted mean of V rows. On random inputs its rounding costs ~1.5e-2
relative error where FP8 e4m3 (3 mantissa bits for both P and V) costs ~3.7e-2 (float64 emulation; with the INT8
Q.K, measured: 2.2e-2 against 4.0e-2), at the same tensor-core rate.
FP8 P.V: each key block's product starts from a zeroed accumulator and is added to the float32 one, because
Hopper's FP8 MMA accumulates with fewer mantissa bits than float32 (a whole row accumulated inside the MMA cost
1.4e-1 relative error in a Wan DiT forward, against 9.6e-3 this way).

Layouts: q, k, v, out [B, L, N, D] (any strides, last dim contiguous); quantized q/k [B*N, L_pad, D] int8 with
one float32 scale per block of rows; v as FP16 [B*N, L_pad, D], or 8-bit (FP8 / INT8) transposed
[B*N, D, L_pad] so that P.V reads it K-major on Hopper. Padding rows are zero; scores of padded keys are masked
in the last block only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# In the kernels: 448 = largest finite float8 e4m3fn (8.807 = log2(448)); 0x4B400000 = bits of 12582912.0 =
# 1.5 * 2**23, so (int32 i + 0x4B400000) reinterpreted as float32 is exactly 12582912 + i for |i| < 2**22, and
# the low byte of the bits of 12582912 + x (float32 x in [0, 255]) is x rounded to the nearest integer.
PV_MODES = ("fp16", "fp8", "int8")  # precision of P.V; the kernels take its index (PV constexpr: 0, 1, 2)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and pipelining of the attention forward (the quantization blocks follow the tiles)."""

    block_m: int = 128  # query rows per program; Q scale granularity; sparge query-block size
    block_n: int = 64  # keys per step; K scale granularity; sparge key-block size
    num_warps: int = 4
    num_stages: int = 3


# Tuned on an H200 (bench/attention.py --sweep, docs/benchmarks.md): one warpgroup per program and tiles small
# enough that two programs share a multiprocessor (one's softmax overlaps the other's MMAs) win. Other GPUs take
# the same as a start; the CPU interpreter (tests) a small one.
HOPPER_CONFIG = {"fp16": KernelConfig(128, 64, 4, 3), "fp8": KernelConfig(64, 128, 4, 3),
                 "int8": KernelConfig(64, 128, 4, 3)}  # key: P.V precision
GPU_CONFIG = KernelConfig(128, 64, 4, 3)
CPU_CONFIG = KernelConfig(64, 64, 4, 1)


def pv_index(pv: str) -> int:
    if pv not in PV_MODES:
        raise ValueError(f"pv must be one of {', '.join(PV_MODES)}, got {pv!r}")
    return PV_MODES.index(pv)


def default_config(device: torch.device, pv: str) -> KernelConfig:
    if device.type != "cuda":
        return CPU_CONFIG
    if torch.cuda.get_device_capability(device)[0] == 9:
        return HOPPER_CONFIG[pv]
    return GPU_CONFIG


@triton.jit
def _quant_int8_kernel(X, Xq, Xs, Mean, Pool, Sim,
                       stride_xb, stride_xl, stride_xh, L, L_pad, H, n_blocks, scale_mul,
                       D: tl.constexpr, BLOCK: tl.constexpr, SUB_MEAN: tl.constexpr, POOL: tl.constexpr):
    """One block of BLOCK rows of one (batch, head): int8 values, one scale; optionally its mean and self-similarity."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    valid = rows[:, None] < L
    x = tl.load(X + b.to(tl.int64) * stride_xb + h * stride_xh + rows[:, None].to(tl.int64) * stride_xl + cols[None, :],
                mask=valid, other=0.0).to(tl.float32)
    if SUB_MEAN:  # K smoothing: subtract the per-channel mean over all tokens
        x = tl.where(valid, x - tl.load(Mean + bh * D + cols)[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12)
    xq = x * (127.0 / amax)
    xq = tl.where(xq >= 0, xq + 0.5, xq - 0.5).to(tl.int8)  # round half away from zero
    tl.store(Xq + bh.to(tl.int64) * L_pad * D + rows[:, None].to(tl.int64) * D + cols[None, :], xq)
    tl.store(Xs + bh * n_blocks + blk, amax / 127.0 * scale_mul)
    if POOL:  # SpargeAttn's block summary: mean token, and mean pairwise cosine similarity = |mean unit row|^2
        n_valid = tl.minimum(L - blk * BLOCK, BLOCK).to(tl.float32)
        tl.store(Pool + (bh * n_blocks + blk) * D + cols, tl.sum(x, 0) / n_valid)
        norm = tl.sqrt(tl.sum(x * x, 1))
        unit = x / tl.maximum(norm, 1e-12)[:, None]
        mean_unit = tl.sum(unit, 0) / n_valid
        tl.store(Sim + bh * n_blocks + blk, tl.sum(mean_unit * mean_unit, 0))


@triton.jit
def _quant_v_kernel(V, Vq, Vs, stride_vb, stride_vl, stride_vh, L, L_pad, H,
                    D: tl.constexpr, BLOCK: tl.constexpr, PV: tl.constexpr):
    """V block [BLOCK, D], zero padded: FP8 e4m3 scaled per channel to +-448 or INT8 to +-127, stored
    transposed [B*N, D, L_pad]; or FP16 [B*N, L_pad, D]."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h * stride_vh + rows[:, None].to(tl.int64) * stride_vl + cols[None, :],
                mask=rows[:, None] < L, other=0.0).to(tl.float32)
    if PV != 0:
        amax = tl.load(Vs + bh * D + cols)  # the channel's max |v|
        if PV == 1:
            vq = (v * (448.0 / amax)[None, :]).to(tl.float8e4nv)
        else:
            vq = v * (127.0 / amax)[None, :]
            vq = tl.where(vq >= 0, vq + 0.5, vq - 0.5).to(tl.int8)
        tl.store(Vq + bh.to(tl.int64) * D * L_pad + cols[None, :].to(tl.int64) * L_pad + rows[:, None], vq)
    else:
        tl.store(Vq + bh.to(tl.int64) * L_pad * D + rows[:, None].to(tl.int64) * D + cols[None, :], v.to(tl.float16))


@triton.jit
def _qk(q, qs, K8, KS, bh, j, Lk_pad, offs_n, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores of key block j: (int32 Q8.K8^T [BLOCK_M, BLOCK_N], its scale to log2 units)."""
    k = tl.load(K8 + bh.to(tl.int64) * Lk_pad * D + (j * BLOCK_N + offs_n)[:, None].to(tl.int64) * D + offs_d[None, :])
    s_int = tl.dot(q, tl.trans(k), out_dtype=tl.int32)  # |s| < 2**22 for D <= 128
    return s_int, qs * tl.load(KS + bh * (Lk_pad // BLOCK_N) + j)


@triton.jit
def _softmax_pv(acc, l_i, m_i, s_int, sc, V, kv_base, j, Lk, Lk_pad, pv_thr, offs_n, offs_d,
                D: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr, PV_SKIP: tl.constexpr,
                MASKED: tl.constexpr):
    """Online-softmax update of one query tile with key block j's scores (log2 units once scaled by sc)."""
    start = j * BLOCK_N
    f = (s_int + 0x4B400000).to(tl.float32, bitcast=True)  # = 12582912 + s exactly: int->float without cvt
    if MASKED:
        f = tl.where((start + offs_n)[None, :] < Lk, f, float("-inf"))
    f_max = tl.max(f, 1)
    m_blk = (f_max - 12582912.0) * sc
    m_new = tl.maximum(m_i, m_blk)
    if PV == 1:  # P scaled by 448 (exp2 offset log2(448)) to use FP8's range; l carries the same factor
        bias = m_new - 8.807354922057604 + 12582912.0 * sc
    else:
        bias = m_new + 12582912.0 * sc
    if PV_SKIP:  # SpargeAttn's second stage: skip P.V when the whole block is negligible in every row
        keep = tl.max(m_blk - m_new, 0) >= -pv_thr
    else:
        keep = True
    if keep:
        if PV == 2:  # each row relative to its own maximum in this block, exactly: the largest is exp2(0) = 1
            p = tl.math.exp2((f - f_max[:, None]) * sc)  # (f - f_max is exact; a rounded bias could give 1 + e)
        else:
            p = tl.math.exp2(f * sc - bias[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        if PV == 0:  # FP16 [L_pad, D], zero padded
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_base + (start + offs_n)[:, None].to(tl.int64) * D + offs_d[None, :])
            acc = tl.dot(p.to(tl.float16), v, acc * alpha[:, None])
        else:  # V^T stored [D, L_pad]: the [BLOCK_N, D] tile is contiguous along keys (K-major)
            v = tl.load(V + kv_base + offs_d[None, :].to(tl.int64) * Lk_pad + (start + offs_n)[:, None])
            if PV == 1:  # each block's product from a zeroed accumulator, added in float32: Hopper's FP8 MMA
                l_i = l_i * alpha + tl.sum(p, 1)  # accumulates with fewer mantissa bits than float32
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
            else:  # 127 p rounded by the magic constant: its bits' low byte is the int8
                tl.static_assert(BLOCK_N <= 256, "INT8 P.V: 127 * 127 * BLOCK_N must stay below 2**22")
                p8 = (p * 127.0 + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
                beta = tl.math.exp2(m_blk - m_new)
                # int32 products (< 2**22) as 12582912 + x: the row sums from a ones tile, exact and off the ALUs
                ones = tl.full([BLOCK_N, 16], 1, tl.int8)
                row = tl.max(tl.dot(p8, ones, out_dtype=tl.int32), 1)
                l_i = l_i * alpha + ((row + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * beta
                pv = (tl.dot(p8, v, out_dtype=tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)
                acc = acc * alpha[:, None] + (pv * beta[:, None] - (12582912.0 * beta)[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q8, K8, V, QS, KS, VS, LUT, NSEL, O, LSE,
                     stride_ob, stride_ol, stride_oh,
                     Lq, Lk, H, n_q_blocks, n_k_blocks, Lq_pad, Lk_pad, pv_thr,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr,
                     SPARSE: tl.constexpr, PV_SKIP: tl.constexpr, HAS_TAIL: tl.constexpr, WRITE_LSE: tl.constexpr):
    """One query tile [BLOCK_M, D] of one (batch, head) against all key blocks, or the kept ones (SPARSE)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q8 + bh.to(tl.int64) * Lq_pad * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :])
    qs = tl.load(QS + bh * n_q_blocks + pid_m)
    kv_base = bh.to(tl.int64) * D * Lk_pad  # V: [D, Lk_pad] (8-bit) or [Lk_pad, D] (FP16) per (batch, head)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    row = bh * n_q_blocks + pid_m
    if SPARSE:  # kept key blocks in ascending order: a partial last block can only come last
        n_sel = tl.load(NSEL + row)
        lut = LUT + row.to(tl.int64) * n_k_blocks
        do_tail = tl.load(lut + n_sel - 1) == n_k_blocks - 1
        n_loop = n_sel - do_tail.to(tl.int32)
    else:
        do_tail = True
        n_loop = n_k_blocks - 1
    for it in range(0, n_loop):
        if SPARSE:
            j = tl.load(lut + it)
        else:
            j = it
        s_int, sc = _qk(q, qs, K8, KS, bh, j, Lk_pad, offs_n, offs_d, D, BLOCK_N)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s_int, sc, V, kv_base, j, Lk, Lk_pad, pv_thr, offs_n, offs_d,
                                    D, BLOCK_N, PV, PV_SKIP, False)
    if do_tail:
        s_int, sc = _qk(q, qs, K8, KS, bh, n_k_blocks - 1, Lk_pad, offs_n, offs_d, D, BLOCK_N)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s_int, sc, V, kv_base, n_k_blocks - 1, Lk, Lk_pad, pv_thr,
                                    offs_n, offs_d, D, BLOCK_N, PV, PV_SKIP, HAS_TAIL)
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    if WRITE_LSE:  # natural log-sum-exp of the (smoothed-K) scores; P carried 448 = 2**8.807 (FP8), 127 (INT8)
        lse2 = m_i + tl.math.log2(l_i)
        if PV == 1:
            lse2 = lse2 - 8.807354922057604
        elif PV == 2:
            lse2 = lse2 - 6.988684686772166
        tl.store(LSE + bh.to(tl.int64) * Lq_pad + offs_m, lse2 * 0.6931471805599453)
    if PV == 1:
        out = out * (tl.load(VS + bh * D + offs_d) / 448.0)[None, :]
    elif PV == 2:
        out = out * (tl.load(VS + bh * D + offs_d) / 127.0)[None, :]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Lq)


@triton.jit
def _block_plan_kernel(S, QSIM, KSIM, LUT, NSEL, n_q_blocks, n_k_blocks, sim_thr, n_top, cdf_thr,
                       TOPK: tl.constexpr, NK_POW2: tl.constexpr):
    """SpargeAttn's block selection for one query block, straight to the kernel's key-block list.

    Row of pooled scores S [n_k_blocks] -> softmax over the self-similar key blocks -> keep the n_top largest
    (TOPK) or the smallest prefix by decreasing probability reaching cdf_thr, plus every key block that is not
    self-similar (all of them when the query block is not). The cut value is found by bisection on the float
    bits of the probabilities (non-negative, so their int32 bits sort like them), which replaces a sort.
    Writes the kept indices ascending then the dropped ones + n_k_blocks ascending (as sparge.block_lut) and
    their count."""
    row = tl.program_id(0)
    bh = row // n_q_blocks
    idx = tl.arange(0, NK_POW2)
    inside = idx < n_k_blocks
    k_ok = (tl.load(KSIM + bh * n_k_blocks + idx, mask=inside, other=-2.0) > sim_thr) & inside
    s = tl.where(k_ok, tl.load(S + row.to(tl.int64) * n_k_blocks + idx, mask=inside, other=0.0), float("-inf"))
    e = tl.where(k_ok, tl.exp(s - tl.max(s, 0)), 0.0)
    total = tl.sum(e, 0)
    p = e / tl.where(total > 0, total, 1.0)
    bits = p.to(tl.int32, bitcast=True)
    if TOPK:
        need = n_top
    # invariant: enough at or above lo (unless even the whole mass misses cdf_thr), not enough at or above hi
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + 0x7F800000
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        above = (bits >= mid) & inside
        if TOPK:
            enough = tl.sum(above.to(tl.int32), 0) >= n_top
        else:
            enough = tl.sum(tl.where(above, p, 0.0), 0) >= cdf_thr
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    greater = (bits > lo) & inside
    equal = (bits == lo) & inside
    n_equal = tl.sum(equal.to(tl.int32), 0)
    if not TOPK:  # entries equal to the cut value needed to reach the mass (1 unless there are ties)
        rest = cdf_thr - tl.sum(tl.where(greater, p, 0.0), 0)
        v = lo.to(tl.float32, bitcast=True)
        need = tl.sum(greater.to(tl.int32), 0) + tl.minimum(
            tl.maximum(tl.ceil(rest / tl.where(v > 0, v, 1.0)).to(tl.int32), 1), n_equal)
        need = tl.where(v > 0, need, n_k_blocks)  # lo stayed 0: rounding kept the mass below cdf_thr, keep all
    ties = need - tl.sum(greater.to(tl.int32), 0)
    keep = greater | (equal & (tl.cumsum(equal.to(tl.int32), 0) <= ties))
    keep = keep | (inside & ~k_ok)
    if tl.load(QSIM + row) <= sim_thr:
        keep = inside
    n_keep = tl.sum(keep.to(tl.int32), 0)
    pos = tl.where(keep, tl.cumsum(keep.to(tl.int32), 0) - 1,
                   n_keep + tl.cumsum((inside & ~keep).to(tl.int32), 0) - 1)
    tl.store(LUT + row.to(tl.int64) * n_k_blocks + pos, tl.where(keep, idx, idx + n_k_blocks), mask=inside)
    tl.store(NSEL + row, n_keep)


def block_plan(quant: Quantized, topk: float | None, cdf_threshold: float | None,
               sim_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-sparse plan of a pooled quantization pass: (lut int32 [B*N*nq, nk], n_sel int32 [B*N*nq]).

    One matmul for the pooled scores and one kernel for everything else; sparge.block_mask + block_lut are the
    same selection in plain torch (the tests' reference)."""
    bh, nq, d = quant.q_pool.shape
    nk = quant.k_pool.shape[1]
    scores = torch.bmm(quant.q_pool, quant.k_pool.transpose(1, 2)).mul_(d ** -0.5)
    lut = torch.empty(bh * nq, nk, dtype=torch.int32, device=scores.device)
    n_sel = torch.empty(bh * nq, dtype=torch.int32, device=scores.device)
    n_top = min(nk, max(1, int(topk * nk))) if topk is not None else 0
    _block_plan_kernel[(bh * nq,)](scores, quant.q_sim, quant.k_sim, lut, n_sel, nq, nk, float(sim_threshold),
                                   n_top, float(cdf_threshold or 0.0), TOPK=topk is not None,
                                   NK_POW2=triton.next_power_of_2(nk), num_warps=4)
    return lut, n_sel


@dataclass
class Quantized:
    """q, k and v quantized for one attention call, with SpargeAttn's block summaries if asked."""

    q8: torch.Tensor  # [B*N, Lq_pad, D] int8
    qs: torch.Tensor  # [B*N, n_q_blocks] float32, includes softmax scale * log2(e)
    k8: torch.Tensor  # [B*N, Lk_pad, D] int8 (K minus its mean over tokens)
    ks: torch.Tensor  # [B*N, n_k_blocks] float32
    v: torch.Tensor  # FP8 / INT8 [B*N, D, Lk_pad], or FP16 [B*N, Lk_pad, D]
    vs: torch.Tensor | None  # [B*N, D] float32 channel max |v| (8-bit P.V only)
    q_pool: torch.Tensor | None = None  # [B*N, n_q_blocks, D] float32 block means
    q_sim: torch.Tensor | None = None  # [B*N, n_q_blocks] mean pairwise cosine similarity inside each block
    k_pool: torch.Tensor | None = None
    k_sim: torch.Tensor | None = None
    k_mean: torch.Tensor | None = None  # [B*N, D] float32, subtracted from k before quantization


def _ceil_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: KernelConfig, pv: str,
             pool: bool = False) -> Quantized:
    """Quantize q, k [B, L, N, D] to int8 per tile, and v for the chosen P.V precision."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bm, bn = cfg.block_m, cfg.block_n
    lq_pad, lk_pad = _ceil_to(lq, bm), _ceil_to(lk, bn)
    nq, nk = lq_pad // bm, lk_pad // bn
    dev = q.device
    q8 = torch.empty(b * h, lq_pad, d, dtype=torch.int8, device=dev)
    k8 = torch.empty(b * h, lk_pad, d, dtype=torch.int8, device=dev)
    qs = torch.empty(b * h, nq, dtype=torch.float32, device=dev)
    ks = torch.empty(b * h, nk, dtype=torch.float32, device=dev)
    k_mean = k.mean(dim=1, dtype=torch.float32).reshape(b * h, d).contiguous()
    out = Quantized(q8, qs, k8, ks, v, None, k_mean=k_mean)
    if pool:
        out.q_pool = torch.empty(b * h, nq, d, dtype=torch.float32, device=dev)
        out.k_pool = torch.empty(b * h, nk, d, dtype=torch.float32, device=dev)
        out.q_sim = torch.empty(b * h, nq, dtype=torch.float32, device=dev)
        out.k_sim = torch.empty(b * h, nk, dtype=torch.float32, device=dev)
    sm_scale = d ** -0.5
    q_extra = (out.q_pool, out.q_sim) if pool else (qs, qs)  # unused pointers when not pooling
    k_extra = (out.k_pool, out.k_sim) if pool else (ks, ks)
    _quant_int8_kernel[(nq, b * h)](q, q8, qs, k_mean, *q_extra, q.stride(0), q.stride(1), q.stride(2),
                                    lq, lq_pad, h, nq, sm_scale * LOG2E, D=d, BLOCK=bm, SUB_MEAN=False, POOL=pool)
    _quant_int8_kernel[(nk, b * h)](k, k8, ks, k_mean, *k_extra, k.stride(0), k.stride(1), k.stride(2),
                                    lk, lk_pad, h, nk, 1.0, D=d, BLOCK=bn, SUB_MEAN=True, POOL=pool)
    mode = pv_index(pv)
    if pv != "fp16":
        vs = torch.linalg.vector_norm(v, ord=math.inf, dim=1, dtype=torch.float32).reshape(b * h, d)
        out.vs = vs.clamp_min_(1e-12).contiguous()
        out.v = torch.empty(b * h, d, lk_pad, dtype=torch.float8_e4m3fn if pv == "fp8" else torch.int8, device=dev)
    else:
        out.v = torch.empty(b * h, lk_pad, d, dtype=torch.float16, device=dev)
    _quant_v_kernel[(nk, b * h)](v, out.v, qs if out.vs is None else out.vs, v.stride(0), v.stride(1), v.stride(2),
                                 lk, lk_pad, h, D=d, BLOCK=bn, PV=mode)
    return out


def attention_forward(quant: Quantized, q_shape: torch.Size, lk: int, out_dtype: torch.dtype, cfg: KernelConfig,
                      pv: str, lut: torch.Tensor | None = None, n_sel: torch.Tensor | None = None,
                      pv_threshold: float | None = None, lse: bool = False):
    """Run the forward on quantized inputs -> out [B, Lq, N, D] in out_dtype. lut/n_sel: block-sparse plan.

    With lse=True returns (out, lse [B*N, Lq_pad] float32 natural log-sum-exp of the smoothed-K scores).
    """
    b, lq, h, d = q_shape
    nq, nk = quant.qs.shape[1], quant.ks.shape[1]
    lq_pad, lk_pad = quant.q8.shape[1], quant.k8.shape[1]
    out = torch.empty(b, lq, h, d, dtype=out_dtype, device=quant.q8.device)
    lse_out = torch.empty(b * h, lq_pad, dtype=torch.float32, device=out.device) if lse else quant.qs
    sparse = lut is not None
    dummy = quant.qs
    _attn_fwd_kernel[(nq, b * h)](
        quant.q8, quant.k8, quant.v, quant.qs, quant.ks, dummy if quant.vs is None else quant.vs,
        lut if sparse else dummy, n_sel if sparse else dummy, out, lse_out,
        out.stride(0), out.stride(1), out.stride(2),
        lq, lk, h, nq, nk, lq_pad, lk_pad, float(pv_threshold or 0.0),
        D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PV=pv_index(pv), SPARSE=sparse,
        PV_SKIP=pv_threshold is not None, HAS_TAIL=lk % cfg.block_n != 0, WRITE_LSE=lse,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (out, lse_out) if lse else out


def true_lse(lse: torch.Tensor, quant: Quantized, q: torch.Tensor) -> torch.Tensor:
    """Kernel LSE [B*N, Lq_pad] -> [B, N, Lq] of the real scores: adds back q . mean(k) * scale per row."""
    b, lq, h, d = q.shape
    shift = torch.einsum("blhd,bhd->bhl", q.float(), quant.k_mean.view(b, h, d)) * d ** -0.5
    return lse.view(b, h, -1)[:, :, :lq] + shift


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp16",
                   cfg: KernelConfig | None = None, lse: bool = False):
    """Dense quantized attention: q [B, Lq, N, D], k/v [B, Lk, N, D] -> [B, Lq, N, D] in q's dtype.

    lse=True: returns (out, lse [B, N, Lq] float32), the natural log-sum-exp of the scaled scores.
    """
    cfg = cfg or default_config(q.device, pv)
    quant = quantize(q, k, v, cfg, pv)
    if not lse:
        return attention_forward(quant, q.shape, k.shape[1], q.dtype, cfg, pv)
    out, lse_k = attention_forward(quant, q.shape, k.shape[1], q.dtype, cfg, pv, lse=True)
    return out, true_lse(lse_k, quant, q)
