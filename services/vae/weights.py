"""VAE checkpoint loading: the official `Wan2.1_VAE.pth` as is, or a Diffusers `vae/` folder renamed to it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from smartdiff.services.vae.model import WanVAE
from smartdiff.shared.checkpoint import (
    WAN_VAE_FILE,
    CheckpointError,
    find_weights,
    load_strict,
    read_json,
    read_state_dict,
    rename_keys,
)
from smartdiff.shared.config import VAEConfig
from smartdiff.shared.model_source import VAE_DIFFUSERS_FIELDS, vae_config_from_json


def load_vae(source: str | Path, kind: str, config: VAEConfig, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> WanVAE:
    """Build the VAE on the meta device and fill it from a checkpoint, all-or-nothing.

    kind "wan": `source` is `Wan2.1_VAE.pth` (or the folder holding it); kind "diffusers": the `vae/`
    folder (config.json + diffusion_pytorch_model.safetensors), whose config must match `config`.
    Raises CheckpointError naming the file and the offending keys or config field.
    """
    with torch.device("meta"):
        model = WanVAE(config)
    state_dict, path = read_vae_state_dict(Path(source), kind, config)
    return load_strict(model, state_dict, path, device, dtype)


def read_vae_state_dict(source: Path, kind: str, config: VAEConfig) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors under our (official Wan) key names, and the file they came from."""
    if kind == "wan":
        path = source / WAN_VAE_FILE if source.is_dir() else source
        return read_state_dict(path), path
    if kind == "diffusers":
        check_diffusers_config(read_json(source / "config.json"), config, source / "config.json")
        path = find_weights(source)
        return convert_diffusers_state_dict(read_state_dict(path), config.num_res_blocks), path
    raise CheckpointError(f"unknown checkpoint kind {kind!r} for the VAE (expected 'wan' or 'diffusers')")


# ------------------------------------------------------------------------------------- Diffusers config
def check_diffusers_config(config_json: dict, config: VAEConfig, where: str | Path) -> None:
    """Raise CheckpointError naming the first config.json field that disagrees with `config`."""
    theirs = vae_config_from_json(config_json, where)
    for name, field in VAE_DIFFUSERS_FIELDS.items():
        a, b = getattr(theirs, field), getattr(config, field)
        if not _same(a, b):
            raise CheckpointError(f"{where}: {name} is {list(a) if isinstance(a, tuple) else a} "
                                  f"but the model config has {field}={b}")


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


# ------------------------------------------------------------------------------------ Diffusers keys
# Inside a residual block: Diffusers names -> positions in our `residual` Sequential.
_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}


def _resnet(tail: str) -> str:
    head, rest = tail.split(".", 1)
    return f"{_RESNET.get(head, head)}.{rest}"


def diffusers_key_to_wan(key: str, num_res_blocks: int) -> str:
    """Rename one AutoencoderKLWan key to the official Wan key; unknown keys come back unchanged.

    The decoder's up_blocks[i] (num_res_blocks + 1 resnets, then an upsampler) are flattened into
    one `upsamples` Sequential; the encoder's down_blocks are already flat.
    """
    per_level = num_res_blocks + 2
    rules = (
        (r"quant_conv\.(.+)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(.+)", lambda m: f"conv2.{m[1]}"),
        (r"(encoder|decoder)\.conv_in\.(.+)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(encoder|decoder)\.norm_out\.(.+)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(.+)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_resnet(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.(.+)", lambda m: f"encoder.downsamples.{m[1]}.{_resnet(m[2])}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{_resnet(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
         lambda m: f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}"),
    )
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    return key


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """An AutoencoderKLWan state dict under official Wan key names (tensors are not copied)."""
    return rename_keys(sd, lambda key: diffusers_key_to_wan(key, num_res_blocks))
