"""Our Wan DiT against diffusers' WanTransformer3DModel (test-only oracle) on tiny random configs, float32 CPU."""

import pytest
import torch

from smartdiff.services.denoiser.dit import WanDiT
from smartdiff.services.denoiser.weights import build_dit, diffusers_to_wan_key, wan_to_diffusers_key
from smartdiff.shared.checkpoint import CheckpointError, load_strict, rename_keys
from smartdiff.shared.config import DiTConfig

diffusers = pytest.importorskip("diffusers")

CFG = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)


def diffusers_dit(cfg: DiTConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
    ).eval()
    with torch.no_grad():  # non-trivial norms / biases so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(model, cfg: DiTConfig) -> WanDiT:
    sd = rename_keys(model.state_dict(), diffusers_to_wan_key)
    return load_strict(build_dit(cfg), sd, "diffusers state dict", "cpu", torch.float32)


@pytest.mark.parametrize("frames,h,w", [(1, 4, 4), (3, 6, 8)])
def test_forward_matches_diffusers(frames, h, w):
    ref = diffusers_dit(CFG)
    ours = ours_from(ref, CFG)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, frames, h, w, generator=g)
    t = torch.tensor([999.0, 437.0])
    ctx = torch.randn(2, 512, CFG.text_dim, generator=g)
    with torch.no_grad():
        expected = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-5, rel


def test_key_mapping_is_a_bijection():
    ref = diffusers_dit(CFG)
    keys = list(ref.state_dict())
    mapped = [diffusers_to_wan_key(k) for k in keys]
    assert sorted(mapped) == sorted(build_dit(CFG).state_dict())
    assert [wan_to_diffusers_key(k) for k in mapped] == keys


def test_mismatched_checkpoint_names_file_and_key_and_loads_nothing():
    sd = rename_keys(diffusers_dit(CFG).state_dict(), diffusers_to_wan_key)
    del sd["blocks.1.ffn.2.bias"]
    sd["head.head.weight"] = torch.zeros(3, 3)
    model = build_dit(CFG)
    with pytest.raises(CheckpointError) as err:
        load_strict(model, sd, "/ckpt/diffusion_pytorch_model.safetensors", "cpu", torch.float32)
    msg = str(err.value)
    assert "/ckpt/diffusion_pytorch_model.safetensors" in msg
    assert "blocks.1.ffn.2.bias" in msg and "head.head.weight" in msg
    assert all(p.is_meta for p in model.parameters())  # untouched: nothing half-loaded


def test_compiled_elementwise_ops_match_eager():
    """torch.compile of the fused regions (norms, modulation, q/k norm + RoPE, gated residuals) keeps the numbers."""
    ref = diffusers_dit(CFG)
    ours = ours_from(ref, CFG)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 16, 2, 4, 6, generator=g), torch.tensor([999.0, 10.0]), torch.randn(2, 512, 24, generator=g)
    with torch.no_grad():
        eager = ours(x, t, ctx)
        ours.set_compiled(True)
        compiled = ours(x, t, ctx)
        ours.set_compiled(False)
    assert ((compiled - eager).norm() / eager.norm()) < 1e-5


def test_compiled_qk_in_ulysses_head_groups_match_eager():
    """Under Ulysses the compiled q/k norm + RoPE writes each rank's head group contiguously in the same kernel;
    it must equal the eager projection split into head groups."""
    from smartdiff.services.denoiser.dit import rope_cos_sin

    ours = ours_from(diffusers_dit(CFG), CFG)
    attn = ours.blocks[0].self_attn
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2 * 3 * 4, CFG.dim, generator=g)
    rope = rope_cos_sin(CFG.head_dim, (2, 3, 4), x.device)
    with torch.no_grad():
        whole = attn.project_qk(x, x, rope)  # [B, L, N, D], no groups
        eager = attn.project_qk(x, x, rope, groups=2)
        ours.set_compiled(True)
        compiled = attn.project_qk(x, x, rope, groups=2)
        ours.set_compiled(False)
    for w, e, c in zip(whole, eager, compiled):
        by_hand = w.unflatten(2, (2, -1)).permute(2, 0, 1, 3, 4)  # group u = heads u*N/2 .. (u+1)*N/2
        torch.testing.assert_close(e, by_hand, atol=1e-6, rtol=1e-6)
        assert c.shape == (2, 1, 24, CFG.num_heads // 2, CFG.head_dim) and c.is_contiguous()
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt GELU epilogue is CUDA-only")
def test_gelu_epilogue_is_the_tanh_gelu():
    from smartdiff.services.denoiser.fused import linear_gelu, linear_gelu_epilogue

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 100, 64, device="cuda", generator=g)
    w, b = torch.randn(96, 64, device="cuda", generator=g) * 0.1, torch.randn(96, device="cuda", generator=g)
    torch.testing.assert_close(linear_gelu_epilogue(x, w, b), linear_gelu(x, w, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("replay", [False, True], ids=["runs", "cache-replays"])
def test_between_blocks_runs_between_every_two_blocks_even_when_a_cache_replays_the_stack(replay):
    """Every forward makes len(blocks) - 1 checks: a multi-GPU pod's stop checks are collectives, and CFG-parallel
    ranks whose caches decide apart (one runs the stack, one replays it) must still make the same ones."""
    import dataclasses

    from smartdiff.services.denoiser.dit import ForwardHooks
    from smartdiff.services.denoiser.weights import random_dit

    cfg = dataclasses.replace(CFG, num_layers=4)
    dit = random_dit(cfg, "cpu", torch.float32, 0)
    entered, checks = [], []
    for block in dit.blocks:
        block.register_forward_pre_hook(lambda *_: entered.append(len(checks)))

    def blocks(run, tokens, e, e6, ctx):
        return tokens if replay else run(tokens, e6, ctx)

    x, t, ctx = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, cfg.text_dim)
    dit(x, t, ctx, hooks=ForwardHooks(blocks=blocks), between_blocks=lambda: checks.append(1))
    assert len(checks) == cfg.num_layers - 1
    assert entered == ([] if replay else [0, 1, 2, 3])  # running: one check before each block after the first
