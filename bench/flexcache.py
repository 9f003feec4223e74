"""FlexCache strategies vs the uncached run: wall time of the whole denoising loop and deviation of the final latents.

Default: Wan2.1-T2V-1.3B shapes with random bf16 weights, 832x480 x 81 frames, 50 steps, CFG 5 (batched), the
model's sampler; the uncached baseline runs first, in the same process. Prints a table and writes JSON.
Run:  python bench/flexcache.py --out bench_results/flexcache.json
CPU smoke test:  python bench/flexcache.py --model wan-tiny --width 64 --height 64 --frames 5 --steps 10 --device cpu

--config takes `none`, `STRATEGY` (its defaults) or `STRATEGY:key=value,...` (fields of the strategy's params;
coefficients as c4/c3/c2/c1/c0), repeatable. `--calibrate N` first fits TeaCache polynomials and MagCache ratios
and measures the budget strategy's reuse errors for this very model from N uncached runs (other seeds and
prompts), and the three strategies then use them; `--match`
adds, for every magcache and budget config, a TeaCache config whose threshold computes the same number of block stacks
(found with `DenoiserEngine.plan_cache`, which predicts a strategy's decisions without running the blocks): the two
compared at an equal budget. Random weights: speed is representative for a given number of
computed forwards, accuracy is not; TeaCache's decisions on random weights do not follow the real model's (see
docs/benchmarks.md), hence the identity-polynomial TeaCache entry that skips like the published setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
from smartdiff.services.denoiser.cache import CacheConfig, CacheStats, FlexCache, TeaCacheParams, cache_config_to_proto
from smartdiff.services.denoiser.cache.calibrate import calibrate
from smartdiff.services.denoiser.cache.config import PARAMS
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.shared.config import load_model_config
from smartdiff.shared.request import GenerationRequest, resolve_request

from common import git_commit

DEFAULT_CONFIGS = (
    "none",
    "teacache",  # published 1.3B polynomial and threshold 0.08 (timestep-embedding mode)
    "teacache:coefficients=1/0,rel_l1_threshold=1.0",  # skips every other step on these weights, as 0.08 does on real ones
    "pab",
    "magcache",
)
REPORTED = {"teacache": "2.48x (ChituDiffusion, threshold 0.1)", "pab": "1.60x (ChituDiffusion)"}


def parse_config(spec: str) -> CacheConfig:
    name, _, rest = spec.partition(":")
    if name == "none":
        return CacheConfig()
    cls = PARAMS[name]
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"{name} has no parameter {key!r}; it has {', '.join(kinds)}")
        if key == "coefficients":
            values[key] = tuple(float(v) for v in raw.split("/"))
        elif key == "use_ret_steps":
            values[key] = raw.lower() in ("1", "true", "yes")
        elif "int" in str(kinds[key]):
            values[key] = int(raw)
        else:
            values[key] = float(raw)
    return CacheConfig(name, cls(**values) if values else None)


def computed_stacks(engine, req, cache: CacheConfig) -> int:
    return engine.plan_cache(req, cache).computed["block_stack"]


def matched_teacache(engine, req, target: int) -> tuple[str, int]:
    """The TeaCache config (the deployment's polynomial) computing `target` block stacks, or the closest count
    above it (never a smaller budget than the strategy it is compared with). Counts fall as the threshold rises;
    the threshold is the middle of the range giving that count, away from the edges where rounding could tip it."""
    def count(threshold: float) -> int:
        return computed_stacks(engine, req, CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=threshold)))

    def edge(lo: float, hi: float, above: Callable[[int], bool]) -> tuple[float, float]:
        for _ in range(50):  # above(count(lo)) and not above(count(hi))
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if above(count(mid)) else (lo, mid)
        return lo, hi

    hi = 1e-3
    while count(hi) > target and hi < 1e6:
        hi *= 2
    lo, hi = edge(0.0, hi, lambda n: n > target)  # count(lo) > target >= count(hi), lo and hi adjacent
    if count(hi) == target:  # the range giving the target: from hi up to where the count drops again
        start, top = hi, hi * 2 + 1e-3
        while count(top) == target and top < 1e6:
            top *= 2
        end, _ = edge(start, top, lambda n: n == target)
    else:  # no threshold gives it: the range just below, whose count is the closest above the target
        got, end = count(lo), lo
        start = 0.0 if count(0.0) == got else edge(0.0, lo, lambda n: n > got)[1]
    threshold = (start + end) / 2
    return f"teacache:rel_l1_threshold={threshold:.6g}", count(float(f"{threshold:.6g}"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_one(engine, req, ctx, neg, cache: CacheConfig, device) -> tuple[torch.Tensor, float, CacheStats, dict]:
    stats = CacheStats()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = memory(device)
    sync(device)
    start = time.perf_counter()
    out = engine.denoise(req, ctx, neg, cache=cache, cache_stats=stats)
    sync(device)
    seconds = time.perf_counter() - start
    mem = {"peak_bytes_above_start": 0, "left_after_request_bytes": 0}  # CUDA only
    if device.type == "cuda":  # what the request held at its peak, and what it left behind besides its output
        mem = {"peak_bytes_above_start": torch.cuda.max_memory_allocated(device) - before,
               "left_after_request_bytes": memory(device) - before - out.numel() * out.element_size()}
    return out, seconds, stats, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Wan2.1-T2V-1.3B")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--config", action="append", help=f"cache configs to time (default: {' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--compile", choices=["on", "off"], default=None,
                    help="the DiT's compiled elementwise regions (default: on for CUDA, as the denoiser)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="fit TeaCache / MagCache numbers and measure the budget strategy's reuse errors for this "
                         "model from N uncached runs before timing")
    ap.add_argument("--match", action="store_true",
                    help="add a TeaCache config at the budget of every magcache / budget config (equal computed stacks)")
    ap.add_argument("--out", type=Path, default=Path("bench_results/flexcache.json"))
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model_config(args.model).replace(random_weights=True)
    engine = DenoiserEngine.load(model, None, device, dtype, enable_flexcache=True)
    compiled = (args.compile or ("on" if device.type == "cuda" else "off")) == "on"
    for dit in engine.experts:
        dit.set_compiled(compiled)
    req = resolve_request(GenerationRequest(prompt="p", width=args.width, height=args.height, frames=args.frames,
                                            steps=args.steps, guidance=(args.guidance,), seed=args.seed), model)
    g = torch.Generator().manual_seed(0)
    ctx = 0.1 * torch.randn(120, model.dit.text_dim, generator=g)  # a 120-token prompt, a 60-token negative
    neg = 0.1 * torch.randn(60, model.dit.text_dim, generator=g)
    specs = ["none"] + [c for c in (args.config or DEFAULT_CONFIGS) if c != "none"]

    warm = resolve_request(GenerationRequest(prompt="p", width=args.width, height=args.height, frames=args.frames,
                                             steps=2, guidance=(args.guidance,), seed=args.seed), model)
    engine.denoise(warm, ctx, neg)  # kernels, allocator, compilation

    calibration = None
    if args.calibrate:
        runs = []
        for k in range(args.calibrate):  # other seeds and prompts than the timed run
            gk = torch.Generator().manual_seed(100 + k)
            runs.append((resolve_request(GenerationRequest(prompt="c", width=args.width, height=args.height,
                                                           frames=args.frames, steps=args.steps,
                                                           guidance=(args.guidance,), seed=1000 + k), model),
                         0.1 * torch.randn(100, model.dit.text_dim, generator=gk),
                         0.1 * torch.randn(50, model.dit.text_dim, generator=gk)))
        start = time.perf_counter()
        calibration = calibrate(engine, runs)
        engine.flexcache = FlexCache(model, True, calibration)
        print(f"calibrated from {args.calibrate} run(s) in {time.perf_counter() - start:.1f} s", flush=True)
    if args.match:
        for spec in [s for s in specs if s.split(":")[0] in ("magcache", "budget")]:
            target = computed_stacks(engine, req, parse_config(spec))
            tea, got = matched_teacache(engine, req, target)
            print(f"budget of {spec}: {target} block stacks; {tea} computes {got}", flush=True)
            if tea not in specs:  # another config of the same budget may have added it already
                specs.insert(specs.index(spec) + 1, tea)

    rows, baseline = [], None
    for spec in specs:
        cache = parse_config(spec)
        out, seconds, stats, mem = run_one(engine, req, ctx, neg, cache, device)
        if baseline is None:
            baseline, base_s = out, seconds
        diff = (out - baseline).float()
        row = {
            "config": spec,
            "strategy": cache.strategy,
            "applied": _applied(stats),
            "seconds": seconds,
            "speedup": base_s / seconds,
            "rel_l2_error": (diff.norm() / baseline.float().norm()).item(),
            "max_abs_error": diff.abs().max().item(),
            "computed": dict(stats.computed),
            "reused": dict(stats.reused),
            **mem,
        }
        rows.append(row)
        print(f"{spec:<50} {seconds:8.2f} s  {row['speedup']:5.2f}x  rel err {row['rel_l2_error']:.3e}", flush=True)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
        "model": model.name, "weights": "random", "dtype": str(dtype).removeprefix("torch."),
        "shape": {"width": args.width, "height": args.height, "frames": args.frames, "steps": args.steps,
                  "guidance": args.guidance, "sampler": req.sampler, "shift": req.shift, "batch_cfg": engine.batch_cfg},
        "compiled": compiled,
        "calibration": None if calibration is None else {
            "runs": args.calibrate, "teacache": calibration.teacache, "magcache": calibration.magcache,
            "reuse_error": calibration.reuse_error, "timesteps": calibration.timesteps},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(rows)
    print(f"wrote {args.out}")


def _applied(stats: CacheStats) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(cache_config_to_proto(stats.applied)) if stats.applied else {}


def print_table(rows: list[dict]) -> None:
    print("\n| config | time | speedup | rel. L2 error | block stacks computed / reused | self-attn reused | "
          "cross-attn reused | reported elsewhere |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, u = r["computed"], r["reused"]
        stacks = "all / 0" if r["strategy"] == "none" else f"{c.get('block_stack', 0)} / {u.get('block_stack', 0)}"
        print(f"| {r['config']} | {r['seconds']:.2f} s | {r['speedup']:.2f}x | {r['rel_l2_error']:.2e} | "
              f"{stacks} | {u.get('self_attention', 0)} | "
              f"{u.get('cross_attention', 0)} | {REPORTED.get(r['config'], '')} |")


if __name__ == "__main__":
    main()
