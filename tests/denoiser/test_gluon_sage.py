"""Our Hopper (Gluon) kernels of `sage` and `sage_int8`.

On any machine: they compile for sm_90 with the installed Triton, with wgmma pipelined (not serialized by
ptxas), TMA loads and, with the Triton they were tuned on (3.6, the benchmark machine's; CI has a later one), no
register spills; the backends pick them only where they run and build, and fall back to the Triton kernel when a
build fails. On a Hopper GPU: they match float64 attention (and its log-sum-exp) and the Triton kernel on the
same quantized inputs, on shapes with partial tiles, a single key block, both head dims, several (batch, head)
pairs, and tiny scores (where padded keys must still get no weight); the block-sparse walk (sparge's) matches the
Triton walk and float64 attention under the same block mask.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="our attention kernels are Triton / Gluon")
gs = pytest.importorskip("smartdiff.services.denoiser.attention.gluon_sage", exc_type=ImportError,
                         reason="this Triton has no Gluon Hopper API")

from smartdiff.services.denoiser.attention import sage

TUNED_ON = "3.6."  # the benchmark machine's Triton (docs/benchmarks.md); later ones may allocate differently
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


VARIANTS = [("fp16", False, 128), ("int8", False, 128), ("fp16", True, 64), ("fp16", True, 128),  # pv, sparse, keys
            ("exact", False, 128)]
COMPILE = """
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from smartdiff.services.denoiser.attention import gluon_sage as gs
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
out = {}
for pv, sparse, block_n, head_dim in json.loads(sys.argv[1]):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(gs.compile_sm90(pv, head_dim, sparse, block_n).asm["cubin"])
        f.flush()
        out[f"{pv} {sparse} {block_n} {head_dim}"] = subprocess.run([tool, "-sass", f.name], capture_output=True,
                                                                    text=True, check=True).stdout
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hopper_sass() -> dict[str, list[tuple[str, str]]]:
    """SASS of every variant, compiled in a fresh process: a process that has imported Triton under
    TRITON_INTERPRET=1 (the CPU run of test_attention_kernels) has interpreter versions of Triton's own library
    functions, which a real compilation cannot call."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    todo = [[pv, sparse, block_n, d] for pv, sparse, block_n in VARIANTS for d in (64, 128)]
    run = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(todo)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return {key: SASS_LINE.findall(text) for key, text in json.loads(run.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("pv,sparse,block_n", VARIANTS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compiles_for_hopper_with_pipelined_wgmma(hopper_sass, pv, sparse, block_n, head_dim):
    ops = hopper_sass[f"{pv} {sparse} {block_n} {head_dim}"]
    names = [op for op, _ in ops]
    mma = [(op, rest) for op, rest in ops if op.startswith(("HGMMA", "IGMMA"))]
    assert mma and any(op.startswith("UTMALDG") for op in names), "no wgmma / TMA in the kernel"
    if triton.__version__.startswith(TUNED_ON):  # register use was fitted with this Triton's code generation
        assert not any(op.startswith(("STL", "LDL")) for op in names), "registers spill to local memory"
    # ptxas serializes wgmma (C7512-C7514) by making every one wait for itself: each would carry gsb0
    waited = sum("gsb0" in rest for _, rest in mma)
    assert waited < len(mma) / 2, f"{waited} of {len(mma)} wgmma wait for themselves: serialized"


def test_backends_pick_gluon_only_where_it_runs_and_has_not_failed(monkeypatch):
    cpu = torch.device("cpu")
    assert not sage.gluon_supported(cpu, 128)
    assert sage._build_int8(None, cpu, torch.float32, 128).label == "sage_int8[triton]"
    monkeypatch.setattr(sage, "gluon_supported", lambda device, head_dim: True)
    monkeypatch.setattr(sage, "_GLUON_FAILED", {})
    assert sage._build_int8(None, cpu, torch.float32, 128).label == "sage_int8[gluon]"
    assert sage._build_sage(None, cpu, torch.float32, 128).label == "sage[gluon]"
    sage._GLUON_FAILED[("int8", 128)] = "CompilationError: no such op"  # an earlier request's build failed
    assert sage._build_int8(None, cpu, torch.float32, 128).label == "sage_int8[triton]"
    assert sage._build_int8(None, cpu, torch.float32, 64).label == "sage_int8[gluon]"
    assert sage._build_sage(None, cpu, torch.float32, 128).label == "sage[gluon]"


def test_attention_forward_refuses_tiles_and_plans_it_does_not_take():
    from smartdiff.services.denoiser.attention.triton_sage import Quantized

    def quant(q_rows, bn, v_dtype=torch.float16, bh=2, lq=256, lk=512):
        return Quantized(torch.zeros(bh, lq, 128, dtype=torch.int8), torch.zeros(bh, lq // q_rows),
                         torch.zeros(bh, lk, 128, dtype=torch.int8), torch.zeros(bh, lk // bn),
                         torch.zeros(bh, lk, 128, dtype=v_dtype), None)

    shape = torch.Size([1, 256, 2, 128])
    lut, n_sel = torch.zeros(4, 4, dtype=torch.int32), torch.ones(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="got 128x128$"):  # dense: 64-row query tiles only
        gs.attention_forward(quant(128, 128), shape, 512, torch.bfloat16, "fp16")
    with pytest.raises(ValueError, match="got 64x128 block-sparse"):  # a plan needs 128-row query blocks
        gs.attention_forward(quant(64, 128), shape, 512, torch.bfloat16, "fp16", lut=lut, n_sel=n_sel)
    with pytest.raises(ValueError, match="FP16 P.V only"):
        gs.attention_forward(quant(128, 128, torch.int8), shape, 512, torch.bfloat16, "int8", lut=lut, n_sel=n_sel)
    for bad in (dict(lut=lut), dict(lut=lut.long(), n_sel=n_sel), dict(lut=lut[:2], n_sel=n_sel[:2])):
        with pytest.raises(ValueError, match="lut int32 \\[4, 4\\] and n_sel int32 \\[4\\]"):
            gs.attention_forward(quant(128, 128), shape, 512, torch.bfloat16, "fp16", **bad)


def test_sparge_takes_the_gluon_walk_only_where_it_runs(monkeypatch):
    from smartdiff.services.denoiser.attention import SpargeParams, sparge

    cpu = torch.device("cpu")
    assert sparge.SpargeKernel(SpargeParams(topk=0.5), cpu, 128).label == "sparge[triton]"
    monkeypatch.setattr(sage, "gluon_supported", lambda device, head_dim: True)
    monkeypatch.setattr(sage, "_GLUON_FAILED", {})
    assert sparge.SpargeKernel(SpargeParams(topk=0.5), cpu, 128).label == "sparge[gluon]"
    assert sparge.build(None, cpu, torch.float32, 64).label == "sparge[gluon]"
    # the P.V skip is a Triton-kernel option; an earlier build failure is remembered per head dim
    assert sparge.SpargeKernel(SpargeParams(topk=0.5, pv_threshold=20.0), cpu, 128).label == "sparge[triton]"
    sage._GLUON_FAILED[("sparge", 128)] = "CompilationError: no such op"
    assert sparge.SpargeKernel(SpargeParams(topk=0.5), cpu, 128).label == "sparge[triton]"
    assert sparge.SpargeKernel(SpargeParams(topk=0.5), cpu, 64).label == "sparge[gluon]"


def test_sparge_falls_back_to_the_triton_walk_when_the_gluon_build_fails(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from smartdiff.services.denoiser.attention import SpargeParams, sparge

    failed = {}
    monkeypatch.setattr(sage, "gluon_supported", lambda device, head_dim: True)
    monkeypatch.setattr(sage, "_GLUON_FAILED", failed)
    kern = sparge.SpargeKernel(SpargeParams(topk=0.5), torch.device("cpu"), 64)
    walks = []

    def gluon_walk(*args, **kwargs):
        walks.append("gluon")
        raise OutOfResources(300000, 232448, "shared memory")

    def triton_walk(quant, q_shape, lk, dtype, cfg, pv, lut, n_sel, pv_threshold, lse=False):
        walks.append("triton")
        return "out"

    monkeypatch.setattr(kern.gluon, "attention_forward", gluon_walk)
    plans = []  # the blocks each call was planned on
    monkeypatch.setattr(kern.ts, "quantize", lambda q, k, v, cfg, pv, pool: plans.append(cfg) or "quant")
    # 4 query blocks x 2 key blocks; the Gluon-block plan keeps both, the Triton-block plan one of each row's two
    monkeypatch.setattr(kern.ts, "block_plan", lambda quant, *args: (torch.zeros(4, 2),
                                                                     torch.full((4,), 2 if len(plans) == 1 else 1)))
    monkeypatch.setattr(kern.ts, "attention_forward", triton_walk)
    q = torch.zeros(1, 4, 1, 64)
    assert kern(q, q, q) == "out" and kern(q, q, q) == "out"
    assert walks == ["gluon", "triton", "triton"]  # no new attempt once it has failed
    assert kern.label == "sparge[triton]" and "shared memory" in failed[("sparge", 64)]
    gluon_blocks, triton_blocks = plans[0], plans[1]  # the failed call was planned again on the Triton walk's tiles
    assert (gluon_blocks.block_m, gluon_blocks.block_n) == sparge.GLUON_BLOCKS and plans[2] == triton_blocks
    assert kern.density() == 0.5  # the walks that ran (not the failed one's plan, which kept every block)
    assert sparge.SpargeKernel(SpargeParams(topk=0.5), torch.device("cpu"), 64).label == "sparge[triton]"


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_falls_back_to_triton_when_a_build_fails(monkeypatch, fail_on_call):
    """Triton compiles again for new specialisations, so a later call can fail to build too; the failure is
    remembered for the process, so later requests do not try again."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(sage, "_GLUON_FAILED", {})
    calls = []

    def gluon(q, k, v, pv, lse=False):
        calls.append(lse)
        if len(calls) == fail_on_call:
            raise OutOfResources(300000, 232448, "shared memory")
        return ("gluon", pv, lse)

    class FakeTriton:
        def __init__(self, name, device, pv):
            self.label = f"{name}[triton]"

        def __call__(self, q, k, v):
            return ("triton", False)

        def with_lse(self, q, k, v):
            return ("triton", True)

    monkeypatch.setattr(sage, "TritonSageKernel", FakeTriton)
    kern = sage.GluonSageKernel("sage_int8", torch.device("cpu"), "int8", 64)
    monkeypatch.setattr(kern, "run", gluon)
    q = torch.zeros(1, 4, 1, 64)
    first = kern(q, q, q)
    assert first == (("triton", False) if fail_on_call == 1 else ("gluon", "int8", False))
    assert kern.with_lse(q, q, q) == ("triton", True)
    assert kern(q, q, q) == ("triton", False)
    assert kern.label == "sage_int8[triton]"
    assert len(calls) == fail_on_call  # no new attempt once it has failed
    assert "shared memory" in sage._GLUON_FAILED[("int8", 64)]
    monkeypatch.setattr(sage, "gluon_supported", lambda device, head_dim: True)
    assert sage._build_int8(None, torch.device("cpu"), torch.float32, 64).label == "sage_int8[triton]"


def reference(q, k, v):
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
    return (torch.softmax(s, -1) @ vd).transpose(1, 2), torch.logsumexp(s, -1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(b, lq, lk, h, d, scale=1.0, k_shift=0.5, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, lq, h, d, device="cuda", generator=g) * scale
    k = (torch.randn(b, lk, h, d, device="cuda", generator=g) + k_shift) * scale
    v = torch.randn(b, lk, h, d, device="cuda", generator=g)
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("pv,tol", [("fp16", 2.5e-2), ("int8", 3e-2)])
@pytest.mark.parametrize("shape", [(1, 200, 333, 2, 128), (2, 130, 128, 3, 128), (1, 64, 1000, 2, 64),
                                   (1, 300, 100, 2, 128), (1, 100, 50, 2, 128), (1, 4100, 4100, 1, 128)])
def test_matches_float64_and_the_triton_kernel(pv, tol, shape):
    from smartdiff.services.denoiser.attention import triton_sage as ts

    q, k, v = qkv(*shape)
    ref, ref_lse = reference(q, k, v)
    out, lse = gs.sage_attention(q, k, v, pv, lse=True)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < tol
    assert (lse.double() - ref_lse).abs().max().item() < 3e-2
    # the Triton kernel on the same quantized inputs: only accumulation order and P's rounding path differ
    cfg = gs.config(pv)
    quant = ts.quantize(q, k, v, cfg, pv)
    ours = gs.attention_forward(quant, q.shape, k.shape[1], q.dtype, pv)
    assert rel(ours, ts.attention_forward(quant, q.shape, k.shape[1], q.dtype, cfg, pv)) < 5e-3


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("block_n", [64, 128])
def test_block_sparse_walk_matches_the_triton_walk_and_masked_float64(block_n):
    from smartdiff.services.denoiser.attention import triton_sage as ts
    from smartdiff.services.denoiser.attention.sparge import block_lut

    lq, lk = 300, 700
    q, k, v = qkv(1, lq, lk, 2, 128)
    cfg = ts.KernelConfig(128, block_n, 4, 3)  # sparge's plan: 128-row query blocks
    quant = ts.quantize(q, k, v, cfg, "fp16", pool=True)
    nq, nk = quant.qs.shape[1], quant.ks.shape[1]
    keep = torch.rand(2, nq, nk, generator=torch.Generator().manual_seed(3)) < 0.5
    keep[..., 0] |= ~keep.any(-1)  # every query block keeps a block (as sparge's selection does)
    keep[0, 0] = False
    keep[0, 0, -1] = True  # a row keeping only the partial last block
    keep[1, -1] = False
    keep[1, -1, 1] = True  # a row keeping one middle block
    keep = keep.cuda()
    lut, n_sel = block_lut(keep)
    ours, lse = gs.attention_forward(quant, q.shape, lk, q.dtype, "fp16", lse=True, lut=lut, n_sel=n_sel)
    theirs, lse_t = ts.attention_forward(quant, q.shape, lk, q.dtype, cfg, "fp16", lut, n_sel, lse=True)
    assert rel(ours, theirs) < 5e-3
    assert (lse[:, :lq] - lse_t[:, :lq]).abs().max().item() < 1e-2
    mask = keep[:, torch.arange(lq, device="cuda") // 128][:, :, torch.arange(lk, device="cuda") // block_n]
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    s = (qd @ kd.transpose(-1, -2) * 128 ** -0.5).masked_fill(~mask[None], float("-inf"))
    assert rel(ours, (torch.softmax(s, -1) @ vd).transpose(1, 2)) < 2.5e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_sparge_gluon_walk_on_its_own_plan():
    """The backend's path: sparge's plan (block_plan on GLUON_BLOCKS, several blocks each way), the Gluon walk
    against the Triton walk on the same plan, and the kept fraction it reports."""
    from smartdiff.services.denoiser.attention import SpargeParams, sparge
    from smartdiff.services.denoiser.attention import triton_sage as ts

    q, k, v = qkv(2, 900, 1100, 3, 128)
    kern = sparge.SpargeKernel(SpargeParams(topk=0.5, sim_threshold=-1.0), q.device, 128)
    assert kern.label == "sparge[gluon]" and (kern.cfg.block_m, kern.cfg.block_n) == sparge.GLUON_BLOCKS
    out = kern(q, k, v)
    quant = ts.quantize(q, k, v, kern.cfg, "fp16", pool=True)
    lut, n_sel = ts.block_plan(quant, 0.5, None, -1.0)
    assert rel(out, ts.attention_forward(quant, q.shape, 1100, q.dtype, kern.cfg, "fp16", lut, n_sel)) < 5e-3
    nk = quant.ks.shape[1]  # 9 key blocks: each query block keeps int(0.5 * 9) = 4
    assert kern.density() == pytest.approx(4 / nk) and n_sel.eq(4).all()
    # with the log-sum-exp (ring attention's merge): the same output, and float64's LSE over the kept blocks
    out_lse, lse = kern.with_lse(q, k, v)
    assert torch.equal(out_lse, out) and lse.shape == (2, 3, 900)
    keep = torch.zeros(2 * 3 * quant.qs.shape[1], nk, dtype=torch.bool, device=q.device)
    keep[torch.arange(keep.shape[0], device=q.device)[:, None], lut[:, :4].long()] = True
    keep = keep.view(2, 3, -1, nk)[:, :, torch.arange(900, device=q.device) // 128]
    keep = keep[..., torch.arange(1100, device=q.device) // 128]
    qd, kd = (x.double().transpose(1, 2) for x in (q, k))
    ref_lse = (qd @ kd.transpose(-1, -2) * 128 ** -0.5).masked_fill(~keep, float("-inf")).logsumexp(-1)
    assert (lse.double() - ref_lse).abs().max().item() < 3e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("pv", ["fp16", "int8"])
@pytest.mark.parametrize("case", ["small scores", "one key"])
def test_padded_keys_get_no_weight_when_scores_are_tiny(pv, case):
    """Tiny score scales (small q and k; or one key, whose smoothed K is 0): a padded key's exponent is then not
    far below 0, so the tail block must zero its probability (it held 1/64 of the weight with one key)."""
    q, k, v = qkv(1, 70, 65, 2, 128, scale=0.05) if case == "small scores" else qkv(1, 70, 1, 2, 128)
    ref, _ = reference(q, k, v)
    assert rel(gs.sage_attention(q, k, v, pv), ref) < 3e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_int8_never_wraps_the_largest_probability():
    """Large scores (q, k scaled by 12): 127 p of a row's maximum must stay 127, not wrap to -128 (a float
    emulation of the kernel without the round-up of c puts it at 128.4 here; at scale 6, 127.3)."""
    q, k, v = qkv(1, 512, 512, 2, 128, scale=12, k_shift=0.0, seed=1)  # 127 p of the max would round to 128.4
    ref, _ = reference(q, k, v)
    same_qk = rel(gs.sage_attention(q, k, v, "fp16"), ref)  # the INT8 Q.K^T error of such peaked rows
    assert rel(gs.sage_attention(q, k, v, "int8"), ref) < 1.2 * same_qk


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_backends_run_gluon_on_hopper():
    from smartdiff.services.denoiser import attention as A

    for name in ("sage", "sage_int8"):
        choice = A.AttentionChoice(name)
        res = A.resolve(choice, torch.device("cuda"), torch.bfloat16, 128)
        kern = A.handle.build_kernel(res, choice, torch.device("cuda"), torch.bfloat16, 128)
        if name == "sage" and sage.sageattention_package() is not None:
            continue
        q, k, v = qkv(1, 300, 300, 2, 128)
        kern(q, k, v)  # a build failure would switch the label to [triton] here
        assert kern.label == f"{name}[gluon]"


# --- the exact kernel (gluon_sage.exact_attention), run by `flash_attn` on Hopper without a FlashAttention package


def test_exact_attention_reads_row_views_in_place_and_copies_only_what_tma_cannot_read():
    qkv_out = torch.randn(2, 33, 3, 4, 128, dtype=torch.bfloat16)  # a fused QKV projection's output
    for x in qkv_out.unbind(2):
        assert gs._rows(x).data_ptr() == x.data_ptr() and torch.equal(gs._rows(x), x.reshape(66, 512))
    one = torch.randn(1, 33, 4, 128, dtype=torch.bfloat16)[:, :20]  # batch 1: a prefix of the sequence
    assert gs._rows(one).data_ptr() == one.data_ptr() and torch.equal(gs._rows(one), one.reshape(20, 512))
    for x in (qkv_out[:, :20, 0], torch.randn(2, 4, 33, 128, dtype=torch.bfloat16).transpose(1, 2)):
        rows = gs._rows(x)  # sequences not one stride apart / heads first: copied
        assert rows.data_ptr() != x.data_ptr() and torch.equal(rows, x.reshape(-1, 512))


def test_exact_attention_refuses_what_it_does_not_take():
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        gs.exact_attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="one dtype"):
        gs.exact_attention(q, q.half(), q)
    with pytest.raises(ValueError, match=r"D in \(64, 128\)"):
        gs.exact_attention(q[..., :96], q[..., :96], q[..., :96])
    with pytest.raises(ValueError, match=r"k, v \[B, Lk, N, D\]"):
        gs.exact_attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="Lk >= 1"):  # no key block: the kernel would wait forever
        gs.exact_attention(q, q[:, :0], q[:, :0])


def test_flash_attn_runs_our_exact_kernel_only_on_hopper_and_falls_back_when_its_build_fails(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from smartdiff.services.denoiser.attention import default_backend, flash

    cpu = torch.device("cpu")
    monkeypatch.setattr(flash, "installed", lambda: None)
    monkeypatch.setattr(sage, "_GLUON_FAILED", {})
    assert isinstance(flash.build(None, cpu, torch.bfloat16, 128), flash.FallbackKernel)
    assert flash._redundant(cpu, 128) is not None  # auto need not time SDPA twice
    monkeypatch.setattr(sage, "gluon_supported", lambda device, head_dim: True)
    kern = flash.build(None, cpu, torch.bfloat16, 128)
    assert kern.label == "flash_attn[gluon]" and flash._redundant(cpu, 128) is None
    calls = []

    def failing(q, k, v, lse=False):
        calls.append(lse)
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(kern, "run", failing)
    q = torch.randn(1, 5, 2, 128)
    out = kern(q, q, q)  # SDPA on the CPU instead, and the failure is remembered
    assert torch.allclose(out, torch.softmax(q.transpose(1, 2) @ q.transpose(1, 2).mT / 128 ** 0.5, -1).matmul(
        q.transpose(1, 2)).transpose(1, 2), atol=1e-5)
    assert kern(q, q, q).shape == q.shape and calls == [False]
    assert "shared memory" in sage._GLUON_FAILED[("exact", 128)]
    assert "no flash-attn package" in kern.describe() and "failed to build: out of resource" in kern.describe()
    assert isinstance(flash.build(None, cpu, torch.bfloat16, 128), flash.FallbackKernel)
    assert flash.build(None, cpu, torch.bfloat16, 64).label == "flash_attn[gluon]"
    # requests that name no backend: flash_attn where it runs and is allowed, else sdpa
    assert default_backend(cpu, torch.float32, 128) == "sdpa"
    assert default_backend(torch.device("cuda"), torch.bfloat16, 128) == "flash_attn"
    assert default_backend(torch.device("cuda"), torch.float32, 128) == "sdpa"  # flash_attn is 16-bit only
    assert default_backend(torch.device("cuda"), torch.bfloat16, 128, allowed=("sage",)) == "sdpa"


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 200, 333, 2, 128), (2, 130, 128, 3, 128), (2, 64, 1000, 2, 64),
                                   (1, 300, 100, 2, 128), (1, 100, 50, 2, 128), (1, 4100, 4100, 1, 128),
                                   (3, 777, 513, 2, 64), (2, 300, 129, 3, 128), (2, 512, 384, 2, 128)])
def test_exact_kernel_matches_float64_and_cudnn(shape, dtype):
    """Rows past a sequence's end belong to the next one in the [B * L, N * D] view: they must get no weight."""
    q, k, v = (x.to(dtype) for x in qkv(*shape))
    ref, ref_lse = reference(q, k, v)
    out, lse = gs.exact_attention(q, k, v, lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (shape[0], shape[3], shape[1])
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert rel(out, ref) < 2 * rel(sdpa, ref) + 1e-4  # as exact as PyTorch's own kernel
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3
    assert torch.equal(gs.exact_attention(q, k, v), out)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_exact_kernel_reads_strided_views_in_place_and_copies_others():
    b, l, h, d = 2, 333, 3, 128
    qkv_out = torch.randn(b, l, 3, h, d, device="cuda", dtype=torch.bfloat16)  # a fused QKV projection's output
    q, k, v = qkv_out.unbind(2)
    ref, _ = reference(q, k, v)
    assert rel(gs.exact_attention(q, k, v), ref) < 1e-2
    heads_first = torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # not a row view
    assert rel(gs.exact_attention(heads_first, k, v), reference(heads_first, k, v)[0]) < 1e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_flash_attn_runs_our_exact_kernel_on_hopper():
    from smartdiff.services.denoiser import attention as A
    from smartdiff.services.denoiser.attention import flash

    if flash.installed():
        pytest.skip("a FlashAttention package is installed: flash_attn runs it")
    choice = A.AttentionChoice("flash_attn")
    kern = A.handle.build_kernel(A.resolve(choice, "cuda", torch.bfloat16, 128), choice, torch.device("cuda"),
                                 torch.bfloat16, 128)
    q, k, v = qkv(1, 300, 300, 2, 128)
    out, lse = kern.with_lse(q, k, v)
    assert kern.label == "flash_attn[gluon]" and kern.describe() == "flash_attn[gluon]"
    assert A.default_backend("cuda", torch.bfloat16, 128) == "flash_attn"
    ref, ref_lse = reference(q, k, v)
    assert rel(out, ref) < 1e-2 and (lse.double() - ref_lse).abs().max().item() < 1e-3
