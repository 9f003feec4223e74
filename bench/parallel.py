"""Multi-GPU denoiser step time: our cfg / Ulysses / ring layouts vs diffusers' context parallel, one launch.

Launch with torchrun on N GPUs; every layout that fits in N GPUs runs (on the first GPUs), plus diffusers'
WanTransformer3DModel with enable_parallelism(ContextParallelConfig(ulysses_degree=D)) for the degrees asked
(D must equal the launch's world size, or 1), eager as it ships and, with --peer-compile, with its blocks
compiled by diffusers' own recipe (compile_repeated_blocks; the compilation in its warm-up step). The same
random bf16 weights on every rank and for both implementations (the peer gets ours, key by key); a "step" is
one denoising step with CFG (both branches; the peer runs two forwards, as WanPipeline does). Prints a table,
writes JSON (rank 0).

  torchrun --nproc-per-node 4 bench/parallel.py --layouts 1 cfg2xu2 u4 u2xr2 --peer 1 4 --out r4.json
  torchrun --nproc-per-node 4 bench/parallel.py --layouts 1 cfg2xu2 --peer 1 4 --peer-compile
  torchrun --nproc-per-node 2 bench/parallel.py --layouts cfg2 u2 r2 --peer 2 --out r2.json
  torchrun --nproc-per-node 2 bench/parallel.py --model 1.3B --width 832 --height 480 --layouts 1 u2 r2 \
      --attention flash_attn sdpa   (each layout once per backend; errors against 1 GPU with the same backend)
  torchrun --nproc-per-node 2 bench/parallel.py --width 832 --height 480 --layouts cfg2 u2 --attention flash_attn \
      --stop-checks 3   (each full-width layout also with cancellation checks per step and per block, 3 rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from smartdiff.services.denoiser.distributed import LockstepStop
from smartdiff.services.denoiser.dit import KEEP_FP32
from smartdiff.services.denoiser.attention import AttentionChoice
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.parallel import ParallelConfig, ParallelState
from smartdiff.services.denoiser.weights import build_dit, diffusers_to_wan_key
from smartdiff.shared.checkpoint import load_strict
from smartdiff.shared.config import load_model_config
from smartdiff.shared.request import GenerationRequest, resolve_request

from common import git_commit, profile_forward

MODELS = {"1.3B": "Wan2.1-T2V-1.3B", "14B": "Wan2.1-T2V-14B"}


def parse_layout(text: str) -> ParallelConfig:
    """'1', 'cfg2', 'u4', 'r2', 'cfg2xu2', 'u2xr2' ..."""
    degrees = {"cfg": 1, "u": 1, "r": 1}
    if text != "1":
        for part in text.split("x"):
            m = re.fullmatch(r"(cfg|u|r)(\d+)", part)
            if not m:
                raise SystemExit(f"bad layout {text!r}")
            degrees[m.group(1)] = int(m.group(2))
    return ParallelConfig(degrees["cfg"], degrees["u"], degrees["r"])


def random_state(model, device, seed: int) -> dict[str, torch.Tensor]:
    """Random weights drawn on the GPU with a seeded generator: identical on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, t in build_dit(model.dit).state_dict().items():
        if name.endswith("weight") and t.dim() == 1:
            w = torch.ones(t.shape, device=device)
        else:
            w = torch.randn(t.shape, generator=g, device=device) * (0.02 if t.dim() > 1 else 0.01)
        sd[name] = w if any(k in name for k in KEEP_FP32) else w.to(torch.bfloat16)  # bf16: shared, not copied
    return sd


def timed(fn, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_ours(model, sd, layout, rank, device, req_kw, steps, ctx, neg, compile_dit, attention, profile=False,
             stop_checks=False):
    """(seconds per step, latents, kernel that ran, {"steps" / "blocks": seconds per step with a LockstepStop
    before each step / also between blocks} when stop_checks, for layouts over every rank)."""
    state = ParallelState(layout, rank, ranks=list(range(layout.world_size)))
    out = None
    if state.member:
        dit = load_strict(build_dit(model.dit), sd, "random", device, torch.bfloat16, KEEP_FP32)
        dit.set_compiled(compile_dit)  # the denoiser's default on CUDA (--compile auto); compiled in the warm-up
        engine = DenoiserEngine(model, [dit], device, torch.bfloat16, parallel=state)
        warm = resolve_request(GenerationRequest(prompt="x", **{**req_kw, "steps": 1}), model)
        choice = AttentionChoice(attention)
        engine.denoise(warm, ctx, neg, attention=choice)
        req = resolve_request(GenerationRequest(prompt="x", **{**req_kw, "steps": steps}), model)
        latents, ran = [], []
        seconds = timed(lambda: latents.append(engine.denoise(req, ctx, neg, attention=choice,
                                                              on_attention=ran.append)), steps)
        checked = {}
        if stop_checks and layout.world_size == dist.get_world_size():  # the broadcasts span every rank
            # rounds of none / per step / per block, interleaved (the card's clock drifts over a run): medians
            times = {"none": [seconds], "steps": [], "blocks": []}
            for r in range(stop_checks):
                for where in ("steps", "blocks", "none")[: 3 if r < stop_checks - 1 else 2]:
                    stop = LockstepStop(device, (lambda: False) if rank == 0 else None)  # never fires, as a run
                    times[where].append(timed(lambda: engine.denoise(
                        req, ctx, neg, attention=choice, cancelled=stop if where != "none" else None,
                        interrupt=stop if where == "blocks" else None), steps))
            seconds = statistics.median(times["none"])
            checked = {where: statistics.median(times[where]) for where in ("steps", "blocks")}
        out = (seconds, latents[0].float().cpu(), ran[0].kernel if ran else attention, checked)
        if profile and layout.world_size > 1:  # one more step (twice: warm, then profiled on rank 0)
            step = lambda: engine.denoise(warm, ctx, neg, attention=choice)  # noqa: E731
            if state.rank == 0:
                profile_forward(step, f"ours {layout} (rank 0, one CFG step)")
            else:
                step(), step()
        del engine, dit
        torch.cuda.empty_cache()
    dist.barrier()
    return out


def load_our_weights(ref, model, device) -> None:
    """Copy the weights ours ran with (random_state, drawn again: same seed, same order) into diffusers' model,
    key by key; every tensor of each side is used exactly once."""
    sd = random_state(model, device, seed=0)
    theirs = ref.state_dict()
    mapped = {diffusers_to_wan_key(k): k for k in theirs}
    if sorted(mapped) != sorted(sd) or len(mapped) != len(theirs):
        raise SystemExit(f"weights do not map one to one: only ours {sorted(set(sd) - set(mapped))[:5]}, "
                         f"only diffusers' {sorted(set(mapped) - set(sd))[:5]}")
    with torch.no_grad():
        for ours, key in mapped.items():
            theirs[key].copy_(sd.pop(ours))


def run_diffusers(model, degree, rank, world, device, req_kw, steps, ctx, neg, compiled=False):
    """One CFG step = two forwards of diffusers' model; ulysses CP over all ranks when degree > 1; `compiled`:
    its repeated blocks compiled (diffusers' recipe), the compilation in the warm-up step."""
    import diffusers

    cfg = model.dit
    if degree > 1 and degree != world:
        raise SystemExit(f"diffusers' degree {degree} must equal the world size {world}")
    active = degree > 1 or rank == 0
    result = None
    if active:
        torch.manual_seed(0)
        with torch.device(device):
            ref = diffusers.WanTransformer3DModel(
                patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=16, out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps,
            ).to(torch.bfloat16).eval().requires_grad_(False)
        for name, param in ref.named_parameters():  # its float32 modules, as from_pretrained(torch_dtype=) keeps them
            if any(k in name.split(".") for k in ref._keep_in_fp32_modules):
                param.data = param.data.float()
        load_our_weights(ref, model, device)
        backend = "_native_cudnn"
        try:
            ref.set_attention_backend(backend)
            if degree > 1:
                ref.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=degree))
        except Exception as e:  # noqa: BLE001 - report which backend the peer could use
            backend = f"native ({type(e).__name__}: {str(e)[:80]})"
            ref.set_attention_backend("native")
            if degree > 1:
                ref.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=degree))
        if compiled:
            torch._dynamo.reset()
            ref.compile_repeated_blocks(fullgraph=True)
            backend += ", compiled"
        lat = (1, 16, (req_kw["frames"] - 1) // 4 + 1, req_kw["height"] // 8, req_kw["width"] // 8)
        x = torch.randn(lat, device=device, dtype=torch.bfloat16, generator=torch.Generator(device).manual_seed(1))
        t = torch.tensor([900.0], device=device)
        c = torch.nn.functional.pad(ctx, (0, 0, 0, 512 - ctx.shape[0]))[None].to(device, torch.bfloat16)
        n = torch.nn.functional.pad(neg, (0, 0, 0, 512 - neg.shape[0]))[None].to(device, torch.bfloat16)

        def step():
            with torch.inference_mode():
                ref(x, t, c, return_dict=False)
                ref(x, t, n, return_dict=False)

        try:
            step()  # warm-up (and the compilation)
            result = (timed(lambda: [step() for _ in range(steps)], steps), backend)
        except Exception as e:  # noqa: BLE001 - a peer configuration that does not run is a row, not a crash
            result = (float("nan"), f"{backend}: failed, {type(e).__name__}: {str(e)[:120]}")
        del ref
        torch.cuda.empty_cache()
    dist.barrier()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="14B", choices=list(MODELS))
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=2, help="timed steps per layout (after one warm-up step)")
    p.add_argument("--layouts", nargs="+", default=["1", "cfg2", "u2", "r2", "cfg2xu2", "u4", "u2xr2"])
    p.add_argument("--peer", nargs="*", type=int, default=[], help="diffusers ulysses degrees to time (1 or world)")
    p.add_argument("--peer-compile", action="store_true",
                   help="also time each peer degree with its blocks compiled (diffusers' compile_repeated_blocks)")
    p.add_argument("--attention", nargs="+", default=["sdpa"], metavar="BACKEND",
                   help="self-attention backends to run every layout with (flash_attn: the CUDA default)")
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="our DiT's compiled elementwise regions (the denoiser's default on CUDA)")
    p.add_argument("--profile", action="store_true", help="profile one step of each multi-GPU layout (rank 0)")
    p.add_argument("--stop-checks", type=int, default=0, metavar="ROUNDS",
                   help="also time each layout over every rank with a LockstepStop before each step, and also "
                        "between DiT blocks (what the service does): ROUNDS interleaved rounds of the three, medians")
    p.add_argument("--out", type=Path, default=Path("bench_results/parallel.json"))
    args = p.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("nccl", device_id=device)
    model = load_model_config(MODELS[args.model])
    g = torch.Generator().manual_seed(0)
    ctx, neg = torch.randn(120, 4096, generator=g).to(device), torch.randn(40, 4096, generator=g).to(device)
    req_kw = dict(width=args.width, height=args.height, frames=args.frames, guidance=(5.0,), seed=3)
    sd = random_state(model, device, seed=0)
    rows, reference, base = [], {}, None
    for attention in args.attention:
        for text in args.layouts:
            layout = parse_layout(text)
            if layout.world_size > world:
                continue
            layout.validate(layout.world_size, model.dit.num_heads)
            res = run_ours(model, sd, layout, rank, device, req_kw, args.steps, ctx, neg, args.compile == "on",
                           attention, args.profile, args.stop_checks)
            if rank == 0:
                seconds, latents, ran, checked = res
                if layout.world_size == 1:
                    reference[attention] = latents
                    base = base or seconds
                ref = reference.get(attention)
                err = ((latents - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
                rows.append(dict(impl="ours", layout=f"{layout} {ran}", gpus=layout.world_size,
                                 seconds_per_step=seconds, attention=ran, rel_err_vs_1gpu=err))
                print(f"ours {str(layout):<28} {ran:<18} {layout.world_size} GPU  {seconds:8.3f} s/step  "
                      f"rel err vs 1 GPU {err:.1e}", flush=True)
                for where, t in checked.items():
                    rows[-1][f"seconds_per_step_stop_checks_{where}"] = t
                    print(f"ours {str(layout):<28} {ran:<18} {layout.world_size} GPU  {t:8.3f} s/step  "
                          f"stop checks per {where[:-1]}{' (the service)' if where == 'blocks' else ''}", flush=True)
    del sd
    torch.cuda.empty_cache()
    for degree, compiled in [(d, c) for d in args.peer for c in (False, True)[: 1 + args.peer_compile]]:
        res = run_diffusers(model, degree, rank, world, device, req_kw, args.steps, ctx, neg, compiled)
        if rank == 0:
            rows.append(dict(impl="diffusers", layout=f"ulysses{degree} ({res[1]})", gpus=degree,
                             seconds_per_step=res[0]))
            print(f"diffusers ulysses{degree:<19} {degree} GPU  {res[0]:8.3f} s/step  attention {res[1]}", flush=True)
    if rank == 0:
        print(f"\n{MODELS[args.model]} {args.width}x{args.height}x{args.frames}, one CFG step (2 forwards), "
              f"{torch.cuda.get_device_name()}, world {world}, our DiT compiled: {args.compile}")
        print(f"{'impl':<10}{'layout':<44}{'GPUs':>5}{'s/step':>10}{'vs our 1 GPU':>14}")
        for r in rows:
            speed = f"{base / r['seconds_per_step']:.2f}x" if base else "-"
            print(f"{r['impl']:<10}{r['layout']:<44}{r['gpus']:>5}{r['seconds_per_step']:>10.3f}{speed:>14}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                                            world=world, model=MODELS[args.model], compile=args.compile,
                                            commit=git_commit(), peer_compile=args.peer_compile,
                                            attention=args.attention,
                                            shape=[args.width, args.height, args.frames], rows=rows), indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
