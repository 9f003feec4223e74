"""`--gemm fp8`: FP8 GEMMs in the DiT blocks (lossy, opt-in), on the CPU (torch._scaled_mm runs there too).

Fp8Linear against an independent dequantize-then-matmul in float64, the scale rules, whole tiny forwards
against the exact path (a small but nonzero error), the compiled and the offloaded paths, Ulysses, and the
refusals. The speed and the error at full size are bench/dit_forward.py --fp8's (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from smartdiff.services.denoiser import fp8
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.fp8 import FP8_MAX, Fp8Linear, GemmConfigError, check_gemm, quantize_blocks_fp8
from smartdiff.services.denoiser.server import add_denoiser_flags, engine_options, options_from_args
from smartdiff.services.denoiser.weights import random_dit
from smartdiff.shared.config import DiTConfig, load_model_config
from smartdiff.shared.memory import MemoryPolicy
from smartdiff.shared.request import GenerationRequest, resolve_request

TINY = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)
# FP8 GEMMs on the CPU need a torch whose CPU _scaled_mm takes row-wise scales (2.13 does; 2.11 asserts
# per-tensor only); check_gemm refuses --gemm fp8 where it does not
CPU_FP8 = pytest.mark.skipif(fp8.rowwise_gemm_fails(torch.device("cpu"), torch.float32) is not None,
                             reason="this torch's CPU torch._scaled_mm has no row-wise scales")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def dequantized_reference(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b in float64 from FP8 copies made here: each row of x and of W scaled so that its absolute
    maximum is 448 (all-zero rows untouched), rounded by the float8 cast, scaled back."""
    def fake_quantize(t):
        t = t.double()
        amax = t.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, (amax / 448).float().double(), torch.ones_like(amax))
        return (t / scale).to(torch.float8_e4m3fn).double() * scale

    w, b = fake_quantize(linear.weight.detach()), linear.bias.detach().double()
    return fake_quantize(x) @ w.T + b


@CPU_FP8
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fp8_linear_matches_dequantize_then_matmul(dtype, tol):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(48, generator=g))
    x = (torch.randn(3, 7, 64, generator=g) * torch.logspace(-3, 2, 7)[:, None]).to(dtype)  # rows of any size
    x[1, 2] = 0  # an all-zero token
    got = Fp8Linear.from_linear(linear)(x)
    assert got.shape == (3, 7, 48) and got.dtype == dtype
    expected = dequantized_reference(linear, x)
    assert rel(got, expected) < tol, rel(got, expected)
    assert rel(got, linear(x)) > 1e-3  # lossy: the FP8 rounding shows against the exact GEMM
    torch.testing.assert_close(got[1, 2], linear.bias.detach(), rtol=0, atol=0)  # zero token: the bias alone


@CPU_FP8
def test_scales_are_per_output_channel_and_per_token_and_zero_rows_are_guarded():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 32, generator=g))
        linear.weight[3] = 0
        linear.weight[5] *= 1000  # one large channel does not coarsen the others
    q = Fp8Linear.from_linear(linear)
    w = linear.weight.detach()
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.shape == (16, 32)
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (1, 16)
    assert q.weight_scale.is_contiguous()
    assert q.weight_scale[0, 3] == 1 and not q.weight[3].float().any()  # zero row: scale 1, zeros, no NaN
    nonzero = [i for i in range(16) if i != 3]
    torch.testing.assert_close(q.weight_scale[0, nonzero], w[nonzero].abs().amax(1) / FP8_MAX, rtol=0, atol=0)
    assert (q.weight[nonzero].float().abs().amax(1) == FP8_MAX).all()  # each channel's maximum maps to 448
    deq = q.weight.float() * q.weight_scale.t()
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 of the scale near zero
    assert ((deq - w).abs() <= w.abs() * 2**-4 + q.weight_scale.t() * 2**-9).all()

    x = torch.randn(4, 32, generator=g)
    y = q(x)
    x2 = x.clone()
    x2[0] *= 1e4  # a huge token changes its own scale only: the other tokens' outputs are bit-identical
    y2 = q(x2)
    assert torch.equal(y2[1:], y[1:]) and not torch.equal(y2[0], y[0])
    rows = fp8.quantize_rows(torch.zeros(2, 8))
    assert torch.equal(rows.scale, torch.ones(2, 1)) and not rows.data.float().any()


def forward(dit, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 512, TINY.text_dim, generator=g)
    with torch.no_grad():
        return dit(x, torch.tensor([999.0, 10.0]), ctx)


@CPU_FP8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_forward_error_is_small_and_nonzero(dtype):
    exact = random_dit(TINY, "cpu", dtype, 0).eval()
    quantized = quantize_blocks_fp8(copy.deepcopy(exact))
    linears = [m for m in quantized.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 10 * TINY.num_layers and quantized.fp8_gemms and not exact.fp8_gemms
    for name in ("text_embedding", "time_embedding", "time_projection", "head"):  # outside the blocks: unchanged
        assert not any(isinstance(m, Fp8Linear) for m in getattr(quantized, name).modules())
    assert quantized.head.head.weight.dtype == dtype and quantized.patch_embedding.weight.dtype == dtype
    assert all(m.bias.dtype == dtype for m in linears)
    err = rel(forward(quantized), forward(exact))
    assert 1e-3 < err < 5e-2, err


@CPU_FP8
def test_compiled_fp8_matches_eager_fp8():
    """The compiled regions quantize their outputs in the same kernel; the numbers stay the eager path's."""
    dit = quantize_blocks_fp8(random_dit(TINY, "cpu", torch.float32, 0).eval())
    eager = forward(dit)
    dit.set_compiled(True)
    ops = dit.blocks[0].ops
    assert ops.compiled and ops.fp8 and dit.blocks[0].self_attn.o.quantize is ops.quantize_rows
    # the regions before the GEMMs hand them quantized rows (one quantization for q, k and v, not one each)
    x, zero = torch.randn(1, 4, TINY.dim), torch.zeros(1, 1, TINY.dim)
    assert isinstance(ops.modulate(x, zero, zero, 1e-6), fp8.Fp8Rows)
    compiled = forward(dit)
    dit.set_compiled(False)
    assert rel(compiled, eager) < 1e-4
    assert dit.blocks[0].self_attn.o.quantize is fp8.quantize_rows


def inputs(steps: int = 3):
    model = load_model_config("wan-tiny")
    req = resolve_request(GenerationRequest(prompt="x", width=48, height=32, frames=5, steps=steps, seed=5),
                          model)
    g = torch.Generator().manual_seed(0)
    dim = model.dit.text_dim
    return model, req, torch.randn(6, dim, generator=g), torch.randn(3, dim, generator=g)


@CPU_FP8
def test_engine_fp8_resident_and_offloaded_and_the_default_is_untouched():
    model, req, ctx, neg = inputs()
    default = DenoiserEngine.load(model, None, "cpu", torch.float32)
    exact = DenoiserEngine.load(model, None, "cpu", torch.float32, gemm="exact")
    assert default.gemm == exact.gemm == "exact"
    assert not any(isinstance(m, Fp8Linear) for m in default.experts[0].modules())
    base = default.denoise(req, ctx, neg)
    assert torch.equal(exact.denoise(req, ctx, neg), base)
    resident = DenoiserEngine.load(model, None, "cpu", torch.float32, gemm="fp8")
    assert resident.gemm == "fp8" and resident.experts[0].fp8_gemms
    got = resident.denoise(req, ctx, neg)
    assert 1e-4 < rel(got, base) < 5e-2, rel(got, base)
    # level 3 streams the FP8 weights and their scales like any other tensor: the same latents, bit for bit
    offloaded = DenoiserEngine.load(model, None, "cpu", torch.float32, gemm="fp8",
                                    low_mem_level=MemoryPolicy(3, offload_without_cuda=True))
    fp8_units = [u for u in offloaded.offloader.units if torch.float8_e4m3fn in {t.dtype for t in u.tensors}]
    assert len(fp8_units) == model.dit.num_layers
    assert torch.equal(offloaded.denoise(req, ctx, neg), got)


def _parallel_rank(rank, world, layout):
    from smartdiff.services.denoiser.parallel import ParallelConfig, ParallelState

    model, req, ctx, neg = inputs(steps=2)
    state = ParallelState(ParallelConfig(*layout), rank) if world > 1 else None
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32, parallel=state, gemm="fp8")
    return engine.denoise(req, ctx, neg)


@CPU_FP8
@pytest.mark.parametrize("layout", [(1, 2, 1), (1, 1, 2), (2, 1, 1)], ids=["ulysses2", "ring2", "cfg2"])
def test_fp8_under_every_parallel_layout_matches_one_process(layout):
    """Ulysses splits the output projection's input by head group; under FP8 it runs once every group is there
    (a token's scale spans all heads). Ring and CFG parallel leave the linears whole. Each sharded run gives the
    one-process FP8 latents."""
    from distributed_helpers import run_ranks

    expected = _parallel_rank(0, 1, layout)
    for latents in run_ranks(_parallel_rank, 2, layout):
        assert rel(latents, expected) < 1e-4


def test_refusals_name_the_flag_and_the_rule(monkeypatch):
    model = load_model_config("wan-tiny")
    with pytest.raises(GemmConfigError, match=r"gemm: must be one of exact, fp8, got 'int8'"):
        DenoiserEngine.load(model, None, "cpu", torch.float32, gemm="int8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    with pytest.raises(GemmConfigError, match="gemm: fp8 needs CUDA.*use --gemm exact"):  # refused before loading
        DenoiserEngine.load(model, None, "cuda", torch.bfloat16, gemm="fp8")
    with pytest.raises(GemmConfigError, match="gemm: fp8 runs on CUDA .* or the CPU, got device meta"):
        check_gemm("fp8", "meta", torch.bfloat16, model.dit)
    assert check_gemm("exact", "meta", torch.float32, model.dit) == "exact"

    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(GemmConfigError, match=r"capability >= 8\.9.*NVIDIA A100 has 8\.0: use --gemm exact"):
        check_gemm("fp8", "cuda", torch.bfloat16, model.dit)
    capability[0] = (9, 0)
    with pytest.raises(GemmConfigError, match="needs --dtype bfloat16 .* got float32: use --dtype bfloat16 or"):
        check_gemm("fp8", "cuda", torch.float32, model.dit)
    odd = DiTConfig(dim=40, ffn_dim=64, num_heads=2, num_layers=1)
    with pytest.raises(GemmConfigError, match=r"multiples of 16 .*\{'dim': 40\}"):
        check_gemm("fp8", "cuda", torch.bfloat16, odd)
    # the capability is not enough: a torch / GPU whose _scaled_mm has no row-wise kernel is refused too
    monkeypatch.setattr(fp8, "rowwise_gemm_fails", lambda device, dtype: "Invalid scaling configuration")
    with pytest.raises(GemmConfigError, match="row-wise scales, which this torch on cuda does not run .Invalid sca"):
        check_gemm("fp8", "cuda", torch.bfloat16, model.dit)
    with pytest.raises(GemmConfigError, match="which this torch on cpu does not run"):  # nor an old torch's CPU
        check_gemm("fp8", "cpu", torch.float32, model.dit)
    monkeypatch.setattr(fp8, "rowwise_gemm_fails", lambda device, dtype: None)
    assert check_gemm("fp8", "cuda", torch.bfloat16, model.dit) == "fp8"


def test_flag_reaches_the_engine_options():
    p = argparse.ArgumentParser()
    add_denoiser_flags(p)
    assert options_from_args(p.parse_args([])).gemm == "exact"
    options = options_from_args(p.parse_args(["--gemm", "fp8"]))
    assert options.gemm == "fp8" and engine_options(options, load_model_config("wan-tiny"))["gemm"] == "fp8"
    with pytest.raises(SystemExit):
        p.parse_args(["--gemm", "fp16"])


def test_eager_quantization_in_row_chunks_equals_one_pass(monkeypatch):
    """Large eager inputs are quantized ROW_CHUNK rows at a time (bounded float32 temporaries): same bits."""
    x = torch.randn(2, 37, 24, dtype=torch.bfloat16)
    whole = fp8.quantize_rows(x)
    monkeypatch.setattr(fp8, "ROW_CHUNK", 10)
    chunked = fp8.quantize_rows(x)
    assert torch.equal(chunked.data.view(torch.uint8), whole.data.view(torch.uint8))
    assert torch.equal(chunked.scale, whole.scale) and chunked.data.shape == x.shape
