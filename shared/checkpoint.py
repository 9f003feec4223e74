"""Checkpoint reading: file formats (safetensors, sharded index, .pth), layout detection, strict loading."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not match the model it should fill."""


# --------------------------------------------------------------------------------------------- files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read one weights file: `.safetensors`, a sharded `*.safetensors.index.json`, or `.pth`/`.pt`.

    `.pth` goes through `torch.load(weights_only=True)`: nothing in a checkpoint is executed.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    name = path.name
    try:
        if name.endswith(".index.json"):
            with open(path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                out.update(read_state_dict(path.parent / shard))
            return out
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        if name.endswith((".pth", ".pt", ".bin")):
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
            return sd
    except CheckpointError:
        raise
    except Exception as e:  # corrupt file, wrong format, unsafe pickle ...
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    raise CheckpointError(f"{path}: unsupported weights file (expected .safetensors, .index.json or .pth)")


def find_weights(folder: Path, stem: str = "diffusion_pytorch_model") -> Path:
    """The weights of a module folder: `<stem>.safetensors`, its sharded index, or `<stem>.bin`/`.pth`."""
    for candidate in (
        f"{stem}.safetensors.index.json",
        f"{stem}.safetensors",
        f"{stem}.bin.index.json",
        f"{stem}.bin",
        f"{stem}.pth",
    ):
        if (folder / candidate).is_file():
            return folder / candidate
    found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise CheckpointError(
        f"no weights '{stem}.safetensors' (or .safetensors.index.json / .bin / .pth) in {folder}; found {found}"
    )


# ------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class CheckpointLayout:
    """Where each stage's files are, for one of the two layouts users have on disk.

    kind "wan": official Wan folders (DiT safetensors in the root, or `high_noise_model/` and
    `low_noise_model/` for Wan2.2; `models_t5_umt5-xxl-enc-bf16.pth`; `Wan2.1_VAE.pth`; `google/umt5-xxl/`).
    kind "diffusers": `transformer/` (+ `transformer_2/`), `text_encoder/`, `tokenizer/`, `vae/`, `scheduler/`.
    """

    root: Path
    kind: str  # "wan" or "diffusers"
    dit_dirs: tuple[Path, ...]  # one per expert, high-noise expert first
    text_encoder: Path  # Wan: the .pth file; Diffusers: the text_encoder/ folder
    tokenizer: Path  # a folder loadable by transformers.AutoTokenizer
    vae: Path  # Wan: the .pth file; Diffusers: the vae/ folder

    @property
    def num_experts(self) -> int:
        return len(self.dit_dirs)


WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"


def detect_layout(root: str | Path) -> CheckpointLayout:
    """Recognise an official Wan folder or a Diffusers folder; say what is missing otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    if (root / "transformer").is_dir() or (root / "model_index.json").is_file():
        need = ["transformer", "text_encoder", "tokenizer", "vae"]
        missing = [n for n in need if not (root / n).is_dir()]
        if missing:
            raise CheckpointError(f"{root}: Diffusers layout is missing folders {missing} (needs {need})")
        dits = [root / "transformer"] + ([root / "transformer_2"] if (root / "transformer_2").is_dir() else [])
        return CheckpointLayout(root, "diffusers", tuple(dits), root / "text_encoder", root / "tokenizer", root / "vae")
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        dits = [root / "high_noise_model", root / "low_noise_model"]
    else:
        dits = [root]
    missing = [str(d.relative_to(root)) or "." for d in dits if not d.is_dir()]
    for rel in (WAN_T5_FILE, WAN_VAE_FILE):
        if not (root / rel).is_file():
            missing.append(rel)
    if not (root / WAN_TOKENIZER_DIR).is_dir():
        missing.append(WAN_TOKENIZER_DIR + "/")
    if missing:
        raise CheckpointError(
            f"{root}: neither a Diffusers folder (transformer/, text_encoder/, tokenizer/, vae/) nor a complete "
            f"official Wan folder; missing {missing}"
        )
    return CheckpointLayout(root, "wan", tuple(dits), root / WAN_T5_FILE, root / WAN_TOKENIZER_DIR, root / WAN_VAE_FILE)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; CheckpointError when the file is missing, not JSON, or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing config file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------- strict loading
def rename_keys(sd: dict[str, torch.Tensor], rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Apply a key mapping; keys mapped to None are dropped."""
    out = {}
    for key, value in sd.items():
        new = rename(key)
        if new is not None:
            out[new] = value
    return out


def _describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str | Path,
    device: torch.device | str,
    dtype: torch.dtype,
    keep_fp32: tuple[str, ...] = (),
) -> nn.Module:
    """Fill a module built on the meta device from `state_dict`, all-or-nothing.

    Every parameter and buffer the module declares must be present with the right shape, and nothing
    else may be; otherwise a CheckpointError names `source`, the missing / unexpected keys and the
    shape mismatches, and the module is left untouched. Tensors are moved straight to `device` and
    cast to `dtype`, except those whose name contains one of `keep_fp32` (kept float32).
    Non-persistent buffers (e.g. RoPE tables) are recomputed by the module's `init_buffers()`.
    """
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched[:8])}")
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + " | ".join(parts))
    converted = {}
    for key, value in state_dict.items():
        floating = value.is_floating_point()
        target = torch.float32 if floating and any(p in key for p in keep_fp32) else (dtype if floating else value.dtype)
        converted[key] = value.to(device=device, dtype=target)
    module.load_state_dict(converted, strict=True, assign=True)
    init = getattr(module, "init_buffers", None)
    if callable(init):
        init(torch.device(device))
    return module.eval().requires_grad_(False)


def materialize_random(module: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int,
                       keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """Give a meta-device module deterministic random weights (for random-weight presets and tests).

    Weights are drawn on the CPU in float32 with a seeded generator (so every machine gets the same
    model), then loaded through `load_strict` like a checkpoint.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            sd[name] = torch.zeros(t.shape, dtype=t.dtype)
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (leaf == "weight" and t.dim() == 1) or leaf == "gamma":  # norm gains
            sd[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        elif leaf == "bias" or t.dim() <= 1:
            sd[name] = 0.02 * torch.randn(t.shape, generator=gen)
        else:
            fan_in = max(1, t[0].numel())
            sd[name] = torch.randn(t.shape, generator=gen) / fan_in**0.5
    return load_strict(module, sd, f"random weights (seed {seed})", device, dtype, keep_fp32)
