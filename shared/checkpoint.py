"""Checkpoint reading: file formats (safetensors, sharded index, .pth), layout detection, strict loading."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from smartdiff.shared.config import MODELS_DIR


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not match the model it should fill."""


# --------------------------------------------------------------------------------------------- files
def check_readable(path: Path, what: str = "checkpoint file") -> None:
    """CheckpointError naming `path` unless it is a readable, non-empty file: a broken symbolic link (a Hugging
    Face cache whose blob is gone), a file left empty or unreadable by an interrupted or foreign-user download."""
    try:
        if path.is_symlink() and not path.exists():
            raise CheckpointError(f"{what} {path} is a broken symbolic link (to {os.readlink(path)}): its target is "
                                  "missing, e.g. an incomplete download into a Hugging Face cache")
        if not path.exists():
            raise CheckpointError(f"{what} not found: {path}")
        if not path.is_file():
            raise CheckpointError(f"{what} {path} is not a file")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{what} {path} is empty (an incomplete download?)")
        if not os.access(path, os.R_OK):
            raise CheckpointError(f"{what} {path} is not readable by this user (uid {os.getuid()}): permission denied")
    except OSError as e:  # e.g. a folder on the path that this user may not enter
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _shards(path: Path) -> list[tuple[Path, set[str]]]:
    """A sharded index's shard files (each present, or a link: a broken one is said by reading it) with the keys
    its weight_map assigns to each, in file order."""
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: needs a 'weight_map' object mapping each tensor name to its shard file")
    shards: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, set()).add(key)
    for shard in shards:
        if not (path.parent / shard).exists() and not (path.parent / shard).is_symlink():
            raise CheckpointError(f"{path} lists shard {shard}, which is missing from {path.parent}")
    return [(path.parent / shard, keys) for shard, keys in sorted(shards.items())]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read one weights file: `.safetensors`, a sharded `*.safetensors.index.json`, or `.pth`/`.pt`.

    A sharded index is followed key by key: a shard holding a tensor the index assigns elsewhere or nowhere (a
    stale shard from another revision, one tensor in two shards) is refused, not settled by file order; a tensor
    the index lists but no shard holds (a tied alias stored once) is left to the strict load.
    `.pth` goes through `torch.load(weights_only=True)`: nothing in a checkpoint is executed.
    """
    path = Path(path)
    check_readable(path)
    name = path.name
    try:
        if name.endswith(".index.json"):
            out: dict[str, torch.Tensor] = {}
            for shard_path, keys in _shards(path):
                part = read_state_dict(shard_path)
                extra = set(part) - keys
                if extra:
                    raise CheckpointError(f"shard {shard_path} does not match {path.name}: it holds {_describe(extra)}, "
                                          "which the index assigns to another shard or to none (a stale shard?)")
                out.update(part)
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
    names = (f"{stem}.safetensors.index.json", f"{stem}.safetensors", f"{stem}.bin.index.json", f"{stem}.bin",
             f"{stem}.pth")
    try:
        for candidate in names:
            if (folder / candidate).is_file() or (folder / candidate).is_symlink():  # a broken link: said by reading
                return folder / candidate
        found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    except OSError as e:
        raise CheckpointError(f"cannot list {folder}: {e.strerror or e}") from None
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
    try:
        return _detect_layout(Path(root))
    except OSError as e:  # a folder this user may not enter
        raise CheckpointError(f"cannot read checkpoint folder {root}: {e.strerror or e} ({e.filename})") from None


DIFFUSERS_PARTS = ("transformer", "transformer_2", "text_encoder", "tokenizer", "vae")


def _detect_layout(root: Path) -> CheckpointLayout:
    if not root.is_dir():
        hint = ""
        if not root.exists() and len(root.parts) == 1 and (MODELS_DIR / f"{root}.yaml").is_file():
            hint = f" ({root} is a model name: pass it with --model)"
        raise CheckpointError(f"checkpoint folder not found: {root}{hint}")
    if (root / "transformer").is_dir() or (root / "model_index.json").is_file():
        need = ["transformer", "text_encoder", "tokenizer", "vae"]
        missing = [n for n in need if not (root / n).is_dir()]
        if (root / "model_index.json").is_file():  # what the pipeline has: Wan2.2 lists transformer_2
            index = read_json(root / "model_index.json")
            listed = [n for n in DIFFUSERS_PARTS  # as Diffusers reads it: [library, class], library None = absent
                      if isinstance(index.get(n), list) and index[n] and index[n][0] is not None]
            missing += [n for n in listed if n not in need and not (root / n).is_dir()]
        if missing:
            raise CheckpointError(f"{root}: Diffusers layout is missing folders {missing} (needs {need}, and every "
                                  "component model_index.json lists; an incomplete download?)")
        dits = [root / "transformer"] + ([root / "transformer_2"] if (root / "transformer_2").is_dir() else [])
        return CheckpointLayout(root, "diffusers", tuple(dits), root / "text_encoder", root / "tokenizer", root / "vae")
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        dits = [root / "high_noise_model", root / "low_noise_model"]
    else:
        dits = [root]
    missing = [str(d.relative_to(root)) or "." for d in dits if not d.is_dir()]
    for rel in (WAN_T5_FILE, WAN_VAE_FILE):
        if not (root / rel).is_file() and not (root / rel).is_symlink():  # a broken link: said by check_weight_files
            missing.append(rel)
    if not (root / WAN_TOKENIZER_DIR).is_dir():
        missing.append(WAN_TOKENIZER_DIR + "/")
    if missing:
        raise CheckpointError(
            f"{root}: neither a Diffusers folder (transformer/, text_encoder/, tokenizer/, vae/) nor a complete "
            f"official Wan folder; missing {missing}"
        )
    return CheckpointLayout(root, "wan", tuple(dits), root / WAN_T5_FILE, root / WAN_TOKENIZER_DIR, root / WAN_VAE_FILE)


def check_weight_files(layout: CheckpointLayout) -> None:
    """Before anything loads: every weights file of every stage is there, readable, non-empty and of its format
    (safetensors headers parse, every shard an index lists exists, .pth files are zip archives). A half-downloaded
    folder is refused at once, naming the file, instead of after the other stages loaded tens of GB."""
    if layout.kind == "wan":
        files = [find_weights(d) for d in layout.dit_dirs] + [layout.text_encoder, layout.vae]
    else:
        files = [find_weights(d) for d in layout.dit_dirs] + [find_weights(layout.text_encoder, "model"),
                                                              find_weights(layout.vae)]
    for path in files:
        if path.name.endswith(".index.json"):
            check_readable(path)
            for shard_path, _ in _shards(path):
                _check_format(shard_path)
        else:
            _check_format(path)


def _check_format(path: Path) -> None:
    check_readable(path)
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:  # the header only
                f.keys()
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e} (truncated or not safetensors?)") from None
    elif path.name.endswith((".pth", ".pt")) and not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: not a zip archive as torch.save writes (truncated, or "
                              "saved with the legacy format: re-save it with torch.save)")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; CheckpointError when the file is missing, not JSON, or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing config file {path}") from None
    except OSError as e:  # permission denied, a folder ...
        raise CheckpointError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------- strict loading
def rename_keys(sd: dict[str, torch.Tensor], rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Apply a key mapping; keys mapped to None are dropped. Two keys mapped to one name (a file holding a tensor
    under both naming schemes) are refused: which one would load is not the user's choice."""
    out, source = {}, {}
    for key, value in sd.items():
        new = rename(key)
        if new is None:
            continue
        if new in out:
            raise CheckpointError(f"the checkpoint holds both {source[new]!r} and {key!r}, which both load as {new!r} "
                                  "(one tensor under two naming schemes, or a stale copy); keep one")
        out[new], source[new] = value, key
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
    converted, done = {}, {}
    for key, value in state_dict.items():
        floating = value.is_floating_point()
        target = torch.float32 if floating and any(p in key for p in keep_fp32) else (dtype if floating else value.dtype)
        memo = (id(value), target)  # one tensor under two names (umT5's tied embedding) is converted once
        if memo not in done:
            out = value.to(device=device, dtype=target)
            if out.device.type == "cpu" and out.data_ptr() == value.data_ptr():  # still the memory-mapped file's
                out = out.clone()  # memory: a file overwritten in place would be SIGBUS in the middle of a request
            done[memo] = out
        converted[key] = done[memo]
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
