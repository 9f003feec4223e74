"""umT5 encoder checkpoints: Wan's `models_t5_umt5-xxl-enc-bf16.pth` and Diffusers' `text_encoder/`, as UMT5 state dicts.

Both layouts end as a state dict with the key names of transformers' `UMT5EncoderModel`:

    shared.weight, encoder.embed_tokens.weight                  [vocab, dim] (tied: one tensor)
    encoder.block.N.layer.0.layer_norm.weight                   [dim]
    encoder.block.N.layer.0.SelfAttention.{q,k,v}.weight        [dim_attn, dim]
    encoder.block.N.layer.0.SelfAttention.o.weight              [dim, dim_attn]
    encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight   [num_buckets, num_heads]
    encoder.block.N.layer.1.layer_norm.weight                   [dim]
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1}.weight   [ffn_dim, dim]
    encoder.block.N.layer.1.DenseReluDense.wo.weight            [dim, ffn_dim]
    encoder.final_layer_norm.weight                             [dim]
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import UMT5Config

from smartdiff.shared.checkpoint import CheckpointError, find_weights, read_json, read_state_dict
from smartdiff.shared.config import TextEncoderConfig
from smartdiff.shared.model_source import text_encoder_config_from_json

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied in UMT5EncoderModel

# Wan `T5SelfAttention` (umt5 has shared_pos=False: one relative bias table per block) -> UMT5Block.
# Wan's FFN is fc2(fc1(x) * gelu_tanh(gate(x))); UMT5's is wo(gelu_new(wi_0(x)) * wi_1(x)), so the
# activated branch `gate.0` is wi_0 and the linear branch `fc1` is wi_1 (gelu_new == GELU, tanh form).
_WAN_BLOCK_TO_HF = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_HF_BLOCK_TO_WAN = {hf: wan for wan, hf in _WAN_BLOCK_TO_HF.items()}
_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def wan_key_to_hf(key: str) -> str:
    """One Wan T5Encoder key -> its UMT5EncoderModel key; unknown keys pass through (load_strict names them)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = _WAN_BLOCK.fullmatch(key)
    if m and m.group(2) in _WAN_BLOCK_TO_HF:
        return f"encoder.block.{m.group(1)}.{_WAN_BLOCK_TO_HF[m.group(2)]}"
    return key


def wan_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan T5Encoder state dict -> UMT5EncoderModel state dict (embedding under both tied names)."""
    out = {wan_key_to_hf(k): v for k, v in sd.items()}
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def hf_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UMT5EncoderModel state dict -> Wan T5Encoder key names (what `models_t5_umt5-xxl-enc-bf16.pth` holds)."""
    out = {}
    for key, value in sd.items():
        if key == "encoder.embed_tokens.weight" and "shared.weight" in sd:
            continue  # tied to shared.weight; Wan stores the table once, as token_embedding
        m = _HF_BLOCK.fullmatch(key)
        if key in EMBED_KEYS:
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif m and m.group(2) in _HF_BLOCK_TO_WAN:
            out[f"blocks.{m.group(1)}.{_HF_BLOCK_TO_WAN[m.group(2)]}"] = value
        else:
            raise KeyError(f"no Wan name for UMT5 key {key!r}")
    return out


def tie_embeddings(sd: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """Put the one embedding table under both tied names (save_pretrained usually writes only one).

    Both names then refer to the same tensor object, so `load_strict` sees a complete state dict.
    """
    present = [k for k in EMBED_KEYS if k in sd]
    if not present:
        return sd  # load_strict reports both as missing
    if len(present) == 2 and sd[EMBED_KEYS[0]] is not sd[EMBED_KEYS[1]]:
        a, b = sd[EMBED_KEYS[0]], sd[EMBED_KEYS[1]]
        if a.shape != b.shape or not torch.equal(a, b):
            raise CheckpointError(f"{source}: tied embeddings {EMBED_KEYS[0]} and {EMBED_KEYS[1]} differ")
    table = sd[present[0]]
    return {**sd, EMBED_KEYS[0]: table, EMBED_KEYS[1]: table}


# ------------------------------------------------------------------------------------------- configs
def umt5_config(config: TextEncoderConfig) -> UMT5Config:
    """Our TextEncoderConfig as the transformers config of google/umt5-xxl (encoder part)."""
    if config.dim_attn % config.num_heads:
        raise ValueError(f"text_encoder.dim_attn ({config.dim_attn}) must be a multiple of num_heads")
    return UMT5Config(
        vocab_size=config.vocab_size,
        d_model=config.dim,
        d_kv=config.dim_attn // config.num_heads,
        d_ff=config.ffn_dim,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.max_distance,
        feed_forward_proj="gated-gelu",  # transformers turns this into dense_act_fn "gelu_new" (tanh GELU)
        layer_norm_epsilon=config.eps,
        tie_word_embeddings=False,  # as in google/umt5-xxl; only the LM head is affected
        pad_token_id=0,
        eos_token_id=1,
    )


def check_hf_config(folder: Path, config: TextEncoderConfig) -> None:
    """Raise CheckpointError naming the first field of `folder/config.json` that disagrees with `config`."""
    path = folder / "config.json"
    data = read_json(path)
    act = data.get("feed_forward_proj", "gated-gelu")
    if act != "gated-gelu":
        raise CheckpointError(f"{path}: feed_forward_proj is {act!r}, expected 'gated-gelu' (umT5)")
    found = text_encoder_config_from_json(data, path, config.text_len)
    for name, value in vars(found).items():
        if value != getattr(config, name):
            raise CheckpointError(f"{path}: text_encoder.{name} is {value} in the checkpoint, model config says "
                                  f"{getattr(config, name)}")


# ----------------------------------------------------------------------------------------- reading
def read_text_encoder(layout_kind: str, weights: Path, config: TextEncoderConfig) -> tuple[dict, str]:
    """Read either layout as a UMT5EncoderModel state dict; returns (state dict, source for messages).

    layout_kind "wan": `weights` is the .pth file; "diffusers": `weights` is the `text_encoder/` folder.
    """
    weights = Path(weights)
    if layout_kind == "wan":
        sd = wan_to_hf(read_state_dict(weights))
        source = f"{weights} (Wan T5 names mapped to UMT5)"
    elif layout_kind == "diffusers":
        check_hf_config(weights, config)
        path = find_weights(weights, "model")
        sd, source = read_state_dict(path), str(path)
    else:
        raise ValueError(f"unknown checkpoint layout {layout_kind!r} (expected 'wan' or 'diffusers')")
    return tie_embeddings(sd, source), source
