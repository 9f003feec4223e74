"""Loading Wan DiT experts from official Wan folders and Diffusers `transformer/` folders."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from smartdiff.shared.checkpoint import find_weights, load_strict, read_state_dict, rename_keys
from smartdiff.shared.config import DiTConfig

from .dit import KEEP_FP32, WanDiT

# Diffusers WanTransformer3DModel name -> official Wan name (regex on the full key, first match wins).
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # Diffusers' norm2 is the cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


def diffusers_to_wan_key(key: str) -> str:
    for pattern, repl in _DIFFUSERS_TO_WAN:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def wan_to_diffusers_key(key: str) -> str:
    """Inverse mapping (used to write Diffusers-layout folders in tests and tools)."""
    inverse = [
        (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
        (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
        (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
        (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
        (r"^time_projection\.1\.", "condition_embedder.time_proj."),
        (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
        (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
        (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
        (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
        (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
        (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
        (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        (r"^head\.head\.", "proj_out."),
        (r"^head\.modulation$", "scale_shift_table"),
    ]
    for pattern, repl in inverse:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def build_dit(cfg: DiTConfig) -> WanDiT:
    """The module skeleton on the meta device: no memory, no init work."""
    with torch.device("meta"):
        return WanDiT(cfg)


def load_dit(folder: Path, kind: str, cfg: DiTConfig, device: torch.device | str, dtype: torch.dtype) -> WanDiT:
    """Load one expert from `folder` (official: the model root or `high_noise_model/`; Diffusers: `transformer/`)."""
    weights = find_weights(folder)
    sd = read_state_dict(weights)
    if kind == "diffusers":
        sd = rename_keys(sd, diffusers_to_wan_key)
    elif kind != "wan":
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    return load_strict(build_dit(cfg), sd, weights, device, dtype, keep_fp32=KEEP_FP32)


def random_dit(cfg: DiTConfig, device: torch.device | str, dtype: torch.dtype, seed: int) -> WanDiT:
    from smartdiff.shared.checkpoint import materialize_random

    return materialize_random(build_dit(cfg), device, dtype, seed, keep_fp32=KEEP_FP32)
