"""The decoder's fused RMSNorm + SiLU kernel (services/vae/fused.py, triton_norm.py) against the unfused ops.

On a CPU-only machine the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set here before it is
imported); with a GPU, on the GPU. The fused path is forced on here (in production it runs on CUDA only).
"""

import os

import pytest
import torch
import torch.nn.functional as F

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton.jit when the kernel module is imported
pytest.importorskip("triton", reason="the fused kernel is Triton (CPU tests run it through TRITON_INTERPRET=1)")
if not GPU:
    from triton_interpreter import require_interpreter

    require_interpreter()

from smartdiff.services.vae import fused  # noqa: E402
from smartdiff.services.vae.engine import VaeEngine  # noqa: E402
from smartdiff.services.vae.model import FeatureCache, ResidualBlock  # noqa: E402
from smartdiff.services.vae.triton_norm import norm_silu_into  # noqa: E402
from smartdiff.shared.config import load_model_config  # noqa: E402

DEV = torch.device("cuda" if GPU else "cpu")
# on a GPU the convolutions run in TF32 (PyTorch's default for cuDNN): a last-bit difference in a conv's input
# can move its TF32 rounding, so the whole decoder agrees to ~1e-3 there (as it does with diffusers')
DECODER_TOL = 2e-3 if GPU else 1e-5


def unfused_reference(x, gamma, scale):
    y = F.normalize(x.float(), dim=1) * scale * gamma.float().view(1, -1, 1, 1, 1)
    return F.silu(y).to(x.dtype)


@pytest.mark.parametrize("shape", [(2, 40, 3, 5, 9), (1, 7, 1, 3, 130), (1, 70, 2, 3, 5)])  # channel / position tails
@pytest.mark.parametrize("layout, out_layout", [(torch.contiguous_format,) * 2, (torch.channels_last_3d,) * 2,
                                                (torch.channels_last_3d, torch.contiguous_format),
                                                (torch.contiguous_format, torch.channels_last_3d)])
def test_kernel_writes_the_normalised_activation_into_the_interior_only(shape, layout, out_layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(DEV).contiguous(memory_format=layout)
    x[0, :, 0, 0, 0] = 0  # an all-zero position: F.normalize's eps, no NaN
    gamma = torch.randn(shape[1], generator=g).to(DEV)
    b, c, t, h, w = shape
    buf = torch.full((b, c, t + 2, h + 2, w + 2), float("nan"), device=DEV).contiguous(memory_format=out_layout)
    norm_silu_into(x, gamma, c ** 0.5, buf[:, :, 2:, 1:-1, 1:-1])
    assert torch.allclose(buf[:, :, 2:, 1:-1, 1:-1], unfused_reference(x, gamma, c ** 0.5), atol=1e-5, rtol=1e-5)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:, :, 2:, 1:-1, 1:-1] = False
    assert buf[outside].isnan().all()  # borders and time padding are left to the caller
    strided = torch.randn(b, c, t, w, h).to(DEV).transpose(3, 4)  # x's shape, dense in neither layout
    with pytest.raises(ValueError, match="contiguous"):
        norm_silu_into(strided, gamma, 1.0, buf[:, :, 2:, 1:-1, 1:-1])
    with pytest.raises(ValueError, match="gamma"):
        norm_silu_into(x, gamma[:-1], 1.0, buf[:, :, 2:, 1:-1, 1:-1])


def test_residual_block_fused_equals_unfused_across_chunks(monkeypatch):
    """Three chunks through one cache (1, then 4, then 2 frames): the causal frames carried between chunks are
    the same as the unfused block's."""
    torch.manual_seed(0)
    block = ResidualBlock(8, 12).to(DEV).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    chunks = [torch.randn(1, 8, t, 6, 5, device=DEV) for t in (1, 4, 2)]
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(fused, "applies", lambda x, on=on: on)
        cache = FeatureCache()
        with torch.no_grad():
            outs[on] = [block(x, cache) for x in chunks]
    for a, b in zip(outs[True], outs[False]):
        assert ((a - b).norm() / b.norm()).item() < DECODER_TOL


@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_fused_equals_unfused(monkeypatch, cudnn_layouts, channels_last):
    eng = VaeEngine.random(load_model_config("wan-tiny").vae, DEV, torch.float32)
    eng.model.use_channels_last(channels_last)
    z = torch.randn(1, load_model_config("wan-tiny").vae.z_dim, 3, 4, 6, device=DEV)
    videos = {}
    for on in (False, True):
        monkeypatch.setattr(fused, "applies", lambda x, on=on: on)
        videos[on] = eng.decode_float(z)
    assert ((videos[True] - videos[False]).norm() / videos[False].norm()).item() < DECODER_TOL


def test_runs_only_for_inference_on_gpus_it_builds_for_and_can_be_switched_off(monkeypatch):
    from types import SimpleNamespace

    assert not fused.applies(torch.zeros(1))  # CPU tensors: the unfused ops
    gpu_tensor = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setattr(fused, "_kernel_ok", lambda device: True)
    with torch.no_grad():
        assert fused.applies(gpu_tensor)
        monkeypatch.setattr(fused, "ENABLED", False)
        assert not fused.applies(gpu_tensor)
        monkeypatch.setattr(fused, "ENABLED", True)
        monkeypatch.setattr(fused, "_kernel_ok", lambda device: False)  # e.g. compute capability < 8.0
        assert not fused.applies(gpu_tensor)
        monkeypatch.setattr(fused, "_kernel_ok", lambda device: True)
    with torch.enable_grad():
        assert not fused.applies(gpu_tensor)  # no autograd through the kernel


def test_a_failed_build_runs_the_unfused_ops_from_then_on(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from smartdiff.services.vae import triton_norm

    torch.manual_seed(0)
    block = ResidualBlock(8, 8).to(DEV).eval()
    x = torch.randn(1, 8, 2, 4, 5, device=DEV)
    with torch.no_grad():
        want = block(x, FeatureCache())  # unfused (or, on a GPU, fused: equal within DECODER_TOL)

        def failing(*args, **kwargs):
            raise OutOfResources(300000, 232448, "shared memory")

        monkeypatch.setattr(triton_norm, "norm_silu_into", failing)
        monkeypatch.setattr(fused, "_failed", None)
        monkeypatch.setattr(fused, "_kernel_ok", lambda device: True)
        monkeypatch.setattr(fused, "applies", lambda t: fused._failed is None)
        got = block(x, FeatureCache())
    assert "shared memory" in fused._failed and not fused.applies(x)
    assert ((got - want).norm() / want.norm()).item() < DECODER_TOL


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from smartdiff.services.vae import triton_norm as tn
sig = dict(X="*fp32", G="*fp32", O="*bf16", C="i32", T="i32", HW="i32", W="i32", x_sb="i32", x_sc="i32", x_st="i32",
           x_sp="i32", o_sb="i32", o_sc="i32", o_st="i32", o_sh="i32", o_sw="i32", scale="fp32", BLOCK_C="constexpr",
           BLOCK_P="constexpr")
for consts in (dict(x_sp=1, o_sw=1, BLOCK_C=32, BLOCK_P=128), dict(T=1, x_sp=1, o_sw=1, BLOCK_C=32, BLOCK_P=128),
               dict(x_sc=1, o_sc=1, BLOCK_C=64, BLOCK_P=64), dict(T=1, x_sc=1, o_sc=1, BLOCK_C=64, BLOCK_P=64)):
    s = dict(sig) | {k: "constexpr" for k in consts}
    triton.compile(ASTSource(tn._norm_silu_kernel, s, consts), target=GPUTarget("cuda", 90, 32))
print("ok")
"""


def test_kernel_compiles_for_the_gpu_including_one_frame_chunks():
    """Triton passes a size of 1 as a constant: the kernel must build with T = 1 (the first chunk's frame) as
    well, which the interpreter does not show, in both layouts (unit position stride: NCDHW; unit channel
    stride: channels-last). Compiled for sm_90 in a fresh process (no TRITON_INTERPRET)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_the_vae_service_warms_up_at_the_default_size_on_cuda_only():
    from smartdiff.services.vae.server import warmup_latents

    model = load_model_config("Wan2.1-T2V-1.3B")
    assert warmup_latents(model, "cpu").shape == (1, 16, 1, 2, 2)
    assert warmup_latents(model, "cuda").shape == (1, 16, 2, 60, 104)  # 832x480: the usual request's frames


def test_fused_path_keeps_the_causal_cache_and_every_conv_input_channels_last(monkeypatch, cudnn_layouts):
    """With one video frame per call past the temporal upsamplers (the tiled default), a conv's cache is built
    from the previous frame and the padded buffer's interior (a view): it stays channels-last, so carrying it
    into the next chunk's buffer is a plain copy, not a transpose."""
    from smartdiff.services.vae import model as vae_model

    eng = VaeEngine.random(load_model_config("wan-tiny").vae, DEV, torch.float32)
    eng.model.use_channels_last()
    caches = []

    def new_cache():
        caches.append(FeatureCache())
        return caches[-1]

    monkeypatch.setattr(vae_model, "FeatureCache", new_cache)
    monkeypatch.setattr(fused, "applies", lambda x: True)
    z = torch.randn(1, load_model_config("wan-tiny").vae.z_dim, 3, 4, 6, device=DEV)
    with torch.no_grad():
        got = torch.cat([v for _, v in eng.model.decode_chunks(z, frames_per_call=1)], dim=2)
        monkeypatch.setattr(fused, "applies", lambda x: False)
        want = torch.cat([v for _, v in eng.model.decode_chunks(z)], dim=2)
    assert ((got - want).norm() / want.norm()).item() < DECODER_TOL
    frames = [t for t in caches[0].frames.values() if t.shape[1] > 1]
    assert len(frames) > 10 and all(t.is_contiguous(memory_format=torch.channels_last_3d) for t in frames)
    assert set(cudnn_layouts) == {"channels_last", "nhwc"}, sorted(set(cudnn_layouts))
