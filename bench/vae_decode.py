"""VAE decode, ours (fused RMSNorm + SiLU kernel, and the unfused ops; channels-last, the engine's layout on CUDA,
and NCDHW) vs diffusers' AutoencoderKLWan, same random weights, one run on one GPU: time, peak memory and the
relative error of each against diffusers.

Wan2.1 VAE, latents of 832x480 x 81 frames by default (what a 1.3B / 14B 480p generation decodes), float32 as in
the end-to-end benchmark (--dtype for bfloat16). Needs a CUDA GPU and the `diffusers` package (the peer).

  python bench/vae_decode.py --out bench_results/vae_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from smartdiff.services.vae import fused
from smartdiff.shared.config import VAEConfig

from common import cuda_time, git_commit, rel_err, same_weight_vaes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench_results/vae_decode.json"))
    args = p.parse_args()
    dtype, cfg = DTYPES[args.dtype], VAEConfig()
    ref, ours = same_weight_vaes(cfg, "cuda", dtype)
    ref.to("cuda", dtype)
    st, sh, sw = cfg.stride
    z = torch.randn(1, cfg.z_dim, (args.frames - 1) // st + 1, args.height // sh, args.width // sw, device="cuda",
                    generator=torch.Generator(device="cuda").manual_seed(1), dtype=dtype)
    # (name, fused kernel on, channels-last weights): the last is what the VAE engine runs on CUDA
    runs = {"diffusers AutoencoderKLWan": None, "ours unfused, channels-last": (False, True),
            "ours fused, NCDHW": (True, False), "ours (fused, channels-last)": (True, True)}
    rows, outs = {}, {}
    with torch.inference_mode():
        for name, setting in runs.items():
            if setting is None:
                fn = lambda: ref.decode(z).sample  # noqa: E731
            else:
                fused.ENABLED = setting[0]
                ours.use_channels_last(setting[1])
                fn = lambda: ours.decode(z)  # noqa: E731
            torch.cuda.reset_peak_memory_stats()
            # diffusers clamps its output; ours is compared the same way (on the host: no run's peak includes it)
            outs[name] = fn().float().clamp(-1, 1).cpu()
            times = cuda_time(fn, 0, args.iters)
            rows[name] = dict(seconds=statistics.median(times), all_seconds=times,
                              peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    fused.ENABLED = True
    base = rows["diffusers AutoencoderKLWan"]["seconds"]
    peer = outs["diffusers AutoencoderKLWan"]
    print(f"card: {torch.cuda.get_device_name()}  VAE decode {args.width}x{args.height} x {args.frames}, "
          f"{args.dtype}")
    print(f"{'decoder':<28}{'time (s)':>10}{'vs diffusers':>14}{'peak GiB':>10}{'rel err vs diffusers':>22}")
    for name, row in rows.items():
        row["speedup_vs_diffusers"] = base / row["seconds"]
        row["rel_err_vs_diffusers"] = rel_err(outs[name], peer)
        print(f"{name:<28}{row['seconds']:>10.3f}{row['speedup_vs_diffusers']:>13.2f}x{row['peak_gib']:>10.1f}"
              f"{row['rel_err_vs_diffusers']:>22.1e}")
    res = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
               commit=git_commit(), shape=dict(width=args.width, height=args.height, frames=args.frames),
               dtype=args.dtype, runs=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
