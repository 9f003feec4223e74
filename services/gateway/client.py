"""Client side of the gateway: build a GenerateRequest, stream a Generate call, collect the video and summary."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from smartdiff.denoiser.v1 import options_pb2
from smartdiff.gateway.v1 import gateway_pb2 as pb
from smartdiff.gateway.v1 import gateway_pb2_grpc as pb_grpc
from smartdiff.shared.request import GenerationRequest, check_request
from smartdiff.shared.tensor_stream import TensorAssembler
from smartdiff.vae.v1 import vae_pb2

STAGE_LABELS = {pb.STAGE_QUEUED: "queued", pb.STAGE_TEXT_ENCODER: "text_encoder", pb.STAGE_DENOISER: "denoiser",
                pb.STAGE_VAE: "vae", pb.STAGE_VIDEO_ENCODING: "mp4"}
MAX_VIDEO_BYTES = 8 << 30
FLOAT32_MAX = 3.4028234663852886e38


def request_to_proto(req: GenerationRequest, *, model: str = "", attention: options_pb2.AttentionConfig | None = None,
                     cache: options_pb2.CacheConfig | None = None, output_format: int = vae_pb2.OUTPUT_FORMAT_MP4,
                     return_latents: bool = False, request_id: str = "") -> pb.GenerateRequest:
    """The wire form of `req`, after the rules every model shares (RequestError naming the field, before any
    value reaches a proto field it does not fit); the gateway applies its model's own."""
    check_request(req)
    r = pb.GenerateRequest(request_id=request_id, model=model, prompt=req.prompt, sampler=req.sampler or "",
                           output_format=output_format, return_latents=return_latents)
    for name in ("negative_prompt", "width", "height", "frames", "steps", "shift", "seed", "fps"):
        value = getattr(req, name)
        if value is not None:
            setattr(r, name, value)
    if req.guidance:
        r.guidance.extend(req.guidance)
    if attention is not None:
        r.attention.CopyFrom(attention)
    if cache is not None:
        r.cache.CopyFrom(cache)
    return r


def set_fields(msg, assignments: list[str], what: str) -> None:
    """Set proto fields from "path=value" strings, e.g. "sparge.topk=0.5", "allow_fallback=true".

    Raises ValueError naming the path when a field does not exist, is a message (set its fields instead), or the
    value does not parse or fit the field.
    """
    seen = set()
    for item in assignments:
        path, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        path = path.strip()
        target = msg
        names = path.split(".")
        for depth, name in enumerate(names):
            field = target.DESCRIPTOR.fields_by_name.get(name)
            if field is None:
                known = ", ".join(sorted(target.DESCRIPTOR.fields_by_name))
                where = ".".join(names[:depth]) or "the message"
                raise ValueError(f"{what}: unknown field {path!r} (fields of {where}: {known})")
            is_message = field.type == field.TYPE_MESSAGE
            if depth < len(names) - 1:
                if not is_message or field.is_repeated:
                    raise ValueError(f"{what}: {'.'.join(names[:depth + 1])} is a value, it has no field "
                                     f"{names[depth + 1]!r}")
                target = getattr(target, name)
            elif is_message:
                known = ", ".join(sorted(field.message_type.fields_by_name))
                raise ValueError(f"{what}: {path} is a group of settings; set one of them, e.g. {path}.NAME=VALUE "
                                 f"({known})")
        if not field.is_repeated:  # (a list field takes one value per assignment)
            if path in seen:
                raise ValueError(f"{what}: {path} is set twice")
            seen.add(path)
        if field.type == field.TYPE_BOOL:
            kind, parse = "true or false", lambda t: {"true": True, "1": True, "false": False, "0": False}[t.lower()]
        elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            kind, parse = "a number", float
        elif field.type == field.TYPE_STRING:
            kind, parse = "a string", str
        else:
            kind, parse = "an integer", int
        try:
            value = parse(text.strip())
        except (KeyError, ValueError):
            raise ValueError(f"{what}: {path}: must be {kind}, got {text!r}") from None
        if field.type == field.TYPE_FLOAT and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise ValueError(f"{what}: {path}: {text!r} does not fit this field (a 32-bit float: at most "
                             f"{FLOAT32_MAX:.4g} in magnitude)")
        try:
            if field.is_repeated:
                getattr(target, names[-1]).append(value)
            else:
                setattr(target, names[-1], value)
        except (ValueError, TypeError) as e:  # e.g. a negative value for an unsigned field
            raise ValueError(f"{what}: {path}: {text!r} does not fit this field ({e})") from None


@dataclass
class GenerateOutcome:
    video: bytes | None  # the mp4 file (OUTPUT_FORMAT_MP4)
    frames: torch.Tensor | None  # uint8 [F, H, W, 3] (OUTPUT_FORMAT_FRAMES)
    latents: torch.Tensor | None  # float32 [1, 16, F', H/8, W/8] when asked for
    summary: pb.GenerateSummary


class ResponseError(Exception):
    """The gateway's response stream broke gateway.proto's contract (a part missing, unasked, of the wrong shape or
    out of order): the generation's result cannot be trusted."""


async def generate(stub: pb_grpc.GatewayServiceStub, request: pb.GenerateRequest,
                   on_progress: Callable[[str, int, int], None] | None = None,
                   timeout: float | None = None) -> GenerateOutcome:
    """Run one Generate call; `on_progress(stage, step, total)` sees every progress event. ResponseError (or
    TensorStreamError for corrupt tensor bytes) when the stream is not what the request asked for: the video in
    the requested format, the latents when asked for, then exactly one summary, last."""
    video_kind = "frames" if request.output_format == vae_pb2.OUTPUT_FORMAT_FRAMES else "mp4"
    wanted = [video_kind, "latents"] if request.return_latents else [video_kind]
    parts = {k: TensorAssembler(k, MAX_VIDEO_BYTES) for k in wanted}
    summary = None
    async for msg in stub.Generate(request, timeout=timeout):
        kind = msg.WhichOneof("frame")
        if summary is not None:
            raise ResponseError(f"{kind or 'empty'} message after the summary, which comes last")
        if kind == "progress":
            if on_progress is not None:
                p = msg.progress
                on_progress(STAGE_LABELS.get(p.stage, "?"), p.step, p.total_steps)
        elif kind == "summary":
            summary = msg.summary
        elif kind in parts:
            parts[kind].feed(getattr(msg, kind))
        else:
            raise ResponseError(f"unexpected {kind or 'empty'} message in the response; asked for: "
                                f"{', '.join(wanted)}")
    if summary is None:
        raise ResponseError("the response ended without its summary")
    done = {k: a.result() for k, a in parts.items()}  # TensorStreamError for a part missing or cut short
    rules = {"mp4": (torch.uint8, 1), "frames": (torch.uint8, 4), "latents": (torch.float32, 5)}
    for k, t in done.items():
        dtype, dims = rules[k]
        if t.dtype != dtype or t.dim() != dims or (k == "frames" and t.shape[-1] != 3):
            raise ResponseError(f"{k} must be {dtype} with {dims} dims{' [F, H, W, 3]' if k == 'frames' else ''}, "
                                f"got {t.dtype} {list(t.shape)}")
    video = done["mp4"].numpy().tobytes() if "mp4" in done else None
    return GenerateOutcome(video, done.get("frames"), done.get("latents"), summary)
