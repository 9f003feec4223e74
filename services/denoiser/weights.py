"""Loading Wan DiT experts from official Wan folders and Diffusers `transformer/` folders."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from smartdiff.shared.checkpoint import find_weights, load_strict, read_state_dict, rename_keys
from smartdiff.shared.config import DiTConfig

from .dit import KEEP_FP32, WanDiT

# Diffusers WanTransformer3DModel name <-> official Wan name, as (Diffusers, Wan) prefixes: top-level ones, and
# ones inside `blocks.N.` (Diffusers' norm2 is the cross-attention norm, Wan's norm3).
_TOP = [
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
]
_BLOCK = [
    ("attn1.to_out.0.", "self_attn.o."), ("attn1.to_q.", "self_attn.q."), ("attn1.to_k.", "self_attn.k."),
    ("attn1.to_v.", "self_attn.v."), ("attn1.norm_", "self_attn.norm_"),
    ("attn2.to_out.0.", "cross_attn.o."), ("attn2.to_q.", "cross_attn.q."), ("attn2.to_k.", "cross_attn.k."),
    ("attn2.to_v.", "cross_attn.v."), ("attn2.norm_", "cross_attn.norm_"),
    ("norm2.", "norm3."), ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
]
_BLOCK_KEY = re.compile(r"(blocks\.\d+\.)(.*)")


def _rename(key: str, src: int) -> str:
    """Map one key from naming `src` (0 Diffusers, 1 Wan) to the other; unknown keys pass through."""
    m = _BLOCK_KEY.fullmatch(key)
    prefix, rest, table = (m.group(1), m.group(2), _BLOCK) if m else ("", key, _TOP)
    for pair in table:
        if rest.startswith(pair[src]):
            return prefix + pair[1 - src] + rest[len(pair[src]):]
    return key


def diffusers_to_wan_key(key: str) -> str:
    return _rename(key, 0)


def wan_to_diffusers_key(key: str) -> str:
    """Inverse mapping (used to write Diffusers-layout folders in tests and tools)."""
    return _rename(key, 1)


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
