"""Hopper (sm_90) kernels of `sage` (FP16 P.V), `sage_int8` (INT8 P.V), `sparge` (FP16 P.V over the key blocks
its plan keeps) and exact attention (`flash_attn` without a FlashAttention package), written in Gluon.

Same maths and the same quantized inputs as triton_sage (INT8 Q.K^T of smoothed K; see its docstring): what
differs is the schedule, which Triton's own compiler does not give on Hopper (there, every MMA waits for itself
and all warps stop at each barrier):
- one program takes 2 x 64 query rows of one (batch, head), 128 keys per step: two compute warpgroups, each a
  partition of its own with its 64 rows and 240 registers, share every K/V tile, and a loader warp brings Q once,
  then K and V of each key block, by TMA into a ring of STAGES shared-memory slots (mbarriers `ready`, and
  `empty` once both warpgroups are done);
- FP16 P.V: the softmax of block j, then the P.V of block j (into the float32 accumulator itself) and the
  Q.K^T of block j + 1 issued together and waited for; the other warpgroup's softmax runs meanwhile. (Issuing
  the next Q.K^T before the softmax, or making the two warpgroups take turns at the tensor cores, measured no
  faster: docs/benchmarks.md);
- INT8 P.V: the Q.K^T of block j + 1 runs under the softmax of block j; P.V and the row sums (a ones tile) go
  to int32 accumulators preset to 0x4B400000 (the bits of 12582912.0), so each result x comes out as the bits
  of 12582912 + x: a float with no conversion instruction; each probability tile is exp2(s * sc - c) with one
  fused multiply-add, c being the row's block maximum times sc rounded *up* (x (1 + 2**-22)), so the largest
  value is at most 1 and 127 p never rounds to 128, and the deficit goes back into the row's reference maximum,
  so the log-sum-exp stays exact; 127 p is rounded in float16 pairs;
- block-sparse (SPARSE, FP16 P.V): the loader and both warpgroups walk the kept key blocks of the program's row
  of a triton_sage.block_plan (128-row query blocks), instead of every key block.
- exact (EXACT, exact_attention): no quantization; q, k, v read in place; Q.K^T and P.V in q's 16-bit dtype with
  float32 accumulators, in FlashAttention-3's order within each warpgroup: Q.K^T of block j + 1 and P.V of
  block j issued, the softmax of block j + 1 as soon as its Q.K^T is done, under the P.V (_loop_exact). The ring
  has 3 slots (224 KiB with Q): with 2, the loader waits for the P.V to free a slot, and it ran 0.8x cuDNN.
Measured on H100 and H200 against cuDNN SDPA and the Triton kernels: docs/benchmarks.md (bench/attention.py).
Run only on Hopper GPUs (sage.gluon_supported), where a failed build falls back to triton_sage; the module
imports anywhere Triton has Gluon (the tests compile it on the CPU). triton_sage runs everywhere else.
Written for this project.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .triton_sage import KernelConfig, pv_index, quantize, true_lse

# the TMA load was renamed after Triton 3.6 (the benchmark machine's version); same arguments
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

WARPGROUPS = gl.constexpr(2)  # compute warpgroups of 64 query rows per program, sharing each K/V tile
BLOCK_N = 128  # keys per step
STAGES = {"fp16": 2, "int8": 4}  # K/V ring slots per P.V precision (the fastest measured)
WORKER_REGS = gl.constexpr(240)  # registers (setmaxnreg) of the second compute warpgroup
LOADER_REGS = gl.constexpr(24)  # registers of the loader warp (setmaxnreg)


@gluon.jit
def _key_block(lut_row, j, SPARSE: gl.constexpr):
    """Index of the j-th key block walked: j, or the j-th kept one of the block-sparse plan."""
    blk = j
    if SPARSE:
        blk = gl.load(lut_row + j)
    return blk


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, q_row, k_row, v_row, col, n_iter,
            lut_row, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, V_T: gl.constexpr, SPARSE: gl.constexpr):
    """Worker partition (one warp): TMA of Q (WARPGROUPS x 64 rows), then of K [BLOCK_N, D] and V (FP16
    [BLOCK_N, D], or INT8 V^T [D, BLOCK_N] if V_T) of every key block walked (_key_block) into the ring, each slot
    as soon as every compute warpgroup has released it. `col`: the head's first column (exact: [B * L, N * D]
    views of q, k, v; 0 for the quantized copies, one head per row block)."""
    mbarrier.expect(q_bar, WARPGROUPS * q_desc.block_type.nbytes)
    for g in gl.static_range(WARPGROUPS):
        _tma_load(q_desc, [q_row + g * 64, col], q_bar, q_smem.index(g))
    for j in range(n_iter):
        s = j % STAGES
        blk = _key_block(lut_row, j, SPARSE)
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)  # released (j // STAGES) times
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + blk * BLOCK_N, col], ready.index(s), k_smem.index(s))
        if V_T:
            _tma_load(v_desc, [v_row, blk * BLOCK_N], ready.index(s), v_smem.index(s))
        else:
            _tma_load(v_desc, [v_row + blk * BLOCK_N, col], ready.index(s), v_smem.index(s))


@gluon.jit
def _exp2_int8(x):
    """round(127 exp2(x)) as int8, for x <= 0, four at a time: exp2 in float32, packed to float16 pairs, then
    127 p + 1536 rounded in float16 (ulp 1 in [1024, 2048)), whose low byte is the integer; one byte permute packs
    four: 9 instructions for 4 values, against 12 with float32 rounding (float16's 11 bits are far finer than the
    int8 steps they feed)."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 lo, hi, c127, c1536;
        .reg .f32 e0, e1, e2, e3;
        mov.b32 c127, 0x57F057F0;
        mov.b32 c1536, 0x66006600;
        ex2.approx.ftz.f32 e0, $1;
        ex2.approx.ftz.f32 e1, $2;
        ex2.approx.ftz.f32 e2, $3;
        ex2.approx.ftz.f32 e3, $4;
        cvt.rn.f16x2.f32 lo, e1, e0;
        cvt.rn.f16x2.f32 hi, e3, e2;
        fma.rn.f16x2 lo, lo, c127, c1536;
        fma.rn.f16x2 hi, hi, c127, c1536;
        prmt.b32 $0, lo, hi, 0x6420;
        }""",
        constraints="=r,f,f,f,f", args=[x], dtype=gl.int8, is_pure=True, pack=4)


@gluon.jit
def _softmax_int8(s_bits, sc, m_i, start, Lk, s_layout: gl.constexpr, p_layout: gl.constexpr,
             BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """Scores (bits of 12582912 + int32 Q.K) -> (int8 127 p in the P.V operand layout, new reference max,
    alpha = exp2(old - new), beta = exp2(block reference - new)), all in log2 units once scaled by sc."""
    if MASKED:  # padded keys: bits of +0.0, below every score for the maximum; their p is zeroed below
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_bits = gl.where(cols[None, :] < Lk, s_bits, 0)
    f = s_bits.to(gl.float32, bitcast=True)
    f_max = gl.max(s_bits, 1).to(gl.float32, bitcast=True)  # positive floats order as their int32 bits
    c = f_max * sc * 1.0000002384185791  # 1 + 2**-22: above the exact product f_max * sc whatever the rounding
    m_blk = (f_max - 12582912.0) * sc + gl.fma(f_max, -sc, c)  # the block's reference: max + the deficit
    m_new = gl.maximum(m_i, m_blk)
    x = gl.fma(f, sc, -c[:, None])  # exponents <= 0: 127 p rounds to at most 127
    if MASKED:  # (a padded key's exponent -c is not far below 0 when sc is tiny: small q and k, or constant k)
        x = gl.where(cols[None, :] < Lk, x, float("-inf"))
    p8 = _exp2_int8(x)
    return gl.convert_layout(p8, p_layout), m_new, gl.exp2(m_i - m_new), gl.exp2(m_blk - m_new)


@gluon.jit
def _softmax_fp16(s_bits, sc, m_i, l_i, start, Lk, s_layout: gl.constexpr, p_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """Scores (bits of 12582912 + int32 Q.K) -> (FP16 p relative to the new running max in the P.V operand
    layout, new max, new row sum, alpha = exp2(old - new)), in log2 units once scaled by sc."""
    if MASKED:  # padded keys: bits of +0.0 for the maximum, p zeroed (as in _softmax_int8)
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_bits = gl.where(cols[None, :] < Lk, s_bits, 0)
    f = s_bits.to(gl.float32, bitcast=True)
    f_max = gl.max(s_bits, 1).to(gl.float32, bitcast=True)
    m_new = gl.maximum(m_i, (f_max - 12582912.0) * sc)
    p = gl.exp2(gl.fma(f, sc, -(m_new + 12582912.0 * sc)[:, None]))
    if MASKED:
        p = gl.where(cols[None, :] < Lk, p, 0.0)
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return gl.convert_layout(p.to(gl.float16), p_layout), m_new, l_i, alpha


@gluon.jit
def _pack16(p, p_dtype: gl.constexpr):
    """p (float32) rounded to p_dtype two at a time: one cvt per pair, low half first, as the wgmma operand wants.
    Triton's own p.to(bfloat16) packs each pair swapped and fixes it with a byte permute: 32 more instructions per
    key block (bench/kernel_sass.py), 1-3% of the exact kernel's time on an H100 (docs/benchmarks.md)."""
    if p_dtype == gl.bfloat16:
        return gl.inline_asm_elementwise(asm="cvt.rn.bf16x2.f32 $0, $2, $1;", constraints="=r,f,f", args=[p],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(asm="cvt.rn.f16x2.f32 $0, $2, $1;", constraints="=r,f,f", args=[p],
                                         dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _softmax_exact(s, sc, m_i, l_i, start, Lk, s_layout: gl.constexpr, p_layout: gl.constexpr,
                   p_dtype: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """Float32 scores of bf16 / fp16 Q.K^T -> (p relative to the new running max in V's dtype, in the P.V operand
    layout, new max, new row sum, alpha = exp2(old - new)), in log2 units once scaled by sc."""
    if MASKED:  # padded keys (or the next sequence's): -inf, p = 0
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(cols[None, :] < Lk, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * sc)
    p = gl.exp2(gl.fma(s, sc, -m_new[:, None]))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return gl.convert_layout(_pack16(p, p_dtype), p_layout), m_new, l_i, alpha


@gluon.jit
def _qk(q_smem, k_smem, ready, j, s_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, EXACT: gl.constexpr):
    """Issue Q.K^T of key block j asynchronously once it has landed; accumulator preset to 12582912's bits (INT8),
    or 0.0 (EXACT)."""
    mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
    if EXACT:
        init = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    else:
        init = gl.full([BLOCK_M, BLOCK_N], 0x4B400000, gl.int32, s_layout)
    return warpgroup_mma(q_smem, k_smem.index(j % STAGES).permute((1, 0)), init, is_async=True)


@gluon.jit
def _pv_fold(acc, l_i, p8, alpha, beta, v_view, ones_view, deps, o_layout: gl.constexpr, r_layout: gl.constexpr,
             rp_layout: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr):
    """P.V and the row sums of P (a ones tile), accumulators preset to 12582912's bits; wait for them and for
    `deps` (the next Q.K^T in flight); then acc and l (old reference) -> new reference, plus this block."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    pv = warpgroup_mma(p8, v_view, gl.full([BLOCK_M, D], 0x4B400000, gl.int32, o_layout), is_async=True)
    rs = warpgroup_mma(gl.convert_layout(p8, rp_layout), ones_view,
                       gl.full([BLOCK_M, 16], 0x4B400000, gl.int32, r_layout), is_async=True)
    pv, rs, deps = warpgroup_mma_wait(num_outstanding=0, deps=(pv, rs, deps))
    alpha = gl.convert_layout(alpha, row_o)
    beta = gl.convert_layout(beta, row_o)
    rsum = gl.convert_layout(gl.max(rs.to(gl.float32, bitcast=True), 1) - 12582912.0, row_o)
    l_i = l_i * alpha + rsum * beta
    acc = gl.fma(acc, alpha[:, None], -(12582912.0 * beta)[:, None])
    acc = gl.fma(pv.to(gl.float32, bitcast=True), beta[:, None], acc)
    return acc, l_i, deps


@gluon.constexpr_function
def _mma_layout(n, k):
    """The register layout of a 64-row wgmma result [64, n] over k-deep steps on one warpgroup (4 warps)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k])


@gluon.jit
def _start_rows(q_bar, D: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """A 16-bit P.V loop's start for one warpgroup's 64 rows: (running max -inf, row sum 0, acc 0), once Q landed."""
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([64, D], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    return m_i, l_i, acc


@gluon.jit
def _loop_int8(q_smem, k_smem, v_smem, ones, q_bar, ready, empty, qs, ks_row, Lk, n_k_blocks,
               D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_TAIL: gl.constexpr):
    """INT8 P.V over every key block for one warpgroup's 64 rows -> (acc, l, m): the next block's Q.K^T runs
    under the softmax; P.V and its fold into acc follow it (its int32 result needs registers of its own)."""
    BLOCK_M: gl.constexpr = 64
    s_layout: gl.constexpr = _mma_layout(BLOCK_N, 32)
    o_layout: gl.constexpr = _mma_layout(D, 32)
    r_layout: gl.constexpr = _mma_layout(16, 32)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    rp_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=r_layout, k_width=4)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    ones_view = ones.permute((1, 0))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, row_o)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(_qk(q_smem, k_smem, ready, 0, s_layout, BLOCK_M, BLOCK_N,
                                                             STAGES, False),))
    sc = qs * gl.load(ks_row)
    for j in range(n_k_blocks - 1):  # block j's softmax while block j + 1's Q.K^T runs
        slot = j % STAGES
        s_next = _qk(q_smem, k_smem, ready, j + 1, s_layout, BLOCK_M, BLOCK_N, STAGES, False)
        sc_next = qs * gl.load(ks_row + j + 1)
        p8, m_i, alpha, beta = _softmax_int8(s_cur, sc, m_i, j * BLOCK_N, Lk, s_layout, p_layout, BLOCK_N, False)
        acc, l_i, s_cur = _pv_fold(acc, l_i, p8, alpha, beta, v_smem.index(slot).permute((1, 0)), ones_view, s_next,
                                   o_layout, r_layout, rp_layout, BLOCK_M, D)
        mbarrier.arrive(empty.index(slot), count=1)  # block j's K and V are consumed
        sc = sc_next
    last = n_k_blocks - 1
    p8, m_i, alpha, beta = _softmax_int8(s_cur, sc, m_i, last * BLOCK_N, Lk, s_layout, p_layout, BLOCK_N, HAS_TAIL)
    acc, l_i, s_cur = _pv_fold(acc, l_i, p8, alpha, beta, v_smem.index(last % STAGES).permute((1, 0)), ones_view,
                               s_cur, o_layout, r_layout, rp_layout, BLOCK_M, D)
    return acc, l_i, gl.convert_layout(m_i, row_o)


@gluon.jit
def _loop_fp16(q_smem, k_smem, v_smem, q_bar, ready, empty, qs, ks_row, Lk, n_iter, lut_row,
               D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_TAIL: gl.constexpr,
               SPARSE: gl.constexpr):
    """FP16 P.V over the key blocks walked (_key_block) for one warpgroup's 64 rows -> (acc, l, m): the softmax of
    block j, then the P.V of block j (into acc itself) and the Q.K^T of block j + 1 issued together and waited
    for."""
    s_layout: gl.constexpr = _mma_layout(BLOCK_N, 32)  # INT8 Q.K^T
    o_layout: gl.constexpr = _mma_layout(D, 16)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i, l_i, acc = _start_rows(q_bar, D, s_layout, o_layout)
    s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(_qk(q_smem, k_smem, ready, 0, s_layout, 64, BLOCK_N,
                                                             STAGES, False),))
    for j in range(n_iter - 1):
        slot = j % STAGES
        blk = _key_block(lut_row, j, SPARSE)
        p16, m_i, l_i, alpha = _softmax_fp16(s_cur, qs * gl.load(ks_row + blk), m_i, l_i, blk * BLOCK_N, Lk,
                                             s_layout, p_layout, BLOCK_N, False)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        acc = warpgroup_mma(p16, v_smem.index(slot), acc, is_async=True)
        s_next = _qk(q_smem, k_smem, ready, j + 1, s_layout, 64, BLOCK_N, STAGES, False)
        acc, s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_next))
        mbarrier.arrive(empty.index(slot), count=1)  # block j's K and V are consumed
    last = n_iter - 1  # a partial key block is the last one (kept blocks come in ascending order)
    blk = _key_block(lut_row, last, SPARSE)
    p16, m_i, l_i, alpha = _softmax_fp16(s_cur, qs * gl.load(ks_row + blk), m_i, l_i, blk * BLOCK_N, Lk,
                                         s_layout, p_layout, BLOCK_N, HAS_TAIL)
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return acc, gl.convert_layout(l_i, row_o), gl.convert_layout(m_i, row_o)


@gluon.jit
def _exact_step(j, p, acc, m_i, l_i, q_smem, k_smem, v_smem, ready, empty, qs, Lk, s_layout: gl.constexpr,
                p_layout: gl.constexpr, row_o: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                MASKED: gl.constexpr):
    """Block j's P.V runs under block j + 1's softmax: issue Q.K^T(j + 1), then P(j).V(j); wait for the Q.K^T only
    (wgmma groups retire in order), softmax of block j + 1, wait for the P.V, rescale acc to the new maximum."""
    slot = j % STAGES
    s_next = _qk(q_smem, k_smem, ready, j + 1, s_layout, 64, BLOCK_N, STAGES, True)
    acc = warpgroup_mma(p, v_smem.index(slot), acc, is_async=True)
    s_next = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
    p_next, m_i, l_i, alpha = _softmax_exact(s_next, qs, m_i, l_i, (j + 1) * BLOCK_N, Lk, s_layout, p_layout,
                                             v_smem.dtype, BLOCK_N, MASKED)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
    mbarrier.arrive(empty.index(slot), count=1)  # block j's K and V are consumed
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    return p_next, acc, m_i, l_i


@gluon.jit
def _loop_exact(q_smem, k_smem, v_smem, q_bar, ready, empty, qs, Lk, n_iter,
                D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_TAIL: gl.constexpr):
    """Exact 16-bit attention for one warpgroup's 64 rows -> (acc, l, m), FlashAttention-3's order within the
    warpgroup: the P.V of block j runs under the softmax of block j + 1 (_exact_step)."""
    s_layout: gl.constexpr = _mma_layout(BLOCK_N, 16)  # 16-bit Q.K^T
    o_layout: gl.constexpr = _mma_layout(D, 16)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i, l_i, acc = _start_rows(q_bar, D, s_layout, o_layout)
    s0 = warpgroup_mma_wait(num_outstanding=0, deps=(_qk(q_smem, k_smem, ready, 0, s_layout, 64, BLOCK_N, STAGES,
                                                          True),))
    # block 0's mask is a no-op unless it is the only block (then it is the tail)
    p, m_i, l_i, alpha = _softmax_exact(s0, qs, m_i, l_i, 0, Lk, s_layout, p_layout, v_smem.dtype, BLOCK_N, HAS_TAIL)
    for j in range(n_iter - 2):  # steps into full blocks
        p, acc, m_i, l_i = _exact_step(j, p, acc, m_i, l_i, q_smem, k_smem, v_smem, ready, empty, qs, Lk, s_layout,
                                       p_layout, row_o, BLOCK_N, STAGES, False)
    for j in range(gl.maximum(n_iter - 2, 0), n_iter - 1):  # the step into the last block, if there are two or more
        p, acc, m_i, l_i = _exact_step(j, p, acc, m_i, l_i, q_smem, k_smem, v_smem, ready, empty, qs, Lk, s_layout,
                                       p_layout, row_o, BLOCK_N, STAGES, HAS_TAIL)
    acc = warpgroup_mma(p, v_smem.index((n_iter - 1) % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return acc, gl.convert_layout(l_i, row_o), gl.convert_layout(m_i, row_o)


@gluon.jit
def _compute(q_smem, k_smem, v_smem, ones, q_bar, ready, empty, QS, KS, VS, O, LSE, stride_ob, stride_ol, stride_oh,
             pid_m, bh, b, h, Lq, Lk, n_q_blocks, n_k_blocks, Lq_pad, n_iter, lut_row, scale,
             D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PV: gl.constexpr, HAS_TAIL: gl.constexpr,
             WRITE_LSE: gl.constexpr, SPARSE: gl.constexpr, Q_ROWS: gl.constexpr, EXACT: gl.constexpr,
             GROUP: gl.constexpr):
    """One compute warpgroup (a partition of its own): rows GROUP * 64 .. + 64 of the program's WARPGROUPS x 64-row
    query tile, the online softmax over the key blocks walked, then the output (and log-sum-exp)."""
    if EXACT:
        qs = scale  # the softmax scale in log2 units
    else:
        q_blk = (pid_m * WARPGROUPS + GROUP) * 64 // Q_ROWS  # Q's scale per Q_ROWS rows; the last groups: padding
        qs = gl.load(QS + bh * n_q_blocks + q_blk, mask=q_blk < n_q_blocks, other=0.0)
    ks_row = KS + bh * n_k_blocks
    if PV == 2:
        acc, l_i, m_i = _loop_int8(q_smem.index(GROUP), k_smem, v_smem, ones, q_bar, ready, empty, qs, ks_row, Lk,
                                   n_k_blocks, D, BLOCK_N, STAGES, HAS_TAIL)
    elif EXACT:
        acc, l_i, m_i = _loop_exact(q_smem.index(GROUP), k_smem, v_smem, q_bar, ready, empty, qs, Lk, n_iter, D,
                                    BLOCK_N, STAGES, HAS_TAIL)
    else:
        acc, l_i, m_i = _loop_fp16(q_smem.index(GROUP), k_smem, v_smem, q_bar, ready, empty, qs, ks_row, Lk,
                                   n_iter, lut_row, D, BLOCK_N, STAGES, HAS_TAIL, SPARSE)
    o_layout: gl.constexpr = acc.type.layout
    l_i = gl.where(l_i > 0, l_i, 1.0)
    offs_m = pid_m * (WARPGROUPS * 64) + GROUP * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    out = acc / l_i[:, None]
    lse2 = m_i + gl.log2(l_i)
    if PV == 2:  # P and the row sums carried 127 = 2**6.989; V was scaled to 127 per channel
        lse2 = lse2 - 6.988684686772166
        out = out * (gl.load(VS + bh * D + offs_d) / 127.0)[None, :]
    if WRITE_LSE:  # natural log-sum-exp of the smoothed-K scores
        gl.store(LSE + bh.to(gl.int64) * Lq_pad + offs_m, lse2 * 0.6931471805599453, mask=offs_m < Lq_pad)
    o_ptrs = O + b.to(gl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(gl.int64) * stride_ol + offs_d[None, :]
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Lq)


@gluon.jit
def _attn_kernel(q_desc, k_desc, v_desc, QS, KS, VS, LUT, NSEL, O, LSE,
                 stride_ob, stride_ol, stride_oh, Lq, Lk, H, n_q_blocks, n_k_blocks, Lq_pad, Lk_pad, scale,
                 D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PV: gl.constexpr,
                 HAS_TAIL: gl.constexpr, WRITE_LSE: gl.constexpr, SPARSE: gl.constexpr, Q_ROWS: gl.constexpr,
                 EXACT: gl.constexpr):
    """One query tile [WARPGROUPS x 64, D] of one (batch, head) against every key block, or (SPARSE) the ones its
    row of the plan keeps (LUT, NSEL: one row per 128-row query block, Q_ROWS = 128): WARPGROUPS compute
    warpgroups of 64 rows sharing each K/V tile, and a loader warp. EXACT: q, k, v unquantized, 16-bit, read in
    place through [B * L, N * D] descriptors (rows past a sequence's end are masked or not stored); `scale` is
    the softmax scale times log2(e)."""
    gl.static_assert(STAGES >= 2, "the ring needs 2 slots: a block's Q.K^T is issued before the last one is released")
    gl.static_assert(WARPGROUPS == 2, "the partitions below are written out for two compute warpgroups")
    gl.static_assert(not SPARSE or (PV == 0 and Q_ROWS == 64 * WARPGROUPS), "block-sparse: FP16 P.V, 128-row plan")
    gl.static_assert(not EXACT or (PV == 0 and not SPARSE), "exact: 16-bit P.V over every key block")
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    ones_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(BLOCK_N, 128), element_bitwidth=8, rank=2)
    fill_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [WARPGROUPS, 64, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    ones = gl.allocate_shared_memory(gl.int8, [16, BLOCK_N], ones_layout,
                                     gl.full([16, BLOCK_N], 1, gl.int8, fill_layout))  # INT8 P.V's row sums
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=WARPGROUPS)  # every compute warpgroup releases each slot
    fence_async_shared()  # the ones tile and the barriers, before the async proxy (TMA, wgmma) sees them
    b = bh // H
    h = bh % H
    if EXACT:  # [B * L, N * D] views: the sequence's rows, the head's columns
        q_row = b * Lq + pid_m * (WARPGROUPS * 64)
        k_row = b * Lk
        v_row = k_row
        col = h * D
    else:  # quantized copies [B * N * L_pad, D] (INT8 V^T: [B * N * D, Lk_pad])
        q_row = bh * Lq_pad + pid_m * (WARPGROUPS * 64)
        k_row = bh * Lk_pad
        v_row = bh * D if PV == 2 else k_row
        col = 0
    if SPARSE:  # the plan keeps at least one key block per query block (triton_sage.block_plan)
        plan = bh * n_q_blocks + pid_m
        n_iter = gl.load(NSEL + plan)
        lut_row = LUT + plan.to(gl.int64) * n_k_blocks
    else:
        n_iter = n_k_blocks
        lut_row = LUT
    # the partitions' arguments are spelled out: a tuple built by concatenation loses its constexpr entries
    gl.warp_specialize([
        (_compute, (q_smem, k_smem, v_smem, ones, q_bar, ready, empty, QS, KS, VS, O, LSE, stride_ob, stride_ol,
                    stride_oh, pid_m, bh, b, h, Lq, Lk, n_q_blocks, n_k_blocks, Lq_pad, n_iter, lut_row, scale, D,
                    BLOCK_N, STAGES, PV, HAS_TAIL, WRITE_LSE, SPARSE, Q_ROWS, EXACT, 0)),
        (_compute, (q_smem, k_smem, v_smem, ones, q_bar, ready, empty, QS, KS, VS, O, LSE, stride_ob, stride_ol,
                    stride_oh, pid_m, bh, b, h, Lq, Lk, n_q_blocks, n_k_blocks, Lq_pad, n_iter, lut_row, scale, D,
                    BLOCK_N, STAGES, PV, HAS_TAIL, WRITE_LSE, SPARSE, Q_ROWS, EXACT, 1)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, q_row, k_row, v_row, col,
                   n_iter, lut_row, BLOCK_N, STAGES, PV == 2, SPARSE)),
    ], [4, 1], [WORKER_REGS, LOADER_REGS])


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    dtype = {torch.int8: gl.int8, torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[t.dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def attention_forward(quant, q_shape: torch.Size, lk: int, out_dtype: torch.dtype, pv: str, lse: bool = False,
                      lut: torch.Tensor | None = None, n_sel: torch.Tensor | None = None):
    """triton_sage.attention_forward on this kernel: quant from triton_sage.quantize with config(pv) tiles and
    the same pv ("fp16" or "int8"); or, with lut / n_sel (triton_sage.block_plan), FP16 P.V over the kept key
    blocks of a quantization with 128-row query blocks and 64- or 128-key blocks (sparge's). Every query block
    must keep at least one key block, as block_plan's plans do (with none, the kernel would wait forever)."""
    b, lq, h, d = q_shape
    nq, nk = quant.qs.shape[1], quant.ks.shape[1]
    lq_pad, lk_pad = quant.q8.shape[1], quant.k8.shape[1]
    q_rows, bn = lq_pad // nq, lk_pad // nk
    sparse = lut is not None or n_sel is not None
    v_dtype = {"fp16": torch.float16, "int8": torch.int8}[pv]
    if sparse:
        tiles = {(128, 64), (128, BLOCK_N)} if pv == "fp16" else set()
    else:
        tiles = {(64, BLOCK_N)}
    if quant.v.dtype != v_dtype or (q_rows, bn) not in tiles:
        raise ValueError(f"gluon_sage takes {pv} quantizations with 64x{BLOCK_N} tiles, or block-sparse plans "
                         f"(FP16 P.V only) on 128x64 / 128x{BLOCK_N} blocks; got {q_rows}x{bn}"
                         + (" block-sparse" if sparse else ""))
    if sparse and (lut is None or n_sel is None or lut.shape != (b * h * nq, nk) or n_sel.shape != (b * h * nq,)
                   or lut.dtype != torch.int32 or n_sel.dtype != torch.int32 or lut.device != quant.q8.device):
        raise ValueError(f"a block-sparse plan is lut int32 [{b * h * nq}, {nk}] and n_sel int32 [{b * h * nq}] on "
                         f"{quant.q8.device} (triton_sage.block_plan)")
    q_desc = _descriptor(quant.q8.view(b * h * lq_pad, d), [64, d])
    k_desc = _descriptor(quant.k8.view(b * h * lk_pad, d), [bn, d])
    if pv == "int8":
        v_desc = _descriptor(quant.v.view(b * h * d, lk_pad), [d, bn])
    else:
        v_desc = _descriptor(quant.v.view(b * h * lk_pad, d), [bn, d])
    out = torch.empty(b, lq, h, d, dtype=out_dtype, device=quant.q8.device)
    lse_out = torch.empty(b * h, lq_pad, dtype=torch.float32, device=out.device) if lse else quant.qs
    _attn_kernel[(triton.cdiv(lq_pad, 64 * WARPGROUPS.value), b * h)](
        q_desc, k_desc, v_desc, quant.qs, quant.ks, quant.vs if quant.vs is not None else quant.qs,
        lut if sparse else quant.ks, n_sel if sparse else quant.ks, out, lse_out,
        out.stride(0), out.stride(1), out.stride(2), lq, lk, h, nq, nk, lq_pad, lk_pad, 1.0,
        D=d, BLOCK_N=bn, STAGES=STAGES[pv] * BLOCK_N // bn, PV=pv_index(pv), HAS_TAIL=lk % bn != 0,
        WRITE_LSE=lse, SPARSE=sparse, Q_ROWS=q_rows, EXACT=False, num_warps=4)
    return (out, lse_out) if lse else out


EXACT_DTYPES = (torch.bfloat16, torch.float16)
EXACT_HEAD_DIMS = (64, 128)
EXACT_STAGES = 3  # K/V ring slots of the exact kernel (16-bit K and V: 64 KiB per slot at head dim 128)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, L, N, D] as a [B * L, N * D] view TMA can read (a copy only when its strides do not allow one)."""
    b, l, n, d = x.shape
    s = x.stride()
    if not (s[3] == 1 and s[2] == d and (b == 1 or s[0] == l * s[1]) and s[1] % 8 == 0 and x.data_ptr() % 16 == 0):
        x = x.contiguous()
        s = x.stride()
    return x.as_strided((b * l, n * d), (s[1], 1))


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool = False):
    """Exact attention softmax(q k^T / sqrt(D)) v on this kernel, with no quantization: q [B, Lq, N, D], k / v
    [B, Lk, N, D], bfloat16 or float16, head dim 64 or 128, read in place (no padded copies). Q.K^T and P.V in
    q's dtype with float32 accumulation, P rounded to that dtype, as FlashAttention does. -> out [B, Lq, N, D]
    in q's dtype, and with lse the natural log-sum-exp of the scaled scores [B, N, Lq] float32."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if q.dtype not in EXACT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"exact_attention takes bfloat16 or float16 q, k, v of one dtype; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if d not in EXACT_HEAD_DIMS or k.shape != (b, lk, h, d) or v.shape != k.shape or lk == 0:
        raise ValueError(f"exact_attention takes q [B, Lq, N, D] and k, v [B, Lk, N, D] with D in "
                         f"{EXACT_HEAD_DIMS} and Lk >= 1; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    q_desc = _descriptor(_rows(q), [64, d])
    k_desc = _descriptor(_rows(k), [BLOCK_N, d])
    v_desc = _descriptor(_rows(v), [BLOCK_N, d])
    n_m = triton.cdiv(lq, 64 * WARPGROUPS.value)
    lq_pad = n_m * 64 * WARPGROUPS.value
    out = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device)
    # the log-sum-exp when asked for; else one float, the unused pointers' stand-in (never written)
    lse_out = torch.empty(b * h, lq_pad, dtype=torch.float32, device=q.device) if lse else \
        torch.empty(1, dtype=torch.float32, device=q.device)
    idx = torch.empty(1, dtype=torch.int32, device=q.device)
    _attn_kernel[(n_m, b * h)](
        q_desc, k_desc, v_desc, lse_out, lse_out, lse_out, idx, idx, out, lse_out,
        out.stride(0), out.stride(1), out.stride(2), lq, lk, h, 1, triton.cdiv(lk, BLOCK_N), lq_pad, lk,
        d ** -0.5 * 1.4426950408889634,
        D=d, BLOCK_N=BLOCK_N, STAGES=EXACT_STAGES, PV=0, HAS_TAIL=lk % BLOCK_N != 0, WRITE_LSE=lse, SPARSE=False,
        Q_ROWS=64, EXACT=True, num_warps=4)
    return (out, lse_out.view(b, h, lq_pad)[..., :lq]) if lse else out


def config(pv: str) -> KernelConfig:
    """The quantization tiles this kernel reads."""
    return KernelConfig(64, BLOCK_N, 4, STAGES[pv])


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp16", lse: bool = False):
    """triton_sage.sage_attention(q, k, v, pv) on this kernel: q [B, Lq, N, D], k/v [B, Lk, N, D]."""
    quant = quantize(q, k, v, config(pv), pv)
    if not lse:
        return attention_forward(quant, q.shape, k.shape[1], q.dtype, pv)
    out, lse_k = attention_forward(quant, q.shape, k.shape[1], q.dtype, pv, lse=True)
    return out, true_lse(lse_k, quant, q)


def compile_sm90(pv: str, head_dim: int = 128, sparse: bool = False, block_n: int = BLOCK_N):
    """Compile the kernel for an sm_90 target without a GPU (Triton's bundled ptxas): the tests' check that it
    builds with the installed Triton, and bench/kernel_sass.py's source of SASS. pv: "fp16" or "int8" (sage), or
    "exact" (exact_attention's bfloat16 kernel). Returns Triton's compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    bn, d = block_n, head_dim
    exact = pv == "exact"
    elt = {"fp16": ("fp16", gl.float16), "int8": ("i8", gl.int8), "bf16": ("bf16", gl.bfloat16)}

    def desc(block, kind="int8"):
        name, dtype = elt["bf16" if exact else kind]
        return f"tensordesc<{name}[{block[0]}, {block[1]}],{gl.NVMMASharedLayout.get_default_for(block, dtype)!r}>"

    args = [("q_desc", desc([64, d])), ("k_desc", desc([bn, d])),
            ("v_desc", desc([d, bn]) if pv == "int8" else desc([bn, d], "fp16")),
            ("QS", "*fp32"), ("KS", "*fp32"), ("VS", "*fp32"), ("LUT", "*i32"), ("NSEL", "*i32"), ("O", "*bf16"),
            ("LSE", "*fp32")]
    args += [(n, "i32") for n in ("stride_ob", "stride_ol", "stride_oh", "Lq", "Lk", "H", "n_q_blocks", "n_k_blocks",
                                  "Lq_pad", "Lk_pad")]
    args += [("scale", "fp32")]
    stages = EXACT_STAGES if exact else STAGES[pv] * BLOCK_N // bn
    consts = dict(D=d, BLOCK_N=bn, STAGES=stages, PV=0 if exact else pv_index(pv), HAS_TAIL=True,
                  WRITE_LSE=True, SPARSE=sparse, Q_ROWS=128 if sparse else 64, EXACT=exact)
    sig = dict(args) | {k: "constexpr" for k in consts}
    aligned = {"QS", "KS", "VS", "LUT", "NSEL", "O", "LSE", "stride_ob", "stride_ol", "stride_oh", "Lq_pad", "Lk_pad"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, _) in enumerate(args) if name in aligned}
    return triton.compile(GluonASTSource(_attn_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4))
