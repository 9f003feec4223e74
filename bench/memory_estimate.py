"""Peak device memory of the DiT step and VAE decode per low_mem_level, counted on the meta device (no GPU).

Runs the real modules on meta tensors and tracks the bytes of live tensor storages op by op (attention is
counted as its output only, as flash / cuDNN kernels allocate). Weights are added per level: all of them at
level 0, two streaming slots at level 3 (DiT); the VAE keeps its decoder only from level 1. An estimate of
torch.cuda.max_memory_allocated, without allocator rounding or library workspaces: bench/low_mem.py measures.

Run: python bench/memory_estimate.py            (14B step 480p x 81, VAE decode 720p x 81, both dtypes)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from smartdiff.services.denoiser.dit import KEEP_FP32
from smartdiff.services.denoiser.offload import stream_units
from smartdiff.services.denoiser.weights import build_dit
from smartdiff.services.vae.model import WanVAE
from smartdiff.services.vae.tiling import TilingConfig, Uint8Sink, decode_tiled
from smartdiff.shared.config import VAEConfig, load_model_config

GiB = 2**30


class _AttentionOutputOnly(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Peak of the summed sizes of live storages created by ops run under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def _purge(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()  # what Python freed before this op
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                # New storages only: not views / in-place results of tensors made outside (weights, outputs).
                if storage._cdata not in self.live and storage._cdata not in inputs:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def activation_peak(fn) -> int:
    with torch.inference_mode(), _AttentionOutputOnly(), LiveBytes() as counter:
        fn()
    return counter.peak


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def dit_rows(model: str, frames: int, height: int, width: int, batch: int) -> list[tuple[str, float]]:
    cfg = load_model_config(model).dit
    dit = build_dit(cfg)
    for name, p in dit.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name for k in KEEP_FP32) else torch.bfloat16)
    x = torch.empty(batch, cfg.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta",
                    dtype=torch.bfloat16)
    ctx = torch.empty(batch, cfg.text_len, cfg.text_dim, device="meta", dtype=torch.bfloat16)
    t = torch.full((batch,), 900.0, device="meta")
    act = activation_peak(lambda: dit(x, t, ctx))
    slots = 2 * max(nbytes(u) for u in stream_units(dit))
    tag = f"DiT {model} {width}x{height}x{frames} batch {batch}"
    return [(f"{tag}: activations", act / GiB), (f"{tag}: level 0 (all weights)", (act + nbytes(dit)) / GiB),
            (f"{tag}: level 3 (2 slots)", (act + slots) / GiB)]


def vae_rows(frames: int, height: int, width: int, dtype: torch.dtype, tiling: TilingConfig) -> list:
    with torch.device("meta"):
        vae = WanVAE(VAEConfig()).to(dtype)
    z = torch.empty(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta", dtype=dtype)
    untiled = activation_peak(lambda: vae.decode(z))  # float video; the uint8 conversion adds a few copies
    # Frames go to the CPU at level 1; here they stay on meta, created outside the count (the per-tile uint8
    # staging buffer, ~35 MB at 720p x 81, is left out).
    sink = Uint8Sink((1, 3, frames, height, width), torch.device("meta"))
    tiled = activation_peak(lambda: decode_tiled(vae, z, tiling, sink))
    tag = f"VAE {width}x{height}x{frames} {str(dtype).removeprefix('torch.')}"
    return [(f"{tag}: level 0 untiled", (untiled + nbytes(vae)) / GiB),
            (f"{tag}: level 1 tiles {tiling.tile}:{tiling.overlap}:{tiling.frames_per_call}",
             (tiled + nbytes(vae.decoder)) / GiB)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Wan2.1-T2V-14B")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tiling", type=TilingConfig.flag, default=None, metavar="TILE:OVERLAP[:FRAMES]",
                   help="VAE tiles (default: the served ones, TilingConfig.for_dtype)")
    args = p.parse_args()
    rows = [r for b in args.batch for r in dit_rows(args.model, 81, 480, 832, b)]
    for dtype in (torch.bfloat16, torch.float32):
        tiling = args.tiling or TilingConfig.for_dtype(dtype)
        rows += vae_rows(81, 720, 1280, dtype, tiling)
    for name, gib in rows:
        print(f"{name:<62}{gib:>8.2f} GiB")


if __name__ == "__main__":
    main()
