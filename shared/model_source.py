"""Which model a deployment serves: a named YAML preset, a checkpoint folder (either layout), or both."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from smartdiff.shared.checkpoint import CheckpointError, CheckpointLayout, detect_layout, read_json
from smartdiff.shared.config import (
    ConfigError, DiTConfig, ModelConfig, SamplingDefaults, TextEncoderConfig, VAEConfig, available_models,
    load_model_config,
)

SCHEDULER_TO_SAMPLER = {
    "UniPCMultistepScheduler": "unipc",
    "DPMSolverMultistepScheduler": "dpm++",
    "FlowMatchEulerDiscreteScheduler": "euler",
}


def _need(cfg: dict, key: str, source: Path):
    if key not in cfg:
        raise CheckpointError(f"{source}: missing field {key!r}")
    return cfg[key]


def dit_config_from_json(cfg: dict, source: Path) -> DiTConfig:
    """From an official Wan `config.json` (WanModel) or a Diffusers transformer `config.json`."""
    if "num_attention_heads" in cfg:  # Diffusers WanTransformer3DModel
        if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
            raise CheckpointError(f"{source}: image-conditioned (I2V) transformers are not supported")
        heads = int(_need(cfg, "num_attention_heads", source))
        dim = heads * int(_need(cfg, "attention_head_dim", source))
        names = dict(in_dim="in_channels", out_dim="out_channels")
    else:
        if cfg.get("model_type", "t2v") != "t2v":
            raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not supported (only t2v)")
        heads, dim = int(_need(cfg, "num_heads", source)), int(_need(cfg, "dim", source))
        names = dict(in_dim="in_dim", out_dim="out_dim")
    qk_norm = cfg.get("qk_norm", True)
    return DiTConfig(
        dim=dim, num_heads=heads, ffn_dim=int(_need(cfg, "ffn_dim", source)),
        num_layers=int(_need(cfg, "num_layers", source)), patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        in_dim=int(cfg.get(names["in_dim"], 16)), out_dim=int(cfg.get(names["out_dim"], 16)),
        freq_dim=int(cfg.get("freq_dim", 256)), text_dim=int(cfg.get("text_dim", 4096)),
        text_len=int(cfg.get("text_len", 512)), qk_norm=bool(qk_norm),
        cross_attn_norm=bool(cfg.get("cross_attn_norm", True)), eps=float(cfg.get("eps", 1e-6)),
    )


def text_encoder_config_from_json(c: dict, source: Path, text_len: int = 512) -> TextEncoderConfig:
    """A Diffusers `text_encoder/config.json` (transformers UMT5Config fields, read from `source`) ->
    TextEncoderConfig."""
    heads = _need(c, "num_heads", source)
    return TextEncoderConfig(
        vocab_size=_need(c, "vocab_size", source), dim=_need(c, "d_model", source),
        dim_attn=heads * _need(c, "d_kv", source), ffn_dim=_need(c, "d_ff", source), num_heads=heads,
        num_layers=_need(c, "num_layers", source), num_buckets=c.get("relative_attention_num_buckets", 32),
        max_distance=c.get("relative_attention_max_distance", 128), text_len=text_len,
        eps=c.get("layer_norm_epsilon", 1e-6),
    )


VAE_DIFFUSERS_FIELDS = {  # Diffusers AutoencoderKLWan config.json name -> VAEConfig field
    "base_dim": "base_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "temperal_downsample": "temporal_downsample",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
}
# Features of AutoencoderKLWan that the Wan2.1 VAE does not have (Wan2.2-TI2V's VAE uses some of them).
_VAE_UNSUPPORTED = {"is_residual": False, "attn_scales": [], "patch_size": None, "in_channels": 3, "out_channels": 3}


def vae_config_from_json(config_json: dict, source: Path | str) -> VAEConfig:
    """A VAEConfig from an AutoencoderKLWan config.json read from `source` (absent fields take the Wan2.1
    defaults)."""
    for name, supported in _VAE_UNSUPPORTED.items():
        if config_json.get(name, supported) != supported:
            raise CheckpointError(f"{source}: {name}={config_json[name]!r} is not supported by the Wan2.1 VAE "
                                  f"(expected {supported!r})")
    decoder_dim = config_json.get("decoder_base_dim")
    if decoder_dim is not None and decoder_dim != config_json.get("base_dim", VAEConfig.base_dim):
        raise CheckpointError(f"{source}: decoder_base_dim={decoder_dim} is not base_dim")
    values = {ours: tuple(config_json[theirs]) if isinstance(config_json[theirs], list) else config_json[theirs]
              for theirs, ours in VAE_DIFFUSERS_FIELDS.items() if theirs in config_json}
    try:
        cfg = VAEConfig(**values)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    spatial = 2 ** (len(cfg.dim_mult) - 1)
    return replace(cfg, stride=(2 ** sum(cfg.temporal_downsample), spatial, spatial))


def _matching_preset(dit: DiTConfig, num_experts: int) -> ModelConfig | None:
    """The shipped model YAML with this DiT architecture and expert count, if any."""
    for name in available_models():
        preset = load_model_config(name)
        if preset.random_weights:
            continue
        if (preset.dit.dim, preset.dit.num_layers, preset.dit.num_heads, preset.num_experts) == (
            dit.dim, dit.num_layers, dit.num_heads, num_experts,
        ):
            return preset
    return None


def _diffusers_config(layout: CheckpointLayout) -> ModelConfig:
    root = layout.root
    dit = dit_config_from_json(read_json(root / "transformer" / "config.json"), root / "transformer" / "config.json")
    te_json, vae_json = layout.text_encoder / "config.json", layout.vae / "config.json"
    te = text_encoder_config_from_json(read_json(te_json), te_json, dit.text_len)
    vae = vae_config_from_json(read_json(vae_json), vae_json)
    preset = _matching_preset(dit, layout.num_experts)
    defaults = preset.defaults if preset else SamplingDefaults()
    sched_path = root / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        sched = read_json(sched_path)
        sampler = SCHEDULER_TO_SAMPLER.get(sched.get("_class_name"), defaults.sampler)
        shift = sched.get("flow_shift", sched.get("shift", defaults.shift))
        defaults = replace(defaults, sampler=sampler, shift=float(shift))
    boundary = None
    if layout.num_experts == 2:
        index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
        boundary = index.get("boundary_ratio") or (preset.boundary if preset else 0.875)
        if len(defaults.guidance) == 1:
            defaults = replace(defaults, guidance=defaults.guidance * 2)
    elif len(defaults.guidance) != 1:
        defaults = replace(defaults, guidance=defaults.guidance[:1])
    name = preset.name if preset else root.name
    return ModelConfig(name=name, dit=dit, text_encoder=te, vae=vae, defaults=defaults,
                       num_experts=layout.num_experts, boundary=boundary, description=f"Diffusers folder {root}")


def resolve_model(model: str | None, checkpoint: str | Path | None) -> tuple[ModelConfig, CheckpointLayout | None]:
    """The model config and where its weights are.

    - `model` alone: a shipped preset; only random-weight presets (wan-tiny) run without a checkpoint.
    - `checkpoint` alone: the layout is detected; a Diffusers folder describes itself through its config
      files; an official Wan folder is matched to the shipped YAML with the same DiT architecture.
    - both: the YAML gives the architecture, the folder the weights; the DiT config must agree.
    """
    if checkpoint is None:
        cfg = load_model_config(model or "wan-tiny")
        if not cfg.random_weights:
            raise ConfigError(f"{cfg.name} needs its weights: pass --checkpoint DIR (official Wan or Diffusers folder)")
        return cfg, None
    layout = detect_layout(checkpoint)
    if model is not None:
        cfg = load_model_config(model)
        cfg_path = layout.dit_dirs[0] / "config.json"
        if cfg_path.is_file():
            found = dit_config_from_json(read_json(cfg_path), cfg_path)
            if (found.dim, found.num_layers, found.num_heads) != (cfg.dit.dim, cfg.dit.num_layers, cfg.dit.num_heads):
                raise ConfigError(
                    f"{cfg_path} describes dim={found.dim}, layers={found.num_layers}, heads={found.num_heads}, "
                    f"but model {cfg.name} has dim={cfg.dit.dim}, layers={cfg.dit.num_layers}, heads={cfg.dit.num_heads}"
                )
        if layout.num_experts != cfg.num_experts:
            raise ConfigError(f"{layout.root} holds {layout.num_experts} DiT expert(s); {cfg.name} needs {cfg.num_experts}")
        return cfg, layout
    if layout.kind == "diffusers":
        return _diffusers_config(layout), layout
    cfg_path = layout.dit_dirs[0] / "config.json"
    dit = dit_config_from_json(read_json(cfg_path), cfg_path)
    preset = _matching_preset(dit, layout.num_experts)
    if preset is None:
        raise ConfigError(
            f"{layout.root}: no shipped model has dim={dit.dim}, layers={dit.num_layers}, {layout.num_experts} "
            f"expert(s); pass --model NAME or a YAML path ({', '.join(available_models())})"
        )
    return preset, layout
