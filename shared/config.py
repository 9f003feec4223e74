"""Model parameters: typed, frozen configs for the DiT, T5, VAE and sampling defaults, read from one YAML per model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODELS_DIR = Path(__file__).parent / "models"


class ConfigError(ValueError):
    """A model YAML or checkpoint config that cannot describe a valid model."""


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one Wan DiT expert (see Wan2.1 `wan/modules/model.py`)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"dit.dim ({self.dim}) must be a multiple of dit.num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"dit head dim ({self.head_dim}) must be even for RoPE")


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder architecture (HF UMT5Config names in brackets)."""

    vocab_size: int = 256384
    dim: int = 4096  # d_model
    dim_attn: int = 4096  # num_heads * d_kv
    ffn_dim: int = 10240  # d_ff
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative_attention_num_buckets
    max_distance: int = 128  # relative_attention_max_distance
    text_len: int = 512  # tokens per prompt, padded / truncated
    eps: float = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal video VAE architecture and latent normalisation."""

    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    stride: tuple[int, int, int] = (4, 8, 8)  # (time, height, width) compression
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )

    def __post_init__(self) -> None:
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(f"vae.latents_mean/std must have z_dim={self.z_dim} entries")


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-model defaults for the user parameters; every default must be a valid request."""

    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 50
    shift: float = 5.0
    guidance: tuple[float, ...] = (5.0,)  # one value, or (high-noise expert, low-noise expert) for Wan2.2
    sampler: str = "unipc"
    negative_prompt: str = ""
    fps: int = 16


@dataclass(frozen=True)
class ModelConfig:
    """Everything static about one model: its stages' architectures, experts and defaults."""

    name: str
    dit: DiTConfig
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    num_train_timesteps: int = 1000
    # Wan2.2 A14B: two experts; the high-noise one runs while timestep >= boundary * num_train_timesteps.
    num_experts: int = 1
    boundary: float | None = None
    random_weights: bool = False  # True only for presets without checkpoints (wan-tiny)
    description: str = ""

    def __post_init__(self) -> None:
        if self.num_experts not in (1, 2):
            raise ConfigError(f"{self.name}: num_experts must be 1 or 2, got {self.num_experts}")
        if self.num_experts == 2 and not (self.boundary and 0.0 < self.boundary < 1.0):
            raise ConfigError(f"{self.name}: a two-expert model needs boundary in (0, 1)")
        if len(self.defaults.guidance) not in (1, self.num_experts):
            raise ConfigError(f"{self.name}: defaults.guidance needs 1 or {self.num_experts} values")
        if self.dit.text_dim != self.text_encoder.dim:
            raise ConfigError(f"{self.name}: dit.text_dim must equal text_encoder.dim")
        if self.dit.in_dim != self.vae.z_dim:
            raise ConfigError(f"{self.name}: dit.in_dim must equal vae.z_dim")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: dict[str, Any] | None, where: str):
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    data = dict(data)
    parts = {
        "dit": _build(DiTConfig, data.pop("dit", None), f"{where}: dit"),
        "text_encoder": _build(TextEncoderConfig, data.pop("text_encoder", None), f"{where}: text_encoder"),
        "vae": _build(VAEConfig, data.pop("vae", None), f"{where}: vae"),
        "defaults": _build(SamplingDefaults, data.pop("defaults", None), f"{where}: defaults"),
    }
    top = {f.name for f in dataclasses.fields(ModelConfig)} - set(parts)
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(top | set(parts))}")
    return ModelConfig(**data, **parts)


def available_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Load a model YAML by model name (`Wan2.1-T2V-1.3B`, `wan-tiny`, ...) or by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODELS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        hint = ""
        if Path(name_or_path).is_dir():
            hint = " (it is a folder: pass a checkpoint folder with --checkpoint, and --model only to name its preset)"
        raise ConfigError(f"unknown model {str(name_or_path)!r}; available: {', '.join(available_models())}{hint}")
    with open(path) as f:
        data = yaml.safe_load(f)
    return model_config_from_dict(data, where=str(path.name))
