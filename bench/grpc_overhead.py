"""Overhead of the gRPC path against the in-process engines, and loopback tensor streaming throughput.

1. Streaming: the tensors of a 480p x 81-frame generation (two [512, 4096] bf16 prompt embeddings = 4 MiB
   each, float32 latents [1, 16, 21, 60, 104] = 8 MiB) sent through a real grpc.aio loopback server, MiB/s.
2. End to end: the same request through the four services (embedded deployment, real gRPC on loopback) and
   through the in-process pipeline, same weights and seed; overhead = gateway wall time - in-process time,
   and the per-stage wall time at the gateway minus the compute time each stage reports.

Run (CPU, tiny model): python bench/grpc_overhead.py
Run (GPU, 1.3B shapes, random weights): python bench/grpc_overhead.py --model Wan2.1-T2V-1.3B --random-weights \
    --width 832 --height 480 --frames 81 --steps 50 --out bench_results/grpc_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

import smartdiff.shared  # noqa: F401  (first: configures gRPC before it loads)
from smartdiff.gateway.v1 import gateway_pb2_grpc
from smartdiff.services.gateway.client import generate, request_to_proto
from smartdiff.services.gateway.embedded import EmbeddedDeployment
from smartdiff.services.gateway.local import LocalPipeline
from smartdiff.shared.config import load_model_config
from smartdiff.shared.grpc_server import StageServer, create_channel
from smartdiff.shared.request import GenerationRequest, resolve_request
from smartdiff.shared.serving import SystemConfig, default_device, default_dtype
from smartdiff.shared.tensor_stream import TensorAssembler, tensor_to_frames
from smartdiff.tensor.v1 import tensor_pb2 as pb

MiB = 1 << 20
ECHO = "smartdiff.bench.Echo"


async def streaming(tensors: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Upload each tensor to a loopback server that assembles it (CRC checked); MiB/s, median of `repeats`."""
    import grpc

    async def upload(request_iterator, context):
        assembler = TensorAssembler("upload", max_bytes=1 << 32)
        async for frame in request_iterator:
            assembler.feed(frame)
        return pb.TensorEnd(crc32=assembler.result().numel() & 0xFFFFFFFF)

    server = StageServer([ECHO])
    handler = grpc.stream_unary_rpc_method_handler(upload, request_deserializer=pb.TensorFrame.FromString,
                                                   response_serializer=pb.TensorEnd.SerializeToString)
    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, {"Upload": handler})])
    port = server.add_port("127.0.0.1:0")
    await server.start()
    out = {}
    async with create_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_unary(f"/{ECHO}/Upload", request_serializer=pb.TensorFrame.SerializeToString,
                               response_deserializer=pb.TensorEnd.FromString)
        for name, t in tensors.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                await call(tensor_to_frames(t))
                times.append(time.perf_counter() - start)
            out[name] = t.numel() * t.element_size() / MiB / statistics.median(times)
    await server.stop(0)
    return out


async def through_gateway(model, system, req: GenerationRequest):
    d = await EmbeddedDeployment.start(model, None, system)
    try:
        async with create_channel(d.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            start = time.perf_counter()
            outcome = await generate(stub, request_to_proto(req))
            return time.perf_counter() - start, outcome
    finally:
        await d.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan-tiny")
    p.add_argument("--random-weights", action="store_true", help="random weights for a model that needs a checkpoint")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench_results/grpc_overhead.json"))
    args = p.parse_args()

    tensors = {"prompt embedding [512,4096] bf16": torch.randn(512, 4096).bfloat16(),
               "latents [1,16,21,60,104] fp32": torch.randn(1, 16, 21, 60, 104)}
    rates = asyncio.run(streaming(tensors, args.repeats))
    print(f"{'loopback streaming':<40}{'MiB/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<40}{rate:>10.0f}")

    model = load_model_config(args.model)
    if args.random_weights:
        model = replace(model, random_weights=True)
    device = default_device()
    system = SystemConfig(device, default_dtype(device))
    req = GenerationRequest(prompt="a red fox running through snow", width=args.width, height=args.height,
                            frames=args.frames, steps=args.steps, seed=1)
    pipe = LocalPipeline.load(model, None, device, system.dtype)
    pipe.generate(resolve_request(replace(req, steps=1), model))  # warm-up
    start = time.perf_counter()
    local = pipe.generate(resolve_request(req, model))
    in_process = time.perf_counter() - start
    from smartdiff.services.vae.video import encode_mp4

    start = time.perf_counter()
    encode_mp4(local.frames, fps=16)  # the gateway path returns an mp4: count the encode on this side too
    in_process += time.perf_counter() - start
    del pipe
    gateway_s, outcome = asyncio.run(through_gateway(model, system, req))
    stage_overhead = sum(t.seconds - t.compute_seconds for t in outcome.summary.stage_timings)
    overhead = gateway_s - in_process
    print(f"\nend to end: {args.model}{' (random weights)' if args.random_weights else ''} "
          f"{args.width}x{args.height}x{args.frames}, {args.steps} steps, {device}")
    print(f"{'in-process pipeline (+ mp4 encode)':<40}{in_process:>10.3f} s")
    print(f"{'through the gateway (4 services, gRPC)':<40}{gateway_s:>10.3f} s")
    print(f"{'overhead':<40}{overhead:>10.3f} s  ({100 * overhead / in_process:+.2f} %)")
    print(f"{'stage wall - stage compute (sum)':<40}{stage_overhead:>10.3f} s  "
          f"({100 * stage_overhead / in_process:.2f} %)")
    result = dict(card=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  date=time.strftime("%Y-%m-%d"), streaming_mib_s=rates, model=args.model,
                  shape=[args.width, args.height, args.frames], steps=args.steps, in_process_s=in_process,
                  gateway_s=gateway_s, overhead_s=overhead, stage_overhead_s=stage_overhead,
                  stage_timings={t.stage: [t.seconds, t.compute_seconds] for t in outcome.summary.stage_timings})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
