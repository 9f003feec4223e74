"""Low-memory levels beside diffusers, same random weights, one run on one GPU: peak memory and time.

DiT (issue 7): one Wan2.1-T2V-14B forward, batch 1, 480p x 81 frames, random bf16 weights shared by both:
  diffusers WanTransformer3DModel resident / enable_group_offload(block_level, 1 block per group, use_stream)
  ours low_mem_level 0 (resident) / 3 (weights streamed from pinned host memory, services/denoiser/offload.py)
VAE: decode of 720p x 81 frames (latent 16 x 21 x 90 x 160), random weights shared by both, per dtype:
  diffusers AutoencoderKLWan decode untiled / enable_tiling() (its defaults: 256 px tiles, 192 px stride)
  ours VaeEngine.decode (latents -> uint8 frames) level 0 / level 1 default tiles / level 1 --vae-alt-tiling
Peak = torch.cuda.max_memory_allocated over the timed calls (weights included); time = median of CUDA-event
timed calls after warm-up. Accuracy beside speed: relative error / PSNR against the resident or untiled run
of the same implementation (random weights: a lower bound on the difficulty, not a quality claim).

Run:      python bench/low_mem.py --out bench_results/low_mem.json
Check:    python bench/low_mem.py --dry-run     (tiny models and shapes on the CPU: runs every code path it
          can without CUDA; diffusers' streamed group offload needs CUDA and is skipped there)
Needs a CUDA GPU (about 40 GiB free for the resident 14B step) and the `diffusers` package (the peer).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from smartdiff.services.denoiser.dit import KEEP_FP32
from smartdiff.services.denoiser.offload import BlockOffloader
from smartdiff.services.denoiser.weights import build_dit, diffusers_to_wan_key
from smartdiff.services.vae.engine import VaeEngine, to_uint8_frames
from smartdiff.services.vae.tiling import TilingConfig, tile_spans
from smartdiff.shared.checkpoint import load_strict, rename_keys
from smartdiff.shared.config import VAEConfig, load_model_config
from smartdiff.shared.memory import MemoryPolicy, measure_peak

from common import diffusers_dit, git_commit, rel_err, same_weight_vaes

TARGETS = dict(dit_peak_gib=5.0, dit_time_ratio=1.05, vae_peak_gib=2.0, vae_time_ratio=1.3)


# -- measuring --------------------------------------------------------------------------------

def measure(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[object, dict]:
    """Run fn warmup + iters times; returns (last output, {seconds, all_seconds, peak_gib, resident_gib})."""
    cuda = device.type == "cuda"
    out = None
    for _ in range(warmup):
        out = None
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    times = []
    with measure_peak(device) as peak:
        for _ in range(iters):
            out = None  # the previous output must not count in this call's peak
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
    return out, dict(seconds=statistics.median(times), all_seconds=times, peak_gib=peak.gib,
                     resident_gib=resident)


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) between two uint8 videos."""
    mse = (a.float().cpu() - b.float().cpu()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# -- DiT step --------------------------------------------------------------------------------

def bench_dit(args, device: torch.device) -> dict:
    dry = args.dry_run
    name = "wan-tiny" if dry else "Wan2.1-T2V-14B"
    cfg = load_model_config(name).dit
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames, height, width = (5, 32, 32) if dry else (args.frames, args.height, args.width)
    lat = (cfg.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    ref = diffusers_dit(cfg, device, dtype)
    # Ours shares the very weight tensors (no copy); only our float32-kept modules are cast.
    ours = load_strict(build_dit(cfg), rename_keys(ref.state_dict(), diffusers_to_wan_key),
                       "diffusers weights", device, dtype, keep_fp32=KEEP_FP32)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, *lat, device=device, generator=g, dtype=dtype)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, generator=g, dtype=dtype)
    t = torch.tensor([900.0], device=device)
    w, n = args.warmup, args.iters
    runs, outs = {}, {}
    with torch.inference_mode():
        outs["diffusers resident"], runs["diffusers resident"] = measure(
            lambda: ref(x, t, ctx, return_dict=False)[0], device, w, n)
        outs["ours level 0"], runs["ours level 0"] = measure(lambda: ours(x, t, ctx), device, w, n)
    ref.to("cpu")  # ours still holds the shared device tensors until the offloader packs them to host memory
    free_device()
    MemoryPolicy.resolve(MemoryPolicy(3, offload_without_cuda=dry), device, "denoiser")  # as the engine
    offloader = BlockOffloader([ours], device)
    free_device()
    with torch.inference_mode():
        outs["ours level 3"], runs["ours level 3"] = measure(lambda: ours(x, t, ctx), device, w, n)
        # a guidance step as the denoiser runs it by default (--cfg-batch on): both branches in one batch-2 forward;
        # its first half is compared with the batch-1 output, its time is two branches'
        both = (torch.cat([x, x]), t.expand(2), torch.cat([ctx, torch.zeros_like(ctx)]))
        outs["ours level 3 cfg batch 2"], runs["ours level 3 cfg batch 2"] = measure(
            lambda: ours(*both)[:1], device, w, n)
    runs["ours level 3"]["offload_stats"] = dict(vars(offloader.stats))
    runs["ours level 3"]["slot_gib"] = offloader.slot_bytes / 2**30
    offloader.close()
    ours = offloader = None  # frees them (the timing lambdas above refer to the names)
    free_device()
    if device.type == "cuda":
        ref.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                                 use_stream=True)
        with torch.inference_mode():
            outs["diffusers group offload"], runs["diffusers group offload"] = measure(
                lambda: ref(x, t, ctx, return_dict=False)[0], device, w, n)
    else:
        runs["diffusers group offload"] = dict(skipped="use_stream needs CUDA")
    ref = None
    free_device()
    base = {"diffusers": "diffusers resident", "ours": "ours level 0"}
    for key, row in runs.items():
        if key in outs:
            ref_key = base[key.split()[0]]
            row["time_ratio"] = row["seconds"] / runs[ref_key]["seconds"]
            row["rel_err_vs_resident"] = rel_err(outs[key], outs[ref_key])
            row["max_abs_diff_vs_resident"] = (outs[key].float() - outs[ref_key].float()).abs().max().item()
    runs["ours level 0"]["rel_err_vs_diffusers"] = rel_err(outs["ours level 0"], outs["diffusers resident"])
    return dict(model=name, shape=f"{width}x{height}x{frames}", latent=list(lat), dtype=str(dtype), runs=runs)


# -- VAE decode ------------------------------------------------------------------------------

def bench_vae(args, device: torch.device, dtype: torch.dtype) -> dict:
    dry = args.dry_run
    cfg = load_model_config("wan-tiny").vae if dry else VAEConfig()
    frames, height, width = (9, 64, 96) if dry else (args.vae_frames, args.vae_height, args.vae_width)
    ref, model = same_weight_vaes(cfg, "cpu", dtype)
    st, sh, sw = cfg.stride
    z_norm = torch.randn(1, cfg.z_dim, (frames - 1) // st + 1, height // sh, width // sw,
                         generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    z = (z_norm * std + mean).to(device, dtype)  # what VaeEngine un-normalises to
    w, n = args.vae_warmup, args.vae_iters
    runs, outs = {}, {}
    tiny_tiles = dict(tile_sample_min_height=32, tile_sample_min_width=32,
                      tile_sample_stride_height=24, tile_sample_stride_width=24) if dry else {}

    ref.to(device, dtype)
    with torch.inference_mode():
        out, runs["diffusers untiled"] = measure(lambda: ref.decode(z).sample, device, w, n)
        outs["diffusers untiled"] = to_uint8_frames(out).cpu()
        del out
        ref.enable_tiling(**tiny_tiles)
        out, runs["diffusers tiled"] = measure(lambda: ref.decode(z).sample, device, w, n)
        outs["diffusers tiled"] = to_uint8_frames(out).cpu()
        del out
    ref.to("cpu")
    ref = None
    free_device()

    model.to(device)
    tilings = {"ours level 1": None}
    tilings.update({f"ours level 1 {tiling.tile}:{tiling.overlap}:{tiling.frames_per_call}": tiling
                    for tiling in args.vae_alt_tiling})
    if dry:
        tilings = {"ours level 1": TilingConfig(tile=6, overlap=2), "ours level 1 4:1": TilingConfig(4, 1)}
    engines = {"ours level 0": VaeEngine(model, device, dtype, low_mem_level=0)}
    for key, tiling in tilings.items():  # level 1 keeps the encoder on the CPU: built after level 0 ran
        engines[key] = tiling
    for key, engine in engines.items():
        if not isinstance(engine, VaeEngine):
            engine = VaeEngine(model, device, dtype, low_mem_level=1, tiling=engine)
        out, runs[key] = measure(lambda: engine.decode(z_norm), device, w, n)
        outs[key] = out.cpu()
        del out
        free_device()
        if engine.tiling is not None:
            h, wd = z_norm.shape[3:]
            tile, overlap = engine.tiling.tile, engine.tiling.overlap
            rows, cols = tile_spans(h, tile, overlap), tile_spans(wd, tile, overlap)
            area = sum(b - a for a, b in rows) * sum(b - a for a, b in cols) / (h * wd)
            runs[key]["tiling"] = dict(vars(engine.tiling), tiles=[len(rows), len(cols)], area_ratio=area)
    del model, engines
    free_device()
    for key, row in runs.items():
        base = "diffusers untiled" if key.startswith("diffusers") else "ours level 0"
        row["time_ratio"] = row["seconds"] / runs[base]["seconds"]
        row["psnr_vs_untiled_db"] = psnr(outs[key], outs[base])
    runs["ours level 0"]["psnr_vs_diffusers_db"] = psnr(outs["ours level 0"], outs["diffusers untiled"])
    return dict(shape=f"{width}x{height}x{frames}", latent=list(z.shape[1:]), dtype=str(dtype), runs=runs)


# -- report ----------------------------------------------------------------------------------

def fmt(v, spec: str) -> str:
    return "n/a" if v is None else ("inf" if isinstance(v, float) and math.isinf(v) else format(v, spec))


def print_table(title: str, runs: dict, accuracy: str) -> None:
    print(f"\n{title}")
    print(f"{'run':<30}{'time (s)':>10}{'x base':>8}{'peak GiB':>10}{'resident':>10}  {accuracy}")
    for key, row in runs.items():
        if "skipped" in row:
            print(f"{key:<30}  skipped: {row['skipped']}")
            continue
        acc = row.get("rel_err_vs_resident", row.get("psnr_vs_untiled_db"))
        print(f"{key:<30}{row['seconds']:>10.3f}{row['time_ratio']:>8.3f}{fmt(row['peak_gib'], '.2f'):>10}"
              f"{fmt(row['resident_gib'], '.2f'):>10}  {fmt(acc, '.3g')}")


def check_targets(results: dict) -> list[str]:
    lines = []
    dit = results.get("dit", {}).get("runs", {}).get("ours level 3")
    if dit and dit.get("peak_gib") is not None:
        ok = dit["peak_gib"] < TARGETS["dit_peak_gib"] and dit["time_ratio"] <= TARGETS["dit_time_ratio"]
        lines.append(f"DiT level 3: {dit['peak_gib']:.2f} GiB (< {TARGETS['dit_peak_gib']}), "
                     f"{dit['time_ratio']:.3f}x resident (<= {TARGETS['dit_time_ratio']}): "
                     f"{'MET' if ok else 'MISSED'}")
    for vae in results.get("vae", []):
        row = vae["runs"].get("ours level 1")
        if row and row.get("peak_gib") is not None:
            ok = row["peak_gib"] < TARGETS["vae_peak_gib"] and row["time_ratio"] <= TARGETS["vae_time_ratio"]
            lines.append(f"VAE tiled {vae['dtype']}: {row['peak_gib']:.2f} GiB "
                         f"(< {TARGETS['vae_peak_gib']}), "
                         f"{row['time_ratio']:.3f}x untiled (<= {TARGETS['vae_time_ratio']}): "
                         f"{'MET' if ok else 'MISSED'}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["dit", "vae"], choices=["dit", "vae"])
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--vae-width", type=int, default=1280)
    p.add_argument("--vae-height", type=int, default=720)
    p.add_argument("--vae-frames", type=int, default=81)
    p.add_argument("--vae-dtypes", nargs="+", default=["bfloat16", "float32"],
                   choices=["bfloat16", "float32"],
                   help="the VAE is served in float32; diffusers' published tiling figures match bfloat16")
    p.add_argument("--vae-warmup", type=int, default=1)
    p.add_argument("--vae-iters", type=int, default=2)
    p.add_argument("--vae-alt-tiling", nargs="*", type=TilingConfig.flag, default=[TilingConfig(50, 8)],
                   metavar="TILE:OVERLAP[:FRAMES]",
                   help="more tilings for ours, in latent px, with video frames per decoder call past the "
                        "temporal upsamplers (default 50:8: diffusers' 64 px overlap)")
    p.add_argument("--dry-run", action="store_true", help="tiny models and shapes on the CPU")
    p.add_argument("--out", type=Path, default=Path("bench_results/low_mem.json"))
    args = p.parse_args()
    if args.dry_run:
        device, args.vae_dtypes = torch.device("cpu"), ["float32"]
        args.warmup = args.iters = args.vae_warmup = args.vae_iters = 1
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/low_mem.py needs a CUDA GPU (use --dry-run to check it on the CPU)")
        device = torch.device("cuda")
    import diffusers

    commit = git_commit()
    results: dict = dict(card=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                         date=time.strftime("%Y-%m-%d"), commit=commit, torch=torch.__version__,
                         diffusers=diffusers.__version__, command=" ".join(sys.argv), targets=TARGETS)
    print(f"card: {results['card']}  torch {torch.__version__}  diffusers {diffusers.__version__}  "
          f"commit {commit}")
    if "dit" in args.parts:
        results["dit"] = bench_dit(args, device)
        d = results["dit"]
        print_table(f"DiT step: {d['model']} {d['shape']} batch 1, {d['dtype']}", d["runs"],
                    "rel err vs resident")
    if "vae" in args.parts:
        results["vae"] = []
        for name in args.vae_dtypes:
            r = bench_vae(args, device, getattr(torch, name))
            results["vae"].append(r)
            print_table(f"VAE decode {r['shape']}, {r['dtype']}", r["runs"], "PSNR vs untiled (dB)")
    results["target_checks"] = check_targets(results)
    print()
    for line in results["target_checks"]:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
