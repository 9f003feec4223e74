"""The `smartdiff` command line: `generate` (through a gateway, or an embedded local deployment) and `serve`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from pathlib import Path

from smartdiff.shared.argtypes import check_out_path, seconds
from smartdiff.shared.checkpoint import CheckpointError
from smartdiff.shared.config import ConfigError
from smartdiff.shared.errors import RequestError, TensorStreamError
from smartdiff.shared.memory import MemoryPolicyError
from smartdiff.shared.request import (
    MAX_FRAMES, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_GUIDANCE, MIN_SHIFT, SAMPLER_NAMES,
    GenerationRequest,
)
from smartdiff.shared.serving import MODEL_DIR_ENV, add_model_flags, add_serve_flags

STAGES = ("text-encoder", "denoiser", "vae", "gateway")


def add_request_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True,
                   help=f"at most {MAX_PROMPT_CHARS} characters, at least one visible")
    p.add_argument("--negative-prompt", help="default: the model's negative prompt")
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 16, 16..{MAX_SIDE} (default: the model's)")
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 16, 16..{MAX_SIDE} (default: the model's)")
    p.add_argument("--frames", type=int, help=f"4n+1, 1..{MAX_FRAMES} (default: the model's)")
    p.add_argument("--steps", type=int, help=f"denoising steps, 1..{MAX_STEPS} (default: the model's)")
    p.add_argument("--guidance", type=float, nargs="+", metavar="G",
                   help=f"CFG scale, {MIN_GUIDANCE:g}..50 (1 turns CFG off); two values for Wan2.2: high-noise "
                        "expert then low-noise expert")
    p.add_argument("--shift", type=float, help=f"flow-matching timestep shift, {MIN_SHIFT:g}..100")
    p.add_argument("--sampler", choices=SAMPLER_NAMES)
    p.add_argument("--seed", type=int, help=f"0..{MAX_SEED} (default: random, printed)")
    p.add_argument("--fps", type=int, help="frames per second of the mp4, 1..120 (default 16)")
    p.add_argument("--attention", default="",
                   help="self-attention backend: sdpa, flash_attn, sage, sage_fp8, sage_int8, sparge, auto "
                        "(default: the deployment's default)")
    p.add_argument("--attention-param", action="append", default=[], metavar="KEY=VALUE",
                   help="AttentionConfig field, e.g. allow_fallback=true, auto.tolerance=0.02, sparge.topk=0.5")
    p.add_argument("--cache", default="", help="feature-reuse cache: none, teacache, pab, magcache, budget (default none)")
    p.add_argument("--cache-param", action="append", default=[], metavar="KEY=VALUE",
                   help="parameter of the chosen cache, e.g. rel_l1_threshold=0.08 (teacache), "
                        "self_attention_skip_range=2 (pab), threshold=0.12 (magcache), compute_fraction=0.5 (budget)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartdiff", description="Serve and run Wan text-to-video models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one video and write it as mp4")
    add_request_flags(gen)
    gen.add_argument("--gateway", metavar="HOST:PORT", type=gateway_address,
                     help="a running gateway; without it the four services start in-process on loopback")
    add_model_flags(gen)
    gen.add_argument("--out", type=Path, default=Path("out.mp4"), help="mp4 file to write (default out.mp4)")
    gen.add_argument("--save-latents", type=Path, metavar="FILE.safetensors",
                     help="also save the final latents (key 'latents', float32, [1, 16, F', H/8, W/8])")
    gen.add_argument("--timeout", type=seconds(0.001), help="deadline of the request in seconds (default: none)")
    gen.add_argument("--low-mem-level", type=int, default=0, choices=range(4),
                     help="embedded mode: 0 all resident; 1 VAE tiling; 2 T5 on CPU; 3 DiT block offload (CUDA)")
    gen.add_argument("--cfg-batch", choices=("auto", "on", "off"), default="auto",
                     help="embedded mode: on, both guidance branches in one batch-2 forward; off, one after the "
                          "other (about half the denoiser's activation memory); auto (default): off at "
                          "--low-mem-level 3, else on")

    serve = sub.add_parser("serve", help="run long-lived services: all (in one process) or one stage",
                           description="`smartdiff serve STAGE --help` lists a stage's flags.")
    serve.add_argument("stage", choices=("all", *STAGES))
    serve.add_argument("args", nargs=argparse.REMAINDER, help="the stage's flags")

    from smartdiff.services.denoiser.cache.cli import add_calibrate_parser

    add_calibrate_parser(sub)
    from smartdiff.services.gateway.deploy import add_deploy_parser

    add_deploy_parser(sub)  # `smartdiff deploy status|wait` (k8s/)
    return parser


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    return GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        frames=args.frames, steps=args.steps, guidance=tuple(args.guidance) if args.guidance else None,
        shift=args.shift, sampler=args.sampler, seed=args.seed, fps=args.fps,
    )


def choices_from_args(args: argparse.Namespace):
    """AttentionConfig and CacheConfig protos from --attention/--attention-param and --cache/--cache-param."""
    from smartdiff.denoiser.v1 import options_pb2
    from smartdiff.services.gateway.client import set_fields

    attention = options_pb2.AttentionConfig(backend=args.attention)
    try:
        set_fields(attention, args.attention_param, "--attention-param")
    except ValueError as e:
        raise RequestError("attention", str(e)) from None
    if args.attention_param and not args.attention:
        raise RequestError("attention", "--attention-param needs --attention BACKEND")
    cache = options_pb2.CacheConfig(strategy=args.cache)
    if args.cache_param:
        if not args.cache or args.cache == "none":
            raise RequestError("cache", "--cache-param needs --cache STRATEGY (a strategy, not none)")
        if args.cache not in cache.DESCRIPTOR.fields_by_name:
            raise RequestError("cache", f"unknown strategy {args.cache!r}")
        getattr(cache, args.cache).SetInParent()
        try:
            set_fields(getattr(cache, args.cache), args.cache_param, "--cache-param")
        except ValueError as e:
            raise RequestError("cache", str(e)) from None
    return attention, cache


def check_gateway_flags(args: argparse.Namespace) -> None:
    """With --gateway the deployment's stages chose their weights, dtype, device and memory level: refuse the
    flags that only configure the embedded deployment instead of ignoring them (--model is sent and checked)."""
    env_dir = os.environ.get(MODEL_DIR_ENV)  # the default of --checkpoint, not a flag the user gave
    ignored = [flag for flag, given in (
        ("--checkpoint", args.checkpoint is not None and (not env_dir or args.checkpoint != Path(env_dir))),
        ("--dtype", args.dtype is not None), ("--device", args.device is not None),
        ("--low-mem-level", args.low_mem_level != 0), ("--cfg-batch", args.cfg_batch != "auto")) if given]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: configure the embedded deployment, not a running gateway "
                          f"(its stages have their own flags); drop them or drop --gateway")


def gateway_address(text: str) -> str:
    """argparse type of --gateway: an address, not empty (an empty one would mean the embedded deployment)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a gateway address such as HOST:PORT, got an empty string")
    return text


class ProgressBars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "queued":
            return
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = self._tqdm(total=total, desc=f"{stage:>12}", unit="step", leave=True,
                                                 file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


async def _generate(args: argparse.Namespace) -> int:
    import grpc

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from smartdiff.gateway.v1 import gateway_pb2_grpc
    from smartdiff.services.gateway.client import ResponseError, generate, request_to_proto
    from smartdiff.shared.grpc_server import create_channel
    from smartdiff.shared.request import resolve_request
    from smartdiff.shared.serving import model_from_args, system_from_args

    req = request_from_args(args)
    attention, cache = choices_from_args(args)
    check_out_path(args.out, "--out")
    if args.save_latents is not None:
        check_out_path(args.save_latents, "--save-latents")
    deployment = None
    if args.gateway is not None:
        check_gateway_flags(args)
        address = args.gateway
    else:  # embedded: refuse a bad request before loading anything, then start the four services
        from smartdiff.services.gateway.embedded import EmbeddedDeployment

        model, layout = model_from_args(args)
        resolved = resolve_request(req, model)
        if req.seed is None:  # fix the seed here so it is printed before the work starts (and if it fails)
            req = GenerationRequest(**{**req.__dict__, "seed": resolved.seed})
            print(f"seed: {req.seed}", file=sys.stderr)
        if layout is None and model.random_weights:
            print(f"note: {model.name} has RANDOM weights: the video is noise (use --checkpoint for a real model)",
                  file=sys.stderr)
        from smartdiff.services.denoiser.server import DenoiserOptions

        options = DenoiserOptions(enable_flexcache=bool(args.cache and args.cache != "none"),
                                  cfg_batch=args.cfg_batch)
        deployment = await EmbeddedDeployment.start(model, layout, system_from_args(args), denoiser=options)
        address = deployment.address
    try:
        # through a gateway, --model is checked against what it serves (embedded: it chose the model)
        model_name = (args.model or "") if args.gateway is not None else ""
        request = request_to_proto(req, model=model_name, attention=attention, cache=cache,
                                   return_latents=args.save_latents is not None)
        async with create_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            try:
                outcome = await generate(stub, request, ProgressBars(), timeout=args.timeout)
            except grpc.aio.AioRpcError as e:
                print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
            except (ResponseError, TensorStreamError) as e:  # the gateway's stream broke its contract
                print(f"error: the gateway's response is unusable: {e}", file=sys.stderr)
                return 1
    finally:
        if deployment is not None:
            await deployment.stop()
    s = outcome.summary.settings
    try:
        args.out.write_bytes(outcome.video)
        if args.save_latents:
            save_file({"latents": outcome.latents.contiguous()}, str(args.save_latents))
    except (OSError, SafetensorError) as e:  # checked before the generation; the disk may have filled since
        print(f"error: writing the output: {e}", file=sys.stderr)
        return 1
    for name in outcome.summary.truncated_prompts:
        print(f"warning: the {name.replace('_', ' ')} was cut to the text encoder's token limit (512 for Wan); the "
              "video follows its beginning only", file=sys.stderr)
    if req.seed is None:
        print(f"seed: {s.seed}", file=sys.stderr)
    times = " ".join(f"{_stage_name(t.stage)}={t.seconds:.2f}s" + (f"/{t.peak_memory_bytes / 2**30:.1f}GiB"
                                                                     if t.peak_memory_bytes else "")
                     for t in outcome.summary.stage_timings)
    levels = ",".join(f"{_stage_name(t.stage)}:{t.low_mem_level}" for t in outcome.summary.stage_timings
                      if t.low_mem_level)
    print(f"wrote {args.out} ({s.width}x{s.height}, {s.frames} frames @ {s.fps} fps) model={s.model} "
          f"sampler={s.sampler} steps={s.steps} shift={s.shift:g} guidance={','.join(f'{g:g}' for g in s.guidance)} "
          f"seed={s.seed} attention={s.attention_selection} cache={s.cache.strategy} "
          f"cached_steps={outcome.summary.cached_steps} low_mem_level={levels or 0} {times} "
          f"total={outcome.summary.total_seconds:.2f}s")
    return 0


def _stage_name(stage: int) -> str:
    from smartdiff.services.gateway.client import STAGE_LABELS

    return STAGE_LABELS.get(stage, "?")


def all_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartdiff serve all",
                                description="The four services in one process; prints HOST:PORT SERVING when ready.")
    add_model_flags(p)
    add_serve_flags(p, "gateway")
    p.add_argument("--low-mem-level", type=int, default=0, choices=range(4))
    from smartdiff.services.denoiser.server import add_denoiser_flags

    add_denoiser_flags(p)
    return p


async def _serve_all(args: argparse.Namespace) -> int:
    from smartdiff.services.gateway.embedded import EmbeddedDeployment
    from smartdiff.shared.grpc_server import check_address
    from smartdiff.shared.serving import (
        model_from_args, run_until_signal, setup_logging, start_metrics, system_from_args,
    )

    from smartdiff.services.denoiser.server import options_from_args

    setup_logging(args.log_level)
    model, layout = model_from_args(args)
    options = options_from_args(args)
    if (options.cfg_degree, options.ulysses_degree, options.ring_degree) != (1, 1, 1):
        raise ConfigError("serve all runs one denoiser process: parallel degrees must be 1 "
                          "(multi-GPU: smartdiff serve denoiser --nproc-per-node N, see the README)")
    start_metrics(args)  # one endpoint for the four stages (their metrics carry the service's name)
    await check_address(f"{args.host}:{args.port}")  # before the weights load
    # the stages on loopback (only the gateway calls them), the gateway where --host says
    deployment = await EmbeddedDeployment.start(model, layout, system_from_args(args), gateway_host=args.host,
                                                gateway_port=args.port, denoiser=options)
    print(f"{deployment.address} SERVING", flush=True)
    await run_until_signal(deployment.servers[-1], args.drain_seconds)
    await deployment.stop()
    return 0


def serve(stage: str, argv: list[str]) -> int:
    if stage == "all":
        return asyncio.run(_serve_all(all_parser().parse_args(argv)))
    module = importlib.import_module(f"smartdiff.services.{stage.replace('-', '_')}.__main__")
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return asyncio.run(_generate(args))
        if args.command == "serve":
            return serve(args.stage, args.args)
        if args.command == "calibrate-cache":
            from smartdiff.services.denoiser.cache.cli import run_calibrate

            return run_calibrate(args)
        if args.command == "deploy":
            from smartdiff.services.gateway.deploy import run as run_deploy

            return run_deploy(args)
    except RequestError as e:
        print(f"error: invalid request: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, MemoryPolicyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
