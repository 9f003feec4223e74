"""One DiT forward, ours vs diffusers' WanTransformer3DModel, same random bf16 weights, in one run on one GPU.

Prints a table (time, achieved TFLOP/s, ratio to the floor, relative error) and writes JSON results. The
variants are timed round-robin (one forward of each in turn), so that the card's clock drift under its power
cap falls on all of them alike. Our model
runs the deployment's default self-attention (`flash_attn`: our exact kernel on Hopper); "ours compiled sdpa" is
the same compiled model with PyTorch's SDPA (cuDNN on Hopper), diffusers' attention.
Run: python bench/dit_forward.py --models 1.3B 14B --out bench_results/dit_forward.json
`--fp8` also times our compiled DiT with FP8 GEMMs in the blocks (`--gemm fp8`, lossy; needs compute capability
>= 8.9): its time, TFLOP/s (same FLOP count), ratio to diffusers eager, and relative error against our bf16
compiled output; "x floor" stays against the bf16 floor, and the card's FP8 GEMM TFLOP/s is measured too.
Needs a CUDA GPU and the `diffusers` package (the peer).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smartdiff.services.denoiser.weights import build_dit, diffusers_to_wan_key
from smartdiff.services.denoiser.attention import AttentionChoice, attach, default_backend
from smartdiff.services.denoiser.dit import KEEP_FP32
from smartdiff.services.denoiser.fp8 import check_gemm, quantize_blocks_fp8
from smartdiff.shared.checkpoint import load_strict, rename_keys
from smartdiff.shared.config import load_model_config

from common import cuda_time, diffusers_dit, git_commit, profile_forward, rel_err

MODELS = {"1.3B": "Wan2.1-T2V-1.3B", "14B": "Wan2.1-T2V-14B"}
TEXT_LEN = 512


def forward_flops(dim: int, ffn: int, layers: int, tokens: int, text: int = TEXT_LEN) -> tuple[float, float]:
    """(attention FLOPs, GEMM FLOPs) of one forward at batch 1."""
    attn = layers * (4 * tokens * tokens * dim + 4 * tokens * text * dim)
    gemm = layers * (2 * tokens * dim * dim * 4 + 2 * tokens * dim * dim * 2 + 2 * text * dim * dim * 2
                     + 2 * tokens * dim * ffn * 2)
    return attn, gemm


def card_ceilings() -> tuple[float, float]:
    """Measured bf16 GEMM (8192^3) and SDPA attention (12 x 32760 x 128) TFLOP/s on this card."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_s = statistics.median(cuda_time(lambda: a @ b, 3, 10))
    q = torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16)
    attn_s = statistics.median(cuda_time(lambda: F.scaled_dot_product_attention(q, q, q), 2, 5))
    return 2 * 8192**3 / gemm_s / 1e12, 4 * 32760**2 * 128 * 12 / attn_s / 1e12


def fp8_gemm_ceiling() -> float:
    """Measured FP8 GEMM (8192^3, row-wise scales, bf16 out: what --gemm fp8 runs) TFLOP/s on this card."""
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(8192, 1, device="cuda"), torch.ones(1, 8192, device="cuda")
    mm = lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    return 2 * 8192**3 / statistics.median(cuda_time(mm, 3, 10)) / 1e12


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module object on the very same parameter tensors (buffers copied): compiling it, attaching an
    attention backend to it or swapping its linears leaves the original as it was, at no weight memory."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def bench_model(label: str, width: int, height: int, frames: int, warmup: int, iters: int, ceilings,
                profile: bool = False, fp8: bool = False) -> dict:
    """Every variant is its own module object on the same weights, so all are timed round-robin: one forward
    of each in turn, `iters` rounds, each round starting one variant later. The card's clock under its power cap drifts as it heats; timing the
    variants one after the other would hand that drift to whichever runs last."""
    cfg = load_model_config(MODELS[label]).dit
    if fp8:
        check_gemm("fp8", "cuda", torch.bfloat16, cfg)  # this card can run it (before any work)
    # Each model as in its own process (a denoiser serves one): compiled code from the model before would make
    # dynamo recompile both compiled variants with dynamic shapes, which runs slower than their own static code.
    torch._dynamo.reset()
    ref = diffusers_dit(cfg, "cuda", torch.bfloat16)
    # Our model shares the very same weight tensors (no copy): only the float32-kept modules are cast.
    ours = load_strict(build_dit(cfg), rename_keys(ref.state_dict(), diffusers_to_wan_key), "diffusers weights",
                       "cuda", torch.bfloat16, keep_fp32=KEEP_FP32)
    ref_c, ours_c, ours_s = shared_copy(ref), shared_copy(ours), shared_copy(ours)
    ours_f = shared_copy(ours) if fp8 else None
    exact = default_backend("cuda", torch.bfloat16, cfg.head_dim)  # the deployment's default: flash_attn (ours)
    handles = {"ours": attach([ours], AttentionChoice(exact)), "sdpa": attach([ours_s], AttentionChoice("sdpa"))}
    for m in (ours_c, ours_f):
        if m is not None:
            attach([m], AttentionChoice(exact))
    ref_c.compile_repeated_blocks(fullgraph=True)  # diffusers' own recipe: regional compile of the repeated blocks
    for m in (ours_c, ours_s, ours_f):
        if m is not None:
            m.set_compiled(True)
    if fp8:
        quantize_blocks_fp8(ours_f)  # the blocks' linears of this copy become FP8 (stays compiled, as served)
    lat = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, *lat, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, TEXT_LEN, cfg.text_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.tensor([900.0], device="cuda")
    tokens = lat[1] * (lat[2] // 2) * (lat[3] // 2)
    attn_f, gemm_f = forward_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, tokens)
    gemm_peak, attn_peak = ceilings
    floor = attn_f / (attn_peak * 1e12) + gemm_f / (gemm_peak * 1e12)
    variants = {"diffusers eager": lambda: ref(x, t, ctx, return_dict=False),
                "ours eager": lambda: ours(x, t, ctx),
                "diffusers compiled": lambda: ref_c(x, t, ctx, return_dict=False),
                "ours compiled": lambda: ours_c(x, t, ctx),
                "ours compiled sdpa": lambda: ours_s(x, t, ctx)}  # the same compiled model on cuDNN SDPA
    if fp8:
        variants["ours compiled fp8"] = lambda: ours_f(x, t, ctx)
    rows = {}
    with torch.inference_mode():
        out = {name: fn() for name, fn in variants.items()}  # also the first (compiling) call of each
        out = {name: o[0] if isinstance(o, tuple) else o for name, o in out.items()}
        rel = rel_err(out["ours eager"], out["diffusers eager"])
        rows["attention"] = handles["ours"].report().kernel
        rows["attention sdpa"] = handles["sdpa"].report().kernel
        rows["compiled_rel_err_vs_eager"] = rel_err(out["ours compiled"], out["ours eager"])
        rows["compiled_sdpa_rel_err_vs_compiled"] = rel_err(out["ours compiled sdpa"], out["ours compiled"])
        for fn in variants.values():
            cuda_time(fn, warmup, 0)
        times = {name: [] for name in variants}
        names = list(variants)
        for i in range(iters):  # each round starts one variant later: none always follows the same one
            for name in names[i % len(names):] + names[:i % len(names)]:
                times[name] += cuda_time(variants[name], 0, 1)
        for name, ts in times.items():
            med = statistics.median(ts)
            rows[name] = dict(seconds=med, tflops=(attn_f + gemm_f) / med / 1e12, floor_ratio=med / floor,
                              all_seconds=ts)
        if fp8:
            rows["ours compiled fp8"].update(
                vs_diffusers_eager=rows["diffusers eager"]["seconds"] / rows["ours compiled fp8"]["seconds"],
                rel_err_vs_ours_bf16=rel_err(out["ours compiled fp8"], out["ours compiled"]),
                rel_err_vs_diffusers=rel_err(out["ours compiled fp8"], out["diffusers eager"]))
        if profile:
            for name in [n for n in variants if "compiled" in n]:
                rows[name]["profile"] = profile_forward(variants[name], f"{MODELS[label]} {name}")
    for handle in handles.values():
        handle.detach()
    ref = ref_c = ours = ours_c = ours_s = ours_f = variants = out = handles = None  # frees the weights
    torch.cuda.empty_cache()
    return dict(model=MODELS[label], shape=f"{width}x{height}x{frames}", tokens=tokens, floor_s=floor,
                attention_tflop=attn_f / 1e12, gemm_tflop=gemm_f / 1e12, rel_err_ours_vs_diffusers=rel, runs=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["1.3B", "14B"], choices=list(MODELS))
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also profile one compiled forward of each, by op class")
    p.add_argument("--fp8", action="store_true",
                   help="also time our compiled DiT with FP8 GEMMs (--gemm fp8, lossy), error vs our bf16")
    p.add_argument("--out", type=Path, default=Path("bench_results/dit_forward.json"))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    ceilings = card_ceilings()
    results = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                   commit=git_commit(), gemm_tflops=ceilings[0], sdpa_attention_tflops=ceilings[1], models=[])
    if args.fp8:
        check_gemm("fp8", "cuda", torch.bfloat16, load_model_config(MODELS[args.models[0]]).dit)
        results["fp8_gemm_tflops"] = fp8_gemm_ceiling()
    print(f"card: {results['card']}  torch {torch.__version__}  bf16 GEMM {ceilings[0]:.0f} TFLOP/s, "
          f"SDPA attention {ceilings[1]:.0f} TFLOP/s"
          + (f", FP8 GEMM {results['fp8_gemm_tflops']:.0f} TFLOP/s" if args.fp8 else ""))
    print(f"{'model':<18}{'impl':<20}{'time (s)':>10}{'TFLOP/s':>10}{'x floor':>9}{'rel err':>10}")
    for label in args.models:
        r = bench_model(label, args.width, args.height, args.frames, args.warmup, args.iters, ceilings,
                        args.profile, args.fp8)
        results["models"].append(r)
        for impl, row in r["runs"].items():
            if not isinstance(row, dict):
                continue
            print(f"{r['model']:<18}{impl:<20}{row['seconds']:>10.3f}{row['tflops']:>10.0f}{row['floor_ratio']:>9.2f}"
                  f"{row.get('rel_err_vs_diffusers', r['rel_err_ours_vs_diffusers']):>10.1e}")
        print(f"{'':<18}{'floor':<20}{r['floor_s']:>10.3f}   attention: {r['runs']['attention']}, "
              f"'sdpa' rows: {r['runs'].get('attention sdpa')}")
        fp8_row = r["runs"].get("ours compiled fp8")
        if fp8_row:
            print(f"{'':<18}fp8: {fp8_row['vs_diffusers_eager']:.2f}x diffusers eager, "
                  f"{r['runs']['ours compiled']['seconds'] / fp8_row['seconds']:.2f}x ours compiled bf16, "
                  f"rel err vs ours compiled bf16 {fp8_row['rel_err_vs_ours_bf16']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
