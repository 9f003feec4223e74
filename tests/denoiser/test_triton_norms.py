"""The Triton norm kernels (services/denoiser/triton_norms.py: q/k RMS norm + RoPE, and the layer norms with
modulation / affine weights / a residual add) against the reference functions of fused.py, and FusedOps' use of
them.

On a CPU-only machine the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set here before it is
imported); with a GPU, on the GPU. The interpreter rounds float32 -> bfloat16 differently from the GPU (not to
nearest even), so bfloat16 results are checked to a few bfloat16 steps here, and bit for bit only on a GPU.
"""

import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton.jit when the kernel module is imported
pytest.importorskip("triton", reason="the kernel is Triton (CPU tests run it through TRITON_INTERPRET=1)")
if not GPU:
    from triton_interpreter import require_interpreter

    require_interpreter()

from smartdiff.services.denoiser import fused  # noqa: E402
from smartdiff.services.denoiser.dit import ForwardHooks, rope_cos_sin  # noqa: E402
from smartdiff.services.denoiser.fused import FusedOps  # noqa: E402
from smartdiff.services.denoiser.triton_norms import layer_norm, rms_rope  # noqa: E402

DEV = torch.device("cuda" if GPU else "cpu")


def reference(x, w, heads, rope=None, groups=1):
    y = fused.rms_norm(x, w, 1e-6).unflatten(-1, (heads, -1))
    if rope is not None:
        y = fused.rope(y, *rope)
    return fused.head_groups(y, groups) if groups > 1 else y


@pytest.mark.parametrize("batch, grid, heads, d, groups, use_rope", [
    (2, (2, 3, 5), 4, 16, 1, True),   # 4 heads: a power of 2
    (1, (3, 2, 2), 6, 8, 2, True),    # 6 heads padded to 8 in the tile, two head groups (Ulysses)
    (2, (1, 3, 3), 3, 32, 3, True),   # 3 heads, three groups of one
    (1, (1, 1, 1), 5, 4, 1, True),    # one token
    (2, (2, 3, 5), 4, 16, 1, False),  # the cross-attention norm: no RoPE
    (1, (3, 2, 2), 6, 8, 1, False),
])
def test_kernel_matches_the_reference_in_float32(batch, grid, heads, d, groups, use_rope):
    g = torch.Generator().manual_seed(0)
    length, c = grid[0] * grid[1] * grid[2], heads * d
    qkv = (3 * torch.randn(batch, length, 3 * c, generator=g)).to(DEV)
    x = qkv[..., c:2 * c]  # a column slice of a fused projection: row stride 3C
    w = (torch.rand(c, generator=g) + 0.5).to(DEV)
    rope = rope_cos_sin(d, grid, DEV) if use_rope else None
    want = reference(x, w, heads, rope, groups)
    got = rms_rope(x, w, 1e-6, heads, rope, groups)
    assert got.shape == want.shape and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_kernel_in_bfloat16():
    g = torch.Generator().manual_seed(1)
    heads, d, grid = 4, 32, (2, 4, 5)
    x = (3 * torch.randn(2, 40, heads * d, generator=g)).to(DEV, torch.bfloat16)
    w = (torch.rand(heads * d, generator=g) + 0.5).to(DEV, torch.bfloat16)
    rope = rope_cos_sin(d, grid, DEV)
    want = reference(x, w, heads, rope)
    got = rms_rope(x, w, 1e-6, heads, rope)
    assert got.dtype == torch.bfloat16
    if GPU:  # the same roundings in the same order: equal but for the odd last-bit flip of rsqrt
        assert (got != want).float().mean().item() < 1e-3
    # the interpreter truncates: each of the three roundings may lose one bfloat16 step (2^-8 relative), and
    # RoPE's differences turn that into absolute errors of a few steps of the largest values
    err = (got.float() - want.float()).abs()
    assert err.max() <= 4 * 2**-8 * want.float().abs().max()
    assert (err.norm() / want.float().norm()).item() < 1.5e-2  # a wrong rotation or norm errs ~1


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_in_float16_is_bit_exact_including_a_float32_gain(w_dtype, groups):
    """float16 rounds to nearest in the interpreter too, so every rounding step of the reference (normalised in
    float32 -> x's dtype, times the gain -> the promoted dtype, rotated in float32 -> that dtype) must be the
    kernel's: dropping one of them changes about a quarter of the values. (On a GPU, whose rsqrt is approximate,
    a last-bit flip is allowed in under 1% of them.)"""
    g = torch.Generator().manual_seed(3)
    heads, d, grid = 4, 16, (2, 3, 4)
    qkv = (3 * torch.randn(2, 24, 3 * heads * d, generator=g)).to(DEV, torch.float16)
    x = qkv[..., :heads * d]
    w = (torch.rand(heads * d, generator=g) + 0.5).to(DEV, w_dtype)
    rope = rope_cos_sin(d, grid, DEV)
    want = reference(x, w, heads, rope, groups)
    got = rms_rope(x, w, 1e-6, heads, rope, groups)
    assert got.dtype == want.dtype == torch.promote_types(torch.float16, w_dtype)
    if GPU and w_dtype == torch.float32:  # float32 output: FMAs in the rotation move the last bits of 1 in 7
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    elif GPU:  # the GPU's approximate rsqrt may flip a last bit before a rounding step
        diff = (got.float() - want.float()).abs()
        flipped = (got != want).float().mean().item()
        assert flipped < 1e-2 and diff.max() <= 2 * 2**-10 * want.float().abs().max(), (flipped, diff.max())
    else:
        assert torch.equal(got, want)


def test_kernel_reads_any_layout_of_x_and_a_strided_gain():
    """One token per row of a batch (the batch stride is then the row stride), [L, B, C] transposed (no single row
    stride: read from a copy), and a non-contiguous gain."""
    g = torch.Generator().manual_seed(4)
    heads, d = 2, 8
    big = torch.randn(3, 5, heads * d, generator=g).to(DEV)
    wide = torch.rand(2 * heads * d, generator=g).to(DEV) + 0.5
    w = wide[::2]
    for x in (big[:, :1], torch.randn(5, 3, heads * d, generator=g).to(DEV).transpose(0, 1)):
        rope = rope_cos_sin(d, (1, 1, x.shape[1]), DEV)
        torch.testing.assert_close(rms_rope(x, w, 1e-6, heads, rope), reference(x, w, heads, rope),
                                   atol=2e-6, rtol=2e-6)


def test_kernel_rejects_what_it_cannot_read():
    x = torch.randn(1, 6, 24, device=DEV)
    w = torch.ones(24, device=DEV)
    with pytest.raises(ValueError, match="head dim must be a power of 2"):
        rms_rope(x, w, 1e-6, heads=2)  # D = 12
    with pytest.raises(ValueError, match="heads must divide C"):
        rms_rope(x, w, 1e-6, heads=5)
    with pytest.raises(ValueError, match="weight must be"):
        rms_rope(x, torch.ones(12, device=DEV), 1e-6, heads=3)
    with pytest.raises(ValueError, match="RoPE tables"):
        rms_rope(x, w, 1e-6, 3, rope_cos_sin(8, (1, 2, 2), DEV))  # tables for 4 tokens, x has 6
    cos, sin = rope_cos_sin(8, (1, 2, 3), DEV)
    with pytest.raises(ValueError, match="RoPE tables"):
        rms_rope(x, w, 1e-6, 3, (cos, sin[:4]))  # a short sin table
    with pytest.raises(ValueError, match="RoPE tables"):
        rms_rope(x, w, 1e-6, 3, (cos.double(), sin.double()))


def test_fused_ops_run_the_kernel_when_asked_and_fall_back_after_a_failed_build(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from smartdiff.services.denoiser import triton_norms

    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 12, 64, generator=g).to(DEV) for _ in range(2))
    wq, wk = (torch.rand(64, generator=g).to(DEV) + 0.5 for _ in range(2))
    cos, sin = rope_cos_sin(16, (1, 3, 4), DEV)
    ops = FusedOps(compile=False, kernels=True)
    calls = []
    real = triton_norms.rms_rope
    monkeypatch.setattr(triton_norms, "rms_rope", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = ops.norm_rope(q, k, wq, wk, 1e-6, 4, cos, sin)
    assert len(calls) == 2
    want = fused.norm_rope(q, k, wq, wk, 1e-6, 4, cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(ops.norm_heads(q, wq, 1e-6, 4), reference(q, wq, 4), atol=2e-6, rtol=2e-6)
    assert len(calls) == 3
    assert not FusedOps(compile=False, kernels=True)._kernel(torch.zeros(1, 2, 24), lambda tn: True,
                                                              lambda: False, heads=2)  # head dim 12: reference

    def not_a_build_failure(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(triton_norms, "rms_rope", not_a_build_failure)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a real error is not hidden
        ops.norm_rope(q, k, wq, wk, 1e-6, 4, cos, sin)
    assert ops.kernels is True

    def failing(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(triton_norms, "rms_rope", failing)
    got = ops.norm_rope(q, k, wq, wk, 1e-6, 4, cos, sin)  # logged, then the reference ops
    assert ops.kernels is False
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    monkeypatch.setattr(triton_norms, "rms_rope", lambda *a, **kw: pytest.fail("tried again after a failure"))
    ops.norm_heads(q, wq, 1e-6, 4)


def test_a_compiled_dit_with_the_kernel_matches_eager(monkeypatch):
    """The whole DiT, compiled with the q/k kernels forced on (as on CUDA), against its eager forward."""
    from smartdiff.services.denoiser import triton_norms
    from smartdiff.services.denoiser.weights import random_dit
    from smartdiff.shared.config import DiTConfig

    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=2, freq_dim=32, text_dim=24)
    dit = random_dit(cfg, DEV, torch.float32, seed=5).eval()
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(2, 16, 2, 4, 6, generator=g).to(DEV), torch.randn(2, 512, 24, generator=g).to(DEV)
    t = torch.tensor([999.0, 10.0], device=DEV)
    with torch.no_grad():
        eager = dit(x, t, ctx)
        dit.set_compiled(True)
        ops = dit.blocks[0].ops
        assert ops.kernels and not ops._kernels_on_cpu  # on by default when compiled, for CUDA tensors
        ops._kernels_on_cpu = True  # what CUDA does, here through the interpreter
        calls, real, real_ln = [], triton_norms.rms_rope, triton_norms.layer_norm

        def counted(x, weight, eps, heads, rope=None, groups=1):
            calls.append("rope" if rope is not None else "rms")
            return real(x, weight, eps, heads, rope, groups)

        def counted_ln(x, eps, **kw):
            calls.append("ln " + " ".join(sorted(k for k, v in kw.items() if v is not None)))
            return real_ln(x, eps, **kw)

        monkeypatch.setattr(triton_norms, "rms_rope", counted)
        monkeypatch.setattr(triton_norms, "layer_norm", counted_ln)
        got = dit(x, t, ctx)
    assert ops.kernels  # no fallback happened
    assert calls == ["ln scale shift", "rope", "rope",  # self-attention: modulated norm, q, k with RoPE
                     "ln bias gate residual weight", "rms", "rms",  # gated residual + cross norm; cross q, k
                     "ln residual scale shift"] * cfg.num_layers  # residual + the MLP's modulated norm
    assert ((got - eager).norm() / eager.norm()).item() < 1e-5
    calls.clear()  # with a cache's attention hook (which may skip the cross-attention): the norm on its own
    with torch.no_grad():
        hooked = dit(x, t, ctx, hooks=ForwardHooks(attention=lambda i, kind, compute: compute()))
    assert calls == ["ln scale shift", "rope", "rope", "ln bias weight", "rms", "rms",
                     "ln residual scale shift"] * cfg.num_layers
    assert ((hooked - eager).norm() / eager.norm()).item() < 1e-5
    assert ((got - eager).norm() / eager.norm()).item() < 1e-5


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from smartdiff.services.denoiser import triton_norms as tn
sig = dict(X="*bf16", Wt="*bf16", COS="*fp32", SIN="*fp32", O="*bf16", rows="i32", L="i32", N="i32", x_row="i32",
           cos_row="i32", group_n="i32", o_group="i32", eps="fp32", ROPE="constexpr", BLOCK_T="constexpr",
           BLOCK_N="constexpr", D="constexpr")
# what rms_rope launches at Wan-1.3B's width (4 warps) and Wan-14B's (8 warps); without RoPE the tables are `out`
for consts, warps in ((dict(ROPE=True, BLOCK_T=2, BLOCK_N=16, D=128), 4),
                      (dict(ROPE=False, BLOCK_T=2, BLOCK_N=16, D=128), 4),
                      (dict(ROPE=True, BLOCK_T=1, BLOCK_N=64, D=128), 8),
                      (dict(ROPE=False, BLOCK_T=1, BLOCK_N=64, D=128), 8)):
    s = dict(sig) | {k: "constexpr" for k in consts}
    if not consts["ROPE"]:
        s |= dict(COS="*bf16", SIN="*bf16")
    triton.compile(ASTSource(tn._rms_rope_kernel, s, consts), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps))
# the layer norms as launched at both widths, each variant (vectors: the fp32 modulation, bf16 affine weights)
sig = dict(X="*bf16", Y="*bf16", GATE="*fp32", SHIFT="*fp32", SCALE="*fp32", Wt="*bf16", Bs="*bf16", S="*bf16",
           H="*bf16", L="i32", C="i32", x_b="i32", x_l="i32", y_b="i32", y_l="i32", gate_b="i32", shift_b="i32",
           scale_b="i32", eps="fp32")
for c in (1536, 5120):
    block_c = triton.next_power_of_2(c)
    block_t, tiles, warps = tn.layer_norm_config(block_c)
    for residual, modulate, affine in ((0, True, False), (1, True, False), (0, False, True), (2, False, True)):
        consts = dict(RESIDUAL=residual, MODULATE=modulate, AFFINE=affine, ROWS=block_t * tiles, BLOCK_T=block_t,
                      BLOCK_C=block_c)
        triton.compile(ASTSource(tn._layer_norm_kernel, dict(sig) | {k: "constexpr" for k in consts}, consts),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
print("ok")
"""


def test_kernel_compiles_for_the_gpu():
    """The interpreter does not check layouts (tl.split / tl.join of the RoPE pairs) or registers: build the
    kernels for sm_90 at Wan-1.3B's and Wan-14B's widths in a fresh process (no TRITON_INTERPRET)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# ---- the layer norms ----

def ln_reference(mode, x, y, e, w, b):
    """fused.py's function for each layer_norm mode -> (residual sum or None, normed)."""
    shift, scale, gate = e[:, 0], e[:, 1], e[:, 2]
    if mode == "modulate":
        return None, fused.modulate(x, shift, scale, 1e-6)
    if mode == "affine":
        return None, fused.affine_norm(x, w, b, 1e-6)
    if mode == "add_modulate":
        return fused.add_modulate(x, y, shift, scale, 1e-6)
    return fused.gated_affine_norm(x, y, gate, w, b, 1e-6)


def ln_kernel(mode, x, y, e, w, b):
    shift, scale, gate = e[:, 0], e[:, 1], e[:, 2]  # strided views of e, as the DiT passes them
    if mode == "modulate":
        return None, layer_norm(x, 1e-6, shift=shift, scale=scale)
    if mode == "affine":
        return None, layer_norm(x, 1e-6, weight=w, bias=b)
    if mode == "add_modulate":
        return layer_norm(x, 1e-6, residual=y, shift=shift, scale=scale)
    return layer_norm(x, 1e-6, residual=y, gate=gate, weight=w, bias=b)


def ln_inputs(batch, length, c, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, c, generator=g) * 2 + 0.5).to(DEV, dtype)  # a mean away from 0
    y = torch.randn(batch, length, c, generator=g).to(DEV, dtype)
    e = (torch.randn(batch, 6, c, generator=g) * 0.5).to(DEV)  # float32, as the timestep projection
    w, b = (torch.randn(c, generator=g).to(DEV) for _ in range(2))
    return x, y, e, w, b


MODES = ("modulate", "affine", "add_modulate", "gated_affine")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch, length, c", [
    (2, 37, 40),  # 40 channels padded to 64 in the tile; rows not a multiple of the tile; two batch elements
    (1, 1, 16),   # one token
    (1, 9, 256),
])
def test_layer_norm_matches_the_reference_in_float32(mode, batch, length, c):
    x, y, e, w, b = ln_inputs(batch, length, c, torch.float32)
    (s, h), (rs, rh) = ln_kernel(mode, x, y, e, w, b), ln_reference(mode, x, y, e, w, b)
    assert h.dtype == x.dtype and h.shape == x.shape
    torch.testing.assert_close(h, rh, atol=2e-5, rtol=2e-5)
    if rs is not None:
        torch.testing.assert_close(s, rs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_layer_norm_rounds_the_residual_as_the_reference(mode):
    """float16 (the interpreter rounds it to nearest, as the GPU): the residual sum is the reference's bit for
    bit, with its rounding step (x + y in float16; x + y * gate in float32, then rounded); the norm to one step.
    On the GPU x + y * gate is one fused multiply-add (as in Inductor's code), which rounds the product once
    less than eager PyTorch: rare one-step differences there."""
    x, y, e, w, b = ln_inputs(2, 21, 48, torch.float16)
    (s, h), (rs, rh) = ln_kernel(mode, x, y, e, w, b), ln_reference(mode, x, y, e, w, b)
    if rs is not None:
        if GPU and mode == "gated_affine":
            torch.testing.assert_close(s, rs, atol=0, rtol=2 ** -10)
            assert (s != rs).float().mean() < 0.01
        else:
            assert torch.equal(s, rs)
    torch.testing.assert_close(h, rh, atol=4e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_layer_norm_in_bfloat16(mode):
    x, y, e, w, b = ln_inputs(2, 21, 48, torch.bfloat16)
    (s, h), (rs, rh) = ln_kernel(mode, x, y, e, w, b), ln_reference(mode, x, y, e, w, b)
    steps = 1 if GPU else 2  # the interpreter truncates to bfloat16
    if rs is not None:
        torch.testing.assert_close(s.float(), rs.float(), atol=0, rtol=steps * 2 ** -7)
    torch.testing.assert_close(h.float(), rh.float(), atol=steps * 2e-2, rtol=steps * 2 ** -7)


def test_layer_norm_reads_strided_inputs_and_low_precision_weights():
    """x a column slice of a wider tensor (read in place), y transposed (copied); bfloat16 affine weights are
    taken to float32 as the reference's weight.float()."""
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(2, 11, 80, generator=g).to(DEV)
    x = wide[..., 16:56]
    y = torch.randn(2, 40, 11, generator=g).to(DEV).transpose(1, 2)
    e = torch.randn(2, 6, 40, generator=g).to(DEV)
    w, b = (torch.randn(40, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    s, h = layer_norm(x, 1e-6, residual=y, gate=e[:, 2], weight=w, bias=b)
    rs, rh = fused.gated_affine_norm(x, y, e[:, 2], w, b, 1e-6)
    torch.testing.assert_close(s, rs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, rh, atol=2e-5, rtol=2e-5)
    assert layer_norm(x[:, :0], 1e-6, shift=e[:, 0], scale=e[:, 1]).shape == (2, 0, 40)


def test_layer_norm_shares_one_row_of_vectors_across_the_batch():
    """[1, C] modulation / gate (one timestep for the whole batch) broadcast as in the reference."""
    x, y, e, w, b = ln_inputs(3, 10, 24, torch.float32)
    one = e[:1]
    torch.testing.assert_close(layer_norm(x, 1e-6, shift=one[:, 0], scale=one[:, 1]),
                               fused.modulate(x, one[:, 0], one[:, 1], 1e-6), atol=2e-5, rtol=2e-5)
    s, h = layer_norm(x, 1e-6, residual=y, gate=one[:, 2], weight=w, bias=b)
    rs, rh = fused.gated_affine_norm(x, y, one[:, 2], w, b, 1e-6)
    torch.testing.assert_close(s, rs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, rh, atol=2e-5, rtol=2e-5)


def test_layer_norm_refuses_what_it_cannot_compute():
    x, y, e, w, b = ln_inputs(2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="shift and scale"):
        layer_norm(x, 1e-6, shift=e[:, 0])
    with pytest.raises(ValueError, match="shift and scale"):
        layer_norm(x, 1e-6, shift=e[:, 0], scale=e[:, 1], weight=w, bias=b)
    with pytest.raises(ValueError, match="a gate needs a residual"):
        layer_norm(x, 1e-6, gate=e[:, 2], weight=w, bias=b)
    with pytest.raises(ValueError, match=r"residual must be \[2, 5, 16\]"):
        layer_norm(x, 1e-6, residual=y[:, :4], shift=e[:, 0], scale=e[:, 1])
    with pytest.raises(ValueError, match="residual must be torch.float32"):
        layer_norm(x, 1e-6, residual=y.double(), shift=e[:, 0], scale=e[:, 1])
    with pytest.raises(ValueError, match=r"shift must be float32 \[2, 16\] or \[1, 16\]"):
        layer_norm(x, 1e-6, shift=e[:1, 0, :8], scale=e[:, 1])
    with pytest.raises(ValueError, match=r"scale must be float32 \[2, 16\] or \[1, 16\]"):  # as the reference's
        layer_norm(x, 1e-6, shift=e[:, 0], scale=e[:, 1].bfloat16())  # float32 modulation: 1 + scale in float32
    with pytest.raises(ValueError, match=r"gate must be float32 \[2, 16\] or \[1, 16\]"):
        layer_norm(x, 1e-6, residual=y, gate=e[0, 2], weight=w, bias=b)
    with pytest.raises(ValueError, match=r"weight must be a floating \[16\] vector"):
        layer_norm(x, 1e-6, weight=e[:, 0], bias=e[:, 1])


def test_fused_ops_run_the_layer_norm_kernel_when_asked(monkeypatch):
    from smartdiff.services.denoiser import triton_norms

    x, y, e, w, b = ln_inputs(2, 7, 32, torch.float32)
    ops = FusedOps(compile=False, kernels=True)
    calls, real = [], triton_norms.layer_norm
    monkeypatch.setattr(triton_norms, "layer_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    shift, scale, gate = e[:, 0], e[:, 1], e[:, 2]
    torch.testing.assert_close(ops.modulate(x, shift, scale, 1e-6), fused.modulate(x, shift, scale, 1e-6),
                               atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ops.affine_norm(x, w, b, 1e-6), fused.affine_norm(x, w, b, 1e-6), atol=2e-5, rtol=2e-5)
    for got, want in ((ops.add_modulate(x, y, shift, scale, 1e-6), fused.add_modulate(x, y, shift, scale, 1e-6)),
                      (ops.gated_affine_norm(x, y, gate, w, b, 1e-6), fused.gated_affine_norm(x, y, gate, w, b, 1e-6))):
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)
    assert len(calls) == 4
    plain = FusedOps(compile=False)  # no kernels: the reference functions
    plain.modulate(x, shift, scale, 1e-6)
    assert len(calls) == 4
    with torch.enable_grad():  # autograd through any argument (here the affine weight): the reference path
        wg = w.clone().requires_grad_()
        out = ops.affine_norm(x, wg, b, 1e-6)
        assert out.requires_grad and len(calls) == 4
        out.sum().backward()
        assert wg.grad is not None
    fp8_ops = FusedOps(compile=False, fp8=True, kernels=True)  # FP8: the norms quantize, on the compiled path
    assert isinstance(fp8_ops.modulate(x, shift, scale, 1e-6), fused.Fp8Rows) and len(calls) == 4

    from triton.runtime.errors import OutOfResources

    def failing(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(triton_norms, "layer_norm", failing)  # a build failure: logged, the reference from now on
    got = ops.add_modulate(x, y, shift, scale, 1e-6)
    assert ops.kernels is False
    for a, r in zip(got, fused.add_modulate(x, y, shift, scale, 1e-6)):
        torch.testing.assert_close(a, r)
