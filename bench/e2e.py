"""A whole generation, ours through the gateway (four services, real gRPC on loopback) vs diffusers' WanPipeline.

Wan2.1-1.3B at 480p x 81 frames, 50 UniPC steps, CFG 5, the same random weights for both (a Diffusers folder
written first): the 1.3B DiT, the full Wan VAE (float32 for both), and a ONE-layer umT5 with the real
width (4096) in place of the 24-layer encoder (the T5 is ~0.05 s of a ~60 s generation on this class of GPU;
both pipelines use the same one). Both return uint8 frames [F, H, W, 3] on the host, or with --output mp4 both
write an mp4 file (H.264, Wan's own quality setting): diffusers' export_to_video(quality=8) after the pipeline,
ours the gateway's mp4 (the VAE encodes while it decodes) written by the client; mp4 needs imageio-ffmpeg.
The peer is WanPipeline as it comes (eager); --peer-compile also times it with its transformer compiled by
diffusers' own recipe (compile_repeated_blocks), compilation in its warm-up as ours is in our startup. Ours runs
the two guidance branches of a step as one batch-2 forward (WanPipeline: two forwards). One timed run per side.
Also reports the gRPC overhead: each stage's wall time at the gateway minus the compute time it reports.
--attention runs our side once per attention choice (one deployment; "default" is the deployment's default,
the fastest exact backend: `flash_attn`, our exact kernel on Hopper; a choice's words after the backend are
--attention-param settings; "sdpa" times PyTorch's exact SDPA, cuDNN on Hopper). --cfg-batch on off starts one
deployment per setting (off: the two guidance branches one after the other, as WanPipeline runs them); each
run reports the denoiser stage's peak GPU memory, and the peer's peak over its generation.

  python bench/e2e.py --out bench_results/e2e.json
  python bench/e2e.py --attention default sage "sparge sparge.topk=0.5"
  python bench/e2e.py --cfg-batch on off
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

import smartdiff.shared  # noqa: F401  (first: configures gRPC before it loads)
from common import provenance

NEG = "blurry, static, low quality"
PROMPT = "A red fox running through fresh snow in a pine forest, cinematic lighting"


def write_folder(root: Path, shift: float) -> None:
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    from smartdiff.services.text_encoder.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=512, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=1,
                                         relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                                         is_encoder_decoder=False))
        vae = diffusers.AutoencoderKLWan()
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              num_train_timesteps=1000, flow_shift=shift, solver_order=2,
                                              solver_type="bh2", predict_x0=True, lower_order_final=True,
                                              final_sigmas_type="zero")
    pipe = diffusers.WanPipeline(tokenizer=build_tiny_tokenizer(512), text_encoder=t5.to(torch.bfloat16),
                                 vae=vae, scheduler=sched, transformer=dit.to(torch.bfloat16))
    pipe.save_pretrained(str(root))


def run_diffusers(root: Path, kw: dict, mp4: Path | None, compiled: bool = False) -> tuple[float, float]:
    """One timed WanPipeline generation after a 2-step warm-up -> (seconds, peak GiB allocated during it);
    `compiled`: its transformer compiled with diffusers' own recipe (regional compile of the repeated blocks),
    the compilation inside the warm-up."""
    import diffusers
    from diffusers.utils import export_to_video

    vae = diffusers.AutoencoderKLWan.from_pretrained(str(root), subfolder="vae", torch_dtype=torch.float32)
    pipe = diffusers.WanPipeline.from_pretrained(str(root), vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        torch._dynamo.reset()
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    # frames: uint8 on the host as ours ("pt", then the same rounding on the GPU; "np" would copy float32 out);
    # mp4: export_to_video takes the float frames
    args = dict(prompt=PROMPT, negative_prompt=NEG, height=kw["height"], width=kw["width"], num_frames=kw["frames"],
                guidance_scale=5.0, output_type="np" if mp4 is not None else "pt")
    pipe(**args, num_inference_steps=2, generator=torch.Generator("cuda").manual_seed(1))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    frames = pipe(**args, num_inference_steps=kw["steps"], generator=torch.Generator("cuda").manual_seed(1)).frames[0]
    if mp4 is not None:
        export_to_video(frames, str(mp4), fps=16, quality=8)
    else:
        frames = (frames * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # [F, H, W, 3], as ours
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    del pipe, vae
    torch.cuda.empty_cache()
    return seconds, peak


def attention_config(choice: str):
    """"default" -> None; "sparge sparge.topk=0.5" -> AttentionConfig(backend="sparge", sparge.topk=0.5)."""
    from smartdiff.denoiser.v1 import options_pb2
    from smartdiff.services.gateway.client import set_fields

    if choice == "default":
        return None
    backend, *params = choice.split()
    config = options_pb2.AttentionConfig(backend=backend)
    set_fields(config, params, "--attention")
    return config


async def run_ours(root: Path, kw: dict, choices: list[str], mp4: Path | None,
                   cfg_batch: str = "on") -> tuple[list[dict], float]:
    from smartdiff.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from smartdiff.services.denoiser.server import DenoiserOptions
    from smartdiff.services.gateway.client import generate, request_to_proto
    from smartdiff.services.gateway.embedded import EmbeddedDeployment
    from smartdiff.shared.grpc_server import create_channel
    from smartdiff.shared.model_source import resolve_model
    from smartdiff.shared.request import GenerationRequest
    from smartdiff.shared.serving import SystemConfig
    from smartdiff.vae.v1 import vae_pb2

    model, layout = resolve_model(None, root)
    start = time.perf_counter()
    d = await EmbeddedDeployment.start(model, layout, SystemConfig(torch.device("cuda"), torch.bfloat16),
                                       denoiser=DenoiserOptions(compile="on", cfg_batch=cfg_batch))
    startup = time.perf_counter() - start
    runs = []
    try:
        async with create_channel(d.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            req = GenerationRequest(prompt=PROMPT, negative_prompt=NEG, guidance=(5.0,), seed=1, **kw)
            for choice in choices:
                proto = request_to_proto(req, attention=attention_config(choice), output_format=vae_pb2.OUTPUT_FORMAT_MP4
                                         if mp4 else vae_pb2.OUTPUT_FORMAT_FRAMES)
                start = time.perf_counter()
                outcome = await generate(stub, proto)
                if mp4 is not None:
                    mp4.write_bytes(outcome.video)
                seconds = time.perf_counter() - start
                stages = {gateway_pb2.Stage.Name(t.stage).removeprefix("STAGE_").lower():
                          dict(wall=t.seconds, compute=t.compute_seconds, peak_gib=t.peak_memory_bytes / 2**30)
                          for t in outcome.summary.stage_timings}
                runs.append(dict(choice=choice, cfg_batch=cfg_batch, ours_s=seconds, stages=stages,
                                 grpc_overhead_s=sum(s["wall"] - s["compute"] for s in stages.values()),
                                 attention=outcome.summary.settings.attention_selection))
    finally:
        await d.stop()
    return runs, startup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=Path("/tmp/wan13b-random"))
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--attention", nargs="+", default=["default"], metavar="CHOICE",
                   help='attention choices, each timed: "default", "sage", "sparge sparge.topk=0.5", ...')
    p.add_argument("--cfg-batch", nargs="+", choices=("on", "off"), default=["on"],
                   help="ours with the guidance branches batched (on, the default) and/or one after the other")
    p.add_argument("--output", choices=("frames", "mp4"), default="frames",
                   help="what both pipelines deliver: uint8 frames in memory, or an mp4 file")
    p.add_argument("--peer-compile", action="store_true",
                   help="also time WanPipeline with its transformer compiled (compile_repeated_blocks)")
    p.add_argument("--commit", help="the commit to record (default: this checkout's HEAD)")
    p.add_argument("--out", type=Path, default=Path("bench_results/e2e.json"))
    args = p.parse_args()
    for choice in args.attention:
        attention_config(choice)  # a bad choice fails here, not after the peer's minute
    kw = dict(width=args.width, height=args.height, frames=args.frames, steps=args.steps)
    if not (args.folder / "model_index.json").is_file():
        write_folder(args.folder, shift=5.0)
    mp4 = (lambda who: args.out.parent / f"e2e_{who}.mp4") if args.output == "mp4" else (lambda who: None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    peer, peer_peak = run_diffusers(args.folder, kw, mp4("diffusers"))
    print(f"diffusers WanPipeline (eager, its default) {peer:8.2f} s, peak {peer_peak:.1f} GiB", flush=True)
    peer_compiled = None
    if args.peer_compile:
        peer_compiled, _ = run_diffusers(args.folder, kw, mp4("diffusers_compiled"), compiled=True)
        print(f"diffusers WanPipeline, transformer compiled {peer_compiled:8.2f} s", flush=True)
        torch._dynamo.reset()
    runs, startups = [], []
    for cfg_batch in args.cfg_batch:
        done, startup = asyncio.run(run_ours(args.folder, kw, args.attention, mp4(f"ours_cfg_batch_{cfg_batch}"),
                                             cfg_batch))
        runs += done
        startups.append(startup)
        print(f"our startup (--cfg-batch {cfg_batch}) incl. compilation and warm-up: {startup:.0f} s "
              "(before SERVING, not timed)")
    for run in runs:
        ours = run["ours_s"]
        run["speedup"] = peer / ours
        if peer_compiled is not None:
            run["speedup_vs_compiled"] = peer_compiled / ours
        versus = f"{peer / ours:.3f}x eager" + (f", {peer_compiled / ours:.3f}x compiled" if peer_compiled else "")
        print(f"ours through the gateway      {ours:8.2f} s   ({versus})   attention {run['choice']}: "
              f"{run['attention']}, --cfg-batch {run['cfg_batch']}")
        print(f"  gRPC overhead (stage wall - compute): {run['grpc_overhead_s']:.3f} s = "
              f"{100 * run['grpc_overhead_s'] / ours:.2f} % of the generation")
        for stage, s in run["stages"].items():
            print(f"  stage {stage}: wall {s['wall']:.2f} s, compute {s['compute']:.2f} s, peak {s['peak_gib']:.1f} GiB")
    first = runs[0]
    args.out.write_text(json.dumps(dict(**provenance(args.commit), shape=kw, output=args.output,
                                        diffusers_compiled_s=peer_compiled,
                                        diffusers_s=peer, diffusers_peak_gib=peer_peak, ours_s=first["ours_s"],
                                        speedup=first["speedup"], startup_s=startups[0], startups_s=startups,
                                        runs=runs), indent=1))


if __name__ == "__main__":
    main()
