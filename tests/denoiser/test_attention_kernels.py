"""Our Triton attention kernels (sage, sage_fp8, sage_int8, block-sparse sparge) against float64 references.

On a CPU-only machine they run through Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
imported); on a machine with a GPU, on the GPU. Without the triton package the module is skipped.
Tolerances: INT8 Q.K^T costs ~1.2e-2 relative error on random inputs, INT8 P.V adds ~1.5e-2, FP8 P.V ~3.8e-2
on the GPU. The
interpreter's float32 -> float8 conversion does not carry a rounding overflow into the exponent (7.9 -> 4.0), so
on the CPU the FP8 path is only checked loosely.
"""

import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton.jit when the kernel module is imported
pytest.importorskip("triton", reason="our attention kernels are Triton: pip install triton (CPU tests run them "
                                     "through TRITON_INTERPRET=1)")
if not GPU:
    from triton_interpreter import require_interpreter

    require_interpreter()

from smartdiff.services.denoiser import attention as A  # noqa: E402
from smartdiff.services.denoiser.attention import triton_sage as ts  # noqa: E402
from smartdiff.services.denoiser.attention.sage import gluon_supported  # noqa: E402
from smartdiff.services.denoiser.attention.sparge import SpargeKernel, block_lut, block_mask  # noqa: E402
from smartdiff.services.denoiser.weights import random_dit  # noqa: E402
from smartdiff.shared.config import DiTConfig  # noqa: E402

DEV = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
CFG = ts.KernelConfig(64, 32, 4, 1) if not GPU else None  # small tiles: several blocks and a tail on small shapes
FP8_TOL = 6e-2 if GPU else 0.15


def qkv(b=2, lq=200, lk=None, n=2, d=64, seed=0, k_shift=0.5):
    g = torch.Generator().manual_seed(seed)
    lk = lk or lq
    q = torch.randn(b, lq, n, d, generator=g)
    k = torch.randn(b, lk, n, d, generator=g) + k_shift  # a per-channel offset: what K smoothing removes
    v = torch.randn(b, lk, n, d, generator=g)
    return tuple(x.to(DEV, DTYPE) for x in (q, k, v))


def reference(q, k, v, token_mask=None):
    """float64 attention [B, L, N, D]; token_mask [B, N, Lq, Lk] True = keep."""
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
    if token_mask is not None:
        s = s.masked_fill(~token_mask, float("-inf"))
    return (torch.softmax(s, -1) @ vd).transpose(1, 2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("b,lq,lk,d", [(2, 200, 200, 64), (1, 96, 150, 128)])
def test_sage_matches_float64(b, lq, lk, d):
    q, k, v = qkv(b, lq, lk, d=d)
    out = ts.sage_attention(q, k, v, pv="fp16", cfg=CFG)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel(out, reference(q, k, v)) < 2.5e-2


def test_sage_fp8_matches_float64_within_fp8_error():
    q, k, v = qkv()
    out = ts.sage_attention(q, k, v, pv="fp8", cfg=CFG)
    assert torch.isfinite(out).all() and rel(out, reference(q, k, v)) < FP8_TOL


@pytest.mark.skipif(not GPU, reason="the tensor cores' accumulation (GPU)")
@pytest.mark.parametrize("pv", ["fp8", "int8"])
def test_8bit_pv_keeps_float32_accumulation_over_long_rows(pv):
    """A Wan-length row (32760 keys) over V with a large per-channel offset, as in a DiT: accumulated inside
    Hopper's FP8 MMA the sum loses low bits as it grows (1.4e-1 in a DiT forward); block by block in float32 it
    does not. INT8 (exact int32 products per block, then float32) is held to the same bound."""
    if pv == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 32760, 2, 128)
    q, k, v = (torch.randn(shape, device="cuda", generator=g) for _ in range(3))
    v = v + 4.0 * torch.randn(1, 1, 2, 128, device="cuda", generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    out = ts.sage_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pv=pv)
    assert rel(out, ref) < 1e-2


def test_sage_int8_matches_float64():
    q, k, v = qkv()
    out = ts.sage_attention(q, k, v, pv="int8", cfg=CFG)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel(out, reference(q, k, v)) < 3e-2


def test_sage_int8_large_scores_keep_the_row_maximum_at_127():
    """Large q/k (scores of hundreds): the largest probability of each block row must quantize to 127, not round
    up to 128 (which wraps to -128 in int8 and flips its sign)."""
    q, k, v = qkv(k_shift=0.0)
    q, k = q * 6.0, k * 6.0
    ref = reference(q, k, v)
    same_qk = rel(ts.sage_attention(q, k, v, pv="fp16", cfg=CFG), ref)  # the INT8 Q.K error of such peaked rows
    assert rel(ts.sage_attention(q, k, v, pv="int8", cfg=CFG), ref) < 1.2 * same_qk


def test_sage_int8_keeps_each_row_a_weighted_mean_of_v():
    """Peaked rows whose small probabilities round to 0 in int8, over V with a large offset: normalising by the
    sum of the rounded P keeps the offset (a sum of unrounded P would shrink it)."""
    q, k, v = qkv(k_shift=0.0)
    q = q * 4.0  # sharp softmax rows
    v = v + 20.0
    out = ts.sage_attention(q, k, v, pv="int8", cfg=CFG)
    ref = reference(q, k, v)
    assert rel(out, ref) < 1e-2
    assert (out.double().mean() - ref.mean()).abs() < 0.05


def test_key_smoothing_makes_a_large_key_offset_harmless():
    q, k, v = qkv(k_shift=0.0)
    shifted = k + 40.0  # a constant per-key offset does not change softmax, but would swamp an INT8 scale
    k_seen = shifted.double() - 40.0  # k as the kernel receives it (bf16 on a GPU keeps 1/4 steps at 40)
    assert rel(ts.sage_attention(q, shifted, v, cfg=CFG), reference(q, k_seen, v)) < 2.5e-2


@pytest.mark.parametrize("pv", ts.PV_MODES)
def test_log_sum_exp_of_the_real_scores(pv):
    q, k, v = qkv(b=1, lq=150)
    out, lse = ts.sage_attention(q, k, v, pv=pv, cfg=CFG, lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * q.shape[-1] ** -0.5
    assert lse.shape == (1, 2, 150) and lse.dtype == torch.float32
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max() < 5e-2
    kern = A.get_backend("sage").build(A.AttentionChoice("sage"), DEV, DTYPE, 64)
    assert A.get_backend("sage").info.returns_lse and kern.with_lse(q, k, v)[1].shape == (1, 2, 150)


@pytest.mark.parametrize("pv", ["fp16", "int8"])
def test_block_sparse_kernel_matches_masked_float64(pv):
    cfg = CFG or ts.default_config(DEV, pv)
    q, k, v = qkv(b=1, lq=230)
    quant = ts.quantize(q, k, v, cfg, pv, pool=True)
    nq, nk = quant.qs.shape[1], quant.ks.shape[1]
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, nq, nk, generator=g) < 0.5
    keep[..., 0] |= ~keep.any(-1)  # every query block keeps a block (as sparge's selection does)
    keep[0, 0] = False
    keep[0, 0, -1] = True  # a row keeping only the partial last block
    keep[1, -1] = False
    keep[1, -1, 1] = True  # a row keeping one middle block
    keep = keep.to(DEV)
    out = ts.attention_forward(quant, q.shape, k.shape[1], q.dtype, cfg, pv, *block_lut(keep))
    rows = torch.arange(230, device=DEV)
    token_mask = keep.view(1, 2, nq, nk)[:, :, rows // cfg.block_m][:, :, :, rows // cfg.block_n]
    assert rel(out, reference(q, k, v, token_mask)) < (3e-2 if pv == "int8" else 2.5e-2)
    dense = ts.attention_forward(quant, q.shape, k.shape[1], q.dtype, cfg, pv)
    all_kept = torch.ones_like(keep)
    assert torch.equal(ts.attention_forward(quant, q.shape, k.shape[1], q.dtype, cfg, pv, *block_lut(all_kept)),
                       dense)  # the sparse walk over every block is the dense kernel
    no_skip = ts.attention_forward(quant, q.shape, k.shape[1], q.dtype, cfg, pv, *block_lut(keep),
                                   pv_threshold=1e9)
    assert torch.equal(no_skip, out)


def test_block_lut_lists_kept_blocks_in_order():
    keep = torch.tensor([[[True, False, True, True], [False, False, False, True]]])
    lut, n = block_lut(keep)
    assert n.tolist() == [3, 1]
    assert lut[0, :3].tolist() == [0, 2, 3] and lut[1, :1].tolist() == [3]


def test_block_mask_topk_cdf_and_dissimilar_blocks():
    d = 8
    q_pool = torch.zeros(1, 2, d)
    q_pool[0, :, 0] = 10.0
    k_pool = torch.zeros(1, 4, d)
    k_pool[0, :, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0])  # pooled scores decrease with the key block
    similar_q, similar_k = torch.ones(1, 2), torch.ones(1, 4)
    keep = block_mask(q_pool, similar_q, k_pool, similar_k, A.SpargeParams(topk=0.5, sim_threshold=0.0))
    assert keep[0].tolist() == [[True, True, False, False]] * 2
    # pooled probabilities ~ [0.971, 0.028, 8e-4, 2e-5]: the smallest prefix reaching 0.999 is two blocks
    keep = block_mask(q_pool, similar_q, k_pool, similar_k, A.SpargeParams(cdf_threshold=0.999, sim_threshold=0.0))
    assert keep[0, 0].tolist() == [True, True, False, False]
    keep = block_mask(q_pool, similar_q, k_pool, similar_k, A.SpargeParams(cdf_threshold=0.5, sim_threshold=0.0))
    assert keep[0, 0].tolist() == [True, False, False, False]
    dissimilar_k = torch.tensor([[1.0, 1.0, 1.0, 0.1]])  # block 3's tokens are not self-similar: always kept
    dissimilar_q = torch.tensor([[0.1, 1.0]])  # query block 0 likewise: its whole row is kept
    keep = block_mask(q_pool, dissimilar_q, k_pool, dissimilar_k, A.SpargeParams(topk=0.25, sim_threshold=0.5))
    assert keep[0].tolist() == [[True, True, True, True], [True, False, False, True]]


@pytest.mark.parametrize("mode", [dict(topk=0.5), dict(topk=0.1), dict(cdf_threshold=0.9), dict(cdf_threshold=0.5)],
                         ids=str)
def test_triton_block_plan_equals_the_torch_selection(mode):
    """The one-kernel plan keeps exactly block_mask's blocks, listed as block_lut lists them (random pooled
    summaries: no ties; some query / key blocks below the self-similarity threshold)."""
    g = torch.Generator().manual_seed(7)
    bh, nq, nk, d = 3, 5, 37, 16
    quant = ts.Quantized(*(None,) * 6, q_pool=torch.randn(bh, nq, d, generator=g).to(DEV) * 2,
                         q_sim=torch.rand(bh, nq, generator=g).to(DEV), k_pool=torch.randn(bh, nk, d, generator=g).to(DEV) * 2,
                         k_sim=torch.rand(bh, nk, generator=g).to(DEV))
    params = A.SpargeParams(sim_threshold=0.15, **mode).resolved()
    keep = block_mask(quant.q_pool, quant.q_sim, quant.k_pool, quant.k_sim, params)
    assert 0 < keep.float().mean() < 1 and (~(quant.q_sim > 0.15)).any() and (~(quant.k_sim > 0.15)).any()
    lut, n_sel = ts.block_plan(quant, params.topk, params.cdf_threshold, params.sim_threshold)
    ref_lut, ref_n = block_lut(keep)
    assert torch.equal(n_sel.cpu(), ref_n.cpu())
    assert torch.equal(lut.cpu(), ref_lut.cpu())


def test_triton_block_plan_edge_cases():
    """One key block, every key block dissimilar, and exact ties (same pooled key twice): the counts equal
    block_mask's (which of two tied blocks is kept may differ: torch.topk picks either)."""
    def compare(q_pool, q_sim, k_pool, k_sim, params):
        quant = ts.Quantized(*(None,) * 6, q_pool=q_pool.to(DEV), q_sim=q_sim.to(DEV), k_pool=k_pool.to(DEV),
                             k_sim=k_sim.to(DEV))
        p = params.resolved()
        lut, n_sel = ts.block_plan(quant, p.topk, p.cdf_threshold, p.sim_threshold)
        keep = block_mask(quant.q_pool, quant.q_sim, quant.k_pool, quant.k_sim, p)
        assert torch.equal(n_sel.cpu(), block_lut(keep)[1].cpu())
        return lut.cpu(), n_sel.cpu()

    g = torch.Generator().manual_seed(3)
    q_pool, ones_q = torch.randn(2, 3, 16, generator=g), torch.ones(2, 3)
    for params in (A.SpargeParams(topk=0.5, sim_threshold=0.0), A.SpargeParams(cdf_threshold=0.9, sim_threshold=0.0)):
        lut, n = compare(q_pool, ones_q, torch.randn(2, 1, 16, generator=g), torch.ones(2, 1), params)
        assert n.tolist() == [1] * 6 and lut.flatten().tolist() == [0] * 6
        lut, n = compare(q_pool, ones_q, torch.randn(2, 5, 16, generator=g), torch.zeros(2, 5), params)
        assert n.tolist() == [5] * 6  # no key block is self-similar: all kept
        k_pool = torch.randn(2, 6, 16, generator=g)
        k_pool[:, 1] = k_pool[:, 4]  # a tie
        compare(q_pool, ones_q, k_pool, torch.ones(2, 6), params)


def test_pooling_and_self_similarity_from_the_quantization_pass():
    q, k, v = qkv(b=1, lq=100, n=1)
    q = q.clone()
    q[:, :64] = q[:, :1]  # the first 64-row query block: one token repeated (self-similarity 1)
    cfg = ts.KernelConfig(64, 32, 4, 1)
    quant = ts.quantize(q, k, v, cfg, "fp16", pool=True)
    assert quant.q_sim[0, 0].item() == pytest.approx(1.0, abs=1e-3)
    assert quant.q_sim[0, 1].item() < 0.2  # random tokens
    assert torch.allclose(quant.q_pool[0, 1].cpu(), q[0, 64:100, 0].float().mean(0).cpu(), atol=1e-4)
    k_mean = k[0, :, 0].float().mean(0)
    assert torch.allclose(quant.k_pool[0, 0].cpu(), (k[0, :32, 0].float() - k_mean).mean(0).cpu(), atol=1e-4)


def test_sage_and_sparge_backends_in_a_dit():
    cfg = DiTConfig(dim=128, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)  # head dim 64
    dit = random_dit(cfg, DEV, DTYPE, 0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 12, generator=g).to(DEV)
    ctx = torch.randn(1, 512, 24, generator=g).to(DEV)
    t = torch.tensor([500.0], device=DEV)
    with torch.no_grad():
        ref = dit(x, t, ctx)
        with A.attach(dit, A.AttentionChoice("sage")) as h:
            sage = dit(x, t, ctx)
        ours = "gluon" if gluon_supported(DEV, 64) else "triton"  # Hopper runs our Gluon kernel
        assert h.report().kernel == f"sage[{ours}]" and rel(sage, ref) < 2e-2
        full = A.AttentionChoice("sparge", sparge=A.SpargeParams(topk=1.0))
        with A.attach(dit, full) as h:
            sparge = dit(x, t, ctx)
        assert h.selection == f"sparge[{ours}] (topk 1, sim -0.1, kept 100% of blocks)"
        assert rel(sparge, ref) < 2e-2


def test_sparge_kernel_counts_kept_blocks():
    q, k, v = qkv(b=1, lq=256)
    kern = SpargeKernel(A.SpargeParams(topk=0.5, sim_threshold=-1.0), DEV)
    kern.cfg = CFG or kern.cfg
    out = kern(q, k, v)
    assert torch.isfinite(out).all()
    nk = -(-256 // kern.cfg.block_n)
    assert kern.density() == pytest.approx(int(0.5 * nk) / nk)
