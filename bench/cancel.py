"""How soon a cancel stops a one-GPU denoiser, beside diffusers' WanPipeline, in one run.

A request is stopped at a random moment of its second step; the latency is the time from the stop to the call
having returned with the GPU idle. Three ways, random bf16 weights, Wan2.1 at 832x480 x 81 frames, CFG 5:
- ours between blocks: the denoiser service's in-process path (DenoiserEngine with `interrupt`: a check between
  DiT blocks, the CPU kept at most BlockInterrupt.LOOKAHEAD blocks ahead of the GPU);
- ours between steps: the same engine with the per-step check alone (the service's path before 8de7283);
- diffusers: WanPipeline (latents out, prompt embeddings given), stopped through its `interrupt` property, which
  the pipeline reads at each step.
Also the step time of each (3 steps, no stop), to show what the per-block check costs: nothing, it should.

  python bench/cancel.py --models 1.3B 14B --out bench_results/cancel.json
  python bench/cancel.py --dry-run      (wan-tiny on the CPU at tiny shapes: the code paths only)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import threading
import time
from pathlib import Path

import torch

from smartdiff.services.denoiser.attention import AttentionChoice
from smartdiff.services.denoiser.engine import BlockInterrupt, DenoiserEngine
from smartdiff.services.denoiser.weights import random_dit
from smartdiff.shared.config import load_model_config
from smartdiff.shared.errors import Cancelled
from smartdiff.shared.request import GenerationRequest, resolve_request

from common import diffusers_dit, git_commit

MODELS = {"1.3B": "Wan2.1-T2V-1.3B", "14B": "Wan2.1-T2V-14B"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stoppable:
    """Runs `call(stop_flag)` in a thread; `stop()` sets the flag; `wait()` -> seconds from stop to the call's end
    with the device synchronised (None if it ended before the stop)."""

    def __init__(self, call, device: torch.device):
        self.flag = threading.Event()
        self.stopped_at = self.ended_at = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                call(self.flag)
            except Cancelled:
                pass
            except BaseException as e:  # noqa: BLE001 - reported by wait()
                self.error = e
            sync(device)
            self.ended_at = time.perf_counter()

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def stop(self) -> None:
        self.stopped_at = time.perf_counter()
        self.flag.set()

    def wait(self) -> float | None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return None if self.ended_at < self.stopped_at else self.ended_at - self.stopped_at


def trial(call, device: torch.device, step_seconds: float, rng: random.Random) -> float:
    """Stop at a uniformly random moment of the second step (step times measured beforehand)."""
    job = Stoppable(call, device)
    time.sleep(step_seconds * (1.0 + rng.random()))
    job.stop()
    latency = job.wait()
    if latency is None:
        raise RuntimeError("the request ended before the stop: give it more steps")
    return latency


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def ours(model_name: str, req, device, dtype, compile: bool):
    model = load_model_config(model_name)
    engine = DenoiserEngine(model, [random_dit(model.dit, device, dtype, 0)], device, dtype)
    if compile:
        for dit in engine.experts:
            dit.set_compiled(True)
    attention = AttentionChoice("flash_attn" if device.type == "cuda" else "sdpa")  # the service's CUDA default
    dim = engine.model.dit.text_dim
    gen = torch.Generator().manual_seed(0)
    ctx, neg = torch.randn(77, dim, generator=gen, dtype=dtype), torch.randn(20, dim, generator=gen, dtype=dtype)

    def between_blocks(flag):
        return engine.denoise(req, ctx, neg, attention=attention, cancelled=flag.is_set, interrupt=flag.is_set)

    def between_steps(flag):
        return engine.denoise(req, ctx, neg, attention=attention, cancelled=flag.is_set)

    return engine, between_blocks, between_steps


def diffusers_pipeline(model_name: str, req, device, dtype):
    import diffusers

    cfg = load_model_config(model_name).dit
    dit = diffusers_dit(cfg, device, dtype)
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              num_train_timesteps=1000, flow_shift=req.shift)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched, transformer=dit)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 512, cfg.text_dim, generator=gen).to(device, dtype)
    neg = torch.randn(1, 512, cfg.text_dim, generator=gen).to(device, dtype)

    def run(flag):  # the stop reaches the pipeline as its `interrupt`, from a watching thread
        watcher_done = threading.Event()

        def watch() -> None:
            while not watcher_done.is_set():
                if flag.wait(0.001):
                    pipe._interrupt = True
                    return

        w = threading.Thread(target=watch)
        w.start()
        try:
            pipe(prompt_embeds=ctx, negative_prompt_embeds=neg, height=req.height, width=req.width,
                 num_frames=req.frames, num_inference_steps=req.steps, guidance_scale=req.guidance[0],
                 output_type="latent")
        finally:
            watcher_done.set()
            w.join()

    return run


def measure(label: str, way: str, call, steps: int, device: torch.device, trials: int, rng: random.Random) -> dict:
    never = threading.Event()
    call(never)  # warm-up: compilation, autotuning, the allocator
    step = timed(lambda: call(never), device) / steps
    latencies = [trial(call, device, step, rng) for _ in range(trials)]
    row = dict(model=label, way=way, step_seconds=step, latencies=latencies,
               median_latency=statistics.median(latencies), max_latency=max(latencies),
               median_in_steps=statistics.median(latencies) / step)
    print(f"{label:5s} {way:24s} step {step:7.3f} s  stop latency median {row['median_latency']:7.3f} s "
          f"(max {row['max_latency']:.3f}; {row['median_in_steps']:.2f} steps)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["1.3B"])
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--trials", type=int, default=4, help="stops per way")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="wan-tiny on the CPU at tiny shapes")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    width, height = (32, 32) if args.dry_run else map(int, args.size.split("x"))
    frames = 5 if args.dry_run else args.frames
    models = {"tiny": "wan-tiny"} if args.dry_run else {m: MODELS[m] for m in args.models}
    rng = random.Random(0)
    rows = []
    for label, name in models.items():
        model = load_model_config(name)
        steps = 40 if args.dry_run else 4  # the stop comes in step 2; every way must still be running then
        req = resolve_request(GenerationRequest(prompt="x", width=width, height=height, frames=frames, steps=steps,
                                                guidance=(5.0,), seed=1), model)
        engine, blocks, steps_only = ours(name, req, device, dtype, compile=not args.dry_run)
        for way, call in [("ours, between blocks", blocks), ("ours, between steps", steps_only)]:
            rows.append(measure(label, way, call, steps, device, args.trials, rng))
        del engine, blocks, steps_only, call  # the GPU's memory goes to the peer's model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_diffusers:
            pipe = diffusers_pipeline(name, req, device, dtype)
            rows.append(measure(label, "diffusers WanPipeline", pipe, steps, device, args.trials, rng))
            del pipe
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n| model | way | step time | stop latency, median (max) | in steps |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['way']} | {r['step_seconds']:.3f} s | {r['median_latency']:.3f} s "
              f"({r['max_latency']:.3f} s) | {r['median_in_steps']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(commit=git_commit(), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    torch=torch.__version__, size=f"{width}x{height}", frames=frames, steps=steps,
                    lookahead_blocks=BlockInterrupt.LOOKAHEAD, date=time.strftime("%Y-%m-%d"))
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
