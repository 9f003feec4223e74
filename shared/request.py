"""User parameters of one generation: the request as sent, and its resolved form with every default applied."""

from __future__ import annotations

import html

import math
import secrets
from dataclasses import dataclass

from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import RequestError

SAMPLER_NAMES = ("unipc", "dpm++", "euler")
MAX_SIDE = 2048  # pixels; 16 * 128 latent patches per side
MAX_FRAMES = 241  # 4 * 60 + 1
MAX_STEPS = 200
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 20_000
MAX_FPS = 120
MIN_GUIDANCE = 1.0  # 1 turns classifier-free guidance off; below it CFG would not run (as in diffusers' Wan pipeline)
MIN_SHIFT = 0.1  # smaller shifts squeeze the whole schedule against sigma = 0 (1e-12 gives NaN latents)


@dataclass(frozen=True)
class GenerationRequest:
    """What a user asks for. None means "the model's default" (a random seed for `seed`)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: tuple[float, ...] | None = None  # one value, or (high-noise, low-noise) for two-expert models
    shift: float | None = None
    sampler: str | None = None
    seed: int | None = None
    fps: int | None = None


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every default filled in; guidance has one value per expert."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    guidance: tuple[float, ...]
    shift: float
    sampler: str
    seed: int
    fps: int

    def latent_shape(self, model: ModelConfig) -> tuple[int, int, int, int, int]:
        """[1, z_dim, F', H/8, W/8] with F' = (frames - 1) / 4 + 1."""
        st, sh, sw = model.vae.stride
        return (1, model.vae.z_dim, (self.frames - 1) // st + 1, self.height // sh, self.width // sw)

    def tokens(self, model: ModelConfig) -> int:
        """The DiT's sequence length: latent frames x height x width over the patch size."""
        pt, ph, pw = model.dit.patch_size
        f, h, w = self.latent_shape(model)[2:]
        return (f // pt) * (h // ph) * (w // pw)

    @property
    def uses_cfg(self) -> bool:
        return any(g > 1.0 for g in self.guidance)


def _int(name: str, value, lo: int, hi: int, rule: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise RequestError(name, f"must be between {lo} and {hi}{rule}, got {value}")
    return value


def _float(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise RequestError(name, f"must be >= {lo} and <= {hi}, got {value}")
    return float(value)


def _size(name: str, v) -> int:
    v = _int(name, v, 16, MAX_SIDE)
    if v % 16:
        raise RequestError(name, f"must be a multiple of 16 (VAE stride 8 x patch 2), got {v}")
    return v


def _frames(v) -> int:
    v = _int("frames", v, 1, MAX_FRAMES)
    if (v - 1) % 4:
        raise RequestError("frames", f"must be 4n+1 (1, 5, 9, ..., 81, ...), got {v}")
    return v


def _text(name: str, v, empty_ok: bool) -> str:
    if not isinstance(v, str):
        raise RequestError(name, "must be a string" if empty_ok else "must be a non-empty string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: what Python makes of command-line bytes that are not UTF-8
        raise RequestError(name, f"must be valid Unicode text; character {e.start} is an unpaired surrogate "
                                 "(bytes that are not UTF-8?)") from None
    if not empty_ok and not any(c.isprintable() and not c.isspace() for c in html.unescape(html.unescape(v))):
        # str.strip() keeps NUL and zero-width characters, and the text encoder decodes HTML entities (twice, as Wan's
        # cleaning does): a prompt of only those is empty to it too
        raise RequestError(name, "must contain a visible character (not only spaces, control or zero-width ones, "
                                 "or HTML entities of those such as &nbsp;)")
    if len(v) > MAX_PROMPT_CHARS:
        raise RequestError(name, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(v)}")
    return v


def _sampler(v) -> str:
    if v not in SAMPLER_NAMES:
        raise RequestError("sampler", f"must be one of {', '.join(SAMPLER_NAMES)}; got {v!r}")
    return v


# each field's rule, whatever the model: (name, check); guidance is checked per value
RULES = (("width", lambda v: _size("width", v)), ("height", lambda v: _size("height", v)), ("frames", _frames),
         ("steps", lambda v: _int("steps", v, 1, MAX_STEPS)),
         ("shift", lambda v: _float("shift", v, MIN_SHIFT, 100.0)), ("sampler", _sampler),
         ("seed", lambda v: _int("seed", v, 0, MAX_SEED)), ("fps", lambda v: _int("fps", v, 1, MAX_FPS)))


def request_from_message(msg, prompt: str | None = None) -> GenerationRequest:
    """The request's fields of a proto message that carries them (the gateway's GenerateRequest, the denoiser's
    DenoiseParams) as a GenerationRequest: unset optional fields, and those the message lacks, are None (the
    model's defaults). `prompt`: for a message without one."""
    fields = msg.DESCRIPTOR.fields_by_name

    def opt(name: str):
        return getattr(msg, name) if name in fields and msg.HasField(name) else None

    return GenerationRequest(
        prompt=msg.prompt if prompt is None else prompt, negative_prompt=opt("negative_prompt"), width=opt("width"),
        height=opt("height"), frames=opt("frames"), steps=opt("steps"), guidance=tuple(msg.guidance) or None,
        shift=opt("shift"), sampler=msg.sampler or None, seed=opt("seed"), fps=opt("fps"),
    )


def reject_unknown_fields(msg, path: str) -> None:
    """RequestError naming the first message (from `path` down) that carries fields this build's proto lacks.
    proto3 would drop them silently, and a newer client's settings (a new cache parameter, say) would not apply
    while the result looked as asked for."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    numbers = sorted({f.field_number for f in UnknownFieldSet(msg)})
    if numbers:
        raise RequestError(path, f"unknown field number{'s' * (len(numbers) > 1)} {', '.join(map(str, numbers))} "
                                 f"in {msg.DESCRIPTOR.full_name}: not part of this server's API (a client built "
                                 "from a newer proto?)")
    for fd, value in msg.ListFields():
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            for i, item in enumerate(value) if fd.is_repeated else [(None, value)]:
                reject_unknown_fields(item, f"{path}.{fd.name}" + (f"[{i}]" if i is not None else ""))


def check_request(req: GenerationRequest) -> None:
    """The rules every model shares, on the fields `req` sets (a client's check before it sends a request to a
    gateway whose model it does not know; resolve_request applies the same rules and the model's own)."""
    _text("prompt", req.prompt, empty_ok=False)
    if req.negative_prompt is not None:
        _text("negative_prompt", req.negative_prompt, empty_ok=True)
    for g in req.guidance or ():
        _float("guidance", g, MIN_GUIDANCE, 50.0)
    for name, check in RULES:
        if getattr(req, name) is not None:
            check(getattr(req, name))


def resolve_request(req: GenerationRequest, model: ModelConfig) -> ResolvedRequest:
    """Validate `req` against `model`, fill the model's defaults; raise RequestError(field, rule) on the first fault."""
    check_request(req)
    d = model.defaults
    negative = _text("negative_prompt", d.negative_prompt if req.negative_prompt is None else req.negative_prompt,
                     empty_ok=True)
    guidance = tuple(d.guidance if req.guidance is None else req.guidance)
    if len(guidance) not in (1, model.num_experts):
        rule = "one value" if model.num_experts == 1 else "one value, or two (high-noise expert, low-noise expert)"
        raise RequestError("guidance", f"{model.name} takes {rule}; got {len(guidance)} values")
    guidance = tuple(_float("guidance", g, MIN_GUIDANCE, 50.0) for g in guidance)
    if len(guidance) < model.num_experts:
        guidance = guidance * model.num_experts
    values = {name: check(getattr(d, name) if getattr(req, name) is None else getattr(req, name))
              for name, check in RULES if name != "seed"}
    seed = secrets.randbelow(2**31) if req.seed is None else req.seed
    return ResolvedRequest(req.prompt, negative, values["width"], values["height"], values["frames"],
                           values["steps"], guidance, values["shift"], values["sampler"], seed, values["fps"])
