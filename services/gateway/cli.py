"""The `smartdiff` command line: `smartdiff generate ...` writes an mp4 (and optionally the final latents)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from smartdiff.shared.checkpoint import CheckpointError
from smartdiff.shared.config import ConfigError, available_models
from smartdiff.shared.errors import RequestError
from smartdiff.shared.request import SAMPLER_NAMES, GenerationRequest

DTYPES = ("bfloat16", "float16", "float32")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"shipped model preset ({', '.join(available_models())}); default wan-tiny "
                   "(random weights) when no --checkpoint is given")
    p.add_argument("--checkpoint", type=Path, help="model folder, official Wan or Diffusers layout (detected)")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def add_request_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", help="default: the model's negative prompt")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--frames", type=int, help="4n+1")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, nargs="+", metavar="G",
                   help="CFG scale; two values for Wan2.2: high-noise expert then low-noise expert")
    p.add_argument("--shift", type=float, help="flow-matching timestep shift")
    p.add_argument("--sampler", choices=SAMPLER_NAMES)
    p.add_argument("--seed", type=int, help="default: random, printed")
    p.add_argument("--fps", type=int, help="frames per second of the mp4 (default 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartdiff", description="Serve and run Wan text-to-video models.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video and write it as mp4")
    add_request_flags(gen)
    add_model_flags(gen)
    gen.add_argument("--out", type=Path, default=Path("out.mp4"), help="mp4 file to write (default out.mp4)")
    gen.add_argument("--save-latents", type=Path, metavar="FILE.safetensors",
                     help="also save the final latents (key 'latents', float32, [1, 16, F', H/8, W/8])")
    return parser


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    return GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        frames=args.frames, steps=args.steps, guidance=tuple(args.guidance) if args.guidance else None,
        shift=args.shift, sampler=args.sampler, seed=args.seed, fps=args.fps,
    )


class ProgressBars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = self._tqdm(total=total, desc=f"{stage:>12}", unit="step", leave=True,
                                                 file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from smartdiff.services.gateway.local import LocalPipeline, default_device, default_dtype
    from smartdiff.services.vae.video import write_mp4
    from smartdiff.shared.model_source import resolve_model
    from smartdiff.shared.request import resolve_request

    model, layout = resolve_model(args.model, args.checkpoint)
    req = resolve_request(request_from_args(args), model)  # refused here, before any weights load
    if args.seed is None:
        print(f"seed: {req.seed}", file=sys.stderr)
    if model.random_weights:
        print(f"note: {model.name} has RANDOM weights: the video is noise (use --checkpoint for a real model)",
              file=sys.stderr)
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    start = time.perf_counter()
    pipe = LocalPipeline.load(model, layout, device, dtype)
    load_s = time.perf_counter() - start
    result = pipe.generate(req, progress=ProgressBars())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(result.frames, args.out, fps=req.fps)
    if args.save_latents:
        from safetensors.torch import save_file

        save_file({"latents": result.latents.contiguous()}, str(args.save_latents))
    t = result.timings
    print(f"wrote {args.out} ({req.width}x{req.height}, {req.frames} frames @ {req.fps} fps) model={model.name} "
          f"sampler={req.sampler} steps={req.steps} shift={req.shift:g} guidance={','.join(f'{g:g}' for g in req.guidance)} "
          f"seed={req.seed} dtype={str(dtype).removeprefix('torch.')} device={device} load={load_s:.1f}s "
          f"text={t['text_encoder']:.2f}s denoise={t['denoiser']:.2f}s vae={t['vae']:.2f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
    except RequestError as e:
        print(f"error: invalid request: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
