"""Tiny random Wan checkpoints written in both on-disk layouts (Diffusers and official Wan), for tests.

The weights come from diffusers' own classes (the test-only oracle), so a Diffusers folder written here is
exactly what `diffusers.WanPipeline.from_pretrained` reads; the official folder holds the same tensors
under Wan's key names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32
VOCAB = 512


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial norms and biases, so that every parameter influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def diffusers_components(num_experts: int = 1, seed: int = 0) -> dict:
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    from smartdiff.services.text_encoder.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    dit_kwargs = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                      out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    transformers_ = [_perturb(diffusers.WanTransformer3DModel(**dit_kwargs), seed + i) for i in range(num_experts)]
    t5 = UMT5EncoderModel(UMT5Config(
        vocab_size=VOCAB, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
        is_encoder_decoder=False, tie_word_embeddings=False,
    )).eval()
    vae = _perturb(diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                              attn_scales=[], temperal_downsample=[False, True, True]), seed)
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    return dict(tokenizer=build_tiny_tokenizer(VOCAB), text_encoder=t5, vae=vae, scheduler=scheduler,
                transformer=transformers_[0], transformer_2=transformers_[1] if num_experts == 2 else None,
                boundary_ratio=0.875 if num_experts == 2 else None)


def write_diffusers_folder(root: Path, num_experts: int = 1, seed: int = 0) -> Path:
    import diffusers

    pipe = diffusers.WanPipeline(**diffusers_components(num_experts, seed))
    pipe.save_pretrained(str(root))
    return root


def write_wan_folder(diffusers_root: Path, root: Path) -> Path:
    """The same weights as a Diffusers folder, converted to the official Wan layout and key names."""
    from safetensors.torch import save_file

    from smartdiff.services.denoiser.weights import diffusers_to_wan_key
    from smartdiff.services.text_encoder.weights import hf_to_wan
    from smartdiff.services.vae.weights import convert_diffusers_state_dict
    from smartdiff.shared.checkpoint import find_weights, read_state_dict, rename_keys

    root.mkdir(parents=True, exist_ok=True)
    experts = [diffusers_root / "transformer"]
    if (diffusers_root / "transformer_2").is_dir():
        experts.append(diffusers_root / "transformer_2")
    dit_dirs = [root] if len(experts) == 1 else [root / "high_noise_model", root / "low_noise_model"]
    for src, dst in zip(experts, dit_dirs):
        dst.mkdir(parents=True, exist_ok=True)
        sd = rename_keys(read_state_dict(find_weights(src)), diffusers_to_wan_key)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "diffusion_pytorch_model.safetensors"))
        cfg = json.loads((src / "config.json").read_text())
        wan_cfg = dict(_class_name="WanModel", model_type="t2v", dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                       ffn_dim=cfg["ffn_dim"], freq_dim=cfg["freq_dim"], in_dim=16, out_dim=16, num_heads=cfg["num_attention_heads"],
                       num_layers=cfg["num_layers"], text_len=512, text_dim=cfg["text_dim"], eps=cfg["eps"])
        (dst / "config.json").write_text(json.dumps(wan_cfg))
    t5 = read_state_dict(find_weights(diffusers_root / "text_encoder", "model"))
    torch.save(hf_to_wan(t5), root / "models_t5_umt5-xxl-enc-bf16.pth")
    vae = read_state_dict(find_weights(diffusers_root / "vae"))
    torch.save(convert_diffusers_state_dict(vae, num_res_blocks=1), root / "Wan2.1_VAE.pth")
    tok_dir = root / "google" / "umt5-xxl"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(diffusers_root / "tokenizer")).save_pretrained(str(tok_dir))
    return root
