"""Which model a deployment serves: a named YAML preset, a checkpoint folder (either layout), or both."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from smartdiff.shared.checkpoint import (CheckpointError, CheckpointLayout, check_weight_files, detect_layout,
                                        read_json)
from smartdiff.shared.config import (
    ConfigError, DiTConfig, ModelConfig, SamplingDefaults, TextEncoderConfig, VAEConfig, available_models,
    load_model_config,
)

SCHEDULER_TO_SAMPLER = {
    "UniPCMultistepScheduler": "unipc",
    "DPMSolverMultistepScheduler": "dpm++",
    "FlowMatchEulerDiscreteScheduler": "euler",
}


_REQUIRED = object()
_IS = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1,
       "ints": lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
       "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
       "bool": lambda x: isinstance(x, bool)}  # the check of one value (of a list's items, for "ints")
_RULES = {"int": "an integer >= 1", "float": "a number", "bool": "true or false",
          "ints": "a list of integers >= 0", "floats": "a list of numbers", "bools": "a list of true / false"}


def _field(cfg: dict, key: str, source: Path | str, kind: str, default=_REQUIRED):
    """cfg[key] checked against `kind`: "int" (>= 1), "float", "bool", or a list of them: "ints" (>= 0), "floats",
    "bools" (as a tuple); CheckpointError naming the file, the field and the rule otherwise; `default` when absent
    (else the field is required)."""
    if cfg.get(key) is None:  # absent, or null (Diffusers writes unset optional arguments as null)
        if default is _REQUIRED:
            raise CheckpointError(f"{source}: missing field {key!r}")
        return default
    v = cfg[key]
    if kind in ("ints", "floats", "bools"):
        ok = isinstance(v, list) and all(_IS[kind if kind == "ints" else kind[:-1]](x) for x in v)
    else:
        ok = _IS[kind](v)
    if not ok:
        raise CheckpointError(f"{source}: field {key!r} must be {_RULES[kind]}, got {v!r}")
    return tuple(v) if isinstance(v, list) else v


def dit_config_from_json(cfg: dict, source: Path) -> DiTConfig:
    """From an official Wan `config.json` (WanModel) or a Diffusers transformer `config.json`."""
    if "num_attention_heads" in cfg:  # Diffusers WanTransformer3DModel
        if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
            raise CheckpointError(f"{source}: image-conditioned (I2V) transformers are not supported")
        heads = _field(cfg, "num_attention_heads", source, "int")
        dim = heads * _field(cfg, "attention_head_dim", source, "int")
        names = dict(in_dim="in_channels", out_dim="out_channels")
    else:
        if cfg.get("model_type", "t2v") != "t2v":
            raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not supported (only t2v)")
        heads, dim = _field(cfg, "num_heads", source, "int"), _field(cfg, "dim", source, "int")
        names = dict(in_dim="in_dim", out_dim="out_dim")
    in_dim = _field(cfg, names["in_dim"], source, "int", 16)
    if in_dim != 16:  # 36: Wan2.2-I2V's noise + image latents and mask; 48: TI2V-5B's VAE
        raise CheckpointError(f"{source}: {names['in_dim']} {in_dim} is not a text-to-video transformer of the Wan2.1 "
                              "VAE (16 latent channels); image-to-video and TI2V checkpoints are not supported")
    patch = _field(cfg, "patch_size", source, "ints", (1, 2, 2))
    if len(patch) != 3 or 0 in patch:
        raise CheckpointError(f"{source}: field 'patch_size' must be 3 integers >= 1, got {list(patch)}")
    return DiTConfig(
        dim=dim, num_heads=heads, ffn_dim=_field(cfg, "ffn_dim", source, "int"),
        num_layers=_field(cfg, "num_layers", source, "int"), patch_size=patch,
        in_dim=in_dim,
        out_dim=_field(cfg, names["out_dim"], source, "int", 16),
        freq_dim=_field(cfg, "freq_dim", source, "int", 256), text_dim=_field(cfg, "text_dim", source, "int", 4096),
        text_len=_field(cfg, "text_len", source, "int", 512), qk_norm=bool(cfg.get("qk_norm", True)),
        cross_attn_norm=_field(cfg, "cross_attn_norm", source, "bool", True),
        eps=float(_field(cfg, "eps", source, "float", 1e-6)),
    )


def text_encoder_config_from_json(c: dict, source: Path, text_len: int = 512) -> TextEncoderConfig:
    """A Diffusers `text_encoder/config.json` (transformers UMT5Config fields, read from `source`) ->
    TextEncoderConfig."""
    heads = _field(c, "num_heads", source, "int")
    return TextEncoderConfig(
        vocab_size=_field(c, "vocab_size", source, "int"), dim=_field(c, "d_model", source, "int"),
        dim_attn=heads * _field(c, "d_kv", source, "int"), ffn_dim=_field(c, "d_ff", source, "int"), num_heads=heads,
        num_layers=_field(c, "num_layers", source, "int"),
        num_buckets=_field(c, "relative_attention_num_buckets", source, "int", 32),
        max_distance=_field(c, "relative_attention_max_distance", source, "int", 128), text_len=text_len,
        eps=float(_field(c, "layer_norm_epsilon", source, "float", 1e-6)),
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
    kinds = dict(base_dim="int", z_dim="int", dim_mult="ints", num_res_blocks="int", temperal_downsample="bools",
                 latents_mean="floats", latents_std="floats")
    values = {ours: _field(config_json, theirs, source, kinds[theirs])
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
        sampler = SCHEDULER_TO_SAMPLER.get(str(sched.get("_class_name")), defaults.sampler)
        shift = _field(sched, "flow_shift", sched_path, "float", _field(sched, "shift", sched_path, "float",
                                                                         defaults.shift))
        defaults = replace(defaults, sampler=sampler, shift=float(shift))
    boundary = None
    if layout.num_experts == 2:
        index_path = root / "model_index.json"
        index = read_json(index_path) if index_path.is_file() else {}
        boundary = _field(index, "boundary_ratio", index_path, "float", None) or (preset.boundary if preset else 0.875)
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
    check_weight_files(layout)
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
            f"{layout.root}: no shipped model with real weights has dim={dit.dim}, layers={dit.num_layers}, "
            f"{layout.num_experts} expert(s) (the random-weight presets are not matched to checkpoints); pass "
            f"--model NAME or a YAML path ({', '.join(available_models())})"
        )
    return preset, layout
