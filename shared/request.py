"""User parameters of one generation: the request as sent, and its resolved form with every default applied."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import RequestError

SAMPLER_NAMES = ("unipc", "dpm++", "euler")
MAX_SIDE = 2048  # pixels; 16 * 128 latent patches per side
MAX_FRAMES = 241  # 4 * 60 + 1
MAX_STEPS = 200
MAX_SEED = 2**63 - 1


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
    extras: dict = field(default_factory=dict, compare=False)

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


def _float(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value!r}")
    if (value <= lo if lo_open else value < lo) or value > hi:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise RequestError(name, f"must be {bound} and <= {hi}, got {value}")
    return float(value)


def resolve_request(req: GenerationRequest, model: ModelConfig) -> ResolvedRequest:
    """Validate `req` against `model`, fill the model's defaults; raise RequestError(field, rule) on the first fault."""
    d = model.defaults
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise RequestError("prompt", "must be a non-empty string")
    negative = d.negative_prompt if req.negative_prompt is None else req.negative_prompt
    if not isinstance(negative, str):
        raise RequestError("negative_prompt", "must be a string")
    width = _int("width", d.width if req.width is None else req.width, 16, MAX_SIDE)
    height = _int("height", d.height if req.height is None else req.height, 16, MAX_SIDE)
    for name, v in (("width", width), ("height", height)):
        if v % 16:
            raise RequestError(name, f"must be a multiple of 16 (VAE stride 8 x patch 2), got {v}")
    frames = _int("frames", d.frames if req.frames is None else req.frames, 1, MAX_FRAMES)
    if (frames - 1) % 4:
        raise RequestError("frames", f"must be 4n+1 (1, 5, 9, ..., 81, ...), got {frames}")
    steps = _int("steps", d.steps if req.steps is None else req.steps, 1, MAX_STEPS)
    guidance = tuple(d.guidance if req.guidance is None else req.guidance)
    if len(guidance) not in (1, model.num_experts):
        rule = "one value" if model.num_experts == 1 else "one value, or two (high-noise expert, low-noise expert)"
        raise RequestError("guidance", f"{model.name} takes {rule}; got {len(guidance)} values")
    guidance = tuple(_float("guidance", g, 0.0, 50.0) for g in guidance)
    if len(guidance) < model.num_experts:
        guidance = guidance * model.num_experts
    shift = _float("shift", d.shift if req.shift is None else req.shift, 0.0, 100.0, lo_open=True)
    sampler = d.sampler if req.sampler is None else req.sampler
    if sampler not in SAMPLER_NAMES:
        raise RequestError("sampler", f"must be one of {', '.join(SAMPLER_NAMES)}; got {sampler!r}")
    seed = secrets.randbelow(2**31) if req.seed is None else _int("seed", req.seed, 0, MAX_SEED)
    fps = _int("fps", d.fps if req.fps is None else req.fps, 1, 120)
    return ResolvedRequest(req.prompt, negative, width, height, frames, steps, guidance, shift, sampler, seed, fps)
