"""`smartdiff calibrate-cache`: fit a model's FlexCache numbers from full runs and write them as YAML.

The gateway CLI adds the subcommand with `add_calibrate_parser`; engines load only in `run_calibrate`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smartdiff.shared.config import ConfigError
from smartdiff.shared.request import SAMPLER_NAMES

DEFAULT_PROMPTS = (  # varied content and motion; use --prompts-file with ~50+ prompts for a production fit
    "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage.",
    "A red fox running through fresh snow in a pine forest, morning light.",
    "Aerial view of waves crashing against black volcanic rocks at sunset.",
    "A chef slicing vegetables quickly on a wooden board, close-up.",
)


def add_calibrate_parser(sub) -> argparse.ArgumentParser:
    """Add `calibrate-cache` to the `smartdiff` subcommands."""
    from smartdiff.shared.serving import add_model_flags

    p = sub.add_parser("calibrate-cache", help="fit TeaCache coefficients (per expert), MagCache ratios and reuse errors",
                       description="Runs full uncached generations and fits the FlexCache numbers of the model "
                       "(needed for Wan2.2, which has no published TeaCache coefficients). The denoiser reads the "
                       "YAML it writes as its cache calibration.")
    add_model_flags(p)
    p.add_argument("--prompt", action="append", help="a calibration prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="calibration prompts, one per line")
    p.add_argument("--negative-prompt", help="default: the model's negative prompt")
    for flag in ("--width", "--height", "--frames", "--steps"):
        p.add_argument(flag, type=int, help="as in `smartdiff generate` (default: the model's); the cache's "
                                            "numbers hold for the step count they were fitted on")
    p.add_argument("--guidance", type=float, nargs="+", metavar="G", help="one value, or two for Wan2.2's experts")
    p.add_argument("--shift", type=float, help="the schedule's shift (default: the model's)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; the others follow (default 0)")
    p.add_argument("--out", type=Path, required=True, help="YAML file to write")
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    import torch
    from smartdiff.services.denoiser.engine import DenoiserEngine
    from smartdiff.services.text_encoder.engine import TextEncoderEngine
    from smartdiff.shared.argtypes import check_out_path
    from smartdiff.shared.request import GenerationRequest, resolve_request
    from smartdiff.shared.serving import model_from_args, system_from_args

    from .calibrate import calibrate

    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = [ln.strip() for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompts-file {args.prompts_file}: cannot read it ({type(e).__name__}: {e})") from None
        if not lines:
            raise ConfigError(f"--prompts-file {args.prompts_file}: holds no prompt (one per line)")
        prompts += lines
    prompts = prompts or list(DEFAULT_PROMPTS)
    check_out_path(args.out, "--out")  # before the runs, not after them
    model, layout = model_from_args(args)
    system = system_from_args(args)
    reqs = [resolve_request(GenerationRequest(
        prompt=p, negative_prompt=args.negative_prompt, width=args.width, height=args.height, frames=args.frames,
        steps=args.steps, guidance=tuple(args.guidance) if args.guidance else None, shift=args.shift,
        sampler=args.sampler, seed=args.seed + i), model) for i, p in enumerate(prompts)]
    if layout is None:
        te = TextEncoderEngine.random(model.text_encoder, system.device, system.dtype, seed=0)
    else:
        te = TextEncoderEngine.from_checkpoint(layout.kind, layout.text_encoder, layout.tokenizer, model.text_encoder,
                                               system.device, system.dtype)
    runs = []
    for req in reqs:
        emb = te.encode([req.prompt, req.negative_prompt])
        runs.append((req, emb[0], emb[1] if req.uses_cfg else None))
    del te
    if system.device.type == "cuda":
        torch.cuda.empty_cache()
    engine = DenoiserEngine.load(model, layout, system.device, system.dtype)
    try:
        result = calibrate(engine, runs)
    except ValueError as e:  # too few samples to fit an expert's polynomial
        raise ConfigError(f"calibration: {e} (--steps / --prompt / --prompts-file)") from None
    try:
        result.to_yaml(args.out)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write it ({e})") from None
    print(f"wrote {args.out}: {model.name}, {len(runs)} runs x {reqs[0].steps} steps, "
          f"{len(result.teacache)} expert(s)", file=sys.stderr)
    return 0
